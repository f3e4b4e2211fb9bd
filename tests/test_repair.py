"""The repair decisions on a small model trained in seconds, with layers known to break INT8
(tests/_sensitive.py): each test fails when its decision is replaced by a wrong one.

The loop is judged in reference numerics here (the same on every CPU class CI may land on), except
where a test is about judging on the target's own numerics."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import _sensitive as S
from edgetl.calibration.qdq import quantized_nodes
from edgetl.calibration.sets import CalibrationSet
from edgetl.check import Checkset, Thresholds
from edgetl.cli import main
from edgetl.numerics import Numerics, judge_for, reference
from edgetl.quantize import QuantizeConfig
from edgetl.repair import Material, better, escalate, ladder, make_candidate, quantize_with_fallback, step_name
from edgetl.runtime.imageio import read_image
from edgetl.runtime.manifest import read_manifest
from edgetl.runtime.preprocess import preprocess
from edgetl.runtime.runners import open_runner

HEAD = "/6/Gemm"  # the classifier's node in the exported graph
TH = Thresholds(max_drop=2.0, min_agreement=0.97, speed_check=False, min_stability_agreement=None)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensitive")
    images = S.write_graded(root / "images", n_per_class=100)
    model = S.train(images)
    cal = S.patch_calibration_images(images, root / "cal", n_patched=2, n=96)
    models = {name: S.export(m, root / f"{name}.onnx")
              for name, m in (("plain", model), ("head", S.head_outlier(model)), ("spike", S.spike(model)))}
    return {"root": root, "images": images, "cal": cal, "models": models}


def material(world, variant: str, tmp: Path) -> Material:
    """The shared inputs of a repair, as ``quantize_onnx`` builds them (every image in the checkset)."""
    from edgetl.compile import external_source, origin_record

    folder = tmp / "art"
    folder.mkdir(parents=True)
    shutil.copy(world["models"][variant], folder / "model_fp32.onnx")
    files = sorted(world["images"].rglob("*.png"))
    x = np.stack([preprocess(read_image(p), S.SPEC) for p in files])
    y = np.array([S.CLASSES.index(p.parent.name) for p in files], np.int64)
    runner = open_runner("onnxruntime", folder / "model_fp32.onnx")
    checkset = Checkset(x, y, runner.infer_many(x))
    cal_paths = tuple(sorted(world["cal"].iterdir()))
    cal = CalibrationSet(cal_paths, (-1,) * len(cal_paths), f"dir:{world['cal']}", world["cal"])
    source = external_source(origin_record(world["models"][variant]), S.CLASSES, S.SPEC, world["images"], True)
    work = tmp / "work"
    work.mkdir()
    return Material(folder, work, source, cal, cal.load(S.SPEC), checkset)


def cfg(**kw) -> QuantizeConfig:
    base = dict(method="ptq", calib_min=8, thresholds=TH, max_fallback_rounds=3, sensitivity_images=16)
    return QuantizeConfig(**{**base, **kw})


def run_fallback(mat: Material, c: QuantizeConfig, numerics: Numerics | None = None):
    cand = make_candidate(mat, c, mat.work, lambda s: None)
    return quantize_with_fallback(mat, cand, numerics or reference(), mat.work / "q.onnx", lambda s: None)


# ---- the mixed-precision fallback -----------------------------------------------------------------

def test_the_model_is_a_real_test(world, tmp_path):
    """Float is not perfect on this data, many images sit near a decision boundary, and INT8 moves the
    logits: the decisions below are not the trivial ones of a constant classifier."""
    mat = material(world, "plain", tmp_path)
    f = mat.checkset.float_logits
    assert 0.85 < float((f.argmax(1) == mat.checkset.labels).mean()) < 0.99
    assert len(set(f.argmax(1).tolist())) == 3  # every class is predicted
    top2 = np.sort(f, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    assert float((gap < 2.0).mean()) > 0.03  # near-boundary images (logits here span about +-15)
    r = run_fallback(mat, cfg(max_fallback_rounds=0))
    assert r.gate.accuracy_passed and r.gate.agreement >= 0.97 and r.gate.max_logit_error > 1e-3


def test_round_0_fails_and_the_fallback_keeps_exactly_the_sensitive_layer(world, tmp_path):
    mat = material(world, "head", tmp_path)
    r = run_fallback(mat, cfg())
    assert [x["accuracy_passed"] for x in r.rounds] == [False, True]
    assert r.rounds[0]["agreement"] < 0.5 and r.rounds[1]["float_layers"] == [HEAD]
    assert r.float_layers == [HEAD] and r.gate.accuracy_passed and r.gate.agreement >= 0.97
    assert r.sensitivity[0].node == HEAD and r.sensitivity[0].gain_db > r.sensitivity[1].gain_db
    assert HEAD not in quantized_nodes(r.model) and len(quantized_nodes(r.model)) == 2  # both convs stay int8


def test_the_ranking_is_computed_once_for_the_same_graph_ranges_and_numerics(world, tmp_path, monkeypatch):
    from edgetl import repair

    monkeypatch.setenv("EDGETL_CACHE", str(tmp_path / "cache"))
    mat = material(world, "head", tmp_path)
    cand = make_candidate(mat, cfg(), mat.work, lambda s: None)
    from edgetl.calibration.cache import save_ranges

    ranges = save_ranges(cand.ranges_for(cfg().form), mat.work / "r.json")
    said: list[str] = []
    first = repair.rank_layers(cand.prepared, ranges, cfg(), mat.cal_inputs[:16], reference(), log=said.append)
    assert not said and len(list((tmp_path / "cache" / "sensitivity").iterdir())) == 1
    calls = []
    monkeypatch.setattr(repair, "_rank_layers", lambda *a, **k: calls.append(a) or first)
    again = repair.rank_layers(cand.prepared, ranges, cfg(), mat.cal_inputs[:16], reference(), log=said.append)
    assert again == first and not calls and "reusing" in said[0]
    other = repair.rank_layers(cand.prepared, ranges, cfg(), mat.cal_inputs[:8], reference())  # other images
    assert len(calls) == 1 and other == first
    # another process's calibration of the same images: the ranges differ in their last bits -> reused
    from edgetl.calibration.cache import load_ranges

    r0 = load_ranges(ranges)
    jitter = save_ranges({k: (lo * (1 + 2e-6), hi * (1 - 2e-6)) for k, (lo, hi) in r0.items()}, mat.work / "j.json")
    repair.rank_layers(cand.prepared, jitter, cfg(), mat.cal_inputs[:16], reference())
    assert len(calls) == 1
    moved = save_ranges({k: (lo, hi * 1.01) for k, (lo, hi) in r0.items()}, mat.work / "m.json")  # other ranges
    repair.rank_layers(cand.prepared, moved, cfg(), mat.cal_inputs[:16], reference())
    assert len(calls) == 2
    for f in (tmp_path / "cache" / "sensitivity").iterdir():
        f.write_text("damaged")
    repair.rank_layers(cand.prepared, ranges, cfg(), mat.cal_inputs[:16], reference())
    assert len(calls) == 3  # a damaged entry is recomputed, not trusted


def test_a_passing_round_0_keeps_everything_in_int8(world, tmp_path):
    r = run_fallback(material(world, "plain", tmp_path), cfg())
    assert len(r.rounds) == 1 and r.float_layers == [] and r.sensitivity is None  # lazy: no ranking needed


def test_when_every_round_misses_the_best_round_is_kept_not_the_last(world, tmp_path):
    """Unreachable thresholds: the loop stops after its rounds and keeps the best by the gate's order."""
    mat = material(world, "head", tmp_path)
    r = run_fallback(mat, cfg(thresholds=replace(TH, min_agreement=1.0, max_drop=0.0), max_fallback_rounds=2))
    assert not r.gate.accuracy_passed and len(r.rounds) == 3
    best = r.rounds[0]
    for x in r.rounds[1:]:
        best = x if better(x, best) else best
    assert [x.get("kept") for x in r.rounds].count(True) == 1 and best["kept"]
    assert r.float_layers == best["float_layers"] and r.gate.agreement == pytest.approx(best["agreement"])


def test_better_orders_passed_then_agreement_then_drop_then_fewer_float_layers():
    row = dict(accuracy_passed=False, agreement=0.97, drop=0.5, stability=0.97, float_layers=["a"])
    assert better({**row, "accuracy_passed": True, "agreement": 0.90}, row)
    assert better({**row, "agreement": 0.975}, row) and not better({**row, "agreement": 0.965}, row)
    assert better({**row, "drop": 0.2}, row) and not better({**row, "drop": 0.8}, row)
    assert better({**row, "float_layers": []}, row) and not better({**row, "float_layers": ["a", "b"]}, row)
    assert not better(row, row)


class HeadCollapsesOnThisTarget(Numerics):
    """A target whose build cannot run the classifier in INT8 accurately (say, no int8 kernel for
    its GEMM, emulated badly): reference numerics, except that while the head is quantized its
    logits come out scrambled. On ONNX Runtime the same graph is fine."""

    def logits(self, model, inputs, spec, work=None):
        out = super().logits(model, inputs, spec, work)
        return out[:, ::-1].copy() if HEAD in quantized_nodes(model) else out

    def open(self, model, spec, work=None):
        runner = super().open(model, spec, work)
        if HEAD in quantized_nodes(model):  # every output goes through infer_all (infer is its first)
            infer_all = runner.infer_all
            runner.infer_all = lambda batch: [o[:, ::-1].copy() for o in infer_all(batch)]
        return runner


def test_the_loop_goes_on_on_the_target_when_onnx_runtime_passes(world, tmp_path):
    """7-bit weights: ONNX Runtime's fused kernels are exact on every x86 CPU class, so its verdict here
    does not depend on the machine CI lands on."""
    mat = material(world, "plain", tmp_path)
    on_ort = run_fallback(mat, cfg(weight_range="reduced"), judge_for("onnxruntime", {}))
    assert on_ort.float_layers == [] and on_ort.gate.accuracy_passed  # ONNX Runtime: round 0 passes
    target = HeadCollapsesOnThisTarget("deployed", "onnxruntime", dict(reference().options))
    r = run_fallback(material(world, "plain", tmp_path / "t"), cfg(weight_range="reduced"), target)
    assert not r.rounds[0]["accuracy_passed"] and r.float_layers == [HEAD] and r.gate.accuracy_passed


# ---- the escalation ladder ----------------------------------------------------------------------

def test_ladder_order_and_pinning():
    auto = ladder(cfg(method="auto"), qat_possible=True)
    assert [(c.method, c.resolved_calibrator) for c in auto] == [("ptq", "minmax"), ("ptq", "percentile"),
                                                                  ("ptq", "mse"), ("qat", "mse")]
    assert [c.method for c in ladder(cfg(method="auto"), qat_possible=False)] == ["ptq"] * 3
    assert ladder(cfg(method="ptq"), True) == [cfg(method="ptq")]
    assert [c.resolved_calibrator for c in ladder(cfg(method="auto", calibrator="mse"), False)] == \
        ["mse", "minmax", "percentile"]


def test_ladder_tries_both_weight_forms_where_depthwise_kernels_are_exact():
    """Reduced range (no VNNI): the first calibration in the backend's preferred form, then in the
    other (8-bit depthwise or 7-bit everywhere), then the other calibrators; QAT in the 7-bit form
    NNCF's overflow fix trains."""
    from edgetl.calibration.depthwise import depthwise_exact

    if not depthwise_exact(["onnxruntime"]):
        pytest.skip("this CPU's ONNX Runtime depthwise INT8 kernel is not exact with 8-bit weights")
    steps = ladder(cfg(method="auto", weight_range="reduced", backend="onnxruntime"), qat_possible=True)
    assert [step_name(c) for c in steps] == ["ptq minmax", "ptq minmax, 8-bit depthwise", "ptq percentile",
                                              "ptq mse", "qat mse"]
    assert [c.reduce_range for c in steps] == [True, "dense", True, True, True]
    dense_first = ladder(cfg(method="auto", weight_range="reduced", backend="onnxruntime", depthwise_full=True), False)
    assert [c.reduce_range for c in dense_first] == ["dense", True, "dense", "dense"]
    assert [c.reduce_range for c in ladder(cfg(method="auto"), True)] == [False] * 4  # 8-bit: one form


def test_escalation_goes_past_a_failing_calibrator_and_keeps_the_first_that_passes(world, tmp_path):
    """A glare on 2 of 96 calibration images stretches min-max ranges (INT8 fails); a calibrator that
    clips rare outliers passes. No fallback rounds: the calibrators alone decide."""
    mat = material(world, "spike", tmp_path)
    esc = escalate(mat, cfg(method="auto", max_fallback_rounds=0), reference(), lambda s: None)
    steps = esc.steps
    assert steps[0]["step"] == "ptq minmax" and not steps[0]["passed"] and steps[0]["agreement"] < 0.95
    assert steps[-1]["passed"] and steps[-1]["kept"] and all(not s["passed"] for s in steps[:-1])
    assert esc.candidate.cfg.resolved_calibrator == steps[-1]["calibrator"] != "minmax"
    assert all(s["seconds"] >= 0 for s in steps) and "passes" in esc.verdict


def test_when_no_step_passes_the_best_step_is_kept_the_first_among_equals(world, tmp_path):
    """The head outlier breaks INT8 whatever the calibrator, identically: no step passes, none is
    better than the first, so the first is kept (not the last one tried)."""
    mat = material(world, "head", tmp_path)
    esc = escalate(mat, cfg(method="auto", max_fallback_rounds=0), reference(), lambda s: None)
    assert [s["passed"] for s in esc.steps] == [False] * 3
    assert len({(s["agreement"], s["drop"]) for s in esc.steps}) == 1
    assert [s["kept"] for s in esc.steps] == [True, False, False] and esc.candidate.cfg.resolved_calibrator == "minmax"
    assert "no step reached the gate" in esc.verdict


def test_pinned_method_runs_one_step_and_the_verdict_names_what_would_reach_the_gate(world, tmp_path):
    mat = material(world, "spike", tmp_path)
    esc = escalate(mat, cfg(method="ptq", max_fallback_rounds=0), reference(), lambda s: None)
    assert len(esc.steps) == 1 and not esc.steps[0]["passed"] and esc.steps[0]["kept"]
    assert "no step reached the gate" in esc.verdict and "--precision" in esc.verdict


def test_time_budget_skips_the_steps_left_and_says_so(world, tmp_path):
    mat = material(world, "spike", tmp_path)
    esc = escalate(mat, cfg(method="auto", max_fallback_rounds=0), reference(), lambda s: None, time_budget=1e-6)
    assert len(esc.steps) == 3 and "skipped" not in esc.steps[0]
    assert all("--time-budget" in s["skipped"] for s in esc.steps[1:]) and esc.steps[0]["kept"]
    assert "did not run within --time-budget" in esc.verdict


# ---- through the CLI: the target's numerics, reference for TensorRT, exit codes ---------------------

def compile_args(world, variant: str, out: Path, target: str, *extra: str) -> list[str]:
    labels = S.labels_file(out.parent / "labels.txt")
    return ["compile", str(world["models"][variant]), "--labels", str(labels), "--images", str(world["images"]),
            "--input-size", "32", "--resize", "stretch", "--mean", "127.5,127.5,127.5", "--std", "127.5,127.5,127.5",
            "--target", target, "--out", str(out), "--no-speed-check", "--calib-min", "8", *extra]


def test_compile_judges_every_round_on_the_openvino_build(world, tmp_path):
    out = tmp_path / "ov"
    assert main(compile_args(world, "head", out, "x86-cpu-openvino")) == 0
    report = json.loads((out / "report.json").read_text())
    judged = report["escalation"]["numerics"]
    assert judged["kind"] == "deployed" and judged["backend"] == "openvino" and judged["cpu"]["isa_class"]
    m = read_manifest(out)
    assert m.quantization["float_layers"] == [HEAD] and m.gate["decided_by"] == "the openvino build"
    ov = next(b for b in m.builds if b["backend"] == "openvino")
    kept = next(s for s in report["escalation"]["steps"] if s.get("kept"))
    assert ov["gate"]["agreement"] == pytest.approx(kept["agreement"])  # the loop saw what the build gate sees
    assert m.gate["deployable"] is True and ov["gate"]["numerics"] == "deployed"


def test_compile_for_tensorrt_is_judged_in_reference_numerics(world, tmp_path):
    out = tmp_path / "trt"
    assert main(compile_args(world, "plain", out, "jetson-orin-nano", "--method", "ptq")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["escalation"]["numerics"]["kind"] == "reference"
    config = json.loads((out / "builds" / "tensorrt" / "build_config.json").read_text())
    pre = config["pre_build_gate"]
    assert pre["numerics"] == "reference" and pre["passed"] and "host_kernels" in pre
    assert pre["host_kernels"]["cpu"]["isa_class"] and "never deciding" in pre["host_kernels"]["note"]
    m = read_manifest(out)
    assert m.gate["numerics"] == "reference" and m.gate["decided_by"] == "the reference numerics"
    x = np.load(out / "checkset.npz")
    ref = reference().logits(out / "model_int8.onnx", x["inputs"], None).argmax(1)
    assert pre["agreement"] == pytest.approx(float((ref == x["float_logits"].argmax(1)).mean()))


def test_compile_exits_1_on_a_failed_gate_and_keeps_the_artifact_not_deployable(world, tmp_path, capsys):
    out = tmp_path / "bad"
    rc = main(compile_args(world, "head", out, "x86-cpu-onnxruntime", "--method", "ptq", "--max-fallback-rounds", "0"))
    assert rc == 1
    err = capsys.readouterr().err
    assert "failed its gate" in err and "Traceback" not in err
    m = read_manifest(out)
    assert m.gate["deployable"] is False and "NOT DEPLOYABLE" in (out / "report.md").read_text()


def test_check_reference_is_the_artifact_gate_and_the_same_verdict(world, tmp_path, capsys):
    out = tmp_path / "ort"
    assert main(compile_args(world, "plain", out, "x86-cpu-onnxruntime", "--method", "ptq")) == 0
    before = read_manifest(out).gate
    assert main(["check", str(out), "--backend", "reference"]) == 0
    printed = capsys.readouterr().out
    assert "reference numerics" in printed and "margins" in printed and "stability" in printed
    after = read_manifest(out).gate
    assert after["agreement"] == before["agreement"] and after["numerics"] == "reference"
    assert {k: after["margins"][k] for k in ("agreement", "drop")} == before["margins"] and after["deployable"] is True
    assert after["stability"]["perturbations"]  # `check --backend reference` measures stability too


def _scripted_rounds(script, seek_margin, max_rounds=3, perfect=False, log=lambda s: None):
    """fallback_rounds over a scripted judge: ``script[n]`` = (passed, smallest margin) of the round
    with n layers in float; the ranking gains for layers L0, L1, ..."""
    from types import SimpleNamespace

    from edgetl.repair import Verdict, fallback_rounds

    rendered: list[list[str]] = []

    def render(exclude):
        rendered.append(list(exclude))
        return len(exclude)

    def judge(n):
        ok, margin = script[n]
        row = {"agreement": 1.0 if perfect else 0.99 if ok else 0.9, "drop": 0.0 if perfect else 0.1,
               "stability": None, "accuracy_passed": ok,
               "margins": {"agreement": margin, "drop": margin + 5}}
        return Verdict(ok, row, n, f"{n} float")

    ranking = [SimpleNamespace(node=f"L{i}", gain_db=10.0 - i) for i in range(6)]
    v, exclude, rounds, _ = fallback_rounds(render, judge, lambda kept: ranking, max_rounds, 1, log,
                                            ranking=ranking, seek_margin=seek_margin)
    return v, exclude, rounds, rendered


def test_a_pass_on_the_line_seeks_margin_and_keeps_the_largest():
    """Round 0 passes 0 images from a threshold: with seek_margin 2 one more layer goes to float,
    that round passes with 3 images to spare and is kept; without seeking round 0 is kept as before."""
    v, exclude, rounds, _ = _scripted_rounds({0: (True, 0), 1: (True, 3)}, seek_margin=2)
    assert exclude == ["L0"] and v.gate == 1 and [x["kept"] for x in rounds] == [False, True]
    v, exclude, rounds, _ = _scripted_rounds({0: (True, 0), 1: (True, 3)}, seek_margin=0)
    assert exclude == [] and len(rounds) == 1
    # the margin already enough: no extra round
    _, exclude, rounds, _ = _scripted_rounds({0: (True, 2), 1: (True, 9)}, seek_margin=2)
    assert exclude == [] and len(rounds) == 1
    # a perfect round on a small checkset (margin 0 is its largest): nothing to seek
    _, exclude, rounds, _ = _scripted_rounds({0: (True, 0), 1: (True, 3)}, seek_margin=2, perfect=True)
    assert exclude == [] and len(rounds) == 1


def test_seeking_margin_never_trades_a_pass_for_a_miss_and_stops_after_two_rounds():
    # the extra rounds miss, or pass with less margin: round 0 is re-rendered and kept
    v, exclude, rounds, rendered = _scripted_rounds({0: (True, 1), 1: (False, -2), 2: (True, 0)}, seek_margin=2)
    assert exclude == [] and v.gate == 0 and v.passed and rendered[-1] == [] and rounds[0]["kept"]
    # at most two rounds spent seeking; the best margin among the passes is kept (ties: fewer float layers)
    said: list[str] = []
    v, exclude, rounds, _ = _scripted_rounds({0: (True, 0), 1: (True, 1), 2: (True, 1), 3: (True, 9)}, seek_margin=2,
                                             log=said.append)
    assert len(rounds) == 3 and exclude == ["L0"] and v.gate == 1
    seeking = [x for x in said if "in search of margin" in x]  # each names the widest pass so far, not the first
    assert [x.split("(round ")[1][0] for x in seeking] == ["0", "1"] and "is 1 image(s)" in seeking[1]
    # a miss first, then a pass on the line, then a pass with margin: the margin is found
    v, exclude, rounds, _ = _scripted_rounds({0: (False, -3), 1: (True, 0), 2: (True, 4)}, seek_margin=2)
    assert exclude == ["L0", "L1"] and v.gate == 2
    # the first pass at the last of --max-fallback-rounds: seeking goes past it; misses alone stop there
    v, exclude, rounds, _ = _scripted_rounds({0: (False, -3), 1: (True, 0), 2: (True, 4)}, seek_margin=2,
                                             max_rounds=1)
    assert exclude == ["L0", "L1"] and v.gate == 2
    _, _, rounds, _ = _scripted_rounds({0: (False, -3), 1: (False, -1), 2: (True, 4)}, seek_margin=2, max_rounds=1)
    assert len(rounds) == 2
