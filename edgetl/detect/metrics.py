"""Detection metrics: COCO mAP (through pycocotools) and float-vs-quantized detection agreement.

mAP is pycocotools' ``COCOeval`` (``bbox``), not a re-implementation, so the numbers edgetl reports
are the ones every detection paper and tool reports. Settings, fixed: IoU thresholds 0.50:0.05:0.95,
101-point interpolated precision, area range ``all`` only (no small/medium/large split), and
``maxDets`` = 100 -- which pycocotools applies per image *and per class* (the top 100 detections of
each class in each image count). A class without ground truth anywhere has no AP (COCOeval's -1) and
is left out of the mean, as COCOeval does; images without ground truth still count: a detection on
them is a false positive. Boxes are xyxy in pixels (``edgetl.detect`` conventions); pycocotools' IoU
uses continuous coordinates (no "+1"), the same as ours.

For the gate's paired bootstrap, :func:`coco_evaluate` also returns the per-image matching of the
COCOeval run (:class:`ImageMatches`), and :func:`map50_resampled` re-accumulates mAP@0.5 for any
multiset of images exactly as ``COCOeval.accumulate`` would on those images relabelled (the
per-image matching does not depend on the other images), without re-running the matching: a
bootstrap of 200 resamples then costs milliseconds per resample instead of a COCOeval run each.

:func:`match_detections` / :func:`detection_agreement` are hand-written (they are not mAP): how many
of the quantized model's detections are the float model's (same class, IoU >= 0.5, one to one).

pycocotools is imported inside the functions: it is in the ``train`` and ``detect`` extras, and the device runtime
never imports this module.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..runtime.errors import EdgetlError, MissingDependencyError

MAX_DETS = 100  # COCOeval maxDets (per image and per class, as pycocotools applies it)
AREA_ALL = [0.0, 1e5 ** 2]  # COCOeval's "all" area range
Gt = tuple  # (boxes (N, 4) xyxy, classes (N,))
Det = tuple  # (boxes (N, 4) xyxy, scores (N,), classes (N,))


# ------------------------------------------------------------------------------------------
# COCO mAP
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageMatches:
    """Per class, the COCOeval matching at IoU 0.5 of every detection, grouped by image (images in
    order, each image's detections highest score first, as ``evaluateImg`` leaves them).

    ``scores[k]``, ``tp[k]``, ``fp[k]``: flat over the detections of class k; ``offsets[k]``
    (n_images + 1,): image i's detections are ``offsets[k][i]:offsets[k][i + 1]``; ``npig[k]``
    (n_images,): the ground-truth boxes of class k in image i that are not ignored."""

    n_images: int
    scores: tuple[np.ndarray, ...]
    tp: tuple[np.ndarray, ...]
    fp: tuple[np.ndarray, ...]
    offsets: tuple[np.ndarray, ...]
    npig: tuple[np.ndarray, ...]
    rec_thrs: np.ndarray


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise MissingDependencyError("pycocotools", "detect", "computing detection mAP") from None
    return COCO, COCOeval


def _check_inputs(gts: Sequence[Gt], dets: Sequence[Det], num_classes: int) -> None:
    if len(gts) != len(dets):
        raise EdgetlError(f"mAP: {len(gts)} images of ground truth but {len(dets)} of detections",
                          hint="pass one (boxes, scores, classes) per ground-truth image, empty arrays for none")
    for what, seq, ci in (("ground truth", gts, 1), ("detections", dets, 2)):
        for i, item in enumerate(seq):
            cls = np.asarray(item[ci]).reshape(-1)
            bad = cls[(cls < 0) | (cls >= num_classes)]
            if bad.size:
                raise EdgetlError(f"mAP: {what} of image {i} has class {int(bad[0])} outside 0..{num_classes - 1}",
                                  hint="classes are 0-based indices into the class names, no background class")
            n_boxes = np.asarray(item[0]).size // 4
            n_scores = np.asarray(item[1]).size if ci == 2 else len(cls)
            if not n_boxes == n_scores == len(cls):
                raise EdgetlError(f"mAP: {what} of image {i}: {n_boxes} boxes, {len(cls)} classes"
                                  + (f", {n_scores} scores" if ci == 2 else ""))


def _xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def _coco_objects(gts: Sequence[Gt], dets: Sequence[Det], num_classes: int):
    """The ground-truth and result COCO objects, built in memory. The result object is built like
    ``COCO.loadRes`` builds it for boxes (area w*h, iscrowd 0, ids from 1) because ``loadRes``
    asserts on an empty list (a model with no detection at all). Image ids are 1..n in order;
    annotation ids start at 1 (COCOeval reads id 0 as "unmatched")."""
    COCO, _ = _pycocotools()
    images = [{"id": i + 1} for i in range(len(gts))]
    cats = [{"id": k + 1, "name": str(k)} for k in range(num_classes)]
    gt_anns: list[dict[str, Any]] = []
    dt_anns: list[dict[str, Any]] = []
    for i, (g, d) in enumerate(zip(gts, dets)):
        for box, c in zip(_xywh(g[0]).tolist(), np.asarray(g[1]).reshape(-1).tolist()):
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": i + 1, "category_id": int(c) + 1, "bbox": box,
                            "area": box[2] * box[3], "iscrowd": 0})
        scores = np.asarray(d[1], np.float64).reshape(-1).tolist()
        for box, s, c in zip(_xywh(d[0]).tolist(), scores, np.asarray(d[2]).reshape(-1).tolist()):
            dt_anns.append({"id": len(dt_anns) + 1, "image_id": i + 1, "category_id": int(c) + 1, "bbox": box,
                            "score": float(s), "area": box[2] * box[3], "iscrowd": 0})
    objs = []
    for anns in (gt_anns, dt_anns):
        c = COCO()
        c.dataset = {"images": images, "categories": cats, "annotations": anns}
        with contextlib.redirect_stdout(io.StringIO()):
            c.createIndex()
        objs.append(c)
    return objs[0], objs[1], len(gt_anns), len(dt_anns)


def _run_cocoeval(gts: Sequence[Gt], dets: Sequence[Det], num_classes: int):
    """COCOeval evaluated and accumulated on our settings (area ``all``, maxDets 100), silenced."""
    _, COCOeval = _pycocotools()
    cgt, cdt, n_gt, n_det = _coco_objects(gts, dets, num_classes)
    ev = COCOeval(cgt, cdt, iouType="bbox")
    ev.params.imgIds = list(range(1, len(gts) + 1))
    ev.params.catIds = list(range(1, num_classes + 1))
    ev.params.areaRng = [AREA_ALL]
    ev.params.areaRngLbl = ["all"]
    ev.params.maxDets = [MAX_DETS]
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    return ev, n_gt, n_det


def _mean_defined(s: np.ndarray) -> float:
    """COCOeval.summarize's mean: over the entries > -1 (classes with ground truth); nan when none."""
    s = s[s > -1]
    return float(np.mean(s)) if s.size else float("nan")


def _image_matches(ev, n_images: int, num_classes: int) -> ImageMatches:
    """The IoU-0.5 matching of ``ev.evalImgs`` (ordered class, area range (one), image)."""
    out: dict[str, list[np.ndarray]] = {"scores": [], "tp": [], "fp": [], "offsets": [], "npig": []}
    for k in range(num_classes):
        evs = ev.evalImgs[k * n_images:(k + 1) * n_images]
        sc, tp, fp, counts, npig = [], [], [], [], []
        for e in evs:
            if e is None:
                counts.append(0)
                npig.append(0)
                continue
            s = np.asarray(e["dtScores"][:MAX_DETS], np.float64)
            m = np.asarray(e["dtMatches"][0, :MAX_DETS]) != 0
            ig = np.asarray(e["dtIgnore"][0, :MAX_DETS]).astype(bool)
            sc.append(s)
            tp.append(m & ~ig)
            fp.append(~m & ~ig)
            counts.append(len(s))
            npig.append(int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)))
        cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
        out["scores"].append(cat(sc, np.float64))
        out["tp"].append(cat(tp, bool))
        out["fp"].append(cat(fp, bool))
        out["offsets"].append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        out["npig"].append(np.asarray(npig, np.int64))
    return ImageMatches(n_images, *(tuple(out[key]) for key in ("scores", "tp", "fp", "offsets", "npig")),
                        rec_thrs=np.asarray(ev.params.recThrs, np.float64))


def coco_evaluate(gts: Sequence[Gt], dets: Sequence[Det], num_classes: int,
                  class_names: Sequence[str] | None = None) -> tuple[dict[str, Any], ImageMatches]:
    """:func:`coco_map`'s result and the per-image matching behind it (for :func:`map50_resampled`),
    from one COCOeval run."""
    _check_inputs(gts, dets, num_classes)
    names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    if len(names) != num_classes:
        raise EdgetlError(f"mAP: {len(names)} class names for {num_classes} classes")
    ev, n_gt, n_det = _run_cocoeval(gts, dets, num_classes)
    prec = ev.eval["precision"][:, :, :, 0, 0]  # (T iou thresholds, R recall points, K classes)
    per_class = []
    for k in range(num_classes):
        n_k = int(sum(np.count_nonzero(np.asarray(g[1]).reshape(-1) == k) for g in gts))
        defined = bool((prec[:, :, k] > -1).any())
        per_class.append({"class": names[k], "ap50": float(np.mean(prec[0, :, k])) if defined else None,
                          "ap": float(np.mean(prec[:, :, k])) if defined else None, "n_gt": n_k})
    result = {"map50": _mean_defined(prec[0]), "map": _mean_defined(prec), "per_class": per_class,
              "n_images": len(gts), "n_gt": n_gt, "n_det": n_det}
    return result, _image_matches(ev, len(gts), num_classes)


def coco_map(gts: Sequence[Gt], dets: Sequence[Det], num_classes: int,
             class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """COCO mAP of ``dets`` against ``gts`` (one entry per image, in the same order).

    ``gts[i]`` = (boxes (N, 4) xyxy, classes (N,) 0-based); ``dets[i]`` = (boxes, scores, classes).
    Returns ``{"map50", "map" (IoU 0.5:0.95), "per_class": [{"class", "ap50", "ap", "n_gt"}],
    "n_images", "n_gt", "n_det"}``, values 0..1. A class without ground truth has ``ap50``/``ap``
    None and is not in the means; with no ground truth at all the maps are nan (undefined). No
    detection at all gives 0.0 (not a pycocotools crash). Evaluate at a low score threshold (COCO
    uses 0.01): mAP is over the detector's whole ranking."""
    return coco_evaluate(gts, dets, num_classes, class_names)[0]


def _gather(offsets: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Positions of the flat detections of images ``idx`` (with repeats), image after image."""
    lens = offsets[1:][idx] - offsets[:-1][idx]
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    return np.repeat(offsets[:-1][idx] - (np.cumsum(lens) - lens), lens) + np.arange(total)


def map50_resampled(m: ImageMatches, idx: np.ndarray) -> float:
    """mAP@0.5 of the images ``idx`` (indices, repeats allowed), as ``COCOeval.accumulate`` computes
    it for those images relabelled 1..len(idx) in that order: concatenate their detections, stable
    sort by score, cumulative TP/FP, precision made monotone, sampled at the 101 recall points;
    classes without ground truth in the resample left out. nan when no class has any."""
    idx = np.asarray(idx, np.int64)
    k_all = len(m.scores)
    prec = -np.ones((len(m.rec_thrs), k_all))
    for k in range(k_all):
        npig = int(m.npig[k][idx].sum())
        if npig == 0:
            continue
        pos = _gather(m.offsets[k], idx)
        order = np.argsort(-m.scores[k][pos], kind="mergesort")
        tp = np.cumsum(m.tp[k][pos][order]).astype(float)
        fp = np.cumsum(m.fp[k][pos][order]).astype(float)
        q = np.zeros(len(m.rec_thrs))
        if len(tp):
            rc = tp / npig
            pr = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[::-1])[::-1]
            inds = np.searchsorted(rc, m.rec_thrs, side="left")
            ok = inds < len(pr)
            q[ok] = pr[inds[ok]]
        prec[:, k] = q
    return _mean_defined(prec)


# ------------------------------------------------------------------------------------------
# Agreement (hand-written: not mAP)
# ------------------------------------------------------------------------------------------

def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of xyxy boxes, continuous coordinates (no +1)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def match_pairs(a_boxes: np.ndarray, a_classes: np.ndarray, b_boxes: np.ndarray, b_classes: np.ndarray,
                iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching, highest IoU first, same class, IoU >= ``iou``: index arrays
    ``(ia, ib)`` of the matched pairs.

    Vectorised in rounds: a pair that is the best of both its row and its column is taken by the
    greedy order (every pair above it involves another row and another column), so each round takes
    all such mutual-best pairs at once and removes their rows and columns."""
    ov = box_iou(a_boxes, b_boxes)
    same = np.asarray(a_classes).reshape(-1)[:, None] == np.asarray(b_classes).reshape(-1)[None, :]
    ov = np.where(same & (ov >= iou), ov, -1.0)
    ia_all, ib_all = [], []
    while ov.size and (ov >= 0).any():
        row_best = ov.argmax(1)
        col_best = ov.argmax(0)
        rows = np.arange(ov.shape[0])
        take = (ov[rows, row_best] >= 0) & (col_best[row_best] == rows)
        ia, ib = rows[take], row_best[take]
        ia_all.append(ia)
        ib_all.append(ib)
        ov[ia, :] = -1.0
        ov[:, ib] = -1.0
    if not ia_all:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ia_all).astype(np.int64), np.concatenate(ib_all).astype(np.int64)


def match_detections(a_boxes: np.ndarray, a_classes: np.ndarray, b_boxes: np.ndarray, b_classes: np.ndarray,
                     iou: float = 0.5) -> int:
    """How many detections of ``a`` and ``b`` match one to one (:func:`match_pairs`)."""
    return len(match_pairs(a_boxes, a_classes, b_boxes, b_classes, iou)[0])


def agreement_from_counts(matched: int, n_float: int, n_quant: int) -> dict[str, Any]:
    """F1 / precision / recall of the quantized detections against the float ones. With nothing on
    one side the ratio is 1 (nothing of it was wrong); F1 is 1 when neither detects anything."""
    total = n_float + n_quant
    return {"f1": 2.0 * matched / total if total else 1.0,
            "precision": matched / n_quant if n_quant else 1.0,
            "recall": matched / n_float if n_float else 1.0,
            "matched": int(matched), "n_float": int(n_float), "n_quant": int(n_quant)}


def detection_agreement(float_dets: Sequence[Det], quant_dets: Sequence[Det], iou: float = 0.5) -> dict[str, Any]:
    """How far the quantized model detects what the float model detects, over all images: the
    float detections are the reference, a quantized one agrees when it matches one (same class,
    IoU >= ``iou``, one to one, :func:`match_pairs`). Returns ``{"f1", "precision" (matched /
    n_quant), "recall" (matched / n_float), "matched", "n_float", "n_quant"}``. Hand-written: it is
    not mAP (no ranking, no ground truth), it measures whether the device shows the same boxes."""
    if len(float_dets) != len(quant_dets):
        raise EdgetlError(f"agreement: {len(float_dets)} images of float detections, {len(quant_dets)} of quantized")
    matched = n_f = n_q = 0
    for f, q in zip(float_dets, quant_dets):
        matched += match_detections(f[0], f[2], q[0], q[2], iou)
        n_f += len(np.asarray(f[2]).reshape(-1))
        n_q += len(np.asarray(q[2]).reshape(-1))
    return agreement_from_counts(matched, n_f, n_q)


__all__ = ["ImageMatches", "MAX_DETS", "agreement_from_counts", "box_iou", "coco_evaluate", "coco_map",
           "detection_agreement", "map50_resampled", "match_detections", "match_pairs"]
