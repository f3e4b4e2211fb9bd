"""8-bit depthwise weights under reduced-range quantization (calibration.depthwise): the probe can
tell an exact kernel from a saturating one on this CPU, and the rendered QDQ graph gives depthwise
Convs 8-bit weights and every other layer 7-bit ones."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgetl.calibration import depthwise as dwmod  # noqa: E402
from edgetl.runtime.cpu import host_cpu  # noqa: E402


def _dense_probe(monkeypatch):
    """The probe graph with its depthwise Conv swapped for a dense one (the control that must fail
    where u8 x s8 pair sums saturate)."""
    real = dwmod._probe_graph

    def dense(kernel=3, stride=1, channels=32):
        graph, x = real(kernel, stride, channels)
        m = onnx.load_from_string(graph)
        conv = next(n for n in m.graph.node if n.op_type == "Conv")
        for a in conv.attribute:
            if a.name == "group":
                a.i = 1
        w = next(i for i in m.graph.initializer if i.name == "wq")
        dense_w = np.full((channels, channels, kernel, kernel), 127, np.int8)
        w.CopyFrom(numpy_helper.from_array(dense_w, "wq"))
        ys = next(i for i in m.graph.initializer if i.name == "ys")
        ys.CopyFrom(numpy_helper.from_array(np.array(kernel * kernel * channels * 5.1 * 1.27 / 120, np.float32), "ys"))
        return m.SerializeToString(), x
    monkeypatch.setattr(dwmod, "_probe_graph", dense)
    dwmod._exact_on.cache_clear()


def test_the_probe_tells_a_saturating_dense_kernel_from_an_exact_depthwise_one(monkeypatch):
    dwmod._exact_on.cache_clear()
    assert dwmod.depthwise_exact(["onnxruntime"]) is True  # MLAS's depthwise kernel widens before multiplying
    assert dwmod.depthwise_exact([]) is False and dwmod.depthwise_exact(["tensorrt"]) is False
    _dense_probe(monkeypatch)
    try:
        dense_exact = dwmod.depthwise_exact(["onnxruntime"])
    finally:
        dwmod._exact_on.cache_clear()
    if host_cpu().int8_exact:  # VNNI/AMX/ARM: dense products accumulate in int32 too
        assert dense_exact is True
    else:  # AVX2 without VNNI: vpmaddubsw saturates the pair sums, and the probe sees it
        assert dense_exact is False


def _tiny_net(path):
    """x -> dense 3x3 conv (stem) -> depthwise 3x3 -> 1x1 conv: one depthwise layer, two dense ones."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w_stem"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32), "w_dw"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w_pw")]
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["a"], pads=[1] * 4, name="stem"),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w_dw"], ["c"], group=8, pads=[1] * 4, name="dw"),
             helper.make_node("Relu", ["c"], ["d"]),
             helper.make_node("Conv", ["d", "w_pw"], ["y"], name="pw")]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return m


def _weight_span(qdq_path) -> dict[str, int]:
    """The largest |quantized weight| of each Conv weight in a QDQ graph."""
    m = onnx.load(str(qdq_path))
    return {i.name.split("_quantized")[0]: int(np.abs(numpy_helper.to_array(i).astype(np.int32)).max())
            for i in m.graph.initializer
            if i.name.startswith("w_") and "zero_point" not in i.name and i.data_type == TensorProto.INT8}


def test_dense_rendering_keeps_8_bit_depthwise_weights_and_7_bit_others(tmp_path):

    from edgetl.calibration.cache import save_ranges
    from edgetl.calibration.qdq import qdq_form
    from edgetl.quantize import render_qdq

    model = _tiny_net(tmp_path / "tiny.onnx")
    assert dwmod.depthwise_weights(model) == {"w_dw": 8}
    ranges = {name: (0.0, 4.0) for name in ("x", "a", "b", "c", "d", "y")}
    ranges["x"] = (-1.0, 1.0)
    cache = save_ranges(ranges, tmp_path / "ranges.json")
    form = qdq_form("u8s8", "onnxruntime")
    rendered = {rr: render_qdq(tmp_path / "tiny.onnx", cache, tmp_path / f"q_{rr}.onnx", form, reduce_range=rr)
                for rr in (False, True, "dense")}
    spans = {rr: _weight_span(path) for rr, path in rendered.items()}
    for path in rendered.values():  # still one scale per output channel (a single override entry made it per-tensor)
        scales = {i.name: list(i.dims) for i in onnx.load(str(path)).graph.initializer if i.name.endswith("_scale")}
        assert (scales["w_stem_scale"], scales["w_dw_scale"], scales["w_pw_scale"]) == ([8], [8], [4])
    assert spans[False] == {"w_stem": 127, "w_dw": 127, "w_pw": 127}
    assert spans[True] == {"w_stem": 64, "w_dw": 64, "w_pw": 64}  # ONNX Runtime's reduced range: -64..64
    assert spans["dense"] == {"w_stem": 64, "w_dw": 127, "w_pw": 64}
