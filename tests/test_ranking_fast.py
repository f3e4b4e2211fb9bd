"""The sensitivity rankings' renders (``edgetl.quantize.QdqRenderer``, ``calibration.render_memo``) are
``render_qdq``'s, only faster: on a small MobileNet-like graph (stem, depthwise and pointwise convs with
ReLU6, a residual Add, a Gemm head), in both QDQ forms and every weight range, each render is the same
file, byte for byte, as ``render_qdq`` writes, and the leave-one-out and accumulation-aware rankings
are the ones the ``render_qdq`` path computes. Where the memo cannot be used, or its render differs or
fails, the renders are ``render_qdq``'s and the log says why."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edgetl import quantize as Q
from edgetl.calibration import render_memo
from edgetl.calibration.cache import save_ranges
from edgetl.calibration.calibrators import calibrate
from edgetl.calibration.qdq import qdq_form, weighted_nodes
from edgetl.numerics import reference
from edgetl.quantize import QdqRenderer, prepare_float, render_qdq

FORMS = ("u8s8", "s8s8")
WEIGHT_RANGES = (False, True, "dense")


def _tiny_mobilenet():
    import torch
    from torch import nn

    def cbr(cin, cout, k=3, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.body = nn.Sequential(cbr(c, 2 * c, 1), cbr(2 * c, 2 * c, 3, groups=2 * c), cbr(2 * c, c, 1, act=False))

        def forward(self, x):
            return x + self.body(x)

    torch.manual_seed(0)
    net = nn.Sequential(cbr(3, 8, stride=2), Block(8), cbr(8, 16, 3, stride=2, groups=8), Block(16),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():  # BatchNorm statistics that are not the identity (folded into the convs)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch = pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("ranking_fast")
    torch.onnx.export(_tiny_mobilenet(), torch.zeros(1, 3, 32, 32), str(root / "fp32.onnx"), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17,
                      dynamo=False)
    prepared = prepare_float(root / "fp32.onnx", root / "prepared.onnx")
    x = np.random.default_rng(0).normal(size=(24, 3, 32, 32)).astype(np.float32)
    ranges = {f: save_ranges(calibrate(prepared, x, "minmax", qdq_form(f).symmetric_activations, 8),
                             root / f"ranges_{f}.json") for f in FORMS}
    layers = [n for n, _ in weighted_nodes(prepared)]
    assert len(layers) >= 9 and any(op == "Gemm" for _, op in weighted_nodes(prepared))
    return SimpleNamespace(root=root, prepared=prepared, inputs=x[:16], ranges=ranges, layers=layers)


class PlainRenderer:
    """The code before QdqRenderer: one ``render_qdq`` per render."""

    def __init__(self, prepared, cache, form, reduce_range=False, log=lambda s: None):
        self.args = prepared, cache, form, reduce_range

    def render(self, out, exclude=(), only=None):
        prepared, cache, form, rr = self.args
        return render_qdq(prepared, cache, out, form, exclude, only=only, reduce_range=rr)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduce_range", WEIGHT_RANGES)
def test_every_render_is_the_file_render_qdq_writes(tiny, tmp_path, form, reduce_range):
    said: list[str] = []
    renderer = QdqRenderer(tiny.prepared, tiny.ranges[form], qdq_form(form), reduce_range, said.append)
    L = tiny.layers
    # leave-one-out (each layer in float, on top of layers kept before), the accumulation-aware ranking's
    # suffixes in float, and nodes_to_quantize prefixes
    cases = [([], None), *[([n], None) for n in L], ([L[0], L[4]], None), *[(L[k + 1:], None) for k in (0, 3, 7)],
             *[([], L[:k]) for k in (1, 5)], ([L[2]], L[:6])]
    for i, (exclude, only) in enumerate(cases):
        fast = renderer.render(tmp_path / "fast.onnx", exclude, only).read_bytes()
        plain = render_qdq(tiny.prepared, tiny.ranges[form], tmp_path / "plain.onnx", qdq_form(form), exclude, only,
                           reduce_range).read_bytes()
        assert fast == plain, f"render {i}: exclude={exclude} only={only}"
    # the memo did the work (not a silent fall-back to the plain path), checked once against it
    assert renderer.memo is not None and renderer.memo.hits > 10 * len(L) and renderer.checked and not said
    assert not list(tmp_path.glob(".*check*"))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("reduce_range", WEIGHT_RANGES)
def test_the_rankings_are_the_ones_the_render_qdq_path_computes(tiny, monkeypatch, form, reduce_range):
    from edgetl import repair
    from edgetl.detect.repair import rank_cumulative

    cfg = SimpleNamespace(form=qdq_form(form), reduce_range=reduce_range)
    cache, numerics = tiny.ranges[form], reference()
    kept = [tiny.layers[1]]
    fast = {"loo": repair._rank_layers(tiny.prepared, cache, cfg, tiny.inputs, numerics),
            "loo kept": repair._rank_layers(tiny.prepared, cache, cfg, tiny.inputs, numerics, kept),
            "cumulative": rank_cumulative(tiny.prepared, cache, cfg, tiny.inputs, numerics, (), repair.LOGITS)}
    monkeypatch.setattr(Q, "QdqRenderer", PlainRenderer)
    plain = {"loo": repair._rank_layers(tiny.prepared, cache, cfg, tiny.inputs, numerics),
             "loo kept": repair._rank_layers(tiny.prepared, cache, cfg, tiny.inputs, numerics, kept),
             "cumulative": rank_cumulative(tiny.prepared, cache, cfg, tiny.inputs, numerics, (), repair.LOGITS)}
    for k in fast:
        a, b = fast[k], plain[k]
        assert [r.node for r in a] == [r.node for r in b], k
        assert np.allclose([r.gain_db for r in a], [r.gain_db for r in b], rtol=0, atol=1e-6), k
        assert [(r.sqnr_db, r.agreement) for r in a] == [(r.sqnr_db, r.agreement) for r in b], k
    assert len({round(r.gain_db, 3) for r in plain["loo"]}) > 3  # a ranking with something to order
    assert tiny.layers[1] not in [r.node for r in plain["loo kept"]]


def _render_twice(tiny, tmp_path, said):
    form = qdq_form("u8s8")
    renderer = QdqRenderer(tiny.prepared, tiny.ranges["u8s8"], form, True, said.append)
    for exclude in ([], [tiny.layers[2]], [tiny.layers[3]]):
        got = renderer.render(tmp_path / "fast.onnx", exclude).read_bytes()
        want = render_qdq(tiny.prepared, tiny.ranges["u8s8"], tmp_path / "plain.onnx", form, exclude,
                          reduce_range=True).read_bytes()
        assert got == want
    return renderer


def test_an_onnx_runtime_it_cannot_memoize_renders_plainly_and_says_why(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(render_memo, "unsupported", lambda: "this ONNX Runtime's QDQQuantizer has no X")
    said: list[str] = []
    renderer = _render_twice(tiny, tmp_path, said)
    assert renderer.memo is None and len(said) == 1 and "has no X" in said[0] and "full quantize_static" in said[0]


def test_a_memoized_render_that_differs_is_replaced_by_the_plain_one(tiny, tmp_path, monkeypatch):
    real = render_memo.WeightMemo._quantize

    def corrupt(self, original):  # a quantizer whose remembered weights are not what it would compute
        quantize = real(self, original)

        def wrong(*a, **k):
            t = quantize(*a, **k)
            if self.hits:
                t.raw_data = bytes(len(t.raw_data))
            return t
        return wrong

    monkeypatch.setattr(render_memo.WeightMemo, "_quantize", corrupt)
    said: list[str] = []
    renderer = _render_twice(tiny, tmp_path, said)
    assert renderer.memo is None and len(said) == 1 and "differs from quantize_static's own" in said[0]
    assert not list(tmp_path.glob(".*check*"))


def test_a_failing_memoized_render_falls_back_to_the_plain_one(tiny, tmp_path, monkeypatch):
    def broken(self, original):
        def calc(quantizer):
            raise KeyError("tensors_to_quantize")
        return calc

    monkeypatch.setattr(render_memo.WeightMemo, "_calc", broken)
    said: list[str] = []
    renderer = _render_twice(tiny, tmp_path, said)
    assert renderer.memo is None and len(said) == 1 and "failed (KeyError" in said[0]
    # the patch is gone: ONNX Runtime's own functions are back in place
    from onnxruntime.quantization import qdq_quantizer as qq

    assert qq.QDQQuantizer._calc_initializer_quant_params.__qualname__.startswith("QDQQuantizer.")
