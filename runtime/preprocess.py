"""The preprocessing spec and its ONE implementation (numpy + OpenCV).

Validation, calibration, the accuracy gate, benchmarks and the camera runtime all call
:func:`preprocess`; training puts random augmentation *in front of* it (on the decoded uint8
image) and never resizes or normalises a second way. ``tests/test_preprocess_parity.py`` pins this.

Geometry (``resize``):

* ``shorter_crop``: scale so the shorter side is ``resize_size`` (default: input size /
  ``crop_fraction``), then take the centre ``input_size`` crop. Implemented as ONE resize of the
  source region that ends up in the crop (crop first, then resize), which is what makes a 720p
  frame cost ~0.3 ms instead of resizing the whole frame first.
* ``stretch``: resize the whole image to ``input_size`` ignoring aspect ratio.
* ``letterbox``: fit the whole image inside ``input_size`` keeping aspect, pad with ``pad_value``.

Values: the image is converted to ``color`` order (RGB or BGR), then, for ``dtype == "float32"``,
``(x - mean) / std`` per channel with mean/std in 0..255 units. For ``dtype == "uint8"`` the model
itself normalises (folded into the graph) and this function only does geometry and layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from .errors import ManifestError

_INTERP = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
RESIZE_POLICIES = ("shorter_crop", "stretch", "letterbox")
COLOR_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "uint8")


@dataclass(frozen=True)
class PreprocessSpec:
    """How a decoded BGR uint8 image becomes the model's input tensor."""

    input_size: tuple[int, int] = (224, 224)  # (height, width)
    resize: str = "shorter_crop"
    crop_fraction: float = 0.875
    resize_size: int | None = None  # shorter side before the crop; None = from crop_fraction
    interpolation: str = "linear"  # "area" anti-aliases large downscales but costs ~1.2 ms on a 720p frame vs ~0.1
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # 0..255 units, in `color` order
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    color: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"
    pad_value: int = 0

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, allowed: Sequence[Any] | str) -> ManifestError:
            return ManifestError(f"preprocess.{key} = {value!r} is not valid",
                                 hint=f"use one of {allowed}" if not isinstance(allowed, str) else allowed)

        size = tuple(int(v) for v in self.input_size)
        if len(size) != 2 or min(size) < 8:
            raise bad("input_size", self.input_size, "give [height, width], each at least 8")
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.resize not in RESIZE_POLICIES:
            raise bad("resize", self.resize, RESIZE_POLICIES)
        if self.interpolation not in _INTERP:
            raise bad("interpolation", self.interpolation, tuple(_INTERP))
        if self.color not in COLOR_ORDERS:
            raise bad("color", self.color, COLOR_ORDERS)
        if self.layout not in LAYOUTS:
            raise bad("layout", self.layout, LAYOUTS)
        if self.dtype not in DTYPES:
            raise bad("dtype", self.dtype, DTYPES)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise bad("mean/std", (self.mean, self.std), "three values each, std > 0")
        if not 0.1 <= self.crop_fraction <= 1.0:
            raise bad("crop_fraction", self.crop_fraction, "a fraction in (0.1, 1.0]")
        if self.resize_size is not None and int(self.resize_size) < min(size):
            raise bad("resize_size", self.resize_size, f"at least the crop size {min(size)}")

    # ---- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(f"unknown preprocess key(s): {', '.join(unknown)}",
                                hint=f"known keys are {sorted(known)}")
        return cls(**dict(data))

    @property
    def shorter_side(self) -> int:
        if self.resize_size is not None:
            return int(self.resize_size)
        return int(round(min(self.input_size) / self.crop_fraction))

    def tensor_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        h, w = self.input_size
        return (batch, 3, h, w) if self.layout == "NCHW" else (batch, h, w, 3)


def _geometry(img: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    out_h, out_w = spec.input_size
    interp = _INTERP[spec.interpolation]
    h, w = img.shape[:2]
    if spec.resize == "stretch":
        return cv2.resize(img, (out_w, out_h), interpolation=interp)
    if spec.resize == "letterbox":
        scale = min(out_w / w, out_h / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = cv2.resize(img, (nw, nh), interpolation=interp)
        canvas = np.full((out_h, out_w, 3), spec.pad_value, dtype=np.uint8)
        y0, x0 = (out_h - nh) // 2, (out_w - nw) // 2
        canvas[y0:y0 + nh, x0:x0 + nw] = resized
        return canvas
    # shorter_crop: the region of the source that lands in the crop, then one resize.
    scale = spec.shorter_side / min(h, w)
    crop_w = min(w, max(1, round(out_w / scale)))
    crop_h = min(h, max(1, round(out_h / scale)))
    x0, y0 = (w - crop_w) // 2, (h - crop_h) // 2
    region = img[y0:y0 + crop_h, x0:x0 + crop_w]
    return cv2.resize(region, (out_w, out_h), interpolation=interp)


def preprocess(image_bgr: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """One decoded BGR uint8 image (H, W, 3) -> one model input without the batch axis.

    Returns float32 (C, H, W) / (H, W, C) normalised, or uint8 when ``spec.dtype == "uint8"``.
    """
    if image_bgr.dtype != np.uint8 or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"preprocess expects a BGR uint8 image (H, W, 3), got {image_bgr.dtype} "
                         f"{image_bgr.shape}; decode files with edgetl.runtime.imageio.read_image")
    img = _geometry(image_bgr, spec)
    if spec.color == "RGB":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if spec.layout == "NCHW":  # transpose the uint8 image (4x fewer bytes than after the float cast)
        img = np.ascontiguousarray(img.transpose(2, 0, 1))
    if spec.dtype == "float32":
        shape = (3, 1, 1) if spec.layout == "NCHW" else (3,)
        x = img.astype(np.float32)
        x -= np.asarray(spec.mean, dtype=np.float32).reshape(shape)  # in place: no temporaries
        x *= (1.0 / np.asarray(spec.std, dtype=np.float32)).reshape(shape)
        return x
    return img


def build_input_spec(spec: PreprocessSpec, build_input: Mapping[str, Any] | None) -> PreprocessSpec:
    """The spec a build's model takes: the artifact's spec with the build's ``input`` overrides.

    A build may fold the value conversion into its model (e.g. an OpenVINO IR with
    ``fold_preprocessing``: ``{"dtype": "uint8", "layout": "NHWC"}``); geometry and colour order
    always stay the artifact's, so every build sees the same pixels."""
    if not build_input:
        return spec
    allowed = {"dtype", "layout"}
    unknown = sorted(set(build_input) - allowed)
    if unknown:
        raise ManifestError(f"builds[].input: unknown key(s) {', '.join(unknown)}",
                            hint=f"a build may only change {sorted(allowed)} of the preprocessing")
    return replace(spec, **{k: build_input[k] for k in allowed if k in build_input})


def to_model_input(x: np.ndarray, spec: PreprocessSpec, target: PreprocessSpec) -> np.ndarray:
    """Tensors made by ``preprocess(img, spec)`` -> what ``preprocess(img, target)`` gives for the same
    images (batch axis first). Only dtype and layout may differ. float32 -> uint8 inverts the
    normalisation exactly (the pixels were uint8) and checks it: a tensor that was not made with
    ``spec`` is refused instead of silently mis-converted. Used to feed a checkset (stored as
    float32) to a build whose model takes uint8. Returns ``x`` itself when the specs are equal."""
    if target == spec:
        return x
    if replace(spec, dtype=target.dtype, layout=target.layout) != target:
        raise ValueError("to_model_input converts dtype/layout only; geometry, colour and values must match")
    x = np.asarray(x)
    if spec.dtype != target.dtype:
        shape = (1, 3, 1, 1) if spec.layout == "NCHW" else (1, 1, 1, 3)
        mean = np.asarray(spec.mean, np.float32).reshape(shape)
        std = np.asarray(spec.std, np.float32).reshape(shape)
        if spec.dtype == "float32":  # -> uint8
            pixels = np.rint(x.astype(np.float32) * std + mean)
            again = (pixels.astype(np.float32) - mean) * (1.0 / std)
            if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255 or \
                    not np.allclose(again, x, rtol=0, atol=1e-3 * float((1.0 / std).max())):
                raise ManifestError("the float inputs were not made by this preprocessing spec (they do not "
                                    "map back to uint8 pixels)",
                                    hint="re-create the artifact so its checkset matches manifest.preprocess")
            x = pixels.astype(np.uint8)
        else:  # uint8 -> float32
            x = (x.astype(np.float32) - mean) * (1.0 / std)
    if spec.layout != target.layout:
        x = x.transpose(0, 2, 3, 1) if target.layout == "NHWC" else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def preprocess_batch(images_bgr: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """A list of decoded BGR uint8 images -> a batch tensor (N, ...)."""
    return np.stack([preprocess(im, spec) for im in images_bgr])
