"""Fine-tuning: ``edgetl train`` / ``eval`` / ``predict`` and their Python API.

Modes
* ``feature-extract``: the backbone is frozen; its features are computed ONCE (cached in memory,
  optionally on disk with ``cache_dir``) and only the head trains, in seconds. With ``cache=False``
  the frozen backbone runs every step so augmentation can be used.
* ``fine-tune``: every layer trains; backbone LR = head LR x ``backbone_lr_factor`` (or ``backbone_lr``).
* ``gradual-unfreeze``: the head first, then the backbone's ``layer_groups`` unfrozen from the top,
  one more group every ``unfreeze_every`` epochs, at the backbone LR.
``freeze_bottom`` K (both modes above): the weights of the backbone's bottom K layer groups never train
(ImageNet's low-level features kept; their BatchNorm statistics still follow the data unless
``freeze_bn``), and the backward pass stops above them. Measured on ELPV (Lite0, the demo's 6-epoch
recipe, K = 3): test accuracy as good (85.0 % with the bottom BatchNorm frozen, 86.0 % following the
data; 84.7 % trained whole) in 60 % of the time, but the INT8 model is more fragile: OpenVINO PTQ
agreed with the float model on 95.7 % / 94.9 % of the test cells (98.0 % trained whole) and the
mixed-precision fallback did not reach 98 %. The
high-resolution bottom layers are the costly part of a CPU step: for EfficientNet-Lite0 at 224 px,
batch 32, 2 threads (AMD EPYC Zen 3, AVX2, idle) a step took 2.29 s trained whole, 1.30 s with K = 3.
``freeze_bn`` keeps every BatchNorm in eval mode with frozen affine parameters.

AdamW, linear warm-up then cosine decay (per step), label smoothing, early stopping on the
validation metric (best checkpoint kept), fixed seeds, mixed precision on CUDA, channels_last.
At the end of each epoch the full training state goes to ``OUT.partial/checkpoint.pt``: Ctrl-C keeps
the last completed epoch there and ``--resume`` continues from it bit for bit. The run folder itself
is written through ``atomic_output_dir``, so an interrupted run never looks finished.

torch is imported inside the functions: importing this module (config, metrics) is cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
import shutil
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Sequence

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (requires-python >= 3.10): the same parser, as the tomli package (a core dependency there)
    import tomli as tomllib

from .augment import AugmentConfig
from .backbones import PRETRAINED_CHOICES, build_classifier, get_backbone
from .data import SPLITS, ImageDataset, LabelledData, load_data, load_eval_items
from .fsutil import atomic_output_dir, check_output_dir
from .runs import (CHECKPOINT_FILE, CONFIG_FILE, CONFUSION_PNG, CURVES_PNG, DATA_REPORT_FILE, METRICS_FILE,
                   SPLIT_FILE, load_run, partial_dir, save_weights)
from .runtime.errors import EdgetlError
from .runtime.manifest import Manifest, seal
from .runtime.preprocess import RESIZE_POLICIES, PreprocessSpec
from .targets import dataclass_hints

MODES = ("feature-extract", "fine-tune", "gradual-unfreeze")
SCALE_LR = ("none", "linear")
BALANCES = ("none", "weighted-loss", "sampler")
SELECTION_METRICS = ("macro_f1", "accuracy")
DEVICES = ("auto", "cpu", "cuda")


# ------------------------------------------------------------------------------------------
# metrics (numpy only)
# ------------------------------------------------------------------------------------------

def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (over classes present in truth or prediction), per-class recall /
    precision / F1 / support and the confusion matrix (rows = true, columns = predicted)."""
    k = len(labels)
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = (support > 0) | (predicted > 0)
    return {
        "n": int(len(t)),
        "accuracy": float(tp.sum() / max(1, len(t))),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {lab: {"recall": float(recall[i]), "precision": float(precision[i]), "f1": float(f1[i]),
                            "support": int(support[i])} for i, lab in enumerate(labels)},
        "per_class_recall": {lab: float(recall[i]) for i, lab in enumerate(labels)},
        "confusion": cm.tolist(),
    }


def format_metrics(m: Mapping[str, Any], labels: Sequence[str]) -> str:
    """A plain-text table: accuracy, macro-F1, per-class recall/precision/support, confusion."""
    w = max(8, *(len(lab) for lab in labels)) + 2
    lines = [f"accuracy {m['accuracy']:.4f}   macro-F1 {m['macro_f1']:.4f}   (n={m['n']})",
             f"{'class':<{w}}{'recall':>8}{'precision':>11}{'F1':>8}{'support':>9}"]
    for lab in labels:
        c = m["per_class"][lab]
        lines.append(f"{lab:<{w}}{c['recall']:>8.3f}{c['precision']:>11.3f}{c['f1']:>8.3f}{c['support']:>9}")
    lines.append("confusion (rows = true, columns = predicted):")
    cw = max(6, *(len(str(v)) + 1 for row in m["confusion"] for v in row))
    lines.append(" " * w + "".join(f"{lab[:cw - 1]:>{cw}}" for lab in labels))
    for lab, row in zip(labels, m["confusion"]):
        lines.append(f"{lab:<{w}}" + "".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# config: defaults < resumed run < --config TOML < command line
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    data: str | None = None
    out: str | None = None
    val: str | None = None
    test: str | None = None
    backbone: str = "efficientnet_lite0"
    mode: str = "fine-tune"
    pretrained: str = "imagenet"
    weights: str | None = None
    input_size: list[int] | None = None  # [height, width]; None = the backbone's
    resize: str | None = None  # shorter_crop | stretch | letterbox; None = the backbone's
    epochs: int | None = None  # None = 30 for cached feature-extract, 10 otherwise
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_factor: float = 0.1
    backbone_lr: float | None = None
    scale_lr: str = "none"  # linear: learning rates x the number of processes (batch_size is per process)
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    dropout: float = 0.2
    patience: int = 5  # epochs without improvement before stopping; 0 = never stop early
    metric: str = "macro_f1"
    balance: str = "none"
    unfreeze_every: int = 1
    freeze_bottom: int = 0  # fine-tune / gradual-unfreeze: the bottom K backbone layer groups stay frozen
    freeze_bn: bool = False
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA/NCCL only)
    augment: bool | None = None  # None = on, except for cached feature-extract
    aug_scale: float = 0.6
    aug_hflip: float = 0.5
    aug_vflip: float = 0.0
    aug_rotate: float = 10.0
    aug_brightness: float = 0.2
    aug_contrast: float = 0.2
    cache: bool | None = None  # feature-extract only; None = cache unless augmenting
    cache_dir: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    num_workers: int | None = None  # None = min(2, CPUs - 2): no worker on a 2-core machine (see workers)

    # ---- derived -------------------------------------------------------------------------
    @property
    def cached(self) -> bool:
        return self.mode == "feature-extract" and bool(self.cache)

    @property
    def augment_config(self) -> AugmentConfig | None:
        if not self.augment:
            return None
        return AugmentConfig(scale=self.aug_scale, hflip=self.aug_hflip, vflip=self.aug_vflip,
                             rotate=self.aug_rotate, brightness=self.aug_brightness, contrast=self.aug_contrast)

    @property
    def workers(self) -> int:
        # Loader workers compete with the training threads for the cores: on a 2-core AVX2 EPYC an
        # ELPV fine-tuning epoch took 114 s with 2 workers, 104 s with 1 and 102 s with none (the
        # same losses), so workers only take the cores beyond the 2 that train
        return self.num_workers if self.num_workers is not None else min(2, max(0, (os.cpu_count() or 1) - 2))

    @property
    def head_backbone_lr(self) -> float:
        return self.backbone_lr if self.backbone_lr is not None else self.lr * self.backbone_lr_factor

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# What may differ from the interrupted run when resuming (the rest would change what is trained).
RESUME_MAY_CHANGE = ("data", "val", "test", "epochs", "patience", "device", "num_workers", "amp", "cache_dir")
_HINTS = dataclass_hints(TrainConfig)  # not typing.get_type_hints: `edgetl --help` imports this on Python 3.8


def _type_names(hint: Any) -> str:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    names = [getattr(typing.get_origin(a) or a, "__name__", str(a)) for a in args if a is not type(None)]
    return " or ".join("list of 2 ints" if n == "list" else n for n in names)


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check one config value's type (and normalise input_size); raise naming the key."""
    if key == "input_size" and value is not None:
        if isinstance(value, str):
            try:
                value = [int(v) for v in value.lower().split("x")]
            except ValueError:
                raise EdgetlError(f"{source}: input_size = {value!r} is not a size",
                                  hint="give one number (224) or HEIGHTxWIDTH (224x160)") from None
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]
        if isinstance(value, (list, tuple)) and len(value) == 1:
            value = [value[0], value[0]]
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 8 for v in value)):
            raise EdgetlError(f"{source}: input_size = {value!r} is not a size",
                              hint="give one number (224) or [height, width], each at least 8")
        return [int(v) for v in value]
    hint = _HINTS[key]
    if value is None:
        if isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint):
            return None
        raise EdgetlError(f"{source}: key {key!r} cannot be empty", hint=f"give a {_type_names(hint)}")
    for t in (typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)):
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, (str, Path)):
            return str(value)
    raise EdgetlError(f"{source}: key {key!r} = {value!r} has the wrong type", hint=f"give a {_type_names(hint)}")


def _check_keys(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for raw, value in data.items():
        key = raw.replace("-", "_")
        if key not in CONFIG_KEYS:
            close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            if isinstance(value, dict):
                hint = "the config is flat: put every key at the top level, no [sections]"
            else:
                hint = (f"did you mean {close[0]!r}? " if close else "") + f"known keys: {', '.join(CONFIG_KEYS)}"
            raise EdgetlError(f"{source}: unknown config key {raw!r}", hint=hint)
        out[key] = _coerce(key, value, source)
    return out


def read_toml_file(path: str | Path, option: str) -> dict[str, Any]:
    """A TOML file the user named with ``option`` (``--config``, ``--candidates``), parsed; one-line
    errors for a missing, unreadable or invalid file."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgetlError(f"{option} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgetlError(f"{option} {path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdgetlError(f"{option} {path}: not valid TOML ({exc})") from None


def read_config_toml(path: str | Path) -> dict[str, Any]:
    """The keys of a training config TOML (flat; keys as in config.toml), type-checked."""
    return _check_keys(read_toml_file(path, "--config"), str(path))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: Mapping[str, Any], header: str = "") -> str:
    """A flat mapping as TOML; None values are written as comments (unset)."""
    lines = [f"# {line}" for line in header.splitlines()]
    for k, v in data.items():
        lines.append(f"# {k} = (unset)" if v is None else f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """Check values and fill the derived defaults (epochs, augment, cache)."""
    def choice(key: str, allowed: Sequence[str]) -> None:
        if getattr(cfg, key) not in allowed:
            raise EdgetlError(f"{key} = {getattr(cfg, key)!r} is not valid", hint=f"use one of: {', '.join(allowed)}")

    choice("mode", MODES)
    choice("balance", BALANCES)
    choice("metric", SELECTION_METRICS)
    choice("device", DEVICES)
    choice("pretrained", PRETRAINED_CHOICES)
    choice("scale_lr", SCALE_LR)
    if cfg.resize is not None:
        choice("resize", RESIZE_POLICIES)
    get_backbone(cfg.backbone)
    if cfg.weights and cfg.pretrained == "none":
        raise EdgetlError("weights is given with pretrained = none", hint="drop --weights, or use --pretrained imagenet")
    if cfg.weights and not Path(cfg.weights).is_file():
        raise EdgetlError(f"--weights {cfg.weights}: no such file")
    for key, lo in (("batch_size", 1), ("unfreeze_every", 1), ("patience", 0), ("freeze_bottom", 0)):
        if getattr(cfg, key) < lo:
            raise EdgetlError(f"{key} = {getattr(cfg, key)} must be at least {lo}")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise EdgetlError(f"epochs = {cfg.epochs} must be at least 1")
    for key in ("lr", "backbone_lr_factor", "weight_decay", "warmup_epochs", "label_smoothing", "dropout"):
        if getattr(cfg, key) < 0:
            raise EdgetlError(f"{key} = {getattr(cfg, key)} must not be negative")
    if not 0 <= cfg.label_smoothing < 1 or not 0 <= cfg.dropout < 1:
        raise EdgetlError("label_smoothing and dropout must be in [0, 1)")
    if cfg.sync_bn and (cfg.freeze_bn or cfg.mode == "feature-extract"):
        raise EdgetlError(f"sync_bn = true has nothing to synchronise: BatchNorm is frozen "
                          f"({'--freeze-bn' if cfg.freeze_bn else '--mode feature-extract'})", hint="drop --sync-bn")
    if cfg.mode == "feature-extract" and cfg.freeze_bottom:
        raise EdgetlError(f"freeze_bottom = {cfg.freeze_bottom} has nothing to do in --mode feature-extract (the whole "
                          "backbone is frozen)", hint="drop --freeze-bottom, or use --mode fine-tune")
    if cfg.mode != "feature-extract" and cfg.cache:
        raise EdgetlError(f"cache = true only applies to --mode feature-extract (mode is {cfg.mode})",
                          hint="drop --cache")
    if cfg.mode == "feature-extract":
        if cfg.cache and cfg.augment:
            raise EdgetlError("cached features cannot be augmented (augment = true with cache = true)",
                              hint="pass --no-cache to run the frozen backbone on augmented images every step, "
                                   "or --no-augment")
        augment = bool(cfg.augment) if cfg.augment is not None else cfg.cache is False
        cache = not augment if cfg.cache is None else cfg.cache
    else:
        augment, cache = (True if cfg.augment is None else cfg.augment), None
    epochs = cfg.epochs if cfg.epochs is not None else (30 if cfg.mode == "feature-extract" and cache else 10)
    cfg = dataclasses.replace(cfg, augment=augment, cache=cache, epochs=epochs)
    cfg.augment_config  # range checks
    return cfg


def resolve_config(cli: Mapping[str, Any], config_file: str | Path | None = None, resume: bool = False,
                   world_size: int | None = None) -> TrainConfig:
    """Merge defaults < the interrupted run's config (``resume``) < ``config_file`` < ``cli``.

    ``world_size``: processes of this run (None: torchrun's WORLD_SIZE, else 1). A resumed run may
    change ``batch_size`` (per process) only together with the number of processes, keeping the
    global batch of the interrupted run."""
    from .distributed import world_size_from_env

    world = world_size if world_size is not None else world_size_from_env()
    given = _check_keys({k: v for k, v in cli.items() if v is not None}, "command line")
    from_file = read_config_toml(config_file) if config_file else {}
    merged = {**from_file, **given}
    base: dict[str, Any] = {}
    if resume:
        base = _resume_base(merged, world)
    cfg = TrainConfig(**{**base, **merged})
    if not cfg.data:
        raise EdgetlError("no training data given", hint="edgetl train DATA --out runs/NAME (DATA: a folder or CSV)")
    if not cfg.out:
        raise EdgetlError("no output folder given", hint="pass --out runs/NAME")
    return validate_config(cfg)


def _resume_base(merged: Mapping[str, Any], world: int) -> dict[str, Any]:
    """The interrupted run's config, after checking that ``merged`` changes only what may change."""
    from .distributed import LAUNCH_FILE

    out = merged.get("out")
    if not out:
        raise EdgetlError("--resume needs --out (the run to continue)", hint="edgetl train --resume --out runs/NAME")
    part = partial_dir(out)
    if not (part / CHECKPOINT_FILE).is_file():
        raise EdgetlError(f"{part}: no interrupted run to resume",
                          hint=f"start it without --resume, e.g. edgetl train DATA --out {out}")
    base = read_config_toml(part / CONFIG_FILE)
    try:
        was = json.loads((part / LAUNCH_FILE).read_text()).get("world_size", 1)
    except (OSError, ValueError):
        was = 1  # a single-process run (or one from before distributed training)
    batch = merged.get("batch_size", base.get("batch_size", TrainConfig.batch_size))
    before = base.get("batch_size", TrainConfig.batch_size)
    if batch * world != before * was:
        raise EdgetlError(f"--resume: the interrupted run trained with a global batch of {before * was} ({was} "
                          f"process(es) x batch_size {before}); this one would have {batch * world} ({world} x {batch})",
                          hint=f"keep the global batch: --batch-size {before * was // world} with {world} process(es)"
                               if before * was % world == 0 else f"resume with {was} process(es)")
    for key, value in merged.items():
        if key not in RESUME_MAY_CHANGE + ("batch_size",) and key != "out" and value != base.get(key):
            raise EdgetlError(f"--resume: {key} = {value!r} differs from the interrupted run ({base.get(key)!r})",
                              hint=f"only these may change when resuming: {', '.join(RESUME_MAY_CHANGE)}; "
                                   "or start over with --overwrite")
    return base


def resolve_spec(spec: PreprocessSpec, cfg: TrainConfig) -> PreprocessSpec:
    """The backbone's preprocessing with ``input_size`` / ``resize`` overrides applied."""
    changes: dict[str, Any] = {}
    if cfg.input_size is not None:
        changes["input_size"] = tuple(cfg.input_size)
        if spec.resize_size is not None:
            changes["resize_size"] = None
    if cfg.resize is not None:
        changes["resize"] = cfg.resize
    return dataclasses.replace(spec, **changes) if changes else spec


# ------------------------------------------------------------------------------------------
# console output: rich progress bars in a terminal, plain lines in logs
# ------------------------------------------------------------------------------------------

class Reporter:
    """Log lines (always plain text) and per-phase progress (rich bar with ETA and images/s in a
    terminal; a plain progress line every ``every_s`` seconds otherwise)."""

    def __init__(self, quiet: bool = False, every_s: float = 30.0):
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.every_s = every_s
        self._live = None

    def log(self, msg: str) -> None:
        if self.quiet:
            return
        if self._live is not None:
            self._live.console.print(msg, markup=False, highlight=False, soft_wrap=True)
        else:
            print(msg, flush=True)

    @contextlib.contextmanager
    def progress(self, desc: str, total: int) -> Iterator[Callable[[int], None]]:
        """Yields ``advance(n_images)``."""
        if self.quiet:
            yield lambda n: None
            return
        if self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            from rich.text import Text

            class Speed(ProgressColumn):
                def render(self, task):  # noqa: D401
                    s = task.finished_speed or task.speed
                    return Text(f"{s:7.1f} img/s" if s else "      - img/s")

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Speed(),
                          TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                          console=self.console, transient=True) as prog:
                self._live = prog
                task = prog.add_task(desc, total=total)
                try:
                    yield lambda n: prog.advance(task, n)
                finally:
                    self._live = None
            return
        start = last = time.perf_counter()
        done = 0

        def advance(n: int) -> None:
            nonlocal done, last
            done += n
            now = time.perf_counter()
            if now - last >= self.every_s and done < total:
                last = now
                ips = done / (now - start)
                print(f"  {desc}: {done}/{total} images, {ips:.1f} img/s, ETA {(total - done) / ips:.0f}s", flush=True)

        yield advance


# ------------------------------------------------------------------------------------------
# torch helpers
# ------------------------------------------------------------------------------------------

def resolve_device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EdgetlError("--device cuda: no CUDA device is available to torch", hint="use --device cpu (or auto)")
    return torch.device(name)


@contextlib.contextmanager
def single_threaded_cv2(active: bool = True) -> Iterator[None]:
    """OpenCV single-threaded while DataLoader workers are forked from this process.

    A worker forked while OpenCV's thread pool exists inherits the pool without its threads and
    hangs the first time it touches it (seen here: a second training in one process froze).
    With one thread OpenCV never enters the pool; the workers are the parallelism."""
    import cv2

    if not active:
        yield
        return
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(prev)


def make_loader(ds: ImageDataset, batch_size: int, workers: int, device, shuffle: bool = False,
                seed: int = 0, sample_weights: Sequence[float] | None = None, sampler=None):
    """A DataLoader; training passes its ``sampler`` (:func:`edgetl.distributed.train_sampler`)."""
    import torch
    from torch.utils.data import DataLoader, WeightedRandomSampler

    g = torch.Generator().manual_seed(seed)
    if sampler is None and sample_weights is not None:
        sampler = WeightedRandomSampler(list(sample_weights), len(ds), replacement=True, generator=g)
    # Workers start from a fork server, not a fork of this process: a process that has already loaded
    # OpenVINO/ONNX Runtime/OpenMP thread pools (a notebook, the test suite, the Python API after a
    # runner) can crash in a forked child. Persistent workers pay the start-up once per run.
    extra = {"multiprocessing_context": "forkserver", "persistent_workers": True} if workers > 0 and \
        sys.platform.startswith("linux") else {}
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=g, num_workers=workers, pin_memory=device.type == "cuda", **extra)


def _to_device(x, device, channels_last: bool):
    import torch

    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _autocast(device, amp: bool):
    import torch

    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp and device.type == "cuda")


def eval_batch_size(device, train_batch: int = 32) -> int:
    """Inference batch: 16 on CPU (measured on Lite0 at 224 px: 25 ms of CPU per image at batch 16
    vs 33 ms at 64, where activations above glibc's 32 MB mmap limit page-fault on every batch),
    twice the training batch on CUDA."""
    return 16 if device.type == "cpu" else 2 * train_batch


def run_model(fn: Callable, ds: ImageDataset, *, batch_size: int, workers: int, device, channels_last: bool,
              amp: bool, reporter: Reporter | None = None, desc: str = "eval"):
    """``fn(batch) -> tensor`` over a dataset (no augmentation, no grad), concatenated on the CPU."""
    import torch

    outs = []
    loader = make_loader(ds, batch_size, workers, device)
    ctx = reporter.progress(desc, len(ds)) if reporter else contextlib.nullcontext(lambda n: None)
    with ctx as advance, torch.inference_mode():
        for x, _ in loader:
            with _autocast(device, amp):
                y = fn(_to_device(x, device, channels_last))
            outs.append(y.float().cpu())
            advance(len(x))
    return torch.cat(outs) if outs else torch.zeros(0)


def _param_groups(model, cfg: TrainConfig, lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Head and backbone groups, no weight decay on biases and normalisation parameters; learning
    rates x ``lr_scale`` (``--scale-lr linear``: the number of processes)."""
    groups = []
    parts = [("head", list(model.head.named_parameters()), cfg.lr * lr_scale)]
    if cfg.mode != "feature-extract":
        parts.append(("backbone", list(model.backbone.named_parameters()), cfg.head_backbone_lr * lr_scale))
    for name, params, lr in parts:
        decay = [p for _, p in params if p.ndim > 1]
        no_decay = [p for _, p in params if p.ndim <= 1]
        groups.append({"name": f"{name}", "params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        groups.append({"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def unfrozen_groups(cfg: TrainConfig, epoch: int, n_groups: int) -> int:
    """How many backbone layer groups (from the top) train in ``epoch`` (0-based); the bottom
    ``freeze_bottom`` never do."""
    trainable = max(0, n_groups - cfg.freeze_bottom)
    if cfg.mode == "feature-extract":
        return 0
    if cfg.mode == "fine-tune":
        return trainable
    return min(trainable, epoch // cfg.unfreeze_every)


def _batchnorms(module):
    import torch.nn as nn

    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_trainable(model, n_unfrozen: int, freeze_bn: bool) -> None:
    """requires_grad for the backbone: the top ``n_unfrozen`` layer groups (all of it when every
    group is unfrozen); BatchNorm affine frozen with ``freeze_bn``."""
    groups = model.layer_groups
    for p in model.backbone.parameters():
        p.requires_grad_(n_unfrozen >= len(groups))
    for group in groups[len(groups) - n_unfrozen:] if n_unfrozen else []:
        for m in group:
            for p in m.parameters():
                p.requires_grad_(True)
    if freeze_bn:
        for bn in _batchnorms(model.backbone):
            for p in bn.parameters():
                p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)


def set_train_mode(model, n_unfrozen: int, freeze_bn: bool, bottom: int = 0) -> None:
    """Training mode for what trains; frozen layers (and every BatchNorm with ``freeze_bn``) in
    eval mode, so their running statistics do not move. The BatchNorm layers of the ``bottom`` groups
    (frozen for good by ``freeze_bottom``) follow the data, as they do when the whole backbone
    fine-tunes (``freeze_bn`` freezes them everywhere)."""
    groups = model.layer_groups
    model.train()
    if n_unfrozen < len(groups):
        model.backbone.eval()
        for group in groups[len(groups) - n_unfrozen:] if n_unfrozen else []:
            for m in group:
                m.train()
    for group in groups[:bottom]:
        for m in group:
            for bn in _batchnorms(m):
                bn.train()
    if freeze_bn:
        for bn in _batchnorms(model):
            bn.eval()


def _state_copy(model, head_only: bool) -> dict[str, Any]:
    """What training changes: the whole state, or only the head's when the backbone is frozen
    (feature-extract), which keeps the per-epoch checkpoint small."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not head_only or k.startswith("head.")}


def _save_checkpoint(part: Path, state: dict[str, Any], cfg: TrainConfig, launch: dict[str, Any] | None = None) -> None:
    """The resumable state; ``launch``: world size, per-process batch and epoch (``distributed.json``,
    read by ``--resume`` before torch loads the checkpoint)."""
    import torch

    from .distributed import LAUNCH_FILE

    part.mkdir(parents=True, exist_ok=True)
    (part / CONFIG_FILE).write_text(to_toml(cfg.to_dict(), "edgetl train: config of the interrupted run"))
    tmp = part / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, part / CHECKPOINT_FILE)
    if launch is not None:
        (part / LAUNCH_FILE).write_text(json.dumps(launch) + "\n")


def _load_checkpoint(part: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(part / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EdgetlError(f"{part / CHECKPOINT_FILE}: cannot be read ({type(exc).__name__}: {exc})",
                          hint="start over with --overwrite") from None


# ------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    out: Path
    metrics: dict[str, Any]
    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)


EpochCallback = Callable[[int, Dict[str, Any]], None]  # evaluated at import: typing's Dict for Python 3.8


def _log_data(rep: Reporter, data: LabelledData, cfg: TrainConfig) -> None:
    r = data.report
    rep.log(f"data: {r['data']} ({r['layout']}): {len(data.labels)} classes, {r['usable']} usable images, "
            f"{r['skipped_count']} skipped, split seed {data.split_seed}, fingerprint {data.fingerprint[:12]}")
    w = max(8, *(len(lab) for lab in data.labels)) + 2
    rep.log(f"  {'class':<{w}}{'train':>7}{'val':>7}{'test':>7}")
    counts = {s: data.counts(s) for s in SPLITS}
    for lab in data.labels:
        rep.log(f"  {lab:<{w}}" + "".join(f"{counts[s][lab]:>7}" for s in SPLITS))
    for s in r["skipped"][:5]:
        rep.log(f"  skipped {s['path']}: {s['reason']}")
    if len(r["skipped"]) > 5:
        rep.log(f"  ... {len(r['skipped']) - 5} more skipped files: see data_report.json")
    train_counts = [n for n in counts["train"].values() if n]
    ratio = max(train_counts) / max(1, min(train_counts))
    if ratio >= 2 and cfg.balance == "none":
        rep.log(f"  note: classes are imbalanced ({ratio:.1f}:1); --balance weighted-loss or sampler may help")


def run_training(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False,
                 callbacks: Sequence[EpochCallback] = (), reporter: Reporter | None = None) -> TrainResult:
    """Train per ``cfg`` (already resolved) and write the run folder ``cfg.out``.

    Under torchrun (``edgetl train --nproc N``, or ``torchrun ... -m edgetl train``) every process
    calls this: DistributedDataParallel on its shard, rank 0 alone holds the lock and writes."""
    from .distributed import setup

    dist = setup(cfg.device)
    try:
        lock = out_lock(cfg.out) if dist.is_main else contextlib.nullcontext()
        with lock, single_threaded_cv2(cfg.workers > 0), sigchld_restored():
            return _run_training(cfg, resume, overwrite, callbacks, reporter, dist)
    finally:
        dist.close()


@contextlib.contextmanager
def sigchld_restored() -> Iterator[None]:
    """Put back the SIGCHLD handler that was there before training.

    A DataLoader with worker processes installs a SIGCHLD handler that checks its workers and
    never removes it; after the loader is gone, the next child process that exits (a subprocess a
    script or a test starts later) runs it, and it crashed the Python process (SIGSEGV; seen in the
    test suite: training with --num-workers 2, then a killed subprocess)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGCHLD"):
        yield
        return
    previous = signal.getsignal(signal.SIGCHLD)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGCHLD, previous)


def out_lock(out: str | Path):
    """One command per --out at a time (a second ``edgetl train``, e.g. ``--resume`` while the first
    still runs, would write the same resumable state): the folder lock of :mod:`edgetl.artifact`."""
    from .artifact import folder_lock

    return folder_lock(out)


@dataclass
class _Job:
    """What one training process holds while it trains (one rank of it under DDP)."""

    cfg: TrainConfig
    rep: Reporter
    dist: Any  # edgetl.distributed.Dist
    out: Path
    part: Path
    spec: PreprocessSpec
    data: LabelledData
    ckpt: dict[str, Any] | None
    t_start: float
    device: Any = None
    amp: bool = False
    model: Any = None
    built: Any = None
    sync_bn: bool = False
    lr_scale: float = 1.0
    ds: dict[str, ImageDataset] = field(default_factory=dict)
    feats: dict[str, Any] = field(default_factory=dict)
    train_y: Any = None
    sampler: Any = None
    loss_w: Any = None
    run_kw: dict[str, Any] = field(default_factory=dict)
    opt: Any = None
    sched: Any = None
    scaler: Any = None
    net: Any = None  # what a training step calls (DDP-wrapped under torchrun)
    net_groups: int | None = None  # the unfrozen layer groups ``net`` was wrapped for
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"state": None, "epoch": 0, "metric": -1.0, "loss": math.inf})
    bad_epochs: int = 0
    start_epoch: int = 0
    elapsed_before: float = 0.0

    @property
    def frozen_all(self) -> bool:
        return self.cfg.mode == "feature-extract"

    @property
    def n_groups(self) -> int:
        return len(self.model.layer_groups)


def _run_training(cfg: TrainConfig, resume: bool, overwrite: bool, callbacks: Sequence[EpochCallback],
                  reporter: Reporter | None, dist) -> TrainResult:
    rep = (reporter or Reporter()) if dist.is_main else Reporter(quiet=True)
    job = _prepare(cfg, resume, overwrite, rep, dist)
    _build_model(job)
    _build_data(job)
    _build_optimizer(job)
    train_time = _epoch_loop(job, callbacks)
    return _finish(job, overwrite, train_time)


def _prepare(cfg: TrainConfig, resume: bool, overwrite: bool, rep: Reporter, dist) -> _Job:
    """Output checks, the interrupted run's checkpoint, the data (decoded once, split, fingerprinted)."""
    t_start = time.time()
    out, part = Path(cfg.out), partial_dir(cfg.out)
    spec = resolve_spec(get_backbone(cfg.backbone).preprocess, cfg)
    cfg = dataclasses.replace(cfg, input_size=list(spec.input_size), resize=spec.resize)  # saved resolved
    check_output_dir(out, overwrite)
    ckpt = None
    if resume:
        ckpt = _load_checkpoint(part)
        was = int(ckpt.get("world_size", 1)) * int(ckpt.get("batch_size", cfg.batch_size))
        if was != dist.world_size * cfg.batch_size:
            raise EdgetlError(f"--resume: the interrupted run's global batch was {was}; this run's is "
                              f"{dist.world_size} x {cfg.batch_size} = {dist.world_size * cfg.batch_size}",
                              hint="resume with a --batch-size (per process) x processes that keeps the global batch")
    elif part.exists():
        if not overwrite:
            raise EdgetlError(f"{part}: an interrupted run of {out} is waiting there",
                              hint=f"continue it with `edgetl train --resume --out {out}`, or pass --overwrite "
                                   "to start over")
        if dist.is_main:
            shutil.rmtree(part)

    data = load_data(cfg.data, val=cfg.val, test=cfg.test, val_fraction=cfg.val_fraction,
                     test_fraction=cfg.test_fraction, seed=cfg.split_seed)
    if ckpt is not None and ckpt["fingerprint"] != data.fingerprint:
        raise EdgetlError(f"{cfg.data}: the data changed since the interrupted run (fingerprint "
                          f"{data.fingerprint[:12]} vs {ckpt['fingerprint'][:12]})",
                          hint="restore the data, or start over with --overwrite")
    _log_data(rep, data, cfg)
    return _Job(cfg, rep, dist, out, part, spec, data, ckpt, t_start)


def _build_model(job: _Job) -> None:
    """Device, seed, the classifier (SyncBatchNorm across processes with --sync-bn), the model line."""
    import torch

    cfg, dist = job.cfg, job.dist
    job.device = dist.device if dist.active else resolve_device(cfg.device)
    job.amp = cfg.amp and job.device.type == "cuda"
    torch.manual_seed(cfg.seed)
    if job.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, built = build_classifier(cfg.backbone, len(job.data.labels), cfg.pretrained, cfg.weights, cfg.dropout)
    if cfg.freeze_bottom >= len(model.layer_groups):
        raise EdgetlError(f"freeze_bottom = {cfg.freeze_bottom} leaves nothing of the backbone to train: {cfg.backbone} "
                          f"has {len(model.layer_groups)} layer groups",
                          hint=f"pass --freeze-bottom {len(model.layer_groups) - 1} or less, or --mode feature-extract "
                               "to freeze the whole backbone")
    if cfg.sync_bn:
        if job.device.type != "cuda":
            raise EdgetlError("--sync-bn needs CUDA: torch's SyncBatchNorm runs on GPUs (NCCL), not on the CPU (gloo)",
                              hint="drop --sync-bn: each process then normalises with its own batch's statistics")
        if dist.world_size > 1:
            from .distributed import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)
            job.sync_bn = True
    model.to(job.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    job.model, job.built = model, built
    job.lr_scale = float(dist.world_size) if cfg.scale_lr == "linear" else 1.0
    spec, aug = job.spec, cfg.augment_config
    ddp = (f"; {dist.world_size} processes ({dist.backend}{', SyncBatchNorm' if job.sync_bn else ''}), batch "
           f"{cfg.batch_size} each = {dist.world_size * cfg.batch_size} global, lr x {job.lr_scale:g}") if dist.active else ""
    job.rep.log(f"model: {cfg.backbone} ({cfg.pretrained}{', ' + built.weights.get('source', '') if cfg.pretrained != 'none' else ''}), "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {job.n_groups} layer groups"
                f"{f' (bottom {cfg.freeze_bottom} frozen)' if cfg.freeze_bottom else ''}; "
                f"mode {cfg.mode}; input {spec.input_size[0]}x{spec.input_size[1]} {spec.resize}; device {job.device}"
                f"{' (AMP)' if job.amp else ''}; augment {'on' if aug else 'off'}; balance {cfg.balance}{ddp}")


def _build_data(job: _Job) -> None:
    """Datasets, class weights, this rank's training sampler, the cached features."""
    import torch

    from .distributed import train_sampler

    cfg, data = job.cfg, job.data
    k = len(data.labels)
    train_items = data.indexed("train")
    train_y = np.array([y for _, y in train_items])
    class_n = np.bincount(train_y, minlength=k).astype(np.float64)
    class_w = np.where(class_n > 0, len(train_y) / (k * np.maximum(class_n, 1)), 0.0)
    sample_w = class_w[train_y] if cfg.balance == "sampler" else None
    job.loss_w = torch.tensor(class_w, dtype=torch.float32, device=job.device) if cfg.balance == "weighted-loss" else None
    job.train_y = train_y
    # one seeded order of the whole set per epoch (seed x 1000003 + epoch), cut [rank::world]
    job.sampler = train_sampler(len(train_y), job.dist, cfg.seed * 1_000_003, sample_w)
    job.ds = {"train": ImageDataset(train_items, job.spec, cfg.augment_config, seed=cfg.seed),
              "val": ImageDataset(data.indexed("val"), job.spec), "test": ImageDataset(data.indexed("test"), job.spec)}
    job.run_kw = dict(batch_size=eval_batch_size(job.device, cfg.batch_size), workers=cfg.workers,
                      device=job.device, channels_last=cfg.channels_last, amp=job.amp, reporter=job.rep)
    if cfg.cached:
        job.feats = _cached_features(job)


def _build_optimizer(job: _Job) -> None:
    """AdamW, linear warm-up then cosine per step, the AMP scaler; the interrupted run's state."""
    import torch

    cfg, ck = job.cfg, job.ckpt
    steps_per_epoch = math.ceil(len(job.sampler) / cfg.batch_size)  # this rank's steps = the global steps
    job.opt = torch.optim.AdamW(_param_groups(job.model, cfg, job.lr_scale))
    job.sched = torch.optim.lr_scheduler.LambdaLR(
        job.opt, _lr_lambda(int(round(cfg.warmup_epochs * steps_per_epoch)), cfg.epochs * steps_per_epoch))
    job.scaler = torch.amp.GradScaler(job.device.type, enabled=job.amp)
    if ck is None:
        return
    job.model.load_state_dict(ck["model"], strict=not job.frozen_all)
    job.opt.load_state_dict(ck["optimizer"])
    job.sched.load_state_dict(ck["scheduler"])  # its base learning rates too: a resumed run keeps its own
    job.scaler.load_state_dict(ck["scaler"])
    job.best = dict(ck["best"])
    job.best["state"] = {kk: v.to(job.device) for kk, v in job.best["state"].items()}
    job.bad_epochs, job.start_epoch, job.history = ck["bad_epochs"], ck["epoch"], list(ck["history"])
    if not job.dist.active:  # under DDP each epoch reseeds (distributed.rank_seed)
        torch.set_rng_state(ck["rng"]["torch"])
        if job.device.type == "cuda" and ck["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ck["rng"]["cuda"])
    job.elapsed_before = float(ck["elapsed"])
    job.rep.log(f"resuming {job.out} after epoch {job.start_epoch} (best so far: epoch {job.best['epoch']}, "
                f"{cfg.metric} {job.best['metric']:.4f})")


def _epoch_loop(job: _Job, callbacks: Sequence[EpochCallback]) -> float:
    """Train, validate and checkpoint each epoch until the last one or an early stop; the training time."""
    import torch

    from .distributed import fault

    cfg = job.cfg
    t_train = time.time()
    saved_epoch = job.start_epoch if job.ckpt is not None else None
    # A linear head on cached features is tiny work: one thread avoids OpenMP hand-offs that cost
    # 50x on a busy machine (measured: 4.2 s vs 0.07 s per ELPV epoch with 2 threads vs 1).
    threads = torch.get_num_threads()
    if cfg.cached:
        torch.set_num_threads(1)
    try:
        for epoch in range(job.start_epoch, cfg.epochs):
            rec, improved, stop = _validate(job, epoch, _train_epoch(job, epoch))
            _checkpoint(job, epoch, t_train)
            saved_epoch = epoch + 1
            fault(job.dist, epoch + 1, "checkpoint")
            _log_epoch(job, rec, improved)
            for cb in callbacks:
                cb(epoch + 1, rec)
            if stop:
                job.rep.log(f"early stop: no {cfg.metric} improvement for {cfg.patience} epochs "
                            f"(best epoch {job.best['epoch']})")
                break
    except KeyboardInterrupt:
        _log_interrupted(job, saved_epoch)
        raise
    finally:
        torch.set_num_threads(threads)
    return job.elapsed_before + time.time() - t_train


def _step_net(job: _Job, n_unfrozen: int):
    """The module a training step calls: DDP-wrapped under torchrun, and wrapped again when the
    trainable parameters change (gradual unfreezing), since DDP registers them when it is built."""
    if job.net is None or job.net_groups != n_unfrozen:
        job.net = job.dist.wrap(_steps_module(job.model))
        job.net_groups = n_unfrozen
    return job.net


_STEPS: list[type] = []


def _steps_module(model):
    """``net(x, how)``: ``features`` (x: cached backbone features -> the head), ``frozen`` (the
    backbone without gradients, then the head) or ``full`` (the classifier). One module, so DDP's
    forward (which prepares its gradient all-reduce) is what every step calls."""
    if not _STEPS:
        import torch

        class Steps(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, x, how: str):
                m = self.model
                if how == "features":
                    return m.head(m.dropout(x))
                if how == "frozen":
                    with torch.no_grad():
                        x = m.backbone(x)
                    return m.head(m.dropout(x))
                return m(x)

        _STEPS.append(Steps)
    return _STEPS[0](model)


def _train_batches(job: _Job, epoch: int):
    """This rank's batches of ``epoch``: cached features, or the (augmented) images."""
    cfg = job.cfg
    job.sampler.set_epoch(epoch)
    if cfg.cached:
        import torch

        order = torch.tensor(list(job.sampler), dtype=torch.long)
        ys = torch.as_tensor(job.train_y)
        return ((job.feats["train"][idx], ys[idx]) for idx in order.split(cfg.batch_size))
    job.ds["train"].epoch = epoch
    return make_loader(job.ds["train"], cfg.batch_size, cfg.workers, job.device, seed=cfg.seed * 1_000_003 + epoch,
                       sampler=job.sampler)


def _train_epoch(job: _Job, epoch: int) -> dict[str, Any]:
    """One epoch on this rank's shard; loss, accuracy and images/s summed over the ranks."""
    import torch
    import torch.nn.functional as F

    from .distributed import fault, rank_seed

    cfg, dist, device = job.cfg, job.dist, job.device
    n_unf = unfrozen_groups(cfg, epoch, job.n_groups)
    set_trainable(job.model, n_unf, cfg.freeze_bn)
    set_train_mode(job.model, n_unf, cfg.freeze_bn, cfg.freeze_bottom if cfg.mode != "feature-extract" else 0)
    net = _step_net(job, n_unf)
    how = "features" if cfg.cached else "frozen" if n_unf == 0 else "full"
    if dist.active:
        torch.manual_seed(rank_seed(cfg.seed, epoch, dist.rank))
    fault(dist, epoch + 1, "start")
    t0 = time.perf_counter()
    tot_loss, tot_correct, seen = 0.0, 0, 0
    with job.rep.progress(f"epoch {epoch + 1}/{cfg.epochs}", len(job.sampler) * dist.world_size) as advance:
        for x, y in _train_batches(job, epoch):
            y = y.to(device, non_blocking=True)
            x = x.to(device) if cfg.cached else _to_device(x, device, cfg.channels_last)
            with _autocast(device, job.amp):
                logits = net(x, how)
                loss = F.cross_entropy(logits.float(), y, weight=job.loss_w, label_smoothing=cfg.label_smoothing)
            job.opt.zero_grad(set_to_none=True)
            job.scaler.scale(loss).backward()
            job.scaler.step(job.opt)
            job.scaler.update()
            job.sched.step()
            tot_loss += float(loss.detach()) * len(y)
            tot_correct += int((logits.detach().argmax(1) == y).sum())
            seen += len(y)
            advance(len(y) * dist.world_size)
    train_s = time.perf_counter() - t0
    tot_loss, tot_correct, seen = dist.all_sum([tot_loss, tot_correct, seen])
    return {"t0": t0, "train_loss": tot_loss / max(1, seen), "train_accuracy": tot_correct / max(1, seen),
            "unfrozen_groups": n_unf, "images_per_s": seen / max(train_s, 1e-9)}


def _logits(job: _Job, split: str):
    """A split's logits (CPU): the head on cached features, or the model over the split's images,
    sharded over the ranks and gathered, so every rank has all of them."""
    import torch

    model, dist = job.model, job.dist
    model.eval()
    if job.cfg.cached:
        with torch.inference_mode():
            return model.head(job.feats[split].to(job.device)).float().cpu()
    ds = job.ds[split]
    if not dist.active:
        return run_model(model, ds, desc=split, **job.run_kw)
    local = run_model(model, ImageDataset(dist.shard(ds.samples), ds.spec), desc=split, **job.run_kw)
    return dist.gather_rows(local, len(ds), len(job.data.labels))


def _validate(job: _Job, epoch: int, tr: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """The epoch's record with validation metrics; the best epoch and early stopping are decided on
    rank 0 and broadcast, so every rank keeps the same best state and stops at the same epoch."""
    import torch
    import torch.nn.functional as F

    cfg, opt = job.cfg, job.opt
    job.dist.sync_buffers(job.model)  # BatchNorm statistics: rank 0's, the model that is saved
    vl = _logits(job, "val")
    vy = torch.tensor([y for _, y in job.ds["val"].samples])
    vm = classification_metrics(vy.numpy(), vl.argmax(1).numpy(), job.data.labels)
    rec = {"epoch": epoch + 1, "train_loss": tr["train_loss"], "train_accuracy": tr["train_accuracy"],
           "val_loss": float(F.cross_entropy(vl, vy)), "val_accuracy": vm["accuracy"],
           "val_macro_f1": vm["macro_f1"], "lr": opt.param_groups[0]["lr"],
           "backbone_lr": next((g["lr"] for g in opt.param_groups if g["name"] == "backbone"), 0.0),
           "unfrozen_groups": tr["unfrozen_groups"], "images_per_s": tr["images_per_s"],
           "seconds": time.perf_counter() - tr["t0"]}
    job.history.append(rec)
    score, best = vm[cfg.metric], job.best
    improved = score > best["metric"] + 1e-9 or (abs(score - best["metric"]) <= 1e-9 and rec["val_loss"] < best["loss"])
    bad = 0 if improved else job.bad_epochs + 1
    improved, stop = (bool(v) for v in job.dist.from_main([improved, bool(cfg.patience) and bad >= cfg.patience]))
    if improved:
        job.best = {"state": _state_copy(job.model, job.frozen_all), "epoch": epoch + 1, "metric": score,
                    "loss": rec["val_loss"]}
    job.bad_epochs = 0 if improved else job.bad_epochs + 1
    return rec, improved, stop


def _checkpoint(job: _Job, epoch: int, t_train: float) -> None:
    """The resumable state after ``epoch``, written by rank 0 (every rank holds the same)."""
    import torch

    if not job.dist.is_main:
        return
    cfg, world = job.cfg, job.dist.world_size
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if job.device.type == "cuda" else None}
    state = {"format": 1, "epoch": epoch + 1, "model": _state_copy(job.model, job.frozen_all),
             "optimizer": job.opt.state_dict(), "scheduler": job.sched.state_dict(), "scaler": job.scaler.state_dict(),
             "best": job.best, "bad_epochs": job.bad_epochs, "history": job.history, "rng": rng,
             "fingerprint": job.data.fingerprint, "elapsed": job.elapsed_before + time.time() - t_train,
             "world_size": world, "batch_size": cfg.batch_size}
    _save_checkpoint(job.part, state, cfg, {"epoch": epoch + 1, "world_size": world, "batch_size": cfg.batch_size,
                                            "global_batch": world * cfg.batch_size, "backend": job.dist.backend})


def _log_epoch(job: _Job, rec: dict[str, Any], improved: bool) -> None:
    cfg = job.cfg
    job.rep.log(f"epoch {rec['epoch']:>3}/{cfg.epochs}  train loss {rec['train_loss']:.4f} acc {rec['train_accuracy']:.3f}"
                f"  |  val loss {rec['val_loss']:.4f} acc {rec['val_accuracy']:.3f} macro-F1 {rec['val_macro_f1']:.3f}"
                f"  |  lr {rec['lr']:.2e}"
                + (f" groups {rec['unfrozen_groups']}/{job.n_groups}" if cfg.mode == "gradual-unfreeze" else "")
                + f"  {rec['images_per_s']:.0f} img/s {rec['seconds']:.1f}s" + ("  *best" if improved else ""))


def _log_interrupted(job: _Job, saved_epoch: int | None) -> None:
    """What Ctrl-C (or SIGTERM) leaves. Under ``edgetl train --nproc`` the launcher says it (this
    goes to the rank's log), under a user's torchrun the same torchrun command resumes."""
    dist, out = job.dist, job.out
    if saved_epoch:
        again = f"edgetl train --resume --out {out}"
        if dist.active and not dist.launched:
            again = f"the same torchrun command with: {again}"
        msg = f"interrupted: epoch {saved_epoch} of {job.cfg.epochs} is saved in {job.part}; continue with: {again}"
    else:
        msg = "interrupted before the first epoch finished: nothing to resume"
    if dist.launched:
        print(msg, file=sys.stderr, flush=True)
    else:
        job.rep.log(msg)


def _finish(job: _Job, overwrite: bool, train_time: float) -> TrainResult:
    """The best epoch's model on val and test (sharded under DDP); rank 0 writes the run folder."""
    cfg, rep, labels = job.cfg, job.rep, job.data.labels
    job.model.load_state_dict(job.best["state"], strict=not job.frozen_all)
    job.model.eval()
    results: dict[str, Any] = {}
    for split in ("val", "test"):
        if len(job.ds[split]):
            lg = _logits(job, split)
            results[split] = classification_metrics([y for _, y in job.ds[split].samples], lg.argmax(1).numpy(), labels)
    final = results.get("test") or results["val"]
    if "test" in results:
        rep.log("test split, best epoch " + str(job.best["epoch"]) + ":\n" + format_metrics(results["test"], labels))
    else:
        rep.log("note: the test split is empty; the summary uses the validation split")
    metrics = {"labels": list(labels), "selection_metric": cfg.metric, "best_epoch": job.best["epoch"],
               "epochs_run": len(job.history), "history": job.history, "val": results.get("val"),
               "test": results.get("test"), "train_time_s": train_time, "total_time_s": time.time() - job.t_start}
    if job.dist.is_main:
        _write_run(job, results, metrics, overwrite, train_time)
        rep.log(f"wrote {job.out} (best epoch {job.best['epoch']}, {'test' if 'test' in results else 'val'} accuracy "
                f"{final['accuracy']:.4f}, macro-F1 {final['macro_f1']:.4f}; {train_time:.0f}s training)")
    job.dist.barrier()  # every rank ends with the folder written (a failure there stops them through torchrun)
    return TrainResult(job.out, metrics, cfg, job.history)


def _write_run(job: _Job, results: dict[str, Any], metrics: dict[str, Any], overwrite: bool, train_time: float) -> None:
    """The run folder, built hidden and renamed into place whole (``atomic_output_dir``); then the
    resumable state goes."""
    import torch

    from .plots import plot_confusion, plot_curves

    cfg, out, model, data, dist = job.cfg, job.out, job.model, job.data, job.dist
    final = results.get("test") or results["val"]
    model.to("cpu")
    if cfg.channels_last:
        model.to(memory_format=torch.contiguous_format)
    with atomic_output_dir(out, overwrite=overwrite, locked=True) as d:
        save_weights(model, d)
        (d / SPLIT_FILE).write_text(json.dumps(data.split_json(), indent=1) + "\n")
        (d / CONFIG_FILE).write_text(to_toml(cfg.to_dict(), f"edgetl train: resolved config of {out.name}\n"
                                             f"reproduce with: edgetl train --config {CONFIG_FILE}"))
        (d / DATA_REPORT_FILE).write_text(json.dumps(data.report, indent=1) + "\n")
        (d / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
        plot_confusion(final["confusion"], data.labels, d / CONFUSION_PNG,
                       title=f"{out.name}: {'test' if 'test' in results else 'val'}")
        plot_curves(job.history, d / CURVES_PNG, best_epoch=job.best["epoch"], metric=cfg.metric)
        summary = lambda m: None if m is None else {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],  # noqa: E731
                                                   "per_class_recall": m["per_class_recall"], "n": m["n"]}
        device = job.device
        manifest = Manifest(
            kind="run", labels=data.labels, preprocess=job.spec,
            backbone={"name": cfg.backbone, "pretrained": cfg.pretrained, "weights": dict(job.built.weights),
                      "dropout": cfg.dropout, "feature_dim": job.built.feature_dim},
            training={"mode": cfg.mode, "data_fingerprint": data.fingerprint, "split_seed": cfg.split_seed,
                      "seed": cfg.seed, "class_counts": {s: data.counts(s) for s in SPLITS},
                      "metrics": {"val": summary(results.get("val")), "test": summary(results.get("test"))},
                      "selection_metric": cfg.metric, "best_epoch": job.best["epoch"], "epochs_run": len(job.history),
                      "epochs": cfg.epochs, "augment": bool(cfg.augment_config), "balance": cfg.balance,
                      "freeze_bn": cfg.freeze_bn, "freeze_bottom": cfg.freeze_bottom,
                      "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
                      "amp": job.amp, "time_s": round(train_time, 2), "torch": torch.__version__, "config": CONFIG_FILE,
                      "world_size": dist.world_size, "backend": dist.backend or "none", "sync_bn": job.sync_bn,
                      "batch_size": cfg.batch_size, "global_batch": dist.world_size * cfg.batch_size,
                      "lr_scale": job.lr_scale})
        seal(d, manifest)
        load_run(d)  # the contract every later stage relies on
    shutil.rmtree(job.part, ignore_errors=True)


def feature_cache_path(cache_dir: str | Path, cfg: TrainConfig, data: LabelledData, built, spec: PreprocessSpec) -> Path:
    """Where a run's cached backbone features live in ``cache_dir``: keyed by the data fingerprint,
    backbone, weights, preprocessing and splits (``edgetl.cv`` writes the folds' files here too)."""
    key = hashlib.sha256(json.dumps({"fingerprint": data.fingerprint, "backbone": cfg.backbone,
                                     "pretrained": cfg.pretrained, "weights": built.weights,
                                     "spec": spec.to_dict(), "splits": data.split_json()["splits"]},
                                    sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"features-{cfg.backbone}-{key[:20]}.safetensors"


def _cached_features(job: _Job) -> dict[str, Any]:
    """Backbone features of every split, computed once (eval mode), sharded over the ranks and
    gathered (every rank holds all of them); optionally kept on disk (rank 0 decides and writes)."""
    cfg, rep, dist, built, data = job.cfg, job.rep, job.dist, job.built, job.data
    path = None
    if cfg.cache_dir:
        path = feature_cache_path(cfg.cache_dir, cfg, data, built, job.spec)
        if dist.from_main([path.is_file()])[0]:
            return _load_features(job, path)
    model = job.model
    model.eval()
    t0 = time.perf_counter()
    feats = {}
    for s, ds in job.ds.items():
        mine = ImageDataset(dist.shard(ds.samples), ds.spec) if dist.active else ds
        local = run_model(model.backbone, mine, desc=f"features {s}", **job.run_kw)
        feats[s] = dist.gather_rows(local, len(ds), built.feature_dim) if dist.active else local
    n = sum(len(ds) for ds in job.ds.values())
    dt = time.perf_counter() - t0
    rep.log(f"features: {n} images through the frozen backbone once in {dt:.1f}s ({n / max(dt, 1e-9):.0f} img/s"
            + (f", {dist.world_size} processes" if dist.active else "") + ")")
    if path is not None and dist.is_main:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({s: f.contiguous() for s, f in feats.items()}, str(tmp))
        os.replace(tmp, path)
    return feats


def _load_features(job: _Job, path: Path) -> dict[str, Any]:
    """The features kept on disk: rank 0 reads them, the others receive them (their file system
    need not hold the cache)."""
    import torch
    from safetensors.torch import load_file

    dist = job.dist
    feats = load_file(str(path)) if dist.is_main else {}
    if dist.active:
        for s, ds in job.ds.items():
            if not dist.is_main:
                feats[s] = torch.zeros(len(ds), job.built.feature_dim)
            if len(ds):
                dist.broadcast_(feats[s])
    job.rep.log(f"features: loaded from {path}")
    return feats


def train_run(data: str | Path | None = None, out: str | Path | None = None, *, config: str | Path | None = None,
              resume: bool = False, overwrite: bool = False, callbacks: Sequence[EpochCallback] = (),
              quiet: bool = False, **options: Any) -> TrainResult:
    """Python API of ``edgetl train``: options are config keys (``mode="fine-tune"``, ``epochs=3``...)."""
    cli = {"data": str(data) if data is not None else None, "out": str(out) if out is not None else None, **options}
    cfg = resolve_config(cli, config, resume=resume)
    return run_training(cfg, resume=resume, overwrite=overwrite, callbacks=callbacks, reporter=Reporter(quiet=quiet))


# ------------------------------------------------------------------------------------------
# eval / predict on a finished run
# ------------------------------------------------------------------------------------------

def run_logits(run, samples: Sequence[tuple[Path, int]], *, device: str = "auto", batch_size: int | None = None,
               workers: int | None = None, reporter: Reporter | None = None) -> np.ndarray:
    """The run's logits for ``samples`` through ``read_image`` + the run's ``preprocess``."""
    import torch

    dev = resolve_device(device)
    batch_size = batch_size or eval_batch_size(dev)
    model = run.model.to(dev)
    if dev.type == "cpu":
        model.to(memory_format=torch.channels_last)
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    ds = ImageDataset(samples, run.manifest.preprocess)
    workers = workers if len(ds) > batch_size else 0
    with single_threaded_cv2(workers > 0):
        return run_model(model, ds, batch_size=batch_size, workers=workers, device=dev, channels_last=True,
                         amp=dev.type == "cuda", reporter=reporter, desc="eval").numpy()


def evaluate_run(run_path: str | Path, data: str | Path | None = None, *, split: str = "test", device: str = "auto",
                 batch_size: int | None = None, workers: int | None = None, reporter: Reporter | None = None) -> dict[str, Any]:
    """Metrics of a run on a labelled folder/CSV, or on one split of its own data."""
    run = load_run(run_path)
    labels = run.manifest.labels
    if data is not None:
        samples, report = load_eval_items(data, labels)
        where = str(data)
    else:
        samples = [(s.path, s.label) for s in run.samples(split)]
        report, where = {"usable": len(samples), "skipped": []}, f"{run_path} ({split} split)"
        if not samples:
            raise EdgetlError(f"{run_path}: the {split} split is empty", hint="pass a labelled DATA folder to evaluate on")
    with sigchld_restored():
        logits = run_logits(run, samples, device=device, batch_size=batch_size, workers=workers, reporter=reporter)
    m = classification_metrics([y for _, y in samples], logits.argmax(1), labels)
    return {"run": str(run_path), "data": where, "metrics": m, "data_report": report}


def predict_images(run_path: str | Path, images: Sequence[str | Path], *, top_k: int = 1, device: str = "auto",
                   batch_size: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Top-k (label, probability) per image; files that cannot be decoded are returned separately."""
    from .data import validate_items, Item
    from .runtime.imageio import is_image_file

    run = load_run(run_path)
    paths: list[Path] = []
    for p in map(Path, images):
        if p.is_dir():
            paths += sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
        elif p.exists():
            paths.append(p)
        else:
            raise EdgetlError(f"{p}: no such file or folder")
    good, bad, _, _ = validate_items([Item(p, str(p), "?") for p in paths])
    preds: list[dict[str, Any]] = []
    if good:
        logits = run_logits(run, [(it.path, 0) for it in good], device=device, batch_size=batch_size, workers=0)
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        k = max(1, min(top_k, len(run.manifest.labels)))
        for it, p in zip(good, probs):
            top = np.argsort(-p, kind="stable")[:k]
            preds.append({"path": it.rel, "top": [{"label": run.manifest.labels[i], "prob": float(p[i])} for i in top]})
    return preds, [{"path": b["path"], "reason": b["reason"]} for b in bad]
