"""Composed conveyor scenes for detection: real ELPV cells laid out on a synthetic belt.

Why: ELPV has no detection labels, and a detector of "cells on a conveyor" needs frames holding
several cells with exact boxes. So the objects are the real 300x300 electroluminescence images
(``defective``/``functional`` as ``edgetl data elpv --task binary`` defines them: defect
probability >= 0.5), only the layout is synthetic, and every box is computed from the transform
that placed the cell, never detected.

``OUT/``::

    README.txt        what is synthetic, what is real, the citation, the split of the cells
    scenes.json       the summary (also marks the folder as written by this module)
    cells.json        every cell used: its source file, label, cell type and split
    train.json val.json test.json   COCO instances (file_name relative to OUT)
    images/{train,val,test}/NNNNNN.jpg
    conveyor.mp4      test cells riding left to right under a 1280x720 camera
    conveyor_gt.json  per-frame boxes, a vertical counting line, the expected counts per class

The cells are split into train/val/test pools *before* any scene is composed (by default exactly
as ``edgetl train`` splits an ``edgetl data elpv`` folder with the same seed, or as a given run's
``split.json`` did), so no cell appears in two splits and the classifier and the detector can be
compared on the same held-out cells.

Geometry follows :mod:`edgetl.detect`: continuous pixel coordinates, a box ``(x1, y1, x2, y2)``.
A cell is resized to ``side x side`` then rotated about its centre; its box is the axis-aligned
bound of the rotated square clipped to the frame (exactly: the square is clipped as a polygon).
A cell less than half inside the frame is never drawn in a scene; in the video, where cells must
enter and leave, such a cell's entry says ``"ignore": true``. Overlap is allowed up to 30 % of a
cell's visible pixels covered by cells drawn above it; the box stays the whole (clipped) cell.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from ..runtime.errors import EdgetlError

CLASSES = ("defective", "functional")  # category ids 1, 2; class index 0, 1 (sorted, as the classifier's)
SPLITS = ("train", "val", "test")
FRACTIONS = {"val": 0.15, "test": 0.15}  # edgetl train's defaults
MARKER = "scenes.json"
CELL = 300  # ELPV cells are 300x300
REF_H = 720  # cell sizes are stated for a 720-pixel-high frame and scale with the frame's height
MIN_VISIBLE = 0.5  # a cell less than half in the frame is not an object (scenes: not drawn)
MAX_OCCLUDED = 0.3  # at most this share of a cell's visible pixels may be covered by later cells
ELPV_CITATION = ("ELPV solar-cell electroluminescence dataset (2,624 cells, 300x300 grayscale), PyPI "
                 "elpv-dataset: Buerhop-Lutz et al. 2018, 'A benchmark for visual identification of defective "
                 "solar cells in electroluminescence imagery'; Deitsch et al. 2019, 'Automatic classification "
                 "of defective photovoltaic module cells in electroluminescence images'.")


# ---- the cells and their split ----------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One ELPV cell: ``name`` (cellNNNN.png) is its identity across splits, runs and folders."""

    name: str
    path: Path
    rel: str  # as recorded in the source's label file
    label: str
    prob: float
    kind: str


def load_cells(root: Path | None = None) -> list[Cell]:
    """The ELPV cells with their binary label, from the elpv-dataset package's data folder
    (``labels.csv`` + ``images/``, the default) or a folder ``edgetl data elpv`` wrote
    (``elpv_meta.csv``); labels come from the defect probability, as ``edgetl data elpv`` does."""
    from ..datasets import ELPV_TASKS, elpv_root, read_elpv_labels

    root = Path(root) if root is not None else elpv_root()
    if (root / "labels.csv").is_file():
        rows = read_elpv_labels(root)
    elif (root / "elpv_meta.csv").is_file():
        with open(root / "elpv_meta.csv", newline="") as fh:
            rows = [(r["path"], float(r["defect_probability"]), r["cell_type"]) for r in csv.DictReader(fh)]
    else:
        raise EdgetlError(f"{root}: holds neither ELPV's labels.csv nor the elpv_meta.csv of `edgetl data elpv`",
                          hint="omit the cells folder to use the installed elpv-dataset package")
    to_class = ELPV_TASKS["binary"]
    cells = sorted((Cell(Path(rel).name, root / rel, rel, to_class(p), p, kind) for rel, p, kind in rows),
                   key=lambda c: c.name)
    if not cells:
        raise EdgetlError(f"{root}: no cells listed")
    return cells


def split_cells(cells: list[Cell], seed: int, run: Path | None = None) -> dict[str, list[Cell]]:
    """Split the cells before any scene exists, so no cell is in two splits. Without ``run``: the
    stratified split edgetl.data makes of an ``edgetl data elpv`` folder (``CLASS/cellNNNN.png``),
    so with the same seed it is the split ``edgetl train`` made; with ``run``: its split.json."""
    if run is not None:
        pools = _run_split(cells, Path(run))
    else:
        from ..data import Item, stratified_split

        by_rel = {f"{c.label}/{c.name}": c for c in cells}
        parts = stratified_split([Item(c.path, rel, c.label) for rel, c in by_rel.items()], FRACTIONS, seed)
        pools = {s: [by_rel[it.rel] for it in parts[s]] for s in SPLITS}
    for s in SPLITS:
        if not pools[s]:
            raise EdgetlError(f"no cells for the {s} split ({len(cells)} cells in all)",
                              hint="use more cells (each class needs at least 3)")
    return {s: sorted(pools[s], key=lambda c: c.name) for s in SPLITS}


def _run_split(cells: list[Cell], run: Path) -> dict[str, list[Cell]]:
    """A classification run's train/val/test, matched to ELPV cells by file name."""
    split_file = run / "split.json"
    if not split_file.is_file():
        raise EdgetlError(f"{split_file}: missing", hint="pass a run folder `edgetl train` wrote on `edgetl data elpv`")
    splits = json.loads(split_file.read_text()).get("splits", {})
    by_name = {c.name: c for c in cells}
    pools, seen = {}, set()
    for s in SPLITS:
        names = [Path(item["path"]).name for item in splits.get(s, [])]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise EdgetlError(f"{split_file}: {len(unknown)} {s} image(s) are not ELPV cells (e.g. {unknown[0]})",
                              hint="the run must be trained on an `edgetl data elpv` folder")
        if seen & set(names):
            raise EdgetlError(f"{split_file}: cell {sorted(seen & set(names))[0]} is in two splits")
        seen |= set(names)
        pools[s] = [by_name[n] for n in sorted(set(names))]
    return pools


def _pool(cells: list[Cell], rng: np.random.Generator) -> Iterator[Cell]:
    """The cells of a split in shuffled rounds: every cell is used about equally often."""
    while True:
        for i in rng.permutation(len(cells)):
            yield cells[i]


def _read_cell(cell: Cell) -> np.ndarray:
    """Read on use, not cached: a cell is a 90 kB PNG read in well under a millisecond."""
    img = cv2.imread(str(cell.path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise EdgetlError(f"{cell.path}: cannot read this ELPV cell image")
    return img


# ---- geometry: where a cell goes, its exact box, its pixels --------------------------------------

@dataclass(frozen=True)
class Placement:
    """One cell on the frame: centre (continuous px), side (px; the cell is resized to it first),
    angle (degrees, counter-clockwise as seen), mirrored first or not, brightness gain."""

    cx: float
    cy: float
    side: int
    angle: float
    flip: bool = False
    gain: float = 1.0

    def half_extent(self) -> float:
        """Half the width (= height) of the rotated square's bounding box."""
        a = math.radians(self.angle)
        return self.side / 2 * (abs(math.cos(a)) + abs(math.sin(a)))


def _matrix(p: Placement) -> np.ndarray:
    """2x3 affine map from the resized cell's continuous coordinates to the frame's."""
    a = math.radians(p.angle)
    rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    t = np.array([p.cx, p.cy]) - rot @ np.array([p.side / 2, p.side / 2])
    return np.hstack([rot, t[:, None]])


def cell_polygon(p: Placement) -> np.ndarray:
    """The (4, 2) corners of the placed cell, continuous frame coordinates."""
    s = p.side
    m = _matrix(p)
    return np.array([[0, 0], [s, 0], [s, s], [0, s]], float) @ m[:, :2].T + m[:, 2]


def _clip(poly: np.ndarray, w: float, h: float) -> np.ndarray:
    """Sutherland-Hodgman: the convex polygon cut to the frame [0, w] x [0, h] (exact, no raster)."""
    pts = [tuple(p) for p in poly]
    for axis, limit, keep_below in ((0, 0.0, False), (0, w, True), (1, 0.0, False), (1, h, True)):
        inside = (lambda q: q[axis] <= limit) if keep_below else (lambda q: q[axis] >= limit)
        out = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            if inside(cur) != inside(prev):
                f = (limit - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + f * (cur[0] - prev[0]), prev[1] + f * (cur[1] - prev[1])))
            if inside(cur):
                out.append(cur)
        pts = out
        if not pts:
            break
    return np.array(pts, float).reshape(-1, 2)


def visible_box(p: Placement, size: tuple[int, int]) -> tuple[np.ndarray | None, float]:
    """(box, visible fraction): the bound of the part of the cell inside the frame, and that part's
    share of the cell's area; (None, 0) when nothing of it is inside."""
    clipped = _clip(cell_polygon(p), *size)
    if len(clipped) < 3:
        return None, 0.0
    x, y = clipped[:, 0], clipped[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    if area <= 0:
        return None, 0.0
    return np.array([x.min(), y.min(), x.max(), y.max()], np.float32), area / p.side ** 2


def sprite(cell_img: np.ndarray, p: Placement) -> np.ndarray:
    """The cell resized (INTER_AREA, so its fine fingers do not alias), mirrored, gain applied: float32."""
    interp = cv2.INTER_AREA if p.side < cell_img.shape[0] else cv2.INTER_LINEAR
    small = cv2.resize(cell_img, (p.side, p.side), interpolation=interp).astype(np.float32)
    if p.flip:
        small = small[:, ::-1]
    small *= p.gain
    return np.ascontiguousarray(small)


def draw_cell(canvas: np.ndarray, spr: np.ndarray, p: Placement, box: np.ndarray) -> None:
    """Composite the sprite onto ``canvas`` (float32 HxW) with one warpAffine into the cell's own
    window of the frame (not the whole frame). Sprite and coverage are warped together (2 channels,
    zero border): the warped sprite is then premultiplied by the coverage, so edges are anti-aliased
    and the pixels sit where the box says."""
    h, w = canvas.shape[:2]
    x0, y0 = max(0, math.floor(box[0]) - 1), max(0, math.floor(box[1]) - 1)
    x1, y1 = min(w, math.ceil(box[2]) + 1), min(h, math.ceil(box[3]) + 1)
    m = _matrix(p)
    # cv2 works in pixel-index coordinates (pixel centres at integers): shift by half a pixel each side
    m[:, 2] += m[:, :2] @ np.array([0.5, 0.5]) - 0.5 - np.array([x0, y0])
    src = cv2.merge([spr, np.ones_like(spr)])
    warped = cv2.warpAffine(src, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    roi = canvas[y0:y1, x0:x1]
    roi *= 1.0 - warped[..., 1]
    roi += warped[..., 0]


def _cover(p: Placement, box: np.ndarray, size: tuple[int, int]) -> tuple[int, int, np.ndarray]:
    """The cell's pixels in the frame as a mask over its window (x0, y0, mask): fillConvexPoly with
    sub-pixel corners; used to measure occlusion before anything is drawn."""
    w, h = size
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    corners = (cell_polygon(p) - 0.5 - np.array([x0, y0])) * 16  # index coordinates, 4 fraction bits
    cv2.fillConvexPoly(mask, np.round(corners).astype(np.int32), 1, lineType=cv2.LINE_8, shift=4)
    return x0, y0, mask.astype(bool)


# ---- the belt, the light ------------------------------------------------------------------------

def _belt_texture(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A dark belt (h, 2w) uint8, periodic in x with period w, so the video can scroll it seamlessly:
    blotches (low-frequency noise), grain, faint horizontal ribs and vertical seams."""
    w, h = size
    k = h / REF_H
    low = rng.normal(0, 6, (max(2, h // 24), max(2, w // 24))).astype(np.float32)
    blotch = cv2.resize(np.tile(low, (1, 3)), (3 * w, h), interpolation=cv2.INTER_CUBIC)[:, w:2 * w]
    grain = cv2.GaussianBlur(rng.normal(0, 5, (h, w)).astype(np.float32), (0, 0), 0.8)
    tex = 34 + blotch + grain
    rib = max(1, round(2 * k))
    for y in range(0, h, max(4, round(24 * k))):
        tex[y:y + rib] += 7
    seam = max(1, round(3 * k))
    for j in range(4):
        x = round(j * w / 4)
        tex[:, x:x + seam] -= 9
    return np.tile(np.clip(tex, 0, 255).astype(np.uint8), (1, 2))


@dataclass(frozen=True)
class Light:
    """Lighting of one scene (or the whole video): a gain map (global gain times a soft linear
    gradient), an offset, a blur and a sensor noise level."""

    gain: np.ndarray
    offset: float
    blur: float
    noise: float


def _light(rng: np.random.Generator, size: tuple[int, int]) -> Light:
    """Random lighting: gain 0.75-1.3, a gradient of up to +-17 % in any direction, offset +-8,
    blur sigma up to 1.2 (none below 0.35), noise sigma 1.5-5 grey levels."""
    w, h = size
    g = rng.uniform(0.75, 1.3)
    amp, phi = rng.uniform(0.0, 0.35), rng.uniform(0, 2 * math.pi)
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :] * (amp * math.cos(phi))
    ys = np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None] * (amp * math.sin(phi))
    blur = rng.uniform(0.0, 1.2)
    return Light((g * (1.0 + xs + ys)).astype(np.float32), rng.uniform(-8, 8), blur if blur > 0.35 else 0.0,
                 rng.uniform(1.5, 5.0))


def _finish(canvas: np.ndarray, light: Light, rng: np.random.Generator, flicker: float = 1.0) -> np.ndarray:
    """Light, blur and noise applied to the composed float frame; returns the BGR uint8 frame."""
    frame = canvas * light.gain
    if flicker != 1.0:
        frame *= flicker
    frame += light.offset
    if light.blur:
        frame = cv2.GaussianBlur(frame, (0, 0), light.blur)
    frame += rng.standard_normal(frame.shape, dtype=np.float32) * light.noise
    return cv2.cvtColor(np.clip(frame, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


# ---- still scenes -------------------------------------------------------------------------------

def _random_placement(rng: np.random.Generator, size: tuple[int, int]) -> Placement:
    """Side 0.35-0.8 of 300 px (at 720 px high), +-15 deg (sometimes +90), mostly inside the frame;
    one in four near an edge, partly outside (kept only if at least half is inside)."""
    w, h = size
    side = max(8, round(CELL * rng.uniform(0.35, 0.8) * h / REF_H))
    angle = rng.uniform(-15, 15) + (90.0 if rng.random() < 0.15 else 0.0)
    p = Placement(0, 0, side, angle, bool(rng.random() < 0.5), rng.uniform(0.85, 1.3))
    e = p.half_extent()
    cx, cy = rng.uniform(e, w - e), rng.uniform(e, h - e)
    if rng.random() < 0.25:
        d = e * rng.uniform(-0.3, 0.9)  # the centre's distance inside the chosen edge
        cx, cy = [(d, cy), (w - d, cy), (cx, d), (cx, h - d)][rng.integers(4)]
    return Placement(cx, cy, side, angle, p.flip, p.gain)


def compose_scene(rng: np.random.Generator, pool: Iterator[Cell], belt: np.ndarray,
                  size: tuple[int, int]) -> tuple[np.ndarray, list[tuple[Cell, np.ndarray]]]:
    """One frame with 2-6 cells: placements are drawn until one keeps every cell >= 50 % inside
    the frame and <= 30 % covered; each accepted cell is warped once. Returns (BGR, [(cell, box)])."""
    w, h = size
    off = int(rng.integers(w))
    canvas = belt[:, off:off + w].astype(np.float32) * rng.uniform(0.8, 1.2)
    if rng.random() < 0.5:
        canvas = canvas[::-1].copy()
    owner = np.zeros((h, w), np.int16)  # which placed cell (1-based) is on top at each pixel
    full: list[int] = []  # each placed cell's in-frame pixels, and how many of them are still seen
    seen: list[int] = []
    placed: list[tuple[Cell, np.ndarray]] = []
    want, tries = int(rng.integers(2, 7)), 0
    while len(placed) < want and tries < 60:
        tries += 1
        p = _random_placement(rng, size)
        box, frac = visible_box(p, size)
        if box is None or frac < MIN_VISIBLE:
            continue
        x0, y0, mask = _cover(p, box, size)
        win = owner[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        hit = np.bincount(win[mask], minlength=len(placed) + 1)[1:]
        if any(s - c < (1 - MAX_OCCLUDED) * f for s, c, f in zip(seen, hit, full)) or not mask.any():
            continue
        seen = [s - int(c) for s, c in zip(seen, hit)]
        win[mask] = len(placed) + 1
        full.append(int(mask.sum()))
        seen.append(full[-1])
        cell = next(pool)
        draw_cell(canvas, sprite(_read_cell(cell), p), p, box)
        placed.append((cell, box))
    return _finish(canvas, _light(rng, size), rng), placed


def _coco_box(box: np.ndarray) -> list[float]:
    """xyxy -> COCO [x, y, w, h], rounded to 1/100 px (from the rounded corners, so x + w stays in frame)."""
    x1, y1, x2, y2 = (round(float(v), 2) for v in box)
    return [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)]


def _write_split(root: Path, split: str, cells: list[Cell], n: int, seed: int, size: tuple[int, int],
                 belt: np.ndarray, progress: Callable[[str], None]) -> dict:
    """Compose ``n`` scenes of one split's cells; JPEGs under images/SPLIT/, returns the COCO dict."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    pool = _pool(cells, rng)
    folder = root / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        frame, placed = compose_scene(rng, pool, belt, size)
        ok, jpg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise EdgetlError("OpenCV could not encode a JPEG")
        (folder / f"{i:06d}.jpg").write_bytes(jpg.tobytes())
        images.append({"id": i, "file_name": f"images/{split}/{i:06d}.jpg", "width": size[0], "height": size[1]})
        for cell, box in placed:
            bbox = _coco_box(box)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": CLASSES.index(cell.label) + 1,
                         "bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0, "cell": cell.name})
        if i % 50 == 0 or i == n:
            progress(f"scenes {split}: {i}/{n}")
    return {"info": {"description": f"edgetl composed conveyor scenes ({split}); objects are real ELPV cells"},
            "images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": c, "supercategory": "cell"} for k, c in enumerate(CLASSES)]}


# ---- the conveyor video -------------------------------------------------------------------------

@dataclass(frozen=True)
class Mover:
    """A cell riding the belt: enters (its box's right edge at x = 0) at time t0, speed v px/s."""

    lane: float
    t0: float
    v: float
    place: Placement  # cx unused: the centre's x is -half_extent + v * (t - t0)

    def at(self, t: float) -> Placement:
        """Where the cell is at time t (s): its GT box is computed from this, as it is drawn."""
        p = self.place
        return Placement(-p.half_extent() + self.v * (t - self.t0), self.lane, p.side, p.angle, p.flip, p.gain)


def schedule(rng: np.random.Generator, size: tuple[int, int], seconds: float) -> list[Mover]:
    """Three lanes of cells crossing the frame in about 5 s; speeds differ by up to +-6 %, so each
    cell starts only once it can never catch up with the one ahead in its lane. Cells are sized so
    that lanes never touch: the video has no occlusion and its tracks are unambiguous. The belt is
    already populated at t = 0 (the first cell of a lane entered up to one crossing earlier)."""
    w, h = size
    base = w / 5.0
    gap = 0.06 * w
    movers: list[Mover] = []
    for lane in (h / 6, h / 2, 5 * h / 6):
        prev: Mover | None = None
        while True:
            side = max(8, round(h * rng.uniform(0.19, 0.25)))
            angle = rng.uniform(-8, 8) + (90.0 if rng.random() < 0.15 else 0.0)
            place = Placement(0, 0, side, angle, bool(rng.random() < 0.5), rng.uniform(0.85, 1.3))
            v, e = base * rng.uniform(0.94, 1.06), place.half_extent()
            if prev is None:
                t0 = -rng.uniform(0.0, (w + 2 * e) / v)
            else:
                pe = prev.place.half_extent()
                clear = prev.t0 + (gap + 2 * pe) / prev.v  # the one ahead is gap past the left edge
                exit_ = prev.t0 + (w + 2 * pe) / prev.v  # ... and leaves; we must then still be gap behind
                t0 = max(clear, exit_ - (w - gap) / v) + rng.uniform(0.0, 1.2)
            if t0 >= seconds:
                break
            prev = Mover(lane + h * rng.uniform(-0.02, 0.02), t0, v, place)
            movers.append(prev)
    return sorted(movers, key=lambda m: m.t0)


def _crossings(per_frame: list[list[dict]], line_x: float) -> dict[int, int]:
    """id -> the frame at which its box centre first reaches the line (from the left)."""
    last: dict[int, float] = {}
    crossed: dict[int, int] = {}
    for f, entries in enumerate(per_frame):
        for e in entries:
            c = (e["box"][0] + e["box"][2]) / 2
            if e["id"] in last and last[e["id"]] < line_x <= c and e["id"] not in crossed:
                crossed[e["id"]] = f
            last[e["id"]] = c
    return crossed


def write_video(root: Path, cells: list[Cell], seed: int, size: tuple[int, int], seconds: float, fps: float,
                belt: np.ndarray, progress: Callable[[str], None]) -> dict:
    """conveyor.mp4 (mp4v, as edgetl.conveyor writes) and conveyor_gt.json; returns the GT dict.
    The belt texture scrolls with the belt; the light is fixed with a slight flicker."""
    from ..conveyor import FOURCC

    w, h = size
    rng = np.random.default_rng([seed, len(SPLITS)])
    movers = schedule(rng, size, seconds)
    pool = _pool(cells, rng)
    light = _light(rng, size)
    frames = max(1, int(round(seconds * fps)))
    path = root / "conveyor.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*FOURCC[".mp4"]), fps, (w, h))
    if not writer.isOpened():
        raise EdgetlError(f"{path}: OpenCV cannot write this video format here")
    ids: dict[int, int] = {}  # mover index -> object id, in order of first appearance
    objects, per_frame, sprites = [], [], {}
    try:
        for f in range(frames):
            t = f / fps
            shift = (w - int(round(w / 5.0 * t)) % w) % w  # the belt moves right at the base speed
            canvas = belt[:, shift:shift + w].astype(np.float32)
            entries = []
            for k, m in enumerate(movers):
                p = m.at(t)
                box, frac = visible_box(p, size)
                if box is None:
                    sprites.pop(k, None)
                    continue
                if k not in ids:
                    ids[k] = len(ids) + 1
                    cell = next(pool)
                    objects.append({"id": ids[k], "label": cell.label, "cell": cell.name})
                    sprites[k] = sprite(_read_cell(cell), m.place)
                draw_cell(canvas, sprites[k], p, box)
                x1, y1, x2, y2 = (round(float(v), 2) for v in box)
                entries.append({"id": ids[k], "box": [x1, y1, x2, y2], "label": objects[ids[k] - 1]["label"],
                                "visible": round(frac, 3), "ignore": bool(frac < MIN_VISIBLE)})
            per_frame.append(entries)
            writer.write(_finish(canvas, light, rng, 1.0 + 0.015 * math.sin(2 * math.pi * t / 3.0)))
            if (f + 1) % 150 == 0 or f + 1 == frames:
                progress(f"video: {f + 1}/{frames} frames")
    finally:
        writer.release()
    line_x = w / 2
    crossed = _crossings(per_frame, line_x)
    counts = {c: sum(1 for i in crossed if objects[i - 1]["label"] == c) for c in CLASSES}
    return {"fps": fps, "frames": frames, "size": [w, h], "line": [line_x, 0, line_x, h],
            "objects": objects, "expected_counts": counts,
            "crossings": [{"id": i, "frame": crossed[i]} for i in sorted(crossed)], "per_frame": per_frame}


# ---- the output folder ---------------------------------------------------------------------------

def _readme(summary: dict, pools: dict[str, list[Cell]]) -> str:
    """What a reader of the folder must know: the layout is synthetic, the cells are real (cited),
    and which cells are held out (val and test named here; every cell's split is in cells.json)."""
    import textwrap

    lines = [
        "edgetl composed conveyor scenes (object detection)",
        "",
        "The LAYOUT is synthetic: the belt, the placement, the lighting, the blur, the noise and the",
        f"video's motion were generated by edgetl.detect.scenes (seed {summary['seed']}). The OBJECTS are real:",
        "every cell is an image (resized, rotated, mirrored, brightness scaled, otherwise unmodified) from the",
        *textwrap.wrap(ELPV_CITATION, 100),
        "Classes as `edgetl data elpv --task binary`: defective = defect probability >= 0.5, else functional.",
        "Boxes are exact (computed from the transform that placed each cell): the axis-aligned bound of the",
        "rotated cell clipped to the frame. A cell less than half in the frame is not drawn; at most 30 % of",
        "a cell is covered by others.",
        "",
        "train.json, val.json, test.json: COCO instances, file_name relative to this folder.",
        "conveyor.mp4 + conveyor_gt.json: test cells only; per-frame boxes, the counting line, the",
        "expected count per class of cells whose box centre crosses it. Entries with ignore=true are",
        "cells less than half in the frame (entering or leaving): not scored as detections.",
        "",
        "The cells were split BEFORE composing (no cell in two splits): " + summary["cell_split"] + ".",
        "cells.json lists every cell with its source file and split.",
    ]
    for s in SPLITS:
        counts = {c: sum(1 for x in pools[s] if x.label == c) for c in CLASSES}
        lines.append(f"  {s}: {len(pools[s])} cells ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    for s in ("val", "test"):
        lines += ["", f"{s} cells:"] + textwrap.wrap(" ".join(c.name for c in pools[s]), 100)
    return "\n".join(lines) + "\n"


def _cells_json(cells_root: Path, pools: dict[str, list[Cell]], seed: int, run: Path | None) -> dict:
    """The record that proves the split: each cell's source file (relative to cells_root) and split."""
    rows = sorted(((c, s) for s in SPLITS for c in pools[s]), key=lambda cs: cs[0].name)
    return {"source": ELPV_CITATION, "cells_root": str(cells_root), "seed": seed,
            "from_run": str(run) if run is not None else None,
            "cells": [{"cell": c.name, "file": c.rel, "label": c.label, "defect_probability": c.prob,
                       "cell_type": c.kind, "split": s} for c, s in rows]}


def write_scenes(out: Path, *, cells_root: Path | None = None, run: Path | None = None, seed: int = 0,
                 train_scenes: int = 300, val_scenes: int = 60, test_scenes: int = 60,
                 size: tuple[int, int] = (1280, 720), video_seconds: float = 40.0, fps: float = 15.0,
                 overwrite: bool = False, progress: Callable[[str], None] | None = print) -> dict:
    """Write the scenes, the video and their ground truth to ``out`` (layout: the module's doc).

    ``cells_root``: the ELPV cells (default: the installed elpv-dataset package); ``run``: a
    classification run whose split.json gives the cell pools (else a seeded stratified split).
    Built in a hidden folder beside ``out`` and renamed when complete: an error or Ctrl-C leaves
    no ``out``. Returns the summary (also written as scenes.json)."""
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    w, h = (int(v) for v in size)
    if w < 64 or h < 64:
        raise EdgetlError(f"frame size {w}x{h} is too small", hint="use at least 64x64")
    if min(train_scenes, val_scenes, test_scenes) < 0 or train_scenes + val_scenes + test_scenes == 0:
        raise EdgetlError("the scene counts must be >= 0 and not all 0")
    if fps <= 0 or video_seconds < 0:
        raise EdgetlError(f"fps ({fps}) must be > 0 and video seconds ({video_seconds}) >= 0")
    cells = load_cells(cells_root)
    pools = split_cells(cells, seed, run)
    if cells_root is None:
        from ..datasets import elpv_root

        cells_root = elpv_root()
    out = Path(out)
    from ..artifact import new_folder

    with new_folder(out, overwrite=overwrite) as tmp:
        say("cells: " + ", ".join(f"{s} {len(pools[s])}" for s in SPLITS) + f"; writing into {tmp.name}")
        belt = _belt_texture(np.random.default_rng([seed, 99]), (w, h))
        how = (f"from {run}/split.json" if run is not None else
               f"stratified per class (val {FRACTIONS['val']}, test {FRACTIONS['test']}), seed {seed}: the split "
               f"`edgetl train --split-seed {seed}` makes of an `edgetl data elpv` folder")
        summary: dict = {"seed": seed, "size": [w, h], "scenes": {}, "boxes": {}, "cells": {}, "cell_split": how}
        for split, n in zip(SPLITS, (train_scenes, val_scenes, test_scenes)):
            coco = _write_split(tmp, split, pools[split], n, seed, (w, h), belt, say)
            (tmp / f"{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
            summary["scenes"][split] = n
            summary["boxes"][split] = {c: sum(1 for a in coco["annotations"] if a["category_id"] == k + 1)
                                       for k, c in enumerate(CLASSES)}
            summary["cells"][split] = {c: sum(1 for x in pools[split] if x.label == c) for c in CLASSES}
        summary["video"] = None
        if video_seconds > 0:
            gt = write_video(tmp, pools["test"], seed, (w, h), video_seconds, fps, belt, say)
            (tmp / "conveyor_gt.json").write_text(json.dumps(gt, separators=(",", ":")))
            summary["video"] = {"frames": gt["frames"], "fps": fps, "objects": len(gt["objects"]),
                                "crossing": gt["expected_counts"]}
        (tmp / "cells.json").write_text(json.dumps(_cells_json(Path(cells_root), pools, seed, run), indent=1))
        (tmp / "README.txt").write_text(_readme(summary, pools))
        (tmp / MARKER).write_text(json.dumps(summary, indent=1))
    summary["out"] = str(out)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


__all__ = ["CLASSES", "Cell", "Placement", "compose_scene", "draw_cell", "load_cells", "schedule", "split_cells",
           "sprite", "visible_box", "write_scenes", "write_video"]
