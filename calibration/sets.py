"""Calibration sets: which images calibrate the quantizer, chosen reproducibly and recorded.

A calibration set is drawn from the run's TRAIN split (never val/test), stratified by class, or
from a folder the user names (``--calib-dir``). Images are decoded with the one decoder
(``read_image``) and go through the one deploy preprocessing (``preprocess``), no augmentation.
Its file list is written as ``calibration.txt`` in the artifact and its sha256 goes into
``manifest.quantization.calibration_sha256``. Too few images is an error, never a silent fallback
to random or placeholder data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..runtime.errors import EdgetlError, ImageDecodeError
from ..runtime.imageio import is_image_file, read_image
from ..runtime.preprocess import PreprocessSpec, preprocess

DEFAULT_SIZE = 300
DEFAULT_MIN = 64
LISTING_NAME = "calibration.txt"


class CalibrationError(EdgetlError):
    """The calibration set cannot be built as asked (too few images, overlap with held-out data)."""


@dataclass(frozen=True)
class CalibrationSet:
    """The chosen images (absolute paths), their class index when known, and where they came from."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]  # -1 where unknown (a --calib-dir folder)
    source: str  # "train-split" or "dir:<folder>"
    root: Path | None = None  # paths are listed relative to this when below it

    def __len__(self) -> int:
        return len(self.paths)

    def listing(self) -> str:
        """The text of ``calibration.txt``: one path per line (relative to ``root`` when possible)."""
        lines = []
        for p in self.paths:
            try:
                lines.append(p.relative_to(self.root).as_posix() if self.root else p.as_posix())
            except ValueError:
                lines.append(p.as_posix())
        return "\n".join(lines) + "\n"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.listing().encode("utf-8")).hexdigest()

    def class_counts(self) -> dict[int, int]:
        vals, counts = np.unique(np.asarray(self.labels, dtype=np.int64), return_counts=True)
        return {int(v): int(c) for v, c in zip(vals, counts)}

    def load(self, spec: PreprocessSpec) -> np.ndarray:
        """Decode + preprocess every image (undecodable files are an error naming them)."""
        return load_images(self.paths, spec)


def load_images(paths: Sequence[Path], spec: PreprocessSpec) -> np.ndarray:
    """``read_image`` + ``preprocess`` each file, stacked. Undecodable files are one error naming them."""
    out, bad = [], []
    for p in paths:
        try:
            out.append(preprocess(read_image(p), spec))
        except ImageDecodeError as exc:
            bad.append(exc.message)
    if bad:
        raise CalibrationError(f"{len(bad)} image(s) cannot be decoded: {'; '.join(bad[:3])}",
                               hint="remove or replace those files (the run's split.json or --calib-dir lists them)")
    if not out:
        raise CalibrationError("no images to load")
    return np.stack(out)


def _too_few(n: int, wanted: int, min_images: int, where: str, exact: bool) -> CalibrationError | None:
    if exact and n < wanted:
        return CalibrationError(f"{where} has {n} usable images, but --calib-size {wanted} was asked for exactly",
                                hint=f"ask for at most {n} (--calib-size {n}), or add images")
    if n < min_images:
        return CalibrationError(
            f"{where} has only {n} images; at least {min_images} are needed to calibrate INT8 ranges",
            hint="add training images (or pass --calib-dir DIR with more images of the deployment scene); "
                 f"--calib-min {n} accepts this few at your own risk")
    return None


def select_stratified(samples: Sequence[tuple[Path, int]], size: int = DEFAULT_SIZE, seed: int = 0,
                      min_images: int = DEFAULT_MIN, exact: bool = False, root: Path | None = None,
                      where: str = "the run's train split") -> CalibrationSet:
    """Pick ``size`` of ``(path, label)`` samples, classes in proportion (each class at least once).

    Deterministic for a given ``seed``; the result is sorted by (label, path).
    """
    if size < 1:
        raise CalibrationError(f"--calib-size {size} is not valid", hint="give a positive number of images")
    n = len(samples)
    err = _too_few(n, size, min_images, where, exact)
    if err:
        raise err
    by_class: dict[int, list[Path]] = {}
    for path, label in samples:
        by_class.setdefault(int(label), []).append(Path(path))
    rng = np.random.default_rng(seed)
    if n <= size:
        chosen = {c: sorted(ps) for c, ps in by_class.items()}
    else:
        classes = sorted(by_class)
        avail = np.array([len(by_class[c]) for c in classes])
        ideal = size * avail / n
        quota = np.minimum(avail, np.maximum(1, np.floor(ideal).astype(int)))
        while quota.sum() < size:  # hand out the rest to the classes furthest below their share
            short = np.where(quota < avail, ideal - quota, -np.inf)
            quota[int(np.argmax(short))] += 1
        while quota.sum() > size:  # "at least one per class" overshot: trim the largest
            quota[int(np.argmax(quota))] -= 1
        chosen = {}
        for c, q in zip(classes, quota):
            ps = sorted(by_class[c])
            idx = rng.choice(len(ps), size=int(q), replace=False)
            chosen[c] = sorted(ps[i] for i in idx)
    paths, labels = [], []
    for c in sorted(chosen):
        paths += chosen[c]
        labels += [c] * len(chosen[c])
    return CalibrationSet(tuple(paths), tuple(labels), "train-split", root)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_image_file(p))


def from_folder(folder: str | Path, size: int = DEFAULT_SIZE, seed: int = 0, min_images: int = DEFAULT_MIN,
                exact: bool = False) -> CalibrationSet:
    """``size`` images from a folder (recursively; sub-folders count as classes for stratification)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"--calib-dir {folder}: no such folder", hint="pass a folder of images")
    files = list_images(folder)
    subdirs = sorted({p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1})
    index = {d: i for i, d in enumerate(subdirs)}
    samples = [(p, index.get(p.relative_to(folder).parts[0], -1) if len(p.relative_to(folder).parts) > 1 else -1)
               for p in files]
    cal = select_stratified(samples, size, seed, min_images, exact, root=folder, where=f"--calib-dir {folder}")
    return CalibrationSet(cal.paths, cal.labels, f"dir:{folder}", folder)


def assert_disjoint(cal: CalibrationSet, held_out: Iterable[Path], what: str = "test") -> None:
    """Refuse a calibration set that shares images with held-out data (it would bias the gate).

    Compared by path and by content (sha256), so copies of test images under another name count."""
    from ..runtime.manifest import sha256_file

    held = [Path(p) for p in held_out]
    held_paths = {p.resolve() for p in held}
    overlap = [p for p in cal.paths if p.resolve() in held_paths]
    if not overlap and held:
        held_sums = {sha256_file(p) for p in held if p.is_file()}
        overlap = [p for p in cal.paths if p.is_file() and sha256_file(p) in held_sums]
    if overlap:
        raise CalibrationError(
            f"{len(overlap)} calibration image(s) are in the run's {what} split, e.g. {overlap[0]}",
            hint=f"calibrate on training data only: drop --calib-dir, or remove the {what} images from it")
