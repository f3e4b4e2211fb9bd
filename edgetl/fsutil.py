"""Atomic outputs: a run or artifact is built in a hidden temp folder and renamed when complete.

An interrupted or failed command never leaves a folder that looks finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .runtime.errors import EdgetlError


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse to clobber an existing output folder unless asked to."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise EdgetlError(f"{out} already exists", hint="choose another --out, or pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise EdgetlError(f"{out} exists and is not a folder", hint="choose another --out")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; on success rename it to ``out``, on error delete it."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
