"""Domain adaptation (``edgetl adapt``, ``edgetl.adapt``) and per-domain evaluation, on the tiny model.

The new domain is the tiny run's own images made brighter (+60 grey levels): a shift BatchNorm
statistics see directly.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import click
import cv2
import numpy as np
import pytest

from _tinyrun import session_tiny_run
from edgetl.adapt import adapt_run, evaluate_by
from edgetl.cli import COMMANDS, main
from edgetl.commands.cv_options import by_option, run_eval_by_if_asked
from edgetl.runs import load_run
from edgetl.runtime.manifest import read_manifest

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return session_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def bright(tiny, tmp_path_factory) -> Path:
    """The run's images, +60 grey levels, in the same class folders."""
    out = tmp_path_factory.mktemp("bright") / "images"
    for p in sorted((tiny.parent / "images").rglob("*.png")):
        (out / p.parent.name).mkdir(parents=True, exist_ok=True)
        img = cv2.imread(str(p)).astype(np.int16) + 60
        cv2.imwrite(str(out / p.parent.name / p.name), np.clip(img, 0, 255).astype(np.uint8))
    return out


def quiet():
    from edgetl.train import Reporter

    return Reporter(quiet=True)


@pytest.fixture(scope="module")
def adabn_run(tiny, bright, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adabn") / "run"
    adapt_run(tiny, bright, out, device="cpu", batch_size=16, reporter=quiet())
    return out


def _inputs(folder: Path, spec):
    import torch

    from edgetl.runtime.imageio import read_image
    from edgetl.runtime.preprocess import preprocess

    paths = sorted(p.resolve() for p in folder.resolve().rglob("*.png"))  # the order adapt reads them in
    return torch.from_numpy(np.stack([preprocess(read_image(p), spec) for p in paths]))


def _changed(a, b) -> set[str]:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return {k for k in sa if not torch.equal(sa[k], sb[k])}


def test_adabn_re_estimates_batchnorm_statistics_on_the_new_domain(tiny, bright, adabn_run):
    import torch

    src, ada = load_run(tiny), load_run(adabn_run)
    x = _inputs(bright, src.manifest.preprocess)
    with torch.no_grad():  # the first BatchNorm sees conv1's outputs (nothing normalised before it)
        y = src.model.backbone[0][0](x)
    chunks = np.array_split(np.arange(len(x)), math.ceil(len(x) / 16))
    expected = torch.stack([y[torch.as_tensor(i)].mean((0, 2, 3)) for i in chunks]).mean(0)  # cumulative average
    new_mean, old_mean = ada.model.backbone[0][1].running_mean, src.model.backbone[0][1].running_mean
    assert torch.allclose(new_mean, expected, atol=1e-5)
    target = y.mean((0, 2, 3))  # the new images' per-channel mean
    assert (new_mean - target).abs().max() < 0.05 * (old_mean - target).abs().max()
    changed = _changed(src.model, ada.model)
    assert changed and all(k.endswith(BN_BUFFERS) for k in changed)  # conv weights, BN affine, head untouched
    assert {k for k in changed if k.endswith("running_mean")} == {k for k in src.model.state_dict()
                                                                  if k.endswith("running_mean")}


def test_adapt_with_labels_trains_only_what_it_may(tiny, bright, adabn_run, tmp_path):
    src = load_run(tiny).model
    head = tmp_path / "head"
    adapt_run(tiny, bright, head, labels=bright, epochs=2, use_adabn=False, device="cpu", reporter=quiet())
    assert _changed(src, load_run(head).model) == {"head.weight", "head.bias"}  # BN statistics did not move

    top = tmp_path / "top"
    adapt_run(tiny, bright, top, labels=bright, epochs=2, unfreeze="top", device="cpu", reporter=quiet())
    tuned = load_run(top).model
    top_params = {f"backbone.2.{k}" for k, _ in src.backbone[2].named_parameters()}
    weights = {k for k in _changed(src, tuned) if not k.endswith(BN_BUFFERS)}
    assert weights == {"head.weight", "head.bias"} | top_params  # the top group and the head; nothing below
    assert not {k for k in _changed(load_run(adabn_run).model, tuned) if k.endswith(BN_BUFFERS)}  # AdaBN's stats kept


def test_the_adapted_run_is_a_run_that_records_its_adaptation_and_compiles(tiny, bright, tmp_path, capsys):
    few = tmp_path / "few.csv"
    chosen = [p for c in ("disc", "stripes", "square") for p in sorted((bright / c).glob("*.png"))[:3]]
    with open(few, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label"], *([str(p), p.parent.name] for p in chosen)])
    out = tmp_path / "adapted"
    rc = main(["adapt", str(tiny), "--images", str(bright), "--labels", str(few), "--epochs", "3", "--out", str(out),
               "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    run = load_run(out)
    rec = run.manifest.training["adaptation"]
    assert rec["source_digest"] == read_manifest(tiny).digest and rec["source_run"] == str(tiny)
    assert (rec["method"], rec["images"], rec["labelled"], rec["epochs"], rec["unfreeze"]) == (
        "adabn+finetune-head", 72, 9, 3, "head")
    assert run.manifest.training["metrics"]["test"]["n"] == len(load_run(tiny).samples("test"))  # re-measured
    src = load_run(tiny)
    for name in ("val", "test"):
        assert [s.path for s in run.samples(name)] == [s.path for s in src.samples(name)]
    assert {s.path for s in run.samples("train")} == {s.path for s in src.samples("train")} | set(chosen)
    assert len(run.split["adaptation"]["images"]) == 72

    art = tmp_path / "art"
    rc = main(["compile", str(out), "--target", "x86-cpu-onnxruntime", "--method", "ptq", "--out", str(art),
               "--calib-min", "8", "--no-speed-check"])
    capsys.readouterr()
    assert rc == 0 and read_manifest(art).gate["passed"]
    assert read_manifest(art).training["adaptation"]["source_digest"] == rec["source_digest"]


@pytest.fixture
def bad_inputs(tiny, bright, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here\n")
    zebra = tmp_path / "zebra"
    (zebra / "zebra").mkdir(parents=True)
    cv2.imwrite(str(zebra / "zebra" / "z.png"), np.zeros((40, 40, 3), np.uint8))
    held = tmp_path / "held.csv"
    s = load_run(tiny).samples("test")[0]
    held.write_text(f"path,label\n{s.path},{load_run(tiny).manifest.labels[s.label]}\n")
    return {"empty": empty, "zebra": zebra, "held": held, "missing": tmp_path / "nope", "images": bright}


@pytest.mark.parametrize("args, words", [
    (["--images", "{empty}"], "--images {empty}: 0 usable image(s)"),
    (["--images", "{missing}"], "--images {missing}: no such folder"),
    (["--images", "{images}", "--labels", "{zebra}"], "class(es) 'zebra' are not labels of the run"),
    (["--images", "{images}", "--labels", "{held}"], "are in the run's validation/test split"),
    (["--images", "{images}", "--labels", "{missing}"], "--labels {missing}: no such file or folder"),
    (["--images", "{images}", "--no-bn-stats"], "nothing to adapt"),
    (["--images", "{images}", "--labels", "{images}", "--epochs", "0"], "--epochs 0"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny, bad_inputs, tmp_path, capsys, args, words):
    out = tmp_path / "out"
    rc = main(["adapt", str(tiny), *(a.format(**bad_inputs) for a in args), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert rc == 2 and "Traceback" not in err and len(lines) <= 2, err
    assert lines[0].startswith("error:") and words.format(**bad_inputs) in lines[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_folder_that_is_not_a_run_is_refused(bright, tmp_path, capsys):
    rc = main(["adapt", str(bright), "--images", str(bright), "--out", str(tmp_path / "out")])
    assert rc == 2 and "error:" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---- per-domain evaluation --------------------------------------------------------------------------

@click.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.option("--out", type=click.Path(path_type=Path))
@by_option
def evalby(run, data, as_json, out, by):
    """What `edgetl eval` does with --by (the lead's wiring)."""
    if not run_eval_by_if_asked(run, data, by, out=out, as_json=as_json, device="cpu", workers=0):
        click.echo("evaluated without --by")


def test_metrics_per_domain_side_by_side(tiny, bright, tmp_path, monkeypatch, capsys):
    from edgetl.train import evaluate_run

    rows = [(p, p.parent.name, dom) for dom, folder in (("plain", tiny.parent / "images"), ("bright", bright))
            for p in sorted(folder.rglob("*.png"))]
    both = tmp_path / "domains.csv"
    with open(both, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "Domain"], *rows])
    res = evaluate_by(tiny, both, "domain", device="cpu", workers=0)
    assert set(res["domains"]) == {"plain", "bright"} and res["overall"]["n"] == 144
    for dom in ("plain", "bright"):
        one = tmp_path / f"{dom}.csv"
        with open(one, "w", newline="") as fh:
            csv.writer(fh).writerows([["path", "label"], *((p, lab) for p, lab, d in rows if d == dom)])
        alone = evaluate_run(tiny, one, device="cpu", workers=0)["metrics"]
        assert res["domains"][dom]["n"] == 72
        assert res["domains"][dom]["confusion"] == alone["confusion"]  # the same as evaluating it alone

    monkeypatch.setitem(COMMANDS, "evalby", "test_adapt:evalby")
    assert main(["evalby", str(tiny), str(both), "--by", "domain", "--json", "--out", str(tmp_path / "m")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["domains"]["bright"]["n"] == 72
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["column"] == "domain"
    assert main(["evalby", str(tiny), str(both), "--by", "domain"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in table[2:]] == [["bright", "72"], ["plain", "72"], ["all", "144"]]
    for args, words in ((["--by", "nosuch"], "has no column 'nosuch'"),):
        assert main(["evalby", str(tiny), str(both), *args]) == 2
        assert words in capsys.readouterr().err
    assert main(["evalby", str(tiny), str(bright), "--by", "domain"]) == 2
    assert "is not a CSV file" in capsys.readouterr().err
    assert main(["evalby", str(tiny), "--by", "domain"]) == 2  # the tiny run was trained from a folder
    assert "was not trained from a CSV" in capsys.readouterr().err
