"""Data discovery, validation, stratified splits, CSV input and augmentation (no torch needed)."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import make_class_image, write_image_folder
from edgetl.augment import AugmentConfig, augment
from edgetl.data import ImageDataset, load_data, load_eval_items, stratified_split
from edgetl.runtime.errors import EdgetlError
from edgetl.runtime.imageio import read_image


def _write_odd_files(root: Path) -> dict[str, str]:
    """Bad files (must be skipped, with the reason) and odd-but-valid files (must be kept)."""
    rng = np.random.default_rng(1)
    d = root / "disc"
    ok, buf = cv2.imencode(".jpg", make_class_image(0, rng))
    (d / "zero.png").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    (d / "text.jpg").write_text("this is not an image\n")
    gray = cv2.cvtColor(make_class_image(0, rng), cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(d / "gray.png"), gray)
    cv2.imwrite(str(d / "deep16.png"), gray.astype(np.uint16) * 257)
    (d / "notes.txt").write_text("ignored: not an image suffix")
    return {"disc/zero.png": "zero-byte", "disc/truncated.jpg": "truncated", "disc/text.jpg": "not a decodable"}


def test_odd_and_corrupt_files_are_skipped_and_listed(tmp_path):
    root = write_image_folder(tmp_path / "img", n_per_class=8)
    bad = _write_odd_files(root)
    ds = load_data(root, seed=0)
    report = ds.report
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == set(bad)
    for path, words in bad.items():
        assert words in skipped[path], (path, skipped[path])
    assert [i["path"] for i in report["ignored"]] == ["disc/notes.txt"]
    kept = {it.rel for s in ds.splits.values() for it in s}
    assert {"disc/gray.png", "disc/deep16.png"} <= kept
    assert report["usable"] == 8 + 8 + 2 == len(kept)
    # the 16-bit and grey files decode to 3-channel 8-bit through the one decoder
    assert read_image(root / "disc/deep16.png").shape[2] == 3


def test_split_is_stratified_reproducible_and_seeded(tmp_path):
    root = write_image_folder(tmp_path / "img", n_per_class=20, classes=("a", "b", "c"))
    for i in range(20, 40):  # make class "a" twice as big
        cv2.imwrite(str(root / "a" / f"extra_{i}.png"), make_class_image(0, np.random.default_rng(i)))
    one, again, other = load_data(root, seed=1), load_data(root, seed=1), load_data(root, seed=2)
    assert one.split_json() == again.split_json()
    assert one.split_json()["splits"] != other.split_json()["splits"]
    for ds in (one, other):
        assert ds.counts("test") == {"a": 6, "b": 3, "c": 3}  # 15% of 40 and of 20, per class
        assert ds.counts("val") == {"a": 6, "b": 3, "c": 3}
        assert ds.counts("train") == {"a": 28, "b": 14, "c": 14}
        paths = [it.rel for s in ds.splits.values() for it in s]
        assert len(paths) == len(set(paths)) == 80  # disjoint and complete
    assert one.fingerprint == other.fingerprint  # the data, not the split


def test_tiny_classes_still_get_train_and_val():
    from edgetl.data import Item

    items = [Item(Path(f"/x/{c}{i}"), f"{c}{i}", c) for c, n in (("a", 2), ("b", 3)) for i in range(n)]
    sp = stratified_split(items, {"val": 0.15, "test": 0.15}, seed=0)
    counts = {s: sorted(it.label for it in v) for s, v in sp.items()}
    assert counts == {"train": ["a", "b"], "val": ["a", "b"], "test": ["b"]}


def test_fingerprint_follows_content(tmp_path):
    root = write_image_folder(tmp_path / "img", n_per_class=4)
    before = load_data(root).fingerprint
    img = read_image(root / "disc" / "disc_000.png")
    img[0, 0] = 255 - img[0, 0]
    cv2.imwrite(str(root / "disc" / "disc_000.png"), img)
    assert load_data(root).fingerprint != before


def test_too_few_usable_images_or_classes_fail_clearly(tmp_path):
    root = write_image_folder(tmp_path / "img", n_per_class=4)
    for f in list((root / "stripes").iterdir())[1:]:
        f.write_bytes(b"")  # 1 usable image left
    with pytest.raises(EdgetlError) as exc:
        load_data(root)
    assert "class 'stripes' has 1 usable image" in exc.value.message and "zero-byte" in exc.value.message

    one = write_image_folder(tmp_path / "one", n_per_class=4, classes=("only",))
    with pytest.raises(EdgetlError, match="found 1 class"):
        load_data(one)
    empty_class = write_image_folder(tmp_path / "e", n_per_class=4)
    (empty_class / "nothing").mkdir()
    with pytest.raises(EdgetlError, match="class 'nothing' has 0 usable"):
        load_data(empty_class)
    with pytest.raises(EdgetlError, match="no such folder"):
        load_data(tmp_path / "missing")


def test_csv_input_with_relative_paths_and_missing_files(tmp_path):
    root = write_image_folder(tmp_path / "pool" / "imgs", n_per_class=6)
    rows = [(f"imgs/{p.parent.name}/{p.name}", "round" if p.parent.name == "disc" else "lined")
            for p in sorted(root.rglob("*.png"))]
    rows.append(("imgs/disc/gone.png", "round"))
    csv_path = tmp_path / "pool" / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(rows)
    ds = load_data(csv_path, seed=0)
    assert ds.labels == ("lined", "round")
    assert sum(ds.counts(s)["round"] for s in ("train", "val", "test")) == 6
    assert ds.report["layout"] == "csv" and ds.report["skipped"][0]["path"] == "imgs/disc/gone.png"
    assert ds.split_json()["splits"]["train"][0]["path"].startswith("imgs/")

    bad = tmp_path / "pool" / "bad.csv"
    bad.write_text("file,label\nimgs/disc/disc_000.png,round\n")
    with pytest.raises(EdgetlError, match="no column 'path'"):
        load_data(bad)


def test_split_folders_and_extra_val_test_dirs(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data / "train", n_per_class=8, seed=0)
    write_image_folder(data / "val", n_per_class=3, seed=1)
    write_image_folder(data / "test", n_per_class=2, seed=2)
    ds = load_data(data)
    assert ds.report["layout"] == "split-folders"
    assert ds.counts("val") == {"disc": 3, "stripes": 3} and ds.counts("test") == {"disc": 2, "stripes": 2}
    assert ds.counts("train") == {"disc": 8, "stripes": 8}
    assert ds.report["split"]["val"] == "given"

    train = write_image_folder(tmp_path / "plain", n_per_class=10, seed=3)
    val = write_image_folder(tmp_path / "v", n_per_class=2, seed=4)
    ds2 = load_data(train, val=val)
    assert ds2.counts("val") == {"disc": 2, "stripes": 2}
    assert ds2.counts("test") == {"disc": 2, "stripes": 2}  # still carved out of the pool
    assert ds2.splits["val"][0].rel.startswith("/")  # outside the root: absolute in split.json
    unknown = write_image_folder(tmp_path / "u", n_per_class=2, classes=("disc", "other"))
    with pytest.raises(EdgetlError, match="class 'other' of the test split"):
        load_data(train, test=unknown)


def test_eval_items_refuse_unknown_classes(tmp_path):
    root = write_image_folder(tmp_path / "img", n_per_class=3)
    samples, report = load_eval_items(root, ("disc", "stripes", "square"))
    assert len(samples) == 6 and {y for _, y in samples} == {0, 1}
    with pytest.raises(EdgetlError, match="not labels of the run"):
        load_eval_items(root, ("disc", "square"))


def test_augmentation_is_uint8_bgr_seeded_and_changes_the_image():
    img = make_class_image(0, np.random.default_rng(0), size=64)
    cfg = AugmentConfig(scale=0.5, hflip=0.5, vflip=0.5, rotate=20, brightness=0.3, contrast=0.3)
    a = augment(img, cfg, np.random.default_rng([0, 1, 2]))
    b = augment(img, cfg, np.random.default_rng([0, 1, 2]))
    c = augment(img, cfg, np.random.default_rng([0, 1, 3]))
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    assert np.array_equal(a, b) and (a.shape != c.shape or not np.array_equal(a, c))
    assert a.shape != img.shape or not np.array_equal(a, img)
    off = AugmentConfig(scale=1.0, hflip=0, vflip=0, rotate=0, brightness=0, contrast=0)
    assert np.array_equal(augment(img, off, np.random.default_rng(0)), img)
    with pytest.raises(EdgetlError, match="aug_hflip"):
        AugmentConfig(hflip=1.5)


def test_dataset_augments_per_epoch(tmp_path):
    from edgetl.backbones import get_backbone

    root = write_image_folder(tmp_path / "img", n_per_class=2)
    samples = [(p, 0) for p in sorted(root.rglob("*.png"))]
    ds = ImageDataset(samples, get_backbone("tiny_cnn").preprocess, AugmentConfig(), seed=0)
    x0, y0 = ds[0]
    assert x0.shape == (3, 32, 32) and x0.dtype == np.float32 and y0 == 0
    assert np.array_equal(ds[0][0], x0)  # same epoch, same sample -> same draw
    ds.epoch = 1
    assert not np.array_equal(ds[0][0], x0)


def test_a_zero_fraction_carves_nothing(tmp_path):
    """--test-fraction 0 (a refit on all the data) keeps every image for training and validation."""
    from conftest import write_image_folder
    from edgetl.data import load_data

    root = write_image_folder(tmp_path / "d", n_per_class=10)
    d = load_data(root, val_fraction=0.2, test_fraction=0.0)
    assert not d.splits["test"] and len(d.splits["val"]) == 4 and len(d.splits["train"]) == 16
