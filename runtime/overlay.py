"""Draw the result on the frame: label and score, FPS and latency, the region of interest."""

from __future__ import annotations

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
GREEN, AMBER, WHITE, BLACK = (60, 200, 60), (0, 170, 255), (255, 255, 255), (0, 0, 0)


def draw_overlay(img: np.ndarray, label: str, score: float, fps: float, latency_ms: float,
                 roi: tuple[int, int, int, int] | None = None, known: bool = True) -> np.ndarray:
    """Draw in place on a BGR uint8 frame and return it."""
    h = img.shape[0]
    scale = max(0.4, h / 720.0)
    thick = max(1, round(2 * scale))
    if roi is not None:
        x, y, w, rh = roi
        cv2.rectangle(img, (x, y), (x + w - 1, y + rh - 1), GREEN if known else AMBER, thick)
    lines = ((f"{label}  {score:.2f}", GREEN if known else AMBER, 1.1 * scale),
             (f"{fps:.1f} FPS  {latency_ms:.1f} ms", WHITE, 0.7 * scale))
    pad = round(8 * scale)
    y = pad
    for text, color, s in lines:
        (tw, th), base = cv2.getTextSize(text, FONT, s, thick)
        cv2.rectangle(img, (pad, y), (pad * 3 + tw, y + th + base + pad), BLACK, -1)
        cv2.putText(img, text, (pad * 2, y + th + pad // 2), FONT, s, color, thick, cv2.LINE_AA)
        y += th + base + pad + pad // 2
    return img
