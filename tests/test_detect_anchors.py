"""Anchor scales and their coverage of the training boxes (edgetl/detect/anchors.py, ``--anchor-scales``)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from edgetl.detect.anchors import DEFAULT_SCALES, coverage, generator, measure, parse_scales  # noqa: E402
from edgetl.detect.model import _anchors, build_detector  # noqa: E402
from edgetl.detect.train import load_detection_run, train_detector  # noqa: E402
from edgetl.runtime.errors import EdgetlError, IntegrityError  # noqa: E402
from edgetl.runtime.manifest import read_manifest, seal  # noqa: E402
from tests.test_detect_train import CFG, SIZE, one_thread, write_rectangles  # noqa: E402,F401



@pytest.fixture(scope="module")
def maps():
    """The six maps of the tiny detector at 96 px (24x24 down to 1x1: 4,620 anchors)."""
    model = build_detector("tiny_cnn", 2, SIZE, pretrained="none").eval()
    with torch.no_grad():
        return model.features(torch.zeros(1, 3, SIZE, SIZE))


def anchors_for(maps):
    return lambda sc: _anchors(generator(sc), maps, (SIZE, SIZE)).numpy()


def measured(scales, boxes, maps):
    return measure(scales, boxes, anchors_for(maps)(scales), lambda: anchors_for(maps)(DEFAULT_SCALES))


def boxes_of(side: tuple[float, float], aspect: float = 1.0, n: int = 150, seed: int = 0) -> np.ndarray:
    """``n`` boxes of sqrt-area ``side`` (fractions of the input side) and width/height ``aspect``,
    anywhere in the input."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(*side, n) * SIZE
    w, h = s * np.sqrt(aspect), s / np.sqrt(aspect)
    x, y = rng.uniform(0, SIZE - w), rng.uniform(0, SIZE - h)
    return np.stack([x, y, x + w, y + h], 1).astype(np.float32)


def test_parse_scales():
    assert parse_scales("default") == DEFAULT_SCALES and parse_scales(None) == DEFAULT_SCALES
    assert parse_scales("0.1,0.6") == (0.1, 0.6) and parse_scales([0.05, 1.0]) == (0.05, 1.0)
    for bad in ("auto", "0.6,0.1", "0,0.5", "0.1", "small", "0.1,1.5", "0.1,0.2,0.3"):
        with pytest.raises(EdgetlError, match="anchor_scales"):
            parse_scales(bad)


def test_coverage_counts_boxes_with_an_anchor_at_iou_half():
    anchors = np.array([[0, 0, 10, 10], [0, 0, 11, 10], [50, 50, 60, 60]], np.float32)
    boxes = np.array([[0, 0, 10, 10], [100, 100, 110, 110]], np.float32)
    recall, positives = coverage(boxes, anchors)
    assert recall == 0.5 and positives == 1.0  # (2 anchors for the first box, 0 for the second) / 2


def test_the_coverage_report_tells_small_objects_from_covered_ones(maps):
    """Objects 8-14 % of the input side: torchvision's anchors (smallest 20 % of the side) cover none at
    IoU 0.5, smaller given scales most; objects of 30-60 %, the defaults nearly all."""
    small = boxes_of((0.08, 0.14))
    default = measured(DEFAULT_SCALES, small, maps)
    given = measured((0.1, 0.5), small, maps)
    assert default.how == "default" and default.recall == 0.0 and default.default_recall == 0.0
    assert given.how == "given" and given.recall >= 0.8 and given.default_recall == 0.0
    assert given.recall == pytest.approx(coverage(small, anchors_for(maps)((0.1, 0.5)))[0])
    assert "torchvision's 0.20-0.95: 0.0 %" in given.describe() and given.to_dict()["scales"] == [0.1, 0.5]
    large = measured(DEFAULT_SCALES, boxes_of((0.3, 0.6)), maps)
    assert large.recall > 0.9 and large.positives > 1 and "torchvision's scales 0.20-0.95" in large.describe()
    empty = measured(DEFAULT_SCALES, np.zeros((0, 4)), maps)
    assert empty.recall is None and "no training boxes" in empty.describe()


def test_a_run_keeps_its_anchor_scales_and_old_runs_load_with_the_defaults(tmp_path, one_thread):  # noqa: F811
    """The scales are in the manifest and rebuild the same anchors; a run written before anchor
    fitting (no ``anchor_scales`` key) is rebuilt with torchvision's, and a run whose key is lost
    does not load silently with the wrong anchors."""
    data = write_rectangles(tmp_path / "data", n=16, negatives=2, sides=(8, 14))
    cfg = dataclasses.replace(CFG, epochs=1, anchor_scales="0.1,0.5")
    run = train_detector(data, tmp_path / "run", cfg, progress=lambda m: None)
    manifest, model, _, _ = load_detection_run(run)
    assert manifest.backbone["anchor_scales"] == [0.1, 0.5]
    assert manifest.training["anchors"]["how"] == "given" and manifest.training["config"]["anchor_scales"] == "0.1,0.5"
    expected = build_detector("tiny_cnn", 2, SIZE, pretrained="none", anchor_scales=(0.1, 0.5)).anchors
    assert torch.equal(model.anchors, expected)
    assert not torch.equal(model.anchors, build_detector("tiny_cnn", 2, SIZE, pretrained="none").anchors)

    def without_key(src, dst, anchors=None):
        shutil.copytree(src, dst)
        m = read_manifest(dst)
        if anchors is not None:
            np.save(dst / "anchors.npy", anchors)
        seal(dst, m.replace(backbone={k: v for k, v in m.backbone.items() if k != "anchor_scales"}))
        return dst

    with pytest.raises(IntegrityError, match="anchors"):
        load_detection_run(without_key(run, tmp_path / "lost"))
    default = build_detector("tiny_cnn", 2, SIZE, pretrained="none").anchors.numpy()
    _, old, _, _ = load_detection_run(without_key(run, tmp_path / "old", default))
    assert np.array_equal(old.anchors.numpy(), default)


def test_cli_rejects_bad_anchor_scales(tmp_path, capsys):
    from edgetl.cli import main

    data = write_rectangles(tmp_path / "data", n=4, negatives=0)
    rc = main(["train", str(data), "--task", "detect", "--anchor-scales", "0.5,0.1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "anchor_scales = '0.5,0.1' is not valid" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
    rc = main(["train", str(data), "--anchor-scales", "0.1,0.5", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "--anchor-scales is an option of --task detect" in err, err
