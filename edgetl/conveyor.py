"""The demo's "conveyor" video: held-out test images passing under a camera, one after another.

Each image is shown for ``frames_per_item`` frames at ``size`` (default 1280x720), sliding in
from the right on a dark belt, then resting centred; a sidecar CSV lists which image (and its
true label) is on screen for each frame, so the runtime's predictions can be scored.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .runtime.errors import EdgetlError
from .runtime.imageio import read_image

FOURCC = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


def _belt(size: tuple[int, int]) -> np.ndarray:
    w, h = size
    frame = np.full((h, w, 3), 38, np.uint8)
    for y in range(0, h, 24):  # belt texture: faint horizontal ribs
        frame[y:y + 2] = 52
    return frame


def make_conveyor_video(items: Sequence[tuple[Path, str]], out: str | Path, fps: float = 15.0,
                        frames_per_item: int = 6, size: tuple[int, int] = (1280, 720),
                        item_height: float = 0.8) -> dict:
    """Write the video and ``<out>.labels.csv`` (frame, path, label). Returns a summary dict."""
    out = Path(out)
    if not items:
        raise EdgetlError("no images to put on the conveyor video")
    if out.suffix.lower() not in FOURCC:
        raise EdgetlError(f"{out}: unsupported video type", hint=f"use one of {sorted(FOURCC)}")
    if frames_per_item < 1:
        raise EdgetlError("frames_per_item must be at least 1")
    w, h = size
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*FOURCC[out.suffix.lower()]), fps, (w, h))
    if not writer.isOpened():
        raise EdgetlError(f"{out}: OpenCV cannot write this video format here")
    belt = _belt(size)
    side = int(h * item_height)
    y0 = (h - side) // 2
    slide = max(1, frames_per_item // 3)  # the first third of an item's frames: sliding in
    rows = []
    n = 0
    try:
        for path, label in items:
            tile = cv2.resize(read_image(path), (side, side), interpolation=cv2.INTER_AREA)
            rest_x = (w - side) // 2
            for k in range(frames_per_item):
                frac = min(1.0, (k + 1) / slide)
                x = int(w - (w - rest_x) * frac)
                frame = belt.copy()
                vis = min(side, w - x)
                frame[y0:y0 + side, x:x + vis] = tile[:, :vis]
                writer.write(frame)
                rows.append((n, str(path), label))
                n += 1
    except BaseException:
        writer.release()
        tmp.unlink(missing_ok=True)
        raise
    writer.release()
    tmp.replace(out)
    with open(out.with_suffix(out.suffix + ".labels.csv"), "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["frame", "path", "label"])
        wr.writerows(rows)
    return {"video": str(out), "frames": n, "items": len(items), "fps": fps, "size": [w, h]}
