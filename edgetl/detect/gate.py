"""The detection gate: does the quantized detector, as the device runs it, still find what the float
one finds?

The detection counterpart of :mod:`edgetl.check` (whose result keys it mirrors where they mean the
same). The artifact's ``checkset.npz`` (:class:`DetCheckset`) holds held-out images preprocessed by
the deploy preprocessing, their ground-truth boxes (in model-input pixels) and the float model's raw
outputs. :func:`evaluate_detection` takes the quantized model's raw outputs on the same inputs,
decodes both through the device's own post-processing (``edgetl.runtime.detect.postprocess``:
softmax, box decoding, score threshold, NMS) and reports:

* mAP@0.5 and mAP@0.5:0.95 of both (pycocotools, :mod:`edgetl.detect.metrics`), on detections at
  a low score threshold (0.01, as COCO evaluation does: a detector's mAP is over its whole ranking,
  a deployment threshold would cut the curve short and make mAP depend on it);
* the drop in points of mAP@0.5 (float - quantized) with a paired bootstrap 95% CI over images
  (both maps recomputed on the same resample, exactly as COCOeval would on the resampled images);
* detection agreement at the *deployed* score threshold: F1 of the quantized detections matched one
  to one to the float ones (same class, IoU >= 0.5), with a bootstrap CI over images: what the
  device shows must be what float shows, whatever the ground truth says;
* per-class AP@0.5 of both, and the box error (px) of matched pairs;
* ``disagreement``: how many detections found no partner (float or quantized) and how many of them
  scored within :data:`NEAR_BAND` above the deployed threshold (a box near the threshold that the
  other model scored just under it). Reported, never part of the verdict.

Verdict: passed iff ``drop <= max_map_drop`` and ``agreement >= min_agreement`` (a value on the
threshold passes; a 1e-9 tolerance keeps float rounding of an exact boundary from flipping it).

No torch here: the gate runs on a device. numpy + pycocotools (the ``train`` extra).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..runtime.errors import EdgetlError
from .metrics import (agreement_from_counts, coco_evaluate, detection_agreement, map50_resampled, match_pairs)

CHECKSET_NAME = "checkset.npz"
MAP_SCORE_THRESHOLD = 0.01  # the score threshold mAP is computed at (COCO's convention)
MATCH_IOU = 0.5  # agreement: a quantized detection matches a float one at IoU >= this, same class
EPS = 1e-9  # a drop or agreement exactly on its threshold passes despite float rounding
NEAR_BAND = 0.1  # reported: disagreeing detections scoring under deployed + this sat near the threshold


# ------------------------------------------------------------------------------------------
# Thresholds
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DetThresholds:
    """When the detection gate passes. ``max_map_drop``: points of mAP@0.5 (float - quantized);
    ``min_agreement``: detection F1 0..1 at the deployed score threshold; ``score_threshold``: that
    threshold, None = the manifest's (``postprocess.score_threshold``)."""

    max_map_drop: float = 1.0
    min_agreement: float = 0.95
    score_threshold: float | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.max_map_drop <= 100):
            raise EdgetlError(f"max_map_drop {self.max_map_drop} is not valid",
                              hint="give the allowed mAP@0.5 drop in points, 0..100 (e.g. 1.0)")
        if not 0 <= self.min_agreement <= 1:
            raise EdgetlError(f"min_agreement {self.min_agreement} is not valid",
                              hint="give a detection F1 0..1 (e.g. 0.95)")
        if self.score_threshold is not None and not 0 <= self.score_threshold < 1:
            raise EdgetlError(f"score_threshold {self.score_threshold} is not valid", hint="give a score 0..1")

    @classmethod
    def coerce(cls, obj: Any = None) -> "DetThresholds":
        """From itself, None (defaults), a mapping (a stored ``to_dict()``: ``max_map_drop``,
        ``min_agreement`` or ``min_det_agreement``, ``score_threshold``) or a target profile's
        gate-like object (attributes ``max_map_drop``, ``min_det_agreement`` when it has them: a
        classification ``min_agreement`` is not a detection F1, so it is not taken from an object)."""
        if obj is None:
            return cls()
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, Mapping):
            agree = obj.get("min_det_agreement", obj.get("min_agreement"))
            drop, score = obj.get("max_map_drop"), obj.get("score_threshold")
        else:
            agree = getattr(obj, "min_det_agreement", None)
            drop, score = getattr(obj, "max_map_drop", None), getattr(obj, "score_threshold", None)
        kw: dict[str, Any] = {}
        if drop is not None:
            kw["max_map_drop"] = float(drop)
        if agree is not None:
            kw["min_agreement"] = float(agree)
        if score is not None:
            kw["score_threshold"] = float(score)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------
# Checkset
# ------------------------------------------------------------------------------------------

def _bad(msg: str) -> EdgetlError:
    return EdgetlError(f"detection checkset: {msg}",
                       hint="the checkset is damaged or from another run: re-create the artifact with `edgetl quantize`")


@dataclass(frozen=True)
class DetCheckset:
    """The held-out images of a detection artifact and what the float model made of them.

    Ground truth is per image (ragged: an image may hold no box) in model-input pixel coordinates,
    so the gate compares boxes where the model produced them; ``float_boxes`` / ``float_scores`` are
    the float (PyTorch) model's raw outputs, stored so every later check compares against the same
    float answers without running a float model on the device."""

    inputs: np.ndarray  # (N, ...) float32 model inputs (the manifest's input layout)
    gt_boxes: Sequence[np.ndarray]  # per image (k, 4) float32 xyxy, model-input pixels
    gt_classes: Sequence[np.ndarray]  # per image (k,) int64, 0-based
    float_boxes: np.ndarray  # (N, A, 4) float32 raw box regressions
    float_scores: np.ndarray  # (N, A, C + 1) float32 raw logits, column 0 background
    paths: Sequence[str] = ()

    def __post_init__(self) -> None:
        n = len(self.inputs)
        fb, fs = np.asarray(self.float_boxes, np.float32), np.asarray(self.float_scores, np.float32)
        if n == 0 or len(self.gt_boxes) != n or len(self.gt_classes) != n or len(fb) != n or len(fs) != n:
            raise _bad(f"{n} inputs, {len(self.gt_boxes)}/{len(self.gt_classes)} ground-truth images, "
                       f"{len(fb)}/{len(fs)} float outputs")
        if fb.ndim != 3 or fb.shape[2] != 4 or fs.ndim != 3 or fs.shape[:2] != fb.shape[:2] or fs.shape[2] < 2:
            raise _bad(f"float outputs of shapes {fb.shape} and {fs.shape}, expected (N, A, 4) and (N, A, C + 1)")
        if self.paths and len(self.paths) != n:
            raise _bad(f"{len(self.paths)} paths for {n} images")
        c = fs.shape[2] - 1
        boxes, classes = [], []
        for i, (b, k) in enumerate(zip(self.gt_boxes, self.gt_classes)):
            b = np.asarray(b, np.float32).reshape(-1, 4)
            k = np.asarray(k, np.int64).reshape(-1)
            if len(b) != len(k) or (k.size and (k.min() < 0 or k.max() >= c)):
                raise _bad(f"image {i}: {len(b)} boxes, classes {k.tolist()} (0..{c - 1})")
            boxes.append(b)
            classes.append(k)
        for name, val in (("float_boxes", fb), ("float_scores", fs), ("gt_boxes", boxes), ("gt_classes", classes),
                          ("inputs", np.asarray(self.inputs, np.float32)), ("paths", tuple(str(p) for p in self.paths))):
            object.__setattr__(self, name, val)

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def num_classes(self) -> int:
        return self.float_scores.shape[2] - 1

    def save(self, path: str | Path) -> Path:
        """``checkset.npz``: ground truth stored flat with per-image offsets (no pickled objects)."""
        counts = [len(b) for b in self.gt_boxes]
        np.savez_compressed(path, inputs=self.inputs, gt_boxes=np.concatenate(self.gt_boxes).reshape(-1, 4),
                            gt_classes=np.concatenate(self.gt_classes).astype(np.int64),
                            gt_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                            float_boxes=self.float_boxes, float_scores=self.float_scores,
                            paths=np.asarray(self.paths, dtype=str))
        return Path(path)


def load_det_checkset(path: str | Path) -> DetCheckset:
    """Read a detection ``checkset.npz`` (or the artifact folder holding it)."""
    from ..check import checkset_file

    p = checkset_file(path)
    keys = ("inputs", "gt_boxes", "gt_classes", "gt_offsets", "float_boxes", "float_scores")
    try:
        with np.load(p, allow_pickle=False) as data:
            missing = [k for k in keys if k not in data]
            if missing:
                raise _bad(f"{p}: missing array(s) {missing}")
            a = {k: data[k] for k in keys}
            paths = tuple(str(x) for x in data["paths"]) if "paths" in data else ()
    except (OSError, ValueError) as exc:
        raise EdgetlError(f"{p}: not a readable checkset ({exc})", hint="re-create the artifact") from None
    off = np.asarray(a["gt_offsets"], np.int64)
    m = len(a["gt_classes"])
    if off.ndim != 1 or len(off) != len(a["inputs"]) + 1 or off[0] != 0 or off[-1] != m or (np.diff(off) < 0).any() \
            or len(a["gt_boxes"]) != m:
        raise _bad(f"{p}: ground-truth offsets do not fit {m} boxes of {len(a['inputs'])} images")
    split = off[1:-1]
    return DetCheckset(a["inputs"], np.split(a["gt_boxes"].reshape(-1, 4), split), np.split(a["gt_classes"], split),
                       a["float_boxes"], a["float_scores"], paths)


# ------------------------------------------------------------------------------------------
# The gate
# ------------------------------------------------------------------------------------------

def _decode(raw_boxes: np.ndarray, raw_scores: np.ndarray, post: Any, score_threshold: float) -> list[tuple]:
    """Each image's (boxes, scores, classes) through the device's post-processing."""
    from ..runtime.detect import postprocess

    out = []
    for b, s in zip(raw_boxes, raw_scores):
        d = postprocess(b, s, post, score_threshold=score_threshold)
        out.append((np.asarray(d.boxes, np.float32).reshape(-1, 4), np.asarray(d.scores, np.float32).reshape(-1),
                    np.asarray(d.classes, np.int64).reshape(-1)))
    return out


def _pairs(float_dets: Sequence[tuple], quant_dets: Sequence[tuple]) -> dict[str, Any]:
    """Per image: matched pairs, float and quantized counts; and the box error of the pairs (px)."""
    matched, nf, nq, errs, lone = [], [], [], [], []
    for f, q in zip(float_dets, quant_dets):
        ia, ib = match_pairs(f[0], f[2], q[0], q[2], MATCH_IOU)
        lone += [float(x) for x in np.delete(f[1], ia)] + [float(x) for x in np.delete(q[1], ib)]
        matched.append(len(ia))
        nf.append(len(f[2]))
        nq.append(len(q[2]))
        if len(ia):
            errs.append(np.abs(q[0][ib].astype(np.float64) - f[0][ia].astype(np.float64)).reshape(-1))
    err = np.concatenate(errs) if errs else np.zeros(0)
    return {"matched": np.asarray(matched, np.int64), "n_float": np.asarray(nf, np.int64),
            "n_quant": np.asarray(nq, np.int64), "unmatched_scores": np.asarray(lone, np.float64),
            "max_box_error": float(err.max()) if err.size else None,
            "mean_box_error": float(err.mean()) if err.size else None}


def _objects_agreement(fb: np.ndarray, fs: np.ndarray, qb: np.ndarray, qs: np.ndarray, post: Any) -> dict[str, Any]:
    """What tracking and counting see (``runtime.detect.postprocess_objects``): both models' objects at
    the threshold the device tracks at (``tracking_threshold``), matched one to one whatever their
    class (IoU >= 0.5). Reported beside the gate, which judges the per-class boxes."""
    from ..runtime.detect import postprocess_objects

    def objects(raw_boxes: np.ndarray, raw_scores: np.ndarray) -> list[tuple]:
        out = []
        for b, s in zip(raw_boxes, raw_scores):
            d = postprocess_objects(b, s, post, score_threshold=post.tracking_threshold)
            out.append((d.boxes, d.scores, np.zeros(len(d), np.int64)))  # one class: matched whatever their class
        return out

    return {**detection_agreement(objects(fb, fs), objects(qb, qs), MATCH_IOU), "threshold": post.tracking_threshold}


def _bootstrap(fm, qm, pairs: Mapping[str, np.ndarray], n_boot: int, seed: int) -> dict[str, Any]:
    """Paired bootstrap over images: each resample draws n image indices with replacement; both
    mAP@0.5 are re-accumulated on it (exactly what COCOeval gives on those images, see
    ``metrics.map50_resampled``), and the agreement F1 is recomputed from the per-image counts.
    Resamples that hold no ground-truth box (mAP undefined) are left out of the drop's CI."""
    n = fm.n_images
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    drops = np.array([100.0 * (map50_resampled(fm, r) - map50_resampled(qm, r)) for r in idx])
    drops = drops[np.isfinite(drops)]
    m, nf, nq = (pairs[k][idx].sum(1) for k in ("matched", "n_float", "n_quant"))
    tot = nf + nq
    f1 = np.where(tot > 0, 2.0 * m / np.maximum(tot, 1), 1.0)
    pct = (lambda x: [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))] if len(x) else [float("nan")] * 2)
    return {"drop_ci": pct(drops), "agreement_ci": pct(f1), "n_boot": int(n_boot), "n_boot_drop": int(len(drops))}


def _per_class(fr: Mapping[str, Any], qr: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per class: AP@0.5 of both and the change in points (quantized - float; None without GT)."""
    out = []
    for f, q in zip(fr["per_class"], qr["per_class"]):
        delta = None if f["ap50"] is None else 100.0 * (q["ap50"] - f["ap50"])
        out.append({"class": f["class"], "n_gt": f["n_gt"], "ap50_float": f["ap50"], "ap50_quant": q["ap50"],
                    "ap_float": f["ap"], "ap_quant": q["ap"], "delta": delta})
    return out


def _failures(drop: float, agreement: Mapping[str, Any], per_class: list[dict[str, Any]],
              th: DetThresholds) -> list[str]:
    """One line per threshold missed, naming the classes that lost most AP@0.5."""
    out = []
    if drop > th.max_map_drop + EPS:
        lost = sorted((p for p in per_class if p["delta"] is not None and p["delta"] < 0), key=lambda p: p["delta"])
        who = ", ".join(f"{p['class']} {p['delta']:+.1f}" for p in lost[:3])
        out.append(f"accuracy: mAP@0.5 drop {drop:.2f} points > max_map_drop {th.max_map_drop:g}"
                   + (f" (AP@0.5 lost most: {who})" if who else ""))
    if agreement["f1"] < th.min_agreement - EPS:
        a = agreement
        out.append(f"agreement: detection F1 {a['f1']:.4f} < min_agreement {th.min_agreement:g} ({a['matched']} of "
                   f"{a['n_float']} float and {a['n_quant']} quantized detections matched)")
    return out


def evaluate_detection(quant_raw: tuple[np.ndarray, np.ndarray], checkset: DetCheckset, post: Any,
                       thresholds: Any = None, labels: Sequence[str] | None = None, n_boot: int = 200,
                       seed: int = 0) -> dict[str, Any]:
    """The gate verdict from the quantized model's raw outputs ``(boxes (N, A, 4), scores (N, A, C+1))``
    on ``checkset.inputs`` (pure: no model is run here).

    ``post``: the manifest's ``edgetl.runtime.detect.PostprocessSpec`` (anchors, box coder, NMS,
    deployed score threshold); ``thresholds``: :class:`DetThresholds`, a mapping, a target profile's
    gate, or None. Returns a dict (see the module docstring; keys mirror ``check.GateResult``)."""
    th = DetThresholds.coerce(thresholds)
    qb, qs = (np.asarray(x, np.float32) for x in quant_raw)
    fb, fs = checkset.float_boxes, checkset.float_scores
    if qb.shape != fb.shape or qs.shape != fs.shape:
        raise EdgetlError(f"the model returns raw outputs of shapes {qb.shape}, {qs.shape}; the checkset's float model "
                          f"{fb.shape}, {fs.shape}", hint="the model and the checkset are from different runs: "
                                                          "re-create the artifact")
    c = checkset.num_classes
    names = list(labels) if labels is not None else [str(k) for k in range(c)]
    if not sum(len(k) for k in checkset.gt_classes):
        raise _bad("no ground-truth box in any image: mAP is undefined")
    deployed = float(th.score_threshold if th.score_threshold is not None else post.score_threshold)
    low = min(MAP_SCORE_THRESHOLD, deployed)
    gts = list(zip(checkset.gt_boxes, checkset.gt_classes))
    fr, fm = coco_evaluate(gts, _decode(fb, fs, post, low), c, names)
    qr, qm = coco_evaluate(gts, _decode(qb, qs, post, low), c, names)
    pairs = _pairs(_decode(fb, fs, post, deployed), _decode(qb, qs, post, deployed))
    agreement = agreement_from_counts(*(int(pairs[k].sum()) for k in ("matched", "n_float", "n_quant")))
    drop = 100.0 * (fr["map50"] - qr["map50"])
    boot = _bootstrap(fm, qm, pairs, n_boot, seed)
    per_class = _per_class(fr, qr)
    failures = _failures(drop, agreement, per_class, th)
    lone = pairs["unmatched_scores"]
    return {
        "task": "detection", "passed": not failures, "status": "failed" if failures else "passed",
        "n": len(checkset), "n_gt": fr["n_gt"],
        "float_map50": fr["map50"], "quant_map50": qr["map50"], "float_map": fr["map"], "quant_map": qr["map"],
        "drop": drop, "drop_ci": boot["drop_ci"],
        "agreement": agreement["f1"], "agreement_ci": boot["agreement_ci"],
        "agreement_detail": {k: agreement[k] for k in ("precision", "recall", "matched", "n_float", "n_quant")},
        "margins": {"drop": th.max_map_drop - drop, "agreement": agreement["f1"] - th.min_agreement},
        "thresholds": th.to_dict(), "score_threshold": deployed, "map_score_threshold": low, "match_iou": MATCH_IOU,
        "failures": failures, "per_class": per_class,
        "max_box_error": pairs["max_box_error"], "mean_box_error": pairs["mean_box_error"],
        "disagreement": {"unmatched": int(len(lone)), "band": NEAR_BAND,
                         "near_threshold": int((lone < deployed + NEAR_BAND).sum())},
        "n_det_float": fr["n_det"], "n_det_quant": qr["n_det"], "bootstrap": {k: boot[k] for k in ("n_boot", "n_boot_drop")},
        "objects_agreement": (_objects_agreement(fb, fs, qb, qs, post)
                              if getattr(post, "object_threshold", None) is not None else None),
        "checked": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

def _p(x: float | None) -> str:
    return "—" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def _objects_row(o: Mapping[str, Any] | None) -> list[str]:
    if not o:
        return []
    return [f"| objects agreement (F1; what tracking and counting see, every class as one, at {o['threshold']:g}; "
            f"not gated) | {o['f1']:.4f} ({o['matched']} / {o['n_float']} / {o['n_quant']}) | | |"]


def det_gate_markdown(g: Mapping[str, Any], title: str = "Detection gate") -> str:
    """A report section: verdict, float vs quantized mAP, drop and agreement with their CIs and
    margins, per-class AP@0.5, failures (mAP and AP in points, 0..100)."""
    th = g["thresholds"]
    lo, hi = g["drop_ci"]
    alo, ahi = g["agreement_ci"]
    m = g.get("margins") or {}
    ad = g["agreement_detail"]
    err = ("—" if g.get("max_box_error") is None
           else f"{g['max_box_error']:.2f} / {g['mean_box_error']:.3f} px")
    lines = [f"## {title}: {'PASSED' if g['passed'] else 'FAILED'}", "",
             f"{g['n']} held-out images, {g['n_gt']} ground-truth boxes. mAP at score ≥ {g['map_score_threshold']:g} "
             f"(pycocotools, maxDets 100); agreement at the deployed score threshold {g['score_threshold']:g}.", "",
             "| | float | quantized |", "| --- | --- | --- |",
             f"| mAP@0.5 | {_p(g['float_map50'])} | {_p(g['quant_map50'])} |",
             f"| mAP@0.5:0.95 | {_p(g['float_map'])} | {_p(g['quant_map'])} |", "",
             "| | value | 95% CI | threshold |", "| --- | --- | --- | --- |",
             f"| mAP@0.5 drop (points) | {g['drop']:.2f} | [{lo:.2f}, {hi:.2f}] (paired bootstrap) | ≤ "
             f"{th['max_map_drop']:g} (margin {m.get('drop', float('nan')):+.2f}) |",
             f"| detection agreement (F1) | {g['agreement']:.4f} | [{alo:.4f}, {ahi:.4f}] (bootstrap) | ≥ "
             f"{th['min_agreement']:g} (margin {m.get('agreement', float('nan')):+.4f}) |",
             f"| matched / float / quantized detections | {ad['matched']} / {ad['n_float']} / {ad['n_quant']} | | |",
             f"| box error of matched pairs max / mean | {err} | | |", *_objects_row(g.get("objects_agreement")), "",
             "| class | GT boxes | AP@0.5 float | AP@0.5 quantized | Δ points |", "| --- | --- | --- | --- | --- |"]
    for p in g["per_class"]:
        delta = "—" if p["delta"] is None else f"{p['delta']:+.2f}"
        lines.append(f"| {p['class']} | {p['n_gt']} | {_p(p['ap50_float'])} | {_p(p['ap50_quant'])} | {delta} |")
    if g["failures"]:
        lines += ["", "**Failures:**", ""] + [f"- {f}" for f in g["failures"]]
    return "\n".join(lines)


__all__ = ["CHECKSET_NAME", "DetCheckset", "DetThresholds", "MAP_SCORE_THRESHOLD", "det_gate_markdown",
           "evaluate_detection", "load_det_checkset"]
