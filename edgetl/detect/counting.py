"""How well ``edgetl run --count-line`` counted: its crossing events matched to a video's ground truth.

``edgetl data scenes`` writes ``conveyor_gt.json`` (every object's box per frame and the frame it
crosses the counting line). ``edgetl run ... --count-line`` prints one JSON line per frame with the
tracked boxes (``detections`` with ``id``) and ``events`` (``cross`` with the track id). A crossing
event is matched to the ground-truth object whose box overlaps the track's box most at the event's
frame, among the objects that cross within ``window`` frames of it, each object at most once
(greedy, best overlap first). Then:

- ``counted``: objects matched by exactly one event (counted once); ``missed``: objects never matched;
- ``extra``: events matched to no object (a double count of an object whose track broke, or a
  false detection) — "no double counts" means ``extra == 0``;
- ``class_correct``: matched events whose label is the object's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def read_events(jsonl: Path) -> list[dict[str, Any]]:
    """Crossing events of an ``edgetl run`` JSON-lines file, each with the track's box at that frame."""
    events = []
    for line in Path(jsonl).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        boxes = {d.get("id"): d["box"] for d in rec.get("detections", []) if d.get("id") is not None}
        for e in rec.get("events", []):
            if e.get("event") == "cross":
                events.append({**e, "box": boxes.get(e["id"])})
    return events


def score_counts(jsonl: Path, gt_path: Path, window: int | None = None) -> dict[str, Any]:
    """Match the run's crossing events to the ground truth's crossings (module docstring)."""
    gt = json.loads(Path(gt_path).read_text(encoding="utf-8"))
    window = int(window if window is not None else max(3, round(0.5 * gt["fps"])))
    labels = {o["id"]: o["label"] for o in gt["objects"]}
    crossing = {c["id"]: c["frame"] for c in gt["crossings"]}
    events = read_events(jsonl)
    pairs = []
    for i, e in enumerate(events):
        f = e["frame"]
        if e["box"] is None or not 0 <= f < len(gt["per_frame"]):
            continue
        for o in gt["per_frame"][f]:
            if o["id"] in crossing and abs(crossing[o["id"]] - f) <= window:
                pairs.append((_iou(e["box"], o["box"]), i, o["id"]))
    matched: dict[int, int] = {}
    used: set[int] = set()
    for iou, i, oid in sorted(pairs, reverse=True):
        if iou <= 0.1 or i in matched or oid in used:
            continue
        matched[i] = oid
        used.add(oid)
    per_class: dict[str, dict[str, int]] = {}
    for oid in crossing:
        c = per_class.setdefault(labels[oid], {"objects": 0, "counted": 0, "class_correct": 0})
        c["objects"] += 1
    for i, oid in matched.items():
        c = per_class[labels[oid]]
        c["counted"] += 1
        c["class_correct"] += int(events[i].get("label") == labels[oid])
    n = len(crossing)
    counted = len(used)
    correct = sum(c["class_correct"] for c in per_class.values())
    by_label: dict[str, int] = {}
    for e in events:
        by_label[e.get("label", "?")] = by_label.get(e.get("label", "?"), 0) + 1
    return {"objects": n, "events": len(events), "counted": counted, "missed": n - counted,
            "extra": len(events) - len(matched), "counted_fraction": counted / n if n else float("nan"),
            "class_correct": correct, "class_accuracy": correct / counted if counted else float("nan"),
            "per_class": per_class, "counts_by_label": by_label, "expected_counts": gt.get("expected_counts"),
            "window_frames": window, "mean_frame_offset": float(np.mean([abs(events[i]["frame"] - crossing[o])
                                                                          for i, o in matched.items()]))
            if matched else None}
