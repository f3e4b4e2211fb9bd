"""ONNX Runtime runner (FP32 or QDQ INT8 ONNX) configured from the target's options.

Options (``[onnxruntime]`` in a target profile): ``providers`` (list, default CPU),
``intra_op_threads`` (0 = ORT's default), ``inter_op_threads``, ``graph_optimization_level``
(``disable|basic|extended|all``, default ``all``), ``execution_mode`` (``sequential|parallel``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping

import numpy as np

from ..errors import EdgetlError, MissingDependencyError
from .base import Runner, choice_option, int_option

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


class OrtRunner(Runner):
    backend = "onnxruntime"
    OPTIONS = {"providers": "a list of execution providers, best first, e.g. [\"CPUExecutionProvider\"]",
               "intra_op_threads": "a whole number, 0 = ONNX Runtime's default",
               "inter_op_threads": "a whole number, 0 = ONNX Runtime's default",
               "graph_optimization_level": "disable, basic, extended or all",
               "execution_mode": "sequential or parallel"}

    def __init__(self, model_path: Path, options: dict[str, Any], blobs: Mapping[str, bytes] | None = None):
        super().__init__(model_path, options, blobs)
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime", None, "the ONNX Runtime backend") from None
        so = ort.SessionOptions()
        level = choice_option(self.backend, options, "graph_optimization_level", "all", list(_LEVELS))
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
        so.intra_op_num_threads = int_option(self.backend, options, "intra_op_threads", 0)
        so.inter_op_num_threads = int_option(self.backend, options, "inter_op_threads", 0)
        mode = choice_option(self.backend, options, "execution_mode", "sequential", ("sequential", "parallel"))
        if mode == "parallel":
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        so.log_severity_level = 3
        available = ort.get_available_providers()
        wanted = options.get("providers", ["CPUExecutionProvider"])
        wanted = [wanted] if isinstance(wanted, str) else wanted
        if not isinstance(wanted, (list, tuple)) or not all(isinstance(p, str) for p in wanted):
            raise EdgetlError(f"onnxruntime option providers = {wanted!r} is not a list of provider names",
                              hint='e.g. providers=["CPUExecutionProvider"]')
        wanted = list(wanted)
        providers = [p for p in wanted if p in available]
        if not providers:
            raise EdgetlError(f"none of the ONNX Runtime providers {wanted} is available here ({available})",
                              hint="install the onnxruntime build for this device (e.g. onnxruntime-gpu), "
                                   "or list CPUExecutionProvider in the target's onnxruntime.providers")
        try:
            model_bytes = self.read(self.model_path)
            self.session = ort.InferenceSession(model_bytes, sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own exception types
            raise EdgetlError(f"{model_path}: ONNX Runtime cannot load this model ({exc})") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self._version = ort.__version__
        self._providers = self.session.get_providers()
        # QDQ graphs store their op types as plain strings in the protobuf: enough to tell int8 from float
        # without the onnx package (not installed on devices).
        self._precision = "int8 (QDQ)" if b"DequantizeLinear" in model_bytes else "fp32"

    def infer_all(self, batch: np.ndarray) -> List[np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: batch})
        return [np.asarray(o, dtype=np.float32) for o in outs]

    @property
    def fixed_batch(self) -> int | None:
        return self._batch

    @property
    def uses_cpu(self) -> bool:
        return self._providers[0] == "CPUExecutionProvider"

    @property
    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "version": self._version, "device": self._providers[0],
                "precision": self._precision, "options": self.options}
