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
