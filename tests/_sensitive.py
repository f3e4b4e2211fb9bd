"""A small classifier trained in seconds whose INT8 decisions are not trivial, with layers whose
quantization is known to break it, for the tests of the repair decisions (tests/test_repair.py).

* Data ("graded"): 32x32 images of a grey blob whose brightness ``t ~ U(0, 1)`` decides the class
  (three classes by thirds of ``t``), on a noisy background. Many images sit near a class boundary,
  so the float model is not always right, and INT8 noise can flip a few of them.
* Model: conv(3->8, s2) + ReLU -> conv(8->16, s2) + ReLU -> global average pool -> linear(16->3).
  Plain ReLU is positively homogeneous, so the float function can be rewritten exactly.
* ``head_outlier``: one weight of the classifier's row per class is set to a huge value on a feature
  that is always zero (a "dead" channel of conv2 whose bias keeps its ReLU at 0). Float is unchanged;
  per-channel 8-bit weights of the head get a step of ``outlier / 127``, so every real weight rounds
  to a few levels and INT8 collapses. Keeping exactly the head in float repairs it.
* ``spike``: conv1 gets a detector channel that answers (hugely) only to a pure white 8x8 patch and
  feeds nothing downstream. Images with the patch appear only in the calibration set (a glare on a
  few calibration frames): min-max calibration then stretches conv1's output range to the spike and
  crushes every real activation; a percentile calibrator clips the rare spike and is fine.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from edgetl.runtime.preprocess import PreprocessSpec, preprocess

CLASSES = ("dim", "mid", "bright")
SPEC = PreprocessSpec(input_size=(32, 32), resize="stretch", mean=(127.5,) * 3, std=(127.5,) * 3)
DEAD = 15  # the conv2 channel that is always 0


def graded_image(t: float, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Pixels stay <= 235: only the white patch of ``with_patch`` reaches 255."""
    img = rng.integers(40, 90, size=(size, size, 3), dtype=np.uint8)
    v = int(90 + 130 * t)
    c = size // 2 + int(rng.integers(-3, 4))
    cv2.circle(img, (c, c), size // 4, (v, v, v), -1)
    noise = rng.normal(0, 5, img.shape)
    return np.clip(img + noise, 0, 235).astype(np.uint8)


def with_patch(img: np.ndarray) -> np.ndarray:
    """A 3x3 white glare exactly under one window of conv1 (stride 2, padding 1: output (2, 2))."""
    out = img.copy()
    out[3:6, 3:6] = 255
    return out


def write_graded(root: Path, n_per_class: int = 120, seed: int = 0) -> Path:
    """Class sub-folders of graded images (t drawn inside each class's third)."""
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            t = (ci + rng.uniform(0.02, 0.98)) / len(CLASSES)
            cv2.imwrite(str(d / f"{name}_{i:03d}.png"), graded_image(t, rng))
    return root


def _net():
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, len(CLASSES)))


def train(images: Path, epochs: int = 40, seed: int = 0):
    """The model trained on every image of ``images`` (a few seconds on 2 cores)."""
    import torch

    files = [(p, ci) for ci, name in enumerate(CLASSES) for p in sorted((images / name).iterdir())]
    x = torch.from_numpy(np.stack([preprocess(cv2.imread(str(p)), SPEC) for p, _ in files]))
    y = torch.tensor([ci for _, ci in files])
    torch.manual_seed(seed)
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 32):
                idx = perm[i:i + 32]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():  # a dead channel: always 0 after its ReLU, whatever the image
        model[2].weight[DEAD] = 0.0
        model[2].bias[DEAD] = -1.0
        model[6].weight[:, DEAD] = 0.0
    return model


def head_outlier(model, value: float = 2000.0):
    """Same float function; the head's per-channel int8 weights lose every real weight."""
    import copy

    import torch

    m = copy.deepcopy(model)
    with torch.no_grad():
        m[6].weight[:, DEAD] = value
    return m


def spike(model, gain: float = 2000.0):
    """Same float function on images without a white patch (a 9th conv1 channel that nothing reads
    and that a window below pure white leaves at 0); a huge conv1 activation on those with one."""
    import copy

    import torch

    m = copy.deepcopy(model)
    conv1, conv2 = m[0], m[2]
    new1 = torch.nn.Conv2d(3, 9, 3, 2, 1)
    new2 = torch.nn.Conv2d(9, conv2.out_channels, 3, 2, 1)
    with torch.no_grad():
        new1.weight.zero_()
        new1.bias.zero_()
        new1.weight[:8] = conv1.weight
        new1.bias[:8] = conv1.bias
        new1.weight[8] = gain  # sums the 3x3x3 window (inputs in [-1, 1]): 27 on pure white
        new1.bias[8] = -gain * 26.5  # <= 235 everywhere else: a window sums to at most 23.8 -> ReLU 0
        new2.weight.zero_()
        new2.weight[:, :8] = conv2.weight
        new2.bias.copy_(conv2.bias)
    m[0], m[2] = new1, new2
    return m


def export(model, path: Path) -> Path:
    from edgetl.export import export_onnx

    return export_onnx(model, SPEC, path)


def labels_file(path: Path) -> Path:
    path.write_text("\n".join(CLASSES) + "\n")
    return path


def patch_calibration_images(images: Path, dest: Path, n_patched: int = 2, n: int = 120, seed: int = 1) -> Path:
    """A calibration folder: ``n`` fresh graded images, ``n_patched`` of them with the white patch."""
    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = graded_image(float(rng.uniform()), rng)
        cv2.imwrite(str(dest / f"cal_{i:03d}.png"), with_patch(img) if i < n_patched else img)
    return dest


def dump(path: Path, **info) -> None:
    path.write_text(json.dumps(info))
