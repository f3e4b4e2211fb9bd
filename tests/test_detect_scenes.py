"""Composed conveyor scenes (edgetl.detect.scenes): splits, exact boxes, COCO, the video's ground
truth, determinism and the all-or-nothing output folder. Small sizes; 20 real ELPV cells."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("elpv_dataset")

from edgetl.detect import scenes  # noqa: E402
from edgetl.runtime.errors import EdgetlError  # noqa: E402

SMALL = dict(seed=3, train_scenes=6, val_scenes=2, test_scenes=2, size=(320, 180), video_seconds=2.0, fps=5.0,
             progress=None)
JSONS = ("train.json", "val.json", "test.json", "conveyor_gt.json", "cells.json", "scenes.json")


@pytest.fixture(scope="module")
def cells_root(tmp_path_factory) -> Path:
    """10 defective and 10 functional ELPV cells in the package's own layout (labels.csv + images/)."""
    from edgetl.datasets import elpv_root, read_elpv_labels

    src = elpv_root()
    rows = read_elpv_labels(src)
    pick = [r for r in rows if r[1] >= 0.5][:10] + [r for r in rows if r[1] < 0.5][:10]
    root = tmp_path_factory.mktemp("cells")
    (root / "images").mkdir()
    for rel, _, _ in pick:
        shutil.copyfile(src / rel, root / rel)
    (root / "labels.csv").write_text("".join(f"{rel}  {p}  {kind}\n" for rel, p, kind in pick))
    return root


@pytest.fixture(scope="module")
def written(cells_root, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sc") / "scenes"
    return out, scenes.write_scenes(out, cells_root=cells_root, **SMALL)


def _load(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def test_no_cell_in_two_splits(written):
    out, summary = written
    cells = _load(out, "cells.json")["cells"]
    split_of = {c["cell"]: c["split"] for c in cells}
    assert len(split_of) == len(cells) == 20
    assert {s: sum(1 for c in cells if c["split"] == s) for s in scenes.SPLITS} == {"train": 12, "val": 4, "test": 4}
    for s in scenes.SPLITS:
        used = {a["cell"] for a in _load(out, f"{s}.json")["annotations"]}
        assert used and all(split_of[c] == s for c in used)
    assert all(split_of[o["cell"]] == "test" for o in _load(out, "conveyor_gt.json")["objects"])
    assert summary["scenes"] == {"train": 6, "val": 2, "test": 2}
    readme = (out / "README.txt").read_text()
    assert "synthetic" in readme and "Deitsch" in readme and "test: 4 cells" in readme


def test_coco_is_valid_and_boxes_lie_in_the_frame(written):
    out, summary = written
    for s in scenes.SPLITS:
        coco = _load(out, f"{s}.json")
        assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "defective"), (2, "functional")]
        images = {im["id"]: im for im in coco["images"]}
        assert len(images) == summary["scenes"][s]
        for im in images.values():
            assert cv2.imread(str(out / im["file_name"])).shape == (180, 320, 3)
        per_image = {i: 0 for i in images}
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            assert a["image_id"] in images and a["iscrowd"] == 0 and a["category_id"] in (1, 2)
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 320 + 1e-6 and y + h <= 180 + 1e-6
            per_image[a["image_id"]] += 1
        assert all(1 <= n <= 6 for n in per_image.values())
        counts = {c: sum(1 for a in coco["annotations"] if a["category_id"] == k + 1)
                  for k, c in enumerate(scenes.CLASSES)}
        assert counts == summary["boxes"][s]


def test_read_detection_reads_the_scenes(written):
    data = pytest.importorskip("edgetl.detect.data")
    if not hasattr(data, "read_detection"):
        pytest.skip("edgetl.detect.data.read_detection is not there yet")
    out, summary = written
    ds = data.read_detection(out / "train.json")
    assert tuple(ds.class_names) == scenes.CLASSES and len(ds.images) == 6
    assert sum(len(im.boxes) for im in ds.images) == sum(summary["boxes"]["train"].values())


@pytest.mark.parametrize("cx,cy,angle,side", [(150.3, 90.7, 0.0, 100), (160.0, 95.5, 12.3, 90),
                                              (140.6, 88.2, 90 - 7.5, 110), (20.0, 90.0, -11.0, 80),
                                              (300.4, 170.1, 4.0, 70)])
def test_box_is_where_the_cell_pixels_are(cells_root, cx, cy, angle, side):
    """Drawn on black without light or noise, the cell's non-zero pixels span its box (+-1.5 px),
    also when the frame clips it."""
    img = cv2.imread(str(next((cells_root / "images").iterdir())), cv2.IMREAD_GRAYSCALE)
    img = np.maximum(img, 1)  # geometry under test: a black pixel of the cell would look like background
    p = scenes.Placement(cx, cy, side, angle, flip=True)
    box, frac = scenes.visible_box(p, (320, 180))
    canvas = np.zeros((180, 320), np.float32)
    scenes.draw_cell(canvas, scenes.sprite(img, p), p, box)
    ys, xs = np.nonzero(canvas > 0)
    drawn = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    assert np.abs(drawn - box).max() <= 1.5, (drawn, box)
    assert 0 <= box[0] < box[2] <= 320 and 0 <= box[1] < box[3] <= 180
    inside = (box[2] - box[0]) * (box[3] - box[1]) < (side * 1.5) ** 2
    assert inside and 0 < frac <= 1
    # sub-pixel: a white cell's coverage has the visible area, and (unclipped) its centroid is the centre
    cover = np.zeros((180, 320), np.float32)
    scenes.draw_cell(cover, np.ones((side, side), np.float32), p, box)
    assert cover.sum() == pytest.approx(frac * side * side, rel=0.01)
    if frac == pytest.approx(1.0):
        ys, xs = np.mgrid[0:180, 0:320] + 0.5
        centroid = np.array([(xs * cover).sum(), (ys * cover).sum()]) / cover.sum()
        assert np.abs(centroid - [cx, cy]).max() < 0.05, centroid


def test_video_frames_and_tracks(written):
    out, summary = written
    gt = _load(out, "conveyor_gt.json")
    cap = cv2.VideoCapture(str(out / "conveyor.mp4"))
    n = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (180, 320, 3)
        n += 1
    assert n == gt["frames"] == len(gt["per_frame"]) == 10 == summary["video"]["frames"]
    assert gt["line"] == [160.0, 0, 160.0, 180]
    centres: dict[int, list[float]] = {}
    for f, entries in enumerate(gt["per_frame"]):
        for e in entries:
            x1, y1, x2, y2 = e["box"]
            assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 180
            assert e["ignore"] == (e["visible"] < 0.5)
            centres.setdefault(e["id"], []).append((x1 + x2) / 2)
    assert set(centres) == {o["id"] for o in gt["objects"]} and len(centres) >= 3
    crossed = {}
    for i, cs in centres.items():
        assert all(b > a for a, b in zip(cs, cs[1:])), f"object {i} does not move right"
        n_cross = sum(1 for a, b in zip(cs, cs[1:]) if a < 160 <= b)
        assert n_cross <= 1
        crossed[i] = n_cross
    label = {o["id"]: o["label"] for o in gt["objects"]}
    expected = {c: sum(n for i, n in crossed.items() if label[i] == c) for c in scenes.CLASSES}
    assert gt["expected_counts"] == expected == summary["video"]["crossing"]
    assert sum(expected.values()) >= 1


def test_same_seed_same_json(written, cells_root, tmp_path):
    out, _ = written
    again = tmp_path / "again"
    scenes.write_scenes(again, cells_root=cells_root, **SMALL)
    for name in JSONS:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    other = tmp_path / "other"
    scenes.write_scenes(other, cells_root=cells_root, **{**SMALL, "seed": 4, "video_seconds": 0})
    assert (other / "train.json").read_bytes() != (out / "train.json").read_bytes()
    assert not (other / "conveyor.mp4").exists()


def test_interrupted_write_leaves_nothing(cells_root, tmp_path):
    calls = []

    def boom(msg):
        calls.append(msg)
        if msg.startswith("scenes val"):
            raise KeyboardInterrupt

    out = tmp_path / "scenes"
    with pytest.raises(KeyboardInterrupt):
        scenes.write_scenes(out, cells_root=cells_root, **{**SMALL, "progress": boom})
    assert calls and not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial folder, no lock


def test_overwrite_rules(written, cells_root, tmp_path):
    out = tmp_path / "scenes"
    small = {**SMALL, "train_scenes": 1, "val_scenes": 1, "test_scenes": 1, "video_seconds": 0}
    scenes.write_scenes(out, cells_root=cells_root, **small)
    with pytest.raises(EdgetlError, match="already exists"):
        scenes.write_scenes(out, cells_root=cells_root, **small)
    info = scenes.write_scenes(out, cells_root=cells_root, **{**small, "train_scenes": 2, "overwrite": True})
    assert info["scenes"]["train"] == 2 and len(list((out / "images" / "train").iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(EdgetlError):
        scenes.write_scenes(foreign, cells_root=cells_root, **{**small, "overwrite": True})
    assert (foreign / "keep.txt").exists()


def test_cell_pools_from_a_run(cells_root, tmp_path):
    names = sorted(p.name for p in (cells_root / "images").iterdir())
    cells = {c.name: c for c in scenes.load_cells(cells_root)}
    want = {"train": names[:4] + names[10:14], "val": names[4:7] + names[14:17], "test": names[7:10] + names[17:]}
    run = tmp_path / "run"
    run.mkdir()
    split = {"root": "/data/elpv", "seed": 0,
             "splits": {s: [{"path": f"{cells[n].label}/{n}", "label": cells[n].label} for n in v]
                        for s, v in want.items()}}
    (run / "split.json").write_text(json.dumps(split))
    out = tmp_path / "scenes"
    scenes.write_scenes(out, cells_root=cells_root, run=run,
                        **{**SMALL, "train_scenes": 2, "val_scenes": 1, "test_scenes": 1, "video_seconds": 0})
    got = {s: sorted(c["cell"] for c in _load(out, "cells.json")["cells"] if c["split"] == s) for s in want}
    assert got == want
    split["splits"]["test"].append({"path": "defective/not_a_cell.png", "label": "defective"})
    (run / "split.json").write_text(json.dumps(split))
    with pytest.raises(EdgetlError, match="not ELPV cells"):
        scenes.write_scenes(tmp_path / "x", cells_root=cells_root, run=run, **SMALL)
    assert not (tmp_path / "x").exists()
