"""Labelled image data for training and evaluation: discovery, validation, splits, datasets.

Inputs
* an image folder, one sub-folder per class (``DATA/<class>/*.png``, nested folders allowed);
* a CSV with columns ``path,label`` (paths relative to the CSV; an optional ``split`` column with
  train/val/test fixes the split);
* split folders: ``DATA/train``, ``DATA/val``, ``DATA/test`` (each one class sub-folder per class),
  or ``--val DIR`` / ``--test DIR`` beside DATA.
Splits that are not given are carved out of the training pool, stratified per class, with a seed.

Every file is decoded once up front with the one decoder (``read_image``): unreadable, truncated
or empty files are skipped and listed (path + reason) in the data report, and the content hashes
of the usable files give the data fingerprint. This module does not import torch: ``ImageDataset``
is a plain map-style dataset (``__len__`` / ``__getitem__`` returning numpy arrays), which
``torch.utils.data.DataLoader`` accepts as is.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .augment import AugmentConfig, augment
from .runtime.errors import EdgetlError, ImageDecodeError
from .runtime.imageio import IMAGE_SUFFIXES, is_image_file, read_image
from .runtime.preprocess import PreprocessSpec, preprocess

SPLITS = ("train", "val", "test")
_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
MIN_PER_CLASS = 2


@dataclass(frozen=True)
class Item:
    """One labelled image: ``path`` absolute; ``rel`` as recorded (relative to the data root, or
    absolute when outside it); ``split`` fixed by the layout/CSV, or None (to be split)."""

    path: Path
    rel: str
    label: str
    split: str | None = None


@dataclass
class LabelledData:
    """The validated data of a run: class names, the three splits and the data report."""

    root: Path
    labels: tuple[str, ...]
    splits: dict[str, list[Item]]
    report: dict[str, Any]
    fingerprint: str
    split_seed: int

    def indexed(self, split: str) -> list[tuple[Path, int]]:
        index = {lab: i for i, lab in enumerate(self.labels)}
        return [(it.path, index[it.label]) for it in self.splits[split]]

    def counts(self, split: str) -> dict[str, int]:
        c = {lab: 0 for lab in self.labels}
        for it in self.splits[split]:
            c[it.label] += 1
        return c

    def split_json(self) -> dict[str, Any]:
        """The ``split.json`` of the run folder (format in ``edgetl/runs.py``)."""
        return {"root": str(self.root), "seed": self.split_seed, "labels": list(self.labels),
                "splits": {s: [{"path": it.rel, "label": it.label} for it in self.splits[s]] for s in SPLITS}}


@dataclass
class Discovered:
    root: Path
    layout: str  # "folder" | "split-folders" | "csv"
    items: list[Item]
    ignored: list[dict[str, str]] = field(default_factory=list)  # not images / not in a class folder
    missing: list[dict[str, str]] = field(default_factory=list)  # CSV rows whose file does not exist
    classes: set[str] = field(default_factory=set)  # classes of the training pool, even if empty
    links: list[dict[str, str]] = field(default_factory=list)  # dangling links, link loops, links to folders


# ------------------------------------------------------------------------------------------
# discovery
# ------------------------------------------------------------------------------------------

def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def shown(name: str) -> str:
    """A path as text for reports and messages: a name that is not valid UTF-8 (kept by Python as
    surrogate escapes) is written with backslash escapes (``caf\\xe9.png``), so printing it or a
    strict JSON reader never fails on it. Names that are valid UTF-8 are unchanged."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _class_folders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and _visible(d))


LINK_KINDS = {"dangling": "dangling symlink (its target does not exist)",
              "loop": "symlink loop (the link resolves to itself)",
              "folder": "symlink to a folder (not followed: it could loop or count images twice)",
              "unreadable": "symlink whose target cannot be read"}


def link_problem(path: Path) -> str | None:
    """For a path that is not a regular file: 'dangling', 'loop', 'folder' (a symlink to a folder, not
    followed), 'unreadable' (another error following the link), or None (not a symlink)."""
    try:
        if not path.is_symlink():
            return None
        st = path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "loop"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return "dangling"
        return "unreadable"
    except RuntimeError:  # pathlib on some versions: "Symlink loop from ..."
        return "loop"
    return "folder" if stat.S_ISDIR(st.st_mode) else None


def _link_entry(path: Path, root: Path, kind: str) -> dict[str, str]:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return {"path": shown(_rel(path, root)), "kind": kind, "target": shown(target), "reason": LINK_KINDS[kind]}


def _text_name(path: Path, what: str) -> str:
    """``path.name`` as text; a class name becomes a label in JSON/ONNX metadata, so it must be valid UTF-8."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise EdgetlError(f"{os.fsencode(path)!r}: the {what} name is not valid UTF-8 (it becomes a label)",
                          hint="rename the folder to a UTF-8 name (e.g. with `convmv -f latin1 -t utf8`)") from None
    return path.name


def scan_class_folder(folder: Path, root: Path, split: str | None = None) -> Discovered:
    """``folder/<class>/**/<image>`` -> items; other files are listed as ignored. Symlinks to files
    are followed; dangling links, link loops and links to folders (not followed) are listed in
    ``links`` (the data report's ``links`` section), never skipped silently."""
    items: list[Item] = []
    ignored: list[dict[str, str]] = []
    links: list[dict[str, str]] = []
    classes: set[str] = set()
    for f in sorted(p for p in folder.iterdir() if _visible(p)):
        if f.is_file():
            ignored.append({"path": shown(_rel(f, root)), "reason": "not inside a class sub-folder"})
        elif not f.is_dir():
            kind = link_problem(f)
            if kind is not None:
                links.append(_link_entry(f, root, kind))
    for cdir in _class_folders(folder):
        classes.add(_text_name(cdir, "class folder"))
        for f in sorted(cdir.rglob("*")):
            if any(part.startswith(".") for part in f.relative_to(cdir).parts):
                continue
            if not f.is_file():
                kind = link_problem(f)
                if kind is not None:
                    links.append(_link_entry(f, root, kind))
                continue
            if is_image_file(f):
                items.append(Item(f.resolve(), _rel(f.resolve(), root), cdir.name, split))
            else:
                ignored.append({"path": shown(_rel(f, root)),
                                "reason": f"not an image file suffix ({', '.join(IMAGE_SUFFIXES)})"})
    return Discovered(root, "folder", items, ignored, classes=classes if split in (None, "train") else set(),
                      links=links)


def split_layout(folder: Path) -> dict[str, Path] | None:
    """``{"train": DATA/train, "val": ..., "test": ...}`` when DATA is laid out by split."""
    subs = {d.name.lower(): d for d in _class_folders(folder)}
    if "train" not in subs or not set(subs) <= set(_SPLIT_DIRS):
        return None
    if not _class_folders(subs["train"]):
        return None
    return {_SPLIT_DIRS[name]: d for name, d in subs.items()}


def open_csv(csv_path: Path) -> tuple[Path, csv.DictReader]:
    """``(the folder its relative paths start from, a reader of its rows)``; one error if unreadable."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgetlError(f"{csv_path}: cannot read ({exc})") from None
    return csv_path.parent.resolve(), csv.DictReader(text.splitlines())


def read_csv_items(csv_path: Path) -> Discovered:
    """A CSV of ``path,label[,split]`` rows, paths relative to the CSV's folder."""
    root, reader = open_csv(csv_path)
    cols = [c.strip().lower() for c in (reader.fieldnames or [])]
    for need in ("path", "label"):
        if need not in cols:
            raise EdgetlError(f"{csv_path}: no column {need!r} (columns: {', '.join(cols) or 'none'})",
                              hint="the first line must be a header with at least: path,label")
    items, missing, links = [], [], []
    classes: set[str] = set()
    for lineno, row in enumerate(reader, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if not row.get("path") and not row.get("label"):
            continue
        if not row.get("path") or not row.get("label"):
            raise EdgetlError(f"{csv_path}, line {lineno}: empty path or label", hint="every row needs path,label")
        split = row.get("split") or None
        if split is not None:
            if split.lower() not in _SPLIT_DIRS:
                raise EdgetlError(f"{csv_path}, line {lineno}: split {split!r} is not train/val/test")
            split = _SPLIT_DIRS[split.lower()]
        p = Path(row["path"])
        p = p if p.is_absolute() else root / p
        if split in (None, "train"):
            classes.add(row["label"])
        if not p.is_file():
            kind = link_problem(p)
            why = LINK_KINDS[kind] if kind else "missing file"
            missing.append({"path": row["path"], "label": row["label"], "reason": f"{why} (CSV line {lineno})"})
            if kind is not None:
                links.append(_link_entry(p, root, kind))
            continue
        p = p.resolve()
        items.append(Item(p, _rel(p, root), row["label"], split))
    return Discovered(root, "csv", items, [], missing, classes, links)


def discover(data: str | Path, val: str | Path | None = None, test: str | Path | None = None) -> Discovered:
    """Find the labelled images of DATA (folder, split folders or CSV) plus optional val/test folders."""
    data = Path(data)
    if not data.exists():
        raise EdgetlError(f"{data}: no such folder or CSV file",
                          hint="pass a folder with one sub-folder per class, or a CSV with path,label columns")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise EdgetlError(f"{data}: not a folder or a .csv file",
                              hint="pass a folder with one sub-folder per class, or a CSV with path,label columns")
        found = read_csv_items(data)
    else:
        root = data.resolve()
        layout = split_layout(root)
        if layout:
            found = Discovered(root, "split-folders", [])
            for split, folder in layout.items():
                part = scan_class_folder(folder, root, split)
                found.items += part.items
                found.ignored += part.ignored
                found.links += part.links
                found.classes |= part.classes
        else:
            found = scan_class_folder(root, root)
    for split, extra in (("val", val), ("test", test)):
        if extra is None:
            continue
        extra = Path(extra)
        if not extra.is_dir():
            raise EdgetlError(f"--{split} {extra}: no such folder", hint="pass a folder with one sub-folder per class")
        if any(it.split == split for it in found.items):
            raise EdgetlError(f"--{split} {extra}: DATA already has a {split} split",
                              hint=f"drop --{split}, or pass a DATA without its own {split} part")
        part = scan_class_folder(extra.resolve(), found.root, split)
        found.items += part.items
        found.ignored += part.ignored
        found.links += part.links
    return found


# ------------------------------------------------------------------------------------------
# validation (decode every file once) and the fingerprint
# ------------------------------------------------------------------------------------------

def _check_one(item: Item) -> tuple[Item, str | None, str | None, tuple[int, int] | None]:
    """(item, content sha256, error reason, (h, w))."""
    try:
        digest = hashlib.sha256(item.path.read_bytes()).hexdigest()
        img = read_image(item.path)
    except ImageDecodeError as exc:
        return item, None, exc.message.replace(f"{item.path}: ", ""), None
    except OSError as exc:
        return item, None, f"cannot read file ({exc.strerror or exc})", None
    except Exception as exc:  # a decoder crash on a hostile file must not stop the run
        return item, None, f"{type(exc).__name__}: {exc}", None
    return item, digest, None, img.shape[:2]


def validate_items(items: Sequence[Item], workers: int | None = None
                   ) -> tuple[list[Item], list[dict[str, str]], dict[str, str], list[tuple[int, int]]]:
    """Decode every file once: (usable items, skipped [{path, reason}], {rel: sha256}, sizes)."""
    workers = workers or min(4, os.cpu_count() or 1)
    good, skipped, hashes, sizes = [], [], {}, []
    with ThreadPoolExecutor(max_workers=workers) as pool:  # OpenCV decodes without the GIL
        for item, digest, reason, hw in pool.map(_check_one, items):
            if reason is not None:
                skipped.append({"path": shown(item.rel), "label": item.label, "reason": shown(reason)})
            else:
                good.append(item)
                hashes[item.rel] = digest
                sizes.append(hw)
    return good, skipped, hashes, sizes


def fingerprint(items: Iterable[Item], hashes: dict[str, str]) -> str:
    """sha256 over the sorted (relative path, label, content sha256) of the usable files.

    Names are hashed as their bytes on disk (``os.fsencode``: UTF-8, and a name that is not valid
    UTF-8 keeps its raw bytes through ``surrogateescape``), so any file the decoder reads can be
    fingerprinted, and UTF-8 names hash exactly as before."""
    h = hashlib.sha256()
    for rel, label in sorted((it.rel, it.label) for it in items):
        h.update(f"{rel}\t{label}\t{hashes[rel]}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _check_classes(where: Path, items: Sequence[Item], skipped: Sequence[dict[str, str]], labels: Sequence[str]) -> None:
    if len(labels) < 2:
        raise EdgetlError(f"{where}: found {len(labels)} class(es) ({', '.join(labels) or 'none'}); "
                          "training needs at least 2",
                          hint="put each class's images in its own sub-folder: DATA/<class>/<image> "
                               "(or pass a CSV with path,label columns)")
    counts = {lab: 0 for lab in labels}
    for it in items:
        counts[it.label] += 1
    for lab, n in counts.items():
        if n < MIN_PER_CLASS:
            bad = [s for s in skipped if s["label"] == lab]
            detail = "; ".join(f"{s['path']}: {s['reason']}" for s in bad[:3])
            raise EdgetlError(f"{where}: class {lab!r} has {n} usable image(s); each class needs at least "
                              f"{MIN_PER_CLASS}" + (f" (skipped: {detail}{' …' if len(bad) > 3 else ''})" if bad else ""),
                              hint=f"add images to class {lab!r}, or remove the class")


# ------------------------------------------------------------------------------------------
# stratified split
# ------------------------------------------------------------------------------------------

def _split_sizes(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """How many of a class's n images go to each carved split: at least 1 train, then at least
    1 val, then at least 1 test, as long as n allows."""
    sizes = {s: int(round(n * f)) for s, f in fractions.items()}
    for s in ("val", "test"):
        if s in sizes and sizes[s] == 0 and n - sum(sizes.values()) >= 2:
            sizes[s] = 1
    while sum(sizes.values()) > n - 1:  # keep one for training
        s = max(sizes, key=lambda k: sizes[k])
        sizes[s] -= 1
    return sizes


def stratified_split(items: Sequence[Item], fractions: dict[str, float], seed: int) -> dict[str, list[Item]]:
    """Carve the ``fractions`` (e.g. {"val": .15, "test": .15}) out of ``items`` per class; the rest is train."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[Item]] = {s: [] for s in SPLITS}
    by_label: dict[str, list[Item]] = {}
    for it in items:
        by_label.setdefault(it.label, []).append(it)
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda it: it.rel)
        order = rng.permutation(len(group))
        sizes = _split_sizes(len(group), fractions)
        start = 0
        for s in ("test", "val"):
            k = sizes.get(s, 0)
            out[s] += [group[i] for i in order[start:start + k]]
            start += k
        out["train"] += [group[i] for i in order[start:]]
    for s in SPLITS:
        out[s].sort(key=lambda it: (it.label, it.rel))
    return out


def load_data(data: str | Path, *, val: str | Path | None = None, test: str | Path | None = None,
              val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> LabelledData:
    """Discover, validate and split DATA. Raises EdgetlError for < 2 classes or a class with
    fewer than 2 usable images."""
    for key, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise EdgetlError(f"{key} = {f} is not a fraction in [0, 1)")
    if val_fraction + test_fraction >= 0.9:
        raise EdgetlError(f"val_fraction + test_fraction = {val_fraction + test_fraction:.2f} leaves too little to train on",
                          hint="keep their sum below 0.9")
    found = discover(data, val, test)
    good, skipped, hashes, sizes = validate_items(found.items)
    skipped = found.missing + skipped
    pool = [it for it in good if it.split in (None, "train")]
    labels = tuple(sorted(found.classes))
    _check_classes(Path(data), pool, skipped, labels)
    for it in good:
        if it.label not in labels:
            raise EdgetlError(f"{it.path}: class {it.label!r} of the {it.split} split has no training images",
                              hint=f"the training classes are: {', '.join(labels)}")
    fixed = {s: [it for it in good if it.split == s] for s in ("val", "test")}
    fractions = {s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if not fixed[s] and f > 0}
    splits = stratified_split(pool, fractions, seed)
    for s in ("val", "test"):
        if fixed[s]:
            splits[s] = sorted(fixed[s], key=lambda it: (it.label, it.rel))
    if not splits["val"]:
        raise EdgetlError(f"{data}: the validation split is empty",
                          hint="raise --val-fraction, add images, or pass --val DIR")
    fp = fingerprint(good, hashes)
    ds = LabelledData(found.root, labels, splits, {}, fp, seed)
    ds.report = {
        "data": str(data), "root": str(found.root), "layout": found.layout, "classes": list(labels),
        "usable": len(good), "skipped_count": len(skipped),
        "counts": {s: ds.counts(s) for s in SPLITS},
        "split": {"seed": seed, "val": "given" if fixed["val"] else val_fraction,
                  "test": "given" if fixed["test"] else test_fraction},
        "image_size": ({"min_hw": [int(min(h for h, _ in sizes)), int(min(w for _, w in sizes))],
                        "max_hw": [int(max(h for h, _ in sizes)), int(max(w for _, w in sizes))]} if sizes else {}),
        "fingerprint": fp,
        "skipped": skipped,
        "ignored": found.ignored,
        "links": links_report(found.links),
    }
    return ds


def links_report(links: Sequence[dict[str, str]]) -> dict[str, Any]:
    """The data report's ``links`` section: how many dangling links, link loops and links to folders
    (not followed) DATA holds, and each one (path, kind, target, reason)."""
    counts = {kind: sum(1 for e in links if e["kind"] == kind) for kind in LINK_KINDS}
    return {"count": len(links), **counts, "list": list(links)}


def load_eval_items(data: str | Path, labels: Sequence[str]) -> tuple[list[tuple[Path, int]], dict[str, Any]]:
    """All labelled images of DATA (a class folder or CSV; for split folders, its ``test`` part),
    validated, as (path, label index in ``labels``) plus a data report."""
    found = discover(data)
    if found.layout == "split-folders":
        found.items = [it for it in found.items if it.split == "test"]
        if not found.items:
            raise EdgetlError(f"{data}: laid out as train/val/test but has no test images",
                              hint="pass the folder to evaluate on, e.g. DATA/val")
    good, skipped, hashes, _ = validate_items(found.items)
    skipped = found.missing + skipped
    unknown = sorted({it.label for it in good} - set(labels))
    if unknown:
        raise EdgetlError(f"{data}: class(es) {', '.join(map(repr, unknown))} are not labels of the run",
                          hint=f"the run knows: {', '.join(labels)}")
    if not good:
        raise EdgetlError(f"{data}: no usable labelled images", hint="pass a folder with one sub-folder per class")
    index = {lab: i for i, lab in enumerate(labels)}
    good.sort(key=lambda it: (it.label, it.rel))
    report = {"data": str(data), "usable": len(good), "skipped": skipped, "ignored": found.ignored,
              "links": links_report(found.links), "fingerprint": fingerprint(good, hashes)}
    return [(it.path, index[it.label]) for it in good], report


# ------------------------------------------------------------------------------------------
# the dataset every torch loop iterates
# ------------------------------------------------------------------------------------------

class ImageDataset:
    """``(path, label)`` pairs -> ``(preprocess(augment?(read_image(path))), label)``.

    With ``augment=None`` this is exactly the runtime path (``read_image`` + ``preprocess``).
    Augmentation randomness is keyed by (seed, epoch, index): set ``.epoch`` before each epoch.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], spec: PreprocessSpec,
                 augment: AugmentConfig | None = None, seed: int = 0):
        self.samples = list(samples)
        self.spec = spec
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int) -> np.ndarray:
        """The decoded (and, when training, augmented) BGR uint8 image of sample ``i``."""
        img = read_image(self.samples[i][0])
        if self.augment is not None:
            img = augment(img, self.augment, np.random.default_rng([self.seed, self.epoch, i]))
        return img

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return preprocess(self.image(i), self.spec), self.samples[i][1]
