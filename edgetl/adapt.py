"""Domain shift: per-domain evaluation (``edgetl eval --by COLUMN``) and adaptation (``edgetl adapt``).

Per-domain evaluation: the run's metrics on each value of a column of the data's CSV (ELPV's
``cell_type``: mono / poly), side by side with their image counts, from one pass of inference.

Adaptation of a finished run to images of a new domain, written as a new run folder (the same run
contract: ``load_run``, ``edgetl compile``, the gate all take it as any run):

* **BatchNorm statistics (AdaBN, Li et al. 2016)**, no labels: every BatchNorm's running mean and
  variance are reset and re-estimated on the new images (cumulative average over near-equal
  batches: ``momentum=None``), BatchNorm layers in train mode and everything else in eval mode,
  without gradients. No weight changes; only the normalisation follows the new domain.
* **Fine-tuning on a few labels** (``labels``): after AdaBN (unless switched off) the head, or the
  head and the top layer group of the backbone (``unfreeze="top"``, at 0.1 x the learning rate),
  train for a fixed number of epochs on the labelled images, every BatchNorm in eval mode (the
  adapted statistics stay), with the source run's augmentation settings. Nothing else changes.

The new run keeps the source run's split (so ``compile`` calibrates and gates as on the source),
adds the labelled adaptation images to its training split, lists the unlabelled images under
``split.json`` ``adaptation``, re-measures its val/test metrics on the source splits, and records
the adaptation in ``manifest.training.adaptation`` (source run and digest, method, image counts,
epochs, what trained).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data import Item, discover, links_report, scan_class_folder, shown, validate_items, fingerprint
from .runtime.errors import EdgetlError
from .runtime.imageio import is_image_file

UNFREEZE = ("head", "top")
NO_VALUE = "(empty)"


# ------------------------------------------------------------------------------------------
# per-domain evaluation
# ------------------------------------------------------------------------------------------

def _classification_run(run_path: str | Path):
    from .runs import load_run
    from .runtime.manifest import read_manifest

    if read_manifest(run_path).task != "classification":
        raise EdgetlError(f"{run_path}: a {read_manifest(run_path).task} run; this works on image classifiers",
                          hint="pass the run folder of an `edgetl train` classifier")
    return load_run(run_path)


def _source_csv(run) -> Path | None:
    """The CSV the run was trained from, when it was trained from one that still exists."""
    from .runs import DATA_REPORT_FILE

    try:
        data = json.loads((run.path / DATA_REPORT_FILE).read_text()).get("data")
    except (OSError, ValueError):
        return None
    return Path(data) if data and str(data).lower().endswith(".csv") and Path(data).is_file() else None


def _domain_samples(run, data: str | Path | None, column: str, split: str):
    """(samples [(path, label index)], domain value per sample, where, data report)."""
    from .cv import read_table
    from .data import load_eval_items

    if data is not None:
        csv_path = Path(data)
        if csv_path.suffix.lower() != ".csv" or not csv_path.is_file():
            raise EdgetlError(f"--by {column}: DATA {data} is not a CSV file, so it has no columns",
                              hint="pass a CSV with path,label and that column (e.g. data/elpv/elpv_meta.csv)")
        samples, report = load_eval_items(csv_path, run.manifest.labels)
        where = str(data)
    else:
        csv_path = _source_csv(run)
        if csv_path is None:
            raise EdgetlError(f"--by {column}: {run.path} was not trained from a CSV, so its {split} split has no columns",
                              hint="pass DATA: a CSV with path,label and that column")
        samples = [(s.path, s.label) for s in run.samples(split)]
        report, where = {"usable": len(samples), "skipped": []}, f"{run.path} ({split} split; columns from {csv_path})"
        if not samples:
            raise EdgetlError(f"{run.path}: the {split} split is empty", hint="pass a labelled CSV to evaluate on")
    columns, table = read_table(csv_path)
    if column not in columns:
        raise EdgetlError(f"--by {column}: {csv_path} has no column {column!r} (columns: {', '.join(columns)})",
                          hint="name one of the CSV's columns")
    values = [table.get(Path(p).resolve(), {}).get(column, "") or NO_VALUE for p, _ in samples]
    return samples, values, where, report


def evaluate_by(run_path: str | Path, data: str | Path | None, column: str, *, split: str = "test",
                device: str = "auto", batch_size: int | None = None, workers: int | None = None,
                reporter=None) -> dict[str, Any]:
    """Metrics of a run on each value of ``column`` of DATA's CSV (or of the CSV it was trained
    from, on its own ``split``), and overall; one inference pass."""
    from .train import classification_metrics, run_logits, sigchld_restored

    column = column.strip().lower()
    run = _classification_run(run_path)
    labels = run.manifest.labels
    samples, values, where, report = _domain_samples(run, data, column, split)
    with sigchld_restored():
        logits = run_logits(run, samples, device=device, batch_size=batch_size, workers=workers, reporter=reporter)
    y = np.array([s[1] for s in samples])
    pred = logits.argmax(1)
    vals = np.array(values, dtype=object)
    domains = {v: classification_metrics(y[vals == v], pred[vals == v], labels) for v in sorted(set(values))}
    return {"run": str(run_path), "data": where, "column": column, "labels": list(labels),
            "overall": classification_metrics(y, pred, labels), "domains": domains, "data_report": report}


def format_by(res: dict[str, Any]) -> str:
    """Domains side by side: n, accuracy, macro-F1, recall per class; the overall row last."""
    labels = res["labels"]
    w = max(10, *(len(str(v)) + 2 for v in res["domains"]))
    rw = max(9, *(len(lab) + 2 for lab in labels))
    head = f"{res['column']:<{w}}{'n':>6}{'accuracy':>10}{'macro-F1':>10}" + "".join(
        f"{('rec ' + lab)[:rw - 1]:>{rw}}" for lab in labels)
    lines = [f"{res['run']} on {res['data']}, by {res['column']}:", head]
    for name, m in [*res["domains"].items(), ("all", res["overall"])]:
        lines.append(f"{name:<{w}}{m['n']:>6}{m['accuracy']:>10.4f}{m['macro_f1']:>10.4f}" + "".join(
            f"{m['per_class_recall'][lab]:>{rw}.3f}" for lab in labels))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# adaptation: the inputs
# ------------------------------------------------------------------------------------------

def unlabelled_images(folder: str | Path) -> tuple[list[Item], dict[str, Any]]:
    """Every image under ``folder`` (recursively, hidden names skipped), decoded once: usable items
    and a report. Raises EdgetlError when there is no folder or no usable image in it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgetlError(f"--images {folder}: no such folder", hint="pass a folder of images of the new domain")
    root = folder.resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p)
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    items = [Item(p.resolve(), p.relative_to(root).as_posix(), "?") for p in files]
    good, skipped, hashes, _ = validate_items(items)
    if len(good) < 2:
        raise EdgetlError(f"--images {folder}: {len(good)} usable image(s)"
                          + (f" ({len(skipped)} could not be decoded)" if skipped else ""),
                          hint="BatchNorm statistics need images of the new domain: pass a folder with at least 2 "
                               "(dozens to hundreds is better)")
    return good, {"images": str(folder), "usable": len(good), "skipped": skipped, "fingerprint": fingerprint(good, hashes)}


def labelled_images(path: str | Path, labels: Sequence[str]) -> tuple[list[tuple[Path, int]], dict[str, Any]]:
    """``--labels``: a ``path,label`` CSV or a folder of class sub-folders, validated; the classes
    must be the run's."""
    path = Path(path)
    if not path.exists():
        raise EdgetlError(f"--labels {path}: no such file or folder",
                          hint="pass a CSV with path,label columns, or a folder with one sub-folder per class")
    found = discover(path) if path.is_file() else scan_class_folder(path.resolve(), path.resolve())
    good, skipped, hashes, _ = validate_items(found.items)
    unknown = sorted({it.label for it in good} - set(labels))
    if unknown:
        raise EdgetlError(f"--labels {path}: class(es) {', '.join(map(repr, unknown))} are not labels of the run",
                          hint=f"the run knows: {', '.join(labels)}")
    if not good:
        raise EdgetlError(f"--labels {path}: no usable labelled images",
                          hint="pass a CSV with path,label columns, or a folder with one sub-folder per class")
    index = {lab: i for i, lab in enumerate(labels)}
    good.sort(key=lambda it: (it.label, it.rel))
    counts = {lab: sum(1 for it in good if it.label == lab) for lab in labels}
    return [(it.path, index[it.label]) for it in good], {
        "labels": str(path), "usable": len(good), "counts": counts, "skipped": found.missing + skipped,
        "links": links_report(found.links), "fingerprint": fingerprint(good, hashes)}


def _check_disjoint(run, labelled: Sequence[tuple[Path, int]]) -> None:
    held = {s.path.resolve() for name in ("val", "test") if name in run.split.get("splits", {})
            for s in run.samples(name)}
    both = [p for p, _ in labelled if Path(p).resolve() in held]
    if both:
        raise EdgetlError(f"--labels: {len(both)} labelled image(s) are in the run's validation/test split, e.g. "
                          f"{shown(str(both[0]))}", hint="fine-tune on other images: the run's held-out images must "
                                                         "stay held out (they are its test and the gate's checkset)")


# ------------------------------------------------------------------------------------------
# adaptation: the two steps
# ------------------------------------------------------------------------------------------

def batchnorms(model) -> list:
    import torch.nn as nn

    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _batch(ds, idx) -> Any:
    import torch

    return torch.from_numpy(np.stack([ds[int(i)][0] for i in idx]))


def adabn(model, paths: Sequence[Path], spec, *, batch_size: int = 32, device=None, reporter=None) -> dict[str, Any]:
    """Re-estimate every BatchNorm's running statistics on ``paths`` (AdaBN): reset, ``momentum=None``
    (a cumulative average over near-equal batches), BatchNorm in train mode, all else in eval mode,
    no gradients. Returns {"bn_layers", "images", "batches"}."""
    import torch

    from .data import ImageDataset

    bns = batchnorms(model)
    if not bns:
        raise EdgetlError("the run's model has no BatchNorm layer: there are no statistics to adapt",
                          hint="adapt it with --labels (fine-tuning), or use another backbone")
    device = device or torch.device("cpu")
    ds = ImageDataset([(Path(p), 0) for p in paths], spec)
    chunks = np.array_split(np.arange(len(ds)), math.ceil(len(ds) / max(1, batch_size)))
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    ctx = reporter.progress("BatchNorm statistics", len(ds)) if reporter else contextlib.nullcontext(lambda n: None)
    try:
        with ctx as advance, torch.no_grad():
            for idx in chunks:
                model(_batch(ds, idx).to(device))
                advance(len(idx))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.eval()
    return {"bn_layers": len(bns), "images": len(ds), "batches": len(chunks)}


def trainable_parameters(model, unfreeze: str) -> tuple[list, list]:
    """(head parameters, top layer group's parameters): what ``unfreeze`` lets train."""
    if unfreeze not in UNFREEZE:
        raise EdgetlError(f"--unfreeze {unfreeze!r} is not valid", hint=f"use one of: {', '.join(UNFREEZE)}")
    if not hasattr(model, "head") or not getattr(model, "layer_groups", None):
        raise EdgetlError("the run's model is not an edgetl backbone + head, so its head cannot be fine-tuned alone",
                          hint="adapt it without --labels (BatchNorm statistics only)")
    head = list(model.head.parameters())
    top = [p for m in model.layer_groups[-1] for p in m.parameters()] if unfreeze == "top" else []
    return head, top


def finetune(model, samples: Sequence[tuple[Path, int]], spec, *, unfreeze: str = "head", epochs: int = 10,
             lr: float = 1e-3, batch_size: int = 16, seed: int = 0, label_smoothing: float = 0.1, augment=None,
             device=None, reporter=None) -> list[dict[str, Any]]:
    """Fine-tune only the head (and the top layer group with ``unfreeze="top"``, at lr x 0.1) on
    ``samples``; every BatchNorm stays in eval mode, so no running statistic moves."""
    import torch
    import torch.nn.functional as F

    from .data import ImageDataset

    head, top = trainable_parameters(model, unfreeze)
    for p in model.parameters():
        p.requires_grad_(False)
    groups = []
    for params, rate in ((head, lr), (top, lr * 0.1)):
        for p in params:
            p.requires_grad_(True)
        groups += [{"params": [p for p in params if p.ndim > 1], "lr": rate, "weight_decay": 0.01},
                   {"params": [p for p in params if p.ndim <= 1], "lr": rate, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]])
    ds = ImageDataset(list(samples), spec, augment, seed=seed)
    ys = torch.tensor([y for _, y in samples])
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        model.eval()
        model.dropout.train()  # BatchNorm stays in eval mode: the (adapted) statistics do not move
        ds.epoch = epoch
        t0, total, correct = time.perf_counter(), 0.0, 0
        for idx in torch.randperm(len(ds), generator=gen).split(batch_size):
            x, y = _batch(ds, idx).to(device), ys[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.detach().argmax(1) == y).sum())
        history.append({"epoch": epoch + 1, "train_loss": total / len(ds), "train_accuracy": correct / len(ds),
                        "seconds": round(time.perf_counter() - t0, 2)})
        if reporter:
            reporter.log(f"fine-tune epoch {epoch + 1}/{epochs}  loss {history[-1]['train_loss']:.4f} "
                         f"acc {history[-1]['train_accuracy']:.3f}  {history[-1]['seconds']:.1f}s")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return history


# ------------------------------------------------------------------------------------------
# adaptation: the new run folder
# ------------------------------------------------------------------------------------------

def _source_config(run) -> dict[str, Any]:
    from .runs import CONFIG_FILE
    from .train import read_config_toml

    try:
        return read_config_toml(run.path / CONFIG_FILE) if (run.path / CONFIG_FILE).is_file() else {}
    except EdgetlError:
        return {}


def _augment_of(config: dict[str, Any], augment: bool):
    """The source run's augmentation strengths (its config.toml), or the defaults; None when off."""
    from .augment import AugmentConfig

    if not augment:
        return None
    keys = {"scale": "aug_scale", "hflip": "aug_hflip", "vflip": "aug_vflip", "rotate": "aug_rotate",
            "brightness": "aug_brightness", "contrast": "aug_contrast"}
    return AugmentConfig(**{k: config[v] for k, v in keys.items() if v in config})


def _source_metrics(run, device, reporter) -> dict[str, Any]:
    """The adapted model's metrics on the source run's own val/test splits (None where a split is
    empty or its images are gone)."""
    from .train import classification_metrics, run_logits

    out: dict[str, Any] = {}
    for name in ("val", "test"):
        samples = [(s.path, s.label) for s in run.samples(name)] if name in run.split.get("splits", {}) else []
        if not samples or not all(Path(p).is_file() for p, _ in samples):
            out[name] = None
            continue
        logits = run_logits(run, samples, device=str(device.type), workers=0, reporter=reporter)
        out[name] = classification_metrics([y for _, y in samples], logits.argmax(1), run.manifest.labels)
    return out


def _split_with_adaptation(run, images: Sequence[Item], labelled: Sequence[tuple[Path, int]]) -> dict[str, Any]:
    split = json.loads(json.dumps(run.split))
    split.setdefault("splits", {}).setdefault("train", [])
    labels = run.manifest.labels
    split["splits"]["train"] += [{"path": str(p), "label": labels[y]} for p, y in labelled]
    split["adaptation"] = {"images": [str(it.path) for it in images],
                           "labelled": [{"path": str(p), "label": labels[y]} for p, y in labelled]}
    return split


def _write_adapted(out: Path, overwrite: bool, run, model, split: dict[str, Any], metrics: dict[str, Any],
                   record: dict[str, Any], report: dict[str, Any]) -> None:
    from .fsutil import atomic_output_dir
    from .runs import CONFIG_FILE, DATA_REPORT_FILE, METRICS_FILE, SPLIT_FILE, load_run, save_weights
    from .runtime.manifest import Manifest, seal

    summary = lambda m: None if m is None else {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],  # noqa: E731
                                               "per_class_recall": m["per_class_recall"], "n": m["n"]}
    src = run.manifest
    training = {**dict(src.training), "metrics": {"val": summary(metrics["val"]), "test": summary(metrics["test"])},
                "metrics_of": "the adapted model on the source run's val/test splits", "adaptation": record}
    with atomic_output_dir(out, overwrite=overwrite) as d:
        save_weights(model.to("cpu"), d)
        (d / SPLIT_FILE).write_text(json.dumps(split, indent=1) + "\n")
        if (run.path / CONFIG_FILE).is_file():
            (d / CONFIG_FILE).write_bytes((run.path / CONFIG_FILE).read_bytes())
        (d / DATA_REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        (d / METRICS_FILE).write_text(json.dumps(metrics, indent=1) + "\n")
        seal(d, Manifest(kind="run", labels=src.labels, preprocess=src.preprocess, task=src.task,
                         backbone=dict(src.backbone), training=training))
        load_run(d)  # the run contract every later stage relies on


def adapt_run(run_path: str | Path, images: str | Path, out: str | Path, *, labels: str | Path | None = None,
              epochs: int = 10, unfreeze: str = "head", use_adabn: bool = True, lr: float = 1e-3,
              batch_size: int = 16, seed: int = 0, augment: bool = True, device: str = "auto",
              overwrite: bool = False, reporter=None) -> dict[str, Any]:
    """Adapt a run to the images of a new domain into a new run folder ``out``; returns its
    ``manifest.training.adaptation`` record. Every input is checked before anything is written."""
    import torch

    from .fsutil import check_output_dir
    from .train import Reporter, resolve_device

    rep = reporter or Reporter()
    out = Path(out)
    if not use_adabn and labels is None:
        raise EdgetlError("--no-bn-stats without --labels: nothing to adapt",
                          hint="drop --no-bn-stats (BatchNorm statistics), or pass --labels to fine-tune")
    if labels is not None and epochs < 1:
        raise EdgetlError(f"--epochs {epochs}: fine-tuning needs at least 1 epoch", hint="e.g. --epochs 10")
    if not (lr > 0 and batch_size >= 1):
        raise EdgetlError(f"--lr {lr} / --batch-size {batch_size}: need lr > 0 and a batch of at least 1")
    check_output_dir(out, overwrite)
    run = _classification_run(run_path)
    items, report = unlabelled_images(images)
    labelled, lab_report = labelled_images(labels, run.manifest.labels) if labels is not None else ([], None)
    if labelled:
        trainable_parameters(run.model, unfreeze)
        _check_disjoint(run, labelled)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    t0 = time.time()
    model, spec = run.model.to(dev), run.manifest.preprocess
    bn = adabn(model, [it.path for it in items], spec, batch_size=batch_size, device=dev, reporter=rep) if use_adabn else None
    history = []
    config = _source_config(run)
    if labelled:
        history = finetune(model, labelled, spec, unfreeze=unfreeze, epochs=epochs, lr=lr, batch_size=batch_size,
                           seed=seed, label_smoothing=float(config.get("label_smoothing", 0.1)),
                           augment=_augment_of(config, augment), device=dev, reporter=rep)
    method = "+".join((["adabn"] if use_adabn else []) + ([f"finetune-{unfreeze}"] if labelled else []))
    record = {"method": method, "source_run": str(run_path), "source_digest": run.manifest.digest,
              "images": len(items), "images_dir": str(images), "images_fingerprint": report["fingerprint"],
              "bn_layers": bn["bn_layers"] if bn else 0, "labelled": len(labelled),
              "labels": str(labels) if labels is not None else None,
              "labels_fingerprint": lab_report["fingerprint"] if lab_report else None,
              "epochs": epochs if labelled else 0, "unfreeze": unfreeze if labelled else None,
              "lr": lr if labelled else None, "augment": bool(labelled) and augment, "seed": seed,
              "device": str(dev), "time_s": round(time.time() - t0, 2), "torch": torch.__version__}
    metrics = {"labels": list(run.manifest.labels), **_source_metrics(run, dev, rep), "history": history,
               "adaptation": record, "source_metrics": dict(run.manifest.training).get("metrics")}
    _write_adapted(out, overwrite, run, model, _split_with_adaptation(run, items, labelled), metrics, record,
                   {"images": report, "labelled": lab_report})
    rep.log(f"wrote {out} ({method}: {len(items)} images" + (f", {len(labelled)} labelled, {epochs} epochs" if labelled
                                                            else "") + f"; {record['time_s']:.0f}s)")
    return record
