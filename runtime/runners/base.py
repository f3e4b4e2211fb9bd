"""The runner interface every backend implements."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EdgetlError


class Runner(abc.ABC):
    """A loaded model on one backend.

    ``infer(batch)`` takes a preprocessed batch (the manifest's input layout/dtype, leading batch
    axis) and returns float32 logits ``(N, num_classes)``. ``info`` says what actually runs:
    ``{"backend", "version", "device", "precision", "options"}``; ``precision`` is the precision
    the backend really executes in (e.g. OpenVINO's resolved inference precision), never the
    requested one.
    """

    backend: str = ""

    def __init__(self, model_path: Path, options: dict[str, Any]):
        if not Path(model_path).exists():
            raise EdgetlError(f"{model_path}: model file not found",
                              hint="the artifact is incomplete, or the build for this backend was not run "
                                   "(run `edgetl build ARTIFACT` on this device)")
        self.model_path = Path(model_path)
        self.options = options

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    @property
    @abc.abstractmethod
    def info(self) -> dict[str, Any]: ...

    def infer_many(self, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Run a large array in chunks (keeps memory bounded); returns stacked logits."""
        if self.fixed_batch is not None:
            batch_size = self.fixed_batch
        outs = []
        for i in range(0, len(inputs), batch_size):
            chunk = inputs[i:i + batch_size]
            n = len(chunk)
            if self.fixed_batch is not None and n < self.fixed_batch:  # pad a static-batch model
                pad = np.repeat(chunk[-1:], self.fixed_batch - n, axis=0)
                outs.append(self.infer(np.concatenate([chunk, pad]))[:n])
            else:
                outs.append(self.infer(chunk))
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)

    @property
    def fixed_batch(self) -> int | None:
        """The model's static batch size, or None when the batch axis is dynamic."""
        return None

    @property
    def uses_cpu(self) -> bool:
        """Whether inference runs on the host's CPU cores (then the runtime keeps decoding off them)."""
        return True

    def close(self) -> None:  # pragma: no cover - default: nothing to release
        pass
