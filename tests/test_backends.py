"""Backend builds of a tiny QDQ artifact: ONNX Runtime and OpenVINO build, load and run here; the
recorded OpenVINO precision is the one the compiled model really uses; TensorRT is prepared on the
host (configuration + conformance) and its engine key / missing-package refusals are checked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _tinyqdq import SPEC, make_qdq_artifact
from edgetl.backends import build_artifact, profile_from_manifest
from edgetl.backends.tensorrt import resolve_build_config
from edgetl.runtime.errors import EdgetlError
from edgetl.runtime.manifest import read_manifest, verify_files
from edgetl.runtime.preprocess import build_input_spec, to_model_input
from edgetl.runtime.runners import open_runner
from edgetl.runtime.runners.tensorrt import check_engine_key, engine_file_name
from edgetl.targets import apply_overrides, load_target

QUIET = dict(progress=lambda s: None)


@pytest.fixture
def artifact(tmp_path):
    return make_qdq_artifact(tmp_path / "art")


def _ort_logits(art, name="model_int8.onnx"):
    x = np.load(art / "checkset.npz")["inputs"]
    return x, open_runner("onnxruntime", art / name, {}).infer(x)


def test_onnxruntime_build_records_entry_and_rehashes(artifact):
    profile = load_target("x86-cpu-onnxruntime")
    outcome = build_artifact(artifact, profile, gate=False, **QUIET)
    m = verify_files(artifact)  # the rewritten manifest's hashes hold
    (entry,) = m.builds
    assert entry["backend"] == "onnxruntime" and entry["model"] == "model_int8.onnx"
    assert entry["options"] == profile.options_for() and entry["version"]
    assert m.target["name"] == "x86-cpu-onnxruntime"
    assert profile_from_manifest(m).to_dict() == profile.to_dict()
    x, ref = _ort_logits(artifact)
    out = open_runner("onnxruntime", artifact / entry["model"], entry["options"]).infer(x)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    assert outcome.entry is entry or outcome.entry == dict(entry)


def test_openvino_build_pinned_f32(artifact):
    ov = pytest.importorskip("openvino", reason="openvino is not installed")
    outcome = build_artifact(artifact, load_target("x86-cpu-openvino"), gate=False, **QUIET)
    entry = outcome.entry
    assert (artifact / "builds/openvino/model.xml").is_file() and (artifact / "builds/openvino/model.bin").is_file()
    assert entry["model"] == "builds/openvino/model.xml"
    # what was recorded is what the compiled model reports, read back independently here
    compiled = ov.Core().compile_model(str(artifact / entry["model"]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    assert entry["inference_precision"] == "f32"
    assert entry["int8_layers"] > 0 and entry["precision"] == "int8+f32"
    assert read_manifest(artifact).builds[0]["precision"] == "int8+f32"
    # the IR (weights kept in f32) computes what the QDQ graph computes in ONNX Runtime; it takes the
    # uint8 NHWC image (the profile folds the normalisation into it)
    assert entry["input"] == {"dtype": "uint8", "layout": "NHWC"}
    x, ref = _ort_logits(artifact)
    xq = to_model_input(x, SPEC, build_input_spec(SPEC, entry["input"]))
    assert xq.dtype == np.uint8 and xq.shape == (len(x), 32, 32, 3)
    out = open_runner("openvino", artifact / entry["model"], entry["options"]).infer_many(xq)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert np.abs(out - ref).max() <= 0.05 * (np.abs(ref).max() + 1e-6) + 1e-3
    verify_files(artifact)


def test_openvino_folded_preprocessing_same_results_as_float_input(artifact, tmp_path):
    """fold_preprocessing: the IR takes the resized uint8 NHWC image and normalises it itself. The
    runtime feeds it uint8 (build_input_spec), and it predicts what the unfolded IR predicts."""
    ov = pytest.importorskip("openvino", reason="openvino is not installed")
    import shutil

    import edgetl.runtime as rt

    plain = shutil.copytree(artifact, tmp_path / "plain")
    folded_entry = build_artifact(artifact, load_target("x86-cpu-openvino"), gate=False, **QUIET).entry
    plain_entry = build_artifact(plain, apply_overrides(load_target("x86-cpu-openvino"),
                                                        sets=["openvino.fold_preprocessing=false"]),
                                 gate=False, **QUIET).entry
    assert "input" not in plain_entry and folded_entry["input"] == {"dtype": "uint8", "layout": "NHWC"}
    port = ov.Core().read_model(str(artifact / folded_entry["model"])).input(0)
    assert port.get_element_type().get_type_name() == "u8" and list(port.get_partial_shape())[1:] == [32, 32, 3]
    frames = [np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(12)]
    with rt.load(artifact) as mf, rt.load(plain) as mp:
        assert mf.spec.dtype == "uint8" and mf.spec.layout == "NHWC" and mp.spec.dtype == "float32"
        assert mf.input_tensor(frames[0]).dtype == np.uint8
        pf = np.stack([mf.probabilities(f) for f in frames])
        pp = np.stack([mp.probabilities(f) for f in frames])
    assert (pf.argmax(1) == pp.argmax(1)).mean() >= 11 / 12
    assert np.abs(pf - pp).max() < 0.05
    # the gate feeds the folded build the checkset's images as uint8 and passes like the plain one
    from edgetl.check import check_artifact
    from edgetl.backends import thresholds_for

    th = thresholds_for(load_target("x86-cpu-openvino"), speed_check=False)
    assert check_artifact(artifact, "openvino", th, update=False).passed
    assert check_artifact(plain, "openvino", th, update=False).passed


def test_openvino_default_precision_is_what_the_cpu_reports(artifact):
    ov = pytest.importorskip("openvino", reason="openvino is not installed")
    profile = apply_overrides(load_target("x86-cpu-openvino"), sets=['openvino.inference_precision="default"'])
    outcome = build_artifact(artifact, profile, gate=False, **QUIET)
    reported = ov.Core().compile_model(str(artifact / "builds/openvino/model.xml"), "CPU")
    name = reported.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    expected = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(name, name)
    assert outcome.entry["inference_precision"] == expected
    assert outcome.entry["requested_inference_precision"] == "default"
    assert any("resolved to" in n for n in outcome.notes)


def test_openvino_fp32_build_from_float_onnx(artifact):
    pytest.importorskip("openvino", reason="openvino is not installed")
    profile = apply_overrides(load_target("x86-cpu-openvino"), precision="fp32")
    entry = build_artifact(artifact, profile, gate=False, **QUIET).entry
    assert entry["precision"] == "f32" and entry["int8_layers"] == 0
    x, ref = _ort_logits(artifact, "model_fp32.onnx")
    xb = to_model_input(x, SPEC, build_input_spec(SPEC, entry.get("input")))  # folded: the uint8 image
    out = open_runner("openvino", artifact / entry["model"], entry["options"]).infer(xb)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_rebuild_replaces_the_backend_entry(artifact):
    build_artifact(artifact, load_target("x86-cpu-onnxruntime"), gate=False, **QUIET)
    build_artifact(artifact, apply_overrides(load_target("x86-cpu-onnxruntime"), sets=["onnxruntime.intra_op_threads=1"]),
                   gate=False, **QUIET)
    builds = read_manifest(artifact).builds
    assert [b["backend"] for b in builds] == ["onnxruntime"] and builds[0]["options"]["intra_op_threads"] == 1


def test_int8_build_without_qdq_graph_refused(artifact):
    (artifact / "model_int8.onnx").unlink()
    from edgetl.runtime.manifest import hash_files, write_manifest

    write_manifest(read_manifest(artifact).replace(files=hash_files(artifact)), artifact)
    with pytest.raises(EdgetlError, match="model_int8.onnx: missing"):
        build_artifact(artifact, load_target("x86-cpu-onnxruntime"), gate=False, **QUIET)


def test_tampered_artifact_refused(artifact):
    with open(artifact / "model_int8.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(EdgetlError, match="does not match the manifest"):
        build_artifact(artifact, load_target("x86-cpu-onnxruntime"), gate=False, **QUIET)


# ---- TensorRT: everything before the engine ---------------------------------------------------

def test_agx_orin_dla_build_config_static_with_flags():
    orin = load_target("jetson-agx-orin")
    dla = resolve_build_config(apply_overrides(orin, sets=["tensorrt.dla_core=0"]), "model_int8.onnx", "input",
                               [3, 224, 224])
    assert dla["device_type"] == "DLA" and dla["dla_core"] == 0 and dla["static_shapes"]
    assert dla["input"]["min"] == dla["input"]["opt"] == dla["input"]["max"] == [1, 3, 224, 224]
    assert dla["flags"] == ["INT8", "FP16", "GPU_FALLBACK"] and dla["gpu_fallback"]
    assert dla["engine_name"].endswith(".dla0.engine")
    gpu = resolve_build_config(apply_overrides(orin, sets=['batch="dynamic"']), "model_int8.onnx", "input",
                               [3, 224, 224])
    assert gpu["device_type"] == "GPU" and "GPU_FALLBACK" not in gpu["flags"] and not gpu["static_shapes"]
    assert gpu["input"]["max"][0] == orin.tensorrt.max_batch and gpu["input"]["min"][0] == 1
    nano = resolve_build_config(load_target("jetson-nano"), "model_fp32.onnx", "input", [3, 224, 224])
    assert nano["flags"] == ["FP16"] and nano["precision"] == "fp16"
    no_fp16 = resolve_build_config(apply_overrides(orin, sets=["tensorrt.fp16_fallback=false"]), "m", "input", [3, 8, 8])
    assert no_fp16["flags"] == ["INT8"]


def test_tensorrt_prepared_on_host_without_tensorrt(artifact):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is importable here: the engine is built instead (test_trt_conformance)")
    except ImportError:
        pass
    profile = apply_overrides(load_target("jetson-agx-orin"), sets=["tensorrt.dla_core=1"])
    outcome = build_artifact(artifact, profile, gate=False, **QUIET)
    assert outcome.entry is None and "edgetl build ARTIFACT" in outcome.notes[0]
    cfg = json.loads((artifact / "builds/tensorrt/build_config.json").read_text())
    assert cfg["dla_core"] == 1 and cfg["onnx"] == "model_int8.onnx" and cfg["engine"] is None
    assert cfg["input"]["name"] == "input" and cfg["input"]["max"] == [1, 3, 32, 32]
    assert set(cfg["conformance"]) == {"8.5", "8.6", "10.3"} and all(c["ok"] for c in cfg["conformance"].values())
    m = verify_files(artifact)  # build_config.json is hashed into the manifest
    assert "builds/tensorrt/build_config.json" in m.files and m.target["build_config"] == "builds/tensorrt/build_config.json"
    assert not [b for b in m.builds if b["backend"] == "tensorrt"]
    # run again unchanged: the recorded configuration is kept as it is
    again = build_artifact(artifact, profile, gate=False, **QUIET)
    assert again.keep_existing and "up to date" in again.notes[0]


def test_tensorrt_refuses_nonconforming_graph(artifact, tmp_path):
    from _tinyqdq import qdq_onnx

    qdq_onnx(artifact / "model_fp32.onnx", artifact / "model_int8.onnx", signed=False)
    from edgetl.runtime.manifest import hash_files, write_manifest

    write_manifest(read_manifest(artifact).replace(files=hash_files(artifact)), artifact)
    with pytest.raises(EdgetlError) as e:
        build_artifact(artifact, load_target("jetson-orin-nano"), gate=False, **QUIET)
    assert "input_QuantizeLinear" in e.value.message and not (artifact / "builds/tensorrt").exists()


def test_engine_key_refusal():
    key = {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "precision": "int8"}
    name = engine_file_name("10.3.0", "8.7", "int8")
    assert name == "model.trt10.3.sm87.int8.engine"
    check_engine_key(key, {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}, name)
    for here, what in [({"tensorrt": "8.6.2", "gpu": "Orin", "compute_capability": "8.7"}, "TensorRT 10.3.0"),
                       ({"tensorrt": "10.3.0", "gpu": "Xavier", "compute_capability": "7.2"}, "compute capability 8.7")]:
        with pytest.raises(EdgetlError) as e:
            check_engine_key(key, here, name)
        assert what in e.value.message and "edgetl build ARTIFACT" in e.value.hint
    with pytest.raises(EdgetlError, match="does not match its build record"):
        check_engine_key(key, {"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"},
                         "model.trt10.3.sm87.fp16.engine")


BLOCK = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked}:
                raise ImportError(name + " is blocked in this test")
            return None
    sys.meta_path.insert(0, _Block())
    from edgetl.runtime.errors import MissingDependencyError
    from edgetl.runtime.runners import open_runner
    try:
        open_runner({backend!r}, {model!r}, {{}})
    except MissingDependencyError as exc:
        print("HINT:", exc.hint)
""")


@pytest.mark.parametrize("backend,blocked,extra", [("openvino", ["openvino"], "edgetl[openvino]"),
                                                   ("tensorrt", ["tensorrt"], "edgetl[tensorrt]")])
def test_missing_backend_package_names_the_extra(artifact, backend, blocked, extra):
    model = str(artifact / "model_int8.onnx")
    r = subprocess.run([sys.executable, "-c", BLOCK.format(blocked=set(blocked), backend=backend, model=model)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"pip install '{extra}'" in r.stdout


# ---- the gate through each build (edgetl.check) ----------------------------------------------

@pytest.mark.parametrize("target", ["x86-cpu-onnxruntime", "x86-cpu-openvino"])
def test_build_gate_recorded(artifact, target):
    if target.endswith("openvino"):
        pytest.importorskip("openvino", reason="openvino is not installed")
    outcome = build_artifact(artifact, load_target(target), speed_check=False, **QUIET)
    gate = outcome.entry["gate"]
    assert gate["passed"] and gate["n"] == 24 and gate["agreement"] >= 0.98
    assert gate["runner"]["backend"] == load_target(target).backend
    if target.endswith("openvino"):  # the gate ran what the build records: int8 layers + pinned f32
        assert gate["runner"]["precision"] == outcome.entry["precision"] == "int8+f32"
    m = verify_files(artifact)
    assert m.builds[0]["gate"]["passed"]
    assert "report.md" in m.files


def test_tensorrt_pre_build_gate_recorded(artifact):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is importable here: the engine is built instead")
    except ImportError:
        pass
    outcome = build_artifact(artifact, load_target("jetson-orin-nano"), **QUIET)
    cfg = json.loads((artifact / "builds/tensorrt/build_config.json").read_text())
    pre = cfg["pre_build_gate"]
    assert pre["passed"] and pre["graph"] == "model_int8.onnx" and pre["runner"]["backend"] == "onnxruntime"
    assert outcome.gate == pre and "speed is not gated" in pre["speed_note"]


def test_failing_gate_recorded_as_failed(artifact):
    data = dict(np.load(artifact / "checkset.npz"))
    data["float_logits"] = data["float_logits"][:, ::-1].copy()  # a float reference the build cannot match
    np.savez(artifact / "checkset.npz", **data)
    from edgetl.runtime.manifest import hash_files, write_manifest

    write_manifest(read_manifest(artifact).replace(files=hash_files(artifact)), artifact)
    outcome = build_artifact(artifact, load_target("x86-cpu-onnxruntime"), speed_check=False, **QUIET)
    assert not outcome.gate["passed"] and any(f.startswith("agreement") for f in outcome.gate["failures"])
    assert not verify_files(artifact).builds[0]["gate"]["passed"]
