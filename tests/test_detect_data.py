"""The detection data layer (edgetl/detect/data.py, edgetl/detect/trees.py): readers, validation,
tiling, group-aware split, split.json, and the real deepforest tree crowns. Tiny generated data."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgetl.detect import data as D
from edgetl.detect.data import DetDataset, DetImage
from edgetl.runtime.errors import EdgetlError, MissingDependencyError

NAMES = ("disc", "square")
# name -> (width, height, [(x1, y1, x2, y2, class)]) in continuous pixel coordinates
SCENE = {
    "a.png": (64, 48, [(4, 6, 20, 30, 0), (30, 10, 60, 40, 1)]),
    "b.png": (64, 48, [(10, 10, 30, 20, 1)]),
    "c.png": (40, 40, []),  # a negative
}


def _pixels(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def write_images(folder: Path, scene=SCENE) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, (name, (w, h, _)) in enumerate(sorted(scene.items())):
        cv2.imwrite(str(folder / name), _pixels(w, h, k))
        out[name] = folder / name
    return out


def det_images(paths: dict[str, Path], root: Path, scene=SCENE) -> list[DetImage]:
    out = []
    for name, (w, h, objs) in sorted(scene.items()):
        boxes = np.asarray([o[:4] for o in objs], dtype=np.float32).reshape(-1, 4)
        classes = np.asarray([o[4] for o in objs], dtype=np.int64)
        out.append(DetImage(paths[name].resolve(), w, h, boxes, classes, None, paths[name].relative_to(root).as_posix()))
    return out


def write_coco_set(root: Path, scene=SCENE) -> Path:
    paths = write_images(root / "images", scene)
    return D.write_coco(det_images(paths, root, scene), NAMES, root / "instances.json", root)


def voc_xml(filename: str, w: int, h: int, objs, doctype: str = "") -> str:
    objects = "".join(
        f"<object><name>{name}</name><difficult>{d}</difficult><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>" for x1, y1, x2, y2, name, d in objs)
    return (f"{doctype}<annotation><filename>{filename}</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")


def write_voc_set(root: Path, scene=SCENE) -> Path:
    write_images(root, scene)
    for name, (w, h, objs) in scene.items():
        rows = [(x1, y1, x2, y2, NAMES[c], 0) for x1, y1, x2, y2, c in objs]
        (root / Path(name).with_suffix(".xml")).write_text(voc_xml(name, w, h, rows))
    return root


def write_yolo_set(root: Path, scene=SCENE, sub: str = "") -> Path:
    write_images(root / "images" / sub, scene)
    (root / "labels" / sub).mkdir(parents=True, exist_ok=True)
    for name, (w, h, objs) in scene.items():
        lines = [f"{c} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}"
                 for x1, y1, x2, y2, c in objs]
        (root / "labels" / sub / Path(name).with_suffix(".txt")).write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return root


def by_name(ds: DetDataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {im.path.name: (im.boxes, im.classes) for im in ds.images}


def _raises(fn, *words):
    with pytest.raises(EdgetlError) as err:
        fn()
    text = str(err.value)
    for w in words:
        assert w in text, text
    return err.value


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------

def test_three_formats_give_the_same_boxes(tmp_path):
    sets = {"coco": write_coco_set(tmp_path / "coco").parent, "voc": write_voc_set(tmp_path / "voc"),
            "yolo": write_yolo_set(tmp_path / "yolo")}
    for fmt, folder in sets.items():
        ds = D.read_detection(folder)  # auto-detected
        assert ds.format == fmt and ds.class_names == NAMES
        got = by_name(ds)
        assert sorted(got) == sorted(SCENE)
        for name, (w, h, objs) in SCENE.items():
            boxes, classes = got[name]
            assert boxes.dtype == np.float32 and classes.dtype == np.int64
            np.testing.assert_allclose(boxes, np.asarray([o[:4] for o in objs], np.float32).reshape(-1, 4), atol=1e-3)
            assert classes.tolist() == [o[4] for o in objs]
        im = next(i for i in ds.images if i.path.name == "a.png")
        assert (im.width, im.height, im.window) == (64, 48, None) and im.path.is_absolute()
        r = ds.report
        assert r["images"] == 3 and r["boxes"] == 3 and r["boxes_per_class"] == {"disc": 1, "square": 2}
        assert r["negatives"]["count"] == 1 and r["negatives"]["list"][0]["path"].endswith("c.png")
        json.dumps(r)  # JSON-able
    assert D.read_detection(sets["coco"] / "instances.json").format == "coco"
    assert D.read_detection(sets["voc"], fmt="voc").format == "voc"


def test_voc_is_one_based_inclusive(tmp_path):
    write_images(tmp_path, {"a.png": (20, 20, [])})
    (tmp_path / "a.xml").write_text("<annotation><filename>a.png</filename><object><name>x</name><bndbox><xmin>1</xmin>"
                                    "<ymin>1</ymin><xmax>10</xmax><ymax>5</ymax></bndbox></object></annotation>")
    ds = D.read_detection(tmp_path)
    assert ds.images[0].boxes.tolist() == [[0.0, 0.0, 10.0, 5.0]]  # pixels 1..10 of VOC = columns 0..9
    assert "xmin-1" in ds.report["box_convention"]


def test_voc_layouts_difficult_and_stem(tmp_path):
    write_images(tmp_path / "JPEGImages", {"p.png": (30, 30, []), "q.png": (30, 30, [])})
    (tmp_path / "Annotations").mkdir()
    rows = [(2, 2, 10, 10, "cat", 1), (12, 12, 20, 20, "cat", 0)]
    (tmp_path / "Annotations" / "p.xml").write_text(voc_xml("p.png", 30, 30, rows))
    (tmp_path / "Annotations" / "q.xml").write_text(voc_xml("q.jpg", 30, 30, rows[1:]))  # found by stem: q.png
    ds = D.read_detection(tmp_path)
    assert ds.format == "voc" and sorted(by_name(ds)) == ["p.png", "q.png"]
    assert ds.report["difficult"]["count"] == 1 and ds.report["boxes"] == 3  # difficult kept as a normal box


def test_coco_sparse_ids_and_images_folder(tmp_path):
    write_images(tmp_path / "images", {"a.png": (32, 32, [])})
    coco = {"images": [{"id": 5, "file_name": "a.png", "width": 32, "height": 32}],
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 5, "category_id": 7, "bbox": [1, 2, 10, 5]},
                            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [0, 0, 4, 4]},
                            {"id": 3, "image_id": 5, "category_id": 3, "bbox": [5, 5, 9, 9], "iscrowd": 1}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    ds = D.read_detection(tmp_path)
    assert ds.class_names == ("cat", "dog")  # sorted-id order: 3, 7
    im = ds.images[0]
    assert im.boxes.tolist() == [[1, 2, 11, 7], [0, 0, 4, 4]] and im.classes.tolist() == [1, 0]
    assert ds.report["crowd"]["count"] == 1


def test_yolo_names_from_yaml_and_split_hint(tmp_path):
    root = write_yolo_set(tmp_path / "y", sub="train")
    write_yolo_set(tmp_path / "y", {"v.png": (32, 32, [(2, 2, 12, 12, 1)])}, sub="val")
    (root / "classes.txt").unlink()
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: disc\n  1: square\n")
    ds = D.read_detection(root)
    assert ds.class_names == NAMES and len(ds.images) == 4
    assert ds.report["split_hint"] == {"images/train/a.png": "train", "images/train/b.png": "train",
                                       "images/train/c.png": "train", "images/val/v.png": "val"}
    assert D._yaml_names(root / "data.yaml", use_pyyaml=False) == NAMES  # the hand parser, used without PyYAML
    for text in ("names: ['disc', \"square\"]  # two\n", "names:\n- disc\n- square\nnc: 2\n", "names: {0: disc, 1: square}\n"):
        (root / "data.yaml").write_text(text)
        assert D._yaml_names(root / "data.yaml", use_pyyaml=False) == NAMES, text
        assert D._yaml_names(root / "data.yaml") == NAMES, text
    (root / "data.yaml").write_text("nc: 2\n")
    _raises(lambda: D._yaml_names(root / "data.yaml", use_pyyaml=False), "data.yaml", "names")


def test_yolo_missing_label_is_negative_and_orphan_label_listed(tmp_path):
    root = write_yolo_set(tmp_path)
    (root / "labels" / "b.txt").unlink()
    (root / "labels" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    ds = D.read_detection(root)
    r = ds.report
    assert r["no_label_file"]["count"] == 1 and r["negatives"]["count"] == 2
    assert r["missing_images"]["count"] == 1 and r["missing_images"]["list"][0]["annotation"] == "labels/ghost.txt"


# ---------------------------------------------------------------------------------------------
# bad input: the documented behaviour or error
# ---------------------------------------------------------------------------------------------

def test_malformed_json_names_file_and_line(tmp_path):
    (tmp_path / "bad.json").write_text('{"images": [\n  {"id": 1,\n')
    _raises(lambda: D.read_detection(tmp_path / "bad.json"), "bad.json", "line 3", "malformed JSON")
    _raises(lambda: D.read_detection(tmp_path), "bad.json", "malformed JSON")  # the folder's only candidate
    (tmp_path / "bad.json").write_text('{"images": []}')
    _raises(lambda: D.read_detection(tmp_path / "bad.json"), "not a COCO instances file")


def test_unknown_classes_are_dropped_counted_listed(tmp_path):
    coco = write_coco_set(tmp_path / "coco")
    data = json.loads(coco.read_text())
    data["annotations"].append({"id": 99, "image_id": 1, "category_id": 42, "bbox": [1, 1, 5, 5]})
    coco.write_text(json.dumps(data))
    r = D.read_detection(coco).report
    assert r["unknown_classes"]["count"] == 1 and r["unknown_classes"]["names"] == ["42"] and r["boxes"] == 3

    yolo = write_yolo_set(tmp_path / "yolo")
    (yolo / "labels" / "b.txt").write_text("1 0.3 0.3 0.2 0.2\n5 0.5 0.5 0.1 0.1\n")
    r = D.read_detection(yolo).report
    assert r["unknown_classes"]["count"] == 1 and r["unknown_classes"]["list"][0]["annotation"] == "b.txt, line 2"

    voc = write_voc_set(tmp_path / "voc")
    (voc / "classes.txt").write_text("disc\n")  # a fixed class list: square is unknown
    ds = D.read_detection(voc)
    assert ds.class_names == ("disc",) and ds.report["unknown_classes"]["count"] == 2
    assert ds.report["unknown_classes"]["names"] == ["square"]


def test_boxes_outside_zero_area_and_small(tmp_path):
    write_images(tmp_path / "images", {"a.png": (64, 48, [])})
    bboxes = [[-5, -5, 20, 20], [100, 100, 10, 10], [5, 5, 0, 10], [10, 10, 1.5, 10], [30, 30, 10, 10]]
    coco = {"images": [{"id": 1, "file_name": "images/a.png"}], "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": i, "image_id": 1, "category_id": 1, "bbox": b} for i, b in enumerate(bboxes)]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    ds = D.read_detection(tmp_path)
    r = ds.report
    assert r["clipped"]["count"] == 1 and r["outside"]["count"] == 1 and r["degenerate"]["count"] == 1
    assert r["small_boxes"]["count"] == 1
    assert ds.images[0].boxes.tolist() == [[0, 0, 15, 15], [10, 10, 11.5, 20], [30, 30, 40, 40]]


def test_missing_unreadable_and_duplicate_images(tmp_path):
    root = write_voc_set(tmp_path)
    shutil.copyfile(root / "a.png", root / "a_copy.png")
    (root / "a_copy.xml").write_text(voc_xml("a_copy.png", 64, 48, [(1, 1, 9, 9, "disc", 0)]))
    (root / "ghost.xml").write_text(voc_xml("ghost.png", 64, 48, [(1, 1, 9, 9, "disc", 0)]))
    (root / "broken.png").write_bytes(b"not an image at all")
    (root / "broken.xml").write_text(voc_xml("broken.png", 64, 48, [(1, 1, 9, 9, "disc", 0)]))
    ds = D.read_detection(root)
    r = ds.report
    assert sorted(by_name(ds)) == ["a.png", "b.png", "c.png"]
    assert r["duplicates"]["count"] == 1 and r["duplicates"]["list"][0] == {"path": "a_copy.png", "same_as": "a.png",
                                                                           "boxes_dropped": 1}
    missing = {e["path"]: e["reason"] for e in r["missing_images"]["list"]}
    assert missing["ghost.png"] == "missing file" and "broken.png" in missing and r["missing_images"]["count"] == 2


def test_report_lists_are_capped(tmp_path):
    write_images(tmp_path / "images", {"a.png": (20, 20, [])})
    anns = [{"id": i, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]} for i in range(30)]
    anns.append({"id": 100, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]})
    (tmp_path / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": anns,
                                                 "categories": [{"id": 1, "name": "x"}]}))
    section = D.read_detection(tmp_path).report["unknown_classes"]
    assert section["count"] == 30 and len(section["list"]) == D.LIST_CAP and section["more"] == 10


def test_bad_yolo_lines(tmp_path):
    root = write_yolo_set(tmp_path)
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2\n")
    _raises(lambda: D.read_detection(root), "a.txt, line 2", "5 numbers")
    (root / "labels" / "a.txt").write_text("0 x 0.5 0.2 0.2\n")
    _raises(lambda: D.read_detection(root), "a.txt, line 1", "not 5 numbers")
    (root / "labels" / "a.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5\n")
    assert "polygon" in _raises(lambda: D.read_detection(root), "line 1").hint


def test_voc_doctype_and_entities_refused(tmp_path):
    write_images(tmp_path, {"a.png": (20, 20, [])})
    bomb = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>\n'
            "<annotation><filename>a.png</filename><object><name>&lol2;</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
            "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    (tmp_path / "a.xml").write_text(bomb)
    err = _raises(lambda: D.read_detection(tmp_path), "a.xml", "DOCTYPE", "billion laughs")
    assert "remove" in err.hint
    (tmp_path / "a.xml").write_bytes(bomb.replace('version="1.0"', 'version="1.0" encoding="UTF-16"').encode("utf-16"))
    _raises(lambda: D.read_detection(tmp_path), "a.xml", "DOCTYPE")  # not visible to a byte search: expat refuses it
    (tmp_path / "a.xml").write_text("<annotation><filename>a.png</filename>\n<object></annotation>")
    _raises(lambda: D.read_detection(tmp_path), "a.xml, line 2", "malformed XML")


def test_unusable_datasets(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises(lambda: D.read_detection(tmp_path / "empty"), "no annotations found")
    _raises(lambda: D.read_detection(tmp_path / "nowhere"), "no such file")
    _raises(lambda: D.read_detection(tmp_path / "empty", fmt="kitti"), "unknown detection format")
    voc = write_voc_set(tmp_path / "voc", {"a.png": (20, 20, [])})  # no boxes at all
    _raises(lambda: D.read_detection(voc), "no usable box")
    yolo = write_yolo_set(tmp_path / "yolo")
    (yolo / "classes.txt").unlink()
    _raises(lambda: D.read_detection(yolo), "without class names")


# ---------------------------------------------------------------------------------------------
# tiling
# ---------------------------------------------------------------------------------------------

def _ds(images, names=("a", "b")) -> DetDataset:
    return DetDataset(Path("/data"), images, tuple(names), "coco", {"images": len(images)})


def _img(name, w, h, boxes, classes=None) -> DetImage:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    classes = np.zeros(len(boxes), np.int64) if classes is None else np.asarray(classes, np.int64)
    return DetImage(Path("/data") / name, w, h, boxes, classes, None, name)


def test_tiling_keeps_a_box_exactly_and_drops_one_under_min_visible():
    ds = _ds([_img("a.png", 100, 100, [[10, 10, 30, 30], [45, 60, 65, 70]], [0, 1])])
    tiled = D.tile_dataset(ds, 50, overlap=0.0, region=0)
    tiles = {t.window: t for t in tiled.images}
    assert sorted(tiles) == [(0, 0, 50, 50), (0, 50, 50, 100), (50, 0, 100, 50), (50, 50, 100, 100)]
    assert tiles[(0, 0, 50, 50)].boxes.tolist() == [[10, 10, 30, 30]]  # wholly inside: exact
    assert tiles[(0, 50, 50, 100)].boxes.shape == (0, 4)  # 25 % visible < 0.5: dropped there
    t = tiles[(50, 50, 100, 100)]  # 75 % visible: kept, clipped, in the tile's pixels
    assert t.boxes.tolist() == [[0, 10, 15, 20]] and t.classes.tolist() == [1]
    assert (t.width, t.height, t.path, t.group) == (50, 50, Path("/data/a.png"), "a.png")
    tr = tiled.report["tiling"]
    assert tr["tiles"] == 4 and tr["tiles_without_boxes"] == 2 and tr["boxes_cut"] == 1
    assert tr["boxes_under_min_visible"] == 1 and tr["boxes_lost"]["count"] == 0
    assert D.tile_dataset(ds, 50, overlap=0.0, min_visible=0.8, region=0).report["tiling"]["boxes_lost"]["count"] == 1


def test_tiles_align_to_the_edge_and_small_images_are_one_tile():
    ds = _ds([_img("a.png", 120, 30, [[1, 1, 5, 5]])])
    wins = [t.window for t in D.tile_dataset(ds, 50, overlap=0.2, region=0).images]
    assert wins == [(0, 0, 50, 30), (40, 0, 90, 30), (70, 0, 120, 30)]  # stride 40, last at the edge; not padded
    small = D.tile_dataset(_ds([_img("s.png", 30, 20, [[1, 1, 5, 5]])]), 50).images
    assert [(t.window, t.width, t.height, t.group) for t in small] == [((0, 0, 30, 20), 30, 20, "s.png#r0")]
    with pytest.raises(EdgetlError, match="already tiled"):
        D.tile_dataset(_ds(small), 50)
    with pytest.raises(EdgetlError, match="smaller than the tile size"):
        D.tile_dataset(ds, 50, region=40)


def test_tiles_never_cross_region_boundaries():
    boxes = [[90, 10, 110, 30], [5, 5, 25, 25], [210, 150, 240, 190]]  # the first straddles x=100 half and half
    ds = _ds([_img("big.png", 300, 200, boxes)])
    tiled = D.tile_dataset(ds, 40, overlap=0.25, min_visible=0.6, region=100)
    blocks = {f"big.png#r{r}": (x0, y0, x0 + 100, y0 + 100) for r, (y0, x0) in
              enumerate((y, x) for y in (0, 100) for x in (0, 100, 200))}
    assert {t.group for t in tiled.images} == set(blocks)
    for t in tiled.images:
        bx0, by0, bx1, by1 = blocks[t.group]
        x0, y0, x1, y1 = t.window
        assert bx0 <= x0 < x1 <= bx1 and by0 <= y0 < y1 <= by1, (t.group, t.window)
    assert tiled.report["tiling"]["boxes_lost"]["count"] == 1  # 50 % in each region < 0.6
    assert tiled.report["tiling"]["groups"] == 6


# ---------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------

def _split_ds() -> DetDataset:
    images = []
    for g in range(30):  # 20 groups of class 0, 6 with the rare class 1, 4 negatives; 2 tiles each
        cls = [] if g >= 26 else ([0, 1] if g >= 20 else [0])
        for t in range(2):
            boxes = [[1, 1, 5, 5]] * len(cls)
            im = _img(f"g{g:02d}.png", 50, 50, boxes, cls)
            images.append(DetImage(im.path, 25, 50, im.boxes, im.classes, (25 * t, 0, 25 * t + 25, 50), f"g{g:02d}.png#r0"))
    return _ds(images)


def test_split_keeps_groups_whole_is_deterministic_and_stratified():
    ds = _split_ds()
    splits = D.split_detection(ds, {"val": 0.15, "test": 0.15}, seed=3)
    where = {}
    for s, images in splits.items():
        for im in images:
            assert where.setdefault(im.group, s) == s  # a group never straddles splits
    assert sum(len(v) for v in splits.values()) == len(ds.images)
    again = D.split_detection(ds, {"val": 0.15, "test": 0.15}, seed=3)
    assert {s: [id(i) for i in v] for s, v in again.items()} == {s: [id(i) for i in v] for s, v in splits.items()}
    summary = D.split_summary(splits, ds.class_names)
    for s in D.SPLITS:
        assert summary[s]["boxes_per_class"]["b"] > 0, (s, summary)  # the rare class reaches every split
        assert summary[s]["negatives"] > 0
    assert summary["train"]["groups"] > summary["val"]["groups"] >= 3
    other = D.split_detection(ds, {"val": 0.15, "test": 0.15}, seed=4)
    assert {im.group for im in other["val"]} != {im.group for im in splits["val"]}


def test_split_fills_every_split_and_refuses_too_few_groups():
    three = _ds([_img(f"{k}.png", 10, 10, [[1, 1, 5, 5]], [k % 2]) for k in range(3)])
    splits = D.split_detection(three, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    assert all(len(splits[s]) == 1 for s in D.SPLITS)
    two = _ds(three.images[:2])
    err = _raises(lambda: D.split_detection(two, {"val": 0.2, "test": 0.2}, seed=0), "2 group(s)", "at least 3")
    assert "--tile" in err.hint
    assert len(D.split_detection(two, {"val": 0.2}, seed=0)["val"]) == 1  # no test asked: 2 groups suffice
    _raises(lambda: D.split_detection(three, {"val": 0.5, "test": 0.5}, seed=0), "fractions")
    _raises(lambda: D.split_detection(three, {"train": 0.5, "val": 0.1, "test": 0.1}, seed=0), "sum to 1")


def test_split_json_round_trip(tmp_path):
    ds = D.tile_dataset(_ds([_img("sub/a.png", 90, 70, [[3.3, 4.1, 40.7, 33.3], [50, 20, 80, 60]], [0, 1]),
                             _img("b.png", 60, 60, [[1, 1, 9, 9]])]), 40, region=40)
    splits = D.split_detection(ds, {"val": 0.3, "test": 0.3}, seed=1)
    data = json.loads(json.dumps(D.split_to_json(splits, Path("/data"), ds.class_names)))
    assert data["splits"]["train"][0]["path"] in ("sub/a.png", "b.png")
    back, names = D.split_from_json(data, Path("/data"))
    assert names == ds.class_names
    for s in D.SPLITS:
        assert len(back[s]) == len(splits[s])
        for a, b in zip(splits[s], back[s]):
            assert (a.path, a.width, a.height, a.window, a.group) == (b.path, b.width, b.height, b.window, b.group)
            assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.classes, b.classes)
            assert b.boxes.dtype == np.float32 and b.classes.dtype == np.int64
    moved, _ = D.split_from_json(data, tmp_path)  # relative paths follow the given root
    assert all(im.path.is_relative_to(tmp_path) for s in D.SPLITS for im in moved[s])
    _raises(lambda: D.split_from_json({"splits": {}}, tmp_path), "not a detection split")


# ---------------------------------------------------------------------------------------------
# pixels and COCO output
# ---------------------------------------------------------------------------------------------

def test_load_pixels_whole_and_window(tmp_path):
    paths = write_images(tmp_path, {"a.png": (64, 48, [])})
    whole = DetImage(paths["a.png"], 64, 48, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    px = D.load_pixels(whole)
    assert px.shape == (48, 64, 3) and px.dtype == np.uint8
    tile = DetImage(paths["a.png"], 30, 20, whole.boxes, whole.classes, (10, 5, 40, 25), "a.png#r0")
    crop = D.load_pixels(tile)
    assert np.array_equal(crop, px[5:25, 10:40]) and crop.flags["C_CONTIGUOUS"]
    cv2.imwrite(str(paths["a.png"]), _pixels(20, 20, 9))  # the file changed since it was read
    _raises(lambda: D.load_pixels(whole), "a.png", "20x20")
    _raises(lambda: D.load_pixels(tile), "the file changed")


def test_write_coco_refuses_tiles(tmp_path):
    tiles = D.tile_dataset(_ds([_img("a.png", 100, 100, [[1, 1, 5, 5]])]), 50).images
    _raises(lambda: D.write_coco(tiles, ("a", "b"), tmp_path / "x.json", tmp_path), "tiles")


# ---------------------------------------------------------------------------------------------
# the real tree crowns
# ---------------------------------------------------------------------------------------------

def test_deepforest_missing_names_the_install(monkeypatch):
    from edgetl.detect import trees

    monkeypatch.setattr(trees.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependencyError) as err:
        trees.deepforest_data_dir()
    assert "pip install --no-deps deepforest==2.1.0" in err.value.hint


@pytest.mark.skipif(importlib.util.find_spec("deepforest") is None,
                    reason="deepforest is not installed (pip install --no-deps deepforest==2.1.0)")
def test_write_trees_and_read_them(tmp_path):
    from edgetl.detect.trees import MARKER, write_trees

    out = tmp_path / "trees"
    one = write_trees(tmp_path / "one")  # default: every crown is a Tree (the states exist in one image only)
    assert one["boxes_per_class"] == {"Tree": 951}
    assert D.read_detection(tmp_path / "one").class_names == ("Tree",)
    summary = write_trees(out, single_class=False)
    assert summary["images"] == 4 and summary["boxes"] == 951
    assert summary["boxes_per_class"] == {"Alive": 9, "Dead": 28, "Tree": 914}
    ds = D.read_detection(out)  # auto: VOC (the provenance JSON is not mistaken for COCO)
    assert ds.format == "voc" and ds.class_names == ("Alive", "Dead", "Tree")
    sizes = {im.path.name: (im.width, im.height) for im in ds.images}
    assert sizes == {"2019_YELL_2_528000_4978000_image_crop2.png": (2299, 2472),
                     "2019_YELL_2_541000_4977000_image_crop.png": (1249, 1035),
                     "OSBS_029.png": (400, 400), "SOAP_061.png": (400, 400)}
    r = ds.report
    assert r["boxes"] == 951 and r["missing_images"]["count"] == 0 and r["outside"]["count"] == 0
    readme = (out / "README.txt").read_text()
    assert "deepforest 2.1.0" in readme and "MIT" in readme and "Weinstein" in readme and "OSBS_029.tif" in readme
    assert (out / "LICENSE-deepforest.txt").is_file() and (out / MARKER).is_file()
    _raises(lambda: write_trees(out), "already exists")
    assert write_trees(out, overwrite=True, single_class=False)["boxes"] == 951
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder, no lock left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    _raises(lambda: write_trees(tmp_path / "mine", overwrite=True), "not a trees folder")
    tiled = D.tile_dataset(ds, 400)
    splits = D.split_detection(tiled, {"val": 0.15, "test": 0.15}, seed=0)
    assert all(splits[s] for s in D.SPLITS) and tiled.report["tiling"]["groups"] == 7
