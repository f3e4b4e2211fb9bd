"""`edgetl build` and `edgetl compile` end to end on tiny models."""

from __future__ import annotations

import json

import pytest

from _tinyqdq import make_qdq_artifact
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
    assert main(["build", str(art), "--target", "x86-cpu-onnxruntime", "--no-speed-check"]) == 4
    assert "failed its gate" in capsys.readouterr().err
    assert verify_files(art).builds[0]["gate"]["passed"] is False
