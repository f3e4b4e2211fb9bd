"""The runner interface every backend implements."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..errors import EdgetlError


# ---- backend options: every runner names the options it knows; a wrong one is a one-line error ----

def _option_hint(key: str, example: Any) -> str:
    return f"e.g. {key}={example} (on the command line: --option {key}={example})"


def int_option(backend: str, options: Mapping[str, Any], key: str, default: Optional[int], minimum: int = 0,
               example: Any = 2) -> Optional[int]:
    """``options[key]`` as a whole number >= ``minimum`` (a string of digits is accepted), or ``default``."""
    if options.get(key) is None:
        return default
    value = options[key]
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise EdgetlError(f"{backend} option {key} = {value!r} is not a whole number", hint=_option_hint(key, example))
    if value < minimum:
        raise EdgetlError(f"{backend} option {key} = {value} is below {minimum}", hint=_option_hint(key, example))
    return value


def choice_option(backend: str, options: Mapping[str, Any], key: str, default: str, choices: Sequence[str],
                  upper: bool = False) -> str:
    """``options[key]`` as one of ``choices`` (case-folded to upper when ``upper``)."""
    value = options.get(key, default)
    text = str(value).upper() if upper and isinstance(value, str) else value
    if text not in choices:
        raise EdgetlError(f"{backend} option {key} = {value!r} is not valid",
                          hint=f"use one of {', '.join(map(str, choices))}")
    return text


def bool_option(backend: str, options: Mapping[str, Any], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise EdgetlError(f"{backend} option {key} = {value!r} is not true/false", hint=_option_hint(key, "true"))
    return value


def check_option_names(backend: str, options: Mapping[str, Any], known: Mapping[str, str]) -> Dict[str, Any]:
    """Refuse an option this backend does not know (a typo would otherwise be ignored silently)."""
    if not isinstance(options, Mapping):
        raise EdgetlError(f"{backend} options must be a mapping of name -> value, not {type(options).__name__}")
    unknown = sorted(str(k) for k in options if k not in known)
    if unknown:
        listed = "; ".join(f"{k} ({what})" for k, what in known.items())
        raise EdgetlError(f"{backend} has no option {unknown[0]!r}"
                          + (f" (nor {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else ""),
                          hint=f"the {backend} options are: {listed}")
    return dict(options)


class Runner(abc.ABC):
    """A loaded model on one backend.

    ``infer_all(batch)`` takes a preprocessed batch (the manifest's input layout/dtype, leading batch
    axis) and returns every model output, float32, in the model's output order (a detector has two:
    box regressions and class scores). ``infer(batch)`` is the first output: a classifier's logits
    ``(N, num_classes)``. ``info`` says what actually runs:
    ``{"backend", "version", "device", "precision", "options"}``; ``precision`` is the precision
    the backend really executes in (e.g. OpenVINO's resolved inference precision), never the
    requested one.
    """

    backend: str = ""
    # the options this backend knows: name -> what it takes (an unknown name is refused, listing these)
    OPTIONS: Mapping[str, str] = {}

    def __init__(self, model_path: Path, options: dict[str, Any], blobs: Optional[Mapping[str, bytes]] = None):
        options = self.check_options(options)
        self.blobs = dict(blobs or {})  # verified bytes by path: what is loaded is what was hashed
        if str(model_path) not in self.blobs and not Path(model_path).exists():
            raise EdgetlError(f"{model_path}: model file not found",
                              hint="the artifact is incomplete, or the build for this backend was not run "
                                   "(run `edgetl build ARTIFACT` on this device)")
        self.model_path = Path(model_path)
        self.options = options

    def read(self, path: Path) -> bytes:
        """The bytes of ``path``: the verified copy handed to the runner when there is one (see
        ``edgetl.runtime.model.load``), else the file."""
        blob = self.blobs.get(str(path))
        return blob if blob is not None else Path(path).read_bytes()

    @classmethod
    def check_options(cls, options: Mapping[str, Any] | None) -> Dict[str, Any]:
        """The options as a dict, refusing names this backend does not know (before anything loads)."""
        options = {} if options is None else options
        if not cls.OPTIONS:
            return dict(options)
        return check_option_names(cls.backend, options, cls.OPTIONS)

    @abc.abstractmethod
    def infer_all(self, batch: np.ndarray) -> List[np.ndarray]: ...

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The first output (a classifier's logits)."""
        return self.infer_all(batch)[0]

    @property
    @abc.abstractmethod
    def info(self) -> dict[str, Any]: ...

    def infer_many(self, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Run a large array in chunks (keeps memory bounded); returns the stacked first output."""
        return self.infer_many_all(inputs, batch_size)[0]

    def infer_many_all(self, inputs: np.ndarray, batch_size: int = 32) -> List[np.ndarray]:
        """Every output of a large array run in chunks, each stacked along the batch axis."""
        if self.fixed_batch is not None:
            batch_size = self.fixed_batch
        outs: List[List[np.ndarray]] = []
        for i in range(0, len(inputs), batch_size):
            chunk = inputs[i:i + batch_size]
            n = len(chunk)
            if self.fixed_batch is not None and n < self.fixed_batch:  # pad a static-batch model
                pad = np.repeat(chunk[-1:], self.fixed_batch - n, axis=0)
                outs.append([o[:n] for o in self.infer_all(np.concatenate([chunk, pad]))])
            else:
                outs.append(self.infer_all(chunk))
        if not outs:
            return [np.zeros((0, 0), np.float32)]
        return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]

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
