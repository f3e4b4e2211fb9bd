"""Backend runners: load a built model and run a preprocessed batch -> logits.

One module per backend, registered by name in ``RUNNERS`` (imported lazily, so a device needs
only the backend it uses). The accuracy gate, the benchmarks and the camera runtime all run
models through these classes: the gate measures exactly what the device will run.

Adding a backend = one module here with a :class:`Runner` subclass + one line in ``RUNNERS``
(+ its host-side builder in ``edgetl/backends/``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Mapping

from ..errors import EdgetlError
from .base import Runner

# backend name -> ("module", "Class", pip extra that installs the backend package or None)
RUNNERS: dict[str, tuple[str, str, str | None]] = {
    "onnxruntime": ("edgetl.runtime.runners.onnxruntime", "OrtRunner", None),
    "openvino": ("edgetl.runtime.runners.openvino", "OpenVINORunner", "openvino"),
    "tensorrt": ("edgetl.runtime.runners.tensorrt", "TensorRTRunner", "tensorrt"),
}


def runner_class(backend: str) -> type[Runner]:
    if backend not in RUNNERS:
        raise EdgetlError(f"unknown backend {backend!r}", hint=f"known backends: {', '.join(RUNNERS)}")
    module, cls, _extra = RUNNERS[backend]
    return getattr(importlib.import_module(module), cls)


def open_runner(backend: str, model_path: str | Path, options: Mapping[str, Any] | None = None,
                blobs: Mapping[str, bytes] | None = None) -> Runner:
    """Load ``model_path`` with ``backend`` configured by ``options`` (the target's backend options).

    ``blobs``: verified bytes by path (the model and its companion files) to load from instead of
    opening the files again."""
    return runner_class(backend)(Path(model_path), dict(options or {}), blobs)


__all__ = ["RUNNERS", "Runner", "open_runner", "runner_class"]
