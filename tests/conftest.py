"""Shared fixtures: tiny generated images and folders. Tests run in seconds on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
if "EDGETL_CACHE" not in os.environ:  # the sensitivity-ranking cache of this test session only
    import tempfile

    os.environ["EDGETL_CACHE"] = tempfile.mkdtemp(prefix="edgetl-test-cache-")


def _torch_threads() -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(2)


_torch_threads()


def make_class_image(cls: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """A trivially separable synthetic image: class 0 = bright disc, 1 = dark stripes, 2 = red square."""
    img = rng.integers(60, 120, size=(size, size, 3), dtype=np.uint8)
    c = size // 2
    if cls == 0:
        cv2.circle(img, (c, c), size // 3, (250, 250, 250), -1)
    elif cls == 1:
        img[:, ::6] = 5
        img[:, 1::6] = 5
    else:
        cv2.rectangle(img, (size // 4, size // 4), (3 * size // 4, 3 * size // 4), (20, 20, 240), -1)
    return img


def write_image_folder(root: Path, n_per_class: int = 12, classes=("disc", "stripes"), seed: int = 0,
                       size: int = 40, suffix: str = ".png") -> Path:
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            cv2.imwrite(str(d / f"{name}_{i:03d}{suffix}"), make_class_image(ci, rng, size))
    return root


def png_bomb(path: Path, w: int = 40000, h: int = 40000) -> Path:
    """A 100-byte PNG whose header declares w x h pixels (decoding it would allocate w*h*3 bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")
