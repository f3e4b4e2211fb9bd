"""Reading QDQ ONNX graphs: what is quantized, and the ranges a QDQ graph holds.

``strip_qdq`` turns any QDQ graph (NNCF's QAT/PTQ export, ONNX Runtime's, a third party's) back
into the float graph it quantizes, plus the activation ranges its QuantizeLinear nodes encode:
weights become their fake-quantized values (dequantize(quantize(w))), so the float graph computes
what the QDQ graph computes up to activation rounding. That is how one quantization *result*
(e.g. QAT-trained weights and learned ranges) is re-rendered in another QDQ form (e.g. the
ORT/TensorRT-friendly s8s8 form) by ``quantize_static`` with those ranges as its calibration cache.

onnx and numpy only (no torch); onnx is imported inside the functions.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import onnx

QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def load_model(model: "str | Path | onnx.ModelProto") -> "onnx.ModelProto":
    import onnx

    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def op_counts(model: "str | Path | onnx.ModelProto") -> dict[str, int]:
    return dict(Counter(n.op_type for n in load_model(model).graph.node))


def is_qdq(model: "str | Path | onnx.ModelProto") -> bool:
    c = op_counts(model)
    return c.get("QuantizeLinear", 0) > 0 and c.get("DequantizeLinear", 0) > 0


def weighted_nodes(model: "str | Path | onnx.ModelProto", op_types=QUANTIZABLE_OPS) -> list[tuple[str, str]]:
    """``(name, op_type)`` of the weighted compute nodes, in graph order (the layers to rank)."""
    return [(n.name, n.op_type) for n in load_model(model).graph.node if n.op_type in op_types]


def quantized_nodes(model: "str | Path | onnx.ModelProto", op_types=QUANTIZABLE_OPS) -> list[str]:
    """Names of the compute nodes whose weights are quantized (read through a DequantizeLinear of a
    constant, or of a QuantizeLinear of a constant). A layer kept in float has float weights, even
    when its activation input arrives through a Q/DQ pair of the quantized layer before it."""
    g = load_model(model).graph
    consts = constant_values(g)
    producer = {o: n for n in g.node for o in n.output}
    weight_dq = set()
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            continue
        src = producer.get(n.input[0])
        if n.input[0] in consts or (src is not None and src.op_type == "QuantizeLinear" and src.input[0] in consts):
            weight_dq.add(n.output[0])
    return [n.name for n in g.node if n.op_type in op_types and any(i in weight_dq for i in n.input)]


def constant_values(graph: "onnx.GraphProto") -> dict[str, np.ndarray]:
    """Initializers, Constant node outputs and Identity-of-constant outputs, by tensor name."""
    from onnx import numpy_helper

    vals = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
        elif n.op_type == "Identity" and n.input[0] in vals:
            vals[n.output[0]] = vals[n.input[0]]
    return vals


def _qrange(zp: np.ndarray | None) -> tuple[int, int, np.ndarray]:
    if zp is None:  # ONNX default: uint8, zero point 0
        return 0, 255, np.zeros((), np.int64)
    info = np.iinfo(zp.dtype)
    return int(info.min), int(info.max), zp.astype(np.int64)


def _axis(node: "onnx.NodeProto") -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _bcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if v.ndim == 0 or v.size == 1 or ndim == 0:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = v.size
    return v.reshape(shape)


def fake_quantize(w: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int) -> np.ndarray:
    """dequantize(quantize(w)) with ONNX QuantizeLinear semantics (round half to even, saturate)."""
    qmin, qmax, z = _qrange(zp)
    s = _bcast(scale.astype(np.float32), w.ndim, axis)
    zb = _bcast(z, w.ndim, axis)
    q = np.clip(np.rint(w / s) + zb, qmin, qmax)
    return ((q - zb) * s).astype(np.float32)


def activation_range(scale: np.ndarray, zp: np.ndarray | None) -> tuple[float, float]:
    """The real range a per-tensor (scale, zero point) covers. Signed zero-point-0 tensors use the
    narrow range [-127, 127] so a symmetric re-quantization reproduces the same scale exactly."""
    qmin, qmax, z = _qrange(zp)
    s, zi = float(np.asarray(scale).reshape(-1)[0]), int(np.asarray(z).reshape(-1)[0])
    if qmin < 0 and zi == 0:
        qmin = -qmax
    return (qmin - zi) * s, (qmax - zi) * s


def strip_qdq(model: "str | Path | onnx.ModelProto") -> tuple["onnx.ModelProto", dict[str, tuple[float, float]]]:
    """The float graph a QDQ graph quantizes + ``{activation tensor: (low, high)}`` of its quantizers.

    Weights (float initializers behind Q->DQ, or integer initializers behind DQ) are replaced by
    their dequantized values. Tensor and node names of the float graph are kept, so the ranges
    apply to it directly.
    """
    from onnx import helper, numpy_helper

    m = copy.deepcopy(load_model(model))
    g = m.graph
    consts = constant_values(g)
    producer = {o: n for n in g.node for o in n.output}
    ranges: dict[str, tuple[float, float]] = {}
    reroute: dict[str, str] = {}
    dropped: set[int] = set()
    new_inits: list[Any] = []
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear"]:
        scale = consts.get(dq.input[1])
        zp = consts.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if scale is None:
            continue  # dynamic scale: not a static QDQ pair, leave it
        src = dq.input[0]
        q = producer.get(src)
        if q is not None and q.op_type == "QuantizeLinear":
            x = q.input[0]
            if x in consts:  # a weight: bake the fake quantization into a float initializer
                w = fake_quantize(consts[x].astype(np.float32), scale, zp, _axis(q))
                name = f"{x}__fq{len(new_inits)}"
                new_inits.append(numpy_helper.from_array(w, name))
                consts[name] = w
                reroute[dq.output[0]] = name
            else:
                if scale.size == 1 and x not in ranges:
                    ranges[x] = activation_range(scale, zp)
                reroute[dq.output[0]] = x
            dropped.add(id(dq))
        elif src in consts:  # integer weight + DequantizeLinear (no QuantizeLinear)
            qv = consts[src].astype(np.int64)
            z = np.zeros((), np.int64) if zp is None else zp.astype(np.int64)
            ax = _axis(dq)
            w = ((qv - _bcast(z, qv.ndim, ax)) * _bcast(scale.astype(np.float32), qv.ndim, ax)).astype(np.float32)
            new_inits.append(numpy_helper.from_array(w, dq.output[0]))
            consts[dq.output[0]] = w
            dropped.add(id(dq))

    def resolve(t: str) -> str:
        while t in reroute:
            t = reroute[t]
        return t

    nodes = [n for n in g.node if id(n) not in dropped]
    for n in nodes:
        for i, t in enumerate(n.input):
            if t in reroute:
                n.input[i] = resolve(t)
    outputs = {o.name for o in g.output}
    for o in outputs & set(reroute):  # a graph output was a DQ output: keep its name with an Identity
        nodes.append(helper.make_node("Identity", [resolve(o)], [o], name=f"{o}__identity"))
    g.initializer.extend(new_inits)
    _replace_nodes(g, nodes)
    return prune_dead_nodes(m), ranges


def prune_dead_nodes(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Drop (in place) the nodes and initializers nothing reaches the graph outputs through."""
    g = model.graph
    _replace_nodes(g, _live_nodes(list(g.node), {o.name for o in g.output}))
    _drop_unused_initializers(g)
    return model


def _live_nodes(nodes: list, outputs: set[str]) -> list:
    needed = set(outputs)
    keep = []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    return list(reversed(keep))


def _replace_nodes(g: "onnx.GraphProto", nodes: list) -> None:
    kept = [copy.deepcopy(n) for n in nodes]
    del g.node[:]
    g.node.extend(kept)


def _drop_unused_initializers(g: "onnx.GraphProto") -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    init_names = {i.name for i in g.initializer}
    keep = [copy.deepcopy(i) for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    # graph inputs: real inputs always stay; initializers listed as inputs go with their initializer
    graph_inputs = [copy.deepcopy(i) for i in g.input if i.name in used or i.name not in init_names]
    del g.input[:]
    g.input.extend(graph_inputs)


# ------------------------------------------------------------------------------------------
# QDQ forms: one quantization result, rendered the way each consumer runs it fast
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QdqForm:
    """How ``quantize_static`` renders the QDQ graph (see docs/quantization.md)."""

    key: str  # what manifest.quantization.qdq_format records
    short: str  # the --qdq-form value
    activation: str  # onnxruntime.quantization.QuantType member for activations
    symmetric_activations: bool
    quantize_bias: bool
    fast_on: tuple[str, ...]  # backends measured to run this form faster than float
    description: str

    def extra_options(self) -> dict[str, Any]:
        return {"ActivationSymmetric": self.symmetric_activations, "WeightSymmetric": True,
                "QuantizeBias": self.quantize_bias}


QDQ_FORMS: dict[str, QdqForm] = {f.short: f for f in (
    QdqForm("s8s8-symmetric-per-channel", "s8s8", "QInt8", True, False, ("tensorrt",),
            "TensorRT explicit quantization: signed int8 activations and weights, symmetric (zero point 0), "
            "per-channel weights, float biases"),
    QdqForm("u8s8-asymmetric-per-channel", "u8s8", "QUInt8", False, True, ("onnxruntime", "openvino"),
            "ONNX Runtime's CPU form: uint8 asymmetric activations (ReLU/Clip folded into the ranges), "
            "signed symmetric per-channel weights, int32 biases"),
)}
# the form each backend's consumer runs fast (measured: benchmarks/quantize_elpv.py)
FORM_FOR_BACKEND = {"tensorrt": "s8s8", "onnxruntime": "u8s8", "openvino": "u8s8"}


def qdq_form(name: str, backend: str = "onnxruntime") -> QdqForm:
    from ..runtime.errors import EdgetlError

    if name == "auto":
        if backend not in FORM_FOR_BACKEND:
            raise EdgetlError(f"--backend {backend!r} has no QDQ form", hint=f"use one of {sorted(FORM_FOR_BACKEND)}")
        name = FORM_FOR_BACKEND[backend]
    if name not in QDQ_FORMS:
        raise EdgetlError(f"--qdq-form {name!r} is not valid", hint=f"use auto or one of {sorted(QDQ_FORMS)}")
    return QDQ_FORMS[name]


def form_by_key(key: str | None) -> QdqForm | None:
    return next((f for f in QDQ_FORMS.values() if f.key == key), None)
