"""Detection end to end through the real CLI: tiny COCO data -> `edgetl train --task detect` ->
`edgetl compile` (ONNX Runtime; OpenVINO when it imports) -> `edgetl check` -> `edgetl run` on a
synthetic video with tracking and a count line; plus what the device runtime refuses (a tampered
anchors.npy, a bad --count-line, --track on a classification artifact) and what it still runs
(a schema 1.0 classification artifact).

Train/compile/check run in this process through ``edgetl.cli.main`` (the CLI's own entry point);
`edgetl run` runs as a subprocess (its stdout is the JSON-lines contract). One training (tiny_cnn,
96 px, 12 epochs on 60 images: ~0.5 s an epoch on one thread) and one compile per module. Twelve
epochs, not three: a 3-epoch detector puts ~100 fixed boxes on every frame, and a video test on it
would check nothing about boxes, tracks or the line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from edgetl.cli import main  # noqa: E402
from edgetl.runtime.manifest import read_manifest, verify_files  # noqa: E402

W, H = 160, 120  # frames of the training images and of the video (stretched to 96x96 by the model)
COLORS = ((30, 30, 230), (230, 80, 30))  # BGR: "red", "blue"
FRAMES = 40
LINE = "80,0,80,120"


def write_scenes(root: Path, n: int = 60, seed: int = 0) -> Path:
    """``n`` noisy 160x120 images with 1-2 non-overlapping filled rectangles (26-44 px) of two colours
    (the classes), the first 4 without any; a COCO instances JSON beside them."""
    from test_detect_train import write_rectangles

    return write_rectangles(root, n, negatives=4, seed=seed, size=(W, H), sides=(26, 44))


def true_boxes(frame: int) -> dict[str, list[int]]:
    """The two rectangles of the video at ``frame``: 36x36, moving 3 px a frame left to right across x=80."""
    x = 4 + 3 * frame
    return {"red": [x, 14, x + 36, 50], "blue": [x, 70, x + 36, 106]}


def write_moving_video(path: Path) -> Path:
    rng = np.random.default_rng(1)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H))
    assert writer.isOpened()
    for f in range(FRAMES):
        img = rng.integers(90, 140, (H, W, 3), dtype=np.uint8)
        for c, (x1, y1, x2, y2) in enumerate(true_boxes(f).values()):
            img[y1:y2, x1:x2] = COLORS[c]
        writer.write(img)
    writer.release()
    return path


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def edgetl(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    code = "import sys\nfrom edgetl.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_line_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    """Exit ``code``, nothing on stdout, no traceback, one ``error:`` line (+ an optional hint line) at
    the end of stderr (notes before it are allowed: e.g. that the artifact failed its gate)."""
    shown = f"rc={r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    assert r.returncode == code and r.stdout == "" and "Traceback" not in r.stderr, shown
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, shown
    assert all(line.startswith("  hint: ") for line in lines[errors[0] + 1:]) and len(lines) - errors[0] <= 2, shown
    return lines[errors[0]]


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]  # every stdout line must be JSON


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """Data, video, a trained run and its ONNX Runtime artifact (compile exit code kept)."""
    root = tmp_path_factory.mktemp("e2e")
    data = write_scenes(root / "data")
    video = write_moving_video(root / "belt.avi")
    run, art = root / "run", root / "artifacts" / "det-ort"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on a busy 2-core machine: one thread is ~20x faster
    try:
        assert main(["train", str(data), "--task", "detect", "--backbone", "tiny_cnn", "--pretrained", "none",
                     "--input-size", "96", "--epochs", "12", "--batch-size", "8", "--lr", "0.01", "--backbone-lr-factor", "0.1", "--patience", "0",
                     "--num-workers", "0", "--device", "cpu", "--quiet", "--out", str(run)]) == 0
        rc = main(["compile", str(run), "--target", "x86-cpu-onnxruntime", "--out", str(art)])
    finally:
        torch.set_num_threads(threads)
    return types.SimpleNamespace(root=root, data=data, video=video, run=run, art=art, compile_rc=rc)


@pytest.fixture(scope="module")
def full_run(flow):
    """`edgetl run` over the whole video with the count line (implies --track)."""
    summary = flow.root / "s.json"
    r = edgetl("run", flow.art, "--source", flow.video, "--headless", "--count-line", LINE, "--summary-json", summary)
    assert r.returncode == 0, r.stderr
    return types.SimpleNamespace(lines=json_lines(r.stdout), summary=json.loads(summary.read_text()), stderr=r.stderr)


def test_train_compile_check_exit_codes_follow_the_verdict(flow, capsys):
    run = verify_files(flow.run)
    assert run.task == "detection" and run.kind == "run" and run.labels == ("red", "blue")
    m = verify_files(flow.art)
    assert m.task == "detection" and m.target["name"] == "x86-cpu-onnxruntime"
    assert m.gate["decided_by"] == "the onnxruntime build"
    build = m.builds[0]
    assert build["backend"] == "onnxruntime" and build["gate"]["task"] == "detection"
    want = 0 if m.gate["deployable"] else 1
    assert flow.compile_rc == want
    capsys.readouterr()
    assert main(["check", str(flow.art)]) == want
    out = capsys.readouterr().out
    assert "gate: onnxruntime model_int8.onnx" in out and "(detection)" in out
    assert verify_files(flow.art).gate["deployable"] == m.gate["deployable"]


def test_schema_versions(flow, tmp_path):
    from _tinyartifact import make_tiny_artifact

    assert json.loads((flow.art / "manifest.json").read_text())["schema_version"] == "2.1"
    assert json.loads((flow.run / "manifest.json").read_text())["schema_version"] == "2.1"
    cls = make_tiny_artifact(tmp_path / "cls")
    assert json.loads((cls / "manifest.json").read_text())["schema_version"] == "1.1"


def test_run_with_a_count_line(flow, full_run):
    frames = [r for r in full_run.lines if "frame" in r]
    assert [r["frame"] for r in frames] == list(range(FRAMES))
    for r in frames:
        assert isinstance(r["detections"], list) and isinstance(r["counts"], dict) and "line_counts" in r
        assert set(r["counts"]) <= {"red", "blue"}
        for d in r["detections"]:
            assert {"label", "class", "score", "box", "id"} <= set(d) and d["label"] in ("red", "blue")
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H  # frame pixels, not the model's 96x96
    # after the frames, at most one line: the exits of the tracks still in view when the video ended
    rest = full_run.lines[len(frames):]
    assert len(rest) <= 1 and all(set(r) == {"t", "events"} for r in rest)
    # the boxes are where the rectangles are, with their colour, in most frames
    found = sum(any(d["label"] == "red" and iou(d["box"], true_boxes(r["frame"])["red"]) >= 0.3
                    for d in r["detections"]) for r in frames[5:35])
    assert found >= 15, found
    s = full_run.summary
    assert s["task"] == "detection" and s["frames"] == FRAMES and s["stop_reason"] == "end of source"
    assert set(s["line_counts"]) == {"in", "out", "total"} and s["line_counts"]["total"] >= 1
    assert s["line_counts"] == frames[-1]["line_counts"] and s["tracks"] >= 2
    assert s["count_confidence"] == 0.5 and isinstance(s["crossings_low_confidence"], int)


def test_events_prints_only_frames_with_events_and_save_writes_a_video(flow, full_run, tmp_path):
    saved = tmp_path / "annotated.avi"
    r = edgetl("run", flow.art, "--source", flow.video, "--headless", "--count-line", LINE, "--events",
               "--save", saved)
    assert r.returncode == 0, r.stderr
    lines = json_lines(r.stdout)
    assert lines and all(line.get("events") for line in lines)
    with_events = [x for x in full_run.lines if x.get("events")]
    assert len(lines) == len(with_events) < len(full_run.lines)
    for got, want in zip(lines, with_events):
        assert got.get("frame") == want.get("frame") and got["events"] == want["events"]
    kinds = {e["event"] for line in lines for e in line["events"]}
    assert kinds and kinds <= {"enter", "exit", "cross"}, kinds
    cap = cv2.VideoCapture(str(saved))
    n, shape = 0, None
    while True:
        ok, img = cap.read()
        if not ok:
            break
        n, shape = n + 1, img.shape
    cap.release()
    assert n == FRAMES and shape == (H, W, 3)


def test_openvino_compile_check_and_run(flow, tmp_path, capsys):
    pytest.importorskip("openvino", reason="openvino is not installed")
    art = tmp_path / "det-ov"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["compile", str(flow.run), "--target", "x86-cpu-openvino", "--out", str(art)])
    finally:
        torch.set_num_threads(threads)
    m = verify_files(art)
    assert m.builds[0]["backend"] == "openvino" and m.gate["decided_by"] == "the openvino build"
    want = 0 if m.gate["deployable"] else 1
    assert rc == want
    capsys.readouterr()
    assert main(["check", str(art), "--no-update"]) == want
    assert "gate: openvino builds/openvino/model.xml" in capsys.readouterr().out
    r = edgetl("run", art, "--source", flow.video, "--headless", "--max-frames", "5", "--backend", "openvino")
    assert r.returncode == 0, r.stderr
    lines = json_lines(r.stdout)
    assert len(lines) == 5 and all("detections" in x and "counts" in x for x in lines)


def test_tampered_anchors_are_refused_before_anything_runs(flow, tmp_path):
    art = Path(shutil.copytree(flow.art, tmp_path / "art"))
    anchors = np.load(art / "anchors.npy")
    anchors[0, 0] += 1.0
    np.save(art / "anchors.npy", anchors)
    err = one_line_error(edgetl("run", art, "--source", flow.video, "--headless"))
    assert "anchors.npy" in err and "sha256" in err


def test_bad_count_line_is_one_line_error(flow):
    err = one_line_error(edgetl("run", flow.art, "--source", flow.video, "--headless", "--count-line", "1,2,3"))
    assert "--count-line" in err
    err = one_line_error(edgetl("run", flow.art, "--source", flow.video, "--headless", "--count-line", LINE,
                                "--count-confidence", "1.5"))
    assert "--count-confidence 1.5" in err


def test_classification_artifacts(flow, tmp_path):
    """--track / --count-line on a classifier is refused (nothing to track); a schema 1.0 classification
    artifact (no digest, as written before 1.1) still loads and runs."""
    from _tinyartifact import make_tiny_artifact, write_video

    cls = make_tiny_artifact(tmp_path / "cls")
    video = write_video(tmp_path / "cls.avi", n=6)
    err = one_line_error(edgetl("run", cls, "--source", video, "--headless", "--track"))
    assert "--track" in err and "classification" in err
    data = json.loads((cls / "manifest.json").read_text())
    data["schema_version"] = "1.0"
    del data["digest"]
    (cls / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(cls).task == "classification"
    r = edgetl("run", cls, "--source", video, "--headless")
    assert r.returncode == 0, r.stderr
    lines = json_lines(r.stdout)
    assert len(lines) == 6 and all(x["label"] in ("dark", "bright") and "detections" not in x for x in lines)
