"""Training augmentation on the DECODED image (BGR uint8), in front of the shared ``preprocess``.

Nothing here resizes to the model's input or normalises: the augmented image goes through exactly
the same :func:`edgetl.runtime.preprocess.preprocess` as validation, calibration and the device.
Each sample's randomness comes from its own ``numpy.random.Generator`` (seeded by run seed, epoch
and sample index), so augmentation is reproducible whatever the number of DataLoader workers, and a
resumed run draws the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .runtime.errors import EdgetlError


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths; 0 switches a transform off."""

    scale: float = 0.6  # random resized crop: the crop keeps between `scale` and 1.0 of the area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # its aspect ratio range
    hflip: float = 0.5  # probability of a horizontal flip
    vflip: float = 0.0  # probability of a vertical flip
    rotate: float = 10.0  # max rotation, degrees (uniform in [-rotate, rotate])
    brightness: float = 0.2  # brightness factor uniform in [1 - b, 1 + b]
    contrast: float = 0.2  # contrast factor uniform in [1 - c, 1 + c]

    def __post_init__(self) -> None:
        checks = {"aug_scale": (self.scale, 0.05, 1.0), "aug_hflip": (self.hflip, 0.0, 1.0),
                  "aug_vflip": (self.vflip, 0.0, 1.0), "aug_rotate": (self.rotate, 0.0, 180.0),
                  "aug_brightness": (self.brightness, 0.0, 1.0), "aug_contrast": (self.contrast, 0.0, 1.0)}
        for key, (value, lo, hi) in checks.items():
            if not lo <= float(value) <= hi:
                raise EdgetlError(f"{key} = {value} is out of range", hint=f"use a value in [{lo}, {hi}]")


def random_resized_crop(img: np.ndarray, scale: float, ratio: tuple[float, float],
                        rng: np.random.Generator) -> np.ndarray:
    """A random region covering [scale, 1] of the area with an aspect ratio in ``ratio``
    (torchvision's sampling); the region is returned as is: ``preprocess`` resizes it."""
    h, w = img.shape[:2]
    if scale >= 1.0:
        return img
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale, 1.0)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            y0 = int(rng.integers(0, h - ch + 1))
            x0 = int(rng.integers(0, w - cw + 1))
            return img[y0:y0 + ch, x0:x0 + cw]
    return img


def rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), degrees, 1.0)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def brightness_contrast(img: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """``out = contrast * (x - mean) + brightness * mean`` (mean = the image's grey level), one LUT."""
    mean = float(img.mean())
    lut = np.clip(contrast * (np.arange(256, dtype=np.float32) - mean) + brightness * mean + 0.5, 0, 255)
    return cv2.LUT(img, lut.astype(np.uint8))


def augment(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """One random augmentation of a decoded BGR uint8 image; returns BGR uint8 (any size)."""
    out = random_resized_crop(img, cfg.scale, cfg.ratio, rng)
    if cfg.hflip and rng.random() < cfg.hflip:
        out = out[:, ::-1]
    if cfg.vflip and rng.random() < cfg.vflip:
        out = out[::-1]
    out = np.ascontiguousarray(out)
    if cfg.rotate:
        out = rotate(out, rng.uniform(-cfg.rotate, cfg.rotate))
    if cfg.brightness or cfg.contrast:
        b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
        c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
        out = brightness_contrast(out, b, c)
    return out
