"""``edgetl bench`` on a tiny real detection artifact: every row measured from a decoded frame to boxes,
its quality computed by the gate's own code from that row's outputs, and the report section kept.

One tiny detector (tiny_cnn at 96 px, generated COCO rectangles of two classes, ~5 s) is compiled for
ONNX Runtime and built for OpenVINO (when importable) once for the module; the checks that a bench
could get wrong silently:

* post-processing inside the latency: a post-processing made 30 ms slower must show in every row's
  p50 (a bench that timed only preprocess + inference would not see it);
* metrics from the right model: the float rows (eager, ORT FP32, OpenVINO f32) give the float model's
  mAP, and each INT8 row gives exactly what the build's own gate measured on the same model.
"""

from __future__ import annotations

import json
import shutil
import time
import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from test_detect_train import write_rectangles  # noqa: E402

from edgetl.bench import ALL_ROWS, run_bench  # noqa: E402
from edgetl.cli import main  # noqa: E402
from edgetl.runtime.manifest import read_manifest, verify_files  # noqa: E402

try:
    import openvino  # noqa: F401
    HAVE_OV = True
except ImportError:
    HAVE_OV = False

FAST = {"reps": 6, "rounds": 2, "warmup": 2, "block_warmup": 1, "threads": 1}


@pytest.fixture(scope="module")
def det_artifact(tmp_path_factory):
    from edgetl.compile import compile_run
    from edgetl.detect.train import DetTrainConfig, train_detector
    from edgetl.targets import load_target

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest on a busy 2-core machine
    try:
        root = tmp_path_factory.mktemp("detbench")
        data = write_rectangles(root / "data", n=32, negatives=2)
        cfg = DetTrainConfig(backbone="tiny_cnn", pretrained="none", input_size=96, epochs=10, batch_size=8, lr=1e-2,
                             backbone_lr_mult=0.1, patience=0, num_workers=0, device="cpu", warmup_epochs=0.5,
                             val_fraction=0.2, test_fraction=0.25)
        run = train_detector(data, root / "run", cfg, progress=lambda s: None)
        art = root / "art"
        compile_run(run, art, load_target("x86-cpu-onnxruntime"), speed_check=False, progress=lambda s: None)
        if HAVE_OV:  # a second build, with folded (uint8 NHWC) input: its gate may fail on a toy model (exit 1)
            assert main(["build", str(art), "--target", "x86-cpu-openvino", "--no-speed-check"]) in (0, 1)
        yield types.SimpleNamespace(run=run, art=art)
    finally:
        torch.set_num_threads(before)


def test_rows_time_frame_to_boxes_and_score_the_right_model(det_artifact, monkeypatch):
    import edgetl.runtime.detect as det

    real = det.postprocess

    def slow_on_the_device_path(raw_boxes, raw_scores, spec, score_threshold=None):
        if score_threshold is None:  # the bench's timed frames (the gate passes its own thresholds)
            time.sleep(0.03)
        return real(raw_boxes, raw_scores, spec, score_threshold)

    monkeypatch.setattr(det, "postprocess", slow_on_the_device_path)
    result = run_bench(det_artifact.art, run=det_artifact.run, chart=False, **FAST)
    rows, skipped = result["rows"], result["skipped"]
    assert set(rows) | set(skipped) == set(ALL_ROWS)
    want = {"torch-nchw", "torch-channels-last", "ort-fp32", "ort-int8"} | (
        {"ov-f32", "ov-default", "ov-int8"} if HAVE_OV else set())
    assert want <= set(rows), skipped
    assert result["task"] == "detection" and result["frame_sizes"] == ["96x96"]
    assert result["frames"].endswith("test images of the checkset")
    for name, r in rows.items():
        # the latency is frame -> boxes: the slowed post-processing is inside every row's p50
        assert r["post_p50_ms"] >= 30 and r["latency_p50_ms"] >= 30, (name, r)
        assert r["latency_p90_ms"] >= r["latency_p50_ms"] >= max(r["preprocess_p50_ms"], r["infer_p50_ms"]), name
        assert all(0.0 <= r[k] <= 1.0 for k in ("map50", "map", "agreement")), (name, r)
        assert r["n_checkset"] == result["detection"]["n"] > 0 and r["size_mb"] > 0, name
    # float rows: the float model's mAP (as the checkset's stored outputs give it) and full agreement
    float_map50 = result["detection"]["float_map50"]
    assert float_map50 > 0.2, result["detection"]  # a model that finds something: equalities below mean something
    for name in ("torch-nchw", "torch-channels-last", "ort-fp32") + (("ov-f32",) if HAVE_OV else ()):
        assert rows[name]["map50"] == pytest.approx(float_map50, abs=1e-6), name
        assert rows[name]["agreement"] >= 0.99, name
    # INT8 rows: exactly what each build's own gate measured on that model (not the float outputs)
    builds = {b["backend"]: b for b in read_manifest(det_artifact.art).builds}
    for name, backend in (("ort-int8", "onnxruntime"), ("ov-int8", "openvino")):
        gate = builds.get(backend, {}).get("gate")
        if name not in rows or not gate:
            continue
        assert rows[name]["map50"] == pytest.approx(gate["quant_map50"], abs=1e-9), name
        assert rows[name]["agreement"] == pytest.approx(gate["agreement"], abs=1e-9), name
        assert rows[name]["gate"] == ("passed" if gate["passed"] else "FAILED"), name
    if HAVE_OV:
        assert rows["ov-int8"]["input"] == "uint8 NHWC"  # the build with folded preprocessing, fed as built


def test_cli_writes_json_chart_report_and_check_keeps_the_section(det_artifact, tmp_path, capsys):
    work = tmp_path / "art"
    shutil.copytree(det_artifact.art, work)
    args = ["bench", str(work), "--run", str(det_artifact.run), "--reps", "4", "--rounds", "2", "--threads", "1",
            "--backends", "torch-nchw,ort-fp32,ort-int8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mAP@.5" in out and "post ms" in out and "ort-int8" in out
    result = json.loads((work / "bench.json").read_text())
    assert result["task"] == "detection" and result["machine"]["cpu_class"]
    assert set(result["rows"]) == {"torch-nchw", "ort-fp32", "ort-int8"}
    assert (work / "bench.png").stat().st_size > 1000
    failed = result["rows"]["ort-int8"]["gate"] == "FAILED"
    report = (work / "report.md").read_text()
    assert report.count("## Benchmark") == 1 and "| mAP@0.5 % |" in report and "post-process ms" in report
    assert ("gate FAILED: not deployable" in report) == failed
    assert {"bench.json", "bench.png", "report.md"} <= set(verify_files(work).files)
    # a later `edgetl check` re-gates and rewrites report.md (render_report): the bench section stays
    rc = main(["check", str(work), "--no-speed-check"])
    assert rc == (0 if read_manifest(work).gate.get("deployable") else 1)
    after = (work / "report.md").read_text()
    assert after.count("## Benchmark") == 1 and "gate" in after.split("## Benchmark")[0].lower()
    assert after.split("<!-- edgetl bench: begin -->")[1] == report.split("<!-- edgetl bench: begin -->")[1]
    verify_files(work)
    # a second bench replaces its section
    assert main(args[:-1] + ["ort-fp32"]) == 0
    assert (work / "report.md").read_text().count("## Benchmark") == 1
    assert "ort-int8" not in json.loads((work / "bench.json").read_text())["rows"]
    verify_files(work)
