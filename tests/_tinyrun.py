"""A tiny trained run folder for the quantization/gate tests (tiny_cnn, 32x32, generated images).

Uses ``edgetl.train``'s Python API when it exists (``train_run``); otherwise trains a few epochs
of plain torch on the generated folder, preprocessed with the shared ``preprocess``, and writes the
run folder contract of ``edgetl/runs.py`` (manifest kind "run", model.safetensors, split.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgetl.backbones import build_classifier, get_backbone
from edgetl.fsutil import atomic_output_dir
from edgetl.runs import SPLIT_FILE, save_weights
from edgetl.runtime.imageio import read_image
from edgetl.runtime.manifest import Manifest, hash_files, write_manifest
from edgetl.runtime.preprocess import preprocess

CLASSES = ("disc", "stripes", "square")


def make_tiny_run(tmp: Path, n_per_class: int = 24, classes=CLASSES, epochs: int = 15, seed: int = 0) -> Path:
    """Write generated images under ``tmp/images`` and a trained tiny run at ``tmp/run``."""
    from conftest import write_image_folder

    images = write_image_folder(tmp / "images", n_per_class=n_per_class, classes=classes, seed=seed)
    try:
        from edgetl.train import train_run
    except ImportError:
        return _plain_torch_run(tmp, images, classes, epochs, seed)
    train_run(images, tmp / "run", backbone="tiny_cnn", pretrained="none", epochs=epochs, lr=1e-2, augment=False,
              num_workers=0, quiet=True, device="cpu", amp=False, channels_last=False, patience=0,
              label_smoothing=0.0, warmup_epochs=0, split_seed=seed, seed=seed)
    return tmp / "run"


def _plain_torch_run(tmp: Path, images: Path, classes, epochs: int, seed: int) -> Path:
    import torch

    rng = np.random.default_rng(seed)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for name in classes:
        files = sorted((images / name).iterdir())
        order = rng.permutation(len(files))
        n_test = n_val = max(2, len(files) // 6)
        for rank, idx in enumerate(order):
            part = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            splits[part].append({"path": str(files[idx].relative_to(images)), "label": name})

    spec = get_backbone("tiny_cnn").preprocess
    torch.manual_seed(seed)
    model, built = build_classifier("tiny_cnn", len(classes), pretrained="none", dropout=0.0)
    x = torch.from_numpy(np.stack([preprocess(read_image(images / s["path"]), spec) for s in splits["train"]]))
    y = torch.tensor([classes.index(s["label"]) for s in splits["train"]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 16):
            idx = perm[i:i + 16]  # shuffled: single-class batches would wreck BatchNorm
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    model.eval()

    out = tmp / "run"
    with atomic_output_dir(out) as d:
        save_weights(model, d)
        (d / SPLIT_FILE).write_text(json.dumps({"root": str(images), "seed": seed, "splits": splits}))
        manifest = Manifest(kind="run", labels=classes, preprocess=spec,
                            backbone={"name": "tiny_cnn", "pretrained": "none", "dropout": 0.0,
                                      "weights": built.weights},
                            training={"split_seed": seed, "epochs": epochs},
                            files=hash_files(d))
        write_manifest(manifest, d)
    return out


def session_tiny_run(tmp_path_factory) -> Path:
    """One tiny run per test session (shared by the test modules that need it)."""
    root = tmp_path_factory.getbasetemp() / "tinyrun"
    if not (root / "run" / "manifest.json").is_file():
        root.mkdir(exist_ok=True)
        make_tiny_run(root)
    return root / "run"


# ---- `edgetl compile` of a model trained elsewhere (tests/test_compile.py, tests/test_compile_external.py) ----

TINY = ["--calib-min", "8", "--no-speed-check"]  # toy model: few images, Q/DQ overhead dominates its speed
PRE = ["--input-size", "32", "--resize", "stretch", "--mean", "127.5,127.5,127.5", "--std", "127.5,127.5,127.5"]
PRE_SPEC = get_backbone("tiny_cnn").preprocess  # what PRE says, as a PreprocessSpec


def write_labels(path: Path, labels) -> Path:
    path.write_text("\n".join(labels) + "\n")
    return path


def onnx_and_images(tiny_run: Path, tmp: Path) -> tuple[Path, Path, Path]:
    """An FP32 ONNX classifier (exported from the tiny run) + its labels file + labelled image folder."""
    from edgetl.export import export_onnx
    from edgetl.runs import load_run

    run = load_run(tiny_run)
    model = export_onnx(run.model, run.manifest.preprocess, tmp / "model.onnx")
    return model, write_labels(tmp / "labels.txt", run.manifest.labels), tiny_run.parent / "images"


def flat_images(images: Path, dest: Path) -> Path:
    """The images of a class-folder tree copied into one folder (no labels)."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(images.rglob("*.png")):
        shutil.copy(p, dest / f"{p.parent.name}_{p.name}")
    return dest


def train_library_model(arch: str, images: Path, classes=CLASSES, epochs: int = 12, seed: int = 0):
    """A plain torchvision/timm classifier (``arch`` = ``torchvision:NAME``/``timm:NAME``, random init)
    trained a few epochs on every image of ``images`` (32x32, PRE's preprocessing): a model "trained
    elsewhere", as its user would have it."""
    import torch

    from edgetl.backbones import build_external

    torch.manual_seed(seed)
    model = build_external(arch, len(classes))
    files = [(p, ci) for ci, name in enumerate(classes) for p in sorted((images / name).iterdir())]
    x = torch.from_numpy(np.stack([preprocess(read_image(p), PRE_SPEC) for p, _ in files]))
    y = torch.tensor([ci for _, ci in files])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a toy model: threads only add contention (100x slower on a busy 2-core host)
    try:
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 16):
                idx = perm[i:i + 16]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()
