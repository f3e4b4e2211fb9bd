"""Anchor scales and how well they cover the training boxes (``edgetl train --task detect --anchor-scales``).

SSDLite's anchors (torchvision's ``DefaultBoxGenerator``: six maps, scales spaced linearly from
``lo`` to ``hi`` of the input side, aspect ratios 1, 2, 3 both ways) default to torchvision's
``lo, hi = 0.2, 0.95``; ``--anchor-scales LO,HI`` sets others. Every detection training reports the
coverage of its anchors on the training split's boxes (as the model sees them: model-input pixels,
before augmentation): the share of boxes with an anchor at IoU >= 0.5, the loss's matching rule
(YOLOv5 calls it "best possible recall"), beside the defaults' share. A box without such an anchor
gets one forced positive in training.

Fitting the scales to maximise that coverage was built and measured, and is NOT offered: on the
conveyor cells it raised the coverage from 82.4 % to 99.2 % (0.14-0.60) and lowered the test
class-agnostic mAP@0.5 from 90.55 to 85.67 (8 epochs); on the tree crowns 75.5 % -> 96.7 %
(0.10-0.70) and test mAP@0.5 26.96 -> 6.28 (20 epochs). A seventh, stride-8 map (Lite0's 40x40
stage, anchors from 0.1 of the side: 98.7 % of the cells covered, 14.9 anchors per box against 9.9)
was prototyped and measured too, and was worse still: class-agnostic 71.89 after 8 epochs (its
validation mAP still rising). Why more and better-fitting anchors train worse at these budgets is
not established; docs/results.md has the figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..runtime.errors import EdgetlError

DEFAULT_SCALES = (0.2, 0.95)  # torchvision ssdlite320's min_ratio, max_ratio
MATCH_IOU = 0.5  # as the loss's matcher (model.MATCH_IOU)
MAX_BOXES = 4000  # boxes scored (a fixed, seeded sample beyond this)


@dataclass(frozen=True)
class AnchorCoverage:
    """A training's anchor scales and how well they, and the defaults, cover its training boxes."""

    scales: tuple[float, float]
    how: str  # "default" | "given"
    boxes: int  # training boxes scored
    recall: float | None  # share of boxes with an anchor at IoU >= 0.5
    positives: float | None  # mean number of anchors at IoU >= 0.5 per box
    default_recall: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"scales": list(self.scales), "how": self.how, "boxes": self.boxes,
                "recall_iou50": _round(self.recall), "positives_per_box": _round(self.positives),
                "default_scales": list(DEFAULT_SCALES), "default_recall_iou50": _round(self.default_recall)}

    def describe(self) -> str:
        lo, hi = self.scales
        if self.recall is None:
            return f"anchors: scales {lo:.2f}-{hi:.2f} of the input side ({self.how}; no training boxes to score)"
        own = (f"{100 * self.recall:.1f} % of {self.boxes} training boxes have an anchor at IoU >= {MATCH_IOU} "
               f"({self.positives:.1f} on average)")
        if self.scales == DEFAULT_SCALES:
            return f"anchors: torchvision's scales {lo:.2f}-{hi:.2f} ({self.how}): {own}"
        return (f"anchors: scales {lo:.2f}-{hi:.2f} ({self.how}): {own} "
                f"(torchvision's {DEFAULT_SCALES[0]:.2f}-{DEFAULT_SCALES[1]:.2f}: {100 * self.default_recall:.1f} %)")


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def parse_scales(value: str | Sequence[float] | None) -> tuple[float, float]:
    """``"default"`` (torchvision's) or ``"LO,HI"`` (fractions of the input side, 0 < LO < HI <= 1)."""
    if value is None or value == "default":
        return DEFAULT_SCALES
    try:
        parts = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except ValueError:
        parts = []
    if len(parts) != 2 or not 0.0 < parts[0] < parts[1] <= 1.0:
        raise EdgetlError(f"anchor_scales = {value!r} is not valid",
                          hint="use default (torchvision's 0.2,0.95) or LO,HI with 0 < LO < HI <= 1, e.g. 0.1,0.6")
    return (parts[0], parts[1])


def generator(scales: Sequence[float]):
    """torchvision's DefaultBoxGenerator with SSDLite's aspect ratios and these scale ends."""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

    from .model import ASPECT_RATIOS

    return DefaultBoxGenerator([list(r) for r in ASPECT_RATIOS], min_ratio=float(scales[0]),
                               max_ratio=float(scales[1]))


def coverage(boxes: np.ndarray, anchors: np.ndarray) -> tuple[float, float]:
    """``(recall, positives)`` of ``boxes`` (N, 4) by ``anchors`` (A, 4), both xyxy: the share of
    boxes with an anchor at IoU >= 0.5 and the mean number of such anchors per box.
    numpy, not torchvision's ``box_iou``: beside another job's OpenMP threads torch's own threads
    made this ~8x slower (measured on 2 cores)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 1, 4)
    a = np.asarray(anchors, np.float32).reshape(1, -1, 4)
    iw = np.clip(np.minimum(b[..., 2], a[..., 2]) - np.maximum(b[..., 0], a[..., 0]), 0, None)
    ih = np.clip(np.minimum(b[..., 3], a[..., 3]) - np.maximum(b[..., 1], a[..., 1]), 0, None)
    inter = iw * ih
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    pos = (inter >= MATCH_IOU * (area_b + area_a - inter)).sum(1)  # IoU >= 0.5 without a division
    return float(np.mean(pos > 0)), float(np.mean(pos))


def measure(scales: tuple[float, float], boxes: np.ndarray, anchors: np.ndarray, default_anchors,
            seed: int = 0) -> AnchorCoverage:
    """How the ``anchors`` (A, 4) of ``scales`` cover ``boxes`` (N, 4), both in model-input pixels,
    beside torchvision's scales (``default_anchors()`` gives theirs, called only when ``scales`` are
    others)."""
    scales = tuple(float(v) for v in scales)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    if len(boxes) > MAX_BOXES:
        boxes = boxes[np.sort(np.random.default_rng(seed).choice(len(boxes), MAX_BOXES, replace=False))]
    how = "default" if scales == DEFAULT_SCALES else "given"
    if not len(boxes):
        return AnchorCoverage(scales, how, 0, None, None, None)
    recall, positives = coverage(boxes, anchors)
    default = recall if how == "default" else coverage(boxes, default_anchors())[0]
    return AnchorCoverage(scales, how, len(boxes), recall, positives, default)


__all__ = ["AnchorCoverage", "DEFAULT_SCALES", "coverage", "generator", "measure", "parse_scales"]
