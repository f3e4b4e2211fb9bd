"""`edgetl build` and `edgetl compile` end to end on tiny models."""

from __future__ import annotations

import json

import pytest

from _tinyqdq import make_qdq_artifact
from _tinyrun import PRE, TINY, flat_images, onnx_and_images
from edgetl.cli import main
from edgetl.runtime.manifest import read_manifest, verify_files


def test_build_cli_records_build(tmp_path, capsys):
    art = make_qdq_artifact(tmp_path / "art")
    assert main(["build", str(art), "--target", "x86-cpu-onnxruntime", "--no-gate"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "model_int8.onnx" in out
    m = verify_files(art)
    assert [b["backend"] for b in m.builds] == ["onnxruntime"] and m.target["name"] == "x86-cpu-onnxruntime"
    # without --target the recorded profile is used; --backend picks another backend's options from it
    assert main(["build", str(art), "--backend", "openvino", "--set", 'openvino.inference_precision="f32"',
                 "--no-gate"]) == 0
    m = verify_files(art)
    assert [b["backend"] for b in m.builds] == ["openvino", "onnxruntime"]
    assert m.builds[0]["precision"] == "int8+f32"


def test_build_cli_without_target_refused(tmp_path, capsys):
    art = make_qdq_artifact(tmp_path / "art")
    assert main(["build", str(art), "--no-gate"]) == 2
    assert "records no target" in capsys.readouterr().err


def test_build_cli_tensorrt_on_host_writes_config(tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is importable here: this test is about a host without it")
    except ImportError:
        pass
    art = make_qdq_artifact(tmp_path / "art")
    assert main(["build", str(art), "--target", "jetson-xavier-nx", "--no-gate"]) == 0
    out = capsys.readouterr().out
    assert "build_config.json" in out and "copy the artifact to the device" in out
    cfg = json.loads((art / "builds/tensorrt/build_config.json").read_text())
    assert cfg["target"] == "jetson-xavier-nx" and cfg["flags"] == ["INT8", "FP16"]
    assert read_manifest(art).target["build_config"] == "builds/tensorrt/build_config.json"
    # int8 on a Jetson Nano is refused before anything is written
    assert main(["build", str(art), "--target", "jetson-nano", "--precision", "int8", "--no-gate"]) == 2
    assert "Maxwell" in capsys.readouterr().err


def test_build_cli_gate_failure_exits_nonzero(tmp_path, capsys):
    import numpy as np

    from edgetl.runtime.manifest import hash_files, write_manifest

    art = make_qdq_artifact(tmp_path / "art")
    data = dict(np.load(art / "checkset.npz"))
    data["float_logits"] = data["float_logits"][:, ::-1].copy()
    np.savez(art / "checkset.npz", **data)
    write_manifest(read_manifest(art).replace(files=hash_files(art)), art)
    assert main(["build", str(art), "--target", "x86-cpu-onnxruntime", "--no-speed-check"]) == 1
    assert "failed its gate" in capsys.readouterr().err
    assert verify_files(art).builds[0]["gate"]["passed"] is False


# ---- edgetl compile: a tiny trained run, end to end ------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from _tinyrun import session_tiny_run

    return session_tiny_run(tmp_path_factory)


@pytest.mark.parametrize("target,method", [("x86-cpu-openvino", "ptq"), ("x86-cpu-onnxruntime", None)])
def test_compile_run_passes_gate(tiny_run, tmp_path, capsys, target, method):
    if target.endswith("openvino"):
        pytest.importorskip("openvino", reason="openvino is not installed")
    out = tmp_path / "artifacts" / "tiny"
    args = ["compile", str(tiny_run), "--target", target, "--out", str(out), *TINY]
    args += ["--method", method] if method else ["--qat-epochs", "1", "--qat-max-images", "16"]  # profile: auto
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "deployable" in text and "yes" in text
    # the verdicts that do not decide this artifact say which one does; the deciding one says nothing more
    aside = "(for the record: deployed ("
    ref_line = next(x for x in text.splitlines() if "in reference numerics: top-1" in x)
    ort_line = next(x for x in text.splitlines() if "on ONNX Runtime's kernels on this CPU" in x)
    assert aside in ref_line and (aside in ort_line) == target.endswith("openvino")
    m = verify_files(out)
    assert m.kind == "artifact" and m.gate["passed"] and m.target["name"] == target
    assert m.gate["deployable"] and m.gate["decided_by"] == f"the {m.target['backend']} build"
    if method:
        assert m.quantization["method"] == method and len(m.quantization["ladder"]) == 1
    else:  # the ladder stops at its first step that passes: PTQ min-max on this easy model
        assert m.quantization["method"] == "ptq" and [x["step"] for x in m.quantization["ladder"]] == ["ptq minmax"]
    if method == "qat":
        assert m.quantization["qat"]["epochs"] >= 1
    backend = m.target["backend"]
    build = next(b for b in m.builds if b["backend"] == backend)
    assert build["gate"]["passed"] and build["gate"]["runner"]["backend"] == backend
    if backend == "openvino":
        assert build["precision"] == "int8+f32" and (out / build["model"]).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no temp folder left behind
    # `edgetl check ARTIFACT` re-gates the build the target runs, not only the QDQ graph on ONNX Runtime
    assert main(["check", str(out), "--no-speed-check", "--no-update"]) == 0
    assert f"gate: {backend} {build['model']}" in capsys.readouterr().out


def test_compile_run_for_jetson_on_host(tiny_run, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is importable here: the engine would be built instead")
    except ImportError:
        pass
    out = tmp_path / "orin"
    assert main(["compile", str(tiny_run), "--target", "jetson-agx-orin", "--method", "ptq", "--set",
                 "tensorrt.dla_core=0", "--out", str(out), *TINY]) == 0
    m = verify_files(out)
    assert m.quantization["qdq_format"].startswith("s8s8")  # the form TensorRT takes
    cfg = json.loads((out / "builds/tensorrt/build_config.json").read_text())
    assert cfg["pre_build_gate"]["passed"] and all(c["ok"] for c in cfg["conformance"].values())
    assert cfg["device_type"] == "DLA" and cfg["static_shapes"] and cfg["engine"] is None


def test_compile_fp16_target_exports_float(tiny_run, tmp_path):
    import onnx

    out = tmp_path / "nano"
    assert main(["compile", str(tiny_run), "--target", "jetson-nano", "--out", str(out), *TINY]) == 0
    m = verify_files(out)
    assert m.quantization is None and not (out / "model_int8.onnx").exists()
    assert onnx.load(str(out / "model_fp32.onnx")).opset_import[0].version == 13  # TensorRT 8.2's parser limit
    cfg = json.loads((out / "builds/tensorrt/build_config.json").read_text())
    assert cfg["flags"] == ["FP16"] and cfg["onnx"] == "model_fp32.onnx"


def test_compile_refusals_write_nothing(tiny_run, tmp_path, capsys):
    out = tmp_path / "nano8"
    assert main(["compile", str(tiny_run), "--target", "jetson-nano", "--precision", "int8", "--out", str(out)]) == 2
    assert "Maxwell" in capsys.readouterr().err and not out.exists()
    assert main(["compile", str(tiny_run), "--target", "x86-cpu-onnxruntime", "--out", str(out), "--calib-size",
                 "5000", "--no-speed-check"]) == 2
    assert not out.exists() and not list(tmp_path.glob(".nano8*"))


def test_compile_bare_onnx_with_labelled_images(tiny_run, tmp_path, capsys):
    model, labels, images = onnx_and_images(tiny_run, tmp_path)
    out = tmp_path / "ext"
    assert main(["compile", str(model), "--labels", str(labels), "--images", str(images), *PRE,
                 "--target", "x86-cpu-onnxruntime", "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert "PTQ" in text
    m = verify_files(out)
    assert m.quantization["method"] == "ptq" and m.quantization["labels"].startswith("from --images")
    assert m.gate["passed"] and m.gate["float_top1"] > 0.5 and m.builds[0]["gate"]["passed"]
    cal = set((out / "calibration.txt").read_text().split())
    from edgetl.check import load_checkset

    assert cal and not cal & set(load_checkset(out).paths)  # calibration and checkset are disjoint


def test_compile_bare_onnx_without_labels_gates_agreement_only(tiny_run, tmp_path, capsys):
    model, labels, images = onnx_and_images(tiny_run, tmp_path)
    flat = flat_images(images, tmp_path / "flat")
    out = tmp_path / "ext2"
    assert main(["compile", str(model), "--labels", str(labels), "--images", str(flat), *PRE,
                 "--target", "x86-cpu-onnxruntime", "--out", str(out), *TINY]) == 0
    assert "agreement with the float model only" in capsys.readouterr().out
    m = verify_files(out)
    assert m.quantization["labels"].startswith("none") and m.gate["float_top1"] == 1.0  # labels = float argmax
    assert m.gate["thresholds"]["max_drop"] == 100.0 and m.gate["passed"]


def test_compile_bare_onnx_needs_preprocessing(tiny_run, tmp_path, capsys):
    model, labels, images = onnx_and_images(tiny_run, tmp_path)
    assert main(["compile", str(model), "--labels", str(labels), "--images", str(images),
                 "--target", "x86-cpu-onnxruntime", "--out", str(tmp_path / "x")]) == 2
    assert "--preprocess" in capsys.readouterr().err


@pytest.mark.parametrize("option,value", [("--qat-max-images", "0"), ("--qat-perturb", "1.5")])
def test_compile_refuses_bad_qat_options(tiny_run, tmp_path, capsys, option, value):
    out = tmp_path / "bad"
    assert main(["compile", str(tiny_run), "--target", "x86-cpu-onnxruntime", "--out", str(out), option, value]) == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err and not out.exists()
