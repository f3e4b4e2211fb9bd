"""8-bit weights for depthwise convolutions where this CPU's INT8 kernels are exact.

On x86 CPUs without VNNI a dense INT8 convolution multiplies u8 activations by s8 weights with
``vpmaddubsw``, which adds each PAIR of products into a saturating int16: 255 x 127 x 2 overflows,
so edgetl quantizes weights to 7 bits there (``weight_range = "reduced"``). A depthwise convolution
has no channel reduction to pair products over: the kernels of ONNX Runtime (MLAS) and OpenVINO
(oneDNN) widen its operands to 16/32 bits before multiplying, so 8-bit weights stay exact, and the
layers that suffer most from 7-bit weights are depthwise ones (9 or 25 weights per channel).

That is a fact about kernels, not a promise: :func:`depthwise_exact` measures it on this machine, on
the backends installed here, with a tiny QDQ graph built to saturate (inputs at 255, weights at +-127
of one sign): the backend's fused INT8 result must equal the reference (Q/DQ as float ops) exactly.
On AVX2 EPYC (Zen 3, ONNX Runtime 1.2x, OpenVINO 2026.4) the depthwise graph was exact and the same
test on a 1x1 and a 3x3 dense convolution was off by 59 and 44 output steps.

Used for OpenVINO targets (``QuantizeConfig.reduce_range``), where it measurably helped the demo's
ELPV model; ONNX Runtime's build of the same model got no better, so its targets keep 7 bits.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from typing import Iterable

import numpy as np

log = logging.getLogger(__name__)


def depthwise_weights(model) -> dict[str, int]:
    """The weight initializers of ``model``'s depthwise Convs (one input channel per group, more than
    one group), each with its number of output channels: the tensors that may keep 8 bits under
    reduced-range quantization."""
    inits = {i.name: i for i in model.graph.initializer}
    names = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        dims = inits[node.input[1]].dims
        if group > 1 and len(dims) == 4 and dims[1] == 1:
            names[node.input[1]] = int(dims[0])
    return names


def _probe_graph(kernel: int = 3, stride: int = 1, channels: int = 32) -> tuple[bytes, np.ndarray]:
    """A u8 x s8 depthwise Conv in QDQ form whose pair sums would saturate int16, and its input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = np.full((channels, 1, kernel, kernel), 127, np.int8)
    w[::2] = rng.integers(-127, 128, w[::2].shape)  # half the channels random, half at the worst case
    x_scale, w_scale = 0.02, 0.01
    y_scale = kernel * kernel * 255 * x_scale * 127 * w_scale / 120  # no output clipping
    x = np.full((1, channels, 16, 16), 255 * x_scale, np.float32)
    x[:, :, ::3] = rng.uniform(0, 255 * x_scale, x[:, :, ::3].shape)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], group=channels, kernel_shape=[kernel, kernel],
                              pads=[kernel // 2] * 4, strides=[stride, stride]),
             helper.make_node("QuantizeLinear", ["y", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["out"])]
    inits = [numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.uint8), "xz"), numpy_helper.from_array(w, "wq"),
             numpy_helper.from_array(np.full(channels, w_scale, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(channels, np.int8), "wz"),
             numpy_helper.from_array(np.array(y_scale, np.float32), "ys"),
             numpy_helper.from_array(np.array(128, np.uint8), "yz")]
    graph = helper.make_graph(nodes, "depthwise_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), x


def _ort(graph: bytes, x: np.ndarray, optimized: bool) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = 1
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _openvino(graph: bytes, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    core = ov.Core()
    fd, path = tempfile.mkstemp(suffix=".onnx")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(graph)
        compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return compiled({"x": x})[0]
    finally:
        os.unlink(path)


@functools.lru_cache(maxsize=None)
def _exact_on(backend: str) -> bool:
    runners = {"onnxruntime": lambda g, x: _ort(g, x, True), "openvino": _openvino}
    if backend not in runners:
        return False
    try:
        for kernel, stride in ((3, 1), (3, 2), (5, 1), (5, 2)):  # EfficientNet/MobileNet's depthwise layers
            graph, x = _probe_graph(kernel, stride)
            if not np.array_equal(runners[backend](graph, x), _ort(graph, x, False)):
                return False
    except ImportError:
        return False
    except Exception as e:  # a backend that cannot run the probe gets no exception from the rule
        log.debug("depthwise probe on %s failed: %s", backend, e)
        return False
    return True


def depthwise_exact(backends: Iterable[str]) -> bool:
    """True when every one of ``backends`` computes an 8-bit-weight depthwise Conv exactly on this CPU."""
    backends = tuple(backends)
    return bool(backends) and all(_exact_on(b) for b in backends)
