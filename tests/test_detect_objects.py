"""Objects whatever their class (``runtime.detect.postprocess_objects``): the class-agnostic metrics
on them, the threshold the training chooses for them, and the runtime tracking them (issue 12:
"cells found" is P(object), not the best of the per-class scores)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from edgetl.runtime.detect import Detections, PostprocessSpec
from edgetl.runtime.heads import DetectHead

pytest.importorskip("pycocotools")

from edgetl.detect.train import choose_object_threshold, class_agnostic, object_f1  # noqa: E402


def _gt(*boxes_classes):
    b = np.array([bc[0] for bc in boxes_classes], np.float32).reshape(-1, 4)
    return b, np.array([bc[1] for bc in boxes_classes], np.int64)


def _det(*items):
    return (np.array([i[0] for i in items], np.float32).reshape(-1, 4), np.array([i[1] for i in items], np.float32),
            np.array([i[2] for i in items], np.int64))


A, B, C = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]
GTS = [_gt((A, 0), (B, 1)), _gt((C, 1))]
# image 1: A found at 0.9 (right class), B at 0.5 (wrong class), a false box at 0.4; image 2: C at 0.7
OBJECTS = [_det((A, 0.9, 0), (B, 0.5, 0), ([60, 0, 70, 10], 0.4, 1)), _det(([40, 1, 50, 11], 0.7, 1))]


def test_object_f1_counts_one_to_one_matches_at_each_threshold():
    f1 = object_f1(GTS, OBJECTS, thresholds=(0.3, 0.45, 0.6, 0.8, 0.95))
    assert f1[0.3] == pytest.approx(2 * 3 / (4 + 3))  # every box: 3 matched of 4 objects, 3 truths
    assert f1[0.45] == pytest.approx(2 * 3 / (3 + 3))  # the false box gone
    assert f1[0.6] == pytest.approx(2 * 2 / (2 + 3)) and f1[0.8] == pytest.approx(2 * 1 / (1 + 3))
    assert f1[0.95] == 0.0
    assert choose_object_threshold(f1) == 0.45
    assert choose_object_threshold(object_f1(GTS, OBJECTS)) == 0.5  # 0.45 and 0.5 tie (B scores 0.5): the higher
    assert choose_object_threshold({0.3: 0.8, 0.5: 0.8, 0.4: 0.7}) == 0.5  # a tie: the higher threshold
    # the floor (the boxes' deployed threshold): the best F1 at or above it, however good lower ones are
    curve = {0.05: 0.977, 0.1: 0.975, 0.3: 0.93, 0.35: 0.94, 0.4: 0.92}
    assert choose_object_threshold(curve) == 0.05 and choose_object_threshold(curve, 0.3) == 0.35
    assert choose_object_threshold(curve, 0.3 + 1e-12) == 0.35 and choose_object_threshold(curve, 0.9) == 0.9


def test_class_agnostic_finds_and_names_at_the_threshold():
    given = class_agnostic(GTS, OBJECTS, 0.6, ["a", "b"])
    assert not given["threshold_chosen_here"] and given["score_threshold"] == 0.6
    assert (given["found"], given["n_gt"], given["class_correct"]) == (2, 3, 2)  # A and C, both named right
    assert given["confusion"] == [[1, 0], [0, 1]] and given["f1"] == pytest.approx(0.8)
    chosen = class_agnostic(GTS, OBJECTS, None, ["a", "b"])
    assert chosen["threshold_chosen_here"] and chosen["score_threshold"] == chosen["object_threshold"] == 0.5
    assert (chosen["found"], chosen["class_correct"]) == (3, 2) and chosen["confusion"] == [[1, 0], [1, 1]]
    assert chosen["map50"] == pytest.approx(1.0, abs=1e-6)  # every truth found before the false box
    floored = class_agnostic(GTS, OBJECTS, None, ["a", "b"], floor=0.6)  # the training passes the boxes' threshold
    assert floored["object_threshold"] == floored["score_threshold"] >= 0.6


def test_doubled_class_boxes_score_lower_than_one_object():
    """The figure before: per-class boxes with their classes merged; a doubtful cell gives two boxes
    (one becomes a false positive) where it is one object."""
    gts = [_gt((A, 0)), _gt((B, 1))]
    objects = [_det((A, 0.95, 0)), _det((B, 0.9, 1))]
    class_boxes = [_det((A, 0.5, 0), (A, 0.45, 1)), _det((B, 0.4, 1))]  # A's second box outranks B
    r = class_agnostic(gts, objects, 0.5, ["a", "b"], class_boxes=class_boxes)
    assert r["map50"] == pytest.approx(1.0, abs=1e-6) and r["map50_class_boxes"] < 0.99


# ---- the runtime: tracking and counting on objects ------------------------------------------------

def _head(object_threshold, threshold=0.0):
    anchors = np.array([[10, 10, 60, 60], [12, 10, 62, 60], [70, 70, 90, 90]], np.float32)
    post = PostprocessSpec(anchors, score_threshold=0.3, image_size=(100, 100), object_threshold=object_threshold)
    model = types.SimpleNamespace(postprocess=post, labels=["defective", "functional"], folder="art",
                                  spec=types.SimpleNamespace(input_size=(100, 100), resize="stretch"))
    options = types.SimpleNamespace(roi=None, threshold=threshold, track=True, count_line=None)
    return DetectHead(model, options), anchors


def _frames(head, n=3):
    # one cell the model is sure of and doubts the class of: background 0.04, defective 0.50, functional 0.46;
    # elsewhere a faint box (P(object) 0.18: only the tracker's second stage sees it)
    logits = np.log(np.array([[[0.04, 0.50, 0.46], [0.10, 0.44, 0.46], [0.82, 0.09, 0.09]]], np.float32))
    raw = np.zeros((1, 3, 4), np.float32)
    frame = types.SimpleNamespace(image=np.zeros((100, 100, 3), np.uint8), index=0)
    out = []
    for i in range(n):
        frame.index = i
        out.append(head.step([raw, logits], frame))
    return out


def test_tracking_follows_objects_at_the_runs_threshold():
    head, anchors = _head(object_threshold=0.6)
    assert head.objects and head.threshold == 0.6
    r = _frames(head)[-1]
    assert isinstance(r["detections"], Detections) and len(r["detections"]) == 2  # one box per object + the faint one
    assert r["detections"].scores[0] == pytest.approx(0.96) and r["detections"].classes.tolist() == [0, 0]
    assert r["label"] == "1 objects"  # at the deployed threshold, not the tracker's low one
    assert len(r["tracks"]) == 1 and r["tracks"][0].score == pytest.approx(0.96)
    assert r["counts"] == {"defective": 1, "functional": 0}
    assert _head(object_threshold=0.6, threshold=0.97)[0].threshold == 0.97  # --threshold still wins
    # a run trained before the floor stored an objects' threshold below the boxes' one: tracks start at the boxes'
    low, _ = _head(object_threshold=0.05)
    assert low.threshold == 0.3 and low.tracker.high == 0.3
    assert _head(object_threshold=0.05, threshold=0.05)[0].threshold == 0.05  # unless --threshold says so


def test_an_artifact_without_an_objects_threshold_tracks_its_merged_class_boxes():
    head, _ = _head(object_threshold=None)
    assert not head.objects and head.threshold == 0.3
    r = _frames(head)[-1]
    assert len(r["detections"]) == 2  # one box per class over the cell (NMS within each class)
    assert len(r["tracks"]) == 1 and r["tracks"][0].score == pytest.approx(0.50)  # merge_classes: the best box
