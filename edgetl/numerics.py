"""Two numerics for one QDQ graph: what the quantization computes, and what the target's build computes.

* **reference**: the QDQ graph run by ONNX Runtime with every graph optimisation off, so each
  QuantizeLinear / DequantizeLinear executes as its own op and every Conv/Gemm in float: the exact
  arithmetic the graph specifies, independent of the CPU's integer kernels (up to the order of
  float additions). It is what the quantization itself does, and the only honest stand-in for a
  backend this machine cannot run (TensorRT).
* **deployed**: the target's own build on this CPU, with the profile's real options: ONNX Runtime
  with its graph optimisations (Q/DQ fused into integer kernels), or the OpenVINO IR converted
  exactly as ``edgetl build`` converts it (folded preprocessing included) and compiled with the
  profile's inference precision and threads. Its INT8 kernels depend on the CPU (``runtime.cpu``).

:func:`judge_for` picks the numerics that decide a target in the compile's repair loop: deployed
for the CPU backends (every fallback round is gated through the build that will ship), reference
for TensorRT (its kernels are not on this machine; the host's would only mislead).
"""

from __future__ import annotations

import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .runtime.errors import EdgetlError

REFERENCE = "reference"
REFERENCE_OPTIONS: dict[str, Any] = {"providers": ["CPUExecutionProvider"], "graph_optimization_level": "disable"}
REFERENCE_NOTE = ("reference numerics: Q/DQ executed as separate float ops (ONNX Runtime, graph optimisations off): "
                  "what the quantization computes, the same on every CPU")


@dataclass(frozen=True)
class Numerics:
    """How a candidate QDQ graph is run to judge it."""

    kind: str  # "reference" | "deployed"
    backend: str  # the runner that executes it: onnxruntime | openvino
    options: Mapping[str, Any] = field(default_factory=dict)
    build_input: Mapping[str, Any] | None = None  # the model's own input (folded OpenVINO: uint8 NHWC)

    @property
    def label(self) -> str:
        if self.kind == REFERENCE:
            return "reference (Q/DQ as float ops)"
        extra = ", folded uint8 input" if self.build_input else ""
        prec = self.options.get("inference_precision")
        prec = f", {prec}" if prec and self.backend == "openvino" else ""
        return f"deployed ({self.backend}{prec}{extra})"

    def to_dict(self) -> dict[str, Any]:
        from .runtime.cpu import host_cpu

        return {"kind": self.kind, "backend": self.backend, "label": self.label,
                "options": {k: v for k, v in self.options.items() if k != "providers"},
                "cpu": host_cpu().to_dict() if self.kind != REFERENCE else None}

    def open(self, model: Path, spec, work: Path | None = None):
        """A runner for ``model`` (a QDQ or float ONNX) in these numerics; OpenVINO converts it first
        (into ``work``, or a temp folder removed with the runner)."""
        from .runtime.runners import open_runner

        if self.backend != "openvino":
            return open_runner(self.backend, model, dict(self.options))
        from .backends.openvino import convert_ir

        tmp = None
        if work is None:
            tmp = tempfile.TemporaryDirectory(prefix="edgetl-ov-")
            work = Path(tmp.name)
        xml = convert_ir(model, Path(work) / f"{Path(model).stem}.xml", self.options, spec)
        runner = open_runner("openvino", xml, dict(self.options))
        if tmp is not None:
            runner._edgetl_tmp = tmp  # removed when the runner is garbage-collected
        return runner

    def model_inputs(self, inputs: np.ndarray, spec) -> np.ndarray:
        """The checkset's stored float tensors in the form this build takes (kept for the next round:
        :func:`_converted`)."""
        from .runtime.preprocess import build_input_spec

        return _converted(inputs, spec, build_input_spec(spec, self.build_input))

    def logits(self, model: Path, inputs: np.ndarray, spec, work: Path | None = None) -> np.ndarray:
        runner = self.open(model, spec, work)
        try:
            return runner.infer_many(self.model_inputs(inputs, spec))
        finally:
            runner.close()


_CONVERSIONS: "OrderedDict[int, tuple[np.ndarray, Any, Any, np.ndarray]]" = OrderedDict()


def _converted(inputs: np.ndarray, spec, target) -> np.ndarray:
    """``to_model_input`` of the same arrays again and again: every fallback round gates the checkset
    and its perturbed copies (the same arrays) through the build's uint8 input, and the checked
    float -> uint8 conversion took a fifth of an OpenVINO compile of the demo (py-spy, 2-core AVX2
    EPYC). The last few conversions are kept, keyed by the identity of the array they were made
    from (held here, so that identity cannot be reused while the entry lives)."""
    from .runtime.preprocess import to_model_input

    if target == spec:
        return inputs
    hit = _CONVERSIONS.get(id(inputs))
    if hit is not None and hit[0] is inputs and hit[1] == spec and hit[2] == target:
        _CONVERSIONS.move_to_end(id(inputs))
        return hit[3]
    out = to_model_input(inputs, spec, target)
    _CONVERSIONS[id(inputs)] = (inputs, spec, target, out)
    while len(_CONVERSIONS) > 6:  # the checkset and its perturbations (5 at most today)
        _CONVERSIONS.popitem(last=False)
    return out


def reference() -> Numerics:
    return Numerics(REFERENCE, "onnxruntime", dict(REFERENCE_OPTIONS))


def deployed(backend: str, options: Mapping[str, Any]) -> Numerics:
    """The build of ``backend`` with the profile's ``options``, as it runs on this machine."""
    if backend == "tensorrt":
        raise EdgetlError("TensorRT's numerics cannot be run on this machine",
                          hint="its repair and pre-build gate use the reference numerics")
    opts = dict(options)
    build_input = None
    if backend == "openvino":
        from .backends.openvino import build_input as ov_input

        build_input = ov_input(opts)
    return Numerics("deployed", backend, opts, build_input)


def judge_for(backend: str, options: Mapping[str, Any] | None = None) -> Numerics:
    """The numerics that decide an artifact for ``backend``: its own build, except TensorRT (reference)."""
    if backend == "tensorrt":
        return reference()
    return deployed(backend, options or {})


def host_kernels() -> Numerics:
    """ONNX Runtime on this CPU with its fused integer kernels (its default options, spelled as a CPU
    profile's ``[onnxruntime]`` section spells them): reported beside the reference for a TensorRT
    target, never deciding it; the sensitivity ranking of an OpenVINO target."""
    return Numerics("deployed", "onnxruntime", {"providers": ["CPUExecutionProvider"], "intra_op_threads": 0,
                                                "graph_optimization_level": "all"})


__all__ = ["Numerics", "REFERENCE", "REFERENCE_NOTE", "REFERENCE_OPTIONS", "deployed", "host_kernels", "judge_for",
           "reference"]
