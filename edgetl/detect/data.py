"""Labelled detection data: COCO / YOLO / Pascal VOC readers, validation, tiling, group-aware split.

Inputs (``read_detection(path, fmt="auto")``; ``fmt`` forces one of ``coco``, ``yolo``, ``voc``):

* **COCO**: a ``.json`` file of COCO instances (``images``, ``annotations``, ``categories``), or a
  folder holding one. ``bbox`` is ``[x, y, w, h]``. Category ids may be sparse: they map to 0-based
  class indices in sorted-id order, names kept. ``file_name`` is resolved against the JSON's folder,
  then an ``images/`` folder beside it. ``iscrowd=1`` annotations (a region of many objects, not one
  object) are dropped and counted.
* **YOLO**: a folder with ``images/`` and ``labels/`` (mirrored relative paths, one ``.txt`` per
  image, lines ``class cx cy w h`` normalised to the image size). Class names from ``classes.txt``,
  ``obj.names``, ``labels/classes.txt`` or ``data.yaml`` (``names:`` list or dict; read with PyYAML
  when installed, else by a small hand parser). An image without a label file is a negative (the
  YOLO convention). Ultralytics split layouts (``images/train``, ``labels/train``, ...) are read as
  one pool: the split they give is *not* applied (``split_detection`` re-splits by group, so tiles and
  regions never leak), but it is recorded in the report as ``split_hint`` ``{relative path: split}``.
* **Pascal VOC**: ``.xml`` annotations in the folder (or ``Annotations/``); the image is
  ``<filename>`` beside the XML or in ``JPEGImages/``, else the XML's stem with any image suffix.
  VOC's ``<bndbox>`` is 1-based and inclusive (a box over pixel columns 1..10 is ``xmin=1,
  xmax=10``); edgetl's boxes are continuous 0-based (``detect/__init__.py``), so ``x1 = xmin - 1``,
  ``y1 = ymin - 1``, ``x2 = xmax``, ``y2 = ymax``. ``<difficult>1`` boxes are kept as normal boxes
  and counted. Class names: the lines of ``classes.txt`` / ``labels.txt`` in the folder when there
  is one (other names are unknown: dropped, counted), else every name found, sorted. XML with a
  ``<!DOCTYPE`` or ``<!ENTITY`` is refused (entity expansion, "billion laughs"; no defusedxml here).

Validation (the ``report``, JSON-able, like classification's ``data_report.json``): every image is
hashed and decoded once with the one decoder (``runtime.imageio.read_image``; the pixels are dropped
at once), giving its true size. Missing or unreadable images are skipped and listed with the
annotation that named them; byte-identical images (same sha256) keep the first by path; boxes
outside the image are clipped (counted), boxes entirely outside or of zero/negative/non-finite area
are dropped (counted), boxes under 2 px after clipping are kept and counted, unknown classes are
dropped (counted, names listed), images without boxes are kept as negatives. Every list is capped at
:data:`LIST_CAP` entries with its full ``count``. A dataset that cannot be used (no annotations, an
unknown format, malformed JSON/XML, a YOLO line that is not 5 numbers, no box at all) raises
:class:`EdgetlError` naming the file (and line) and how to fix it.

Hold-out without leakage: every image carries a ``group`` (its relative path, or a region of it when
tiled); :func:`split_detection` keeps each group whole, so overlapping tiles of one region never land
on both sides of a split. This module imports neither torch nor anything outside numpy, OpenCV and
the standard library (PyYAML only when it is installed).
"""

from __future__ import annotations

import hashlib
import json
import os
import math
import re
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from xml.parsers import expat

import numpy as np

from ..data import shown
from ..runtime.errors import EdgetlError, ImageDecodeError
from ..runtime.imageio import IMAGE_SUFFIXES, is_image_file, read_image
from ..runtime.manifest import atomic_write

FORMATS = ("coco", "yolo", "voc")
SPLITS = ("train", "val", "test")
LIST_CAP = 20  # entries kept per report list (the full count is always there)
MIN_BOX_PX = 2.0  # a box narrower or lower than this after clipping is counted as small (kept)
SPLIT_JSON_FORMAT = "edgetl-detection-split"
_SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_LAYOUT_HINT = ("pass a COCO instances .json (or its folder), a YOLO folder with images/ and labels/ "
                "(plus classes.txt or data.yaml), or a Pascal VOC folder of .xml annotations")


# ------------------------------------------------------------------------------------------
# the data model
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class DetImage:
    """One image as the model sees it: a whole file, or a window (tile) of one.

    ``eq=False``: the box arrays make field-wise ``==`` ambiguous, so images compare (and hash) by
    identity; compare ``path``/``window``/``boxes`` explicitly."""

    path: Path  # absolute path of the source image file
    width: int  # of the image as the model sees it (the window's size for a tile)
    height: int
    boxes: np.ndarray  # (N, 4) float32 xyxy in this image's (tile's) pixels, continuous coordinates
    classes: np.ndarray  # (N,) int64, 0-based index into class_names
    window: tuple | None = None  # (x0, y0, x1, y1) in the source image for a tile, else None
    group: str = ""  # images of one group always go to the same split (a source image, or a region of it)


@dataclass
class DetDataset:
    """Validated detection data: the images (or tiles), class names and the validation report."""

    root: Path  # folder the paths of split.json are relative to
    images: list[DetImage]
    class_names: tuple[str, ...]
    format: str  # "coco" | "yolo" | "voc"
    report: dict  # the validation report, JSON-able


@dataclass
class _Raw:
    """An image as an annotation file names it, before the image is checked."""

    path: Path  # the image file (absolute)
    rel: str  # as recorded: relative to the data root (posix), or absolute when outside it
    source: str  # the annotation that names it (file, entry), for the report
    boxes: np.ndarray  # (N, 4) float64: xyxy pixels, or cx cy w h normalised when ``normalized``
    classes: np.ndarray  # (N,) int64
    normalized: bool = False
    declared: tuple[int, int] | None = None  # (w, h) the annotation states


class _Issues:
    """Problems found while reading, by kind: the full count and the first LIST_CAP entries of each."""

    KINDS = ("missing_images", "duplicates", "unknown_classes", "clipped", "outside", "degenerate",
             "small_boxes", "negatives", "size_mismatch", "crowd", "difficult", "no_label_file")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {k: 0 for k in self.KINDS}
        self.first: dict[str, list] = {k: [] for k in self.KINDS}
        self.unknown_names: set[str] = set()

    def add(self, kind: str, entry: dict) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        kept = self.first.setdefault(kind, [])
        if len(kept) < LIST_CAP:
            kept.append(entry)

    def section(self, kind: str) -> dict[str, Any]:
        n = self.counts.get(kind, 0)
        return {"count": n, "list": list(self.first.get(kind, [])), "more": max(0, n - LIST_CAP)}


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _visible(path: Path, base: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(base).parts)


def _box_list(b) -> list[float]:
    return [round(float(v), 2) for v in b]


# ------------------------------------------------------------------------------------------
# COCO
# ------------------------------------------------------------------------------------------

def _load_json(path: Path) -> Any:
    """Parse a JSON file, or raise an EdgetlError naming the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgetlError(f"{path}: cannot read ({exc})", hint="check the file's permissions and encoding (UTF-8)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EdgetlError(f"{path}, line {exc.lineno}, column {exc.colno}: malformed JSON ({exc.msg})",
                          hint=f"fix the file there (`python -m json.tool {path.name}` shows the spot)") from None


def _is_coco(data: Any) -> bool:
    return isinstance(data, dict) and all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories"))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _coco_categories(data: dict, path: Path) -> tuple[dict[int, int], tuple[str, ...]]:
    """Category id -> 0-based index (sorted-id order), and the names in that order."""
    names: dict[int, str] = {}
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise EdgetlError(f"{path}: categories[{k}] needs an integer 'id' and a string 'name' (got {str(cat)[:80]})",
                              hint="each category is {\"id\": 1, \"name\": \"cat\"}")
        if cat["id"] in names:
            raise EdgetlError(f"{path}: category id {cat['id']} appears twice", hint="give each category its own id")
        names[cat["id"]] = cat["name"].strip()
    if not names:
        raise EdgetlError(f"{path}: no categories", hint="a COCO instances file lists its classes under 'categories'")
    ordered = [names[i] for i in sorted(names)]
    dup = sorted({n for n in ordered if ordered.count(n) > 1})
    if dup:
        raise EdgetlError(f"{path}: category name(s) {', '.join(map(repr, dup))} appear under several ids",
                          hint="merge them into one category (one id per class name)")
    return {cid: i for i, cid in enumerate(sorted(names))}, tuple(ordered)


def _coco_images(data: dict, path: Path) -> dict[Any, _Raw]:
    """COCO image id -> its record (no boxes yet); file_name against the JSON's folder, then images/."""
    folder = path.parent.resolve()
    out: dict[Any, _Raw] = {}
    for k, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise EdgetlError(f"{path}: images[{k}] needs an 'id' and a string 'file_name' (got {str(im)[:80]})",
                              hint="each image is {\"id\": 1, \"file_name\": \"a.jpg\", \"width\": W, \"height\": H}")
        if im["id"] in out:
            raise EdgetlError(f"{path}: image id {im['id']!r} appears twice", hint="give each image its own id")
        name = Path(im["file_name"])
        candidates = [name] if name.is_absolute() else [folder / name, folder / "images" / name]
        found = next((c for c in candidates if c.is_file()), candidates[0])
        declared = (im["width"], im["height"]) if _is_int(im.get("width")) and _is_int(im.get("height")) else None
        out[im["id"]] = _Raw(found, _rel(found, folder), f"{path.name}, image id {im['id']}", [], [], False, declared)
    return out


def _coco_bbox(ann: Any, where: str) -> list[float]:
    bbox = ann.get("bbox") if isinstance(ann, dict) else None
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                              for v in bbox):
        raise EdgetlError(f"{where}: 'bbox' is {str(bbox)[:60]}, not 4 numbers [x, y, width, height]",
                          hint="fix or remove that annotation")
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def _read_coco(path: Path, issues: _Issues, data: Any = None) -> tuple[Path, list[_Raw], tuple[str, ...]]:
    """COCO instances JSON -> records (boxes xyxy in pixels) and class names."""
    data = _load_json(path) if data is None else data
    if not _is_coco(data):
        raise EdgetlError(f"{path}: not a COCO instances file (needs the lists 'images', 'annotations', 'categories')",
                          hint=_LAYOUT_HINT)
    index, names = _coco_categories(data, path)
    images = _coco_images(data, path)
    per_image: dict[Any, tuple[list, list]] = {i: ([], []) for i in images}
    for k, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{k}]" + (f" (id {ann.get('id')})" if isinstance(ann, dict) else "")
        box = _coco_bbox(ann, where)
        source = f"{path.name}, annotation id {ann.get('id', k)}"
        if ann.get("image_id") not in images:
            issues.add("missing_images", {"path": None, "annotation": source,
                                          "reason": f"image_id {ann.get('image_id')!r} is not in 'images'"})
            continue
        if ann.get("iscrowd"):
            issues.add("crowd", {"path": shown(images[ann["image_id"]].rel), "annotation": source})
            continue
        cat = ann.get("category_id")
        if cat not in index:
            issues.add("unknown_classes", {"path": shown(images[ann["image_id"]].rel), "annotation": source,
                                           "class": cat})
            issues.unknown_names.add(str(cat))
            continue
        per_image[ann["image_id"]][0].append(box)
        per_image[ann["image_id"]][1].append(index[cat])
    raws = []
    for image_id, raw in images.items():
        boxes, classes = per_image[image_id]
        raw.boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        raw.classes = np.asarray(classes, dtype=np.int64)
        raws.append(raw)
    return path.parent.resolve(), raws, names


def _coco_file(folder: Path) -> tuple[Path, Any] | None:
    """The one COCO instances JSON at the top of ``folder`` (and its parsed content), None when there is
    none; a malformed JSON is only an error when nothing else in the folder could be the data."""
    found, errors = [], []
    for p in sorted(folder.glob("*.json")):
        if p.name.startswith(".") or not p.is_file():
            continue
        try:
            data = _load_json(p)
        except EdgetlError as exc:
            errors.append(exc)
            continue
        if _is_coco(data):
            found.append((p, data))
    if len(found) > 1:
        raise EdgetlError(f"{folder}: several COCO files ({', '.join(p.name for p, _ in found)})",
                          hint="pass the one to read: edgetl reads one COCO instances file at a time")
    if not found and errors and not _voc_files(folder) and not (folder / "labels").is_dir():
        raise errors[0]
    return found[0] if found else None


# ------------------------------------------------------------------------------------------
# YOLO
# ------------------------------------------------------------------------------------------

def _strip_yaml(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _names_by_hand(text: str) -> Any:
    """The ``names:`` of a small YAML file without PyYAML: a flow list ``[a, b]``, a flow dict
    ``{0: a}``, or a block of ``- a`` / ``0: a`` lines. None when there is no top-level ``names:``."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^names\s*:(.*)$", line)
        if not m:
            continue
        rest = re.sub(r"\s+#.*$", "", m.group(1)).strip()
        if rest.startswith(("[", "{")):
            closing = "]" if rest[0] == "[" else "}"
            j = i
            while closing not in rest and j + 1 < len(lines):
                j += 1
                rest += " " + lines[j].strip()
            items = [s for s in rest.strip()[1:].rstrip(closing).split(",") if s.strip()]
            if rest[0] == "[":
                return [_strip_yaml(s) for s in items]
            return {_strip_yaml(k): _strip_yaml(v) for k, _, v in (s.partition(":") for s in items)}
        block: list[str] = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and not nxt[:1].isspace() and not nxt.startswith("-"):
                break
            if nxt.strip() and not nxt.strip().startswith("#"):
                block.append(re.sub(r"\s+#.*$", "", nxt).strip())
        if block and all(b.startswith("-") for b in block):
            return [_strip_yaml(b[1:]) for b in block]
        return {_strip_yaml(k): _strip_yaml(v) for k, _, v in (b.partition(":") for b in block)}
    return None


def _yaml_names(path: Path, use_pyyaml: bool = True) -> tuple[str, ...]:
    """Class names from a ``data.yaml`` (``names:`` list, or dict of 0..N-1)."""
    text = path.read_text(encoding="utf-8-sig")
    try:
        import yaml  # only when installed: not a dependency of edgetl
    except ImportError:
        yaml = None
    if yaml is not None and use_pyyaml:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise EdgetlError(f"{path}: malformed YAML ({str(exc).splitlines()[0]})", hint="fix the file") from None
        names = data.get("names") if isinstance(data, dict) else None
    else:
        names = _names_by_hand(text)
    if isinstance(names, dict):
        try:
            keyed = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            keyed = {}
        if sorted(keyed) != list(range(len(names))):
            raise EdgetlError(f"{path}: 'names' keys must be the class ids 0..{len(names) - 1}",
                              hint="write names: as a list, or a dict {0: name0, 1: name1, ...}")
        names = [keyed[i] for i in range(len(keyed))]
    if not isinstance(names, list) or not names:
        raise EdgetlError(f"{path}: no 'names:' list of class names", hint="add e.g.  names: [cat, dog]")
    return tuple(str(n).strip() for n in names)


def _yolo_names(folder: Path) -> tuple[str, ...]:
    """Class names of a YOLO folder: classes.txt, obj.names, labels/classes.txt, or data.yaml."""
    for p in (folder / "classes.txt", folder / "obj.names", folder / "labels" / "classes.txt"):
        if p.is_file():
            names = tuple(s.strip() for s in p.read_text(encoding="utf-8-sig").splitlines() if s.strip())
            if not names:
                raise EdgetlError(f"{p}: no class names", hint="one class name a line, in class-id order")
            return names
    for p in (folder / "data.yaml", folder / "data.yml", folder / "dataset.yaml"):
        if p.is_file():
            return _yaml_names(p)
    raise EdgetlError(f"{folder}: a YOLO folder without class names",
                      hint="add classes.txt (one name a line, in class-id order) or a data.yaml with names: [...]")


def _yolo_line(parts: list[str], path: Path, lineno: int) -> tuple[int, list[float]]:
    line = " ".join(parts)[:80]
    if len(parts) != 5:
        polygon = len(parts) > 5 and len(parts) % 2 == 1
        raise EdgetlError(f"{path}, line {lineno}: {len(parts)} values ({line!r}); a YOLO box line is 5 numbers: "
                          "class cx cy w h", hint="this looks like a segmentation polygon: export boxes instead"
                          if polygon else "write one box a line: class-id and the box centre and size, normalised")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise EdgetlError(f"{path}, line {lineno}: {line!r} is not 5 numbers (class cx cy w h)",
                          hint="fix the line: an integer class id and four numbers in 0..1") from None
    if not values[0].is_integer():
        raise EdgetlError(f"{path}, line {lineno}: class id {parts[0]!r} is not an integer",
                          hint="the first value of a line is the 0-based class id")
    return int(values[0]), values[1:]


def _yolo_label(path: Path, names: Sequence[str], rel: str, issues: _Issues) -> tuple[np.ndarray, np.ndarray]:
    """One label file -> (N, 4) normalised cx cy w h and class ids (unknown ids dropped, counted)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgetlError(f"{path}: cannot read ({exc})", hint="check the file's permissions and encoding") from None
    boxes, classes = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        cls, box = _yolo_line(parts, path, lineno)
        if not 0 <= cls < len(names):
            issues.add("unknown_classes", {"path": shown(rel), "annotation": f"{path.name}, line {lineno}", "class": cls})
            issues.unknown_names.add(str(cls))
            continue
        boxes.append(box)
        classes.append(cls)
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(classes, dtype=np.int64)


def _read_yolo(folder: Path, issues: _Issues) -> tuple[Path, list[_Raw], tuple[str, ...], dict[str, str]]:
    """A YOLO folder -> records (normalised boxes), class names, and the split its layout gives."""
    folder = folder.resolve()
    names = _yolo_names(folder)
    images_dir, labels_dir = folder / "images", folder / "labels"
    raws, hint, used = [], {}, set()
    for p in sorted(images_dir.rglob("*")):
        if not (p.is_file() and is_image_file(p) and _visible(p, images_dir)):
            continue
        inner = p.relative_to(images_dir)
        rel = _rel(p, folder)
        label = (labels_dir / inner).with_suffix(".txt")
        if label.is_file():
            boxes, classes = _yolo_label(label, names, rel, issues)
            used.add(label)
        else:
            issues.add("no_label_file", {"path": shown(rel)})
            boxes, classes = np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
        raws.append(_Raw(p, rel, _rel(label, folder), boxes, classes, normalized=True))
        if len(inner.parts) > 1 and inner.parts[0].lower() in _SPLIT_NAMES:
            hint[rel] = _SPLIT_NAMES[inner.parts[0].lower()]
    for label in sorted(labels_dir.rglob("*.txt")):
        if label not in used and label.name != "classes.txt" and _visible(label, labels_dir):
            issues.add("missing_images", {"path": None, "annotation": shown(_rel(label, folder)),
                                          "reason": "no image of this name under images/"})
    return folder, raws, names, hint


# ------------------------------------------------------------------------------------------
# Pascal VOC
# ------------------------------------------------------------------------------------------

class _Refused(Exception):
    pass


def _refuse(*_args) -> None:
    raise _Refused()


def safe_xml(path: Path) -> ET.Element:
    """Parse an XML file that has no DOCTYPE or ENTITY declaration (refused with an EdgetlError: entity
    expansion can exhaust memory). A byte check gives the clear message; an expat pass with handlers
    that refuse declarations catches the same in any encoding (UTF-16 ...) before ElementTree parses."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise EdgetlError(f"{path}: cannot read ({exc.strerror or exc})", hint="check the file's permissions") from None
    refused = EdgetlError(f"{path}: an XML DOCTYPE or ENTITY declaration is refused (entity expansion can exhaust "
                          "memory: 'billion laughs')", hint="remove the <!DOCTYPE ...> and <!ENTITY ...> declarations: "
                          "Pascal VOC annotations need neither")
    low = data.lower()
    if b"<!doctype" in low or b"<!entity" in low:
        raise refused
    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = _refuse
    parser.EntityDeclHandler = _refuse
    parser.ExternalEntityRefHandler = _refuse
    try:
        parser.Parse(data, True)
        return ET.fromstring(data)
    except _Refused:
        raise refused from None
    except (expat.ExpatError, ET.ParseError) as exc:
        line = getattr(exc, "lineno", None) or getattr(exc, "position", (None,))[0]
        raise EdgetlError(f"{path}" + (f", line {line}" if line else "") + f": malformed XML ({exc})",
                          hint="fix the file (an XML validator, e.g. `xmllint --noout FILE`, shows where)") from None


def _voc_files(folder: Path) -> list[Path]:
    base = folder / "Annotations" if (folder / "Annotations").is_dir() else folder
    return sorted(p for p in base.rglob("*.xml") if p.is_file() and _visible(p, base))


def _voc_image(xml: Path, filename: str, root: Path) -> Path:
    """The image a VOC file names: beside it, in JPEGImages/, else its stem with any image suffix."""
    dirs = [xml.parent, root / "JPEGImages", xml.parent.parent / "JPEGImages"]
    if filename:
        for d in dirs:
            if (d / filename).is_file():
                return (d / filename).resolve()
    for d in dirs:
        for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES):
            if (d / (xml.stem + suffix)).is_file():
                return (d / (xml.stem + suffix)).resolve()
    return (xml.parent / (filename or xml.stem)).resolve()


def _voc_objects(tree: ET.Element, xml: Path, rel: str, issues: _Issues) -> tuple[list[list[float]], list[str]]:
    """The objects of one VOC file: boxes in continuous coordinates (x1 = xmin - 1, x2 = xmax) and names."""
    boxes, names = [], []
    for k, obj in enumerate(tree.findall("object")):
        name = (obj.findtext("name") or "").strip()
        bb = obj.find("bndbox")
        try:
            xmin, ymin, xmax, ymax = (float((bb.findtext(t) or "").strip()) for t in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, ValueError):
            raise EdgetlError(f"{xml}: object {k + 1} ({name or 'no name'}) has no numeric <bndbox> xmin/ymin/xmax/ymax",
                              hint="fix or remove that <object>") from None
        if not name:
            raise EdgetlError(f"{xml}: object {k + 1} has no <name>", hint="give every <object> its class <name>")
        if (obj.findtext("difficult") or "0").strip().lower() in ("1", "true"):
            issues.add("difficult", {"path": shown(rel), "annotation": xml.name, "class": name})
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        names.append(name)
    return boxes, names


def _read_voc(root: Path, files: list[Path], issues: _Issues) -> tuple[Path, list[_Raw], tuple[str, ...]]:
    """Pascal VOC XML files -> records and class names (a classes.txt / labels.txt fixes them)."""
    root = root.resolve()
    fixed = next((p for p in (root / "classes.txt", root / "labels.txt") if p.is_file()), None)
    given = tuple(s.strip() for s in fixed.read_text(encoding="utf-8-sig").splitlines() if s.strip()) if fixed else None
    parsed = []
    for xml in files:
        tree = safe_xml(xml)
        if tree.tag != "annotation":
            raise EdgetlError(f"{xml}: not a Pascal VOC annotation (its root element is <{tree.tag}>, not <annotation>)",
                              hint="move other XML files out of the data folder, or put the annotations in Annotations/")
        image = _voc_image(xml, (tree.findtext("filename") or "").strip(), root)
        rel = _rel(image, root)
        w, h = (tree.findtext("size/width") or "").strip(), (tree.findtext("size/height") or "").strip()
        declared = (int(w), int(h)) if w.isdigit() and h.isdigit() and int(w) > 0 else None
        boxes, names = _voc_objects(tree, xml, rel, issues)
        parsed.append((image, rel, _rel(xml, root), boxes, names, declared))
    class_names = given if given is not None else tuple(sorted({n for *_, names, _ in parsed for n in names}))
    index = {n: i for i, n in enumerate(class_names)}
    raws = []
    for image, rel, source, boxes, names, declared in parsed:
        keep = [i for i, n in enumerate(names) if n in index]
        for i, n in enumerate(names):
            if n not in index:
                issues.add("unknown_classes", {"path": shown(rel), "annotation": source, "class": n})
                issues.unknown_names.add(n)
        raws.append(_Raw(image, rel, source, np.asarray([boxes[i] for i in keep], dtype=np.float64).reshape(-1, 4),
                         np.asarray([index[names[i]] for i in keep], dtype=np.int64), False, declared))
    return root, raws, class_names


# ------------------------------------------------------------------------------------------
# validation of the images and boxes, the report
# ------------------------------------------------------------------------------------------

def _probe(path: Path) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(sha256, (w, h), None) of a usable image, or (None, None, reason). The pixels are not kept."""
    if not path.is_file():
        return None, None, "missing file"
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        img = read_image(path)
    except ImageDecodeError as exc:
        return None, None, exc.message.replace(f"{path}: ", "")
    except OSError as exc:
        return None, None, f"cannot read file ({exc.strerror or exc})"
    except Exception as exc:  # a decoder crash on a hostile file must not stop the run
        return None, None, f"{type(exc).__name__}: {exc}"
    size = (int(img.shape[1]), int(img.shape[0]))
    del img
    return digest, size, None


def _clean_boxes(raw: _Raw, w: int, h: int, issues: _Issues) -> tuple[np.ndarray, np.ndarray]:
    """Pixels xyxy, degenerate boxes dropped, boxes clipped to the image (counted), small ones counted."""
    b = raw.boxes.astype(np.float64).reshape(-1, 4)
    if raw.normalized:
        cx, cy, bw, bh = b[:, 0] * w, b[:, 1] * h, b[:, 2] * w, b[:, 3] * h
        b = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    rel = shown(raw.rel)
    finite = np.isfinite(b).all(axis=1)
    good = finite.copy()
    good[finite] = (b[finite, 2] > b[finite, 0]) & (b[finite, 3] > b[finite, 1])
    for i in np.flatnonzero(~good):
        issues.add("degenerate", {"path": rel, "box": [float(v) if np.isfinite(v) else str(v) for v in b[i]],
                                  "reason": "not finite" if not finite[i] else "zero or negative area"})
    b, classes = b[good], raw.classes[good]
    c = np.clip(b, 0.0, [w, h, w, h])
    inside = (c[:, 2] > c[:, 0]) & (c[:, 3] > c[:, 1])
    moved = (c != b).any(axis=1)
    for i in np.flatnonzero(moved):
        kind = "clipped" if inside[i] else "outside"
        issues.add(kind, {"path": rel, "box": _box_list(b[i]), "image_wh": [w, h]})
    c, classes = c[inside], classes[inside]
    for i in np.flatnonzero((c[:, 2] - c[:, 0] < MIN_BOX_PX) | (c[:, 3] - c[:, 1] < MIN_BOX_PX)):
        issues.add("small_boxes", {"path": rel, "box": _box_list(c[i])})
    return c.astype(np.float32), classes.astype(np.int64)


def _check_images(raws: list[_Raw], issues: _Issues, workers: int) -> list[DetImage]:
    """Hash and decode every named image once (threads: OpenCV decodes without the GIL); skip the
    missing/unreadable and byte-identical ones; clean the boxes."""
    raws = sorted(raws, key=lambda r: r.rel)  # duplicates keep the first by path, whatever the file order
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        probed = list(pool.map(_probe, [r.path for r in raws]))
    images, seen = [], {}
    for raw, (digest, size, reason) in zip(raws, probed):
        if reason is not None:
            issues.add("missing_images", {"path": shown(raw.rel), "annotation": shown(raw.source), "reason": shown(reason)})
            continue
        if digest in seen:
            issues.add("duplicates", {"path": shown(raw.rel), "same_as": shown(seen[digest]), "boxes_dropped": len(raw.classes)})
            continue
        seen[digest] = raw.rel
        w, h = size
        if raw.declared is not None and tuple(raw.declared) != (w, h):
            issues.add("size_mismatch", {"path": shown(raw.rel), "declared_wh": list(raw.declared), "image_wh": [w, h]})
        boxes, classes = _clean_boxes(raw, w, h, issues)
        if not len(classes):
            issues.add("negatives", {"path": shown(raw.rel)})
        images.append(DetImage(raw.path, w, h, boxes, classes, None, raw.rel))
    return images


def _report(data: Path, root: Path, fmt: str, images: list[DetImage], names: tuple[str, ...], issues: _Issues,
            split_hint: dict[str, str]) -> dict[str, Any]:
    counts = np.bincount(np.concatenate([im.classes for im in images] + [np.zeros(0, np.int64)]), minlength=len(names))
    per_image = [set(im.classes.tolist()) for im in images]
    report: dict[str, Any] = {
        "data": shown(str(data)), "root": shown(str(root)), "format": fmt, "classes": list(names),
        "images": len(images), "boxes": int(counts.sum()),
        "boxes_per_class": {n: int(counts[i]) for i, n in enumerate(names)},
        "images_per_class": {n: sum(i in s for s in per_image) for i, n in enumerate(names)},
        "image_size": ({"min_wh": [min(im.width for im in images), min(im.height for im in images)],
                        "max_wh": [max(im.width for im in images), max(im.height for im in images)]} if images else {}),
        "box_convention": "xyxy float32, continuous pixel coordinates (a box over pixel columns 0..9 is x1=0, x2=10)"
                          + ("; VOC's 1-based inclusive bndbox read as x1=xmin-1, y1=ymin-1, x2=xmax, y2=ymax"
                             if fmt == "voc" else ""),
    }
    for kind in _Issues.KINDS:
        report[kind] = issues.section(kind)
    report["unknown_classes"]["names"] = sorted(issues.unknown_names)[:LIST_CAP]
    report["kept_or_dropped"] = {
        "negatives": "kept (images without boxes)", "clipped": "kept, clipped to the image",
        "outside": "dropped (entirely outside the image)", "degenerate": "dropped (zero, negative or non-finite area)",
        "small_boxes": f"kept (under {MIN_BOX_PX:g} px wide or high after clipping)", "unknown_classes": "dropped",
        "missing_images": "image skipped (missing or unreadable)", "duplicates": "skipped (same sha256 as an earlier image)",
        "crowd": "dropped (COCO iscrowd=1)", "difficult": "kept as normal boxes (VOC difficult=1)",
        "no_label_file": "kept as negatives (YOLO: no label file = no objects)",
        "size_mismatch": "the image's own size is used"}
    if split_hint:
        report["split_hint"] = dict(split_hint)
        report["split_hint_note"] = "the dataset's own split is recorded, not applied: split_detection re-splits by group"
    return report


def _finish(data: Path, root: Path, fmt: str, raws: list[_Raw], names: tuple[str, ...], issues: _Issues,
            split_hint: dict[str, str] | None = None, workers: int = 4) -> DetDataset:
    if not raws:
        raise EdgetlError(f"{data}: no annotated images found ({fmt})", hint=_LAYOUT_HINT)
    images = _check_images(raws, issues, workers)
    report = _report(data, root, fmt, images, names, issues, split_hint or {})
    if not images:
        first = issues.first["missing_images"][:3]
        detail = "; ".join(f"{e['path'] or e['annotation']}: {e['reason']}" for e in first)
        raise EdgetlError(f"{data}: none of the {len(raws)} annotated image(s) is usable ({detail})",
                          hint="check that the image files are where the annotations say (paths are relative "
                               "to the annotation file's folder)")
    if report["boxes"] < 1:
        dropped = {k: issues.counts[k] for k in ("unknown_classes", "outside", "degenerate", "crowd", "duplicates")
                   if issues.counts[k]}
        raise EdgetlError(f"{data}: no usable box in {len(images)} image(s)"
                          + (f" (dropped: {', '.join(f'{k} {v}' for k, v in dropped.items())})" if dropped else ""),
                          hint="detection needs at least one labelled box; check the class names and coordinates")
    return DetDataset(root, images, tuple(names), fmt, report)


def _detect_format(path: Path) -> tuple[str, Path, Any]:
    """(format, the file or folder to read, parsed COCO data when already loaded)."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return "coco", path, None
        if suffix == ".xml":
            return "voc", path, None
        if suffix in (".yaml", ".yml"):
            return "yolo", path.parent, None
        raise EdgetlError(f"{path}: not a detection dataset file (.json COCO, .xml VOC, data.yaml YOLO)", hint=_LAYOUT_HINT)
    if (path / "images").is_dir() and (path / "labels").is_dir():
        return "yolo", path, None
    coco = _coco_file(path)
    if coco is not None:
        return "coco", coco[0], coco[1]
    if _voc_files(path):
        return "voc", path, None
    raise EdgetlError(f"{path}: no annotations found (no COCO .json, no YOLO images/ + labels/, no VOC .xml)",
                      hint=_LAYOUT_HINT)


def read_detection(path: str | Path, fmt: str = "auto", workers: int = 4) -> DetDataset:
    """Read and validate a detection dataset (COCO, YOLO or Pascal VOC; ``fmt="auto"`` detects it).

    Every image is hashed and decoded once (``workers`` threads); the report says what was clipped,
    dropped or skipped and why (module docstring). Raises EdgetlError when the data cannot be used."""
    path = Path(path)
    if not path.exists():
        raise EdgetlError(f"{path}: no such file or folder", hint=_LAYOUT_HINT)
    issues = _Issues()
    data = None
    if fmt == "auto":
        fmt, target, data = _detect_format(path)
    elif fmt in FORMATS:
        target = path
    else:
        raise EdgetlError(f"unknown detection format {fmt!r}", hint=f"use one of: auto, {', '.join(FORMATS)}")
    if fmt == "coco":
        if target.is_dir():
            found = _coco_file(target)
            if found is None:
                raise EdgetlError(f"{target}: no COCO instances .json at the top of the folder", hint=_LAYOUT_HINT)
            target, data = found
        root, raws, names = _read_coco(target, issues, data)
        return _finish(path, root, fmt, raws, names, issues, workers=workers)
    if fmt == "yolo":
        folder = target.parent if target.is_file() else target
        if not (folder / "images").is_dir():
            raise EdgetlError(f"{folder}: a YOLO dataset needs an images/ folder (and labels/)", hint=_LAYOUT_HINT)
        root, raws, names, hint = _read_yolo(folder, issues)
        return _finish(path, root, fmt, raws, names, issues, hint, workers)
    files = [target] if target.is_file() else _voc_files(target)
    if not files:
        raise EdgetlError(f"{target}: no Pascal VOC .xml annotations", hint=_LAYOUT_HINT)
    root, raws, names = _read_voc(target.parent if target.is_file() else target, files, issues)
    return _finish(path, root, fmt, raws, names, issues, workers=workers)


# ------------------------------------------------------------------------------------------
# pixels
# ------------------------------------------------------------------------------------------

# Tiles of one large source (an aerial mosaic of 2299x2472 px) would each decode the whole file:
# ~0.5 s per 400 px tile, 2 s under load (the deepforest epoch took 137 s for 62 tiles). The last few
# decoded SOURCES of tiles are kept (whole images are never cached): memory is bounded by
# TILE_SOURCE_CACHE sources, not by the dataset, and each DataLoader worker has its own.
TILE_SOURCE_CACHE = 4
_sources: "dict[tuple, np.ndarray]" = {}


def _tile_source(path: Path) -> np.ndarray:
    st = os.stat(path)
    key = (str(path), st.st_mtime_ns, st.st_size)  # a file changed since is decoded again
    pixels = _sources.pop(key, None)
    if pixels is None:
        pixels = read_image(path)
        pixels.setflags(write=False)  # shared by every tile cut from it
    _sources[key] = pixels  # most recent last
    while len(_sources) > TILE_SOURCE_CACHE:
        _sources.pop(next(iter(_sources)))
    return pixels


def load_pixels(img: DetImage) -> np.ndarray:
    """BGR uint8 (H, W, 3) of the image, or of its window for a tile (a copy: callers may modify it).
    Whole images are decoded on each call (memory stays flat whatever the dataset size); the sources
    of tiles come from a small cache (``TILE_SOURCE_CACHE``). A file whose size changed since the
    dataset was read raises EdgetlError (its boxes would no longer fit)."""
    pixels = read_image(img.path) if img.window is None else _tile_source(img.path)
    h, w = pixels.shape[:2]
    x0, y0, x1, y1 = img.window if img.window is not None else (0, 0, img.width, img.height)
    if (img.window is None and (w, h) != (img.width, img.height)) or x1 > w or y1 > h:
        raise EdgetlError(f"{img.path}: is {w}x{h} pixels, not the size it had when the dataset was read",
                          hint="the file changed: read the dataset again")
    if img.window is None:
        return pixels
    return np.array(pixels[y0:y1, x0:x1])  # a copy: the source is shared (and read-only)


# ------------------------------------------------------------------------------------------
# tiling
# ------------------------------------------------------------------------------------------

def _spans(lo: int, hi: int, size: int, overlap: float) -> list[tuple[int, int]]:
    """Windows of ``size`` over [lo, hi) with the given overlap, the last one aligned to ``hi``; a span
    no longer than ``size`` is one window (not padded)."""
    if hi - lo <= size:
        return [(lo, hi)]
    stride = max(1, int(round(size * (1.0 - overlap))))
    starts = list(range(lo, hi - size, stride)) + [hi - size]
    return [(s, s + size) for s in starts]


def _blocks(length: int, region: int) -> list[tuple[int, int]]:
    """[0, length) cut into ceil(length / region) near-equal blocks (no thin last block)."""
    n = max(1, math.ceil(length / region)) if region else 1
    edges = [round(i * length / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def _window_boxes(boxes: np.ndarray, win: tuple[int, int, int, int], min_visible: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept mask, kept boxes in window pixels, cut mask): a box is kept when at least ``min_visible``
    of its area is inside the window, clipped to it; cut = kept but not wholly inside."""
    x0, y0, x1, y1 = win
    ix1, iy1 = np.maximum(boxes[:, 0], x0), np.maximum(boxes[:, 1], y0)
    ix2, iy2 = np.minimum(boxes[:, 2], x1), np.minimum(boxes[:, 3], y1)
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = (inter > 0) & (inter >= min_visible * area)
    out = np.stack([ix1 - x0, iy1 - y0, ix2 - x0, iy2 - y0], axis=1)[keep].astype(np.float32)
    partial = (inter > 0) & (inter < area)
    return keep, out, partial


def _check_tiling(ds: DetDataset, size: int, overlap: float, min_visible: float, region: int) -> None:
    if not (isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size >= 8):
        raise EdgetlError(f"tile size {size!r} is not a whole number of pixels >= 8", hint="e.g. --tile 512")
    if not 0.0 <= overlap < 1.0:
        raise EdgetlError(f"tile overlap {overlap} is not a fraction in [0, 1)", hint="e.g. 0.2")
    if not 0.0 < min_visible <= 1.0:
        raise EdgetlError(f"min_visible {min_visible} is not a fraction in (0, 1]", hint="e.g. 0.5")
    if region and region < size:
        raise EdgetlError(f"region {region} is smaller than the tile size {size}",
                          hint=f"give a region of at least {size} px (default {4 * size}), or 0 for none")
    if any(im.window is not None for im in ds.images):
        raise EdgetlError("the dataset is already tiled", hint="tile the dataset read from disk, once")


def tile_dataset(ds: DetDataset, size: int, overlap: float = 0.2, min_visible: float = 0.5,
                 region: int | None = None) -> DetDataset:
    """Cut every image into ``size`` x ``size`` tiles (windows; nothing is decoded here).

    Hold-out without leakage: each source image is first divided into near-equal blocks of at most
    ``region`` px a side, each block its own ``group`` (``"<relpath>#r<i>"``, row-major), and tiles are
    cut inside a block, never across its edge; overlapping tiles of one block therefore share a group
    and go to one split together. Default ``region = 4 * size``: a block then holds about 25 tiles at
    overlap 0.2, so few boxes straddle block edges (such a box is kept in the block holding at least
    ``min_visible`` of it and lost when neither does: counted as ``boxes_lost``), while a large image
    still gives several groups to split. ``region=0``: no blocks (the group is the source image).
    Images (blocks) smaller than ``size`` are one tile of their own size, not padded. A box is kept in
    a tile, clipped to it, when at least ``min_visible`` of its area is inside."""
    region = 4 * size if region is None else int(region)
    _check_tiling(ds, size, overlap, min_visible, region)
    tiles: list[DetImage] = []
    cut = dropped = empty = 0
    lost = _Issues()
    for img in ds.images:
        seen = np.zeros(len(img.classes), dtype=bool)
        blocks = [(bx, by) for by in _blocks(img.height, region) for bx in _blocks(img.width, region)]
        for r, ((bx0, bx1), (by0, by1)) in enumerate(blocks):
            group = f"{img.group}#r{r}" if region else img.group
            for ty0, ty1 in _spans(by0, by1, size, overlap):
                for tx0, tx1 in _spans(bx0, bx1, size, overlap):
                    win = (tx0, ty0, tx1, ty1)
                    keep, boxes, partial = _window_boxes(img.boxes, win, min_visible)
                    seen |= keep
                    cut += int((keep & partial).sum())
                    dropped += int((~keep & partial).sum())
                    empty += int(not keep.any())
                    tiles.append(DetImage(img.path, tx1 - tx0, ty1 - ty0, boxes, img.classes[keep].copy(), win, group))
        for i in np.flatnonzero(~seen):
            lost.add("boxes_lost", {"path": shown(img.group), "box": _box_list(img.boxes[i]),
                                   "class": ds.class_names[int(img.classes[i])]})
    report = dict(ds.report)
    report["tiling"] = {
        "size": size, "overlap": overlap, "min_visible": min_visible, "region": region,
        "source_images": len(ds.images), "groups": len({t.group for t in tiles}), "tiles": len(tiles),
        "tiles_without_boxes": empty, "boxes_cut": cut, "boxes_under_min_visible": dropped,
        "boxes_lost": lost.section("boxes_lost"),
        "note": "boxes_cut: (tile, box) pairs kept clipped by the tile edge; boxes_under_min_visible: pairs dropped "
                "from a tile holding part of the box; boxes_lost: source boxes in no tile at all"}
    return DetDataset(ds.root, tiles, ds.class_names, ds.format, report)


# ------------------------------------------------------------------------------------------
# split
# ------------------------------------------------------------------------------------------

def _fractions(fractions: dict[str, float]) -> dict[str, float]:
    """{"val": f, "test": f} (train is the rest); a given "train" must make the three sum to 1."""
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise EdgetlError(f"split fractions: unknown split(s) {', '.join(sorted(unknown))}", hint="use train, val, test")
    fr = {s: float(fractions.get(s, 0.0)) for s in ("val", "test")}
    if any(not 0.0 <= f < 1.0 for f in fr.values()) or fr["val"] + fr["test"] >= 0.9:
        raise EdgetlError(f"split fractions {fractions} are not val, test in [0, 1) leaving at least 0.1 to train",
                          hint="e.g. {'val': 0.15, 'test': 0.15}")
    if "train" in fractions and abs(sum(float(fractions.get(s, 0.0)) for s in SPLITS) - 1.0) > 1e-6:
        raise EdgetlError(f"split fractions {fractions} do not sum to 1", hint="give val and test only (train is the rest)")
    return fr


def _quota(n: int, fr: dict[str, float]) -> dict[str, int]:
    """How many of a stratum's n groups go to val and test: rounded, at least 1 val then 1 test while
    n allows, always at least 1 left to train."""
    sizes = {s: int(round(n * f)) for s, f in fr.items()}
    for s in ("val", "test"):
        if fr[s] > 0 and sizes[s] == 0 and n - sum(sizes.values()) >= 2:
            sizes[s] = 1
    while sum(sizes.values()) > n - 1:
        sizes[max(sizes, key=lambda k: sizes[k])] -= 1
    return sizes


def _strata(ds: DetDataset, groups: dict[str, list[int]]) -> dict[str, int]:
    """Each group's stratum: its rarest class (fewest groups holding it, then fewest boxes), -1 for a
    group without boxes."""
    present = {g: set(np.concatenate([ds.images[i].classes for i in idx]).tolist()) for g, idx in groups.items()}
    n_groups = np.zeros(len(ds.class_names), dtype=np.int64)
    n_boxes = np.zeros(len(ds.class_names), dtype=np.int64)
    for g, classes in present.items():
        for c in classes:
            n_groups[c] += 1
    for im in ds.images:
        n_boxes += np.bincount(im.classes, minlength=len(ds.class_names))
    return {g: (min(cs, key=lambda c: (n_groups[c], n_boxes[c], c)) if cs else -1) for g, cs in present.items()}


def split_detection(ds: DetDataset, fractions: dict[str, float], seed: int) -> dict[str, list[DetImage]]:
    """Split ``ds`` into train/val/test, each group whole (tiles of one region never straddle splits).

    ``fractions``: ``{"val": .15, "test": .15}`` (train is the rest; a "train" entry must make them sum
    to 1), counted in groups. Stratified: groups are binned by their rarest class (groups without
    boxes form their own stratum) and each stratum is shuffled (``seed``) and carved by the fractions,
    at least one to train first. Then any split with a positive fraction that is still empty takes one
    group from the largest split (from its most common stratum), so with >= 3 groups every split is
    non-empty. Deterministic for a given dataset and seed."""
    fr = _fractions(fractions)
    groups: dict[str, list[int]] = {}
    for i, im in enumerate(ds.images):
        groups.setdefault(im.group, []).append(i)
    need = 1 + sum(f > 0 for f in fr.values())
    if len(groups) < need:
        raise EdgetlError(f"{ds.root}: {len(groups)} group(s) of images ({len(ds.images)} image(s)); a train/val/test "
                          f"split keeps each group whole and needs at least {need}",
                          hint="add images, or tile large images (--tile SIZE): each region of an image is its own group")
    strata = _strata(ds, groups)
    members: dict[int, list[str]] = {}
    for g in sorted(groups):
        members.setdefault(strata[g], []).append(g)
    rng = np.random.default_rng(seed)
    where: dict[str, str] = {}
    for key in sorted(members):
        order = [members[key][i] for i in rng.permutation(len(members[key]))]
        sizes = _quota(len(order), fr)
        k = 0
        for s in ("test", "val"):
            for g in order[k:k + sizes[s]]:
                where[g] = s
            k += sizes[s]
        for g in order[k:]:
            where[g] = "train"
    for s in ("val", "test"):
        if fr[s] > 0 and s not in where.values():
            counts = {t: sum(v == t for v in where.values()) for t in SPLITS}
            donor = max(SPLITS, key=lambda t: (counts[t], t == "train"))
            candidates = [g for g in sorted(where) if where[g] == donor]
            where[max(candidates, key=lambda g: (len(members[strata[g]]), g))] = s
    return {s: [im for im in ds.images if where[im.group] == s] for s in SPLITS}


def split_summary(splits: dict[str, list[DetImage]], class_names: Sequence[str]) -> dict[str, Any]:
    """Per split: groups, images, images without boxes, boxes per class (for the run's report)."""
    out = {}
    for s, images in splits.items():
        counts = np.zeros(len(class_names), dtype=np.int64)
        for im in images:
            counts += np.bincount(im.classes, minlength=len(class_names))
        out[s] = {"groups": len({im.group for im in images}), "images": len(images),
                  "negatives": sum(1 for im in images if not len(im.classes)),
                  "boxes_per_class": {n: int(counts[i]) for i, n in enumerate(class_names)}}
    return out


# ------------------------------------------------------------------------------------------
# split.json and COCO output
# ------------------------------------------------------------------------------------------

def _floats(a: np.ndarray) -> list:
    """float32 values as the shortest decimals that read back to the same float32."""
    return [float(str(v)) for v in np.asarray(a, dtype=np.float32).ravel()]


def split_to_json(splits: dict[str, list[DetImage]], root: Path, class_names: Sequence[str]) -> dict[str, Any]:
    """The detection ``split.json``: every image with its size, window, group, boxes and classes, paths
    relative to ``root`` (absolute when outside it), so a run's data is fixed even if the annotation
    files change later."""
    root = Path(root)
    out: dict[str, Any] = {"format": SPLIT_JSON_FORMAT, "version": 1, "root": str(root), "classes": list(class_names),
                           "splits": {}}
    for s in SPLITS:
        out["splits"][s] = [{"path": _rel(im.path, root), "width": int(im.width), "height": int(im.height),
                             "window": [int(v) for v in im.window] if im.window is not None else None,
                             "group": im.group, "boxes": [_floats(b) for b in im.boxes],
                             "classes": [int(c) for c in im.classes]} for im in splits.get(s, [])]
    return out


def _image_from_json(e: Any, root: Path, n_classes: int, where: str) -> DetImage:
    try:
        path = Path(e["path"])
        boxes = np.asarray(e["boxes"], dtype=np.float32).reshape(-1, 4)
        classes = np.asarray(e["classes"], dtype=np.int64).reshape(-1)
        window = tuple(int(v) for v in e["window"]) if e.get("window") is not None else None
        img = DetImage(path if path.is_absolute() else root / path, int(e["width"]), int(e["height"]), boxes, classes,
                       window, str(e.get("group", e["path"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgetlError(f"{where}: malformed entry ({type(exc).__name__}: {exc})",
                          hint="write split.json again (split_to_json)") from None
    if len(boxes) != len(classes) or (len(classes) and not (0 <= classes.min() and classes.max() < n_classes)):
        raise EdgetlError(f"{where}: boxes and classes do not match the class list", hint="write split.json again")
    return img


def split_from_json(data: dict, root: Path) -> tuple[dict[str, list[DetImage]], tuple[str, ...]]:
    """Read what :func:`split_to_json` wrote; relative paths resolve against ``root``."""
    if not isinstance(data, dict) or data.get("format") != SPLIT_JSON_FORMAT or not isinstance(data.get("splits"), dict):
        raise EdgetlError(f"split.json: not a detection split (format {SPLIT_JSON_FORMAT!r} expected)",
                          hint="the run was not written by edgetl's detection training, or the file is damaged")
    names = tuple(str(n) for n in data.get("classes", []))
    splits = {s: [_image_from_json(e, Path(root), len(names), f"split.json: splits.{s}[{k}]")
                  for k, e in enumerate(data["splits"].get(s, []))] for s in SPLITS}
    return splits, names


def write_coco(images: list[DetImage], class_names: Sequence[str], path: Path, root: Path) -> Path:
    """Write ``images`` as a COCO instances JSON (atomically): ``file_name`` relative to ``root``,
    category ids 1..C in class order (read back as the same 0-based classes), ``bbox`` [x, y, w, h] of
    the continuous xyxy boxes. Whole images only: a tile is a window, not a file."""
    if any(im.window is not None for im in images):
        raise EdgetlError("write_coco writes whole image files; these images are tiles (windows of a file)",
                          hint="write the tiles' pixels (load_pixels) to files first, or pass the untiled images")
    root = Path(root)
    out: dict[str, Any] = {"info": {"description": "written by edgetl"}, "images": [], "annotations": [],
                           "categories": [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(class_names)]}
    for k, im in enumerate(images, start=1):
        out["images"].append({"id": k, "file_name": _rel(im.path, root), "width": int(im.width), "height": int(im.height)})
        for b, c in zip(im.boxes, im.classes):
            x1, y1, x2, y2 = _floats(b)
            w, h = float(str(np.float32(x2 - x1))), float(str(np.float32(y2 - y1)))
            out["annotations"].append({"id": len(out["annotations"]) + 1, "image_id": k, "category_id": int(c) + 1,
                                       "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
    return atomic_write(Path(path), json.dumps(out) + "\n")


__all__ = ["DetDataset", "DetImage", "FORMATS", "LIST_CAP", "SPLITS", "load_pixels", "read_detection", "safe_xml",
           "split_detection", "split_from_json", "split_summary", "split_to_json", "tile_dataset", "write_coco"]
