"""Decode image files into the one format every stage works on: BGR, uint8, (H, W, 3).

Grayscale, alpha, 16-bit and CMYK files all come out as 3-channel 8-bit. Empty, truncated or
undecodable files raise :class:`ImageDecodeError` with the path and the reason, so the data
loader can skip and list them instead of training on garbage.

Decoded size is bounded: the pixel count a file's header declares (PNG, JPEG, BMP, WebP, TIFF,
PNM) is checked *before* decoding, so a small file that declares a huge image (a decompression
bomb) is refused without allocating it. The limit is ``MAX_PIXELS`` (100 megapixels), overridden by
the environment variable ``EDGETL_MAX_IMAGE_PIXELS`` or ``read_image(..., max_pixels=N)``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional, Tuple

import cv2
import numpy as np

from .errors import EdgetlError, ImageDecodeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "EDGETL_MAX_IMAGE_PIXELS"


def pixel_limit() -> int:
    """The decoded-size limit in pixels: ``$EDGETL_MAX_IMAGE_PIXELS`` when set, else ``MAX_PIXELS``."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip().replace("_", "")
    if not text:
        return MAX_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value < 1:
        raise EdgetlError(f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r} is not a pixel count",
                          hint=f"give a whole number of pixels, e.g. {MAX_PIXELS_ENV}=200000000 (200 megapixels)")
    return value


def _jpeg_size(b: bytes) -> Optional[Tuple[int, int]]:
    i = 2
    while i + 9 < len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        (length,) = struct.unpack(">H", b[i + 2:i + 4])
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            h, w = struct.unpack(">HH", b[i + 5:i + 9])
            return w, h
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before any frame header
            return None
        i += 2 + length
    return None


def _tiff_size(b: bytes) -> Optional[Tuple[int, int]]:
    end = "<" if b[:2] == b"II" else ">"
    (ifd,) = struct.unpack(end + "I", b[4:8])
    if ifd + 2 > len(b):
        return None
    (n,) = struct.unpack(end + "H", b[ifd:ifd + 2])
    dims = {}
    for k in range(min(n, 512)):
        e = ifd + 2 + 12 * k
        if e + 12 > len(b):
            break
        tag, typ = struct.unpack(end + "HH", b[e:e + 4])
        if tag in (256, 257):
            dims[tag] = struct.unpack(end + ("H" if typ == 3 else "I"), b[e + 8:e + (10 if typ == 3 else 12)])[0]
    return (dims[256], dims[257]) if len(dims) == 2 else None


def _pnm_size(b: bytes) -> Optional[Tuple[int, int]]:
    fields, i = [], 2
    while len(fields) < 2 and i < len(b):
        c = b[i:i + 1]
        if c == b"#":
            j = b.find(b"\n", i)
            i = len(b) if j < 0 else j + 1
        elif c.isdigit():
            j = i
            while j < len(b) and b[j:j + 1].isdigit():
                j += 1
            fields.append(int(b[i:j]))
            i = j
        elif c.isspace():
            i += 1
        else:
            return None
    return (fields[0], fields[1]) if len(fields) == 2 else None


def header_size(head: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) that an image file's first bytes declare, or None for a format or header this
    does not read (OpenCV's own limit then applies). Only the header is looked at: nothing is decoded."""
    try:
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            return struct.unpack(">II", head[16:24])
        if head[:2] == b"\xff\xd8":
            return _jpeg_size(head)
        if head[:2] == b"BM":
            w, h = struct.unpack("<ii", head[18:26])
            return abs(w), abs(h)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            chunk = head[12:16]
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", head[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L":
                (v,) = struct.unpack("<I", head[21:25])
                return (v & 0x3FFF) + 1, ((v >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                return (int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1)
            return None
        if head[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(head)
        if head[:1] == b"P" and head[1:2] in b"123456" and len(head) > 2 and head[2:3].isspace():
            return _pnm_size(head[:4096])
    except struct.error:  # a header cut short: the decoder will say what is wrong with the file
        return None
    return None


def _check_size(w: int, h: int, path: Path, limit: int) -> None:
    if w * h > limit:
        mp = f" ({w * h / 1e6:.0f} megapixels)" if w * h >= 1e6 else ""
        raise ImageDecodeError(f"{path}: {w}x{h} pixels{mp} is over the limit of {limit / 1e6:g} megapixels",
                               hint=f"downscale the image, or raise the limit with {MAX_PIXELS_ENV}=<pixels>")


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


def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as BGR uint8 (H, W, 3), or raise ImageDecodeError naming the file.
    An image over ``max_pixels`` (default: :func:`pixel_limit`) is refused before it is decoded."""
    path = Path(path)
    limit = int(max_pixels) if max_pixels is not None else pixel_limit()
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
            size = header_size(head)
            if size is not None:  # before reading the rest, and long before decoding
                _check_size(int(size[0]), int(size[1]), path, limit)
            buf = np.frombuffer(head + f.read(), dtype=np.uint8)
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
    _check_size(img.shape[1], img.shape[0], path, limit)  # a format whose header was not read above
    return to_bgr8(img)
