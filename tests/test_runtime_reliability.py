"""The device runtime on odd inputs (issue 13, findings 6, 7, 9, 10, 11, 14, 16): real videos, image
folders, ONNX models, sockets on 127.0.0.1 and subprocesses of the CLI; each test takes seconds."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from _tinyartifact import MjpegServer, frame_at, make_tiny_artifact, write_video
from conftest import png_bomb
from edgetl import runtime as rt
from edgetl.runtime import sources
from edgetl.runtime.app import STAGES, AppOptions, FrameStats, StreamOptions, VideoSaver, partial_path, run_app
from edgetl.runtime.errors import EdgetlError, ImageDecodeError
from edgetl.runtime.imageio import MAX_PIXELS_ENV, header_size, read_image
from edgetl.runtime.sources import (FrameSource, Reader, SourceLostError, SourceSpec, _rtsp_pipeline, parse_source,
                                    redact_uri)

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "runtime"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_tiny_artifact(tmp_path_factory.mktemp("art") / "tiny")


def edgetl(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    code = "import sys\nfrom edgetl.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def lines(stdout: str) -> list:
    return [json.loads(line) for line in stdout.splitlines()]


def one_line_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    """The CLI failed with ``code``, an ``error:`` line and no traceback; returns stderr."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "error:" in r.stderr, r.stderr
    return r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



# ---- finding 7: a camera that opens but sends nothing; bounded statistics ------------------------------

class _SilentReader(Reader):
    """What a V4L2 camera or a stalled stream looks like to the capture thread: it opened, then every
    read times out. ``frames`` good frames come first."""

    def __init__(self, frames: int = 0):
        self.left = frames

    def read(self, out):
        if self.left > 0:
            self.left -= 1
            return frame_at(self.left)
        time.sleep(0.02)  # the driver's read timeout, shortened
        return None


class _SilentCamera(SourceSpec):
    """A live source whose first opening delivers ``first`` frames, then every reopening opens fine
    and delivers nothing."""

    def __new__(cls, *a, **k):
        return super().__new__(cls)

    def __init__(self, first: int = 0):
        super().__init__("silent://camera", "camera", 0)
        object.__setattr__(self, "opens", [0])
        object.__setattr__(self, "first", first)

    def open(self, note=sources.stderr_note, decode_threads=0):
        self.opens[0] += 1
        return _SilentReader(self.first if self.opens[0] == 1 else 0)


def _run_until_lost(src: FrameSource, limit: float = 20.0):
    got, t0 = 0, time.monotonic()
    with pytest.raises(SourceLostError) as exc:
        while time.monotonic() - t0 < limit:
            f = src.get(0.05)
            if f is not None:
                got += 1
                src.release(f)
    return got, time.monotonic() - t0, exc.value


@pytest.mark.parametrize("first", [0, 5])
def test_a_camera_that_opens_but_sends_nothing_is_given_up_after_the_timeout(first):
    """Before: every successful reopening restarted the deadline, so this ran forever."""
    spec = _SilentCamera(first)
    notes: list = []
    src = FrameSource(spec, reconnect_timeout=1.0, note=notes.append).start()
    try:
        got, elapsed, err = _run_until_lost(src)
    finally:
        src.close()
    assert src.frames_read == first  # a live source keeps the latest frame: a busy consumer may see fewer
    assert (got >= 1) == bool(first) and got <= first
    # the deadline runs from the last frame received; the upper bound leaves room for a CPU starved by
    # other jobs (4 s failed once at nice 19 beside a training), the bug it guards ran until the 20 s limit
    assert 0.9 <= elapsed < 10.0, elapsed
    assert spec.opens[0] >= 2 and src.reconnects == spec.opens[0] - 1  # it kept reopening meanwhile, with back-off
    assert spec.opens[0] <= 8
    assert err.exit_code == 3 and "opens but sent no frame for 1 s" in err.message
    assert (f"after {first} frames" in err.message) == bool(first)
    assert sum("reconnecting for up to" in n for n in notes) == 1  # one loss, one note (not one per reopening)


def test_frame_statistics_use_constant_memory():
    stats = FrameStats(size=1000)
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 5.0, size=200_000)  # "a day" of latencies, 200x the sample
    for v in values:
        stats.add(float(v), {s: float(v) / 4 for s in STAGES})
    assert stats.sample.shape == (1000, 1 + len(STAGES)) and stats.n == 200_000
    lat = stats.column("latency")
    assert lat["mean"] == pytest.approx(values.mean(), abs=1e-3) and lat["max"] == pytest.approx(values.max(), abs=1e-3)
    for q in (50, 90):  # a uniform sample of 1000: within a few percent of the true percentile
        assert lat[f"p{q}"] == pytest.approx(np.percentile(values, q), rel=0.08)
    assert stats.column("infer")["p50"] == pytest.approx(lat["p50"] / 4, abs=1e-3)
    small = FrameStats(size=1000)  # below the sample size the percentiles are exact
    for v in values[:300]:
        small.add(float(v), {s: 0.0 for s in STAGES})
    assert small.column("latency")["p90"] == round(float(np.percentile(values[:300], 90)), 3)


def test_summary_keeps_its_keys_and_exact_percentiles_on_a_short_run(tmp_path, artifact):
    video = write_video(tmp_path / "clip.avi", n=12)
    model = rt.load(artifact)
    out = io.StringIO()
    s = run_app(model, str(video), StreamOptions(), AppOptions(headless=True), out=out, err=io.StringIO())
    keys = {"source", "source_kind", "policy", "decode_threads", "frames", "frames_read", "dropped", "reconnects",
            "skipped_files", "elapsed_s", "fps", "latency_ms", "stages_ms", "stop_reason", "model"}
    assert keys <= set(s) and set(s["stages_ms"]) == set(STAGES)
    lat = [o["latency_ms"] for o in lines(out.getvalue())]
    assert s["frames"] == 12 and s["latency_ms"]["p50"] == pytest.approx(np.percentile(lat, 50), abs=2e-3)
    json.dumps(s)


# ---- finding 9: credentials and the GStreamer pipeline --------------------------------------------------

def test_credentials_never_reach_notes_errors_or_the_summary(tmp_path, artifact):
    assert redact_uri("rtsp://admin:s3cret@10.0.0.5:554/live") == "rtsp://admin:***@10.0.0.5:554/live"
    assert redact_uri("http://cam/x.mjpg?user=a&password=pw&token=t0k") == "http://cam/x.mjpg?user=a&password=***&token=***"
    assert redact_uri("rtsp://10.0.0.5/live") == "rtsp://10.0.0.5/live"
    assert redact_uri("rtsp://u:p!s@s\"'@[fe80::1]:8554/x") == "rtsp://u:***@[fe80::1]:8554/x"  # to the last @
    assert redact_uri("gst:rtspsrc location=rtsp://u:pw@h/x ! decodebin ! appsink") == \
        "gst:rtspsrc location=rtsp://u:***@h/x ! decodebin ! appsink"
    spec = parse_source("rtsp://admin:s3cret@10.0.0.5:554/live")
    assert spec.uri == "rtsp://admin:***@10.0.0.5:554/live" and "s3cret" not in repr(spec)
    assert "s3cret" in str(spec.target)  # only what OpenCV opens holds it
    assert parse_source("http://u:pw@127.0.0.1:9/x").uri == "http://u:***@127.0.0.1:9/x"
    # a real run against a stream that is down: notes, the error and the summary JSON
    port = free_port()
    r = edgetl("run", artifact, "--source", f"rtsp://admin:s3cret@127.0.0.1:{port}/live?token=t0k", "--headless",
               "--reconnect-timeout", "0.5", "--summary-json", tmp_path / "s.json")
    err = one_line_error(r, 3)
    summary = (tmp_path / "s.json").read_text()
    for text in (err, r.stdout, summary):
        assert "s3cret" not in text and "t0k" not in text
    assert f"rtsp://admin:***@127.0.0.1:{port}/live?token=***" in err
    assert json.loads(summary)["source"] == f"rtsp://admin:***@127.0.0.1:{port}/live?token=***"


@pytest.mark.parametrize("uri,what", [
    ("rtsp://h/x latency=0 ! filesink location=/tmp/pwned", "a space"),
    ("rtsp://h/x!fakesink", "'!'"),
    ('rtsp://h/x"', "a double quote"),
    ("rtsp://h/x'", "a single quote"),
    ("rtsp://h/x\nfilesrc", "a newline"),
    ("rtsp://h/x\\", "a backslash"),
])
def test_the_rtsp_uri_cannot_inject_gstreamer_syntax(monkeypatch, uri, what):
    with pytest.raises(EdgetlError) as exc:
        _rtsp_pipeline(uri)
    assert what in exc.value.message and "gst_parse_launch" in exc.value.message and "%" in exc.value.hint
    monkeypatch.setattr(sources, "opencv_has_gstreamer", lambda: True)  # as on a Jetson
    with pytest.raises(EdgetlError, match="GStreamer pipeline"):
        parse_source(uri)


def test_a_clean_rtsp_uri_goes_into_the_pipeline_as_is(monkeypatch):
    monkeypatch.setattr(sources, "opencv_has_gstreamer", lambda: True)
    spec = parse_source("rtsp://user:p%21ss@[fe80::1]:8554/cam/1?channel=2&subtype=0")
    assert spec.target.startswith("rtspsrc location=rtsp://user:p%21ss@[fe80::1]:8554/cam/1?channel=2&subtype=0 "
                                  "latency=0 tcp-timeout=5000000 ! ")
    assert spec.target.count("!") == 4 and spec.uri == "rtsp://user:***@[fe80::1]:8554/cam/1?channel=2&subtype=0"


# ---- finding 10: decoded image size -------------------------------------------------------------------

def test_an_image_declaring_a_huge_size_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = png_bomb(tmp_path / "bomb.png")
    assert header_size(bomb.read_bytes()) == (40000, 40000)
    t0 = time.perf_counter()
    with pytest.raises(ImageDecodeError) as exc:
        read_image(bomb)  # 4.8 GB if decoded
    assert time.perf_counter() - t0 < 0.5
    assert str(bomb) in exc.value.message and "1600 megapixels" in exc.value.message and "\n" not in exc.value.message
    assert MAX_PIXELS_ENV in exc.value.hint
    img = np.full((300, 400, 3), 99, np.uint8)
    for ext in (".png", ".jpg", ".bmp", ".webp", ".tif", ".ppm"):
        cv2.imwrite(str(tmp_path / f"ok{ext}"), img)
        assert header_size((tmp_path / f"ok{ext}").read_bytes()) == (400, 300), ext
        assert read_image(tmp_path / f"ok{ext}").shape == (300, 400, 3)
        with pytest.raises(ImageDecodeError, match="400x300 pixels is over the limit"):
            read_image(tmp_path / f"ok{ext}", max_pixels=100_000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "100000")
    with pytest.raises(ImageDecodeError, match="over the limit of 0.1 megapixels"):
        read_image(tmp_path / "ok.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(EdgetlError, match=MAX_PIXELS_ENV):
        read_image(tmp_path / "ok.png")


# ---- finding 11: the device runtime runs on Python 3.8 (JetPack 5) -------------------------------------

# vermin and the AST check of what Python 3.8 evaluates cover the runtime and the other device-side
# modules in tests/test_device_python.py, which also runs the device commands on a real Python 3.8.


def _python38() -> str:
    from test_device_python import python38

    return python38()


def test_edgetl_run_works_on_python_3_8(tmp_path, artifact):
    """The device path on a real Python 3.8: import the runtime, then `edgetl run` a video and a folder."""
    exe = _python38()
    pkg = tmp_path / "site" / "edgetl"  # the installed layout: edgetl/ with runtime/ inside it
    pkg.mkdir(parents=True)
    for entry in (REPO / "edgetl").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    (pkg / "runtime").symlink_to(RUNTIME)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run([exe, "-c", "import sys, edgetl.runtime, edgetl.runtime.app, edgetl.runtime.runners.openvino, "
                                   "edgetl.runtime.runners.tensorrt; print(sys.version_info[:2])"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "(3, 8)" in r.stdout, r.stderr
    video = write_video(tmp_path / "clip.avi", n=8)
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), frame_at(i * 10))
    for src in (video, folder):
        r = subprocess.run([exe, "-c", "import sys\nfrom edgetl.cli import main\nsys.exit(main(sys.argv[1:]))",
                            "run", str(artifact), "--source", str(src), "--headless"],
                           capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert len(lines(r.stdout)) == (8 if src == video else 3)


# ---- finding 14 (and 6): run --save ---------------------------------------------------------------------

def test_a_killed_save_leaves_a_visible_partial_that_the_next_run_removes(tmp_path, artifact):
    video = write_video(tmp_path / "long.avi", n=300, fps=30.0)
    out = tmp_path / "videos" / "annotated.mp4"
    code = "import sys\nfrom edgetl.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.Popen([sys.executable, "-c", code, "run", str(artifact), "--source", str(video), "--realtime",
                             "--headless", "--save", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for _ in range(5):
            assert proc.stdout.readline()  # it runs and writes frames
        proc.send_signal(signal.SIGKILL)  # no handler runs: power loss, OOM killer
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    partial = partial_path(out)
    assert partial.name == "annotated.partial.mp4" and partial.exists() and not out.exists()
    assert not list(out.parent.glob(".*"))  # nothing hidden
    r = edgetl("run", artifact, "--source", video, "--headless", "--save", out, "--max-frames", 4)
    assert r.returncode == 0, r.stderr
    assert f"removed {partial}" in r.stderr and "interrupted run" in r.stderr
    assert out.exists() and not partial.exists()
    assert int(cv2.VideoCapture(str(out)).get(cv2.CAP_PROP_FRAME_COUNT)) == 4


def test_an_unusable_save_path_is_one_line_before_processing(tmp_path, artifact):
    video = write_video(tmp_path / "clip.avi", n=5)
    (tmp_path / "a_file").write_text("not a folder")
    r = edgetl("run", artifact, "--source", video, "--headless", "--save", tmp_path / "a_file" / "sub" / "out.mp4")
    err = one_line_error(r)
    assert "--save" in err and "cannot create the folder" in err and "FileNotFoundError" not in err
    assert r.stdout == ""  # nothing was processed
    (tmp_path / "dir.mp4").mkdir()
    err = one_line_error(edgetl("run", artifact, "--source", video, "--headless", "--save", tmp_path / "dir.mp4"))
    assert "is a folder" in err
    err = one_line_error(edgetl("run", artifact, "--source", video, "--headless", "--summary-json",
                                tmp_path / "a_file" / "s.json"))
    assert "--summary-json" in err and "cannot create the folder" in err
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            err = one_line_error(edgetl("run", artifact, "--source", video, "--headless", "--save", locked / "o.mp4"))
            assert "not writable" in err
        finally:
            locked.chmod(0o700)
    # the saver itself: a writer that cannot open is an EdgetlError, and closing after it is a no-op
    saver = VideoSaver(tmp_path / "ok" / "o.avi")
    saver.fourcc = -1  # a codec OpenCV refuses
    with pytest.raises(EdgetlError, match="cannot write"):
        saver.write(np.zeros((48, 64, 3), np.uint8))
    saver.close()
    assert not list((tmp_path / "ok").iterdir())


# ---- finding 16 (and 6): options, camera settings, ROI, late streams, file names -------------------------

def test_backend_options_are_checked(tmp_path, artifact):
    video = write_video(tmp_path / "clip.avi", n=3)
    err = one_line_error(edgetl("run", artifact, "--source", video, "--headless", "--option", "nosuch=1"))
    assert "onnxruntime has no option 'nosuch'" in err
    for name in ("providers", "intra_op_threads", "inter_op_threads", "graph_optimization_level", "execution_mode"):
        assert name in err
    err = one_line_error(edgetl("run", artifact, "--source", video, "--headless", "--option", "intra_op_threads=abc"))
    assert "intra_op_threads = 'abc' is not a whole number" in err and "--option intra_op_threads=2" in err
    err = one_line_error(edgetl("run", artifact, "--source", video, "--headless", "--option", "execution_mode=fast"))
    assert "execution_mode" in err and "sequential" in err
    r = edgetl("run", artifact, "--source", video, "--headless", "--option", "intra_op_threads=1")
    assert r.returncode == 0 and len(lines(r.stdout)) == 3
    # the other backends' option checks run before their package is imported
    from edgetl.runtime.runners.openvino import compile_config
    from edgetl.runtime.runners.tensorrt import TensorRTRunner
    with pytest.raises(EdgetlError, match="openvino has no option 'thread'"):
        compile_config({"thread": 2})
    with pytest.raises(EdgetlError, match="num_streams = 'x' is not a whole number"):
        compile_config({"num_streams": "x"})
    assert compile_config({"num_streams": "AUTO", "threads": 2, "fold_preprocessing": True}) == \
        {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2}
    with pytest.raises(EdgetlError, match="tensorrt has no option 'dla'"):
        TensorRTRunner.check_options({"dla": 0, "key": {}})


@pytest.mark.parametrize("uri,msg", [
    ("csi://0?width=x", "width='x' is not a whole number"),
    ("csi://0?flip=9", "flip=9 is out of range"),
    ("csi://0?widht=640", "unknown setting 'widht'"),
    ("v4l2:///dev/video0?fps=abc", "fps='abc' is not a number"),
    ("v4l2:///dev/video0?fourcc=MJPEG", "fourcc='MJPEG' is not a code"),
])
def test_camera_settings_are_checked(uri, msg):
    with pytest.raises(EdgetlError) as exc:
        parse_source(uri)
    assert msg in exc.value.message and exc.value.hint.startswith(("e.g.", "give", "known settings"))


def test_csi_setting_error_on_the_command_line(tmp_path, artifact):
    err = one_line_error(edgetl("run", artifact, "--source", "csi://0?width=x", "--headless"))
    assert "width='x' is not a whole number" in err


@pytest.mark.parametrize("realtime", [False, True])
def test_roi_skips_images_it_does_not_fit_and_names_them(tmp_path, artifact, realtime):
    folder = tmp_path / "shots"
    folder.mkdir()
    sizes = {"a.png": (120, 160), "b_small.png": (30, 30), "c.png": (120, 160), "d_small.png": (40, 20),
             "e.png": (100, 100)}
    for name, (h, w) in sizes.items():
        cv2.imwrite(str(folder / name), np.full((h, w, 3), 200, np.uint8))
    args = ["run", artifact, "--source", folder, "--headless", "--roi", "50,50,40,40", "--summary-json",
            tmp_path / "s.json"] + (["--realtime", "--fps", "200"] if realtime else [])
    r = edgetl(*args)
    assert r.returncode == 0, r.stderr
    out = lines(r.stdout)
    if not realtime:
        assert [Path(o["file"]).name for o in out] == ["a.png", "c.png", "e.png"]
    assert all(Path(o["file"]).name in sizes for o in out)
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["skipped_unusable"] == 2
    assert [Path(e["file"]).name for e in s["skipped"]] == ["b_small.png", "d_small.png"]
    assert all("--roi 50,50,40,40 starts outside" in e["reason"] for e in s["skipped"])
    assert "skipped 2 images" in r.stderr and "b_small.png, d_small.png" in r.stderr


def test_image_folder_results_carry_the_file_name(tmp_path, artifact):
    folder = tmp_path / "shots"
    (folder / "sub").mkdir(parents=True)
    names = ["x1.png", "sub/x0.jpg", "x2.png"]
    for i, name in enumerate(names):
        cv2.imwrite(str(folder / name), frame_at(i * 10))
    png_bomb(folder / "x3_bomb.png")
    r = edgetl("run", artifact, "--source", folder, "--headless", "--summary-json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    out = lines(r.stdout)
    assert [o["file"] for o in out] == [str(folder / n) for n in sorted(names)]
    assert [o["frame"] for o in out] == [0, 1, 2]
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["skipped_files"] == 1 and s["skipped"][0]["file"] == str(folder / "x3_bomb.png")
    assert "megapixels" in s["skipped"][0]["reason"]
    video = write_video(tmp_path / "clip.avi", n=3)
    assert all("file" not in o for o in lines(edgetl("run", artifact, "--source", video, "--headless").stdout))


def test_a_stream_that_is_not_up_yet_is_retried_until_the_timeout(artifact):
    port = free_port()  # nothing listens: connection refused, as for a recorder still booting
    t0 = time.monotonic()
    r = edgetl("run", artifact, "--source", f"rtsp://127.0.0.1:{port}/live", "--headless", "--reconnect-timeout", "3")
    elapsed = time.monotonic() - t0
    err = one_line_error(r, 3)
    assert elapsed >= 2.8, (elapsed, err)  # before: exit after 0.7 s
    assert "does not open yet" in err and "did not open in 3 s" in err and "--reconnect-timeout" in err


class _LateCamera(MjpegServer):
    """The MJPEG camera of _tinyartifact, listening on a port chosen in advance."""

    def __init__(self, port: int, **kw):
        super().__init__(**kw)
        self.sock.close()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(4)
        self.sock.settimeout(0.5)
        self.port, self.url = port, f"http://127.0.0.1:{port}/stream.mjpg"


def test_a_camera_that_comes_up_after_the_start_is_waited_for(tmp_path, artifact):
    port = free_port()
    code = "import sys\nfrom edgetl.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.Popen([sys.executable, "-c", code, "run", str(artifact), "--source",
                             f"http://127.0.0.1:{port}/stream.mjpg", "--headless", "--reconnect-timeout", "20",
                             "--max-frames", "5", "--summary-json", str(tmp_path / "s.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # the device booted before its camera
        assert proc.poll() is None, proc.communicate()
        with _LateCamera(port, plan=(60,), interval=0.02):
            out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert len(lines(out)) == 5 and "does not open yet" in err and "opened (attempt" in err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["frames"] == 5 and s["reconnects"] == 0 and s["stop_reason"] == "max frames"
