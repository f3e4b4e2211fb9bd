"""Several sources in one ``edgetl run`` (batched inference, per-source results, one source failing
never stops the others) and ``--serve`` (MJPEG, status page, /health) read by a real HTTP client
and a headless browser (issue 14). Servers run on 127.0.0.1 only and are stopped at the end."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from _streams import mjpeg_server
from _tinyartifact import decode_video, make_tiny_artifact, write_video
from edgetl import runtime as rt
from edgetl.runtime.app import AppOptions, StreamOptions, run_app
from edgetl.runtime.multi import infer_batch
from edgetl.runtime.runners.onnxruntime import OrtRunner
from test_streams import Run, summary


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_tiny_artifact(tmp_path_factory.mktemp("art") / "tiny")


@pytest.fixture(scope="module")
def model(artifact):
    return rt.load(artifact)


def lines(text: str) -> list:
    return [json.loads(line) for line in text.splitlines()]


def test_files_every_frame_of_every_source_batched(tmp_path, artifact, model):
    videos = [write_video(tmp_path / f"v{i}.avi", n=20 + 10 * i, size=(80, 60)) for i in range(3)]
    r = subprocess.run([sys.executable, "-m", "edgetl", "run", str(artifact), "-s", str(videos[0]), "-s",
                        f"mid={videos[1]}", "--source", str(videos[2]), "--headless", "--top-k", "2",
                        "--summary-json", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = lines(r.stdout)
    for name, video in zip(["0", "mid", "2"], videos):
        mine = [o for o in out if o["source"] == name]
        frames = decode_video(video)
        assert [o["frame"] for o in mine] == list(range(len(frames)))  # every frame, in order, once
        for o, img in zip(mine, frames):
            want = model.predict(img, top_k=2)
            assert [lab for lab, _ in o["top_k"]] == [lab for lab, _ in want]
            assert np.allclose([s for _, s in o["top_k"]], [s for _, s in want], atol=2e-6)
    s = summary(tmp_path / "s.json")
    assert [e["frames"] for e in s["sources"]] == [20, 30, 40] and s["frames"] == 90
    # files: one frame of every source still running in each batch (20 of 3, 10 of 2, 10 of 1)
    assert s["batches"] == 40 and s["mean_batch"] == 2.25 and s["model_calls"] == s["batches"]
    assert [o["batch"] for o in out].count(3) == 60 and [o["batch"] for o in out].count(1) == 10
    assert s["stop_reason"] == "all sources gone" and all(e["stop_reason"] == "end of source" for e in s["sources"])
    assert "[mid]" in r.stderr and "3 sources" in r.stderr


class CountingRunner(OrtRunner):
    """ONNX Runtime, claiming a static batch (the model itself takes any): counts the calls."""

    batch = None
    calls: list = []

    @property
    def fixed_batch(self):
        return self.batch

    def infer_all(self, batch):
        self.calls.append(len(batch))
        return super().infer_all(batch)


@pytest.mark.parametrize("fixed,calls", [(None, [5]), (1, [1] * 5), (4, [4, 4])])
def test_a_static_batch_build_gets_as_many_calls_as_needed(artifact, fixed, calls):
    m = rt.load(artifact)
    m.runner = CountingRunner(m.runner.model_path, m.runner.options)
    m.runner.batch, m.runner.calls = fixed, []
    m._batched = fixed not in (None, 1)
    x = np.random.default_rng(0).uniform(-1, 1, (5, 3, 32, 32)).astype(np.float32)
    outs, n = infer_batch(m, x)
    assert m.runner.calls == calls and n == len(calls)
    ref = rt.load(artifact).runner.infer_all(x)[0]
    assert outs[0].shape == (5, 2) and np.allclose(outs[0], ref, atol=1e-6)


def test_one_source_lost_never_stops_the_others(tmp_path, artifact):
    """A camera killed for good is given up after its timeout while the other goes on; the run ends
    at --duration with exit 0; /health says which source delivers."""
    with mjpeg_server("--fps", "20") as a, mjpeg_server("--fps", "20") as b:
        run = Run(sys.executable, artifact, "-s", f"a={a.url}", "-s", f"b={b.url}", "--headless",
                  "--reconnect-timeout", "1", "--duration", "5", "--serve", "127.0.0.1:0",
                  "--summary-json", tmp_path / "s.json")
        run.wait_lines(20)
        base = serve_url(run)
        code, health = get_json(base + "health")
        assert code == 200 and health["ok"] and health["sources"]["a"]["delivering"], health
        a.kill()
        t_kill = time.monotonic()
        time.sleep(2.5)
        code, health = get_json(base + "health")
        assert code == 503 and not health["ok"], health
        assert health["sources"]["a"]["state"] == "lost" and health["sources"]["b"]["delivering"], health
        code = run.finish()
    assert code == 0, run.err
    s = summary(tmp_path / "s.json")
    by = {e["name"]: e for e in s["sources"]}
    assert by["a"]["stop_reason"] == "source lost" and "error" in by["a"] and s["stop_reason"] == "duration"
    late_b = [o for t, o in run.lines if t > t_kill + 1.5 and o["source"] == "b"]
    assert len(late_b) >= 20, len(late_b)  # b went on at its pace after a was given up
    assert "source 'a' lost" in run.err and "1 other sources go on" in run.err


def test_every_source_gone_one_lost_exits_3(tmp_path, artifact):
    video = write_video(tmp_path / "short.avi", n=10)
    with mjpeg_server("--fps", "20") as cam:
        run = Run(sys.executable, artifact, "-s", video, "-s", f"cam={cam.url}", "--headless", "--reconnect-timeout",
                  "1", "--summary-json", tmp_path / "s.json")
        run.wait_lines(15)
        cam.kill()
        code = run.finish()
    assert code == 3, run.err
    assert "error: every source is gone (1 of 2 lost: 'cam')" in run.err and "Traceback" not in run.err
    s = summary(tmp_path / "s.json")
    assert [e["stop_reason"] for e in s["sources"]] == ["end of source", "source lost"]
    assert s["sources"][0]["frames"] == 10


def test_bad_multi_source_input_is_one_line(tmp_path, artifact):
    video = write_video(tmp_path / "v.avi", n=3)
    cases = [
        (["-s", f"x={video}", "-s", f"x={video}"], "the name 'x' is given to two sources"),
        (["-s", video, "-s", video, "--save", tmp_path / "o.mp4"], "writes one video, and this run has 2 sources"),
        (["--sources", tmp_path / "none.txt"], "--sources"),
        ([], "no --source given"),
        (["-s", video, "--serve", "localhost:http"], "is not a port number"),
        (["-s", video, "--serve", "127.0.0.1:99999"], "is not a port number"),
    ]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    cases.append((["--sources", tmp_path / "empty.txt"], "no source in it"))
    for args, msg in cases:
        r = subprocess.run([sys.executable, "-m", "edgetl", "run", str(artifact), *map(str, args), "--headless"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert "hint:" in r.stderr
    (tmp_path / "list.txt").write_text(f"# two cameras\nleft={video}\n\n{video}\n")
    r = subprocess.run([sys.executable, "-m", "edgetl", "run", str(artifact), "--sources", str(tmp_path / "list.txt"),
                        "--headless"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and sorted({o["source"] for o in lines(r.stdout)}) == ["1", "left"], r.stderr


def test_a_port_in_use_is_one_line(tmp_path, artifact):
    import socket
    video = write_video(tmp_path / "v.avi", n=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "edgetl", "run", str(artifact), "-s", str(video), "--headless",
                            "--serve", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot listen there" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---- --serve, read by an HTTP client and a browser ---------------------------------------------------------

def serve_url(run: Run, timeout: float = 20) -> str:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        m = re.search(r"serving (http://127\.0\.0\.1:\d+/)", run.err)
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise AssertionError(run.err)


def get_json(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def read_mjpeg(url: str, n: int) -> list:
    """``n`` JPEG frames of a multipart/x-mixed-replace stream, decoded."""
    frames = []
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("multipart/x-mixed-replace; boundary=")
        boundary = resp.headers["Content-Type"].split("boundary=")[1].encode()
        while len(frames) < n:
            line = resp.readline()
            if line.strip() != b"--" + boundary:
                continue
            headers = {}
            while True:
                h = resp.readline().strip()
                if not h:
                    break
                k, _, v = h.decode().partition(":")
                headers[k.lower()] = v.strip()
            assert headers["content-type"] == "image/jpeg"
            data = resp.read(int(headers["content-length"]))
            frames.append(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    return frames


def test_serve_mjpeg_status_page_and_health(tmp_path, artifact):
    with mjpeg_server("--fps", "20", "--size", "320x240") as cam:
        video = write_video(tmp_path / "v.avi", n=600, size=(160, 120), fps=30.0)
        run = Run(sys.executable, artifact, "-s", f"line={cam.url}", "-s", f"file={video}", "--realtime",
                  "--headless", "--duration", "12", "--serve", "127.0.0.1:0")
        try:
            base = serve_url(run)
            run.wait_lines(10)
            frames = read_mjpeg(base + "stream/line.mjpg", 5)
            assert all(f.shape == (240, 320, 3) for f in frames)
            # the overlay (label box, top left) is drawn on the served frames
            assert frames[-1][:20, :60].mean() != pytest.approx(frames[-1][150:, 200:].mean(), abs=5)
            assert read_mjpeg(base + "stream/file.mjpg", 2)[0].shape == (120, 160, 3)
            code, status = get_json(base + "status.json")
            assert code == 200 and [e["name"] for e in status["sources"]] == ["line", "file"]
            line = status["sources"][0]
            assert line["state"] == "delivering" and 10 <= line["fps"] <= 25 and line["last"]["label"] in (
                "dark", "bright") and line["latency_p50_ms"] > 0 and line["size"] == [320, 240]
            code, health = get_json(base + "health")
            assert code == 200 and health["ok"] and set(health["sources"]) == {"line", "file"}
            with urllib.request.urlopen(base, timeout=10) as resp:
                page = resp.read().decode()
            assert "stream/line.mjpg" in page and "stream/file.mjpg" in page and "status.json" in page
            shot = browser_screenshot(base, tmp_path / "serve.png")
            if shot is not None:
                img = cv2.imread(str(shot))
                assert img is not None and img.shape[0] >= 600 and img.std() > 10  # not a blank page
        finally:
            run.proc.terminate()
            run.finish(30)
    assert run.proc.returncode == 0, run.err


def browser_screenshot(url: str, dest, wait_ms: int = 4000):
    """A headless chromium's screenshot of ``url`` (None, and a printed reason, without chromium)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        print("no chromium here (sudo make system-deps installs it): the page was read with urllib only")
        return None
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--screenshot={dest}", "--window-size=1180,760", f"--timeout={wait_ms}", url]
    subprocess.run(cmd, capture_output=True, timeout=90)
    return dest if dest.exists() else None


def test_library_run_app_takes_a_list_of_sources(tmp_path, artifact, model):
    videos = [write_video(tmp_path / f"v{i}.avi", n=12) for i in range(2)]
    out = io.StringIO()
    s = run_app(model, [str(v) for v in videos], StreamOptions(max_frames=5), AppOptions(headless=True), out=out,
                err=io.StringIO())
    got = lines(out.getvalue())
    assert [e["frames"] for e in s["sources"]] == [5, 5] and len(got) == 10
    assert all(e["stop_reason"] == "max frames" for e in s["sources"])
