"""``edgetl run`` end to end: real videos/folders/HTTP streams, JSON checked against Model.predict."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as np
import pytest

from _tinyartifact import MjpegServer, decode_video, make_tiny_artifact, write_video
from edgetl import runtime as rt
from edgetl.runtime.app import AppOptions, StreamOptions, run_app
from edgetl.runtime.runners.onnxruntime import OrtRunner
from edgetl.runtime.sources import opencv_has_gstreamer


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_tiny_artifact(tmp_path_factory.mktemp("art") / "tiny")


@pytest.fixture(scope="module")
def model(artifact):
    return rt.load(artifact)


def edgetl(*args, env=None, timeout=120, prefix: str = "") -> subprocess.CompletedProcess:
    code = prefix + "import sys\nfrom edgetl.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]  # every stdout line must be JSON


@pytest.mark.parametrize("name", ["clip.avi", "clip.mp4"])  # MJPG AVI and mp4v MP4
def test_headless_json_matches_predict_on_the_same_frames(tmp_path, artifact, model, name):
    video = write_video(tmp_path / name, n=30, size=(160, 120))
    r = edgetl("run", artifact, "--source", video, "--headless", "--top-k", "2", "--summary-json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    out = lines(r.stdout)
    frames = decode_video(video)
    assert [o["frame"] for o in out] == list(range(len(frames))) == list(range(30))
    for o, img in zip(out, frames):
        want = model.predict(img, top_k=2)
        assert [lab for lab, _ in o["top_k"]] == [lab for lab, _ in want]
        assert np.allclose([s for _, s in o["top_k"]], [s for _, s in want], atol=2e-6)
        assert (o["label"], o["score"]) == tuple(o["top_k"][0])
        assert set(o["timings_ms"]) == {"wait", "preprocess", "infer", "post"} and o["dropped"] == 0
        assert o["latency_ms"] >= o["timings_ms"]["infer"]
    assert {o["label"] for o in out} == {"dark", "bright"}
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["frames"], s["frames_read"], s["dropped"], s["stop_reason"]) == (30, 30, 0, "end of source")
    assert s["policy"] == "every-frame" and s["fps"] > 0 and s["latency_ms"]["p90"] >= s["latency_ms"]["p50"] > 0
    assert "30 frames from" in r.stderr and "latency capture->result p50" in r.stderr


def test_events_smoothing_and_threshold(tmp_path, artifact, model):
    video = write_video(tmp_path / "clip.avi", n=40)
    frames = decode_video(video)
    probs = [model.probabilities(f) for f in frames]
    labels = [model.labels[int(np.argmax(p))] for p in probs]

    ev = lines(edgetl("run", artifact, "--source", video, "--headless", "--events").stdout)
    changes = [i for i in range(len(labels)) if i == 0 or labels[i] != labels[i - 1]]
    assert [o["frame"] for o in ev] == changes == [0, 10, 20, 30]
    assert [o["label"] for o in ev] == ["dark", "bright", "dark", "bright"]

    sm = lines(edgetl("run", artifact, "--source", video, "--headless", "--smooth", "3", "--top-k", "2").stdout)
    ema = probs[0].copy()
    for o, p in zip(sm, probs):  # span 3 frames = alpha 0.5
        ema = p.copy() if o["frame"] == 0 else 0.5 * ema + 0.5 * p
        assert o["label"] == model.labels[int(np.argmax(ema))]
        assert np.allclose(sorted((s for _, s in o["top_k"]), reverse=True), np.sort(ema)[::-1], atol=2e-6)
    assert sm[10]["label"] == "dark" and sm[12]["label"] == "bright"  # the smoothed switch lags

    scores = sorted(float(p.max()) for p in probs)
    thr = (scores[19] + scores[20]) / 2  # about half the frames fall below it
    th = lines(edgetl("run", artifact, "--source", video, "--headless", "--threshold", thr).stdout)
    for o, p, lab in zip(th, probs, labels):
        assert o["label"] == (lab if p.max() >= thr else "unknown")
        assert o["top_k"][0][0] == lab  # top-k keeps the real classes
    assert sum(o["label"] == "unknown" for o in th) == 20


def test_image_folder_and_roi(tmp_path, artifact, model):
    folder = tmp_path / "shots"
    folder.mkdir()
    imgs = []
    for i in range(5):
        img = np.full((60, 80, 3), 20, np.uint8)
        img[:, 40:] = 200 if i % 2 else 60  # right half bright on odd images
        imgs.append(img)
        cv2.imwrite(str(folder / f"img_{i}.png"), img)
    whole = lines(edgetl("run", artifact, "--source", folder, "--headless").stdout)
    assert [o["label"] for o in whole] == ["dark"] * 5
    roi = lines(edgetl("run", artifact, "--source", folder / "*.png", "--headless", "--roi", "40,0,40,60").stdout)
    assert [o["label"] for o in roi] == ["dark", "bright", "dark", "bright", "dark"]
    for o, img in zip(roi, imgs):
        assert o["score"] == pytest.approx(model.predict(img, roi=(40, 0, 40, 60))[0][1], abs=2e-6)


def test_save_writes_the_annotated_video(tmp_path, artifact):
    video = write_video(tmp_path / "clip.mp4", n=30, size=(160, 120), fps=25.0)
    out = tmp_path / "out" / "annotated.mp4"
    r = edgetl("run", artifact, "--source", video, "--headless", "--save", out, "--max-frames", 25)
    assert r.returncode == 0, r.stderr
    assert len(lines(r.stdout)) == 25 and "stopped: max frames" in r.stderr
    saved = decode_video(out)
    cap = cv2.VideoCapture(str(out))
    assert len(saved) == 25 == int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) and cap.get(cv2.CAP_PROP_FPS) == 25
    assert saved[0].shape == (120, 160, 3)
    src = decode_video(video)
    # the overlay (label box at the top left) is drawn; the rest of the frame is the source
    assert np.abs(saved[3][:20, :60].astype(int) - src[3][:20, :60]).mean() > 20
    assert np.abs(saved[3][80:, 100:].astype(int) - src[3][80:, 100:]).mean() < 12
    assert not list(out.parent.glob(".*partial*"))
    r = edgetl("run", artifact, "--source", video, "--headless", "--save", tmp_path / "x.gif")
    assert r.returncode == 2 and "unsupported video type" in r.stderr


def test_duration_bounds_a_realtime_run(tmp_path, artifact):
    video = write_video(tmp_path / "long.avi", n=300, fps=30.0)
    r = edgetl("run", artifact, "--source", video, "--realtime", "--headless", "--duration", "0.4",
               "--summary-json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["stop_reason"] == "duration" and 0 < s["frames"] == len(lines(r.stdout)) < 300


def test_no_display_falls_back_to_json_with_a_note(tmp_path, artifact):
    video = write_video(tmp_path / "clip.avi", n=5)
    r = edgetl("run", artifact, "--source", video, env={"DISPLAY": "", "WAYLAND_DISPLAY": ""})
    assert r.returncode == 0, r.stderr
    assert "running headless" in r.stderr
    assert len(lines(r.stdout)) == 5


class SlowRunner(OrtRunner):
    """The real ONNX Runtime runner, 40 ms slower per call: inference slower than the source."""

    def infer_all(self, batch):
        time.sleep(0.04)
        return super().infer_all(batch)


def test_latest_frame_policy_drops_frames_when_inference_is_slow(tmp_path, artifact):
    video = write_video(tmp_path / "clip.avi", n=45, fps=60.0)
    model = rt.load(artifact)
    model.runner = SlowRunner(model.runner.model_path, model.runner.options)
    out, err = io.StringIO(), io.StringIO()
    summary = run_app(model, str(video), StreamOptions(realtime=True), AppOptions(headless=True), out=out, err=err)
    res = lines(out.getvalue())
    idx = [o["frame"] for o in res]
    assert summary["policy"] == "latest-frame" and summary["frames_read"] == 45
    assert summary["dropped"] > 15 and len(res) + summary["dropped"] == 45
    assert idx == sorted(idx) and max(np.diff(idx)) >= 2 and idx[-1] == 44
    assert res[-1]["dropped"] == summary["dropped"]
    assert all(o["timings_ms"]["infer"] >= 40 for o in res)
    # in every-frame mode (the default for files) the same slow model drops nothing
    summary = run_app(model, str(video), StreamOptions(), AppOptions(headless=True), out=io.StringIO(),
                      err=io.StringIO())
    assert (summary["frames"], summary["dropped"]) == (45, 0)


def test_lost_http_stream_is_retried_then_fails_with_exit_3(tmp_path, artifact):
    with MjpegServer(plan=(6, 6)) as server:
        r = edgetl("run", artifact, "--source", server.url, "--headless", "--reconnect-timeout", "1",
                   "--summary-json", tmp_path / "s.json")
    assert r.returncode == 3, r.stderr
    assert server.sent == [6, 6]
    assert f"error: source '{server.url}' stopped delivering frames" in r.stderr
    assert "could not be reopened in 1 s" in r.stderr and "--reconnect-timeout" in r.stderr
    assert "reconnected" in r.stderr
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["reconnects"] == 1 and s["stop_reason"] == "source lost" and "error" in s
    assert s["frames"] == len(lines(r.stdout)) > 6


def test_sigterm_finalises_the_saved_video(tmp_path, artifact):
    video = write_video(tmp_path / "long.avi", n=300, fps=30.0)  # 10 s when played in real time
    out = tmp_path / "annotated.mp4"
    code = "import sys\nfrom edgetl.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.Popen([sys.executable, "-c", code, "run", str(artifact), "--source", str(video), "--realtime",
                             "--headless", "--save", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = [proc.stdout.readline() for _ in range(10)]  # it is running and writing
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    n = len(lines("".join(first) + rest))
    assert 10 <= n < 300 and "stopped: SIGTERM" in err
    saved = decode_video(out)
    assert len(saved) == n == int(cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FRAME_COUNT))
    assert not list(tmp_path.glob(".*partial*"))


def test_user_errors_exit_2_with_a_hint(tmp_path, artifact):
    r = edgetl("run", artifact, "--source", tmp_path / "nope.mp4", "--headless")
    assert r.returncode == 2 and "no such file or folder" in r.stderr and "hint:" in r.stderr
    r = edgetl("run", tmp_path, "--source", "0", "--headless")
    assert r.returncode == 2 and "no manifest" in r.stderr
    r = edgetl("run", artifact, "--source", "0", "--backend", "tensorrt")
    assert r.returncode == 2 and "no build for backend 'tensorrt'" in r.stderr
    if not opencv_has_gstreamer():
        r = edgetl("run", artifact, "--source", "csi://0", "--headless")
        assert r.returncode == 2 and "needs OpenCV built with GStreamer" in r.stderr and "JetPack" in r.stderr
    blocker = textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "onnxruntime":
                    raise ImportError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, _Block())
    """)
    r = edgetl("run", artifact, "--source", "0", "--headless", prefix=blocker)
    assert r.returncode == 2
    assert "needs the Python package 'onnxruntime'" in r.stderr and "pip install onnxruntime" in r.stderr


def test_decode_threads_default_follows_the_device(tmp_path, artifact, model):
    """CPU inference: one FFmpeg decoding thread (the other cores stay with inference); a model off the
    CPU (e.g. TensorRT) leaves FFmpeg its default; --decode-threads overrides both."""
    video = write_video(tmp_path / "clip.mp4", n=6)
    assert model.runner.uses_cpu
    s = run_app(model, str(video), StreamOptions(), AppOptions(headless=True), out=io.StringIO(), err=io.StringIO())
    assert s["decode_threads"] == 1 and s["frames"] == 6

    class OffCpu(OrtRunner):
        uses_cpu = False

    gpu_like = rt.load(artifact)
    gpu_like.runner = OffCpu(gpu_like.runner.model_path, gpu_like.runner.options)
    s = run_app(gpu_like, str(video), StreamOptions(), AppOptions(headless=True), out=io.StringIO(), err=io.StringIO())
    assert s["decode_threads"] == 0 and s["frames"] == 6
    r = edgetl("run", artifact, "--source", video, "--headless", "--decode-threads", "2",
               "--summary-json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["decode_threads"] == 2 and len(lines(r.stdout)) == 6
    r = edgetl("run", artifact, "--source", video, "--headless", "--decode-threads", "-1")
    assert r.returncode == 2 and "--decode-threads" in r.stderr


def test_help_has_examples():
    r = edgetl("run", "--help")
    assert r.returncode == 0
    for text in ("--source", "--realtime", "--events", "--save", "csi://0", "rtsp://", "Examples"):
        assert text in r.stdout
