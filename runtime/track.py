"""Tracking and line counting on the device: ids across frames, entries, exits and line crossings.

Written here rather than taken from a library: the device runtime stays numpy + OpenCV (+ the
inference backend) and runs on Python 3.8. The maintained ByteTrack implementations do not fit that:
``supervision`` pulls matplotlib, scipy and pillow; ``norfair`` and ``motpy`` need scipy and
filterpy; the packaged ByteTrack repository (``bytetracker``) needs ``lap``, scipy and cython_bbox;
``boxmot`` needs torch. What ByteTrack's association adds over SORT fits in a page of numpy.

:class:`Tracker` is ByteTrack-style:

1. each track's box is predicted with a constant velocity of its centre (an exponential average of
   the measured displacement per frame; the size is the last measured one);
2. detections with ``score >= high`` are matched to the confirmed tracks (IoU >= ``match_iou``);
3. detections with ``low <= score < high`` are matched to the confirmed tracks still unmatched that
   were seen on the previous frame, at a stricter IoU (``max(match_iou, 0.5)``): a partly hidden
   object keeps its track, while a low-score box never starts one or revives a lost one;
4. the high-score detections left are matched to tentative tracks; the rest start tentative tracks.
   A tentative track is confirmed (it gets its id, an ``enter`` event) at ``min_hits`` consecutive
   matches and dropped at its first miss; a confirmed one is removed (an ``exit`` event) after
   ``max_age`` frames unseen.

Matching is greedy by IoU (the best pair first), not Hungarian (scipy is not a runtime dependency):
with the predicted boxes, contested pairs are rare, and where two objects cross exactly, the two
detections are nearly the same box, so either assignment keeps both tracks' boxes and velocities.
The class of a track is the majority vote of its detections (ties: the larger summed score), so a
class that flickers for a frame neither splits the track nor changes its count. Its *confidence* is
the mean score of the detections matched to it.

:class:`LineCounter` counts tracks whose box centre crosses a segment. Each track counts at most once
per direction, and a crossing is only taken when the centre goes from beyond a band on one side to
beyond it on the other (the band: ``margin`` times the box's smaller side, at least 2 px), so an
object that stops on the line with a jittering box is counted once, not at every jitter. A track
whose confidence is below ``min_confidence`` (default 0.5: on average its boxes were more likely
background than an object) is not counted (:attr:`LineCounter.low_confidence` counts those
crossings). Low-score boxes may keep a real object's track alive through a bad frame or a partial
occlusion (step 3 above), but a track that lives mostly on them is not an object: on the conveyor
video the extra counts were such tracks, large boxes over bare belt at the frame's edge that the
detector found on and off (mean score 0.31-0.44, matched on 39-70 % of their frames), while every
cell's track averaged 0.66 or more (docs/detection.md, "Counting").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .detect import Detections, box_iou
from .errors import EdgetlError

Line = Tuple[int, int, int, int]  # typing.Tuple: evaluated at import, and the runtime runs on Python 3.8


@dataclass(eq=False)  # the box is an array: == would be elementwise
class Track:
    """A confirmed track as of the last update (a snapshot: changing it changes nothing in the
    tracker). ``box``: its detection's box this frame; ``hits``: frames it was matched; ``age``:
    frames since it was first seen; ``missed``: frames since it was last matched (0 when returned by
    :meth:`Tracker.update`); ``confidence``: the mean score of its matched detections (a track made
    by hand without one takes its ``score``)."""

    id: int
    box: np.ndarray
    cls: int
    score: float
    hits: int
    age: int
    missed: int = 0
    confidence: Optional[float] = None

    def __post_init__(self) -> None:
        if self.confidence is None:
            self.confidence = float(self.score)


@dataclass
class _State:
    box: np.ndarray  # float64 xyxy, the last matched detection's
    score: float
    first_frame: int
    last_frame: int
    id: int = 0  # 0 while tentative
    vel: np.ndarray = field(default_factory=lambda: np.zeros(2))  # centre px / frame
    hits: int = 1
    missed: int = 0
    votes: Dict[int, List[float]] = field(default_factory=dict)  # class -> [count, score sum]

    def predicted(self) -> np.ndarray:
        dx, dy = self.vel * (self.missed + 1)
        return self.box + np.array([dx, dy, dx, dy])

    def vote(self, cls: int, score: float) -> None:
        v = self.votes.setdefault(int(cls), [0, 0.0])
        v[0] += 1
        v[1] += float(score)

    @property
    def cls(self) -> int:
        return max(self.votes.items(), key=lambda kv: (kv[1][0], kv[1][1]))[0]

    @property
    def confidence(self) -> float:
        """The mean score of the detections matched to the track (one vote per match: ``hits``)."""
        return sum(v[1] for v in self.votes.values()) / self.hits


def greedy_match(iou: np.ndarray, threshold: float) -> Tuple[List[Tuple[int, int]], List[int], List[int]]:
    """Pairs (row, col) best IoU first, each row and column at most once, IoU >= ``threshold``;
    then the unmatched rows and columns."""
    rows, cols = np.nonzero(iou >= threshold)  # NaN (two empty boxes) is never >= anything
    order = np.argsort(-iou[rows, cols], kind="stable")
    used_r, used_c, pairs = set(), set(), []
    for r, c in zip(rows[order].tolist(), cols[order].tolist()):
        if r not in used_r and c not in used_c:
            used_r.add(r)
            used_c.add(c)
            pairs.append((r, c))
    return (pairs, [r for r in range(iou.shape[0]) if r not in used_r],
            [c for c in range(iou.shape[1]) if c not in used_c])


class Tracker:
    """ByteTrack-style multi-object tracker (see the module docstring). Boxes in any pixel frame (the
    runtime tracks in frame pixels, after ``detect.to_frame``). Ids start at 1 and are given on
    confirmation, so ``next_id - 1`` is the number of objects seen. ``labels`` (optional) name the
    classes in the events."""

    def __init__(self, high: float = 0.5, low: float = 0.1, match_iou: float = 0.3, max_age: int = 30,
                 min_hits: int = 2, labels: Optional[Sequence[str]] = None):
        if not 0.0 <= low <= high <= 1.0:
            raise EdgetlError(f"tracker thresholds low={low} high={high} are not valid",
                              hint="give 0 <= low <= high <= 1 (scores of the detections)")
        if not 0.0 < match_iou < 1.0 or int(max_age) < 0 or int(min_hits) < 1:
            raise EdgetlError(f"tracker match_iou={match_iou} max_age={max_age} min_hits={min_hits} are not valid",
                              hint="give 0 < match_iou < 1, max_age >= 0 frames, min_hits >= 1")
        self.high, self.low, self.match_iou = float(high), float(low), float(match_iou)
        self.max_age, self.min_hits = int(max_age), int(min_hits)
        self.labels = list(labels) if labels is not None else None
        self.next_id = 1
        self.frame = -1
        self._tracks: List[_State] = []
        self._events: List[Dict[str, Any]] = []

    # ---- events --------------------------------------------------------------------------------
    def events(self) -> List[Dict[str, Any]]:
        """The last update's events: ``{"event": "enter" | "exit", "id", "class", "label", "frame"}``
        (an exit also has ``"last_seen"``, the frame the track was last matched)."""
        return list(self._events)

    def _event(self, kind: str, t: _State) -> None:
        k = t.cls
        label = self.labels[k] if self.labels is not None and 0 <= k < len(self.labels) else f"class {k}"
        e: Dict[str, Any] = {"event": kind, "id": t.id, "class": k, "label": label, "frame": self.frame}
        if kind == "exit":
            e["last_seen"] = t.last_frame
        self._events.append(e)

    # ---- the update ----------------------------------------------------------------------------
    def update(self, dets: Detections, frame_index: Optional[int] = None) -> List[Track]:
        """One frame's detections -> the confirmed tracks matched on this frame (their boxes are this
        frame's detections). ``frame_index`` defaults to the count of updates so far."""
        self.frame = self.frame + 1 if frame_index is None else int(frame_index)
        self._events = []
        boxes = dets.boxes.astype(np.float64)
        high = np.flatnonzero(dets.scores >= self.high)
        low = np.flatnonzero((dets.scores >= self.low) & (dets.scores < self.high))
        confirmed = [t for t in self._tracks if t.id]
        tentative = [t for t in self._tracks if not t.id]
        matched: List[_State] = []

        left_trk, left_high = self._match(confirmed, high, boxes, dets, self.match_iou, matched)
        recent = [confirmed[i] for i in left_trk if confirmed[i].missed == 0]
        self._match(recent, low, boxes, dets, max(self.match_iou, 0.5), matched)
        high_left = high[left_high]
        _, new_high = self._match(tentative, high_left, boxes, dets, self.match_iou, matched)

        seen = {id(t) for t in matched}
        alive: List[_State] = []
        for t in self._tracks:
            if id(t) in seen:
                alive.append(t)
            elif t.id:  # confirmed, unseen: kept up to max_age frames
                t.missed += 1
                if t.missed > self.max_age:
                    self._event("exit", t)
                else:
                    alive.append(t)
            # a tentative track unseen is dropped (a one-frame false positive leaves no trace)
        for j in high_left[new_high]:
            t = _State(box=boxes[j].copy(), score=float(dets.scores[j]), first_frame=self.frame,
                       last_frame=self.frame)
            t.vote(int(dets.classes[j]), float(dets.scores[j]))
            alive.append(t)
            matched.append(t)
        self._tracks = alive
        for t in matched:
            if not t.id and t.hits >= self.min_hits:
                t.id = self.next_id
                self.next_id += 1
                self._event("enter", t)
        return [self._snapshot(t) for t in self._tracks if t.id and t.missed == 0]

    def _match(self, tracks: List[_State], det_idx: np.ndarray, boxes: np.ndarray, dets: Detections,
               threshold: float, matched: List[_State]) -> Tuple[List[int], List[int]]:
        """Greedy IoU matching of ``tracks`` (their predicted boxes) to the detections ``det_idx``;
        matched tracks take the detection. Returns the unmatched track and ``det_idx`` positions."""
        if not tracks or not len(det_idx):
            return list(range(len(tracks))), list(range(len(det_idx)))
        pred = np.stack([t.predicted() for t in tracks])
        pairs, left_t, left_d = greedy_match(box_iou(pred, boxes[det_idx]), threshold)
        for ti, di in pairs:
            j = int(det_idx[di])
            self._take(tracks[ti], boxes[j], float(dets.scores[j]), int(dets.classes[j]))
            matched.append(tracks[ti])
        return left_t, left_d

    def _take(self, t: _State, box: np.ndarray, score: float, cls: int) -> None:
        """Update a track with its detection: the box, the velocity (the displacement of the centre
        per frame since the last match, averaged), the class votes."""
        gap = t.missed + 1
        step = ((box[:2] + box[2:]) - (t.box[:2] + t.box[2:])) / (2.0 * gap)
        t.vel = step if t.hits == 1 else 0.5 * t.vel + 0.5 * step
        t.box = box.copy()
        t.score = score
        t.hits += 1
        t.missed = 0
        t.last_frame = self.frame
        t.vote(cls, score)

    def _snapshot(self, t: _State) -> Track:
        return Track(id=t.id, box=t.box.astype(np.float32), cls=t.cls, score=t.score, hits=t.hits,
                     age=self.frame - t.first_frame + 1, missed=t.missed, confidence=t.confidence)

    def finish(self) -> List[Dict[str, Any]]:
        """At the end of a stream: an ``exit`` event for every confirmed track still alive, and an
        empty tracker (ids keep counting)."""
        self._events = []
        for t in self._tracks:
            if t.id:
                self._event("exit", t)
        self._tracks = []
        return self.events()


def tracks_to_detections(tracks: Sequence[Track]) -> Tuple[Detections, List[int]]:
    """Tracks -> (:class:`Detections`, their ids), for ``detect.draw_detections`` and
    ``detect.detections_json``."""
    return (Detections(np.array([t.box for t in tracks], np.float32).reshape(-1, 4),
                       np.array([t.score for t in tracks], np.float32),
                       np.array([t.cls for t in tracks], np.int64)),
            [t.id for t in tracks])


# ---- line counting -------------------------------------------------------------------------------

def parse_line(text: Any) -> Line:
    """``"x1,y1,x2,y2"`` (frame pixels) or 4 numbers -> a tuple of 4 ints; else an EdgetlError naming
    ``--count-line``."""
    try:
        vals = tuple(int(v) for v in (text.split(",") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 4 or min(vals) < 0 or (vals[0], vals[1]) == (vals[2], vals[3]):
        raise EdgetlError(f"--count-line {text!r} is not valid",
                          hint="give the segment's ends x1,y1,x2,y2 in frame pixels (two different points), "
                               "e.g. --count-line 0,360,1280,360")
    return vals  # type: ignore[return-value]


def check_count_confidence(value: Any) -> float:
    """``--count-confidence`` -> a float in [0, 1]; else an EdgetlError naming it."""
    if not 0.0 <= float(value) <= 1.0:
        raise EdgetlError(f"--count-confidence {value} is not valid",
                          hint="give the mean detection score a track needs to be counted, in [0, 1] (0 = all)")
    return float(value)


@dataclass
class _Side:
    side: int  # +1 / -1: the side the centre was last seen beyond the band; 0: not yet
    point: Tuple[float, float]  # the centre then
    last_frame: int
    counted: set = field(default_factory=set)  # directions already counted for this track


class LineCounter:
    """Counts tracks whose box centre crosses the segment ``line`` = (x1, y1, x2, y2).

    Direction: ``"in"`` when the centre moves to the side where the cross product
    ``(x2 - x1) * (y - y1) - (y2 - y1) * (x - x1)`` is positive (for a line drawn left to right, in
    image coordinates: moving down), ``"out"`` the other way. ``counts`` = ``{"in": {label: n},
    "out": {label: n}, "total": n}``. Tracks unseen for ``forget_after`` frames are forgotten (memory
    stays bounded on a day-long stream). A crossing by a track whose :attr:`Track.confidence`
    is below ``min_confidence`` is not counted; ``low_confidence`` counts them (module docstring)."""

    def __init__(self, line: Sequence[int], labels: Sequence[str], margin: float = 0.2, forget_after: int = 300,
                 min_confidence: float = 0.5):
        self.min_confidence = check_count_confidence(min_confidence)
        self.low_confidence = 0
        self.line = parse_line(line)
        self.labels = list(labels)
        self.margin = float(margin)
        self.forget_after = int(forget_after)
        x1, y1, x2, y2 = (float(v) for v in self.line)
        self._a = np.array([x1, y1])
        self._d = np.array([x2 - x1, y2 - y1])
        self._len = math.hypot(x2 - x1, y2 - y1)
        self.counts: Dict[str, Any] = {"in": {lab: 0 for lab in self.labels},
                                       "out": {lab: 0 for lab in self.labels}, "total": 0}
        self._state: Dict[int, _Side] = {}

    def _distance(self, p: Tuple[float, float]) -> float:
        """Signed distance of a point to the line (positive on the "in" side)."""
        return float(self._d[0] * (p[1] - self._a[1]) - self._d[1] * (p[0] - self._a[0])) / self._len

    def _through_segment(self, p: Tuple[float, float], q: Tuple[float, float]) -> bool:
        """Whether the path p -> q (on opposite sides) meets the line within the segment's ends."""
        dp, dq = self._distance(p), self._distance(q)
        u = dp / (dp - dq)
        x = np.array([p[0] + u * (q[0] - p[0]), p[1] + u * (q[1] - p[1])])
        t = float((x - self._a) @ self._d) / (self._len ** 2)
        return -1e-9 <= t <= 1 + 1e-9

    def update(self, tracks: Sequence[Track], frame_index: int) -> List[Dict[str, Any]]:
        """This frame's tracks -> the crossings: ``{"event": "cross", "id", "label", "direction",
        "frame"}``."""
        events = []
        for t in tracks:
            b = np.asarray(t.box, np.float64)
            p = (float(b[0] + b[2]) / 2, float(b[1] + b[3]) / 2)
            band = max(2.0, self.margin * float(min(b[2] - b[0], b[3] - b[1])))
            d = self._distance(p)
            side = 1 if d > band else -1 if d < -band else 0
            st = self._state.get(t.id)
            if st is None:
                self._state[t.id] = _Side(side, p, frame_index)
                continue
            st.last_frame = frame_index
            if side == 0:
                continue  # inside the band: wait until it is clearly on one side
            if st.side == -side and self._through_segment(st.point, p):
                direction = "in" if side > 0 else "out"
                if direction not in st.counted and t.confidence < self.min_confidence:
                    self.low_confidence += 1  # not an object on the balance of its boxes: not counted
                elif direction not in st.counted:
                    st.counted.add(direction)
                    label = self.labels[t.cls] if 0 <= t.cls < len(self.labels) else f"class {t.cls}"
                    self.counts[direction][label] = self.counts[direction].get(label, 0) + 1
                    self.counts["total"] += 1
                    events.append({"event": "cross", "id": t.id, "label": label, "direction": direction,
                                   "frame": frame_index})
            st.side, st.point = side, p
        old = [k for k, st in self._state.items() if frame_index - st.last_frame > self.forget_after]
        for k in old:
            del self._state[k]
        return events
