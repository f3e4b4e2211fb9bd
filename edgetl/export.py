"""FP32 ONNX export of a run's classifier, with a parity check against PyTorch.

The graph has one input ``input`` (the manifest's layout, float32) and one output ``logits``;
the batch axis is dynamic unless a static batch is asked for. Shape arithmetic on static
dimensions is folded into constants (:func:`fold_static_shapes`): timm's TF-"SAME" padding
(EfficientNet-Lite0) computes its pads at run time from ``x.shape`` in float ops, which a
quantizer would otherwise quantize like activations; on Lite0 that shifted feature maps by a
pixel (27x27 instead of 28x28 inside the INT8 graph). Parity: the ONNX model, run by
ONNX Runtime (through ``open_runner``, as everything else runs it), must reproduce PyTorch's
logits on held-out images (max abs diff within tolerance, same top-1 except where PyTorch's own
top-2 margin is below the tolerance); otherwise export fails loudly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .runtime.errors import EdgetlError
from .runtime.preprocess import PreprocessSpec
from .runtime.runners import open_runner

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17


class ExportParityError(EdgetlError):
    """The exported ONNX does not compute what the PyTorch model computes."""


@dataclass(frozen=True)
class Parity:
    n: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    tolerance: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def torch_logits(model, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Float logits of ``model`` (eval mode, no grad) on a preprocessed numpy batch."""
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch_size):
            outs.append(model(torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch_size]))).float().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def export_onnx(model, spec: PreprocessSpec, path: str | Path, static_batch: int | None = None,
                opset: int = OPSET) -> Path:
    """Export ``model`` to ``path`` (TorchScript exporter, opset 17, constant folding)."""
    import torch

    path = Path(path)
    model.eval()
    example = torch.zeros(spec.tensor_shape(static_batch or 1), dtype=torch.float32)
    dynamic = None if static_batch else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice: dynamo=False is deliberate
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False)
    return fold_static_shapes(path, path)


def _fold_shape_reads(model) -> tuple[Any, int]:
    """Replace ``Gather(Shape(x), const)`` by a constant where the gathered dims of ``x`` are static."""
    from onnx import helper, numpy_helper, shape_inference

    m = shape_inference.infer_shapes(model)
    g = m.graph
    dims: dict[str, list[int]] = {}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            dims[v.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    shape_of: dict[str, tuple[str, int, int | None]] = {}  # Shape output -> (input, start, end)
    for n in g.node:
        if n.op_type == "Shape":
            att = {a.name: a.i for a in n.attribute}
            shape_of[n.output[0]] = (n.input[0], att.get("start", 0), att.get("end"))
    nodes, folded = [], 0
    for n in g.node:
        d = None
        if n.op_type == "Gather" and n.input and n.input[0] in shape_of:
            src, start, end = shape_of[n.input[0]]
            d = dims.get(src)
            d = d[start:end] if d is not None else None
        if d is not None and n.input[1] in consts:
            sel = np.take(np.asarray(d, np.int64), consts[n.input[1]])
            if np.all(sel >= 0):
                nodes.append(helper.make_node("Constant", [], [n.output[0]], name=f"{n.name}__static",
                                              value=numpy_helper.from_array(sel.astype(np.int64))))
                folded += 1
                continue
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return m, folded


def fold_static_shapes(src: str | Path, dst: str | Path, max_passes: int = 8) -> Path:
    """Fold run-time shape arithmetic on static dimensions into constants (the batch stays dynamic).

    Alternates :func:`_fold_shape_reads` with ONNX Runtime's basic (hardware-independent) graph
    optimisation, whose constant folding collapses what the folded reads fed (e.g. pad amounts),
    until nothing changes. The float graph computes exactly what it computed before."""
    import tempfile

    import onnx
    import onnxruntime as ort

    model = onnx.load(str(src))
    for _ in range(max_passes):
        model, folded = _fold_shape_reads(model)
        if not folded:
            break
        with tempfile.TemporaryDirectory(prefix="edgetl-fold-") as tmp:
            raw, opt = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save(model, str(raw))
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            so.optimized_model_filepath = str(opt)
            so.log_severity_level = 3
            ort.InferenceSession(str(raw), so, providers=["CPUExecutionProvider"])
            model = onnx.load(str(opt))
    from .calibration.qdq import prune_dead_nodes

    onnx.save(prune_dead_nodes(model), str(dst))
    return Path(dst)


def check_parity(reference_logits: np.ndarray, onnx_path: str | Path, inputs: np.ndarray,
                 atol: float = 1e-3, rtol: float = 1e-3) -> Parity:
    """Run ``onnx_path`` on ``inputs`` with ONNX Runtime and compare with ``reference_logits``.

    Raises :class:`ExportParityError` when the difference exceeds ``atol + rtol * max|logit|``
    or a top-1 prediction differs where the reference's top-2 margin is larger than that.
    """
    runner = open_runner("onnxruntime", onnx_path)
    got = runner.infer_many(inputs)
    ref = np.asarray(reference_logits, np.float32)
    diff = np.abs(got - ref)
    tol = float(atol + rtol * np.abs(ref).max()) if ref.size else atol
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    margin = top2[:, 1] - top2[:, 0]
    same = np.argmax(got, 1) == np.argmax(ref, 1)
    real_flips = int(np.sum(~same & (margin > tol)))
    parity = Parity(n=int(len(ref)), max_abs_diff=float(diff.max()) if diff.size else 0.0,
                    mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
                    top1_agreement=float(same.mean()) if len(same) else 1.0, tolerance=tol,
                    passed=bool(diff.size == 0 or (diff.max() <= tol and real_flips == 0)))
    if not parity.passed:
        raise ExportParityError(
            f"{onnx_path}: the ONNX export does not match PyTorch on {parity.n} held-out images "
            f"(max |diff| {parity.max_abs_diff:.3g} > tolerance {tol:.3g}, top-1 agreement {parity.top1_agreement:.4f})",
            hint="an operator exports differently from how it runs in PyTorch: check custom layers, or try another "
                 "opset; report it with the run's backbone name")
    return parity
