"""Real, human-labelled detection data that works offline: the tree-crown annotations shipped in the
``deepforest`` package.

``deepforest`` (MIT, Weinstein et al.) carries a few airborne RGB images with Pascal VOC annotations
in its ``data/`` folder. edgetl uses only those files: the package is installed with
``pip install --no-deps deepforest==2.1.0`` (its own dependencies, torch lightning and GIS stacks,
are not needed) and is never imported: :func:`deepforest_data_dir` finds its folder through
``importlib.util.find_spec``.

:func:`write_trees` copies every image that has an ``.xml`` annotation there, with its XML, into a
Pascal VOC folder that :func:`edgetl.detect.data.read_detection` reads, plus a README.txt (source,
license, citation, what was changed), the package's LICENSE and ``edgetl_trees.json`` (provenance:
files, sha256, counts; also the marker that lets ``overwrite=True`` replace the folder). One change
is made to the copies: an annotation that names a TIFF for which the package also ships a
pixel-identical PNG (``OSBS_029.tif``, a GeoTIFF whose extra tags make OpenCV print warnings on every
decode) gets the PNG, and its ``<filename>`` is changed to match; the README lists each such change.

The folder is written like edgetl's other outputs: built in a hidden ``.NAME.partial-*`` folder
beside ``out`` under the folder's lock, checked by reading it back, then renamed over ``out`` (an old
folder is swapped out and deleted only after the new one is in place). ``edgetl.artifact.new_folder``
is not used as is: its ``--overwrite`` accepts only runs, artifacts and ``edgetl data`` image folders
(marker ``elpv_meta.csv``), and a VOC folder is none of these.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact import new_folder
from ..runtime.errors import EdgetlError, MissingDependencyError
from ..runtime.imageio import read_image
from .data import read_detection, safe_xml

DEEPFOREST_VERSION = "2.1.0"
INSTALL = f"pip install --no-deps deepforest=={DEEPFOREST_VERSION}"
MARKER = "edgetl_trees.json"  # written into every trees folder: provenance, and what --overwrite may replace


def deepforest_data_dir() -> Path:
    """The ``data/`` folder of the installed ``deepforest`` package, found without importing it (its
    ``__init__`` imports torch and GIS packages that are not installed with ``--no-deps``)."""
    try:
        spec = importlib.util.find_spec("deepforest")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        err = MissingDependencyError("deepforest", None, "The tree-crown dataset (real, human-labelled boxes)")
        err.hint = f"install it without its dependencies (only its data files are used, nothing is imported): {INSTALL}"
        raise err
    data = Path(spec.origin).parent / "data"
    if not data.is_dir() or not any(data.glob("*.xml")):
        raise EdgetlError(f"{data}: the installed deepforest package has no annotated example images (*.xml)",
                          hint=f"install the version edgetl was written against: {INSTALL}")
    return data


def _package_meta() -> dict[str, Any]:
    """Version, license and LICENSE file of the installed deepforest distribution (metadata only)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("deepforest")
    except metadata.PackageNotFoundError:
        return {"version": "unknown", "license": "unknown", "license_file": None}
    license_file = next((f for f in (dist.files or []) if f.name in ("LICENSE", "LICENSE.txt", "LICENSE.md")), None)
    path = Path(dist.locate_file(license_file)) if license_file is not None else None
    return {"version": dist.version, "license": dist.metadata.get("License") or "unknown",
            "license_file": path if path is not None and path.is_file() else None}


def _same_pixels(a: Path, b: Path) -> bool:
    import cv2

    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # the GeoTIFF's tags: a warning per tag
    try:
        x, y = read_image(a), read_image(b)
    except EdgetlError:
        return False
    finally:
        cv2.utils.logging.setLogLevel(level)
    return x.shape == y.shape and bool(np.array_equal(x, y))


TREE_STATES = ("Alive", "Dead")  # one image labels crowns by state; the others say "Tree"


def _one_class(text: bytes, xml_name: str) -> tuple[bytes, str | None]:
    """Every crown labelled ``Tree``: the state labels of one image become ``Tree`` (a detector of
    tree crowns; the states exist in a single image, so no held-out split could measure them)."""
    n = 0
    for state in TREE_STATES:
        tag = f"<name>{state}</name>".encode()
        n += text.count(tag)
        text = text.replace(tag, b"<name>Tree</name>")
    return text, (f"{n} boxes labelled {'/'.join(TREE_STATES)} in {xml_name} relabelled Tree" if n else None)


def _copy_pairs(src: Path, dst: Path, single_class: bool = True) -> list[dict[str, Any]]:
    """Copy each annotated image and its XML from ``src`` into ``dst``; one entry per pair."""
    entries = []
    for xml in sorted(src.glob("*.xml")):
        named = (safe_xml(xml).findtext("filename") or "").strip()
        image = src / named
        if not named or not image.is_file():
            continue
        text, change = xml.read_bytes(), None
        png = image.with_suffix(".png")
        if image.suffix.lower() in (".tif", ".tiff") and png.is_file() and _same_pixels(image, png):
            old, new = f"<filename>{named}</filename>".encode(), f"<filename>{png.name}</filename>".encode()
            if text.count(old) == 1:
                text = text.replace(old, new)
                change = (f"{named} (a GeoTIFF) replaced by {png.name}, pixel-identical and shipped beside it in the "
                          f"package; <filename> in {xml.name} changed to match")
                image = png
        if single_class:
            text, relabelled = _one_class(text, xml.name)
            change = "; ".join(c for c in (change, relabelled) if c) or None
        shutil.copyfile(image, dst / image.name)
        (dst / xml.name).write_bytes(text)
        entries.append({"annotation": xml.name, "image": image.name, "named_in_package": named,
                        "image_sha256": hashlib.sha256(image.read_bytes()).hexdigest(), "change": change})
    if not entries:
        raise EdgetlError(f"{src}: no annotation names an image that is there", hint=f"reinstall: {INSTALL}")
    return entries


_CITATIONS = (
    "Weinstein, B.G., Marconi, S., Aubry-Kientz, M., Vincent, G., Senyondo, H. and White, E.P., 2020. DeepForest: "
    "A Python package for RGB deep learning tree crown delineation. Methods in Ecology and Evolution, 11(12), "
    "pp.1743-1751. https://doi.org/10.1111/2041-210X.13472",
    "Weinstein, B.G.; Marconi, S.; Bohlman, S.; Zare, A.; White, E.P., 2019. Individual Tree-Crown Detection in RGB "
    "Imagery Using Semi-Supervised Deep Learning Neural Networks. Remote Sensing 11, 1309 "
    "https://doi.org/10.3390/rs11111309",
)


def _readme(summary: dict[str, Any]) -> str:
    lines = [
        "Tree crowns: real, human-labelled boxes in Pascal VOC format, written by edgetl (edgetl.detect.trees).",
        "",
        f"Source: the example data of the Python package deepforest {summary['deepforest_version']} "
        f"(license: {summary['deepforest_license']}; https://github.com/Weecology/DeepForest), copied from",
        f"  {summary['source']}",
        "The package's LICENSE is copied as LICENSE-deepforest.txt." if summary["license_copied"]
        else "The package's LICENSE file was not found in its metadata.",
        "",
        "Imagery: neither the package metadata nor the XML files state where the images come from or under which",
        "terms. Their names begin with NEON site codes (YELL, OSBS, SOAP), and the tree-detection paper below",
        "describes RGB imagery of the National Ecological Observatory Network (NEON); check NEON's data use and",
        "citation policy before redistributing the images.",
        "",
        "Cite (as the deepforest package asks):",
        *[f"  - {c}" for c in _CITATIONS],
        "",
        f"Files ({summary['images']} images, {summary['boxes']} boxes):",
    ]
    for e in summary["files"]:
        size = summary["image_sizes"].get(e["image"], ["?", "?"])
        counts = ", ".join(f"{n} {k}" for k, n in e["boxes_per_class"].items() if n)
        lines.append(f"  {e['image']} ({size[0]}x{size[1]}) + {e['annotation']}: {counts or 'no boxes'}")
    lines += ["", "Changes to the package's files:"]
    lines += [f"  - {e['change']}" for e in summary["files"] if e["change"]] or ["  none (byte copies)"]
    lines += ["  (all other files are byte copies)", "",
              "Boxes: VOC <bndbox> is 1-based and inclusive; edgetl reads it as continuous coordinates",
              "x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax.", ""]
    return "\n".join(lines)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_symlink():
        raise EdgetlError(f"{out} is a symlink", hint="give a real path (the link's target is not replaced)")
    if out.exists() and not out.is_dir():
        raise EdgetlError(f"{out} exists and is not a folder", hint="choose another output folder")
    if out.exists() and not overwrite:
        raise EdgetlError(f"{out} already exists", hint="choose another output folder, or pass overwrite to replace it")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise EdgetlError(f"{out} is not a trees folder written by edgetl (no {MARKER}), so overwrite does not delete it",
                          hint="choose a new output folder, or remove that folder yourself")


def _summary(tmp: Path, src: Path, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Read the written folder back (the check that it is usable) and count what it holds."""
    ds = read_detection(tmp, "voc")
    by_image = {im.path.name: im for im in ds.images}
    for e in entries:
        im = by_image.get(e["image"])
        counts = np.bincount(im.classes, minlength=len(ds.class_names)) if im is not None else np.zeros(len(ds.class_names))
        e["boxes_per_class"] = {n: int(counts[i]) for i, n in enumerate(ds.class_names)}
    meta = _package_meta()
    return {"source": str(src), "deepforest_version": meta["version"], "deepforest_license": meta["license"],
            "license_copied": meta["license_file"] is not None, "_license_file": meta["license_file"],
            "images": ds.report["images"], "boxes": ds.report["boxes"], "classes": list(ds.class_names),
            "boxes_per_class": ds.report["boxes_per_class"],
            "image_sizes": {im.path.name: [im.width, im.height] for im in ds.images}, "files": entries}


def write_trees(out: str | Path, overwrite: bool = False, single_class: bool = True) -> dict[str, Any]:
    """Write the deepforest tree-crown annotations as a Pascal VOC folder at ``out`` (module docstring).

    Returns the summary (also saved as ``edgetl_trees.json``): source, package version and license,
    images, boxes, boxes per class, image sizes, and per file its sha256 and any change made."""
    src = deepforest_data_dir()
    out = Path(out)
    _check_out(out, overwrite)
    with new_folder(out, overwrite=overwrite) as tmp:  # hidden, renamed when complete; its marker: MARKER
        summary = _summary(tmp, src, _copy_pairs(src, tmp, single_class))
        license_file = summary.pop("_license_file")
        summary["out"] = str(out)
        if license_file is not None:
            shutil.copyfile(license_file, tmp / "LICENSE-deepforest.txt")
        (tmp / "README.txt").write_text(_readme(summary), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data folder is an ordinary one
    return summary


__all__ = ["DEEPFOREST_VERSION", "INSTALL", "MARKER", "deepforest_data_dir", "write_trees"]
