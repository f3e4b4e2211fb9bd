"""The accuracy gate: statistics, verdicts, ``edgetl check`` on faithful / broken / tampered artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _tinyrun import session_tiny_run
from edgetl.check import (Checkset, Thresholds, check_artifact, evaluate, gate_from_logits, load_checkset,
                          measure_speed, paired_bootstrap_drop, wilson)
from edgetl.cli import main
from edgetl.runtime.errors import EdgetlError
from edgetl.runtime.manifest import hash_files, read_manifest, verify_files, write_manifest
from edgetl.runtime.runners import open_runner


# ---- statistics and verdicts (no model) ----------------------------------------------------

def test_wilson_interval():
    lo, hi = wilson(90, 100)
    assert lo == pytest.approx(0.8256, abs=1e-3) and hi == pytest.approx(0.9448, abs=1e-3)
    lo, hi = wilson(50, 50)
    assert hi == 1.0 and 0.92 < lo < 0.94  # perfect agreement on 50 images is still uncertain


def test_paired_bootstrap_drop():
    same = np.array([1, 0, 1, 1] * 25, bool)
    assert paired_bootstrap_drop(same, same) == (0.0, 0.0)
    quant = same.copy()
    quant[:10] = False  # 10 of the right answers lost: 7.5 points
    lo, hi = paired_bootstrap_drop(same, quant)
    assert 0 < lo < 7.5 < hi < 15


def make_checkset(n_per_class: int = 20, k: int = 3, seed: int = 0) -> Checkset:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per_class)
    logits = rng.normal(0, 0.3, size=(len(labels), k)).astype(np.float32)
    logits[np.arange(len(labels)), labels] += 3.0  # the float model is right everywhere
    return Checkset(np.zeros((len(labels), 3, 8, 8), np.float32), labels, logits)


def test_gate_passes_identical_logits_and_fails_a_class_collapse():
    cs = make_checkset()
    ok = gate_from_logits(cs.float_logits + 0.01, cs, Thresholds(), labels=("a", "b", "c"))
    assert ok.passed and ok.drop == 0 and ok.agreement == 1.0 and ok.worst_classes == []
    assert ok.max_logit_error == pytest.approx(0.01, abs=1e-5)
    broken = cs.float_logits.copy()
    broken[cs.labels == 2] = broken[cs.labels == 2][:, [2, 0, 1]]  # class c now predicted as a
    bad = gate_from_logits(broken, cs, Thresholds(), labels=("a", "b", "c"))
    assert not bad.passed and bad.drop == pytest.approx(100 / 3, abs=1e-6)
    assert bad.agreement == pytest.approx(2 / 3)
    assert bad.worst_classes[0]["label"] == "c" and bad.worst_classes[0]["recall_quant"] == 0.0
    assert {p["label"]: p["recall_quant"] for p in bad.per_class} == {"a": 1.0, "b": 1.0, "c": 0.0}
    assert any(f.startswith("accuracy") for f in bad.failures) and any(f.startswith("agreement") for f in bad.failures)
    assert any("--method qat" in s for s in bad.suggestions)
    assert np.array(bad.confusion_quant)[2, 0] == 20


def test_thresholds_validation_and_target_gate():
    from edgetl.targets import Gate

    th = Thresholds.coerce(Gate(max_accuracy_drop=0.5, min_agreement=0.99))
    assert th.max_drop == 0.5 and th.min_agreement == 0.99
    assert Thresholds.coerce({"max_drop": 2, "speed_check": False}).speed_check is False
    with pytest.raises(EdgetlError, match="--max-drop -1"):
        Thresholds(max_drop=-1)
    with pytest.raises(EdgetlError, match="--min-agreement"):
        Thresholds(min_agreement=1.5)


def test_checkset_errors(tmp_path: Path):
    with pytest.raises(EdgetlError, match="no checkset"):
        load_checkset(tmp_path)
    np.savez(tmp_path / "checkset.npz", inputs=np.zeros((2, 3)), labels=np.zeros(2))
    with pytest.raises(EdgetlError, match="float_logits"):
        load_checkset(tmp_path)
    cs = make_checkset(2)
    cs.save(tmp_path / "checkset.npz")
    back = load_checkset(tmp_path)
    assert np.array_equal(back.float_logits, cs.float_logits) and np.array_equal(back.labels, cs.labels)


# ---- on a real quantized artifact ----------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    run = session_tiny_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("chk") / "art"
    assert main(["quantize", str(run), "--out", str(out), "--calib-min", "8", "--no-speed-check",
                 "--no-sensitivity"]) == 0
    return out


@pytest.fixture
def copy(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "art"))


def test_check_passes_a_faithful_artifact_and_keeps_hashes_valid(copy: Path, capsys):
    assert main(["check", str(copy), "--no-speed-check"]) == 0
    out = capsys.readouterr().out
    assert "gate PASSED" in out and "agreement" in out
    m = verify_files(copy)
    assert m.gate["passed"] and m.builds[0]["gate"]["passed"]
    assert json.loads((copy / "report.json").read_text())["gate"]["passed"] is True


def scale_activation_quantizers(path: Path, factor: float) -> None:
    """Break a QDQ graph the way a bad calibration would: every activation scale multiplied."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    weights = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    done = set()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] not in weights \
                and node.input[1] in inits and node.input[1] not in done:
            t = inits[node.input[1]]
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * factor, t.name))
            done.add(node.input[1])
    assert done
    onnx.save(model, str(path))


def test_check_fails_a_broken_qdq_graph_with_exit_1(copy: Path, capsys):
    scale_activation_quantizers(copy / "model_int8.onnx", 40.0)
    m = read_manifest(copy)
    write_manifest(m.replace(files=hash_files(copy)), copy)  # rehashed: the model is broken, not tampered
    assert main(["check", str(copy), "--no-speed-check"]) == 1
    out = capsys.readouterr().out
    assert "gate FAILED" in out and "try:" in out
    m = verify_files(copy)  # the ONNX Runtime build decides an artifact quantized for ONNX Runtime
    assert m.gate["deployable"] is False and m.builds[0]["gate"]["passed"] is False
    assert m.gate["decided_by"] == "the onnxruntime build"
    assert "NOT DEPLOYABLE" in (copy / "report.md").read_text()


def test_tampered_file_is_refused(copy: Path, capsys):
    with open(copy / "model_int8.onnx", "ab") as fh:
        fh.write(b"\0")
    before = (copy / "manifest.json").read_text()
    assert main(["check", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "model_int8.onnx" in err and "does not match" in err
    assert (copy / "manifest.json").read_text() == before


def test_check_of_a_run_or_missing_folder_is_a_clear_error(tmp_path_factory, tmp_path: Path, capsys):
    assert main(["check", str(tmp_path / "nope")]) == 2
    assert "no such artifact" in capsys.readouterr().err
    assert main(["check", str(session_tiny_run(tmp_path_factory))]) == 2
    assert "not an artifact" in capsys.readouterr().err
    assert main(["check", str(tmp_path), "--max-drop", "-2"]) == 2


def test_speed_is_part_of_the_gate(copy: Path):
    q = open_runner("onnxruntime", copy / "model_int8.onnx")
    f = open_runner("onnxruntime", copy / "model_fp32.onnx")
    cs = load_checkset(copy)
    s = measure_speed(f, q, cs.inputs, repeats=5)
    assert s.float_ms > 0 and s.quant_ms > 0 and s.speedup == pytest.approx(s.float_ms / s.quant_ms)
    strict = evaluate(q, cs, Thresholds(min_speedup=1000, speed_repeats=5), float_runner=f)
    assert not strict.passed and strict.failures[0].startswith("speed") and strict.speed["gated"]
    relaxed = evaluate(q, cs, Thresholds(speed_check=False), float_runner=f)
    assert relaxed.passed and relaxed.speed is None
    untimed = evaluate(q, cs, Thresholds())  # no float model on this backend: measured nothing, gated nothing
    assert untimed.passed and untimed.speed is None and "not measured" in untimed.speed_note


def test_no_update_leaves_the_artifact_alone(copy: Path):
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    result = check_artifact(copy, thresholds=Thresholds(min_speedup=1000, speed_repeats=5), update=False)
    assert not result.passed
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before


def test_check_of_a_missing_build_backend(copy: Path):
    with pytest.raises(EdgetlError, match="has no openvino build"):
        check_artifact(copy, backend="openvino")


def test_failed_gate_hint_comes_from_what_was_tried():
    """The hint of a failed gate never suggests what the compile already did (issue #18)."""
    from edgetl.check import SUGGEST_ACCURACY, SUGGEST_SPEED, next_steps

    gate = {"passed": False, "failures": ["agreement: 0.9700 < --min-agreement 0.98 (2 image(s) short)"],
            "suggestions": list(SUGGEST_ACCURACY)}
    ptq_only = {"method": "ptq", "fallback_rounds": 1, "max_fallback_rounds": 3,
                "ladder": [{"step": "ptq minmax"}, {"step": "qat mse", "skipped": "--time-budget"}]}
    hint = next_steps(gate, ptq_only)
    assert hint.startswith("tried: ptq minmax; next:") and "--method qat" in hint and "another calibrator" in hint
    everything = {"method": "qat", "fallback_rounds": 3, "max_fallback_rounds": 3, "qat": {"epochs": 2},
                  "ladder": [{"step": "ptq minmax"}, {"step": "ptq percentile"}, {"step": "qat mse"}]}
    hint = next_steps(gate, everything)
    assert "tried: ptq minmax, ptq percentile, qat mse" in hint
    assert "--method qat" not in hint and "another calibrator" not in hint
    assert "--qat-epochs 4" in hint and "more float layers than the 3 rounds" in hint
    assert "--no-speed-check" not in hint  # only a failed speed check suggests it
    speed = {"passed": False, "failures": ["speed: ..."], "suggestions": list(SUGGEST_SPEED)}
    assert "--no-speed-check" in next_steps(speed, ptq_only)
    assert "report.md" in next_steps({"passed": False, "failures": ["x"]}, None)
    from edgetl.check import SUGGEST_STABILITY

    unstable = {**gate, "suggestions": [SUGGEST_STABILITY, *SUGGEST_ACCURACY]}
    assert "--qat-perturb 0.5" in next_steps(unstable, everything)  # QAT ran on the images as loaded
    perturbed = {**everything, "qat": {"epochs": 2, "perturb": 0.5}}
    assert "--qat-perturb" not in next_steps(unstable, perturbed)  # already done: not suggested again
