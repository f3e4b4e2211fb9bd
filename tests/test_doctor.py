"""edgetl doctor: the machine's facts and what it can do per target."""

import json

from click.testing import CliRunner

from edgetl.cli import cli as main
from edgetl.doctor import report, target_verdict
from edgetl.runtime.cpu import classify
from edgetl.targets import load_target


def test_doctor_json_names_cpu_class_backends_opencv_and_every_target():
    r = CliRunner().invoke(main, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["cpu"]["isa_class"] and d["cpu"]["int8_note"] and d["python"]
    assert set(d["opencv"]) >= {"gui", "gstreamer", "ffmpeg", "v4l2"}
    assert d["backends"]["onnxruntime"]["providers"]
    names = {t["name"] for t in d["targets"]}
    assert {"x86-cpu-onnxruntime", "jetson-orin-nano", "arm64-cpu-onnxruntime"} <= names
    assert all(t["here"] in ("build+gate", "build+gate (other kernels)", "prepare", "no") for t in d["targets"])
    text = CliRunner().invoke(main, ["doctor"])
    assert text.exit_code == 0 and "targets:" in text.output and d["cpu"]["isa_class"] in text.output


def test_target_verdicts_follow_the_machine():
    x86 = classify("x86_64", ["avx2", "fma"], "test CPU")
    arm = classify("aarch64", ["asimddp"], "test ARM")
    ort = {"onnxruntime": {"version": "1", "providers": ["CPUExecutionProvider"]}, "openvino": None, "tensorrt": None}
    assert target_verdict(load_target("x86-cpu-onnxruntime"), x86, ort)[0] == "build+gate"
    assert target_verdict(load_target("arm64-cpu-onnxruntime"), x86, ort)[0] == "build+gate (other kernels)"
    assert target_verdict(load_target("arm64-cpu-onnxruntime"), arm, ort)[0] == "build+gate"
    assert target_verdict(load_target("jetson-orin-nano"), x86, ort)[0] == "prepare"
    verdict, why = target_verdict(load_target("x86-cpu-openvino"), x86, ort)
    assert verdict == "no" and "edgetl[openvino]" in why


def test_report_is_json_serialisable():
    json.dumps(report())
