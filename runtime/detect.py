"""Detection post-processing on the device: raw SSD outputs -> boxes, and what is drawn and printed.

Torch-free (numpy + OpenCV) and written to give what torchvision's ``SSD.postprocess_detections``
gives, because the host trains and evaluates (mAP, the gate) with torchvision's SSD: a box the host
counted is a box the device shows. The conventions (box format, raw outputs, anchors, the manifest's
``postprocess`` section) are in ``edgetl/detect/__init__.py``.

Per image (:func:`postprocess`): softmax over the ``C + 1`` logits; decode every anchor's regression
(:func:`decode_boxes`, torchvision ``BoxCoder.decode_single``); clip the boxes to the model input
(torchvision does, before NMS: the IoU of a box that leaves the image is that of its visible part);
per class ``k >= 1``: scores ``> score_threshold``, the best ``candidates_per_class``; class-aware NMS
at ``nms_iou``; the ``max_detections`` best overall. Classes come out 0-based (``k - 1``).
:func:`postprocess_objects` decodes the same outputs as objects whatever their class (score
``1 - P(background)``, the likeliest class, one NMS): what tracking, counting and the class-agnostic
metrics use.

Clipping needs the model input's size: :class:`PostprocessSpec` carries it as ``image_size`` (H, W),
from ``manifest.preprocess.input_size`` (``PostprocessSpec.from_manifest(section, anchors,
image_size=...)``). Without it boxes are not clipped before NMS (only :func:`to_frame` clips, to the
frame), which differs from torchvision for boxes that cross the border.

NMS is a small numpy implementation, not ``cv2.dnn.NMSBoxesBatched``: OpenCV computes the overlap as
``1 - jaccardDistance`` in double and suppresses zero-area boxes as if they overlapped fully (its
distance is 0 when both areas are 0), while torchvision's ``nms`` computes IoU in float32 and keeps
them (0/0 is NaN, never above the threshold); after clipping, zero-width boxes on the border are
common. Ties (equal scores, frequent with a quantized model) are broken by the lower anchor index,
deterministically; torchvision's ``topk``/``sort`` leave their order unspecified.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np

from .errors import EdgetlError, ManifestError
from .preprocess import PreprocessSpec

BBOX_XFORM_CLIP = math.log(1000.0 / 16)  # torchvision's BoxCoder: no exp() of a larger dw/dh
POSTPROCESS_KINDS = ("ssd",)


# ---- the spec (manifest.postprocess) -------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # eq=False: anchors are an array (== would be elementwise)
class PostprocessSpec:
    """How raw SSD outputs become boxes. ``image_size`` (H, W) of the model input: boxes are clipped
    to it before NMS as torchvision does (None: not clipped). It is not written to the manifest
    (``manifest.preprocess.input_size`` holds it)."""

    anchors: np.ndarray  # (A, 4) float32 xyxy in model-input pixels
    box_coder_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    score_threshold: float = 0.3
    nms_iou: float = 0.5
    max_detections: int = 100
    candidates_per_class: int = 200
    image_size: Optional[Tuple[int, int]] = None
    # the score threshold of postprocess_objects (P(object)), chosen on the validation split by the
    # training; None (runs before schema 2.1): tracking merges the per-class boxes (merge_classes)
    object_threshold: Optional[float] = None

    def __post_init__(self) -> None:
        anchors = np.asarray(self.anchors, dtype=np.float32)
        if anchors.ndim != 2 or anchors.shape[1] != 4 or len(anchors) == 0:
            raise ManifestError(f"postprocess anchors have shape {anchors.shape}, not (A, 4)",
                                hint="the artifact is damaged or was not made by edgetl: rebuild it")
        object.__setattr__(self, "anchors", anchors)
        object.__setattr__(self, "box_coder_weights", tuple(float(v) for v in self.box_coder_weights))
        if self.image_size is not None:
            object.__setattr__(self, "image_size", (int(self.image_size[0]), int(self.image_size[1])))

    @property
    def tracking_threshold(self) -> Optional[float]:
        """The objects' threshold the device tracks and counts at: ``object_threshold``, never below
        ``score_threshold`` (``edgetl.detect.train.choose_object_threshold`` says why; runs trained
        before that floor stored lower ones); None without an objects' threshold."""
        if self.object_threshold is None:
            return None
        return max(float(self.object_threshold), float(self.score_threshold))

    @classmethod
    def from_manifest(cls, section: Mapping[str, Any], anchors: np.ndarray,
                      image_size: Optional[Sequence[int]] = None) -> "PostprocessSpec":
        """``manifest.postprocess`` (anchors already loaded with :func:`load_anchors`) -> a spec; a bad
        key or value is a one-line :class:`ManifestError` naming it. Pass ``image_size`` =
        ``manifest.preprocess.input_size`` to clip as torchvision does."""
        if not isinstance(section, Mapping):
            raise ManifestError(f"manifest key 'postprocess' is a {type(section).__name__}, not a mapping",
                                hint="the artifact is damaged or was not made by edgetl: rebuild it")
        known = {"kind", "anchors", "box_coder_weights", "score_threshold", "nms_iou", "max_detections",
                 "candidates_per_class", "object_threshold"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ManifestError(f"unknown postprocess key(s): {', '.join(map(str, unknown))}",
                                hint=f"a newer edgetl probably wrote this artifact: install that edgetl version on this "
                                     f"device, or rebuild the artifact with this one; "
                                     f"known keys are {sorted(known)}")
        kind = section.get("kind", "ssd")
        _need(kind in POSTPROCESS_KINDS, "kind", kind, f"one of {POSTPROCESS_KINDS} (a newer edgetl wrote it?)")
        _need(isinstance(section.get("anchors", ""), str), "anchors", section.get("anchors"), "a file name")
        weights = section.get("box_coder_weights", (10.0, 10.0, 5.0, 5.0))
        _need(isinstance(weights, (list, tuple)) and len(weights) == 4 and all(_is_number(w) and w > 0 for w in weights),
              "box_coder_weights", weights, "four positive numbers, e.g. [10, 10, 5, 5]")
        score = section.get("score_threshold", 0.3)
        _need(_is_number(score) and 0.0 <= score < 1.0, "score_threshold", score, "a probability in [0, 1)")
        obj = section.get("object_threshold")
        _need(obj is None or (_is_number(obj) and 0.0 <= obj < 1.0), "object_threshold", obj, "a probability in [0, 1)")
        iou = section.get("nms_iou", 0.5)
        _need(_is_number(iou) and 0.0 < iou <= 1.0, "nms_iou", iou, "an IoU in (0, 1]")
        for key, default in (("max_detections", 100), ("candidates_per_class", 200)):
            v = section.get(key, default)
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, key, v, "an integer >= 1")
        return cls(anchors=anchors, box_coder_weights=tuple(weights), score_threshold=float(score),
                   nms_iou=float(iou), max_detections=int(section.get("max_detections", 100)),
                   candidates_per_class=int(section.get("candidates_per_class", 200)),
                   image_size=None if image_size is None else tuple(image_size),
                   object_threshold=None if obj is None else float(obj))

    def to_manifest(self, anchors_file: str = "anchors.npy") -> Dict[str, Any]:
        """The ``manifest.postprocess`` section (the anchors themselves go to ``anchors_file``)."""
        out = {"kind": "ssd", "anchors": anchors_file, "box_coder_weights": list(self.box_coder_weights),
               "score_threshold": self.score_threshold, "nms_iou": self.nms_iou,
               "max_detections": self.max_detections, "candidates_per_class": self.candidates_per_class}
        if self.object_threshold is not None:
            out["object_threshold"] = self.object_threshold
        return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ManifestError(f"postprocess.{key} = {value!r} is not valid", hint=f"give {what}")


def load_anchors(data: bytes, where: str) -> np.ndarray:
    """The bytes of ``anchors.npy`` -> ``(A, 4)`` float32. Never unpickles (an artifact is data, not
    code); refuses a wrong shape, a non-finite value or an empty box, naming ``where``."""
    hint = "the artifact is damaged or was not made by edgetl: rebuild it"
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ManifestError(f"{where}: not a numpy .npy array of anchors ({str(exc).splitlines()[0][:120]})",
                            hint=hint) from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise ManifestError(f"{where}: an .npz archive, not a .npy array of anchors", hint=hint)
    if arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] == 0 or arr.dtype.kind != "f":
        raise ManifestError(f"{where}: anchors must be a float array of shape (A, 4), got {arr.dtype} {arr.shape}",
                            hint=hint)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ManifestError(f"{where}: anchors hold NaN or infinite values", hint=hint)
    if not ((arr[:, 0] < arr[:, 2]) & (arr[:, 1] < arr[:, 3])).all():
        raise ManifestError(f"{where}: some anchors are empty (x1 >= x2 or y1 >= y2)", hint=hint)
    return arr


# ---- detections ----------------------------------------------------------------------------------

@dataclass(eq=False)  # arrays: == would be elementwise
class Detections:
    """Boxes of one image: ``boxes`` (N, 4) float32 xyxy, ``scores`` (N,) float32, ``classes`` (N,)
    int64 0-based, best score first when they come from :func:`postprocess`."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        self.classes = np.asarray(self.classes, np.int64).reshape(-1)
        if not len(self.boxes) == len(self.scores) == len(self.classes):
            raise ValueError(f"Detections: {len(self.boxes)} boxes, {len(self.scores)} scores, "
                             f"{len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, mask_or_index: Any) -> "Detections":
        """The detections at a boolean mask or an index array (a copy)."""
        return Detections(self.boxes[mask_or_index], self.scores[mask_or_index], self.classes[mask_or_index])

    @staticmethod
    def empty() -> "Detections":
        return Detections()


def decode_boxes(raw: np.ndarray, anchors: np.ndarray,
                 weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)) -> np.ndarray:
    """Box regressions ``(A, 4)`` against ``anchors`` ``(A, 4)`` -> boxes ``(A, 4)`` float32 xyxy.

    torchvision ``BoxCoder.decode_single`` operation for operation in float32 (dw/dh clamped at
    log(1000/16) so exp() cannot overflow), so the boxes match the host's to the last bits of exp()."""
    rel = np.asarray(raw, np.float32)
    a = np.asarray(anchors, np.float32)
    f32 = np.float32
    widths = a[:, 2] - a[:, 0]
    heights = a[:, 3] - a[:, 1]
    ctr_x = a[:, 0] + f32(0.5) * widths
    ctr_y = a[:, 1] + f32(0.5) * heights
    wx, wy, ww, wh = (f32(w) for w in weights)
    dx, dy = rel[:, 0] / wx, rel[:, 1] / wy
    dw = np.minimum(rel[:, 2] / ww, f32(BBOX_XFORM_CLIP))
    dh = np.minimum(rel[:, 3] / wh, f32(BBOX_XFORM_CLIP))
    pcx = dx * widths + ctr_x
    pcy = dy * heights + ctr_y
    half_w = f32(0.5) * (np.exp(dw) * widths)
    half_h = f32(0.5) * (np.exp(dh) * heights)
    return np.stack((pcx - half_w, pcy - half_h, pcx + half_w, pcy + half_h), axis=1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float32)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _candidates(scores: np.ndarray, threshold: float, per_class: int) -> Tuple[np.ndarray, np.ndarray]:
    """(anchor, class) pairs above ``threshold`` (float32 comparison, as torch), the ``per_class``
    best of each class, grouped by class and best first inside it (ties: lower anchor first).
    Vectorised: one lexsort instead of a loop with a top-k per class."""
    fg = scores[:, 1:]
    anchor, cls = np.nonzero(fg > np.float32(threshold))
    s = fg[anchor, cls]
    order = np.lexsort((anchor, -s, cls))  # last key first: class, then score descending, then anchor
    anchor, cls = anchor[order], cls[order]
    if len(cls):
        starts = np.flatnonzero(np.r_[True, cls[1:] != cls[:-1]])
        rank = np.arange(len(cls)) - np.repeat(starts, np.diff(np.r_[starts, len(cls)]))
        keep = rank < per_class
        anchor, cls = anchor[keep], cls[keep]
    return anchor, cls


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``(N, M)`` of xyxy boxes ``a`` (N, 4) and ``b`` (M, 4), in their dtype, with the same
    operations as torchvision's CPU ``nms`` kernel (continuous coordinates, no +1). Two zero-area
    boxes give NaN, which is never above a threshold (torchvision keeps such boxes too)."""
    ax1, ay1, ax2, ay2 = a.T
    bx1, by1, bx2, by2 = b.T
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    zero = np.zeros((), a.dtype)
    w = np.maximum(zero, np.minimum(ax2[:, None], bx2[None]) - np.maximum(ax1[:, None], bx1[None]))
    h = np.maximum(zero, np.minimum(ay2[:, None], by2[None]) - np.maximum(ay1[:, None], by1[None]))
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / ((area_a[:, None] + area_b[None]) - inter)


def _nms_sorted(boxes: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS of boxes already sorted best first -> indices kept (in order). The IoU matrix is
    computed once (n <= candidates_per_class), so the sequential part is one row-OR per kept box."""
    n = len(boxes)
    if n <= 1:
        return np.arange(n)
    over = box_iou(boxes, boxes).astype(np.float64) > iou  # torch compares the float IoU with a double
    removed = np.zeros(n, bool)
    keep = []
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        removed |= over[i]
    return np.asarray(keep, np.int64)


def merge_classes(dets: "Detections", iou: float = 0.7) -> "Detections":
    """One box per object whatever its class: class-aware NMS keeps a box of each class over an
    object whose class is uncertain (a cell scored 0.45 defective and 0.40 functional); a tracker
    would start a second track on the loser and a counting line count the object twice. Greedy,
    best score first, across classes, at a high IoU (``iou``) so neighbouring objects stay apart."""
    if len(dets) <= 1:
        return dets
    order = np.argsort(-dets.scores, kind="stable")
    keep = order[_nms_sorted(dets.boxes[order], iou)]
    return dets.select(np.sort(keep))


def _raw_outputs(raw_boxes: np.ndarray, raw_scores: np.ndarray, spec: PostprocessSpec) -> Tuple[np.ndarray, np.ndarray]:
    """One image's raw outputs, a leading batch axis of 1 dropped, checked against the anchors."""
    raw_boxes, raw_scores = np.asarray(raw_boxes), np.asarray(raw_scores)
    if raw_boxes.ndim == 3 and raw_boxes.shape[0] == 1:
        raw_boxes = raw_boxes[0]
    if raw_scores.ndim == 3 and raw_scores.shape[0] == 1:
        raw_scores = raw_scores[0]
    a = len(spec.anchors)
    if raw_boxes.shape != (a, 4) or raw_scores.ndim != 2 or raw_scores.shape[0] != a or raw_scores.shape[1] < 2:
        raise EdgetlError(f"the model's outputs {raw_boxes.shape} / {raw_scores.shape} do not fit the artifact's "
                          f"{a} anchors (boxes ({a}, 4), scores ({a}, C + 1))",
                          hint="the model and anchors.npy come from different runs: rebuild the artifact")
    return raw_boxes, raw_scores


def _decoded(raw_boxes: np.ndarray, anchor: np.ndarray, spec: PostprocessSpec) -> np.ndarray:
    """The candidates' boxes, clipped to the model input when its size is known (as torchvision)."""
    boxes = decode_boxes(raw_boxes[anchor], spec.anchors[anchor], spec.box_coder_weights)
    if spec.image_size is not None:
        h, w = spec.image_size
        np.clip(boxes[:, 0::2], 0, w, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, h, out=boxes[:, 1::2])
    return boxes


def postprocess(raw_boxes: np.ndarray, raw_scores: np.ndarray, spec: PostprocessSpec,
                score_threshold: Optional[float] = None) -> Detections:
    """ONE image's raw outputs (``raw_boxes`` (A, 4) regressions, ``raw_scores`` (A, C + 1) logits;
    a leading batch axis of 1 is accepted) -> :class:`Detections` in model-input pixels, best first.
    ``score_threshold`` overrides the spec's (a tracker wants the low-score boxes too)."""
    raw_boxes, raw_scores = _raw_outputs(raw_boxes, raw_scores, spec)
    thr = spec.score_threshold if score_threshold is None else float(score_threshold)
    scores = _softmax(raw_scores)
    anchor, cls = _candidates(scores, thr, spec.candidates_per_class)
    if len(anchor) == 0:
        return Detections.empty()
    boxes = _decoded(raw_boxes, anchor, spec)  # candidates only
    cand_scores = scores[anchor, cls + 1]
    kept: List[np.ndarray] = []
    bounds = np.flatnonzero(np.r_[True, cls[1:] != cls[:-1], True])
    for lo, hi in zip(bounds[:-1], bounds[1:]):  # class-aware NMS: each class alone (batched_nms)
        kept.append(lo + _nms_sorted(boxes[lo:hi], spec.nms_iou))
    keep = np.concatenate(kept)
    keep = keep[np.argsort(-cand_scores[keep], kind="stable")][:spec.max_detections]
    return Detections(boxes[keep], cand_scores[keep], cls[keep].astype(np.int64))


def postprocess_objects(raw_boxes: np.ndarray, raw_scores: np.ndarray, spec: PostprocessSpec,
                        score_threshold: Optional[float] = None) -> Detections:
    """Objects whatever their class, from the same raw outputs: an anchor's score is the probability
    that it holds an object, ``1 - P(background)`` (the sum of the class probabilities), its class the
    likeliest one; one NMS over every class at ``nms_iou``; the ``candidates_per_class`` best anchors
    are the candidates. Best first, at most ``max_detections``.

    :func:`postprocess` scores each class apart: a cell the model finds for sure but whose class it
    doubts (background 0.05, defective 0.50, functional 0.45) gives two half-confident boxes, one per
    class, or none above the threshold; here it gives one box scored 0.95 labelled defective. This is
    what finds and counts objects (``--track``, ``--count-line``) and the class-agnostic metrics."""
    raw_boxes, raw_scores = _raw_outputs(raw_boxes, raw_scores, spec)
    thr = spec.score_threshold if score_threshold is None else float(score_threshold)
    probs = _softmax(raw_scores)
    fg = probs[:, 1:]
    obj = fg.sum(axis=1)  # not 1 - p0: no cancellation when the background is near 1
    anchor = np.flatnonzero(obj > np.float32(thr))
    if len(anchor) == 0:
        return Detections.empty()
    anchor = anchor[np.lexsort((anchor, -obj[anchor]))][:spec.candidates_per_class]  # best first, ties by index
    boxes = _decoded(raw_boxes, anchor, spec)
    keep = _nms_sorted(boxes, spec.nms_iou)[:spec.max_detections]
    return Detections(boxes[keep], obj[anchor[keep]], fg[anchor[keep]].argmax(axis=1).astype(np.int64))


# ---- back to the frame ---------------------------------------------------------------------------

def _inverse_geometry(spec: PreprocessSpec, hw: Tuple[int, int]) -> Tuple[float, float, float, float]:
    """(sx, sy, tx, ty) with ``frame = model * s + t`` for an image of size ``hw`` preprocessed with
    ``spec``: the same sizes and offsets as ``preprocess._geometry`` computes (rounding included)."""
    out_h, out_w = spec.input_size
    h, w = int(hw[0]), int(hw[1])
    if spec.resize == "stretch":
        return w / out_w, h / out_h, 0.0, 0.0
    if spec.resize == "letterbox":
        scale = min(out_w / w, out_h / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        x0, y0 = (out_w - nw) // 2, (out_h - nh) // 2
        return w / nw, h / nh, -x0 * w / nw, -y0 * h / nh
    scale = spec.shorter_side / min(h, w)  # shorter_crop: the crop region, resized to the input
    crop_w = min(w, max(1, round(out_w / scale)))
    crop_h = min(h, max(1, round(out_h / scale)))
    x0, y0 = (w - crop_w) // 2, (h - crop_h) // 2
    return crop_w / out_w, crop_h / out_h, float(x0), float(y0)


def to_frame(dets: Detections, spec: PreprocessSpec, frame_hw: Tuple[int, int],
             offset: Tuple[int, int] = (0, 0)) -> Detections:
    """Boxes in model-input pixels -> boxes in frame pixels. ``frame_hw``: the (H, W) of the image
    that was preprocessed (the ROI crop when there is one); ``offset``: the crop's (x, y) in the frame.
    Boxes are clipped to the preprocessed image (a box in letterbox padding ends up zero-width; none
    is dropped, so the result stays aligned with ``dets``)."""
    if len(dets) == 0:
        return Detections.empty()
    sx, sy, tx, ty = _inverse_geometry(spec, frame_hw)
    h, w = frame_hw
    b = dets.boxes.astype(np.float64)
    b[:, 0::2] = np.clip(b[:, 0::2] * sx + tx, 0, w) + offset[0]
    b[:, 1::2] = np.clip(b[:, 1::2] * sy + ty, 0, h) + offset[1]
    return Detections(b.astype(np.float32), dets.scores.copy(), dets.classes.copy())


# ---- output: JSON, counts, overlay ---------------------------------------------------------------

def _label(labels: Sequence[str], k: int) -> str:
    return labels[k] if 0 <= k < len(labels) else f"class {k}"


def detections_json(dets: Detections, labels: Sequence[str], track_ids: Optional[Sequence[int]] = None
                    ) -> List[Dict[str, Any]]:
    """``[{"label", "class", "score", "box": [x1, y1, x2, y2], "id"?}]``: plain Python values, box
    rounded to 0.1 px and score to 0.001 (more digits are noise and bytes on every frame)."""
    out = []
    boxes = np.round(dets.boxes.astype(np.float64), 1).tolist()
    for i, (s, k) in enumerate(zip(dets.scores.tolist(), dets.classes.tolist())):
        item: Dict[str, Any] = {"label": _label(labels, k), "class": int(k), "score": round(float(s), 3),
                                "box": boxes[i]}
        if track_ids is not None:
            item["id"] = int(track_ids[i])
        out.append(item)
    return out


def class_counts(dets: Detections, labels: Sequence[str]) -> Dict[str, int]:
    """``{label: n}`` for every label (0 included, so the keys are the same on every frame)."""
    counts = {lab: 0 for lab in labels}
    ks, ns = np.unique(dets.classes, return_counts=True)
    for k, n in zip(ks.tolist(), ns.tolist()):
        lab = _label(labels, k)
        counts[lab] = counts.get(lab, 0) + n
    return counts


FONT = cv2.FONT_HERSHEY_SIMPLEX
# BGR, distinct hues that stay readable on video (tab10-like); class k uses PALETTE[k % 10]
PALETTE = ((180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
           (75, 86, 140), (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23))
LINE_COLOR = (0, 255, 255)


def class_color(k: int) -> Tuple[int, int, int]:
    return PALETTE[int(k) % len(PALETTE)]


def _text_color(bg: Tuple[int, int, int]) -> Tuple[int, int, int]:
    b, g, r = bg
    return (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)


def _put_label(img: np.ndarray, text: str, x: int, y: int, color: Tuple[int, int, int], s: float,
               thick: int) -> None:
    """Text on a filled box of ``color`` just above (x, y), or below it when there is no room."""
    (tw, th), base = cv2.getTextSize(text, FONT, s, thick)
    pad = max(2, thick)
    top = y - th - base - 2 * pad
    if top < 0:
        top = y
    cv2.rectangle(img, (x, top), (x + tw + 2 * pad, top + th + base + 2 * pad), color, -1)
    cv2.putText(img, text, (x + pad, top + pad + th), FONT, s, _text_color(color), thick, cv2.LINE_AA)


def _counts_lines(counts: Mapping[str, Any]) -> List[str]:
    """A line counter's ``{"in": {...}, "out": {...}, "total": n}`` or plain ``{label: n}`` -> text."""
    if isinstance(counts.get("in"), Mapping) and isinstance(counts.get("out"), Mapping):
        labs = list(dict.fromkeys(list(counts["in"]) + list(counts["out"])))
        lines = [f"crossed {counts.get('total', 0)}: in {sum(counts['in'].values())}  "
                 f"out {sum(counts['out'].values())}"]
        return lines + [f"{lab}: in {counts['in'].get(lab, 0)}  out {counts['out'].get(lab, 0)}" for lab in labs]
    return [f"{lab}: {n}" for lab, n in counts.items()]


def _draw_panel(img: np.ndarray, lines: List[str], s: float, thick: int) -> None:
    """Text lines on a black panel in the top-right corner (the top-left is the FPS overlay's)."""
    pad = max(4, round(8 * s))
    sizes = [cv2.getTextSize(t, FONT, s, thick) for t in lines]
    width = max(tw for (tw, _), _ in sizes) + 2 * pad
    x0 = max(0, img.shape[1] - width - pad)
    y = pad
    for text, ((_, th), base) in zip(lines, sizes):
        cv2.rectangle(img, (x0, y), (x0 + width, y + th + base + pad), (0, 0, 0), -1)
        cv2.putText(img, text, (x0 + pad, y + th + pad // 2), FONT, s, (255, 255, 255), thick, cv2.LINE_AA)
        y += th + base + pad


def _draw_line(img: np.ndarray, line: Sequence[int], thick: int, s: float) -> None:
    """The counting segment, with an arrow from its middle towards the "in" side (positive cross
    product, see ``track.LineCounter``)."""
    x1, y1, x2, y2 = (int(v) for v in line)
    cv2.line(img, (x1, y1), (x2, y2), LINE_COLOR, thick + 1, cv2.LINE_AA)
    length = math.hypot(x2 - x1, y2 - y1) or 1.0
    nx, ny = -(y2 - y1) / length, (x2 - x1) / length  # unit normal on the positive side
    mx, my = (x1 + x2) / 2, (y1 + y2) / 2
    tip = (int(mx + nx * 40 * s), int(my + ny * 40 * s))
    cv2.arrowedLine(img, (int(mx), int(my)), tip, LINE_COLOR, thick, cv2.LINE_AA, tipLength=0.4)
    cv2.putText(img, "in", (tip[0] + 4, tip[1]), FONT, 0.6 * s, LINE_COLOR, thick, cv2.LINE_AA)


def draw_detections(frame: np.ndarray, dets: Detections, labels: Sequence[str],
                    track_ids: Optional[Sequence[int]] = None, line: Optional[Sequence[int]] = None,
                    counts: Optional[Mapping[str, Any]] = None) -> np.ndarray:
    """Draw in place on a BGR uint8 frame (boxes in frame pixels) and return it: a box and
    ``"label 0.87"`` (``"#id label 0.87"`` when tracked) per detection in its class colour, the
    counting line, and a counts panel (a line counter's counts or :func:`class_counts`)."""
    h = frame.shape[0]
    s = max(0.4, h / 720.0)
    thick = max(2, round(2 * s))
    boxes = np.round(dets.boxes).astype(np.int64).tolist()
    for i, ((x1, y1, x2, y2), score, k) in enumerate(zip(boxes, dets.scores.tolist(), dets.classes.tolist())):
        color = class_color(k)
        cv2.rectangle(frame, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), color, thick)
        text = f"{_label(labels, k)} {score:.2f}"
        if track_ids is not None:
            text = f"#{int(track_ids[i])} {text}"
        _put_label(frame, text, x1, y1, color, 0.55 * s, max(1, thick - 1))
    if line is not None:
        _draw_line(frame, line, thick, s)
    if counts:
        _draw_panel(frame, _counts_lines(counts), 0.55 * s, max(1, thick - 1))
    return frame
