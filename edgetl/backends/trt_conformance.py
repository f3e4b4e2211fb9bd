"""Does a QDQ ONNX follow TensorRT's explicit-quantization rules? Checked on the host, no TensorRT needed.

TensorRT builds an INT8 engine from QuantizeLinear/DequantizeLinear (Q/DQ) nodes ("explicit
quantization") and refuses, or silently mis-handles, graphs outside its rules. This module checks
the rules that are decidable from the ONNX file, so a graph bound for a Jetson fails on the host,
naming the offending nodes, instead of on the device:

* Q/DQ are **signed INT8**: the zero point's dtype is int8 (a uint8 zero point = unsigned or
  asymmetric quantization, rejected; a QuantizeLinear without a zero point outputs uint8 by the ONNX
  spec, rejected); an int32 DequantizeLinear (a quantized bias) is rejected: TensorRT takes biases in
  float.
* **Symmetric**: every zero point is 0.
* Scales are build-time constants, finite and > 0.
* **Per-channel** scales only on weights, along the output-channel axis TensorRT expects: axis 0
  for Conv weights ``[K, C, kh, kw]``, axis 1 for ConvTranspose ``[C, K, kh, kw]``, axis 0 for Gemm
  ``B`` with ``transB=1`` (``[N, K]``) and axis 1 without, the last axis for a MatMul weight
  ``[K, N]``; activations are per-tensor. Per-channel needs opset >= 13.
* A QuantizeLinear feeds only DequantizeLinear nodes (INT8 tensors flow only into Q/DQ pairs).
* The opset is within the range the TensorRT version's ONNX parser supports, and every op is in that
  version's support table (onnx-tensorrt ``docs/operators.md``); ops of other domains
  (``com.microsoft``) are rejected.

What it cannot check (only the TensorRT builder can): per-layer tactic availability, DLA layer
restrictions (handled at build time by GPU fallback), and numerics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.errors import EdgetlError, MissingDependencyError

# ONNX opset range of the ONNX parser per TensorRT version (onnx-tensorrt docs/operators.md:
# 8.2/8.4 "up to Opset 13", 8.5/8.6 "up to Opset 17", 10.0 "opset 9 to opset 20").
OPSET_RANGE: dict[str, tuple[int, int]] = {
    "8.2": (7, 13), "8.4": (7, 13), "8.5": (7, 17), "8.6": (7, 17), "10": (9, 20),
}

# Ops marked supported ("Y") in onnx-tensorrt's operators.md for TensorRT 8.5.
_OPS_85 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GRU HardSwish HardSigmoid
Identity If ImageScaler InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike
RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign
Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# 8.2/8.4 lack these (not in their tables, or "N").
_NOT_IN_84 = frozenset("GridSample HardSwish Mod MeanVarianceNormalization NonZero OneHot RandomNormal "
                       "RandomNormalLike Reciprocal RoiAlign Shrink Trilu".split())
_ADDED_86 = frozenset({"LayerNormalization"})
_ADDED_10 = frozenset("IsInf Hardmax CastLike GroupNormalization BlackmanWindow HammingWindow HannWindow "
                      "STFT".split())

SUPPORTED_OPS: dict[str, frozenset[str]] = {
    "8.2": _OPS_85 - _NOT_IN_84, "8.4": _OPS_85 - _NOT_IN_84, "8.5": _OPS_85,
    "8.6": _OPS_85 | _ADDED_86, "10": _OPS_85 | _ADDED_86 | _ADDED_10,
}

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def max_opset(trt_versions: Any) -> int:
    """The highest ONNX opset every one of ``trt_versions`` parses (for the export of a TensorRT target)."""
    return min(OPSET_RANGE[version_key(v)][1] for v in trt_versions)


def version_key(trt_version: str) -> str:
    """``"10.3.0"`` -> ``"10"``, ``"8.6.2"`` -> ``"8.6"``; refuses versions the tables do not cover."""
    parts = str(trt_version).split(".")
    if parts[0] == "10":
        return "10"
    key = ".".join(parts[:2])
    if key not in OPSET_RANGE:
        raise EdgetlError(f"TensorRT {trt_version} is not covered by the conformance tables",
                          hint=f"supported: {', '.join(k if '.' in k else k + '.x' for k in OPSET_RANGE)}")
    return key


@dataclass(frozen=True)
class Problem:
    node: str
    op: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.op} '{self.node}': {self.message} [{self.rule}]"


@dataclass(frozen=True)
class Report:
    path: str
    trt_version: str
    opset: int
    problems: tuple[Problem, ...]
    stats: dict[str, Any] = field(default_factory=dict)
    quantized: bool = True  # checked as a QDQ (explicit quantization) graph

    @property
    def ok(self) -> bool:
        return not self.problems

    def nodes(self, rule: str | None = None) -> list[str]:
        return [p.node for p in self.problems if rule is None or p.rule == rule]

    def to_dict(self) -> dict[str, Any]:
        return {"tensorrt": self.trt_version, "ok": self.ok, "opset": self.opset, "stats": dict(self.stats),
                "problems": [{"node": p.node, "op": p.op, "rule": p.rule, "message": p.message}
                             for p in self.problems]}

    def raise_if_failed(self) -> None:
        if self.ok:
            return
        shown = "\n  ".join(str(p) for p in self.problems[:12])
        more = f"\n  ... and {len(self.problems) - 12} more" if len(self.problems) > 12 else ""
        rules = "explicit-quantization rules" if self.quantized else "ONNX parser"
        hint = ("re-quantize with signed INT8, symmetric (zero point 0), per-channel weights on the output-channel "
                "axis and float biases (`edgetl compile` does), or pick a non-TensorRT target") if self.quantized else \
            f"export the model with an opset and ops TensorRT {self.trt_version} parses, or pick another target"
        raise EdgetlError(f"{self.path} does not follow TensorRT {self.trt_version}'s {rules} "
                          f"({len(self.problems)} problem(s)):\n  {shown}{more}", hint=hint)


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise MissingDependencyError("onnx", "train", "checking an ONNX graph against TensorRT's rules") from None
    return onnx, numpy_helper


def check(onnx_path: str | Path, trt_version: str, require_qdq: bool = True) -> Report:
    """Check ``onnx_path`` against TensorRT ``trt_version``; returns a :class:`Report` (``.ok``)."""
    onnx, numpy_helper = _onnx()
    model = onnx.load(str(onnx_path))
    return check_model(model, trt_version, require_qdq=require_qdq, path=str(onnx_path))


class _Graph:
    """What the rules look up in one graph: constants, producers, consumers, the opset, the problems."""

    def __init__(self, model: Any, numpy_helper: Any):
        graph = model.graph
        self.nodes = list(graph.node)
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value":
                        self.consts[node.output[0]] = numpy_helper.to_array(a.t)
        self.producers = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.opset = int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0))
        self.problems: list[Problem] = []

    def add(self, node: Any, rule: str, message: str) -> None:
        self.problems.append(Problem(node.name or f"<{node.op_type} #{id(node)}>", node.op_type, rule, message))


def check_model(model: Any, trt_version: str, require_qdq: bool = True, path: str = "<model>") -> Report:
    """Check a loaded ONNX ``model`` against TensorRT ``trt_version`` (see :func:`check`)."""
    onnx, numpy_helper = _onnx()
    vkey = version_key(trt_version)
    g = _Graph(model, numpy_helper)
    _check_opset(g, vkey, trt_version)
    _check_ops(g, vkey, trt_version)
    qdq = [n for n in g.nodes if n.op_type in _QDQ]
    per_channel = sum(_check_qdq_node(g, node, onnx) for node in qdq)
    if require_qdq and not qdq:
        g.problems.append(Problem("<model>", "graph", "qdq",
                                  "no QuantizeLinear/DequantizeLinear nodes: not a QDQ model (TensorRT INT8 explicit "
                                  "quantization needs one)"))
    stats = {"nodes": len(g.nodes), "qdq_nodes": len(qdq), "per_channel_qdq": per_channel}
    return Report(path, str(trt_version), g.opset, tuple(g.problems), stats, quantized=require_qdq)


def _check_opset(g: _Graph, vkey: str, trt_version: str) -> None:
    lo, hi = OPSET_RANGE[vkey]
    if not lo <= g.opset <= hi:
        g.problems.append(Problem("<model>", "opset", "opset",
                                  f"ONNX opset {g.opset} is outside TensorRT {trt_version}'s parser range {lo}..{hi}"))


def _check_ops(g: _Graph, vkey: str, trt_version: str) -> None:
    supported = SUPPORTED_OPS[vkey]
    for node in g.nodes:
        if node.domain not in ("", "ai.onnx"):
            g.add(node, "op", f"op of domain {node.domain!r} is not an ONNX standard op (TensorRT has no parser for it)")
        elif node.op_type not in supported:
            g.add(node, "op", f"{node.op_type} is not supported by TensorRT {trt_version}'s ONNX parser")


def _check_qdq_node(g: _Graph, node: Any, onnx: Any) -> bool:
    """The signed-int8, symmetric, constant-scale and Q->DQ rules of one Q/DQ node, then its
    per-channel rules; returns whether the node is per-channel."""
    scale_name = node.input[1] if len(node.input) > 1 else ""
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else ""
    scale = g.consts.get(scale_name)
    if scale is None:
        g.add(node, "scale-constant", f"scale '{scale_name}' is not a constant (TensorRT needs build-time scales)")
    elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        g.add(node, "scale-positive", "scale has values that are not finite and > 0")
    if node.op_type == "QuantizeLinear" and not zp_name:
        g.add(node, "int8", "QuantizeLinear without a zero point outputs uint8 (ONNX default): TensorRT needs int8")
    zp = g.consts.get(zp_name) if zp_name else None
    if zp_name and zp is None:
        g.add(node, "zero-point-constant", f"zero point '{zp_name}' is not a constant")
    x_const = g.consts.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
    dtype = zp.dtype if zp is not None else (x_const.dtype if x_const is not None else None)
    if dtype is not None and dtype != np.int8:
        g.add(node, "int8", _INT8_MESSAGES.get(np.dtype(dtype).name,
                                               f"{dtype} Q/DQ: only signed int8 is supported for INT8 engines"))
    if zp is not None and np.any(zp != 0):
        g.add(node, "symmetric", f"zero point is not 0 (asymmetric quantization; values {np.unique(zp)[:4].tolist()}): "
                                 "TensorRT supports symmetric quantization only")
    if node.op_type == "QuantizeLinear":
        bad = [c.name or c.op_type for c in g.consumers.get(node.output[0], []) if c.op_type != "DequantizeLinear"]
        if bad:
            g.add(node, "q-dq-pair", f"QuantizeLinear output feeds {bad} instead of a DequantizeLinear")
    if scale is None or scale.size <= 1:
        return False
    _check_per_channel(g, node, scale, onnx)
    return True


_INT8_MESSAGES = {
    "uint8": "uint8 zero point (unsigned/asymmetric quantization): TensorRT supports only signed int8 Q/DQ",
    "int32": "int32 DequantizeLinear (a quantized bias): TensorRT takes biases in float; quantize without bias "
             "quantization",
}


def _check_per_channel(g: _Graph, node: Any, scale: np.ndarray, onnx: Any) -> None:
    """Per-channel scales: weights only, opset >= 13, on the output-channel axis TensorRT expects."""
    if g.opset < 13:
        g.add(node, "opset", f"per-channel Q/DQ needs opset >= 13 (model has {g.opset})")
    weight = _weight_source(node, g.consts, g.producers)
    if weight is None:
        g.add(node, "per-tensor-activation", "per-channel scale on an activation: TensorRT quantizes activations "
                                             "per-tensor only")
        return
    rank = weight.ndim
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    axis = int(attrs.get("axis", 1))
    axis = axis + rank if axis < 0 else axis
    if scale.ndim != 1 or not 0 <= axis < rank or weight.shape[axis] != scale.size:
        g.add(node, "per-channel-axis", f"scale of {scale.size} values does not match weight dim {axis} "
                                        f"({weight.shape[axis] if axis < rank else '?'})")
        return
    if node.op_type != "DequantizeLinear":
        return
    for user in g.consumers.get(node.output[0], []):
        want = _expected_axis(user, node.output[0], rank, onnx)
        if want is not None and axis != want:
            g.add(node, "per-channel-axis", f"per-channel axis {axis} on the weight of {user.op_type} "
                                            f"'{user.name}': TensorRT expects axis {want} (output channels)")


def _weight_source(node: Any, consts: dict[str, np.ndarray], producers: dict[str, Any]) -> np.ndarray | None:
    """The constant weight tensor a Q/DQ node quantizes (DQ(int8 const) or DQ(Q(float const))), else None."""
    x = node.input[0]
    if x in consts:
        return consts[x]
    prod = producers.get(x)
    if node.op_type == "DequantizeLinear" and prod is not None and prod.op_type == "QuantizeLinear":
        return consts.get(prod.input[0])
    return None


def _expected_axis(user: Any, tensor: str, rank: int, onnx: Any) -> int | None:
    """The output-channel axis TensorRT expects for a weight feeding ``user``, or None if not a weight input."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in user.attribute}
    idx = list(user.input).index(tensor)
    if user.op_type == "Conv" and idx == 1:
        return 0
    if user.op_type == "ConvTranspose" and idx == 1:
        return 1
    if user.op_type == "Gemm" and idx == 1:
        return 0 if int(attrs.get("transB", 0)) else 1
    if user.op_type == "MatMul" and idx == 1:
        return rank - 1
    return None
