"""runtime/detect.py: the device's detection post-processing gives what torchvision's SSD gives (the
host trains and gates with it), maps boxes back to the frame through the inverse of the one
preprocess geometry, refuses bad manifests and anchors, and draws / prints its results."""

import ast
import io
import json
import math
import pickle
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from edgetl.runtime.detect import (Detections, PostprocessSpec, box_iou, class_counts, decode_boxes,
                                   detections_json, draw_detections, load_anchors, postprocess, to_frame)
from edgetl.runtime.errors import EdgetlError, ManifestError
from edgetl.runtime.preprocess import PreprocessSpec, preprocess

ROOT = Path(__file__).resolve().parents[1]
H, W = 300, 320  # the model input of the synthetic scenes


def scene(seed, a=3000, c=3, spread=6.0, logit_scale=2.0):
    """Anchors clustered round a dozen centres (many overlapping boxes), random regressions, logits."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform([20, 20], [W - 20, H - 20], size=(12, 2))
    ctr = centres[rng.integers(0, 12, a)] + rng.normal(0, spread, (a, 2))
    wh = rng.uniform(10, 80, (a, 2))
    anchors = np.concatenate([ctr - wh / 2, ctr + wh / 2], 1).astype(np.float32)
    anchors[:, 0::2] = anchors[:, 0::2].clip(0, W - 1)
    anchors[:, 1::2] = anchors[:, 1::2].clip(0, H - 1)
    anchors[:, 2:] = np.maximum(anchors[:, 2:], anchors[:, :2] + 2)
    raw = rng.normal(0, 1, (a, 4)).astype(np.float32)
    logits = (rng.normal(0, logit_scale, (a, c + 1))).astype(np.float32)
    return anchors, raw, logits


def torchvision_postprocess(anchors, raw, logits, thr=0.3, iou=0.5, topk=200, max_det=100, size=(H, W)):
    """torchvision's own SSD.postprocess_detections, called on a stand-in holding its attributes."""
    torch = pytest.importorskip("torch")
    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.ssd import SSD

    ssd = types.SimpleNamespace(box_coder=det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)), score_thresh=thr,
                                topk_candidates=topk, nms_thresh=iou, detections_per_img=max_det)
    head = {"bbox_regression": torch.from_numpy(raw)[None], "cls_logits": torch.from_numpy(logits)[None]}
    with torch.no_grad():
        out = SSD.postprocess_detections(ssd, head, [torch.from_numpy(anchors)], [size])[0]
    return out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy() - 1


def canonical(boxes, scores, classes):
    """Sorted by (score desc, class, box): equal-score detections come in any order from torch."""
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], classes, -scores))
    return boxes[order], scores[order], classes[order]


def assert_same(dets, ref):
    b, s, c = ref
    assert len(dets) == len(s), (len(dets), len(s))
    mb, ms, mc = canonical(dets.boxes, dets.scores, dets.classes)
    rb, rs, rc = canonical(b, s, c)
    np.testing.assert_array_equal(mc, rc)
    np.testing.assert_allclose(ms, rs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(mb, rb, rtol=1e-6, atol=1e-3)


# ---- decoding ------------------------------------------------------------------------------------

def test_decode_boxes_equals_torchvision_box_coder_including_the_clamp():
    torch = pytest.importorskip("torch")
    from torchvision.models.detection._utils import BoxCoder

    anchors, raw, _ = scene(1, a=500)
    raw = raw * 3
    raw[:5, 2] = 1e4  # dw / dh far past log(1000/16): clamped, no overflow to inf
    raw[5:10, 3] = 500.0
    raw[10:15, 2:] = -50.0  # tiny boxes
    ref = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(torch.from_numpy(raw), torch.from_numpy(anchors)).numpy()
    got = decode_boxes(raw, anchors)
    assert got.dtype == np.float32 and got.shape == (500, 4) and np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-4)
    w = anchors[:5, 2] - anchors[:5, 0]
    np.testing.assert_allclose(got[:5, 2] - got[:5, 0], w * 1000 / 16, rtol=1e-5)  # exp(log(1000/16)) * w


def test_decode_boxes_other_weights():
    torch = pytest.importorskip("torch")
    from torchvision.models.detection._utils import BoxCoder

    anchors, raw, _ = scene(2, a=200)
    ref = BoxCoder((1.0, 2.0, 3.0, 4.0)).decode_single(torch.from_numpy(raw), torch.from_numpy(anchors)).numpy()
    np.testing.assert_allclose(decode_boxes(raw, anchors, (1, 2, 3, 4)), ref, rtol=1e-6, atol=1e-4)


# ---- postprocess = torchvision SSD.postprocess_detections ----------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_postprocess_equals_torchvision_ssd(seed):
    anchors, raw, logits = scene(seed)
    spec = PostprocessSpec(anchors, image_size=(H, W))
    dets = postprocess(raw, logits, spec)
    assert dets.boxes.dtype == np.float32 and dets.scores.dtype == np.float32 and dets.classes.dtype == np.int64
    assert len(dets) == 100 and set(dets.classes.tolist()) == {0, 1, 2}  # the cut at max_detections is hit
    assert (np.diff(dets.scores) <= 0).all()  # best first
    assert_same(dets, torchvision_postprocess(anchors, raw, logits))


@pytest.mark.parametrize("thr,iou,topk,max_det", [(0.05, 0.3, 50, 300), (0.6, 0.7, 400, 20), (0.3, 0.45, 10, 100)])
def test_postprocess_equals_torchvision_other_settings(thr, iou, topk, max_det):
    anchors, raw, logits = scene(7)
    spec = PostprocessSpec(anchors, score_threshold=thr, nms_iou=iou, candidates_per_class=topk,
                           max_detections=max_det, image_size=(H, W))
    assert_same(postprocess(raw, logits, spec), torchvision_postprocess(anchors, raw, logits, thr, iou, topk, max_det))


def test_postprocess_with_ties_equals_torchvision():
    """Equal scores, as a quantized model gives: rows duplicated exactly (same anchor, regression and
    logits: whichever of the pair is kept is the same box) and equal scores on disjoint boxes."""
    anchors, raw, logits = scene(8, a=1000)
    dup = np.arange(0, 1000, 3)
    anchors = np.concatenate([anchors, anchors[dup]])
    raw = np.concatenate([raw, raw[dup]])
    logits = np.concatenate([logits, logits[dup]])
    far = np.array([[0, 0, 4, 4], [300, 280, 316, 296], [0, 280, 10, 296]], np.float32)  # apart from all
    anchors = np.concatenate([anchors, far])
    raw = np.concatenate([raw, np.zeros((3, 4), np.float32)])
    logits = np.concatenate([logits, np.tile(np.array([[0, 5, 0, 0]], np.float32), (3, 1))])
    spec = PostprocessSpec(anchors, max_detections=500, image_size=(H, W))
    dets = postprocess(raw, logits, spec)
    ref = torchvision_postprocess(anchors, raw, logits, max_det=500)
    assert_same(dets, ref)
    tied = np.exp(np.float32(5)) / (np.exp(np.float32(5)) + 3)
    assert np.isclose(dets.scores, tied, rtol=0, atol=1e-7).sum() == 3  # the three tied boxes, all kept
    assert len(np.unique(dets.boxes, axis=0)) == len(dets)  # of each duplicated pair, one is kept


def test_ties_keep_the_lower_anchor_index():
    """Our tie rule (deterministic, documented): equal scores, the lower anchor index wins NMS."""
    anchors = np.array([[10, 10, 50, 50], [12, 10, 52, 50]], np.float32)  # IoU ~0.9
    logits = np.array([[0, 3, 0], [0, 3, 0]], np.float32)
    dets = postprocess(np.zeros((2, 4), np.float32), logits, PostprocessSpec(anchors))
    assert len(dets) == 1 and dets.boxes[0, 0] == pytest.approx(10)


def test_postprocess_nms_is_per_class_and_the_threshold_is_strict():
    anchors = np.array([[10, 10, 50, 50], [10, 10, 50, 50], [11, 10, 51, 50], [200, 200, 240, 240]], np.float32)
    logits = np.log(np.array([[0.1, 0.9, 0.0001], [0.2, 0.0001, 0.8], [0.3, 0.7, 0.0001], [0.7, 0.3, 0.0001]],
                             np.float32))
    spec = PostprocessSpec(anchors, score_threshold=0.3)
    dets = postprocess(np.zeros((4, 4), np.float32), logits, spec)
    # box 1 (class 1) survives box 0 (class 0) at IoU 1; box 2 is suppressed by box 0; box 3's 0.3 is not > 0.3
    assert dets.classes.tolist() == [0, 1]
    np.testing.assert_allclose(dets.scores, [0.9, 0.8], atol=1e-3)
    assert len(postprocess(np.zeros((4, 4), np.float32), logits, spec, score_threshold=0.95)) == 0
    half = np.zeros((1, 2), np.float32)  # softmax: exactly 0.5, which is not > 0.5 (torchvision: score > thresh)
    one = PostprocessSpec(anchors[:1])
    assert len(postprocess(np.zeros((1, 4), np.float32), half, one, score_threshold=0.5)) == 0
    assert len(postprocess(np.zeros((1, 4), np.float32), half, one, score_threshold=0.4999)) == 1


def test_postprocess_clips_to_the_model_input_only_when_it_knows_its_size():
    anchors = np.array([[-20, 10, 60, 50]], np.float32)  # off the left edge
    logits = np.array([[0, 5]], np.float32)
    raw = np.zeros((1, 4), np.float32)
    assert postprocess(raw, logits, PostprocessSpec(anchors)).boxes[0, 0] == pytest.approx(-20)
    clipped = postprocess(raw, logits, PostprocessSpec(anchors, image_size=(40, 100))).boxes[0]
    np.testing.assert_allclose(clipped, [0, 10, 60, 40])


def test_postprocess_refuses_outputs_that_do_not_fit_the_anchors():
    anchors, raw, logits = scene(3, a=100)
    spec = PostprocessSpec(anchors)
    with pytest.raises(EdgetlError, match="100 anchors"):
        postprocess(raw[:99], logits[:99], spec)
    assert len(postprocess(raw[None], logits[None], spec)) > 0  # a batch axis of 1 is fine


def test_box_iou_continuous_coordinates():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 0, 15, 10], [10, 0, 20, 10], [0, 0, 10, 10]], np.float32)
    np.testing.assert_allclose(box_iou(a, b)[0], [50 / 150, 0.0, 1.0])  # touching boxes: IoU 0, no +1


# ---- to_frame = inverse of the preprocess geometry -----------------------------------------------

def forward(box, policy, frame_hw, input_hw, crop_fraction=0.875):
    """A frame box -> model-input pixels, by hand from the documented geometry."""
    fh, fw = frame_hw
    ih, iw = input_hw
    x1, y1, x2, y2 = box
    if policy == "stretch":
        sx, sy, tx, ty = iw / fw, ih / fh, 0.0, 0.0
    elif policy == "letterbox":
        s = min(iw / fw, ih / fh)
        nw, nh = max(1, round(fw * s)), max(1, round(fh * s))
        sx, sy, tx, ty = nw / fw, nh / fh, (iw - nw) // 2, (ih - nh) // 2
    else:  # shorter_crop: shorter side -> min(input) / crop_fraction, centre crop
        s = round(min(ih, iw) / crop_fraction) / min(fh, fw)
        cw, ch = min(fw, max(1, round(iw / s))), min(fh, max(1, round(ih / s)))
        x0, y0 = (fw - cw) // 2, (fh - ch) // 2
        sx, sy = iw / cw, ih / ch
        tx, ty = -x0 * sx, -y0 * sy
    return np.array([x1 * sx + tx, y1 * sy + ty, x2 * sx + tx, y2 * sy + ty], np.float32)


CASES = [("stretch", (480, 640)), ("letterbox", (480, 640)), ("letterbox", (720, 405)),
         ("shorter_crop", (480, 640)), ("shorter_crop", (701, 333))]


@pytest.mark.parametrize("policy,frame_hw", CASES)
def test_to_frame_inverts_the_geometry(policy, frame_hw):
    spec = PreprocessSpec(input_size=(H, W), resize=policy)
    fh, fw = frame_hw
    box = np.array([0.3 * fw, 0.35 * fh, 0.6 * fw, 0.7 * fh], np.float32)  # inside the centre crop too
    model_box = forward(box, policy, frame_hw, (H, W))
    dets = Detections(model_box[None], [0.9], [1])
    back = to_frame(dets, spec, frame_hw)
    np.testing.assert_allclose(back.boxes[0], box, atol=0.5)
    roi = to_frame(dets, spec, frame_hw, offset=(100, 40))  # an ROI crop at (100, 40) of a bigger frame
    np.testing.assert_allclose(roi.boxes[0], box + [100, 40, 100, 40], atol=0.5)
    assert roi.scores[0] == pytest.approx(0.9) and roi.classes[0] == 1


@pytest.mark.parametrize("policy,frame_hw", CASES)
def test_to_frame_inverts_the_real_preprocess(policy, frame_hw):
    """A white rectangle through the one ``preprocess``, found in the model input, mapped back."""
    fh, fw = frame_hw
    img = np.zeros((fh, fw, 3), np.uint8)
    box = (int(0.32 * fw), int(0.36 * fh), int(0.61 * fw), int(0.66 * fh))
    img[box[1]:box[3], box[0]:box[2]] = 255
    spec = PreprocessSpec(input_size=(H, W), resize=policy, dtype="uint8", layout="NHWC", color="BGR",
                          interpolation="nearest")
    x = preprocess(img, spec)
    ys, xs = np.nonzero(x[..., 0] > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    back = to_frame(Detections(found, [1.0], [0]), spec, frame_hw).boxes[0]
    tol = 1.0 + max(fw, fh) / min(H, W)  # nearest-neighbour: a model pixel is up to ~scale frame pixels
    np.testing.assert_allclose(back, box, atol=tol)


def test_to_frame_clips_to_the_preprocessed_image():
    spec = PreprocessSpec(input_size=(H, W), resize="letterbox")
    dets = Detections(np.array([[-10, 0, 50, 5], [0, 0, W, H]], np.float32), [0.5, 0.6], [0, 0])
    out = to_frame(dets, spec, (480, 640), offset=(7, 9))
    assert len(out) == 2
    assert out.boxes[:, 0::2].min() >= 7 and out.boxes[:, 0::2].max() <= 647
    assert out.boxes[:, 1::2].min() >= 9 and out.boxes[:, 1::2].max() <= 489
    assert out.boxes[0, 3] == out.boxes[0, 1]  # a box in the letterbox padding: zero height, kept aligned


# ---- manifest and anchors ------------------------------------------------------------------------

def good_section():
    return {"kind": "ssd", "anchors": "anchors.npy", "box_coder_weights": [10, 10, 5, 5],
            "score_threshold": 0.3, "nms_iou": 0.5, "max_detections": 100, "candidates_per_class": 200}


def test_postprocess_spec_round_trips_through_the_manifest():
    anchors = scene(0, a=10)[0]
    spec = PostprocessSpec.from_manifest(good_section(), anchors, image_size=[H, W])
    assert spec.image_size == (H, W) and spec.box_coder_weights == (10.0, 10.0, 5.0, 5.0)
    assert spec.to_manifest() == good_section()
    assert json.loads(json.dumps(spec.to_manifest())) == good_section()


@pytest.mark.parametrize("key,value", [("kind", "yolo"), ("box_coder_weights", [10, 10, 5]),
                                       ("box_coder_weights", [10, 10, 0, 5]), ("score_threshold", 1.5),
                                       ("score_threshold", "0.3"), ("nms_iou", 0), ("max_detections", 0),
                                       ("max_detections", 2.5), ("candidates_per_class", True),
                                       ("anchors", 3), ("nms_iou", float("nan"))])
def test_postprocess_spec_refuses_a_bad_value_naming_the_key(key, value):
    section = dict(good_section(), **{key: value})
    with pytest.raises(ManifestError) as err:
        PostprocessSpec.from_manifest(section, scene(0, a=10)[0])
    assert f"postprocess.{key}" in err.value.message and "\n" not in err.value.message


def test_postprocess_spec_refuses_an_unknown_key():
    with pytest.raises(ManifestError, match="nms_threshold") as err:
        PostprocessSpec.from_manifest(dict(good_section(), nms_threshold=0.5), scene(0, a=10)[0])
    assert "newer edgetl" in err.value.hint and "nms_iou" in err.value.hint  # what to do, and the known keys


def npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def test_load_anchors_accepts_a_float_array():
    anchors = scene(0, a=10)[0].astype(np.float64)
    got = load_anchors(npy(anchors), "art/anchors.npy")
    assert got.dtype == np.float32 and got.shape == (10, 4)


@pytest.mark.parametrize("data,what", [
    (npy(np.array([{"evil": 1}], dtype=object)), "not a numpy"),  # would need unpickling
    (pickle.dumps(np.zeros((3, 4), np.float32)), "not a numpy"),
    (npy(np.zeros((3, 5), np.float32)), "shape"),
    (npy(np.zeros((0, 4), np.float32)), "shape"),
    (npy(np.array([[0, 0, 1, 1]], np.int64)), "shape"),
    (npy(np.array([[0, 0, np.nan, 1]], np.float32)), "NaN"),
    (npy(np.array([[5, 0, 1, 1]], np.float32)), "empty"),
    (b"", "not a numpy"),
])
def test_load_anchors_refuses_bad_files(data, what):
    with pytest.raises(ManifestError, match=what) as err:
        load_anchors(data, "art/anchors.npy")
    assert "art/anchors.npy" in err.value.message


# ---- output --------------------------------------------------------------------------------------

def test_detections_select_and_empty():
    d = Detections(np.arange(12, dtype=np.float32).reshape(3, 4), [0.9, 0.5, 0.7], [0, 1, 0])
    assert len(d.select(d.scores > 0.6)) == 2 and d.select([2]).classes.tolist() == [0]
    assert len(Detections.empty()) == 0 and Detections.empty().boxes.shape == (0, 4)
    with pytest.raises(ValueError):
        Detections(np.zeros((2, 4)), [0.1], [0, 1])


def test_detections_json_and_counts():
    d = Detections(np.array([[1.04, 2.06, 30.5, 40.44], [5, 5, 9, 9]], np.float32), [0.87654, 0.5], [1, 0])
    items = detections_json(d, ["cell", "crack"], track_ids=np.array([7, 9]))
    assert json.loads(json.dumps(items)) == items
    assert items[0] == {"label": "crack", "class": 1, "score": 0.877, "box": [1.0, 2.1, 30.5, 40.4], "id": 7}
    assert "id" not in detections_json(d, ["cell", "crack"])[0]
    assert class_counts(d, ["cell", "crack", "other"]) == {"cell": 1, "crack": 1, "other": 0}


def test_draw_detections_draws_the_box_and_label():
    frame = np.full((360, 480, 3), 40, np.uint8)
    before = frame.copy()
    d = Detections(np.array([[100, 120, 220, 260]], np.float32), [0.87], [2])
    out = draw_detections(frame, d, ["a", "b", "c"], track_ids=[3], line=(0, 300, 479, 300),
                          counts={"in": {"c": 1}, "out": {"c": 0}, "total": 1})
    assert out is frame
    changed = np.any(frame != before, axis=2)
    assert changed[120:260, 100].all() and changed[259, 100:220].all()  # the outline
    assert not changed[160:220, 130:190].any()  # the inside of the box stays visible
    assert changed[300, 10:470].all()  # the counting line
    assert changed[:30, -60:].any()  # the counts panel, top right
    assert changed[90:120, 100:150].any()  # the label above the box
    draw_detections(frame, Detections.empty(), [], counts={"a": 2})  # nothing to draw: fine


# ---- the device runtime stays torch- and scipy-free ----------------------------------------------

FORBIDDEN = ("torch", "torchvision", "scipy", "timm")


@pytest.mark.parametrize("name", ["detect.py", "track.py"])
def test_runtime_detection_modules_import_neither_torch_nor_scipy(name):
    tree = ast.parse((ROOT / "runtime" / name).read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module.split(".")[0])
    assert not mods & set(FORBIDDEN), mods


def test_detection_modules_run_with_torch_and_scipy_unimportable():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in %r:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        from edgetl.runtime.detect import PostprocessSpec, postprocess
        from edgetl.runtime.track import LineCounter, Tracker
        a = np.array([[0, 0, 10, 10]], np.float32)
        d = postprocess(np.zeros((1, 4), np.float32), np.array([[0, 4]], np.float32), PostprocessSpec(a))
        Tracker(min_hits=1).update(d)
        assert not any(m.split(".")[0] in %r for m in sys.modules)
        print("ok")
    """ % (FORBIDDEN, FORBIDDEN))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_math_constant_is_torchvisions():
    from edgetl.runtime.detect import BBOX_XFORM_CLIP
    assert BBOX_XFORM_CLIP == math.log(1000.0 / 16)


def test_merge_classes_keeps_one_box_per_object_whatever_its_class():
    """A cell scored as both classes keeps its best box; a neighbour of another class stays."""
    from edgetl.runtime.detect import Detections, merge_classes

    d = Detections(np.array([[0, 0, 10, 10], [0.5, 0, 10, 10], [20, 0, 30, 10]], np.float32),
                   np.array([0.4, 0.45, 0.9], np.float32), np.array([0, 1, 0], np.int64))
    m = merge_classes(d)
    assert len(m) == 2 and sorted(m.scores.tolist()) == pytest.approx([0.45, 0.9])
    assert m.classes.tolist() == [1, 0]  # the winner's class, input order kept
    assert len(merge_classes(d.select(np.array([0])))) == 1


# ---- objects: P(object) = 1 - P(background), one NMS over every class ------------------------------

def torchvision_objects(anchors, raw, logits, thr=0.3, iou=0.5, topk=200, max_det=100, size=(H, W)):
    """The same decode written with torch and torchvision's own BoxCoder, clip_boxes_to_image and nms."""
    torch = pytest.importorskip("torch")
    from torchvision.models.detection import _utils as det_utils
    from torchvision.ops import boxes as box_ops

    probs = torch.softmax(torch.from_numpy(logits), -1)
    obj = probs[:, 1:].sum(1)
    idx = torch.nonzero(obj > thr).flatten()
    idx = idx[torch.argsort(-obj[idx], stable=True)][:topk]
    boxes = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(torch.from_numpy(raw)[idx],
                                                                     torch.from_numpy(anchors)[idx])
    boxes = box_ops.clip_boxes_to_image(boxes, size)
    keep = box_ops.nms(boxes, obj[idx], iou)[:max_det]
    return boxes[keep].numpy(), obj[idx][keep].numpy(), probs[idx][keep][:, 1:].argmax(1).numpy()


@pytest.mark.parametrize("seed", range(4))
def test_postprocess_objects_equals_a_torchvision_decode(seed):
    from edgetl.runtime.detect import postprocess_objects

    anchors, raw, logits = scene(seed)
    spec = PostprocessSpec(anchors, image_size=(H, W))
    dets = postprocess_objects(raw, logits, spec)
    assert len(dets) > 10 and (np.diff(dets.scores) <= 0).all()
    assert_same(dets, torchvision_objects(anchors, raw, logits))
    for thr, iou, topk, max_det in ((0.6, 0.3, 50, 20), (0.9, 0.7, 400, 300)):
        spec = PostprocessSpec(anchors, score_threshold=thr, nms_iou=iou, candidates_per_class=topk,
                               max_detections=max_det, image_size=(H, W))
        assert_same(postprocess_objects(raw, logits, spec), torchvision_objects(anchors, raw, logits, thr, iou, topk,
                                                                                 max_det))


def test_an_object_of_doubtful_class_is_one_confident_box():
    """Background 0.05, defective 0.50, functional 0.45: per class two boxes (or none at 0.5); as an
    object one box scored 0.95, labelled defective; a second anchor over it of the other class is
    suppressed across classes, a distant one stays."""
    from edgetl.runtime.detect import postprocess_objects

    anchors = np.array([[10, 10, 60, 60], [12, 10, 62, 60], [200, 100, 250, 150]], np.float32)
    logits = np.log(np.array([[0.05, 0.50, 0.45], [0.10, 0.40, 0.50], [0.20, 0.10, 0.70]], np.float32))
    raw = np.zeros((3, 4), np.float32)
    spec = PostprocessSpec(anchors, score_threshold=0.5, image_size=(H, W))
    per_class = postprocess(raw, logits, spec)
    assert per_class.classes.tolist() == [1]  # only the distant functional box clears 0.5 for its class
    objects = postprocess_objects(raw, logits, spec)
    assert objects.classes.tolist() == [0, 1] and objects.scores == pytest.approx([0.95, 0.80])
    np.testing.assert_array_equal(objects.boxes, anchors[[0, 2]])
    assert len(postprocess_objects(raw, logits, spec, score_threshold=0.96)) == 0


def test_object_threshold_round_trips_and_is_checked():
    anchors = scene(0, a=10)[0]
    spec = PostprocessSpec.from_manifest(dict(good_section(), object_threshold=0.45), anchors)
    assert spec.object_threshold == 0.45 and spec.to_manifest() == dict(good_section(), object_threshold=0.45)
    assert PostprocessSpec.from_manifest(good_section(), anchors).object_threshold is None  # a 2.0 run
    assert "object_threshold" not in PostprocessSpec.from_manifest(good_section(), anchors).to_manifest()
    for bad in (1.0, -0.1, "0.4", True):
        with pytest.raises(ManifestError) as err:
            PostprocessSpec.from_manifest(dict(good_section(), object_threshold=bad), anchors)
        assert "postprocess.object_threshold" in err.value.message
