"""The task seam on the device: what a frame's model outputs become, per task.

The loop (:class:`edgetl.runtime.app.Stream`) is the same for every task: capture, preprocess,
infer (every output of the model), then ``head.step``; the output side (:func:`run_app`) asks the
head to draw the result, to write its JSON fields and whether ``--events`` prints it. A task adds
one head class here and its post-processing module (``detect.py`` for detection); nothing else in
the loop changes.

* :class:`ClassifyHead`: softmax, temporal smoothing (EMA), top-k, the ``unknown`` threshold.
* :class:`DetectHead`: decoding + score threshold + NMS (``edgetl.runtime.detect``), boxes mapped
  back to the frame (ROI included), per-class counts, optional tracking and line counting
  (``edgetl.runtime.track``): entries, exits and crossings are events.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import numpy as np

from .errors import EdgetlError
from .model import softmax

UNKNOWN = "unknown"


class ClassifyHead:
    """A classifier's logits -> label, score, top-k (smoothed over frames when asked)."""

    task = "classification"

    def __init__(self, model: Any, options: Any):
        if getattr(options, "track", False) or getattr(options, "count_line", None):
            flag = "--count-line" if getattr(options, "count_line", None) else "--track"
            raise EdgetlError(f"{flag} follows detected objects, and {model.folder} is a classification artifact "
                              "(one label per frame, no boxes to track or count)",
                              hint=f"leave out {flag}, or run a detection artifact (edgetl train --task detect)")
        self.model = model
        self.alpha = 2.0 / (options.smooth + 1.0) if options.smooth > 1 else 1.0
        self.k, self.threshold = int(options.top_k), float(options.threshold)
        self.ema: Optional[np.ndarray] = None
        self.labels_json = {lab: json.dumps(lab) for lab in (*model.labels, UNKNOWN)}
        self._last: Optional[str] = None

    def step(self, outputs: List[np.ndarray], frame: Any) -> Dict[str, Any]:
        probs = softmax(outputs[0][0])
        if self.alpha < 1.0:
            if self.ema is None:
                self.ema = probs.copy()
            else:
                self.ema *= 1.0 - self.alpha
                self.ema += self.alpha * probs
            probs = self.ema
        top = self.model.top_k(probs, self.k)
        label, score = top[0]
        if score < self.threshold:
            label = UNKNOWN
        return {"label": label, "score": score, "top_k": top, "probs": probs}

    def json_fields(self, r: Any) -> str:
        lj = self.labels_json
        top = ",".join(f"[{lj[lab]},{s:.6f}]" for lab, s in r.top_k)
        return f'"label":{lj[r.label]},"score":{r.score:.6f},"top_k":[{top}]'

    def wanted(self, r: Any) -> bool:
        """``--events``: a line when the label changes."""
        changed = r.label != self._last
        self._last = r.label
        return changed

    def draw(self, img: np.ndarray, r: Any, fps: float, roi: Any) -> None:
        from .overlay import draw_overlay
        draw_overlay(img, r.label, r.score, fps, r.latency_ms, roi, r.label != UNKNOWN)

    def finish(self) -> List[Dict[str, Any]]:
        return []

    def summary(self) -> Dict[str, Any]:
        return {}


class DetectHead:
    """A detector's raw outputs -> boxes in frame pixels, counts, tracks and line crossings."""

    task = "detection"

    def __init__(self, model: Any, options: Any):
        self.model = model
        self.post = model.postprocess
        self.roi = options.roi
        tracking = bool(options.track or options.count_line)
        # objects (P(object), one box each) feed the tracker when the run chose their threshold (schema 2.1)
        self.objects = tracking and self.post.object_threshold is not None
        # --threshold 0 (the default) keeps the artifact's: the objects' with tracking, else the one it was gated at
        self.threshold = float(options.threshold) or (self.post.tracking_threshold if self.objects
                                                      else self.post.score_threshold)
        self.tracker = self.counter = None
        if tracking:
            from .track import LineCounter, Tracker, parse_line
            # ByteTrack: detections down to `low` reach the tracker (its second stage), tracks start at `high`
            self.tracker = Tracker(low=min(0.1, self.threshold), high=self.threshold, labels=model.labels)
            if options.count_line:
                line = options.count_line
                self.counter = LineCounter(parse_line(line) if isinstance(line, str) else tuple(line), model.labels,
                                           min_confidence=options.count_confidence)
        self.totals: Dict[str, int] = {lab: 0 for lab in model.labels}  # detections summed over frames
        self.peak: Dict[str, int] = {lab: 0 for lab in model.labels}  # most in one frame

    def _raw(self, outputs: List[np.ndarray]) -> tuple:
        k = len(self.model.labels) + 1
        if len(outputs) < 2 or outputs[0].shape[-1] != 4 or outputs[1].shape[-1] != k:
            shapes = [tuple(o.shape) for o in outputs]
            raise EdgetlError(f"{self.model.folder}: the model's outputs {shapes} are not a detector's "
                              f"(boxes (1, A, 4), scores (1, A, {k}))",
                              hint="the artifact is damaged or was not made by edgetl: rebuild it")
        return outputs[0][0], outputs[1][0]

    def step(self, outputs: List[np.ndarray], frame: Any) -> Dict[str, Any]:
        from .detect import class_counts, merge_classes, postprocess, postprocess_objects, to_frame
        raw_boxes, raw_scores = self._raw(outputs)
        low = self.threshold if self.tracker is None else min(self.threshold, self.tracker.low)
        if self.objects:  # one box per object, scored by P(object), labelled by its likeliest class
            dets = postprocess_objects(raw_boxes, raw_scores, self.post, score_threshold=low)
        else:
            dets = postprocess(raw_boxes, raw_scores, self.post, score_threshold=low)
        h, w = frame.image.shape[:2]
        offset = (0, 0)
        if self.roi is not None:
            x, y, rw, rh = self.roi
            offset, (h, w) = (x, y), (min(rh, h - y), min(rw, w - x))
        dets = to_frame(dets, self.model.spec, (h, w), offset)
        if self.tracker is None:
            counts = class_counts(dets, self.model.labels)
        else:  # counted at the deployed threshold, not the tracker's low one
            counts = class_counts(dets.select(dets.scores >= self.threshold), self.model.labels)
        for lab, n in counts.items():
            self.totals[lab] = self.totals.get(lab, 0) + n
            self.peak[lab] = max(self.peak.get(lab, 0), n)
        tracks, events = None, []
        if self.tracker is not None:  # an artifact without an objects' threshold: its per-class boxes merged
            tracks = self.tracker.update(dets if self.objects else merge_classes(dets), frame_index=frame.index)
            events = list(self.tracker.events())
            if self.counter is not None:
                events += self.counter.update(tracks, frame.index)
        # the objects at the deployed threshold (with tracking, dets also holds the tracker's low-score boxes)
        return {"label": f"{sum(counts.values())} objects", "score": float(dets.scores.max()) if len(dets) else 0.0,
                "top_k": [], "probs": np.zeros(0, np.float32), "detections": dets, "tracks": tracks,
                "events": events, "counts": counts}

    @staticmethod
    def shown(r: Any) -> tuple:
        """What is drawn and printed: the tracks (with ids) when tracking, else the detections."""
        if r.tracks is None:
            return r.detections, None
        from .track import tracks_to_detections
        return tracks_to_detections(r.tracks)

    def json_fields(self, r: Any) -> str:
        from .detect import detections_json
        dets, ids = self.shown(r)
        items = detections_json(dets, self.model.labels, ids)
        text = f'"detections":{json.dumps(items)},"counts":{json.dumps(r.counts)}'
        if r.events:
            text += f',"events":{json.dumps(r.events)}'
        if self.counter is not None:
            text += f',"line_counts":{json.dumps(self.counter.counts)}'
        return text

    def wanted(self, r: Any) -> bool:
        """``--events``: a line when something entered, left or crossed the line."""
        return bool(r.events)

    def draw(self, img: np.ndarray, r: Any, fps: float, roi: Any) -> None:
        from .detect import draw_detections
        from .overlay import draw_overlay
        line = self.counter.line if self.counter is not None else None
        counts = self.counter.counts if self.counter is not None else r.counts
        dets, ids = self.shown(r)
        draw_detections(img, dets, self.model.labels, ids, line=line, counts=counts)
        draw_overlay(img, r.label, r.score, fps, r.latency_ms, roi, True)

    def finish(self) -> List[Dict[str, Any]]:
        """At the end of the stream: exits of the tracks still alive (``--events`` prints them)."""
        return list(self.tracker.finish()) if self.tracker is not None else []

    def summary(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"detections_total": self.totals, "max_per_frame": self.peak}
        if self.tracker is not None:
            out["tracks"] = self.tracker.next_id - 1
        if self.counter is not None:
            out["line_counts"] = self.counter.counts
            out["crossings_low_confidence"] = self.counter.low_confidence
            out["count_confidence"] = self.counter.min_confidence
        return out


HEADS = {"classification": ClassifyHead, "detection": DetectHead}


def head_for(model: Any, options: Any) -> Any:
    return HEADS[model.manifest.task](model, options)
