"""TensorRT's explicit-quantization rules checked on the host, and the engine build where TensorRT exists."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _tinyqdq import fp32_onnx, qdq_onnx
from edgetl.backends import trt_conformance as conf
from edgetl.runtime.errors import EdgetlError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("qdq")
    fp32 = fp32_onnx(d / "fp32.onnx")
    return {"fp32": fp32, "s8": qdq_onnx(fp32, d / "s8.onnx", signed=True),
            "u8": qdq_onnx(fp32, d / "u8.onnx", signed=False),
            "bias32": qdq_onnx(fp32, d / "bias32.onnx", signed=True, quantize_bias=True)}


@pytest.mark.parametrize("version", ["8.5.2", "8.6.2", "10.3.0"])
def test_signed_symmetric_per_channel_accepted(models, version):
    report = conf.check(models["s8"], version)
    assert report.ok, report.problems
    assert report.stats["per_channel_qdq"] >= 4  # 3 Conv weights + the Gemm weight
    report.raise_if_failed()


def test_uint8_asymmetric_rejected_by_node_name(models):
    report = conf.check(models["u8"], "8.5")
    assert not report.ok
    int8 = set(report.nodes("int8"))
    sym = set(report.nodes("symmetric"))
    # every activation Q/DQ pair carries a uint8 zero point; the input's is also not 0
    assert {"input_QuantizeLinear", "input_DequantizeLinear"} <= int8
    assert "input_QuantizeLinear" in sym
    g = onnx.load(str(models["u8"])).graph
    qdq = {n.name for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    uint8_nodes = {n.name for n in g.node if n.name in qdq and len(n.input) > 2 and consts[n.input[2]].dtype == np.uint8}
    assert uint8_nodes and uint8_nodes == int8
    with pytest.raises(EdgetlError) as e:
        report.raise_if_failed()
    assert "input_QuantizeLinear" in e.value.message and "signed int8" in e.value.message


def test_quantized_bias_rejected(models):
    report = conf.check(models["bias32"], "10.3")
    names = report.nodes("int8")
    assert names and all("bias" in n or "Conv" in n for n in names)
    assert all("int32" in p.message for p in report.problems if p.rule == "int8")


def test_float_model_is_not_a_qdq_model(models):
    assert conf.check(models["fp32"], "8.6").nodes("qdq") == ["<model>"]
    assert conf.check(models["fp32"], "8.6", require_qdq=False).ok


def _conv_model(weight_axis: int, opset: int = 17, act_per_channel: bool = False, extra_node=None):
    """input -> Q/DQ -> Conv(DQ(int8 W[4,4,1,1]), per-channel on ``weight_axis``) -> output."""
    k = 4
    w = np.arange(k * k, dtype=np.int8).reshape(k, k, 1, 1)
    inits = [numpy_helper.from_array(w, "W_q"), numpy_helper.from_array(np.full(k, 0.1, np.float32), "W_scale"),
             numpy_helper.from_array(np.zeros(k, np.int8), "W_zp"),
             numpy_helper.from_array(np.full(k if act_per_channel else (), 0.05, np.float32), "x_scale"),
             numpy_helper.from_array(np.zeros(k if act_per_channel else (), np.int8), "x_zp")]
    act_axis = {"axis": 1} if act_per_channel else {}
    nodes = [helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zp"], ["xq"], name="in_q", **act_axis),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="in_dq", **act_axis),
             helper.make_node("DequantizeLinear", ["W_q", "W_scale", "W_zp"], ["W"], name="w_dq", axis=weight_axis),
             helper.make_node("Conv", ["xdq", "W"], ["output"], name="conv")]
    if extra_node is not None:
        nodes.append(extra_node)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, k, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, k, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_per_channel_axis_rule():
    assert conf.check_model(_conv_model(weight_axis=0), "8.5").ok
    report = conf.check_model(_conv_model(weight_axis=1), "8.5")
    assert report.nodes("per-channel-axis") == ["w_dq"]
    assert "expects axis 0" in report.problems[0].message
    assert conf.check_model(_conv_model(weight_axis=-4), "8.5").ok  # negative axis normalised


def test_per_channel_activation_rejected():
    report = conf.check_model(_conv_model(weight_axis=0, act_per_channel=True), "10.3")
    assert set(report.nodes("per-tensor-activation")) == {"in_q", "in_dq"}


def test_opset_range_per_version():
    m = _conv_model(weight_axis=0, opset=18)
    assert conf.check_model(m, "8.6").nodes("opset") == ["<model>"]  # 8.5/8.6 parse up to opset 17
    assert conf.check_model(m, "10.3").ok
    report = conf.check_model(_conv_model(weight_axis=0, opset=12), "8.5")
    assert set(report.nodes("opset")) == {"w_dq"}  # per-channel Q/DQ needs opset 13


def test_ops_per_version():
    ln = helper.make_node("LayerNormalization", ["output", "W_scale"], ["ln"], name="ln")
    assert conf.check_model(_conv_model(0, extra_node=ln), "8.5").nodes("op") == ["ln"]
    assert conf.check_model(_conv_model(0, extra_node=ln), "10.3").ok
    ms = helper.make_node("FusedConv", ["output"], ["y"], name="contrib", domain="com.microsoft")
    assert conf.check_model(_conv_model(0, extra_node=ms), "10.3").nodes("op") == ["contrib"]


def test_unknown_version_refused():
    with pytest.raises(EdgetlError, match="not covered"):
        conf.version_key("7.1.3")


def test_engine_build_where_tensorrt_exists(tmp_path):
    """A real engine from the conforming QDQ model; only where TensorRT and a GPU exist."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"tensorrt cannot be imported here ({exc}): engine build not exercised")
    from _tinyqdq import make_qdq_artifact

    from edgetl.backends import build_artifact
    from edgetl.runtime.runners import open_runner
    from edgetl.targets import TargetProfile

    art = make_qdq_artifact(tmp_path / "art")
    profile = TargetProfile(name="here", description="this GPU", backend="tensorrt", precision="int8",
                            source="test")
    outcome = build_artifact(art, profile, gate=False, progress=lambda s: None)
    entry = outcome.entry
    assert entry is not None and entry["model"].endswith(".int8.engine")
    runner = open_runner("tensorrt", art / entry["model"], entry["options"])
    x = np.load(art / "checkset.npz")["inputs"]
    assert runner.infer_many(x).shape == (len(x), 3)
