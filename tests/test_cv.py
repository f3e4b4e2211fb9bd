"""Cross-validation (``edgetl.cv``, ``edgetl train --cv``): folds, groups, the summary, resuming, bad input.

The data: two classes of generated images, 6 objects per class and 2 near-duplicate images per
object (``<class>/obj<g>_<j>.png``), so grouping by object is what keeps duplicates together.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import click
import cv2
import numpy as np
import pytest

from conftest import make_class_image
from edgetl.cli import COMMANDS, main
from edgetl.commands.cv_options import cv_options, pop_cv_options, run_cv_if_asked
from edgetl.cv import CV_FILE, PLAN_FILE, cross_validate, plan_folds, read_pool
from edgetl.runtime.errors import EdgetlError

CLASSES = ("disc", "stripes")
GROUP_RE = r"re:^(\w+/obj\d+)_"
TINY = dict(backbone="tiny_cnn", pretrained="none", epochs=2, lr=1e-2, augment=False, num_workers=0, device="cpu",
            amp=False, channels_last=False, patience=0, label_smoothing=0.0, warmup_epochs=0)


def write_grouped(root: Path, objects: int = 6, dups: int = 2, seed: int = 0) -> Path:
    """``root/<class>/obj<g>_<j>.png`` plus ``root/meta.csv`` (path,label,obj,site)."""
    rng = np.random.default_rng(seed)
    rows = []
    for ci, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for g in range(objects):
            base = make_class_image(ci, rng, 40)
            for j in range(dups):
                rel = f"{name}/obj{g}_{j}.png"
                cv2.imwrite(str(root / rel), np.clip(base.astype(np.int16) + j, 0, 255).astype(np.uint8))
                rows.append([rel, name, f"{name}-{g}", "north" if g % 2 else "south"])
    with open(root / "meta.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "obj", "site"])
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_grouped(tmp_path_factory.mktemp("cvdata") / "images")


def tiny_cfg(data: Path, **kw):
    from edgetl.train import TrainConfig

    return TrainConfig(data=str(data), **{**TINY, **kw})


def _check_partition(pool, folds, k: int) -> None:
    everything = {it.path for it in pool.items}
    tests = [{it.path for it in f["test"]} for f in folds]
    assert len(folds) == k
    assert set().union(*tests) == everything and sum(map(len, tests)) == len(everything)  # disjoint, covering
    for f, test in zip(folds, tests):
        train, val = {it.path for it in f["train"]}, {it.path for it in f["val"]}
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == everything and val  # the rest of the data trains (minus validation)


def test_folds_are_disjoint_cover_everything_and_are_stratified(data):
    pool = read_pool(data, None)
    folds = plan_folds(pool, 3, 0.15, seed=0)
    _check_partition(pool, folds, 3)
    for f in folds:  # 12 per class over 3 folds: exactly 4 of each class in every test part
        assert Counter(it.label for it in f["test"]) == {"disc": 4, "stripes": 4}
        assert set(Counter(it.label for it in f["val"])) == set(CLASSES)
    again = plan_folds(read_pool(data, None), 3, 0.15, seed=0)
    assert [[it.rel for it in f["test"]] for f in again] == [[it.rel for it in f["test"]] for f in folds]


@pytest.mark.parametrize("group_by", [GROUP_RE, "obj"])
def test_groups_never_split_across_folds_or_into_validation(data, group_by):
    pool = read_pool(data / "meta.csv" if group_by == "obj" else data, group_by)
    assert len(set(pool.groups)) == 12
    group_of = dict(zip((it.path for it in pool.items), pool.groups))
    folds = plan_folds(pool, 3, 0.2, seed=0)
    _check_partition(pool, folds, 3)
    for f in folds:
        sides = {name: {group_of[it.path] for it in f[name]} for name in ("train", "val", "test")}
        assert not (sides["train"] & sides["test"]) and not (sides["val"] & sides["test"])
        assert not (sides["train"] & sides["val"])  # near-duplicates do not validate each other either
        assert Counter(it.label for it in f["test"]) == {"disc": 4, "stripes": 4}  # still stratified


def test_a_regex_names_its_first_group_or_the_whole_match(data):
    whole = read_pool(data, r"re:obj\d+").groups  # no group: the match; obj0 of both classes = one group
    assert len(set(whole)) == 6
    with pytest.raises(EdgetlError, match="do not match"):
        read_pool(data, r"re:^nomatch")


def test_mean_std_and_pooled_metrics():
    from edgetl.cv import mean_std, pooled

    assert mean_std([0.5, 0.75, 1.0]) == {"mean": 0.75, "std": 0.25}  # sample std (ddof 1), not 0.204
    p = pooled([[[3, 1], [0, 4]], [[2, 2], [1, 3]]], ["a", "b"])  # two folds' confusions, summed
    assert p["n"] == 16 and p["confusion"] == [[5, 3], [1, 7]] and p["accuracy"] == 12 / 16
    f1_a, f1_b = 2 * 5 / (2 * 5 + 3 + 1), 2 * 7 / (2 * 7 + 1 + 3)
    assert p["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)


def test_cross_validate_summary_resume_and_lock(data, tmp_path):
    out = tmp_path / "cv"
    cv = cross_validate(tiny_cfg(data), 3, GROUP_RE, refit=True, out=out)
    assert sorted(p.name for p in out.iterdir()) == [CV_FILE, PLAN_FILE, "fold-1", "fold-2", "fold-3", "refit", "splits"]
    on_disk = json.loads((out / CV_FILE).read_text())
    assert on_disk == json.loads(json.dumps(cv))
    acc, f1 = [], []
    from edgetl.runs import load_run

    confusion = np.zeros((2, 2), dtype=np.int64)
    for i, row in enumerate(cv["folds"], start=1):
        m = json.loads((out / f"fold-{i}" / "metrics.json").read_text())["test"]
        assert (row["accuracy"], row["macro_f1"], row["n_test"]) == (m["accuracy"], m["macro_f1"], 8)
        acc.append(m["accuracy"])
        f1.append(m["macro_f1"])
        confusion += np.asarray(m["confusion"])
        load_run(out / f"fold-{i}")  # each fold is an ordinary run folder
    assert cv["accuracy"]["mean"] == pytest.approx(np.mean(acc)) and cv["accuracy"]["std"] == pytest.approx(np.std(acc, ddof=1))
    assert cv["macro_f1"]["mean"] == pytest.approx(np.mean(f1)) and cv["macro_f1"]["std"] == pytest.approx(np.std(f1, ddof=1))
    assert cv["pooled"]["n"] == 24 and cv["pooled"]["confusion"] == confusion.tolist()
    assert cv["pooled"]["accuracy"] == pytest.approx(np.trace(confusion) / 24)
    assert cv["refit"]["n_train"] + cv["refit"]["n_val"] + cv["refit"]["n_test"] == 24
    rows = list(csv.DictReader((out / "splits" / "fold-1.csv").open()))
    assert {"path", "label", "split", "cv_group"} <= set(rows[0])

    digest = {i: json.loads((out / f"fold-{i}" / "manifest.json").read_text())["digest"] for i in (1, 3)}
    shutil.rmtree(out / "fold-2")  # as if killed during fold 2: the others are kept
    cfg = tiny_cfg(data)
    again = cross_validate(cfg, 3, GROUP_RE, refit=True, out=out)
    assert [r["status"] for r in again["folds"]] == ["kept (finished before)", "trained", "kept (finished before)"]
    assert again["refit"]["status"] == "kept (finished before)"
    assert {i: json.loads((out / f"fold-{i}" / "manifest.json").read_text())["digest"] for i in (1, 3)} == digest
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files or half-written cv.json

    with pytest.raises(EdgetlError, match=r"another recipe \(epochs = 2 there, 3 now\)"):
        cross_validate(tiny_cfg(data, epochs=3), 3, GROUP_RE, out=out)
    with pytest.raises(EdgetlError, match="another --group-by"):
        cross_validate(cfg, 3, None, out=out)
    from edgetl.artifact import folder_lock

    with folder_lock(out), pytest.raises(EdgetlError, match="another edgetl command is working on it"):
        cross_validate(cfg, 3, GROUP_RE, out=out)


def test_cached_feature_extract_runs_the_backbone_once_for_all_folds(data, tmp_path):
    """Every fold loads the features computed once (a fold computing its own would mean the cache
    key of edgetl.cv and edgetl.train's _cached_features differ); the result equals a fold that
    computed them itself."""
    from edgetl.train import Reporter, run_training

    class Lines(Reporter):
        def __init__(self):
            super().__init__(quiet=True)
            self.lines = []

        def log(self, msg):
            self.lines.append(msg)

    rep = Lines()
    cfg = tiny_cfg(data, mode="feature-extract", cache=True, epochs=3)
    cv = cross_validate(cfg, 3, None, refit=True, out=tmp_path / "cv", reporter=rep)
    assert sum("through the frozen backbone once for 4 run(s)" in line for line in rep.lines) == 1
    assert sum(line.startswith("features: loaded from") for line in rep.lines) == 4, rep.lines
    assert not (tmp_path / "cv" / "feature-cache").exists()
    alone = run_training(cfg.__class__(**{**cfg.to_dict(), "data": str(tmp_path / "cv" / "splits" / "fold-2.csv"),
                                          "out": str(tmp_path / "alone"), "cache": True, "augment": False}),
                         reporter=Reporter(quiet=True))
    assert alone.metrics["test"]["confusion"] == cv["folds"][1]["confusion"]
    assert alone.metrics["val"]["accuracy"] == cv["folds"][1]["val_accuracy"]


# ---- the CLI: a train-like command built from the decorator, run through edgetl's main -----------

@click.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True)
@cv_options
def cvtrain(data, out, overwrite, **options):
    """What `edgetl train` does with the options (the lead's wiring)."""
    from edgetl.train import resolve_config

    cv_args = pop_cv_options(options)
    cfg = resolve_config({"data": str(data), "out": str(out), **TINY}, None)
    if not run_cv_if_asked(cfg, **cv_args, overwrite=overwrite, quiet=True):
        click.echo("trained without --cv")


@pytest.fixture
def cli(monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, "cvtrain", "test_cv:cvtrain")

    def call(*args):
        rc = main(["cvtrain", *map(str, args)])
        cap = capsys.readouterr()
        return rc, cap.out, cap.err
    return call


def test_cli_runs_the_cross_validation(cli, data, tmp_path):
    rc, out, err = cli(data / "meta.csv", "--out", tmp_path / "cv", "--cv", "2", "--group-by", "obj", "--no-refit")
    assert rc == 0, err
    cv = json.loads((tmp_path / "cv" / CV_FILE).read_text())
    assert cv["k"] == 2 and cv["group_by"] == "obj" and cv["refit"] is None
    rows = list(csv.DictReader((tmp_path / "cv" / "splits" / "fold-1.csv").open()))
    assert {"obj", "site"} <= set(rows[0])  # the source CSV's columns travel: eval --by on a fold
    from edgetl.adapt import evaluate_by

    by_site = evaluate_by(tmp_path / "cv" / "fold-1", None, "site", device="cpu", workers=0)
    assert sum(m["n"] for m in by_site["domains"].values()) == by_site["overall"]["n"] == cv["folds"][0]["n_test"]
    assert cli(data, "--out", tmp_path / "plain")[:2] == (0, "trained without --cv\n")


@pytest.mark.parametrize("args, words", [
    (["--cv", "1"], "--cv 1: cross-validation needs at least 2 folds"),
    (["--cv", "13"], "class 'disc' has 12 usable image(s), fewer than the 13 folds"),
    (["--cv", "3", "--group-by", "nosuch"], "has no column 'nosuch'"),
    (["--cv", "3", "--group-by", "re:^zzz"], "do not match"),
    (["--cv", "3", "--group-by", "re:(["], "not a valid regular expression"),
    (["--cv", "3", "--group-by", "site"], "--group-by found 2 group(s), fewer than the 3 folds"),
    (["--group-by", "obj"], "--group-by only applies to cross-validation"),
    (["--refit"], "--refit only applies to cross-validation"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, data, tmp_path, args, words):
    rc, out, err = cli(data / "meta.csv", "--out", tmp_path / "cv", *args)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert rc == 2 and "Traceback" not in out + err, err
    assert lines[0].startswith("error:") and words in lines[0], err
    assert all(line.startswith("  hint:") for line in lines[1:]) and len(lines) <= 2, err
    assert not (tmp_path / "cv").exists() and not list(tmp_path.glob(".*"))


def test_a_column_needs_a_csv_and_an_out_folder_of_something_else_is_refused(cli, data, tmp_path):
    rc, _, err = cli(data, "--out", tmp_path / "cv", "--cv", "3", "--group-by", "obj")
    assert rc == 2 and "is a folder, so it has no column 'obj'" in err
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me\n")
    rc, _, err = cli(data, "--out", other, "--cv", "2", "--overwrite")
    assert rc == 2 and "is not an edgetl cross-validation folder" in err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
