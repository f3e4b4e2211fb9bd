"""FP32 ONNX export of a detector, with a parity check against PyTorch.

The graph is the detection conventions' raw outputs (``edgetl/detect/__init__.py``): input ``input``
``(1, 3, H, W)`` float32 with a STATIC batch of 1 (the anchors are fixed for one input size anyway,
and static shapes are what TensorRT/DLA and the quantizers want), outputs ``boxes`` ``(1, A, 4)`` and
``scores`` ``(1, A, C + 1)``; no decoding or NMS inside (that is ``runtime/detect.py``, torch-free).

Exported as the classifier is (``edgetl/export.py``): the TorchScript exporter (``dynamo=False``),
opset 17, constant folding, then :func:`edgetl.export.fold_static_shapes`, which folds timm's
run-time TF-"SAME" pad arithmetic (Lite0) into constants so a quantizer never sees shape math as
activations, and ONNX Runtime's basic optimisation (no ``Identity``/``Constant`` nodes left). The graph is plain Conv / Clip (ReLU6) / Add / Reshape / Transpose / Concat (plus
HardSwish for MobileNetV3): :data:`QUANTIZABLE_OPS` lists what ONNX Runtime's QDQ quantizer handles;
the result says which ops the graph has and any outside that list.

Parity: ONNX Runtime (through ``open_runner``, as everything else runs it) must reproduce PyTorch's
two outputs on the given preprocessed inputs (real images from the caller) within
``atol + rtol * max|output|``; otherwise :class:`edgetl.export.ExportParityError`. The defaults are
the classifier export's (1e-3, 1e-3): on real held-out images (the compile passes them) a Lite0
detector's float32 outputs differ by ~4e-4 between ONNX Runtime's fused kernels and PyTorch (sums in
another order), which a tighter 1e-4 refused; a wrongly exported operator differs by orders more.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..export import ExportParityError, fold_static_shapes
from ..runtime.preprocess import PreprocessSpec
from ..runtime.runners import open_runner

INPUT_NAME = "input"
OUTPUT_NAMES = ("boxes", "scores")
OPSET = 17
# What ONNX Runtime's quantizer (QDQ) handles or passes through as data movement; an op outside this
# is reported (``unexpected_ops``): it may stay float or need a look before quantizing.
QUANTIZABLE_OPS = frozenset({"Conv", "Clip", "Relu", "Add", "Mul", "Reshape", "Transpose", "Concat", "HardSwish",
                             "HardSigmoid", "GlobalAveragePool", "Pad", "Flatten", "Identity", "Constant", "Squeeze",
                             "Unsqueeze"})


def _torch_outputs(model, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's (boxes, scores) for a preprocessed batch, one image at a time (the export's batch 1)."""
    import torch

    boxes, scores = [], []
    with torch.no_grad():
        for x in inputs:
            b, s = model(torch.from_numpy(np.ascontiguousarray(x[None], dtype=np.float32)))
            boxes.append(b.numpy())
            scores.append(s.numpy())
    return np.concatenate(boxes), np.concatenate(scores)


def _optimize_basic(path: Path) -> None:
    """ONNX Runtime's basic (hardware-independent) graph optimisation, in place: removes the
    ``Identity`` nodes the exporter uses for de-duplicated initializers (equal zero biases of new
    layers) and folds ``Constant`` nodes into initializers. Without it ORT's quantizer finds biases
    that are not initializers and leaves them unquantized (its "Expected bias ... to be an
    initializer" warnings). :func:`fold_static_shapes` only runs this when it folded something."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from ..calibration.qdq import prune_dead_nodes

    with tempfile.TemporaryDirectory(prefix="edgetl-detopt-") as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        onnx.save(prune_dead_nodes(onnx.load(so.optimized_model_filepath)), str(path))


def _graph_facts(path: Path) -> dict[str, Any]:
    """Input/output names and static shapes, op counts, and ops outside :data:`QUANTIZABLE_OPS`."""
    import onnx

    m = onnx.load(str(path))
    onnx.checker.check_model(m)

    def shape(v) -> list[int]:
        return [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]

    ops = Counter(n.op_type for n in m.graph.node)
    return {"input": {"name": m.graph.input[0].name, "shape": shape(m.graph.input[0])},
            "outputs": {o.name: shape(o) for o in m.graph.output},
            "ops": dict(sorted(ops.items())),
            "unexpected_ops": sorted(set(ops) - QUANTIZABLE_OPS)}


def export_detector(model, spec: PreprocessSpec, path: str | Path, opset: int = OPSET,
                    inputs: np.ndarray | None = None, atol: float = 1e-3, rtol: float = 1e-3) -> dict[str, Any]:
    """Export ``model`` (a :class:`edgetl.detect.model.Detector`) to ``path`` and check it.

    ``inputs``: a few preprocessed images ``(N, 3, H, W)`` float32 made with ``spec`` (pass real
    ones: parity on real pixels is what matters); None = 4 standard-normal tensors, said so in
    the result. Returns ``{"path", "opset", "input", "outputs", "num_anchors", "ops",
    "unexpected_ops", "parity": {"n", "inputs", "boxes_max_abs_diff", "scores_max_abs_diff",
    "tolerance", "passed"}}``; raises ExportParityError when ONNX Runtime disagrees."""
    import torch

    path = Path(path)
    if tuple(spec.input_size) != tuple(model.input_size) or spec.layout != "NCHW" or spec.dtype != "float32":
        raise ValueError(f"spec {spec.input_size} {spec.layout} {spec.dtype} does not fit the model "
                         f"(input {model.input_size}, NCHW float32)")
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).to("cpu")
    was_training = model.training
    model.eval()
    try:
        example = torch.zeros(spec.tensor_shape(1), dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice: dynamo=False is deliberate
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=None, opset_version=opset, do_constant_folding=True, dynamo=False)
        fold_static_shapes(path, path)
        _optimize_basic(path)
        facts = _graph_facts(path)
        given = inputs is not None
        if inputs is None:
            inputs = np.random.default_rng(0).standard_normal((4, *spec.tensor_shape(1)[1:])).astype(np.float32)
        ref = _torch_outputs(model, inputs)
    finally:
        model.train(was_training)
    got = open_runner("onnxruntime", path).infer_many_all(np.ascontiguousarray(inputs, dtype=np.float32))
    diffs = [float(np.abs(g - r).max()) if r.size else 0.0 for g, r in zip(got, ref)]
    tol = float(atol + rtol * max(float(np.abs(r).max()) for r in ref))
    parity = {"n": int(len(inputs)), "inputs": "given" if given else "random normal", "boxes_max_abs_diff": diffs[0],
              "scores_max_abs_diff": diffs[1], "tolerance": tol, "passed": bool(max(diffs) <= tol)}
    a = int(model.anchors.shape[0])
    want = {"boxes": [1, a, 4], "scores": [1, a, model.num_classes + 1]}
    if facts["outputs"] != want or facts["input"] != {"name": INPUT_NAME, "shape": list(spec.tensor_shape(1))}:
        raise ExportParityError(f"{path}: the exported graph's inputs/outputs {facts['input']} {facts['outputs']} are "
                                f"not the detection conventions' {want}")
    if not parity["passed"]:
        raise ExportParityError(
            f"{path}: the ONNX export does not match PyTorch on {parity['n']} inputs (max |diff| boxes "
            f"{diffs[0]:.3g}, scores {diffs[1]:.3g} > tolerance {tol:.3g})",
            hint="an operator exports differently from how it runs in PyTorch: report it with the backbone's name")
    return {"path": str(path), "opset": opset, **facts, "num_anchors": a, "parity": parity}


__all__ = ["INPUT_NAME", "OPSET", "OUTPUT_NAMES", "QUANTIZABLE_OPS", "export_detector"]
