"""`edgetl search` on tiny models (tiny_cnn, random init, generated images): the halving, the choice
under a budget, the latency sources, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_image_folder
from edgetl.cli import main
from edgetl.search import Budget, choose, pareto, promote

TARGET = "x86-cpu-onnxruntime"
DEFAULTS = """\
[defaults]
num_workers = 0
channels_last = false
amp = false
augment = false
warmup_epochs = 0
label_smoothing = 0.0
patience = 0
batch_size = 16
"""
# two that learn (lr 1e-2) and two that cannot (lr 1e-7, random-init): the halving must keep the first two
CANDIDATES = DEFAULTS + "".join(f'\n[[candidate]]\nname = "{n}"\nbackbone = "tiny_cnn"\ninput_size = {s}\nlr = {lr}\n'
                                for n, s, lr in (("slow40", 40, 1e-7), ("t32", 32, 1e-2), ("slow16", 16, 1e-7),
                                                 ("t24", 24, 1e-2)))
FAST = ["--pretrained", "none", "--device", "cpu", "--method", "ptq", "--calib-min", "8", "--no-speed-check",
        "--reps", "20"]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["search", *(str(a) for a in args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    images = write_image_folder(root / "images", n_per_class=24, classes=("disc", "stripes", "square"))
    (root / "cands.toml").write_text(CANDIDATES)
    return root, images


@pytest.fixture(scope="module")
def searched(tiny):
    """One search: 4 candidates, rungs 4,8 epochs, eta 2 -> 2 finalists, compiled and timed here."""
    root, images = tiny
    out = root / "out"
    args = [images, "--target", TARGET, "--out", out, "--candidates", root / "cands.toml", "--rungs", "4,8",
            "--eta", "2", "--latency-ms", "1000", *FAST]
    rc = main(["search", *(str(a) for a in args)])
    return rc, out, args


# ---- the decisions, on constructed records --------------------------------------------------------

def test_promote_keeps_the_best_by_validation_metric():
    scores = [("a", 0.50), ("b", 0.90), ("c", None), ("d", 0.70), ("e", 0.10)]
    assert promote(scores, 2) == ["b", "d"]  # in the candidates' order
    assert promote(scores, 1) == ["b"]
    assert promote(scores, 4) == ["a", "b", "d", "e"]  # a failed training (None) goes last
    assert promote([("x", 0.5), ("y", 0.5), ("z", 0.5)], 1) == ["x"]  # ties: the first


def _rec(name, val, ms, deployable=True, mb=1.0, finalist=True):
    return {"name": name, "finalist": finalist, "metric": "macro_f1", "val_metric": val,
            "compile": {"deployable": deployable, "size_mb": mb,
                        "gate": {"failures": [] if deployable else ["agreement 0.91 < 0.98"]}},
            "latency": {"ms": ms}}


def test_the_choice_is_the_most_accurate_deployable_within_budget():
    recs = [_rec("over", 0.99, 20.0), _rec("gatefail", 0.98, 5.0, deployable=False), _rec("ok", 0.95, 8.0),
            _rec("ok_worse", 0.90, 2.0), _rec("eliminated", 1.0, None, finalist=False)]
    assert choose(recs, Budget(latency_ms=10))[0] == "ok"  # not the over-budget nor the gate-failed one
    assert choose(recs, Budget(latency_ms=30))[0] == "over"  # within a larger budget the best one wins
    assert choose(recs, Budget(fps=200))[0] == "ok_worse"  # 200 fps = 5 ms a frame
    assert choose(recs, Budget(latency_ms=30, max_mb=0.5))[0] is None
    recs[2]["compile"]["size_mb"] = 0.4
    assert choose(recs, Budget(latency_ms=30, max_mb=0.5))[0] == "ok"
    name, why = choose(recs, Budget(latency_ms=1))
    assert name is None and "no finalist is deployable within the budget" in why
    assert pareto(recs) == {"over", "ok", "ok_worse"}  # among the deployable ones
    recs[2]["latency"]["ms"] = 25.0  # slower than "over" and less accurate: dominated
    assert pareto(recs) == {"over", "ok_worse"}


def test_unknown_latency_is_never_chosen_by_latency():
    recs = [_rec("a", 0.99, None), _rec("b", 0.95, None)]
    name, why = choose(recs, Budget(latency_ms=10))
    assert name is None and "latency unknown for every finalist" in why and "--latency-table" in why
    assert choose(recs, Budget(max_mb=5))[0] == "a"  # a size budget alone does not need latency
    recs[1]["latency"]["ms"] = 4.0
    assert choose(recs, Budget(latency_ms=10))[0] == "b"


# ---- end to end ---------------------------------------------------------------------------------

def test_search_halves_compiles_times_and_chooses(searched, capsys):
    from edgetl.runtime.manifest import open_verified

    rc, out, _ = searched
    assert rc == 0
    res = json.loads((out / "search.json").read_text())
    recs = {r["name"]: r for r in res["candidates"]}
    assert set(recs) == {"slow40", "t32", "slow16", "t24"}
    # rung 1: all four; the two best by validation metric go on (a mutant promoting the worst fails here)
    first = {n: r["rungs"][0]["val_metric"] for n, r in recs.items()}
    finalists = {n for n, r in recs.items() if r["finalist"]}
    assert finalists == {"t32", "t24"}
    assert min(first[n] for n in finalists) > max(first[n] for n in set(recs) - finalists)
    assert all(len(recs[n]["rungs"]) == 2 and recs[n]["rungs"][1]["epochs"] == 8 for n in finalists)
    assert all(len(recs[n]["rungs"]) == 1 and "eliminated at rung 1" in recs[n]["why"] for n in ("slow40", "slow16"))
    for n in finalists:
        r = recs[n]
        assert r["compile"]["size_mb"] > 0 and r["compile"]["decided_by"] == "the onnxruntime build"
        assert r["latency"]["ms"] > 0 and r["latency"]["source"].startswith("measured here: edgetl bench row ort-int8")
        assert r["test_accuracy"] is not None and r["time_s"] >= 0
    # the choice: the best validation metric among the deployable finalists within budget (ties: the faster)
    ok = [n for n in finalists if recs[n]["compile"]["deployable"]]
    assert ok, "neither tiny finalist passed its gate"
    best = min(ok, key=lambda n: (-recs[n]["val_metric"], recs[n]["latency"]["ms"]))
    assert res["chosen"] == best and recs[best]["why"].startswith("CHOSEN")
    assert open_verified(out / "chosen" / "run", "run", hint="").kind == "run"
    assert open_verified(out / "chosen" / "artifact", "artifact", hint="").kind == "artifact"
    assert (out / "chosen" / "artifact").resolve() == (out / recs[best]["compile"]["artifact"]).resolve()
    assert (out / "pareto.png").stat().st_size > 1000
    assert not (out / "feature-cache").exists()


def test_resume_keeps_finished_work(searched, capsys, monkeypatch):
    import shutil

    import edgetl.compile
    import edgetl.search
    import edgetl.train

    rc, out, args = searched
    assert rc == 0
    calls = {"train": [], "compile": [], "time": 0}
    real_train, real_compile = edgetl.train.run_training, edgetl.compile.compile_run
    monkeypatch.setattr(edgetl.train, "run_training",
                        lambda cfg, **k: calls["train"].append(Path(cfg.out).name) or real_train(cfg, **k))
    monkeypatch.setattr(edgetl.compile, "compile_run",
                        lambda run, art, *a, **k: calls["compile"].append(Path(art).parent.name) or
                        real_compile(run, art, *a, **k))
    real_measure = edgetl.search.measure_latency

    def measure(*a, **k):
        calls["time"] += 1
        return real_measure(*a, **k)
    monkeypatch.setattr(edgetl.search, "measure_latency", measure)
    before = json.loads((out / "search.json").read_text())
    rc, stdout, _ = run_cli(capsys, *args)
    assert rc == 0 and "resuming the search" in stdout
    assert calls == {"train": [], "compile": [], "time": 0}
    after = json.loads((out / "search.json").read_text())
    assert after["chosen"] == before["chosen"]
    assert all(row["status"].startswith("kept") for r in after["candidates"] for row in r["rungs"])
    # one training lost (retrained, so its artifact is compiled again) and one artifact lost
    shutil.rmtree(out / "candidates" / "t24" / "rung-2")
    shutil.rmtree(out / "candidates" / "t32" / "artifact")
    rc, _, _ = run_cli(capsys, *args)
    assert rc == 0
    assert calls["train"] == ["rung-2"] and sorted(calls["compile"]) == ["t24", "t32"] and calls["time"] == 2
    # another plan in the same OUT is refused by name; nothing is touched
    rc, _, err = run_cli(capsys, *args[:-len(FAST)], "--rungs", "1,4", *FAST)
    assert rc == 2 and "another --rungs" in err


def test_latency_table_and_a_jetson_without_one(tiny, capsys):
    root, images = tiny
    (root / "two.toml").write_text(CANDIDATES.split("\n[[candidate]]\nname = \"slow16\"")[0])  # slow40, t32
    out = root / "orin"
    args = [images, "--target", "jetson-orin-nano", "--out", out, "--candidates", root / "two.toml", "--rungs", "1",
            "--latency-ms", "10", *FAST]
    rc, stdout, err = run_cli(capsys, *args)
    assert rc == 1 and "latency unknown for every finalist" in err
    res = json.loads((out / "search.json").read_text())
    assert res["chosen"] is None and not res["latency_here"] and not (out / "chosen").exists()
    for r in res["candidates"]:
        assert r["finalist"] and r["latency"]["ms"] is None and "TensorRT engines are built and timed on the device" \
            in r["latency"]["source"]
        assert r["why"] == "latency unknown" or r["why"].startswith("NOT deployable")
    assert "latency unknown" in stdout
    # the round trip: the device's figures in a table; the same command resumes and chooses
    table = root / "orin.csv"
    table.write_text("candidate,latency_ms,note\nt32,12.5,over the budget\nslow40,3.0,fast but untrained\n")
    rc, stdout, err = run_cli(capsys, *args, "--latency-table", table)
    res = json.loads((out / "search.json").read_text())
    recs = {r["name"]: r for r in res["candidates"]}
    assert recs["t32"]["latency"] == {"ms": 12.5, "source": "--latency-table"}
    if recs["t32"]["compile"]["deployable"]:
        assert recs["t32"]["why"].startswith("over budget: 12.50 ms > 10.00 ms")
    if recs["slow40"]["compile"]["deployable"]:  # an untrained model may pass or fail its gate: either way, t32 is not chosen
        assert rc == 0 and res["chosen"] == "slow40"
    else:
        assert rc == 1 and res["chosen"] is None and "no finalist is deployable within the budget" in err
    assert all(row["status"].startswith("kept") for r in res["candidates"] for row in r["rungs"])


def test_a_failed_gate_is_reported_not_chosen(tiny, capsys, monkeypatch):
    import edgetl.check

    root, images = tiny
    (root / "pair.toml").write_text(DEFAULTS + "".join(
        f'\n[[candidate]]\nname = "{n}"\nbackbone = "tiny_cnn"\ninput_size = {s}\nlr = 0.01\n'
        for n, s in (("a32", 32), ("b24", 24))))
    real = edgetl.check.deployable
    monkeypatch.setattr(edgetl.check, "deployable", lambda m: False if m.preprocess.input_size[0] == 32 else real(m))
    out = root / "gate"
    table = root / "pair.csv"  # a32 the faster: a choice that ignored the gate would take it (at equal accuracy)
    table.write_text("candidate,latency_ms\na32,1.0\nb24,2.0\n")
    rc, stdout, _ = run_cli(capsys, images, "--target", TARGET, "--out", out, "--candidates", root / "pair.toml",
                            "--rungs", "4", "--latency-ms", "1000", "--latency-table", table, *FAST)
    res = json.loads((out / "search.json").read_text())
    recs = {r["name"]: r for r in res["candidates"]}
    assert recs["a32"]["val_metric"] >= recs["b24"]["val_metric"], "the case is only decisive when a32 is as good"
    if recs["b24"]["compile"]["deployable"]:  # its real gate
        assert rc == 0 and res["chosen"] == "b24"
    else:
        assert rc == 1 and res["chosen"] is None
    assert not recs["a32"]["compile"]["deployable"] and recs["a32"]["why"].startswith("NOT deployable")
    assert "NOT deployable" in stdout


# ---- bad input: one line, exit 2, nothing written -------------------------------------------------

def _bad_cases(root: Path, images: Path):
    def toml(name, text):
        (root / name).write_text(text)
        return root / name
    base = [images, "--target", TARGET, "--candidates", root / "cands.toml", "--latency-ms", "5", *FAST]
    one = DEFAULTS + '\n[[candidate]]\nbackbone = "tiny_cnn"\n'
    return [
        ([root / "nosuch", *base[1:]], "nosuch"),
        ([images, "--target", "nosuch", *base[3:]], "nosuch"),
        ([*base[:-len(FAST)], "--rungs", "abc", *FAST], "--rungs"),
        ([*base, "--rungs", "3,1"], "--rungs 3,1"),
        ([*base, "--eta", "1"], "--eta 1"),
        ([images, "--target", TARGET, "--candidates", root / "cands.toml", *FAST], "no budget"),
        ([*base, "--latency-ms", "-1"], "--latency-ms -1"),
        ([*base, "--fps", "0"], "--fps 0"),
        ([*base[:4], root / "nosuch.toml", *base[5:]], "nosuch.toml"),
        ([*base[:4], toml("bad.toml", "this is = not [toml"), *base[5:]], "not valid TOML"),
        ([*base[:4], toml("none.toml", DEFAULTS), *base[5:]], "no [[candidate]]"),
        ([*base[:4], toml("key.toml", one + "lrr = 0.1\n"), *base[5:]], "'lrr'"),
        ([*base[:4], toml("epochs.toml", one + "epochs = 3\n"), *base[5:]], "'epochs' is set by the search"),
        ([*base[:4], toml("bb.toml", DEFAULTS + '\n[[candidate]]\nbackbone = "nosuch"\n'), *base[5:]], "nosuch"),
        ([*base[:4], toml("size.toml", one + "input_size = 3\n"), *base[5:]], "input_size = 3"),
        ([*base[:4], toml("mode.toml", one + 'mode = "nosuch"\n'), *base[5:]], "mode = 'nosuch'"),
        ([*base[:4], toml("dup.toml", one + 'name = "x"\n[[candidate]]\nbackbone = "tiny_cnn"\nname = "x"\n'),
          *base[5:]], "two candidates are named 'x'"),
        ([*base, "--latency-table", root / "nosuch.csv"], "nosuch.csv"),
        ([*base, "--latency-table", toml("cols.csv", "name,ms\nt32,3\n")], "candidate,latency_ms"),
        ([*base, "--latency-table", toml("who.csv", "candidate,latency_ms\nnobody,3\n")], "'nobody'"),
        ([*base, "--latency-table", toml("neg.csv", "candidate,latency_ms\nt32,-3\n")], "not a positive number"),
        ([*[a for a in base if a not in ("--pretrained", "none")]], "tiny_cnn has no pretrained weights"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny, capsys, tmp_path):
    from test_cli_contract import assert_one_line_error

    root, images = tiny
    failures = []
    for args, words in _bad_cases(root, images):
        out = tmp_path / "out"
        rc, stdout, err = run_cli(capsys, *args, "--out", out)
        try:
            line = assert_one_line_error(rc, stdout, err, codes=(2,))
            assert words in line, line
            assert not out.exists() and not list(tmp_path.glob(".out*")), list(tmp_path.iterdir())
        except AssertionError as exc:
            failures.append(f"{[str(a) for a in args]}: {exc}")
    assert not failures, "\n".join(failures)


def test_an_out_folder_that_is_not_a_search_is_refused(tiny, capsys, tmp_path):
    root, images = tiny
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("not edgetl's\n")
    rc, _, err = run_cli(capsys, images, "--target", TARGET, "--candidates", root / "cands.toml", "--latency-ms", "5",
                         *FAST, "--out", out)
    assert rc == 2 and "is not an edgetl search folder" in err and sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_a_spent_hours_budget_starts_no_training(tiny, capsys, tmp_path):
    root, images = tiny
    out = tmp_path / "hours"
    rc, _, err = run_cli(capsys, images, "--target", TARGET, "--out", out, "--candidates", root / "cands.toml",
                         "--latency-ms", "5", "--hours", "1e-9", *FAST)
    res = json.loads((out / "search.json").read_text())
    assert rc == 1 and res["chosen"] is None and "no candidate reached the finalist stage" in err
    assert all(r["why"] == "not trained at rung 1: the --hours budget was spent" and not r["rungs"]
               for r in res["candidates"])
