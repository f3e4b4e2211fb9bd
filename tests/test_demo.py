"""`make demo`'s driver (``python -m edgetl.demo``), end to end on tiny generated data: every real
command in order, the summary read back from what they wrote, the exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_image_folder


@pytest.mark.slow
def test_demo_driver_runs_every_step_and_summarises_what_they_wrote(tmp_path: Path):
    pytest.importorskip("openvino", reason="the demo compiles for an OpenVINO target")
    data = write_image_folder(tmp_path / "data", n_per_class=30, classes=("disc", "stripes", "square"))
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "edgetl.demo", "--out", str(out), "--data", str(data),
         "--train=--backbone tiny_cnn --pretrained none --epochs 8 --lr 1e-2 --no-augment --patience 0",
         "--compile=--no-speed-check --calib-min 8", "--bench=--reps 10 --rounds 2"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("$ edgetl ")]
    assert [s.split()[2] for s in steps] == ["train", "compile", "compile", "data", "run", "run", "bench", "bench"]
    assert all("--target" in s for s in steps[1:3]) and "--time-budget" in steps[1]
    s = json.loads((out / "summary.json").read_text())
    assert s["cpu"]["isa_class"] and s["cpu"]["isa_class"] in proc.stdout  # the CPU class is named
    targets = {r["target"]: r for r in s["targets"]}
    assert set(targets) == {"x86-cpu-openvino", "x86-cpu-onnxruntime"}
    for name, r in targets.items():
        manifest = json.loads((Path(r["artifact"]) / "manifest.json").read_text())
        build = next(b for b in manifest["builds"] if b["backend"] == r["backend"])
        assert r["deployable"] is True and r["decided_by"] == f"the {r['backend']} build"
        assert r["agreement"] == build["gate"]["agreement"] and r["margins"] == build["gate"]["margins"]
        assert r["stability"] == build["gate"]["stability"]["min_agreement"]
        assert r["kept_step"] and r["int8_p50_ms"] and r["eager_p50_ms"]
    assert s["runtime"]["every_frame"]["frames"] > 0 and [x["exit"] for x in s["steps"]] == [0] * 8
    assert "passed" in proc.stdout and "margin" in proc.stdout


def test_the_summary_names_the_weight_form():
    from edgetl.demo import weights_label

    assert weights_label({"weight_bits": 7, "depthwise_weight_bits": 8}) == "w7/dw8"
    assert weights_label({"weight_bits": 7, "depthwise_weight_bits": 7}) == "w7"
    assert weights_label({"weight_bits": 8}) == "w8" and weights_label({}) == "w8"
