"""K-fold cross-validation of a training recipe (``edgetl train DATA --cv K``).

The usable images of DATA (decoded once, as ``load_data`` does) are dealt into K folds, stratified
by class (sklearn's ``StratifiedKFold``) or, with ``group_by``, stratified and group-aware
(``StratifiedGroupKFold``: every image of a group lands in the same fold, so near-duplicates, or
the crops of one object, never sit on both sides of a split). A group is the value of a column of
DATA's CSV (``group_by="COLUMN"``) or the first group (else the whole match) of a regular
expression searched in each image's path relative to the data root (``group_by="re:REGEX"``).

Fold i trains on the other K-1 folds, with a validation part carved out of them (stratified,
group-aware with groups; ``val_fraction`` of the pool) for early stopping, and is tested on fold
i. Each fold is an ordinary run folder ``OUT/fold-<i>`` written by :func:`edgetl.train.run_training`
from a CSV ``OUT/splits/fold-<i>.csv`` (``path,label,split`` with absolute paths, plus the source
CSV's other columns, so ``edgetl eval OUT/fold-1 --by COLUMN`` works): no private hook into
training, the run contract is unchanged. ``refit`` trains on all the data (validation carved the
same way, no test part) into ``OUT/refit``.

With cached feature-extract (``mode="feature-extract"``, ``cache``) the frozen backbone runs once
over all the images and each fold's feature file is written where its training looks for it
(:func:`share_features`): K folds cost one backbone pass instead of K (ELPV, 5 folds, 2 busy AVX2
cores: 10.5 min in all instead of about 5 backbone passes).

``OUT`` is owned like every edgetl folder (:mod:`edgetl.artifact`): ``folder_lock(OUT)`` for the
whole cross-validation, ``cv_plan.json`` (the recipe, the data fingerprint and the folds) written
first, ``cv.json`` written atomically last. Re-running the same command resumes: a fold whose run
folder verifies and holds exactly the planned split is kept, an interrupted fold resumes from its
checkpoint; a different recipe or data in the same OUT is refused (``overwrite`` starts over).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data import MIN_PER_CLASS, Item, discover, fingerprint, open_csv, stratified_split, validate_items
from .runtime.errors import EdgetlError, MissingDependencyError

CV_FILE = "cv.json"
PLAN_FILE = "cv_plan.json"
SPLITS_DIR = "splits"
REFIT = "refit"
# config keys that do not change what a fold learns: they may differ when a cross-validation resumes
_MAY_DIFFER = ("data", "out", "val", "test", "test_fraction", "device", "num_workers", "amp", "cache_dir")


# ------------------------------------------------------------------------------------------
# the data: usable items, their CSV columns, their groups
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Pool:
    """The usable images of DATA, their extra CSV columns and (with ``group_by``) their groups."""

    data: Path
    items: list[Item]
    fingerprint: str
    columns: list[str]  # the source CSV's columns besides path/label/split (empty for a folder)
    extra: dict[Path, dict[str, str]]  # absolute path -> those columns' values
    groups: list[str] | None
    skipped: int = 0  # files that could not be decoded (not in any fold)


def read_table(csv_path: Path) -> tuple[list[str], dict[Path, dict[str, str]]]:
    """Every column of a ``path,label,...`` CSV, keyed by the image's absolute path (resolved as
    :func:`edgetl.data.read_csv_items` resolves it); column names lower-cased and stripped."""
    root, reader = open_csv(csv_path)
    columns = [(c or "").strip().lower() for c in (reader.fieldnames or [])]
    table: dict[Path, dict[str, str]] = {}
    for row in reader:
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        if row.get("path"):
            p = Path(row["path"])
            table[(p if p.is_absolute() else root / p).resolve()] = row
    return columns, table


def _regex_groups(items: Sequence[Item], pattern: str) -> list[str]:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise EdgetlError(f"--group-by re:{pattern}: not a valid regular expression ({exc})",
                          hint="e.g. --group-by 're:^[^/]+/(\\w+?)_\\d+' (the first group names the group)") from None
    keys, missing = [], []
    for it in items:
        m = rx.search(it.rel)
        if m is None:
            missing.append(it.rel)
            continue
        keys.append(m.group(1) if rx.groups else m.group(0))
    if missing:
        raise EdgetlError(f"--group-by re:{pattern}: {len(missing)} image path(s) do not match, e.g. {missing[0]!r}",
                          hint="the regular expression is searched in each path relative to the data folder; "
                               "make it match every image")
    return keys


def _column_groups(items: Sequence[Item], column: str, data: Path, columns: list[str],
                   extra: dict[Path, dict[str, str]]) -> list[str]:
    if data.suffix.lower() != ".csv":
        raise EdgetlError(f"--group-by {column}: DATA {data} is a folder, so it has no column {column!r}",
                          hint="pass a CSV with path,label and that column as DATA (e.g. data/elpv/elpv_meta.csv), "
                               "or group by path with --group-by 're:REGEX'")
    if column not in columns:
        raise EdgetlError(f"--group-by {column}: {data} has no column {column!r} (columns: {', '.join(columns)})",
                          hint="name one of the CSV's columns, or group by path with --group-by 're:REGEX'")
    keys = [extra[it.path].get(column, "") for it in items]
    empty = [it.rel for it, k in zip(items, keys) if not k]
    if empty:
        raise EdgetlError(f"--group-by {column}: {len(empty)} row(s) of {data} have no {column!r} value, e.g. {empty[0]!r}",
                          hint="give every row a group (each image may be its own group)")
    return keys


def read_pool(data: str | Path, group_by: str | None) -> Pool:
    """Discover and decode DATA once (folder, split folders or CSV: every image is pooled) and
    compute the groups. Raises EdgetlError for a bad ``group_by``."""
    data = Path(data)
    found = discover(data)
    good, skipped, hashes, _ = validate_items(found.items)
    good.sort(key=lambda it: (it.label, it.rel))
    columns, extra = ([], {})
    if data.is_file():
        columns, extra = read_table(data)
    groups = None
    if group_by is not None:
        if not group_by.strip() or group_by.strip() == "re:":
            raise EdgetlError("--group-by is empty", hint="give a CSV column name, or re:REGEX on the image paths")
        groups = (_regex_groups(good, group_by[3:]) if group_by.startswith("re:")
                  else _column_groups(good, group_by.strip().lower(), data, columns, extra))
    columns = [c for c in columns if c not in ("path", "label", "split")]
    return Pool(data, good, fingerprint(good, hashes), columns, extra, groups, len(skipped) + len(found.missing))


# ------------------------------------------------------------------------------------------
# folds
# ------------------------------------------------------------------------------------------

def _splitter(k: int, grouped: bool, seed: int):
    try:
        from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    except ImportError:
        raise MissingDependencyError("scikit-learn", "train", "edgetl train --cv (stratified k-fold)") from None
    cls = StratifiedGroupKFold if grouped else StratifiedKFold
    return cls(n_splits=k, shuffle=True, random_state=seed)


def assign_folds(labels: Sequence[str], groups: Sequence[str] | None, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each item: stratified by label, groups whole when given."""
    y = np.asarray(labels)
    fold = np.full(len(y), -1, dtype=np.int64)
    with warnings.catch_warnings():  # sklearn warns about small classes: checked by the caller
        warnings.simplefilter("ignore")
        splits = _splitter(k, groups is not None, seed).split(np.zeros(len(y)), y, groups)
        for i, (_, test) in enumerate(splits):
            fold[test] = i
    return fold


def carve_val(items: Sequence[Item], groups: Sequence[str] | None, fraction: float,
              seed: int) -> tuple[list[Item], list[Item]]:
    """(train, val) of a training pool: ``fraction`` for validation, stratified; with groups, one
    fold of a ``round(1 / fraction)``-fold group-aware split (groups whole)."""
    if groups is None:
        parts = stratified_split(items, {"val": fraction}, seed)
        return parts["train"], parts["val"]
    n = min(max(2, round(1 / max(fraction, 1e-9))), len(set(groups)))
    if n < 2:
        return list(items), []
    fold = assign_folds([it.label for it in items], groups, n, seed)
    return [it for it, f in zip(items, fold) if f != 0], [it for it, f in zip(items, fold) if f == 0]


def _check_counts(pool: Pool, k: int) -> None:
    if k < 2:
        raise EdgetlError(f"--cv {k}: cross-validation needs at least 2 folds", hint="e.g. --cv 5")
    counts: dict[str, int] = {}
    for it in pool.items:
        counts[it.label] = counts.get(it.label, 0) + 1
    if len(counts) < 2:
        raise EdgetlError(f"{pool.data}: found {len(counts)} class(es) with usable images; training needs at least 2",
                          hint="put each class's images in its own sub-folder, or pass a CSV with path,label")
    small = min(counts, key=lambda c: (counts[c], c))
    if counts[small] < k:
        raise EdgetlError(f"--cv {k}: class {small!r} has {counts[small]} usable image(s), fewer than the {k} folds "
                          "(every fold's test part needs each class)", hint=f"use --cv {max(2, counts[small])} or fewer, "
                          "or add images to that class")
    if pool.groups is not None and len(set(pool.groups)) < k:
        raise EdgetlError(f"--cv {k}: --group-by found {len(set(pool.groups))} group(s), fewer than the {k} folds",
                          hint=f"use --cv {len(set(pool.groups))} or fewer, or a finer grouping")


def plan_folds(pool: Pool, k: int, val_fraction: float, seed: int) -> list[dict[str, list[Item]]]:
    """K folds, each ``{"train", "val", "test"}``. Raises EdgetlError when a fold would train
    without enough images of a class or without validation images."""
    _check_counts(pool, k)
    fold = assign_folds([it.label for it in pool.items], pool.groups, k, seed)
    group_of = dict(zip((it.path for it in pool.items), pool.groups)) if pool.groups is not None else None
    folds = []
    for i in range(k):
        rest = [it for it, f in zip(pool.items, fold) if f != i]
        train, val = carve_val(rest, [group_of[it.path] for it in rest] if group_of else None, val_fraction, seed)
        folds.append({"train": train, "val": val, "test": [it for it, f in zip(pool.items, fold) if f == i]})
        _check_fold(f"fold {i + 1}", folds[-1], {it.label for it in pool.items})
    return folds


def refit_split(pool: Pool, val_fraction: float, seed: int) -> dict[str, list[Item]]:
    """All the data: train + a validation part carved the same way as in the folds; no test."""
    train, val = carve_val(pool.items, pool.groups, val_fraction, seed)
    split = {"train": train, "val": val, "test": []}
    _check_fold("the refit", split, {it.label for it in pool.items})
    return split


def _check_fold(name: str, split: dict[str, list[Item]], labels: set[str]) -> None:
    counts = {lab: 0 for lab in labels}
    for it in split["train"]:
        counts[it.label] += 1
    for lab in sorted(labels):
        if counts[lab] < MIN_PER_CLASS:
            raise EdgetlError(f"--cv: {name} would train on {counts[lab]} image(s) of class {lab!r} "
                              f"(at least {MIN_PER_CLASS} needed)",
                              hint="use fewer folds, a finer --group-by, or add images to that class")
    if not split["val"]:
        raise EdgetlError(f"--cv: {name} has no validation images", hint="raise --val-fraction, or add images")


# ------------------------------------------------------------------------------------------
# the output folder: plan, fold CSVs, finished folds
# ------------------------------------------------------------------------------------------

def _recipe(cfg) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in _MAY_DIFFER}


def make_plan(cfg, pool: Pool, k: int, group_by: str | None, folds: list[dict[str, list[Item]]]) -> dict[str, Any]:
    return {"format": 1, "kind": "edgetl cross-validation", "k": k, "group_by": group_by,
            "split_seed": cfg.split_seed, "val_fraction": cfg.val_fraction, "data_fingerprint": pool.fingerprint,
            "recipe": _recipe(cfg), "folds": [sorted(it.rel for it in f["test"]) for f in folds]}


def prepare_out(out: Path, plan: dict[str, Any], overwrite: bool) -> list[str]:
    """Create OUT (or take up the cross-validation there) and write the plan; returns notes.
    Call with OUT's lock held."""
    from .artifact import take_up_plan_folder

    def describe(key: str, old: Any, new: Any) -> str | None:
        if key != "recipe" or not isinstance(old, dict):
            return None
        k = next(k for k in new if old.get(k) != new[k])
        return f"recipe ({k} = {old.get(k)!r} there, {new[k]!r} now)"

    notes = take_up_plan_folder(out, plan, overwrite, "cross-validation", PLAN_FILE, _PLAN_WORDS, describe)
    (out / SPLITS_DIR).mkdir(parents=True, exist_ok=True)
    return notes


_PLAN_WORDS = {"k": "number of folds (--cv)", "group_by": "--group-by", "split_seed": "--split-seed",
               "val_fraction": "--val-fraction", "data_fingerprint": "data (its images differ)",
               "folds": "fold assignment", "format": "plan format", "kind": "kind of folder"}


def split_csv(split: dict[str, list[Item]], pool: Pool) -> str:
    """The fold's CSV: ``path,label,split`` (absolute paths) and the source CSV's other columns,
    plus ``cv_group`` with groups from a path regex."""
    extra = list(pool.columns)
    group_of = dict(zip((it.path for it in pool.items), pool.groups)) if pool.groups is not None else {}
    add_group = bool(group_of) and "cv_group" not in extra
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "split", *extra, *(["cv_group"] if add_group else [])])
    for name in ("train", "val", "test"):
        for it in split[name]:
            row = pool.extra.get(it.path, {})
            w.writerow([str(it.path), it.label, name, *(row.get(c, "") for c in extra),
                        *([group_of[it.path]] if add_group else [])])
    return buf.getvalue()


def finished(folder: Path, split: dict[str, list[Item]]) -> bool:
    """A run folder that verifies as a whole and holds ``split``: the same validation images, the
    same test images when the plan has some, and the same images in training + test (the refit
    plans no test part, yet training's split still draws one image per class into it)."""
    from .runs import SPLIT_FILE
    from .runtime.manifest import open_verified

    try:
        open_verified(folder, "run", hint="")
        recorded = json.loads((folder / SPLIT_FILE).read_text())
    except (EdgetlError, OSError, ValueError):
        return False
    root = Path(recorded.get("root", "."))
    have = {name: {(str(root / r["path"]), r["label"]) for r in recorded.get("splits", {}).get(name, [])}
            for name in ("train", "val", "test")}
    want = {name: {(str(it.path), it.label) for it in split[name]} for name in ("train", "val", "test")}
    return (have["val"] == want["val"] and (not want["test"] or have["test"] == want["test"])
            and have["train"] | have["test"] == want["train"] | want["test"])


def write_split(name: str, split: dict[str, list[Item]], pool: Pool, out: Path) -> Path:
    """``OUT/splits/NAME.csv`` (atomically)."""
    from .runtime.manifest import atomic_write

    path = out / SPLITS_DIR / f"{name}.csv"
    try:
        atomic_write(path, split_csv(split, pool))
    except UnicodeEncodeError:
        raise EdgetlError(f"{pool.data}: an image path is not valid UTF-8, which a CSV cannot hold",
                          hint="rename the file(s) to UTF-8 names (e.g. with `convmv -f latin1 -t utf8`)") from None
    return path


def run_fold(name: str, split: dict[str, list[Item]], cfg, out: Path, rep, cache_dir: Path | None = None) -> dict[str, Any]:
    """Train one fold's run folder ``OUT/NAME`` from ``OUT/splits/NAME.csv`` (kept if already
    finished; an interrupted one resumes)."""
    from .runs import CHECKPOINT_FILE, METRICS_FILE, partial_dir
    from .runtime.manifest import read_manifest
    from .train import run_training

    folder = out / name
    status = "kept (finished before)"
    if not finished(folder, split):
        resume = (partial_dir(folder) / CHECKPOINT_FILE).is_file()
        rep.log(f"--- {name}: train {len(split['train'])}, val {len(split['val'])}, test {len(split['test'])}"
                + (" (resuming its interrupted training)" if resume else ""))
        fcfg = dataclasses.replace(cfg, data=str((out / SPLITS_DIR / f"{name}.csv").resolve()), out=str(folder), val=None,
                                   test=None, test_fraction=0.0 if not split["test"] else cfg.test_fraction,
                                   cache_dir=str(cache_dir) if cache_dir else cfg.cache_dir)
        run_training(fcfg, resume=resume, overwrite=True, reporter=rep)
        status = "resumed" if resume else "trained"
    else:
        rep.log(f"--- {name}: finished before, kept")
    m = json.loads((folder / METRICS_FILE).read_text())
    test = m.get("test")
    counts = {s: sum(c.values()) for s, c in read_manifest(folder).training["class_counts"].items()}
    return {"run": name, "status": status, "n_train": counts["train"], "n_val": counts["val"],
            "n_test": counts["test"], "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
            "train_time_s": round(float(m["train_time_s"]), 2),
            "accuracy": test["accuracy"] if test else None, "macro_f1": test["macro_f1"] if test else None,
            "confusion": test["confusion"] if test else None,
            "val_accuracy": m["val"]["accuracy"], "val_macro_f1": m["val"]["macro_f1"]}


# ------------------------------------------------------------------------------------------
# cached feature-extract: the frozen backbone runs once for all folds
# ------------------------------------------------------------------------------------------

FEATURE_CACHE = "feature-cache"


def share_features(cfg, pool: Pool, pending: dict[str, tuple[Path, dict[str, list[Item]]]], cache: Path, rep) -> int:
    """With cached feature-extract, compute every image's backbone features once and write each
    pending fold's feature file where its training looks for it (``cache``): K folds cost one pass
    of the backbone instead of K. ``pending``: name -> (fold CSV, split). Returns files written."""
    import torch
    from safetensors.torch import save_file

    from .backbones import build_classifier, get_backbone
    from .data import ImageDataset, load_data
    from .train import eval_batch_size, feature_cache_path, resolve_device, resolve_spec, run_model

    spec = resolve_spec(get_backbone(cfg.backbone).preprocess, cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # as training seeds before building (a random-init backbone is the same one)
    model, built = build_classifier(cfg.backbone, len({it.label for it in pool.items}), cfg.pretrained, cfg.weights,
                                    cfg.dropout)
    model.to(device).eval()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    todo = {}
    for name, (csv_path, split) in pending.items():
        data = load_data(csv_path, val_fraction=cfg.val_fraction, test_fraction=0.0 if not split["test"]
                         else cfg.test_fraction, seed=cfg.split_seed)
        path = feature_cache_path(cache, cfg, data, built, spec)
        if not path.is_file():
            todo[path] = data
    if not todo:
        return 0
    t0 = time.perf_counter()
    ds = ImageDataset([(it.path, 0) for it in pool.items], spec)
    feats = run_model(model.backbone, ds, batch_size=eval_batch_size(device, cfg.batch_size), workers=cfg.workers,
                      device=device, channels_last=cfg.channels_last, amp=cfg.amp and device.type == "cuda",
                      reporter=rep, desc="features (all folds)")
    row = {it.path: i for i, it in enumerate(pool.items)}
    rep.log(f"features: {len(ds)} images through the frozen backbone once for {len(todo)} run(s) in "
            f"{time.perf_counter() - t0:.1f}s")
    cache.mkdir(parents=True, exist_ok=True)
    for path, data in todo.items():
        tensors = {s: feats[[row[it.path] for it in data.splits[s]]].contiguous() for s in ("train", "val", "test")}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)
    return len(todo)


# ------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and the sample standard deviation (ddof 1) across folds."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def pooled(confusions: Sequence[Sequence[Sequence[int]]], labels: Sequence[str]) -> dict[str, Any]:
    """Metrics of every image's held-out prediction (each image is tested exactly once)."""
    from .train import classification_metrics

    cm = np.sum(np.asarray(confusions, dtype=np.int64), axis=0)
    t, p = np.nonzero(cm)
    reps = cm[t, p]
    m = classification_metrics(np.repeat(t, reps), np.repeat(p, reps), labels)
    return {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "per_class_recall": m["per_class_recall"], "confusion": m["confusion"]}


def format_cv(cv: dict[str, Any]) -> str:
    """The printed table: one row per fold, mean ± std, the pooled held-out metrics."""
    lines = [f"cross-validation: {cv['k']} folds of {cv['data']} ({cv['folding']}), recipe: {cv['recipe_text']}",
             f"{'fold':<10}{'train':>7}{'val':>6}{'test':>6}{'best ep':>9}{'accuracy':>10}{'macro-F1':>10}{'time s':>9}"
             "  status"]
    for f in cv["folds"]:
        lines.append(f"{f['run']:<10}{f['n_train']:>7}{f['n_val']:>6}{f['n_test']:>6}{f['best_epoch']:>9}"
                     f"{f['accuracy']:>10.4f}{f['macro_f1']:>10.4f}{f['train_time_s']:>9.1f}  {f['status']}")
    a, f1 = cv["accuracy"], cv["macro_f1"]
    lines.append(f"{'mean ± std (sample, over folds)':<38}{a['mean']:.4f} ± {a['std']:.4f}   "
                 f"macro-F1 {f1['mean']:.4f} ± {f1['std']:.4f}")
    p = cv["pooled"]
    lines.append(f"{'pooled (each image held out once)':<38}{p['accuracy']:.4f}            macro-F1 {p['macro_f1']:.4f}"
                 f"   (n={p['n']})")
    if cv.get("refit"):
        r = cv["refit"]
        lines.append(f"refit on all data: {r['run']} (train {r['n_train']}, val {r['n_val']}, test {r['n_test']}; "
                     f"val accuracy {r['val_accuracy']:.4f}, macro-F1 {r['val_macro_f1']:.4f}; {r['status']})")
    return "\n".join(lines)


def _recipe_text(cfg) -> str:
    text = f"{cfg.backbone} ({cfg.pretrained}) {cfg.mode}, {cfg.epochs} epochs, lr {cfg.lr:g}, batch {cfg.batch_size}"
    if cfg.mode == "feature-extract":
        text += ", cached features" if cfg.cached else ", frozen backbone every step"
    return text + f", augment {'on' if cfg.augment else 'off'}, seed {cfg.seed}"


# ------------------------------------------------------------------------------------------
# the whole cross-validation
# ------------------------------------------------------------------------------------------

def run_all(cfg, pool: Pool, folds: list[dict[str, list[Item]]], full: dict[str, list[Item]] | None, out: Path,
            rep) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Every fold (and the refit): split CSVs, the shared features (cached feature-extract), training."""
    runs = {f"fold-{i + 1}": f for i, f in enumerate(folds)} | ({REFIT: full} if full is not None else {})
    pending = {name: (write_split(name, split, pool, out), split) for name, split in runs.items()
               if not finished(out / name, split)}
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / FEATURE_CACHE
    shared = bool(pending) and cfg.cached
    if shared:
        share_features(cfg, pool, pending, cache, rep)
    rows = {name: run_fold(name, split, cfg, out, rep, cache if shared else None) for name, split in runs.items()}
    if not cfg.cache_dir:
        shutil.rmtree(out / FEATURE_CACHE, ignore_errors=True)  # ours: the runs hold what they learned
    return [rows[f"fold-{i + 1}"] for i in range(len(folds))], rows.get(REFIT)


def cross_validate(cfg, k: int, group_by: str | None = None, refit: bool = False, out: str | Path | None = None, *,
                   overwrite: bool = False, reporter=None) -> dict[str, Any]:
    """Run a K-fold cross-validation of the recipe ``cfg`` (a TrainConfig; ``cfg.data`` the data)
    into ``out`` (default ``cfg.out``); returns what ``OUT/cv.json`` holds."""
    from .artifact import folder_lock
    from .runtime.manifest import atomic_write
    from .train import Reporter, validate_config

    rep = reporter or Reporter()
    out = Path(out if out is not None else (cfg.out or ""))
    if not str(out) or str(out) == ".":
        raise EdgetlError("no output folder given", hint="pass --out runs/NAME-cv")
    if not cfg.data:
        raise EdgetlError("no training data given", hint="edgetl train DATA --cv 5 --out runs/NAME-cv")
    if cfg.val or cfg.test:
        raise EdgetlError(f"--{'val' if cfg.val else 'test'} cannot be used with --cv (every fold makes its own parts)",
                          hint="put all labelled images in DATA and drop --val/--test")
    cfg = validate_config(cfg)
    t0 = time.time()
    pool = read_pool(cfg.data, group_by)
    folds = plan_folds(pool, k, cfg.val_fraction, cfg.split_seed)
    full = refit_split(pool, cfg.val_fraction, cfg.split_seed) if refit else None
    plan = make_plan(cfg, pool, k, group_by, folds)
    labels = sorted({it.label for it in pool.items})
    with folder_lock(out):
        for note in prepare_out(out, plan, overwrite):
            rep.log(note)
        rows, refit_row = run_all(cfg, pool, folds, full, out, rep)
        cv = {"format": 1, "k": k, "data": str(cfg.data), "data_fingerprint": pool.fingerprint,
              "group_by": group_by, "groups": len(set(pool.groups)) if pool.groups is not None else None,
              "folding": ("stratified, group-aware (sklearn StratifiedGroupKFold)" if pool.groups is not None
                          else "stratified (sklearn StratifiedKFold)") + f", seed {cfg.split_seed}",
              "val_fraction": cfg.val_fraction, "labels": labels, "recipe": _recipe(cfg),
              "recipe_text": _recipe_text(cfg), "folds": rows,
              "accuracy": mean_std([r["accuracy"] for r in rows]), "macro_f1": mean_std([r["macro_f1"] for r in rows]),
              "std": "sample standard deviation over the folds (ddof 1)",
              "pooled": pooled([r["confusion"] for r in rows], labels), "refit": refit_row,
              "skipped_images": pool.skipped, "time_s": round(time.time() - t0, 1)}
        atomic_write(out / CV_FILE, json.dumps(cv, indent=1) + "\n")
    rep.log(format_cv(cv))
    rep.log(f"wrote {out / CV_FILE}")
    return cv
