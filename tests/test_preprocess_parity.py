"""Parity: the training-eval path (ImageDataset without augmentation, and the DataLoader batches the
training loop evaluates on) gives byte-identical tensors to the runtime path (read_image + preprocess)."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from conftest import make_class_image
from edgetl.backbones import get_backbone
from edgetl.data import ImageDataset
from edgetl.runtime.imageio import read_image
from edgetl.runtime.preprocess import preprocess


@pytest.fixture
def odd_images(tmp_path):
    rng = np.random.default_rng(7)
    paths = []
    for i, (suffix, kind) in enumerate([(".png", "bgr"), (".jpg", "bgr"), (".png", "gray"), (".png", "16bit"),
                                        (".png", "bgra"), (".bmp", "bgr")]):
        img = make_class_image(i % 3, rng, size=int(rng.integers(37, 90)))
        img = img[:, : img.shape[1] - i * 3]  # non-square, different aspect ratios
        if kind == "gray":
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        elif kind == "16bit":
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
        elif kind == "bgra":
            img = np.dstack([img, np.full(img.shape[:2], 200, np.uint8)])
        p = tmp_path / f"im{i}{suffix}"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


SPECS = {
    "lite0": get_backbone("efficientnet_lite0").preprocess,
    "lite0-64-stretch": dataclasses.replace(get_backbone("efficientnet_lite0").preprocess, input_size=(64, 64),
                                            resize="stretch"),
    "tiny-letterbox-bgr-nhwc": dataclasses.replace(get_backbone("tiny_cnn").preprocess, resize="letterbox",
                                                   color="BGR", layout="NHWC"),
    "imagenet-uint8": dataclasses.replace(get_backbone("resnet18").preprocess, dtype="uint8"),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_dataset_matches_runtime_path_byte_for_byte(odd_images, name):
    spec = SPECS[name]
    ds = ImageDataset([(p, 0) for p in odd_images], spec, augment=None)
    for i, p in enumerate(odd_images):
        runtime = preprocess(read_image(p), spec)
        train_eval, _ = ds[i]
        assert train_eval.dtype == runtime.dtype and train_eval.shape == runtime.shape
        assert train_eval.tobytes() == runtime.tobytes(), p.name


def test_eval_loader_batches_match_runtime_path(odd_images):
    torch = pytest.importorskip("torch")
    from edgetl.train import make_loader

    spec = SPECS["lite0-64-stretch"]
    ds = ImageDataset([(p, 0) for p in odd_images], spec)
    batches = [x for x, _ in make_loader(ds, batch_size=4, workers=0, device=torch.device("cpu"))]
    got = torch.cat(batches).numpy()
    want = np.stack([preprocess(read_image(p), spec) for p in odd_images])
    assert got.tobytes() == want.tobytes()
