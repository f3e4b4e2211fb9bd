"""Atomic outputs (kept for the modules that import them from here): see :mod:`edgetl.artifact`,
the one owner of run and artifact folders (locks, hidden temp folders, recovery, --overwrite)."""

from __future__ import annotations

from .artifact import check_output_dir, new_folder as atomic_output_dir

__all__ = ["atomic_output_dir", "check_output_dir"]
