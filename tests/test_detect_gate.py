"""Detection metrics (COCO mAP through pycocotools, agreement) and the detection gate (issue 12).

Expected mAP values are worked out by hand from COCO's 101-point interpolation (precision made
monotone from the right, sampled at recall 0, 0.01, ..., 1). COCOeval computes precision as
tp / (tp + fp + eps), so a lone true positive has precision 1 - 1e-16: those cases compare to 1e-12.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

import numpy as np
import pytest

from edgetl.detect.gate import (DetCheckset, DetThresholds, det_gate_markdown, evaluate_detection,
                                load_det_checkset)
from edgetl.detect.metrics import (box_iou, coco_evaluate, coco_map, detection_agreement, map50_resampled,
                                   match_detections, match_pairs)
from edgetl.runtime.detect import PostprocessSpec, postprocess
from edgetl.runtime.errors import EdgetlError, MissingDependencyError

E4 = np.zeros((0, 4), np.float32)
EI = np.zeros(0, np.int64)
EF = np.zeros(0, np.float32)


def B(*rows):
    return np.asarray(rows, np.float32).reshape(-1, 4)


def gt(boxes, classes):
    return B(*boxes), np.asarray(classes, np.int64)


def det(boxes, scores, classes):
    return B(*boxes), np.asarray(scores, np.float32), np.asarray(classes, np.int64)


NODET = (E4, EF, EI)
A, A2 = [0, 0, 10, 10], [20, 20, 30, 30]
FAR = [50, 50, 60, 60]


# ------------------------------------------------------------------------------------------
# coco_map
# ------------------------------------------------------------------------------------------

def test_perfect_detections_give_1():
    gts = [gt([A, A2], [0, 1]), gt([A2], [0])]
    dets = [det([A, A2], [0.9, 0.8], [0, 1]), det([A2], [0.7], [0])]
    r = coco_map(gts, dets, 2, ["crack", "spot"])
    assert r["map50"] == pytest.approx(1.0, abs=1e-12) and r["map"] == pytest.approx(1.0, abs=1e-12)
    assert [p["class"] for p in r["per_class"]] == ["crack", "spot"]
    assert [p["n_gt"] for p in r["per_class"]] == [2, 1]
    assert (r["n_images"], r["n_gt"], r["n_det"]) == (2, 3, 3)


def test_one_of_two_missed_is_51_of_101():
    """Recall reaches 0.5 at precision 1: recall points 0..0.50 (51 of 101) score 1, the rest 0."""
    r = coco_map([gt([A, A2], [0, 0])], [det([A], [0.9], [0])], 1)
    assert r["map50"] == pytest.approx(51 / 101, abs=1e-12)
    assert r["per_class"][0]["ap50"] == pytest.approx(51 / 101, abs=1e-12)


def test_false_positive_ranked_between_true_positives():
    """TP 0.9, FP 0.8, TP 0.7 over 2 GT: precision 1, 1/2, 2/3 at recall .5, .5, 1; monotone 1, 2/3,
    2/3: recall points <= 0.5 score 1 (51), the 50 above score 2/3."""
    r = coco_map([gt([A, A2], [0, 0])], [det([A, FAR, A2], [0.9, 0.8, 0.7], [0, 0, 0])], 1)
    assert r["map50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    # the false positive first: precision 0, 1/2, 2/3 -> 2/3 everywhere
    r = coco_map([gt([A, A2], [0, 0])], [det([FAR, A, A2], [0.9, 0.8, 0.7], [0, 0, 0])], 1)
    assert r["map50"] == pytest.approx(2 / 3, abs=1e-12)


def test_image_without_ground_truth_counts_its_false_positives():
    gts = [gt([A, A2], [0, 0]), gt([], [])]
    dets = [det([A, A2], [0.8, 0.7], [0, 0]), det([A], [0.9], [0])]  # the negative image's box ranks first
    assert coco_map(gts, dets, 1)["map50"] == pytest.approx(2 / 3, abs=1e-12)
    assert coco_map(gts, [dets[0], NODET], 1)["map50"] == 1.0


def test_class_without_ground_truth_is_left_out_of_the_mean():
    gts = [gt([A, A2], [0, 0])]
    dets = [det([A, A2, FAR], [0.9, 0.8, 0.95], [0, 0, 1])]  # class 1: detections, no GT
    r = coco_map(gts, dets, 2)
    assert r["map50"] == 1.0 and r["map"] == 1.0  # class 1's false positive neither counts nor hurts class 0
    assert r["per_class"][1] == {"class": "1", "ap50": None, "ap": None, "n_gt": 0}


def test_map_over_iou_thresholds():
    """IoU 0.72 (box 10 wide shifted 1.6): a match at thresholds .50 .. .70 (5 of 10)."""
    iou = float(box_iou(B(A), B([1.6, 0, 11.6, 10]))[0, 0])
    assert 0.70 < iou < 0.75
    r = coco_map([gt([A, [0, 20, 10, 30]], [0, 0])],
                 [det([[1.6, 0, 11.6, 10], [1.6, 20, 11.6, 30]], [0.9, 0.8], [0, 0])], 1)
    assert r["map50"] == 1.0 and r["map"] == 0.5


def test_no_detections_and_no_ground_truth():
    assert coco_map([gt([A], [0]), gt([], [])], [NODET, NODET], 2)["map50"] == 0.0
    assert coco_map([gt([A], [0])], [NODET], 1)["map"] == 0.0
    r = coco_map([gt([], [])], [det([A], [0.9], [0])], 1)
    assert np.isnan(r["map50"]) and r["n_gt"] == 0  # undefined: nothing to find


def test_bad_inputs_are_edgetl_errors():
    with pytest.raises(EdgetlError, match="class 2 outside"):
        coco_map([gt([A], [2])], [NODET], 2)
    with pytest.raises(EdgetlError, match="1 images of ground truth but 2"):
        coco_map([gt([A], [0])], [NODET, NODET], 1)
    with pytest.raises(EdgetlError, match="1 boxes, 1 classes, 2 scores"):
        coco_map([gt([A], [0])], [(B(A), np.ones(2), np.zeros(1, np.int64))], 1)


def test_missing_pycocotools_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(MissingDependencyError, match="pycocotools") as e:
        coco_map([gt([A], [0])], [NODET], 1)
    assert e.value.extra == "detect" and "edgetl[detect]" in e.value.hint


def _random_set(rng, n, c, jitter=3.0):
    gts, dets = [], []
    for _ in range(n):
        k = int(rng.integers(0, 5))
        xy = rng.uniform(0, 200, (k, 2))
        b = np.concatenate([xy, xy + rng.uniform(10, 60, (k, 2))], 1)
        cls = rng.integers(0, c, k)
        nf = int(rng.integers(0, 3))
        fxy = rng.uniform(0, 200, (nf, 2))
        db = np.concatenate([b + rng.normal(0, jitter, (k, 4)), np.concatenate([fxy, fxy + 30], 1)])
        gts.append((b.astype(np.float32), cls))
        dets.append((db.astype(np.float32), rng.uniform(0, 1, k + nf).astype(np.float32),
                     np.concatenate([cls, rng.integers(0, c, nf)])))
    return gts, dets


def test_resampled_map50_is_cocoeval_on_the_resampled_images():
    """The bootstrap's re-accumulation is exactly COCOeval run on the resample (images relabelled)."""
    rng = np.random.default_rng(1)
    gts, dets = _random_set(rng, 30, 3)
    full, m = coco_evaluate(gts, dets, 3)
    assert map50_resampled(m, np.arange(30)) == full["map50"]
    for _ in range(4):
        idx = rng.integers(0, 30, 30)
        assert map50_resampled(m, idx) == coco_map([gts[i] for i in idx], [dets[i] for i in idx], 3)["map50"]


# ------------------------------------------------------------------------------------------
# matching and agreement
# ------------------------------------------------------------------------------------------

def test_match_identical_shifted_and_class_mismatch():
    boxes = B(A, A2, [40, 0, 50, 10], [0, 40, 10, 50])
    cls = np.array([0, 1, 0, 1])
    assert match_detections(boxes, cls, boxes, cls) == 4
    shifted = boxes.copy()
    shifted[0] += np.array([6, 0, 6, 0], np.float32)  # IoU 4/16 = 0.25 < 0.5
    assert match_detections(boxes, cls, shifted, cls) == 3
    a = detection_agreement([(boxes, np.ones(4), cls)], [(shifted, np.ones(4), cls)])
    assert a == {"f1": 0.75, "precision": 0.75, "recall": 0.75, "matched": 3, "n_float": 4, "n_quant": 4}
    assert match_detections(boxes, cls, boxes, 1 - cls) == 0  # same boxes, other classes
    assert detection_agreement([(boxes, np.ones(4), cls)], [(boxes[:2], np.ones(2), cls[:2])])["f1"] == \
        pytest.approx(2 * 2 / 6)
    assert detection_agreement([NODET], [NODET])["f1"] == 1.0


def test_match_takes_the_highest_iou_first():
    """a1-b0 (IoU .95) goes before a0-b0 (.67), so a0 falls to b1 (.58): 2 pairs; matching row by row
    (a0 takes its best, b0) would leave a1 with nothing."""
    a = B([2, 0, 12, 10], [0, 0, 10.5, 10])
    b = B([0, 0, 10, 10], [5, 0, 14, 10])
    ia, ib = match_pairs(a, [0, 0], b, [0, 0])
    assert sorted(zip(ia.tolist(), ib.tolist())) == [(0, 1), (1, 0)]


def _greedy(a, ca, b, cb, thr=0.5):
    ov = box_iou(a, b)
    cand = sorted(((ov[i, j], i, j) for i in range(len(a)) for j in range(len(b))
                   if ca[i] == cb[j] and ov[i, j] >= thr), reverse=True)
    used_a, used_b, out = set(), set(), set()
    for _, i, j in cand:
        if i not in used_a and j not in used_b:
            used_a.add(i), used_b.add(j), out.add((i, j))
    return out


def test_match_is_the_greedy_matching():
    rng = np.random.default_rng(3)
    for _ in range(30):
        n, m = rng.integers(0, 12, 2)
        a = rng.uniform(0, 40, (n, 2))
        b = rng.uniform(0, 40, (m, 2))
        a = np.concatenate([a, a + 20], 1)
        b = np.concatenate([b, b + rng.uniform(15, 25, (m, 2))], 1)
        ca, cb = rng.integers(0, 2, n), rng.integers(0, 2, m)
        ia, ib = match_pairs(a, ca, b, cb)
        assert set(zip(ia.tolist(), ib.tolist())) == _greedy(a, ca, b, cb)


# ------------------------------------------------------------------------------------------
# The gate on synthetic raw outputs
# ------------------------------------------------------------------------------------------

def encode(gt_boxes, anchors, w=(10.0, 10.0, 5.0, 5.0)):
    """The inverse of the box coder's decoding (``edgetl.runtime.detect.decode_boxes``, torchvision's
    ``BoxCoder``): raw regressions that decode to ``gt_boxes``."""
    g, a = np.asarray(gt_boxes, np.float64), np.asarray(anchors, np.float64)
    aw, ah, gw, gh = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1], g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    return np.stack([w[0] * ((g[:, 0] + 0.5 * gw) - (a[:, 0] + 0.5 * aw)) / aw,
                     w[1] * ((g[:, 1] + 0.5 * gh) - (a[:, 1] + 0.5 * ah)) / ah,
                     w[2] * np.log(gw / aw), w[3] * np.log(gh / ah)], 1).astype(np.float32)


def _anchors(size=96, stride=16, scale=24):
    c = np.arange(stride / 2, size, stride)
    cx, cy = np.meshgrid(c, c)
    ctr = np.stack([cx.ravel(), cy.ravel()], 1)
    return np.concatenate([ctr - scale / 2, ctr + scale / 2], 1).astype(np.float32)  # (36, 4)


NAMES = ["crack", "spot"]
LOGIT = 8.0  # the chosen class's logit (softmax ~0.9997); background the same elsewhere


def make_case(n=12, seed=0):
    """Images with 2, 0, 3, 1, ... GT boxes (each near its own anchor; classes alternate: 9 + 9 in 12 images),
    and float raw outputs that decode to the GT exactly: the float model is perfect (mAP 1)."""
    rng = np.random.default_rng(seed)
    anchors = _anchors()
    a_n = len(anchors)
    boxes = np.zeros((n, a_n, 4), np.float32)
    scores = np.zeros((n, a_n, 3), np.float32)
    scores[:, :, 0] = LOGIT
    gb, gc = [], []
    for i in range(n):
        k = [2, 0, 3, 1][i % 4]
        where = rng.choice(a_n, k, replace=False)
        g = anchors[where] + rng.uniform(-3, 3, (k, 4)).astype(np.float32)
        cls = (np.arange(k) + i) % 2
        boxes[i, where] = encode(g, anchors[where])
        scores[i, where, 0] = 0.0
        scores[i, where, 1 + cls] = LOGIT
        gb.append(g.astype(np.float32))
        gc.append(cls.astype(np.int64))
    cs = DetCheckset(np.zeros((n, 3, 8, 8), np.float32), gb, gc, boxes, scores, [f"img{i}.png" for i in range(n)])
    return cs, PostprocessSpec(anchors)


def test_quant_equal_to_float_passes_with_drop_0():
    cs, spec = make_case()
    g = evaluate_detection((cs.float_boxes, cs.float_scores), cs, spec, labels=NAMES)
    assert g["passed"] and g["status"] == "passed" and g["task"] == "detection" and not g["failures"]
    assert g["float_map50"] == 1.0 and g["quant_map50"] == 1.0 and g["float_map"] == 1.0
    assert g["drop"] == 0.0 and g["drop_ci"] == [0.0, 0.0]
    assert g["agreement"] == 1.0 and g["agreement_ci"] == [1.0, 1.0]
    assert g["max_box_error"] == 0.0 and g["margins"] == {"drop": 1.0, "agreement": 1.0 - 0.95}
    assert g["n"] == 12 and g["agreement_detail"]["matched"] == g["n_gt"] == 18
    assert g["score_threshold"] == 0.3 and g["map_score_threshold"] == 0.01
    assert [p["class"] for p in g["per_class"]] == NAMES and all(p["delta"] == 0.0 for p in g["per_class"])


def test_float_decodes_to_the_ground_truth():
    cs, spec = make_case()
    for i in range(len(cs)):
        d = postprocess(cs.float_boxes[i], cs.float_scores[i], spec)
        got = sorted(map(tuple, np.round(d.boxes, 3).tolist()))
        assert got == sorted(map(tuple, np.round(cs.gt_boxes[i], 3).tolist()))


def test_quant_with_small_noise_passes():
    cs, spec = make_case()
    rng = np.random.default_rng(5)
    qb = cs.float_boxes + rng.normal(0, 0.02, cs.float_boxes.shape).astype(np.float32)
    qs = cs.float_scores + rng.normal(0, 0.1, cs.float_scores.shape).astype(np.float32)
    g = evaluate_detection((qb, qs), cs, spec, labels=NAMES)
    assert g["passed"], g["failures"]
    assert g["drop"] <= 1.0 and g["agreement"] == 1.0
    assert 0 < g["max_box_error"] < 1.0 and 0 < g["mean_box_error"] <= g["max_box_error"]


def _drop_class(cs, k):
    """The quantized model sees class k's objects as background (not even a low-threshold detection)."""
    qs = cs.float_scores.copy()
    hot = qs[:, :, 1 + k] == LOGIT
    qs[:, :, 0][hot], qs[:, :, 1 + k][hot] = LOGIT, 0.0
    return cs.float_boxes, qs


def test_quant_that_loses_a_class_fails_on_drop_and_names_it():
    cs, spec = make_case()
    g = evaluate_detection(_drop_class(cs, 1), cs, spec, labels=NAMES)
    assert not g["passed"] and g["status"] == "failed"
    assert g["quant_map50"] == 0.5 and g["drop"] == 50.0 and g["margins"]["drop"] == -49.0
    drop_failure = [f for f in g["failures"] if f.startswith("accuracy: mAP@0.5 drop")]
    assert len(drop_failure) == 1 and "spot -100.0" in drop_failure[0] and "crack" not in drop_failure[0]
    spot = g["per_class"][1]
    assert (spot["ap50_float"], spot["ap50_quant"], spot["delta"]) == (1.0, 0.0, -100.0)
    assert g["drop_ci"][0] > 20 and g["drop_ci"][1] <= 100


def test_boundary_is_inclusive_and_just_past_it_fails():
    """Losing class 1 (9 of 18 boxes): drop exactly 50.0 points, F1 exactly 2*9/(18+9) = 2/3."""
    cs, spec = make_case()
    raw = _drop_class(cs, 1)
    f1 = 2.0 * 9 / 27
    ok = evaluate_detection(raw, cs, spec, {"max_map_drop": 50.0, "min_agreement": f1}, NAMES, n_boot=20)
    assert ok["drop"] == 50.0 and ok["agreement"] == f1
    assert ok["passed"] and ok["margins"] == {"drop": 0.0, "agreement": 0.0}
    drop = evaluate_detection(raw, cs, spec, {"max_map_drop": 49.99, "min_agreement": f1}, NAMES, n_boot=20)
    assert not drop["passed"] and [f.split(":")[0] for f in drop["failures"]] == ["accuracy"]
    agree = evaluate_detection(raw, cs, spec, {"max_map_drop": 50.0, "min_agreement": f1 + 1e-4}, NAMES, n_boot=20)
    assert not agree["passed"] and [f.split(":")[0] for f in agree["failures"]] == ["agreement"]


def test_jittered_boxes_fail_on_agreement():
    """Every quantized box moved by 0.6 of its width: IoU with float 0.25, nothing matches."""
    cs, spec = make_case()
    qb = cs.float_boxes.copy()
    qb[:, :, 0] += 10 * 0.6  # dx is weighted by 10: centre + 0.6 anchor widths
    g = evaluate_detection((qb, cs.float_scores), cs, spec, {"max_map_drop": 100.0}, NAMES)
    assert not g["passed"] and g["agreement"] == 0.0 and g["agreement_detail"]["matched"] == 0
    assert [f.split(":")[0] for f in g["failures"]] == ["agreement"]
    assert g["max_box_error"] is None and g["quant_map50"] == 0.0


def test_map_uses_the_low_threshold_and_agreement_the_deployed_one():
    """Quantized scores all below the deployed 0.3 but above 0.01, in float's order: mAP is unchanged
    (the ranking is), yet the device would show nothing: agreement 0."""
    cs, spec = make_case()
    qs = cs.float_scores.copy()
    qs[:, :, 0] = np.where(cs.float_scores[:, :, 0] > 0, LOGIT, LOGIT + 2.0)  # object anchors: p = 0.12
    g = evaluate_detection((cs.float_boxes, qs), cs, spec, labels=NAMES)
    assert g["drop"] == 0.0 and g["agreement"] == 0.0 and g["agreement_detail"]["n_quant"] == 0
    assert not g["passed"]
    # a deployed threshold below those scores (thresholds override the manifest's): they agree
    g = evaluate_detection((cs.float_boxes, qs), cs, spec, {"score_threshold": 0.001}, NAMES)
    assert g["passed"] and g["score_threshold"] == 0.001 and g["map_score_threshold"] == 0.001


def test_raw_shapes_must_match_the_checkset():
    cs, spec = make_case()
    with pytest.raises(EdgetlError, match="different runs"):
        evaluate_detection((cs.float_boxes[:, :5], cs.float_scores[:, :5]), cs, spec)


def test_bootstrap_time_n100(capsys):
    """The paired bootstrap is a re-accumulation, not a COCOeval per resample: fast at n=100, 200."""
    cs, spec = make_case(n=100, seed=2)
    rng = np.random.default_rng(0)
    qb = cs.float_boxes + rng.normal(0, 1.0, cs.float_boxes.shape).astype(np.float32)
    qs = cs.float_scores + rng.normal(0, 3.0, cs.float_scores.shape).astype(np.float32)
    t0 = time.perf_counter()
    g = evaluate_detection((qb, qs), cs, spec, labels=NAMES, n_boot=200)
    dt = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nevaluate_detection n=100, n_boot=200: {dt:.2f} s (drop {g['drop']:.2f}, CI {g['drop_ci']})")
    assert g["bootstrap"] == {"n_boot": 200, "n_boot_drop": 200}
    assert g["drop_ci"][0] <= g["drop"] <= g["drop_ci"][1] or g["drop_ci"][0] == g["drop_ci"][1]
    assert dt < 20


def test_markdown_section():
    cs, spec = make_case()
    md = det_gate_markdown(evaluate_detection(_drop_class(cs, 1), cs, spec, labels=NAMES, n_boot=20))
    assert md.startswith("## Detection gate: FAILED")
    assert "| mAP@0.5 | 100.00 | 50.00 |" in md and "| spot | 9 | 100.00 | 0.00 | -100.00 |" in md
    assert "paired bootstrap" in md and "**Failures:**" in md
    md = det_gate_markdown(evaluate_detection((cs.float_boxes, cs.float_scores), cs, spec, n_boot=20))
    assert md.startswith("## Detection gate: PASSED") and "Failures" not in md


# ------------------------------------------------------------------------------------------
# Thresholds and the checkset file
# ------------------------------------------------------------------------------------------

def test_thresholds_coerce():
    assert DetThresholds.coerce(None) == DetThresholds(1.0, 0.95, None)
    assert DetThresholds.coerce({"max_map_drop": 2, "min_agreement": 0.9, "score_threshold": 0.4}) == \
        DetThresholds(2.0, 0.9, 0.4)
    assert DetThresholds.coerce({"min_det_agreement": 0.8}).min_agreement == 0.8

    @dataclass
    class Gate:  # a target profile's gate: its classification min_agreement is not a detection F1
        max_accuracy_drop: float = 1.0
        min_agreement: float = 0.98
        max_map_drop: float = 3.0
        min_det_agreement: float = 0.9

    assert DetThresholds.coerce(Gate()) == DetThresholds(3.0, 0.9, None)
    assert DetThresholds.coerce(DetThresholds().to_dict()) == DetThresholds()
    with pytest.raises(EdgetlError):
        DetThresholds(max_map_drop=-1)
    with pytest.raises(EdgetlError):
        DetThresholds(min_agreement=1.5)


def test_checkset_round_trip_with_ragged_and_empty_images(tmp_path):
    cs, _ = make_case(n=6)
    assert [len(b) for b in cs.gt_boxes] == [2, 0, 3, 1, 2, 0]
    path = cs.save(tmp_path / "checkset.npz")
    for src in (path, tmp_path):
        back = load_det_checkset(src)
        assert len(back) == 6 and back.num_classes == 2 and back.paths == cs.paths
        for a, b in zip(back.gt_boxes, cs.gt_boxes):
            assert a.shape == b.shape and a.dtype == np.float32 and np.array_equal(a, b)
        for a, b in zip(back.gt_classes, cs.gt_classes):
            assert a.dtype == np.int64 and np.array_equal(a, b)
        for name in ("inputs", "float_boxes", "float_scores"):
            assert np.array_equal(getattr(back, name), getattr(cs, name))
    with np.load(path, allow_pickle=False) as d:  # nothing pickled: ragged GT stored flat with offsets
        assert d["gt_offsets"].tolist() == [0, 2, 2, 5, 6, 8, 8]


def test_checkset_damage_is_an_edgetl_error(tmp_path):
    cs, _ = make_case(n=4)
    path = cs.save(tmp_path / "c.npz")
    with np.load(path) as d:
        arrays = dict(d)
    arrays["gt_offsets"] = np.array([0, 2, 1, 4, 6])
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(EdgetlError, match="offsets"):
        load_det_checkset(tmp_path / "bad.npz")
    with pytest.raises(EdgetlError, match="no checkset"):
        load_det_checkset(tmp_path / "missing")
    with pytest.raises(EdgetlError, match="classes"):
        DetCheckset(cs.inputs, cs.gt_boxes, [c + 5 for c in cs.gt_classes], cs.float_boxes, cs.float_scores)


def test_gate_and_metrics_import_without_torch():
    code = textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("blocked")
        sys.meta_path.insert(0, _Block())
        import edgetl.detect.gate, edgetl.detect.metrics
        assert "torch" not in sys.modules
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def _swap_classes(cs):
    """The quantized model finds every object but names it the other class."""
    qs = cs.float_scores.copy()
    qs[:, :, [1, 2]] = qs[:, :, [2, 1]]
    return cs.float_boxes, qs


def test_objects_agreement_is_reported_beside_the_gate_not_gating():
    """With the run's objects' threshold the gate also reports what tracking sees: a quantized model
    that names every object the other class fails the (per-class) gate, and its objects all agree."""
    import dataclasses

    from edgetl.detect.gate import det_gate_markdown

    cs, spec = make_case()
    assert evaluate_detection(_swap_classes(cs), cs, spec, labels=NAMES)["objects_agreement"] is None  # a 2.0 run
    spec = dataclasses.replace(spec, object_threshold=0.5)
    g = evaluate_detection(_swap_classes(cs), cs, spec, labels=NAMES)
    assert not g["passed"] and g["agreement"] == 0.0
    o = g["objects_agreement"]
    assert o["f1"] == 1.0 and o["matched"] == o["n_float"] == o["n_quant"] == 18 and o["threshold"] == 0.5
    lost = evaluate_detection(_drop_class(cs, 1), cs, spec, labels=NAMES)["objects_agreement"]
    assert (lost["matched"], lost["n_float"], lost["n_quant"]) == (9, 18, 9)
    assert "objects agreement" in det_gate_markdown(g) and "not gated" in det_gate_markdown(g)
    # an objects' threshold stored below the boxes' (before the floor): measured where the device tracks
    before = dataclasses.replace(spec, object_threshold=0.05)
    low = evaluate_detection(_swap_classes(cs), cs, before, labels=NAMES)["objects_agreement"]
    assert low["threshold"] == before.tracking_threshold == spec.score_threshold
