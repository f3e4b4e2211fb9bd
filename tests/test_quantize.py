"""``edgetl quantize`` end to end on a tiny trained run: PTQ, QAT, QDQ forms, mixed precision, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from _tinyrun import session_tiny_run
from conftest import write_image_folder
from edgetl.calibration.qdq import is_qdq, quantized_nodes
from edgetl.cli import main
from edgetl.runtime.manifest import read_manifest, sha256_file, verify_files
from edgetl.runtime.runners import open_runner

FAST = ["--calib-min", "8", "--no-speed-check"]  # toy model: Q/DQ overhead dominates its microseconds


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return session_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def ptq(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ptq") / "art"
    assert main(["quantize", str(run), "--out", str(out), "--sensitivity", *FAST]) == 0
    return out


def split_paths(run: Path, name: str) -> set[Path]:
    split = json.loads((run / "split.json").read_text())
    root = Path(split.get("root", "."))
    return {(root / s["path"]).resolve() for s in split["splits"][name]}


def test_ptq_artifact_is_complete_and_gated(ptq: Path):
    names = {p.name for p in ptq.iterdir()}
    assert {"manifest.json", "model_fp32.onnx", "model_int8.onnx", "checkset.npz", "calibration.txt", "report.md",
            "report.json", "confusion.png", "sensitivity.csv"} <= names
    m = verify_files(ptq)
    assert m.kind == "artifact" and m.backbone["name"] == "tiny_cnn" and m.input["batch"] == "dynamic"
    assert is_qdq(ptq / "model_int8.onnx")
    runner = open_runner("onnxruntime", ptq / "model_int8.onnx")
    assert runner.infer(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 3)
    q = m.quantization
    assert q["method"] == "ptq" and q["calibrator"] == "minmax" and q["qdq_format"] == "u8s8-asymmetric-per-channel"
    assert q["calibration_sha256"] == sha256_file(ptq / "calibration.txt") and q["float_layers"] == []
    assert q["parity"]["passed"] and q["parity"]["top1_agreement"] == 1.0
    g = m.gate
    assert g["passed"] and g["deployable"] and 0.0 <= g["agreement"] <= 1.0 and g["n"] > 0
    assert g["agreement_ci"][0] <= g["agreement"] <= g["agreement_ci"][1]
    assert [b["backend"] for b in m.builds] == ["onnxruntime"] and m.builds[0]["model"] == "model_int8.onnx"
    assert "VERIFIED" in (ptq / "report.md").read_text()
    rows = (ptq / "sensitivity.csv").read_text().splitlines()
    assert len(rows) == 1 + 4  # 3 convs + the head


def test_calibration_comes_from_train_split_never_test(run: Path, ptq: Path):
    listed = {(Path(json.loads((run / "split.json").read_text())["root"]) / line).resolve()
              for line in (ptq / "calibration.txt").read_text().splitlines()}
    assert listed and listed <= split_paths(run, "train")
    assert not listed & split_paths(run, "test") and not listed & split_paths(run, "val")
    with np.load(ptq / "checkset.npz") as data:
        assert set(data.files) >= {"inputs", "labels", "float_logits"}
        root = Path(json.loads((run / "split.json").read_text())["root"])
        assert {(root / p).resolve() for p in data["paths"]} <= split_paths(run, "test")
        assert data["inputs"].dtype == np.float32 and data["inputs"].shape[1:] == (3, 32, 32)


def test_qat_produces_a_qdq_onnx_rendered_from_the_qat_result(run: Path, tmp_path: Path):
    out = tmp_path / "qat"
    rc = main(["quantize", str(run), "--out", str(out), "--method", "qat", "--qat-epochs", "1", "--qat-lr", "1e-4",
               "--qat-perturb", "0.5", "--all-forms", *FAST])
    m = read_manifest(out)
    assert rc == (0 if m.gate["passed"] else 1)
    assert is_qdq(out / "model_int8.onnx") and m.quantization["method"] == "qat"
    qat = m.quantization["qat"]
    assert qat["epochs"] == 1 and qat["learned_ranges"] > 0 and "HISTOGRAM" in qat["init"]
    assert qat["objective"] == "distill" and len(qat["loss"]) == 1 and qat["perturb"] == 0.5
    assert 0.0 <= m.gate["agreement"] <= 1.0
    forms = {f["form"]: f for f in json.loads((out / "report.json").read_text())["forms"]}
    assert set(forms) == {"u8s8-asymmetric-per-channel", "s8s8-symmetric-per-channel", "nncf-native"}
    for f in forms.values():
        if f.get("file"):
            assert is_qdq(out / f["file"])
    verify_files(out)


def test_tensorrt_form_is_conformant_and_its_speed_is_not_gated_on_ort(run: Path, tmp_path: Path):
    from edgetl.backends.trt_conformance import check as trt_check

    out = tmp_path / "trt"
    assert main(["quantize", str(run), "--out", str(out), "--backend", "tensorrt", "--calib-min", "8"]) == 0
    m = read_manifest(out)
    assert m.quantization["qdq_format"] == "s8s8-symmetric-per-channel" and m.quantization["for_backend"] == "tensorrt"
    assert trt_check(out / "model_int8.onnx", "10.3").ok
    # the artifact for TensorRT is judged in reference numerics; ONNX Runtime's build is measured beside it
    assert m.gate["numerics"] == "reference" and m.gate["decided_by"] == "the reference numerics"
    assert m.quantization["judged_on"]["kind"] == "reference" and m.quantization["weight_range"] == "full"
    ort = m.builds[0]["gate"]
    assert ort["speed"] is not None and ort["speed"]["gated"] is False and "not gated" in ort["speed_note"]
    assert not (out / "sensitivity.csv").exists()  # lazy by default: round 0 passed, no ranking needed


def test_failed_gate_falls_back_to_float_layers_and_marks_the_artifact_not_deployable(run: Path, tmp_path: Path):
    """Calibrating on flat grey images collapses every range: INT8 misses the gate; the fallback keeps
    the layers that gain in float (leave-one-out sensitivity), stops when none is left, and the
    artifact is written but marked not deployable."""
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(10):
        cv2.imwrite(str(grey / f"g{i}.png"), np.full((40, 40, 3), 128, np.uint8))
    out = tmp_path / "mp"
    rc = main(["quantize", str(run), "--out", str(out), "--calib-dir", str(grey), "--max-fallback-rounds", "3",
               *FAST])
    assert rc == 1
    m = verify_files(out)
    rows = [line.split(",") for line in (out / "sensitivity.csv").read_text().splitlines()[1:]]
    helpful = [r[1] for r in rows if float(r[3]) > 0]
    rounds = json.loads((out / "report.json").read_text())["rounds"]
    assert len(rounds) >= 2 and rounds[0]["float_layers"] == [] and rounds[1]["float_layers"] == helpful[:1]
    for a, b in zip(rounds, rounds[1:]):  # each round keeps one more layer in float
        assert b["float_layers"][:-1] == a["float_layers"] and len(b["float_layers"]) == len(a["float_layers"]) + 1
    kept = [r for r in rounds if r["kept"]]
    assert len(kept) == 1 and m.quantization["float_layers"] == kept[0]["float_layers"]
    assert not set(m.quantization["float_layers"]) & set(quantized_nodes(out / "model_int8.onnx"))
    assert m.gate["passed"] is False and m.gate["deployable"] is False
    report = (out / "report.md").read_text()
    assert "NOT DEPLOYABLE" in report and "What to try" in report and "--method qat" in report


def test_speed_gate_failure_still_writes_the_artifact_marked_not_deployable(run: Path, tmp_path: Path):
    out = tmp_path / "slow"
    rc = main(["quantize", str(run), "--out", str(out), "--calib-min", "8", "--no-sensitivity",
               "--min-speedup", "1000"])
    assert rc == 1
    m = verify_files(out)  # the ONNX Runtime build decides: its speed misses, its accuracy does not
    ort = m.builds[0]["gate"]
    assert m.gate["deployable"] is False and ort["passed"] is False
    assert [f.split(":")[0] for f in ort["failures"]] == ["speed"] and m.gate["passed"] is True
    assert m.quantization["float_layers"] == []  # a speed failure is not fixed by float layers


def no_partial(parent: Path) -> bool:
    return not any(".partial" in p.name for p in parent.iterdir())


def test_bad_inputs_are_clear_errors_and_leave_nothing(run: Path, tmp_path: Path, capsys):
    out = tmp_path / "art"
    assert main(["quantize", str(tmp_path / "no-run"), "--out", str(out)]) == 2
    assert "no such run folder" in capsys.readouterr().err and not out.exists()

    few = write_image_folder(tmp_path / "few", n_per_class=3)
    assert main(["quantize", str(run), "--out", str(out), "--calib-dir", str(few)]) == 2
    err = capsys.readouterr().err
    assert "only 6 images" in err and "hint" in err and not out.exists() and no_partial(tmp_path)

    assert main(["quantize", str(run), "--out", str(out), "--calib-size", "500"]) == 2
    assert "exactly" in capsys.readouterr().err and not out.exists()

    assert main(["quantize", str(run), "--out", str(out), "--max-drop", "-1"]) == 2
    assert "--max-drop -1" in capsys.readouterr().err and not out.exists()

    assert main(["quantize", str(run), "--out", str(out), "--method", "qat", "--calibrator", "entropy"]) == 2
    assert "cannot initialise QAT" in capsys.readouterr().err and not out.exists()
    assert no_partial(tmp_path)


def test_calib_dir_with_test_images_is_refused(run: Path, tmp_path: Path, capsys):
    train, test = sorted(split_paths(run, "train")), sorted(split_paths(run, "test"))
    clean = tmp_path / "clean"
    clean.mkdir()
    for p in train[:10]:
        (clean / p.name).write_bytes(p.read_bytes())
    assert main(["quantize", str(run), "--out", str(tmp_path / "a"), "--calib-dir", str(clean), "--no-sensitivity",
                 *FAST]) == 0
    assert read_manifest(tmp_path / "a").quantization["calibration_source"] == f"dir:{clean}"
    leak = tmp_path / "leak"
    leak.mkdir()
    for i, p in enumerate(train[:10] + test[:2]):  # test images copied under new names still count
        (leak / f"img{i}.png").write_bytes(p.read_bytes())
    assert main(["quantize", str(run), "--out", str(tmp_path / "b"), "--calib-dir", str(leak), *FAST]) == 2
    assert "2 calibration image(s) are in the run's test split" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and no_partial(tmp_path)


def test_static_batch_artifact(run: Path, tmp_path: Path):
    out = tmp_path / "static"
    assert main(["quantize", str(run), "--out", str(out), "--static-batch", "4", "--no-sensitivity", *FAST]) == 0
    m = read_manifest(out)
    assert m.input["batch"] == 4
    for name in ("model_fp32.onnx", "model_int8.onnx"):
        r = open_runner("onnxruntime", out / name)
        assert r.fixed_batch == 4 and r.infer_many(np.zeros((6, 3, 32, 32), np.float32)).shape == (6, 3)
