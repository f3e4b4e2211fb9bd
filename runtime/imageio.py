"""Decode image files into the one format every stage works on: BGR, uint8, (H, W, 3).

Grayscale, alpha, 16-bit and CMYK files all come out as 3-channel 8-bit. Empty, truncated or
undecodable files raise :class:`ImageDecodeError` with the path and the reason, so the data
loader can skip and list them instead of training on garbage.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import ImageDecodeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _check_complete(buf: np.ndarray, path: Path) -> None:
    """Catch truncated JPEG/PNG files, which OpenCV would otherwise decode half-grey."""
    head = buf[:8].tobytes()
    tail = buf[-64:].tobytes()
    if head[:2] == b"\xff\xd8" and b"\xff\xd9" not in tail:
        raise ImageDecodeError(f"{path}: truncated JPEG (no end-of-image marker)")
    if head == b"\x89PNG\r\n\x1a\n" and b"IEND" not in tail:
        raise ImageDecodeError(f"{path}: truncated PNG (no IEND chunk)")


def to_bgr8(img: np.ndarray) -> np.ndarray:
    """Any decoded array (gray, BGRA, 16-bit, float) -> BGR uint8 (H, W, 3)."""
    if img.dtype == np.uint16:
        img = (img.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        peak = float(np.nanmax(img)) if img.size else 1.0
        img = np.clip(img * (255.0 if peak <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    return img


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as BGR uint8 (H, W, 3), or raise ImageDecodeError naming the file."""
    path = Path(path)
    try:
        buf = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageDecodeError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    if buf.size == 0:
        raise ImageDecodeError(f"{path}: zero-byte file")
    _check_complete(buf, path)
    # ANYDEPTH keeps 16-bit precision for to_bgr8's scaling; ANYCOLOR keeps gray as gray. CMYK
    # JPEGs are converted to BGR by the decoder itself.
    img = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if img is None:
        raise ImageDecodeError(f"{path}: not a decodable image")
    return to_bgr8(img)
