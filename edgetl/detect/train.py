"""Fine-tuning a detector: ``train_detector`` / ``load_detection_run`` / ``evaluate_run``.

The loop is the classifier's (``edgetl/train.py``) where it fits: AdamW (or SGD) with the backbone's
LR = head LR x ``backbone_lr_mult``, linear warm-up then cosine decay per step (its ``_lr_lambda``),
the same three transfer modes, the best epoch kept by the validation metric (here COCO mAP@0.5 through
``edgetl.detect.metrics.coco_map``, decoded by the device's own ``runtime.detect.postprocess`` at score
0.01), early stopping, fixed seeds, and the run folder written as one transaction
(``edgetl.artifact.new_folder`` under the folder's lock, sealed by ``runtime.manifest.seal``).

Transfer modes (``mode``), over ``model.layer_groups`` = backbone stages, extras, head:
* ``feature-extract``: the backbone is frozen (eval mode, BatchNorm statistics fixed); the extras and
  the head train (both are new layers; SSD cannot work on frozen random extras).
* ``fine-tune``: everything trains, the backbone at ``lr x backbone_lr_mult``.
* ``gradual`` (alias ``gradual-unfreeze``): extras + head first, then one more backbone stage from the
  top every ``unfreeze_every`` epochs.

Data: ``edgetl.detect.data`` (``read_detection`` + ``tile_dataset`` when ``tile`` + ``split_detection``,
which keeps every group, i.e. tiles of one region, in one split). Augmentation (train only) acts on the
decoded uint8 image and its boxes BEFORE the shared ``runtime.preprocess.preprocess`` (the one
implementation the device runs): zoom-out, random crop keeping boxes whose centre stays inside (clipped),
horizontal flip, brightness/contrast. Preprocessing: the backbone's mean/std/colour, resize
``stretch`` to ``input_size``; boxes are scaled into model-input pixels, where the loss, the metrics and
the gate all work (``detect/__init__.py``).

torch is imported inside the functions: importing this module (the config) is cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..runtime.errors import EdgetlError, IntegrityError
from ..runtime.preprocess import PreprocessSpec, preprocess
from .anchors import parse_scales

MODES = ("feature-extract", "fine-tune", "gradual")
MODE_ALIASES = {"gradual-unfreeze": "gradual"}
OPTIMIZERS = ("adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda")
ANCHORS_FILE = "anchors.npy"
WEIGHTS_FILE = "model.safetensors"
SPLIT_FILE = "split.json"
METRICS_FILE = "metrics.json"
DATA_REPORT_FILE = "data_report.json"
CONFIG_FILE = "config.toml"
CURVES_PNG = "curves.png"
EVAL_SCORE_THRESHOLD = 0.01  # COCO's: mAP ranks the detector's whole output
CANDIDATES_PER_CLASS = 200
EVAL_BATCH = 16


@dataclass(frozen=True)
class DetTrainConfig:
    """Everything that decides a detection run (saved in the manifest and as config.toml)."""

    backbone: str = "efficientnet_lite0"
    pretrained: str = "imagenet"  # "none": random init (tiny_cnn has no weights)
    weights: str | None = None  # ImageNet weights file, or a COCO ssdlite320_mobilenet_v3_large state dict
    input_size: int = 320  # square model input (pixels); anchors are computed for it
    anchor_scales: str = "default"  # torchvision's 0.2,0.95 of the input side, or "LO,HI" (edgetl.detect.anchors)
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3  # extras + head; the backbone gets lr * backbone_lr_mult
    # the backbone at the head's LR: on the conveyor cells (8 epochs) test mAP@0.5 57.7 -> 62.8 against 0.1, on
    # the tree crowns (20 epochs) 27.0 -> 48.3 (docs/results.md); the features must move for boxes, not only labels
    backbone_lr_mult: float = 1.0
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, nesterov)
    mode: str = "fine-tune"  # feature-extract | fine-tune | gradual
    unfreeze_every: int = 2  # gradual: epochs between unfreezing one more backbone stage
    weight_decay: float = 1e-4  # not on biases or normalisation parameters
    warmup_epochs: float = 1.0
    augment: bool = True
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0  # the split's and the training's
    tile: int | None = None  # tile size in source pixels (large images: drones, microscopy); None = whole images
    tile_overlap: float = 0.2
    num_workers: int | None = None  # None: min(2, CPUs - 2), as the classifier
    patience: int = 10  # epochs without a better val mAP@0.5 before stopping; 0 = never
    score_threshold: float = 0.3  # the deployed post-processing's (manifest.postprocess)
    nms_iou: float = 0.5
    max_detections: int = 100
    device: str = "auto"
    data_format: str = "auto"  # auto | coco | yolo | voc

    @property
    def workers(self) -> int:
        return self.num_workers if self.num_workers is not None else min(2, max(0, (os.cpu_count() or 1) - 2))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_det_config(cfg: DetTrainConfig) -> DetTrainConfig:
    """Check values (one-line errors naming the key); the mode alias resolved."""
    from ..backbones import PRETRAINED_CHOICES
    from .model import DETECTOR_BACKBONES

    cfg = dataclasses.replace(cfg, mode=MODE_ALIASES.get(cfg.mode, cfg.mode))
    for key, allowed in (("mode", MODES), ("optimizer", OPTIMIZERS), ("device", DEVICES),
                         ("pretrained", PRETRAINED_CHOICES), ("backbone", DETECTOR_BACKBONES)):
        if getattr(cfg, key) not in allowed:
            raise EdgetlError(f"{key} = {getattr(cfg, key)!r} is not valid", hint=f"use one of: {', '.join(allowed)}")
    for key, lo in (("epochs", 1), ("batch_size", 2), ("unfreeze_every", 1), ("patience", 0), ("input_size", 32),
                    ("max_detections", 1)):
        if getattr(cfg, key) < lo:
            raise EdgetlError(f"{key} = {getattr(cfg, key)} must be at least {lo}",
                              hint="batch_size: BatchNorm on the 1x1 extra map needs 2 images" if key == "batch_size" else "")
    for key in ("lr", "backbone_lr_mult", "weight_decay", "warmup_epochs"):
        if getattr(cfg, key) < 0:
            raise EdgetlError(f"{key} = {getattr(cfg, key)} must not be negative")
    for key in ("score_threshold", "tile_overlap"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise EdgetlError(f"{key} = {getattr(cfg, key)} must be in [0, 1)")
    if not 0.0 < cfg.nms_iou <= 1.0:
        raise EdgetlError(f"nms_iou = {cfg.nms_iou} must be in (0, 1]")
    if cfg.tile is not None and cfg.tile < 32:
        raise EdgetlError(f"tile = {cfg.tile} must be at least 32 pixels (or unset)")
    if cfg.weights and not Path(cfg.weights).is_file():
        raise EdgetlError(f"--weights {cfg.weights}: no such file")
    parse_scales(cfg.anchor_scales)
    return cfg


# ------------------------------------------------------------------------------------------
# augmentation on the decoded uint8 image and its boxes (in front of the shared preprocess)
# ------------------------------------------------------------------------------------------

def hflip(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right: x1' = W - x2, x2' = W - x1 (continuous coordinates)."""
    w = img.shape[1]
    out = boxes.copy()
    out[:, 0], out[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return np.ascontiguousarray(img[:, ::-1]), out


def zoom_out(img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, max_ratio: float = 2.0,
             fill: Sequence[float] = (127, 127, 127)) -> tuple[np.ndarray, np.ndarray]:
    """SSD's "expand": the image at a random place on a canvas up to ``max_ratio`` times larger
    (filled with ``fill``, BGR), so objects get smaller: the small-object scales train too."""
    h, w = img.shape[:2]
    r = rng.uniform(1.0, max_ratio)
    ch, cw = int(h * r), int(w * r)
    y0, x0 = int(rng.integers(0, ch - h + 1)), int(rng.integers(0, cw - w + 1))
    canvas = np.empty((ch, cw, 3), np.uint8)
    canvas[:] = np.asarray(fill, np.uint8)
    canvas[y0:y0 + h, x0:x0 + w] = img
    return canvas, boxes + np.array([x0, y0, x0, y0], np.float32)


def random_crop(img: np.ndarray, boxes: np.ndarray, classes: np.ndarray, rng: np.random.Generator,
                min_scale: float = 0.3, tries: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random crop (area ``min_scale``..1, aspect 1/2..2) keeping the boxes whose centre is inside
    it, clipped to it (SSD's rule); a crop that would lose every box of an image that has boxes is
    drawn again, and after ``tries`` the image is returned whole."""
    h, w = img.shape[:2]
    for _ in range(tries):
        area = rng.uniform(min_scale, 1.0) * h * w
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if not (8 <= cw <= w and 8 <= ch <= h):
            continue
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        keep = (centre[:, 0] > x0) & (centre[:, 0] < x0 + cw) & (centre[:, 1] > y0) & (centre[:, 1] < y0 + ch)
        if len(boxes) and not keep.any():
            continue
        b = boxes[keep] - np.array([x0, y0, x0, y0], np.float32)
        b[:, 0::2] = b[:, 0::2].clip(0, cw)
        b[:, 1::2] = b[:, 1::2].clip(0, ch)
        ok = (b[:, 2] - b[:, 0] >= 1) & (b[:, 3] - b[:, 1] >= 1)
        return np.ascontiguousarray(img[y0:y0 + ch, x0:x0 + cw]), b[ok], classes[keep][ok]
    return img, boxes, classes


def augment_detection(img: np.ndarray, boxes: np.ndarray, classes: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random augmentation of a BGR uint8 image and its boxes (xyxy, its pixels): zoom-out (p 0.3),
    crop (p 0.5), horizontal flip (p 0.5), brightness/contrast x[0.8, 1.2] (``edgetl.augment``'s LUT)."""
    from ..augment import brightness_contrast

    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    classes = np.asarray(classes, np.int64).reshape(-1)
    if rng.random() < 0.3:
        img, boxes = zoom_out(img, boxes, rng, fill=tuple(int(v) for v in img.reshape(-1, 3).mean(0)))
    if rng.random() < 0.5:
        img, boxes, classes = random_crop(img, boxes, classes, rng)
    if rng.random() < 0.5:
        img, boxes = hflip(img, boxes)
    img = brightness_contrast(img, rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2))
    return img, boxes.astype(np.float32), classes


def to_input_boxes(boxes: np.ndarray, image_hw: Sequence[int], spec: PreprocessSpec) -> np.ndarray:
    """Boxes in an image's pixels -> the model input's (resize ``stretch``: a scale per axis)."""
    if spec.resize != "stretch":
        raise EdgetlError(f"detection training resizes with 'stretch', not {spec.resize!r}")
    b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    b[:, 0::2] *= spec.input_size[1] / image_hw[1]
    b[:, 1::2] *= spec.input_size[0] / image_hw[0]
    return b


class DetSamples:
    """Map-style dataset: ``[i] -> (input (3, H, W) float32, boxes (n, 4) in input pixels, classes (n,))``.

    Randomness per sample from ``(seed, epoch, i)``: reproducible whatever the number of workers."""

    def __init__(self, images: Sequence[Any], spec: PreprocessSpec, augment: bool = False, seed: int = 0):
        self.images, self.spec, self.augment, self.seed, self.epoch = list(images), spec, augment, seed, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from .data import load_pixels

        im = self.images[i]
        pixels, boxes, classes = load_pixels(im), np.asarray(im.boxes, np.float32), np.asarray(im.classes, np.int64)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            pixels, boxes, classes = augment_detection(pixels, boxes, classes, rng)
        return preprocess(pixels, self.spec), to_input_boxes(boxes, pixels.shape[:2], self.spec), classes


def collate(batch: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Stack the inputs; the boxes stay one (boxes, classes) tensor pair per image."""
    import torch

    x = torch.from_numpy(np.stack([b[0] for b in batch]))
    return x, [(torch.from_numpy(b[1]), torch.from_numpy(b[2])) for b in batch]


def make_loader(ds: DetSamples, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0):
    """A DataLoader as the classifier makes one (fork server workers, see ``edgetl.train.make_loader``);
    a last batch of ONE image is dropped when training (BatchNorm on the 1x1 map needs two)."""
    import sys

    import torch
    from torch.utils.data import DataLoader

    extra = ({"multiprocessing_context": "forkserver", "persistent_workers": False}
             if workers > 0 and sys.platform.startswith("linux") else {})
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed),
                      num_workers=workers, collate_fn=collate, drop_last=shuffle and len(ds) % batch_size == 1,
                      **extra)


# ------------------------------------------------------------------------------------------
# transfer modes, optimiser
# ------------------------------------------------------------------------------------------

def trainable_groups(cfg: DetTrainConfig, epoch: int, n_groups: int) -> int:
    """How many layer groups, counted from the top (head, extras, last stage...), train in ``epoch``."""
    if cfg.mode == "feature-extract":
        return 2
    if cfg.mode == "fine-tune":
        return n_groups
    return min(n_groups, 2 + epoch // cfg.unfreeze_every)


def set_transfer(model, n_top: int) -> None:
    """The top ``n_top`` layer groups train; the rest is frozen (no grad) and in eval mode, so its
    BatchNorm statistics do not move."""
    groups = model.layer_groups
    model.train()
    if n_top < len(groups):
        model.backbone.eval()  # its containers too; the unfrozen stages are switched back below
    for i, group in enumerate(groups):
        on = i >= len(groups) - n_top
        for m in group:
            m.train(on)
            for p in m.parameters():
                p.requires_grad_(on)


def make_optimizer(model, cfg: DetTrainConfig):
    """AdamW (or SGD): extras + head at ``lr``, backbone at ``lr * backbone_lr_mult``; no weight decay
    on biases and normalisation parameters. Frozen parameters get no gradient, so no update."""
    import torch

    parts = [("head", [*model.extras.named_parameters(), *model.head.named_parameters()], cfg.lr),
             ("backbone", list(model.backbone.named_parameters()), cfg.lr * cfg.backbone_lr_mult)]
    groups = []
    for name, params, lr in parts:
        groups.append({"name": name, "params": [p for _, p in params if p.ndim > 1], "lr": lr,
                       "weight_decay": cfg.weight_decay})
        groups.append({"name": f"{name}_no_decay", "params": [p for _, p in params if p.ndim <= 1], "lr": lr,
                       "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups)


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------

def postprocess_spec(model, cfg: DetTrainConfig | None = None, manifest_section: Mapping[str, Any] | None = None):
    """The device's post-processing spec for ``model``'s anchors: from the config when training, from
    ``manifest.postprocess`` when loading a run."""
    from ..runtime.detect import PostprocessSpec
    from .model import BOX_CODER_WEIGHTS

    anchors = model.anchors.detach().cpu().numpy().astype(np.float32)
    if manifest_section is not None:
        return PostprocessSpec.from_manifest(manifest_section, anchors, image_size=model.input_size)
    return PostprocessSpec(anchors, BOX_CODER_WEIGHTS, cfg.score_threshold, cfg.nms_iou, cfg.max_detections,
                           CANDIDATES_PER_CLASS, image_size=model.input_size)


def evaluate_images(model, images: Sequence[Any], spec: PreprocessSpec, post, class_names: Sequence[str],
                    device=None, workers: int = 0) -> dict[str, Any]:
    """COCO mAP of ``model`` (float PyTorch, eval mode) on ``images``: raw outputs decoded by the
    device's ``runtime.detect.postprocess`` at score 0.01, boxes in model-input pixels; plus the
    SSD loss on them (``loss``). Returns ``coco_map``'s dict (map50, map, per_class, ...)."""
    import torch

    from ..runtime.detect import postprocess, postprocess_objects
    from .metrics import coco_map
    from .model import detection_loss

    device = device or torch.device("cpu")
    model.eval()
    gts, dets, objects, loss, n = [], [], [], 0.0, 0
    with torch.inference_mode():
        workers = workers if len(images) > 2 * EVAL_BATCH else 0  # starting workers costs more than a few images
        for x, targets in make_loader(DetSamples(images, spec), EVAL_BATCH, workers):
            boxes, scores = model(x.to(device))
            tg = [(b.to(device), c.to(device)) for b, c in targets]
            parts = detection_loss(boxes, scores, model.anchors, tg)
            loss += float(sum(parts.values())) * len(x)
            n += len(x)
            for b, s, (gb, gc) in zip(boxes.cpu().numpy(), scores.cpu().numpy(), targets):
                d = postprocess(b, s, post, score_threshold=EVAL_SCORE_THRESHOLD)
                dets.append((d.boxes, d.scores, d.classes))
                if len(class_names) > 1:
                    o = postprocess_objects(b, s, post, score_threshold=EVAL_SCORE_THRESHOLD)
                    objects.append((o.boxes, o.scores, o.classes))
                gts.append((gb.numpy(), gc.numpy()))
    result = coco_map(gts, dets, len(class_names), list(class_names))
    result["loss"] = loss / max(1, n)
    if len(class_names) > 1:
        result["class_agnostic"] = class_agnostic(gts, objects, post.object_threshold, class_names, class_boxes=dets,
                                                  floor=post.score_threshold)
    return result


def _one_class(gts: Sequence[tuple], dets: Sequence[tuple]) -> dict[str, Any]:
    """COCO mAP with every class merged into one."""
    from .metrics import coco_map

    one = lambda c: np.zeros(len(c), np.int64)  # noqa: E731
    return coco_map([(b, one(c)) for b, c in gts], [(b, s, one(c)) for b, s, c in dets], 1, ["object"])


OBJECT_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 .. 0.95


def object_f1(gts: Sequence[tuple], objects: Sequence[tuple], thresholds: Sequence[float] = OBJECT_THRESHOLDS,
              iou: float = 0.5) -> dict[float, float]:
    """F1 of the objects at or above each score threshold against the ground truth, every class
    merged (one to one, IoU >= ``iou``, ``metrics.match_pairs``)."""
    from .metrics import match_pairs

    tp = np.zeros(len(thresholds))
    n_det = np.zeros(len(thresholds))
    n_gt = 0
    for (gb, _), (db, ds, _) in zip(gts, objects):
        n_gt += len(gb)
        for k, t in enumerate(thresholds):
            keep = ds >= t
            n_det[k] += int(keep.sum())
            if len(gb) and keep.any():
                tp[k] += len(match_pairs(db[keep], np.zeros(int(keep.sum())), gb, np.zeros(len(gb)), iou)[0])
    return {float(t): (2 * tp[k] / (n_det[k] + n_gt) if n_det[k] + n_gt else 1.0) for k, t in enumerate(thresholds)}


def choose_object_threshold(f1: Mapping[float, float], floor: float = 0.0) -> float:
    """The threshold of the best F1 at or above ``floor`` (the higher threshold on a tie: fewer boxes
    for the same F1). The training's floor is the boxes' deployed score threshold: the F1 of still
    images barely counts the few low-score fragments beside the objects, but on video each fragment
    that lasts two frames starts a track and crosses a counting line (a 20-epoch conveyor model chose
    0.05 on val, F1 0.977: 63 extra counts on the conveyor video; at 0.3, 3)."""
    above = [t for t in f1 if t >= floor - 1e-9]
    return max(above, key=lambda t: (round(f1[t], 12), t)) if above else float(floor)


def class_agnostic(gts: Sequence[tuple], objects: Sequence[tuple], threshold: float | None,
                   class_names: Sequence[str], class_boxes: Sequence[tuple] | None = None,
                   floor: float = 0.0) -> dict[str, Any]:
    """Finding objects apart from naming them, on ``objects`` (``runtime.detect.postprocess_objects``:
    scored by P(object) = 1 - P(background), labelled by the likeliest class, what tracking and
    counting use): their mAP as one class; their F1 against the ground truth at each score threshold
    and the best one (``object_threshold``: the training stores the validation split's in the run);
    and at ``threshold`` (None: that best one, chosen on these images) how many ground-truth boxes an
    object found (IoU >= 0.5) and how often the class of the best-scoring one over a found object is
    right (the detector as a classifier of what it found). ``class_boxes`` (the per-class boxes of
    ``postprocess``, each class scored apart) adds ``map50_class_boxes``: the mAP of those boxes with
    their classes merged, the figure this metric was before (a cell whose class is uncertain gives two
    half-confident boxes there, so it is lower)."""
    from .metrics import box_iou

    merged = _one_class(gts, objects)
    f1 = object_f1(gts, objects)
    best = choose_object_threshold(f1, floor)  # ``floor``: see choose_object_threshold
    score_threshold = best if threshold is None else float(threshold)
    f1_at = f1.get(score_threshold)  # the sweep has it unless the threshold is off its 0.05 grid
    if f1_at is None:
        f1_at = object_f1(gts, objects, (score_threshold,))[score_threshold]
    extra = {"map50_class_boxes": _one_class(gts, class_boxes)["map50"]} if class_boxes is not None else {}
    k = len(class_names)
    confusion = np.zeros((k, k), np.int64)  # rows: true class, columns: the found box's class
    n_gt = found = 0
    for (gb, gc), (db, ds, dc) in zip(gts, objects):
        keep = ds >= score_threshold
        db, dc = db[keep], dc[keep]
        n_gt += len(gc)
        if not len(gc) or not len(db):
            continue
        ov = box_iou(gb, db) >= 0.5  # a box over the object; the best-scoring one names it
        top = np.where(ov, ds[keep][None, :], -1.0).argmax(axis=1)
        for i in np.flatnonzero(ov.any(axis=1)):
            confusion[int(gc[i]), int(dc[top[i]])] += 1
            found += 1
    correct = int(np.trace(confusion))
    return {"map50": merged["map50"], "map": merged["map"], "score_threshold": score_threshold,
            "threshold_chosen_here": threshold is None, "object_threshold": best, "f1_by_threshold": f1,
            "f1": f1_at, "n_gt": n_gt,
            "found": found, "found_fraction": found / n_gt if n_gt else None, "class_correct": correct,
            "class_accuracy": correct / found if found else None, "confusion": confusion.tolist(),
            "classes": list(class_names), **extra}


def _finite(v: Any) -> float | None:
    """JSON has no NaN (the manifest's digest refuses it): an undefined mAP is null."""
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _summary(m: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if m is None:
        return None
    per = [{k: (_finite(v) if isinstance(v, float) else v) for k, v in c.items()} for c in m.get("per_class", [])]
    ca = m.get("class_agnostic")
    objects = None if not ca else {k: ca[k] for k in ("map50", "map", "map50_class_boxes", "score_threshold", "f1",
                                                        "found", "n_gt", "class_accuracy") if k in ca}
    return {"map50": _finite(m["map50"]), "map": _finite(m["map"]), "n_images": m.get("n_images"),
            "n_gt": m.get("n_gt"), "n_det": m.get("n_det"), "per_class": per,
            **({"objects": objects} if objects else {})}


def _objects_map(m: Mapping[str, Any]) -> dict[str, Any]:
    """The objects' mAP@0.5 (every class as one) of a split's summary, for the manifest."""
    return {"objects_map50": _finite(m["objects"]["map50"])} if m.get("objects") else {}


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------

def _given_splits(data: Path, cfg: DetTrainConfig):
    """A folder holding ``train.json`` and ``val.json`` (and ``test.json``) COCO files, as ``edgetl data
    scenes`` writes: those splits are used as given (like classification's DATA/train, DATA/val, DATA/test);
    None for any other layout. A missing test split is drawn from train."""
    from .data import read_detection, split_detection, tile_dataset

    if not (data.is_dir() and (data / "train.json").is_file() and (data / "val.json").is_file()):
        return None
    parts = {}
    for name in ("train", "val", "test"):
        if (data / f"{name}.json").is_file():
            ds = read_detection(data / f"{name}.json", "coco")
            parts[name] = tile_dataset(ds, cfg.tile, cfg.tile_overlap) if cfg.tile else ds
    names = parts["train"].class_names
    for name, ds in parts.items():
        if ds.class_names != names:
            raise EdgetlError(f"{data / (name + '.json')}: classes {list(ds.class_names)} differ from train.json's "
                              f"{list(names)}", hint="write every split with the same categories")
    splits = {name: list(ds.images) for name, ds in parts.items()}
    if "test" not in splits:
        drawn = split_detection(parts["train"], {"val": 0.0, "test": cfg.test_fraction}, cfg.seed)
        splits["train"], splits["test"] = drawn["train"], drawn["test"]
    return parts["train"], splits


def _prepare_data(data: str | Path, cfg: DetTrainConfig, progress: Callable[[str], None]):
    """read_detection (+ tile_dataset) + split_detection; the data fingerprint."""
    from .data import read_detection, split_detection, split_summary, split_to_json, tile_dataset

    given = _given_splits(Path(data), cfg)
    if given is not None:
        ds, splits = given
    else:
        ds = read_detection(data, cfg.data_format)
        if cfg.tile:
            ds = tile_dataset(ds, cfg.tile, cfg.tile_overlap)
        splits = split_detection(ds, {"val": cfg.val_fraction, "test": cfg.test_fraction}, cfg.seed)
    if not splits["val"]:
        raise EdgetlError(f"{data}: the validation split is empty (the best epoch is chosen on it)",
                          hint="use val_fraction > 0 with enough images (or tiles)")
    split_json = split_to_json(splits, ds.root, ds.class_names)
    body = json.dumps({"classes": split_json["classes"], "splits": split_json["splits"]}, sort_keys=True)
    fingerprint = hashlib.sha256(body.encode()).hexdigest()
    summary = split_summary(splits, ds.class_names)
    progress(f"data: {ds.report.get('data')} ({ds.format}): {len(ds.class_names)} classes, "
             + ", ".join(f"{s} {v['images']} images ({v['negatives']} without boxes)" for s, v in summary.items())
             + f"; fingerprint {fingerprint[:12]}")
    return ds, splits, split_json, fingerprint, summary


def _train_epoch(model, loader, opt, sched, device) -> dict[str, float]:
    """One pass over the training loader; the mean of each loss part per image."""
    from .model import detection_loss

    tot = {"loss": 0.0, "bbox_regression": 0.0, "classification": 0.0}
    seen = 0
    for x, targets in loader:
        boxes, scores = model(x.to(device))
        parts = detection_loss(boxes, scores, model.anchors, [(b.to(device), c.to(device)) for b, c in targets])
        loss = parts["bbox_regression"] + parts["classification"]
        if not math.isfinite(float(loss.detach())):
            raise EdgetlError(f"the training loss became {float(loss)}", hint="lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for k, v in (("loss", loss), *parts.items()):
            tot[k] += float(v.detach()) * len(x)
        seen += len(x)
    return {k: v / max(1, seen) for k, v in tot.items()}


def _fit(model, splits: dict, names: Sequence[str], cfg: DetTrainConfig, device, progress) -> dict[str, Any]:
    """The epoch loop: train, evaluate on val, keep the best state by val mAP@0.5, stop early."""
    import torch

    from ..train import _lr_lambda

    spec, post = model.spec, postprocess_spec(model, cfg)
    ds = DetSamples(splits["train"], spec, augment=cfg.augment, seed=cfg.seed)
    steps = math.ceil(len(ds) / cfg.batch_size)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(int(round(cfg.warmup_epochs * steps)), cfg.epochs * steps))
    n_groups = len(model.layer_groups)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, "map50": -2.0, "state": None}  # epoch 1 is always kept (an undefined mAP is -1)
    bad = 0
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        n_top = trainable_groups(cfg, epoch, n_groups)
        set_transfer(model, n_top)
        ds.epoch = epoch
        tr = _train_epoch(model, make_loader(ds, cfg.batch_size, cfg.workers, shuffle=True, seed=cfg.seed * 1_000_003 + epoch),
                          opt, sched, device)
        vm = evaluate_images(model, splits["val"], spec, post, names, device, cfg.workers)
        score = vm["map50"] if math.isfinite(vm["map50"]) else -1.0
        rec = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_bbox_loss": tr["bbox_regression"],
               "train_cls_loss": tr["classification"], "val_loss": vm["loss"], "val_map50": _finite(vm["map50"]),
               "val_map": _finite(vm["map"]), "lr": opt.param_groups[0]["lr"],
               "backbone_lr": next((g["lr"] for g in opt.param_groups if g["name"] == "backbone"), 0.0),
               "trainable_groups": n_top, "seconds": time.perf_counter() - t0}
        history.append(rec)
        improved = score > best["map50"] + 1e-9
        if improved:
            best = {"epoch": epoch + 1, "map50": score,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            bad = 0
        else:
            bad += 1
        progress(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {tr['loss']:.4f} (box {tr['bbox_regression']:.3f} cls "
                 f"{tr['classification']:.3f})  |  val loss {vm['loss']:.4f} mAP@0.5 {vm['map50']:.4f} mAP {vm['map']:.4f}"
                 f"  |  lr {rec['lr']:.2e} groups {n_top}/{n_groups}  {rec['seconds']:.1f}s" + ("  *best" if improved else ""))
        if cfg.patience and bad >= cfg.patience:
            progress(f"early stop: no val mAP@0.5 improvement for {cfg.patience} epochs (best epoch {best['epoch']})")
            break
    model.load_state_dict(best["state"])
    model.eval()
    return {"history": history, "best_epoch": best["epoch"]}


def train_detector(data: str | Path, out: str | Path, cfg: DetTrainConfig | None = None, overwrite: bool = False,
                   progress: Callable[[str], None] = print) -> Path:
    """Fine-tune a detector on ``data`` (COCO JSON / YOLO / VOC) and write the run folder ``out``.

    Holds ``out``'s lock for the whole run (a second command on it is refused at once); the folder
    appears only when complete and verified."""
    from ..artifact import check_output_dir
    from ..train import out_lock, sigchld_restored, single_threaded_cv2

    cfg = validate_det_config(cfg or DetTrainConfig())
    out = Path(out)
    check_output_dir(out, overwrite)  # before any work
    with out_lock(out), single_threaded_cv2(cfg.workers > 0), sigchld_restored():
        return _train_detector(Path(data), out, cfg, overwrite, progress)


def _train_detector(data: Path, out: Path, cfg: DetTrainConfig, overwrite: bool, progress) -> Path:
    import torch

    from ..train import resolve_device
    from .model import build_detector, count_parameters

    t_start = time.time()
    ds, splits, split_json, fingerprint, summary = _prepare_data(data, cfg, progress)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_detector(cfg.backbone, len(ds.class_names), cfg.input_size, cfg.pretrained, cfg.weights,
                           anchor_scales=parse_scales(cfg.anchor_scales))
    anchors = anchor_coverage(model, splits["train"], cfg.seed)
    progress(anchors.describe())
    model.to(device)
    progress(f"model: SSDLite on {cfg.backbone} ({model.weights.get('source')}), {count_parameters(model) / 1e6:.2f}M "
             f"params, {len(model.anchors)} anchors, input {cfg.input_size}x{cfg.input_size} stretch; mode {cfg.mode}; "
             f"device {device}")
    fit = _fit(model, splits, ds.class_names, cfg, device, progress)
    post, results = postprocess_spec(model, cfg), {}
    for s in ("val", "test"):  # val first: it chooses the objects' threshold the test split is then scored at
        if not splits[s]:
            continue
        m = results[s] = evaluate_images(model, splits[s], model.spec, post, ds.class_names, device, cfg.workers)
        progress(f"{s}: mAP@0.5 {m['map50']:.4f}  mAP {m['map']:.4f}  ({m['n_images']} images, {m['n_gt']} boxes)")
        ca = m.get("class_agnostic")
        if ca and post.object_threshold is None:
            post = dataclasses.replace(post, object_threshold=ca["object_threshold"])
            progress(f"objects (P(object), every class): mAP@0.5 {ca['map50']:.4f}; threshold "
                     f"{post.object_threshold:.2f} (the best F1 on {s}, {ca['f1']:.3f}) stored for tracking and counting")
    model.to("cpu")
    run = {"ds": ds, "split_json": split_json, "fingerprint": fingerprint, "summary": summary, "fit": fit,
           "results": results, "anchors": anchors.to_dict(), "device": str(device), "time_s": time.time() - t_start,
           "post": post}
    _write_run(out, model, cfg, run, overwrite)
    progress(f"wrote {out} (best epoch {fit['best_epoch']}; {time.time() - t_start:.0f}s)")
    return out


def anchor_coverage(model, train: Sequence[Any], seed: int = 0):
    """How ``model``'s anchors cover the training split's boxes in model-input pixels, beside
    torchvision's scales (``edgetl.detect.anchors.measure``)."""
    import torch

    from .anchors import DEFAULT_SCALES, generator, measure
    from .model import _anchors

    def default_anchors() -> np.ndarray:
        was = model.training
        with torch.no_grad():
            model.eval()
            maps = model.features(torch.zeros(1, 3, *model.input_size))
        model.train(was)
        return _anchors(generator(DEFAULT_SCALES), maps, model.input_size).numpy()

    boxes = [to_input_boxes(im.boxes, (im.height, im.width), model.spec) for im in train]
    boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)
    return measure(model.arch["anchor_scales"], boxes, model.anchors.cpu().numpy(), default_anchors, seed)


def _write_run(out: Path, model, cfg: DetTrainConfig, run: dict[str, Any], overwrite: bool) -> None:
    """The run folder, as one transaction: files, manifest sealed, then loaded back (the contract)."""
    import torch

    from ..artifact import new_folder
    from ..runs import save_weights
    from ..runtime.manifest import Manifest, seal
    from ..train import to_toml

    ds, fit, results = run["ds"], run["fit"], run["results"]
    metrics = {"class_names": list(ds.class_names), "selection_metric": "val_map50", "best_epoch": fit["best_epoch"],
               "epochs_run": len(fit["history"]), "history": fit["history"],
               "val": _summary(results.get("val")), "test": _summary(results.get("test"))}
    with new_folder(out, overwrite=overwrite, locked=True) as d:
        save_weights(model, d)
        np.save(d / ANCHORS_FILE, model.anchors.detach().cpu().numpy().astype(np.float32), allow_pickle=False)
        (d / SPLIT_FILE).write_text(json.dumps(run["split_json"], indent=1) + "\n")
        (d / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
        (d / DATA_REPORT_FILE).write_text(json.dumps({**ds.report, "splits": run["summary"]}, indent=1) + "\n")
        (d / CONFIG_FILE).write_text(to_toml({k: v for k, v in cfg.to_dict().items()},
                                             f"edgetl detection training: resolved config of {out.name}"))
        plot_det_curves(fit["history"], d / CURVES_PNG, fit["best_epoch"])
        post = run["post"].to_manifest(ANCHORS_FILE)
        manifest = Manifest(
            kind="run", task="detection", labels=ds.class_names, preprocess=model.spec, postprocess=post,
            backbone={"name": cfg.backbone, "detector": "ssdlite", "pretrained": cfg.pretrained,
                      "weights": model.weights, "reduced_tail": model.arch["reduced_tail"],
                      "num_anchors": int(len(model.anchors)), "anchor_scales": model.arch["anchor_scales"]},
            training={"config": cfg.to_dict(), "config_file": CONFIG_FILE, "mode": cfg.mode, "epochs": cfg.epochs,
                      "epochs_run": len(fit["history"]), "best_epoch": fit["best_epoch"], "selection_metric": "val_map50",
                      "metrics": {s: (None if m is None else {"map50": m["map50"], "map": m["map"],
                                                              **_objects_map(m)})
                                  for s, m in (("val", metrics["val"]), ("test", metrics["test"]))},
                      "data": ds.report.get("data"), "data_root": str(ds.root), "data_format": ds.format,
                      "data_fingerprint": run["fingerprint"],
                      "data_fingerprint_covers": "paths, sizes, windows, boxes and classes of every split (not pixel bytes)",
                      "split_seed": cfg.seed, "seed": cfg.seed, "splits": run["summary"],
                      "tile": None if not cfg.tile else {"size": cfg.tile, "overlap": cfg.tile_overlap},
                      "augment": cfg.augment, "anchors": run["anchors"], "device": run["device"],
                      "time_s": round(run["time_s"], 2),
                      "torch": torch.__version__, "coordinates": "model-input pixels (stretch to input_size)"})
        seal(d, manifest)
        load_detection_run(d)  # the contract every later stage relies on


def plot_det_curves(history: Sequence[Mapping[str, Any]], path: Path, best_epoch: int | None = None) -> Path:
    """Loss (train, val) and val mAP@0.5 / mAP per epoch, the best epoch marked (``edgetl.plots``'
    Agg figure; its classifier curves plot accuracy keys a detector does not have)."""
    from ..plots import _figure

    epochs = [int(r["epoch"]) for r in history]
    fig = _figure(10, 3.8)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for ax, keys, title in ((ax1, ("train_loss", "val_loss"), "loss (SSD: box + classification)"),
                            (ax2, ("val_map50", "val_map"), "validation mAP (selection: mAP@0.5)")):
        for key in keys:
            ax.plot(epochs, [np.nan if r.get(key) is None else r[key] for r in history], marker="o", ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch {best_epoch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_ylim(0.0, 1.02)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


# ------------------------------------------------------------------------------------------
# reading a run back
# ------------------------------------------------------------------------------------------

def load_detection_run(path: str | Path):
    """``(manifest, model (eval, CPU), splits {"train"|"val"|"test": [DetImage]}, class_names)``.

    The folder is verified as a whole first; the weights, anchors and split are read from the
    verified bytes. The model is rebuilt from the manifest (``build_detector(pretrained="none")``:
    nothing is downloaded) and its anchors must equal ``anchors.npy``."""
    import io

    from safetensors.torch import load as load_safetensors

    from ..runtime.detect import load_anchors
    from ..runtime.manifest import open_verified, read_verified
    from .data import split_from_json
    from .model import build_detector

    path = Path(path)
    manifest = open_verified(path, "run", hint="pass the output folder of a detection training")
    if manifest.task != "detection":
        raise EdgetlError(f"{path}: a {manifest.task} run, not a detection run",
                          hint="use edgetl's classification commands for it")
    bb = manifest.backbone
    model = build_detector(bb["name"], manifest.num_classes, tuple(manifest.preprocess.input_size), pretrained="none",
                           reduced_tail=bool(bb.get("reduced_tail", False)),
                           anchor_scales=bb.get("anchor_scales"))  # absent in older runs: torchvision's
    try:
        model.load_state_dict(load_safetensors(read_verified(path, WEIGHTS_FILE, manifest)))
    except RuntimeError as exc:
        raise EdgetlError(f"{path / WEIGHTS_FILE}: weights do not fit the {bb['name']} detector: "
                          f"{str(exc).splitlines()[0]}") from None
    name = manifest.postprocess.get("anchors", ANCHORS_FILE)
    anchors = load_anchors(read_verified(path, name, manifest), str(path / name))
    own = model.anchors.numpy()
    if anchors.shape != own.shape or not np.allclose(anchors, own, rtol=0, atol=1e-3):
        raise IntegrityError(f"{path / name}: the anchors {anchors.shape} are not the model's {own.shape} for input "
                             f"{manifest.preprocess.input_size}", hint="the run was altered: train it again")
    data = json.load(io.BytesIO(read_verified(path, SPLIT_FILE, manifest)))
    splits, _ = split_from_json(data, Path(data.get("root", ".")))
    model.eval()
    return manifest, model, splits, list(manifest.labels)


def evaluate_run(run: str | Path | tuple, split: str = "test", device: str = "cpu") -> dict[str, Any]:
    """COCO mAP (float PyTorch, the run's own post-processing decoded at score 0.01) on one split of
    the run's data. ``run``: the folder, or what :func:`load_detection_run` returned."""
    from ..train import resolve_device

    manifest, model, splits, names = load_detection_run(run) if not isinstance(run, tuple) else run
    if split not in splits or not splits[split]:
        raise EdgetlError(f"the run's {split} split is empty", hint="evaluate another split (val, test)")
    dev = resolve_device(device)
    model.to(dev)
    post = postprocess_spec(model, manifest_section=manifest.postprocess)
    m = evaluate_images(model, splits[split], manifest.preprocess, post, names, dev)
    model.to("cpu")
    return {"split": split, **m}


__all__ = ["DetTrainConfig", "augment_detection", "evaluate_images", "evaluate_run", "load_detection_run",
           "train_detector", "validate_det_config"]
