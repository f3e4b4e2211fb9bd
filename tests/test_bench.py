"""``edgetl bench`` on a tiny real artifact: every row is measured or explained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from _tinyrun import session_tiny_run
from edgetl.bench import ALL_ROWS
from edgetl.cli import main
from edgetl.runtime.manifest import verify_files


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[Path, Path]:
    run = session_tiny_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("bench") / "art"
    assert main(["quantize", str(run), "--out", str(out), "--calib-min", "8", "--no-speed-check"]) == 0
    return run, out


def test_every_row_is_measured_or_explained(artifact, tmp_path, capsys):
    run, art = artifact
    work = tmp_path / "art"
    shutil.copytree(art, work)
    assert main(["bench", str(work), "--run", str(run), "--reps", "10", "--rounds", "2"]) == 0
    result = json.loads((work / "bench.json").read_text())
    rows, skipped = result["rows"], result["skipped"]
    assert set(rows) | set(skipped) == set(ALL_ROWS)
    assert {"torch-nchw", "torch-channels-last", "ort-fp32", "ort-int8", "ov-f32", "ov-default", "ov-int8"} <= set(rows)
    assert "tensorrt" in skipped and "tensorrt" in skipped["tensorrt"]
    for name, r in rows.items():
        assert r["latency_p50_ms"] > 0 and r["latency_p90_ms"] >= r["latency_p50_ms"], name
        assert 0.0 <= r["agreement"] <= 1.0 and r["n_checkset"] > 0, name
        assert r["size_mb"] > 0, name
    # the float rows agree with the float logits exactly; strict f32 OpenVINO reports f32
    assert rows["torch-nchw"]["agreement"] == 1.0 and rows["ort-fp32"]["agreement"] == 1.0
    assert rows["ov-f32"]["precision"] == "f32" and rows["ort-int8"]["precision"].startswith("int8")
    assert result["frames"].endswith("test images of the checkset")
    assert {"best_int8", "eager_baseline", "int8_vs_eager"} <= set(result["speedups"])
    assert (work / "bench.png").stat().st_size > 1000
    report = (work / "report.md").read_text()
    assert report.count("## Benchmark") == 1
    # a second bench replaces its section, and the artifact still verifies
    assert main(["bench", str(work), "--run", str(run), "--backends", "ort-fp32,ort-int8", "--reps", "4"]) == 0
    assert (work / "report.md").read_text().count("## Benchmark") == 1
    verify_files(work)
    out = capsys.readouterr().out
    assert "ort-int8" in out and "speed-ups" in out


def test_missing_run_is_explained_and_bad_rows_refused(artifact, tmp_path, capsys):
    _, art = artifact
    work = tmp_path / "art"
    shutil.copytree(art, work)
    assert main(["bench", str(work), "--backends", "torch-nchw,ort-fp32", "--reps", "4", "--out", str(tmp_path / "o")]) == 0
    result = json.loads((tmp_path / "o" / "bench.json").read_text())
    assert "ort-fp32" in result["rows"] or "torch-nchw" in result["rows"]
    assert main(["bench", str(work), "--backends", "tflite"]) == 2
    assert "unknown row" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "nope")]) == 2


def test_busy_machine_is_flagged():
    import os

    from edgetl.bench import busy_warning

    cpus = os.cpu_count() or 1
    assert busy_warning(0.0, 2) is None and busy_warning(None, 2) is None
    assert "busy" in busy_warning(cpus + 4.0, 2)


def test_busy_measure_counts_other_processes_not_the_bench_itself():
    import subprocess
    import sys
    import time

    from edgetl.bench import _cpu_sample, _other_busy_cpus

    if _cpu_sample() is None:
        pytest.skip("no /proc/stat here")
    a = _cpu_sample()
    t_end = time.perf_counter() + 0.8
    while time.perf_counter() < t_end:  # this process busy: not "other" load
        pass
    own = _other_busy_cpus(a, _cpu_sample())
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.0: pass"])
    a = _cpu_sample()
    spin.wait()
    other = _other_busy_cpus(a, _cpu_sample())
    assert own is not None and other is not None
    assert other > own + 0.4, (own, other)  # a spinning neighbour shows up as ~1 busy CPU


def test_a_build_that_failed_its_gate_is_marked_everywhere(tmp_path):
    """Issue 18: the bench chart, table and report never show a failed INT8 build like a deployable one."""
    from rich.console import Console

    from _tinyqdq import make_qdq_artifact
    from edgetl.bench import mark_gates, render_table, write_chart
    from edgetl.report import bench_markdown
    from edgetl.runtime.manifest import read_manifest, write_manifest

    art = make_qdq_artifact(tmp_path / "art")
    m = read_manifest(art)
    gate = {"passed": True, "agreement": 0.99, "drop": 0.1}
    write_manifest(m.replace(gate=gate, target={"backend": "onnxruntime"},
                             builds=({"backend": "onnxruntime", "model": "model_int8.onnx", "gate": {"passed": False}},
                                     {"backend": "openvino", "model": "model_int8.onnx", "gate": {"passed": True}})), art)
    row = {"label": "x", "precision": "int8", "latency_p50_ms": 2.0, "latency_p90_ms": 3.0, "preprocess_p50_ms": 0.1,
           "top1": 0.9, "agreement": 0.95, "size_mb": 1.0, "peak_rss_mb": 10, "throughput_b8_img_s": 100.0}
    rows = {"ort-int8": {**row, "label": "ONNX Runtime INT8"}, "ov-int8": {**row, "label": "OpenVINO INT8"},
            "ort-fp32": {**row, "label": "ONNX Runtime FP32", "precision": "fp32", "latency_p50_ms": 4.0}}
    assert mark_gates(rows, read_manifest(art)) is False  # the target's (onnxruntime) build decides
    assert rows["ort-int8"]["gate"] == "FAILED" and rows["ov-int8"]["gate"] == "passed" and "gate" not in rows["ort-fp32"]
    result = {"artifact": str(art), "deployable": False, "threads": 2, "frames": "test", "rows": rows, "skipped": {},
              "speedups": {}, "reps": 2, "rounds": 1, "machine": {"processor": "x", "cpus": 2}}
    console = Console(record=True, width=200)
    console.print(render_table(result))
    text = console.export_text()
    assert text.count("gate FAILED") == 1 and "gate passed" in text
    assert "gate FAILED: not deployable" in bench_markdown(result)
    write_chart(result, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_several_artifacts_are_timed_side_by_side(artifact, tmp_path, capsys):
    """Models against each other: the same rows of each in one run, each with its own quality and gate;
    the artifacts are only read."""
    _, art = artifact
    a, b = tmp_path / "lite-a", tmp_path / "lite-b"
    shutil.copytree(art, a)
    shutil.copytree(art, b)
    out = tmp_path / "cmp"
    assert main(["bench", str(a), str(b), "--backends", "ort-int8,ov-int8", "--reps", "6", "--rounds", "2",
                 "--out", str(out)]) == 0
    result = json.loads((out / "bench.json").read_text())
    assert set(result["rows"]) == {"lite-a ort-int8", "lite-a ov-int8", "lite-b ort-int8", "lite-b ov-int8"}
    assert result["artifacts"] == [str(a), str(b)] and result["skipped"] == {}
    for name, r in result["rows"].items():
        assert r["artifact"] == str(a if name.startswith("lite-a") else b) and r["row"] == name.split()[1]
        assert r["latency_reps"] == 6 and r["input_size"] == result["rows"]["lite-a ov-int8"]["input_size"]
        assert r["label"].startswith(name.split()[0] + (" (deployable): " if r["deployable"] else " (NOT deployable): "))
    # the same model: the same answers on its checkset; the first artifact is the reference of the ratios
    assert result["rows"]["lite-a ov-int8"]["top1"] == result["rows"]["lite-b ov-int8"]["top1"]
    assert result["relative"]["lite-a ov-int8"] == 1.0 and result["relative"]["lite-b ort-int8"] > 0
    assert "the same frames for every artifact" in result["frames"]
    assert (out / "bench.png").stat().st_size > 1000
    assert not (a / "bench.json").exists() and not (b / "bench.json").exists()
    verify_files(a)
    assert "relative to the first artifact" in capsys.readouterr().out


def test_comparing_artifacts_refuses_what_it_cannot_honour(artifact, tmp_path, capsys):
    run, art = artifact
    a = tmp_path / "a"
    shutil.copytree(art, a)
    cases = [([str(a), str(art)], "pass --out DIR"),
             ([str(a), str(art), "--run", str(run), "--out", str(tmp_path / "o")], "drop --run"),
             ([str(a), str(tmp_path / "a"), "--out", str(tmp_path / "o")], "named twice"),
             ([str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "nope")]
    for args, said in cases:
        capsys.readouterr()
        assert main(["bench", *args]) == 2, args
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "o").exists()
