"""The detection mixed-precision fallback (edgetl/detect/repair.py on edgetl.repair.fallback_rounds), on a
tiny detector trained in seconds (tiny_cnn at 96 px on coloured rectangles, as tests/test_detect_train.py)
with one layer made sensitive: each test fails when the fallback's decision is replaced by a wrong one
(never falls back, falls back the wrong layer, keeps the last round instead of the best).

The sensitive layer: one channel of the backbone's second block is made dead (conv weights 0, BatchNorm
scale 0 and shift -1: ReLU6 keeps it at exactly 0) and the third block's conv gets a huge weight on that
dead channel for every output channel. Float is unchanged; per-channel INT8 weights of that conv get a
step of ``BIG / 63`` (7-bit), every real weight rounds to 0, and everything after the stride-8 map (most
anchors) collapses. Keeping exactly that conv in float repairs it. Judged in reference numerics (the
same on every CPU class), except where a test is about the target's own numerics."""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pycocotools")

from test_detect_train import CFG, write_rectangles  # noqa: E402

from edgetl.calibration.cache import save_ranges  # noqa: E402
from edgetl.calibration.calibrators import calibrate  # noqa: E402
from edgetl.calibration.qdq import qdq_form, quantized_nodes, weighted_nodes  # noqa: E402
from edgetl.detect.gate import DetThresholds  # noqa: E402
from edgetl.detect.repair import det_better, det_error, fallback  # noqa: E402
from edgetl.numerics import Numerics, reference  # noqa: E402

SENSITIVE = "/backbone/features.1/features.1.0/features.1.0.0/Conv"  # tiny_cnn's third block (C5)
TH = DetThresholds(max_map_drop=5.0, min_agreement=0.85)
FORM = qdq_form("auto", "onnxruntime")


def _make_sensitive(model, channel: int = 3, big: float = 1000.0):
    m = copy.deepcopy(model)
    b2, b3 = m.backbone.features[0][1], m.backbone.features[1][0]
    with torch.no_grad():
        b2[0].weight[channel] = 0
        b2[1].weight[channel] = 0
        b2[1].bias[channel] = -1.0
        b3[0].weight[:, channel] = big
    return m


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from edgetl.detect.compile import material_of
    from edgetl.detect.train import load_detection_run, train_detector

    before, cache = torch.get_num_threads(), os.environ.get("EDGETL_CACHE")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("detrepair")
    os.environ["EDGETL_CACHE"] = str(root / "cache")  # the ranking cache: this module's own
    try:
        train_detector(write_rectangles(root / "data"), root / "run", CFG, progress=lambda s: None)
        manifest, model, splits, names = load_detection_run(root / "run")
        mats = {}
        for name, m in (("plain", model), ("sensitive", _make_sensitive(model))):
            (root / name).mkdir()
            mat, _ = material_of(manifest, m, splits, names, root / name, 100, 300, 0, lambda s: None)
            ranges = save_ranges(calibrate(mat.prepared, mat.cal_inputs, "minmax", False, 1), root / name / "r.json")
            mats[name] = (mat, ranges)
        yield {"root": root, "mats": mats}
    finally:
        torch.set_num_threads(before)
        if cache is None:
            os.environ.pop("EDGETL_CACHE", None)
        else:
            os.environ["EDGETL_CACHE"] = cache


def run(world, variant: str, tmp_path, th=TH, rounds: int = 3, numerics: Numerics | None = None, ranking=None,
        seek_margin: int = 0):
    """The fallback; without the margin search unless asked (the tiny checkset's margins are a box or two)."""
    mat, ranges = world["mats"][variant]
    tmp_path.mkdir(parents=True, exist_ok=True)
    return fallback(mat, ranges, FORM, True, numerics or reference(), th, tmp_path / "q.onnx", rounds, lambda s: None,
                    ranking=ranking, seek_margin=seek_margin)


def test_the_sensitive_layer_is_real_and_the_plain_model_passes_round_0(world, tmp_path):
    mat, _ = world["mats"]["sensitive"]
    assert SENSITIVE in [n for n, _ in weighted_nodes(mat.prepared)]
    plain = run(world, "plain", tmp_path)
    assert len(plain["rounds"]) == 1 and plain["float_layers"] == [] and plain["ranking"] is None  # lazy ranking
    assert plain["gate"]["passed"] and plain["gate"]["float_map50"] > 0.5
    # the same round 0 passes on the line (under 2 boxes from a threshold): the margin search tries more rounds
    # and keeps the widest pass
    seek = run(world, "plain", tmp_path / "seek", seek_margin=2)
    assert seek["rounds"][0]["passed"] and min(seek["rounds"][0]["margins"].values()) < 2 and len(seek["rounds"]) > 1
    from edgetl.repair import _margin

    kept = next(x for x in seek["rounds"] if x["kept"])
    assert _margin(kept) == max(_margin(x) for x in seek["rounds"] if x["passed"])


def test_round_0_fails_and_the_fallback_keeps_exactly_the_sensitive_layer(world, tmp_path):
    r = run(world, "sensitive", tmp_path)
    assert [x["passed"] for x in r["rounds"]] == [False, True]
    assert r["rounds"][0]["drop"] > 10 and r["rounds"][1]["float_layers"] == [SENSITIVE]
    assert r["float_layers"] == [SENSITIVE] and r["gate"]["passed"]
    top = r["ranking"]
    assert top[0].node == SENSITIVE and top[0].gain_db > top[1].gain_db + 3
    q = quantized_nodes(r["model"])
    assert SENSITIVE not in q and len(q) == len(top) - 1  # every other layer stays INT8
    others = [x.gain_db for x in top[1:]]
    assert max(others) < 1.0  # no other layer adds a comparable error (the ranking is not uniform noise)


class WorseWithMoreFloat(Numerics):
    """A target on which the model with more than one layer in float goes wrong (say, its float
    kernels for the extras are broken): reference numerics, except that the scores come out shuffled
    over anchors once two or more layers are float. Round 2 is then strictly worse than round 1."""

    def open(self, model, spec, work=None):
        runner = super().open(model, spec, work)
        n_float = len(weighted_nodes(model)) - len(quantized_nodes(model))
        if n_float >= 2:
            infer_all = runner.infer_all
            runner.infer_all = lambda batch: [o if o.shape[-1] == 4 else o[:, ::-1].copy() for o in infer_all(batch)]
        return runner


def test_when_every_round_misses_the_best_round_is_kept_not_the_last(world, tmp_path):
    ranking = run(world, "sensitive", tmp_path / "ref")["ranking"]  # ranked in reference numerics (cached)
    target = WorseWithMoreFloat("reference", "onnxruntime", dict(reference().options))
    r = run(world, "sensitive", tmp_path, th=DetThresholds(max_map_drop=0.0, min_agreement=1.0), rounds=2,
            numerics=target, ranking=ranking)
    assert len(r["rounds"]) == 3 and not any(x["passed"] for x in r["rounds"])
    assert [len(x["float_layers"]) for x in r["rounds"]] == [0, 1, 2]  # doubling: 1, then 2 float layers
    assert [x["kept"] for x in r["rounds"]] == [False, True, False]
    assert r["float_layers"] == [SENSITIVE] and r["gate"]["agreement"] == pytest.approx(r["rounds"][1]["agreement"],
                                                                                          abs=1e-4)


def test_det_better_orders_passed_then_agreement_less_drop_then_fewer_float_layers():
    row = dict(passed=False, agreement=0.93, drop=1.0, float_layers=["a"])
    assert det_better({**row, "passed": True, "agreement": 0.5}, row)
    assert det_better({**row, "agreement": 0.94}, row) and not det_better({**row, "agreement": 0.92}, row)
    assert det_better({**row, "drop": 0.5}, row) and not det_better({**row, "drop": 1.5}, row)
    assert not det_better({**row, "drop": -3.0}, {**row, "drop": 0.0})  # an INT8 mAP above float is no gain
    assert det_better({**row, "float_layers": []}, row) and not det_better(row, row)


def test_the_ranking_metric_looks_only_where_float_sees_something(world):
    """Noise on background anchors (foreground probability < FG_MIN) does not count; noise on the few
    anchors that make boxes does."""
    mat, _ = world["mats"]["plain"]
    err = det_error(mat.post)
    rng = np.random.default_rng(0)
    a = mat.checkset.float_scores.shape[1]
    ref = np.zeros((2, a, 4 + 3), np.float32)
    ref[..., 4] = 1.0  # background everywhere ...
    ref[:, :5, 4], ref[:, :5, 5] = 0.2, 0.8  # ... except 5 anchors per image
    ref[..., :4] = rng.normal(0, 1, (2, a, 4))
    bg = ref.copy()
    bg[:, 5:, 4] -= 0.04  # background anchors move (still < FG_MIN foreground)
    bg[:, 5:, 6] += 0.04
    fg = ref.copy()
    fg[:, :5, 5] -= 0.04
    fg[:, :5, 4] += 0.04
    assert err(ref, bg)[0] == float("inf") and err(ref, fg)[0] < 30
    assert replace(TH).min_agreement == 0.85  # the thresholds the other tests use are the module's


def test_margins_are_counted_in_boxes_and_a_pass_on_the_line_seeks_margin():
    """F1 0.951 against 0.95 on 230 + 232 detections is 0.23 of a box: a pass on the line, so the
    loop tries more rounds (repair.fallback_rounds) as the classifier does with images."""
    from edgetl.detect.repair import SEEK_MARGIN, margins_in_boxes
    from edgetl.repair import _margin

    g = {"agreement_detail": {"n_float": 230, "n_quant": 232}, "margins": {"agreement": 0.001, "drop": 0.5}, "n_gt": 237}
    m = margins_in_boxes(g)
    assert m["agreement"] == pytest.approx(0.231) and m["drop"] == pytest.approx(1.185)
    assert _margin({"margins": m}) == 0 < SEEK_MARGIN
    wide = margins_in_boxes({**g, "margins": {"agreement": 0.02, "drop": 1.0}})
    assert _margin({"margins": wide}) == 2  # 4.6 boxes of agreement, 2.37 of mAP: enough
