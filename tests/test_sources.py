"""Source URIs and the capture thread, with real OpenCV I/O (videos, image folders, a local HTTP camera)."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from _tinyartifact import MjpegServer, decode_video, frame_at, write_video
from edgetl.runtime.errors import EdgetlError
from edgetl.runtime.sources import FrameSource, SourceLostError, opencv_has_gstreamer, parse_source


def drain(src: FrameSource, per_frame: float = 0.0, limit: float = 30.0) -> list:
    """Take every frame (copying it, then releasing the buffer); optionally slow, like inference."""
    got = []
    t_end = time.monotonic() + limit
    while time.monotonic() < t_end:
        f = src.get(0.1)
        if f is None:
            if src.done:
                break
            continue
        got.append((f.index, f.image.copy(), f.t_capture))
        src.release(f)
        if per_frame:
            time.sleep(per_frame)
    return got


# ---- URI parsing ------------------------------------------------------------------------------------

def test_parse_camera_and_network_uris():
    assert (parse_source("0").kind, parse_source("0").target, parse_source("0").live) == ("camera", 0, True)
    v = parse_source("v4l2:///dev/video2?width=640&height=480&fourcc=MJPG")
    assert (v.kind, v.target, v.params) == ("camera", "/dev/video2", {"width": "640", "height": "480", "fourcc": "MJPG"})
    assert parse_source("http://127.0.0.1:8080/x.mjpg").kind == "http"
    r = parse_source("rtsp://10.0.0.5:554/live")
    assert r.kind == "rtsp" and r.live
    if opencv_has_gstreamer():
        assert r.target.startswith("rtspsrc location=rtsp://10.0.0.5:554/live latency=0")
        assert "appsink drop=1 max-buffers=1" in r.target
    else:  # FFmpeg fallback: the URL itself, opened with low-latency options
        assert r.target == "rtsp://10.0.0.5:554/live"


@pytest.mark.parametrize("uri,what", [("csi://0", "CSI"), ("gst:videotestsrc ! videoconvert ! appsink", "gst:")])
def test_gstreamer_sources(uri, what):
    if opencv_has_gstreamer():
        spec = parse_source(uri)
        assert "appsink" in spec.target
        if uri.startswith("csi"):
            assert spec.target.startswith("nvarguscamerasrc sensor-id=0 ")
        return
    with pytest.raises(EdgetlError) as exc:
        parse_source(uri)
    assert "GStreamer" in exc.value.message and what in exc.value.message
    assert "JetPack" in exc.value.hint


def test_parse_files_folders_globs_and_errors(tmp_path):
    video = write_video(tmp_path / "clip.avi", n=3)
    assert (parse_source(str(video)).kind, parse_source(str(video)).live) == ("file", False)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("b.png", "a.png", "sub/c.jpg"):
        cv2.imwrite(str(tmp_path / "imgs" / name), frame_at(0))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    folder = parse_source(str(tmp_path / "imgs"))
    assert folder.kind == "images" and [p.name for p in folder.target] == ["a.png", "b.png", "c.jpg"]
    assert [p.name for p in parse_source(str(tmp_path / "imgs" / "*.png")).target] == ["a.png", "b.png"]
    with pytest.raises(EdgetlError, match="no such file or folder") as exc:
        parse_source(str(tmp_path / "missing.mp4"))
    assert "rtsp://" in exc.value.hint and "csi://" in exc.value.hint
    with pytest.raises(EdgetlError, match="unknown scheme"):
        parse_source("ftp://host/x.mp4")
    with pytest.raises(EdgetlError, match="no image files"):
        parse_source(str(tmp_path / "imgs" / "*.bmp"))
    with pytest.raises(EdgetlError, match="cannot open"):
        FrameSource(str(tmp_path / "imgs" / "notes.txt")).start()


def test_decode_threads_cap_ffmpeg_for_files(tmp_path):
    """FFmpeg decodes with one thread per core by default; decode_threads caps it (the runtime keeps
    decoding on one core when inference runs on the CPU)."""
    video = write_video(tmp_path / "clip.mp4", n=5, size=(160, 120))
    spec = parse_source(str(video))
    one = spec.open(decode_threads=1)
    default = spec.open()
    try:
        assert one.cap.get(cv2.CAP_PROP_N_THREADS) == 1
        assert default.cap.get(cv2.CAP_PROP_N_THREADS) >= 1
        assert np.array_equal(one.read(None), default.read(None))  # same pixels either way
    finally:
        one.close()
        default.close()


# ---- capture policies -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["clip.avi", "clip.mp4"])
def test_file_every_frame_in_order_matches_decoding(tmp_path, name):
    video = write_video(tmp_path / name, n=30, size=(160, 120))
    expected = decode_video(video)
    assert len(expected) == 30
    with FrameSource(str(video), queue_size=2) as src:
        assert not src.latest
        got = drain(src, per_frame=0.002)  # the consumer is slower than decoding: nothing may drop
    assert [g[0] for g in got] == list(range(30))
    assert src.dropped == 0 and src.frames_read == 30 and src.end_reason == "end of source"
    for (_, img, _), ref in zip(got, expected):  # reused buffers never corrupt a frame
        assert np.array_equal(img, ref)


def test_latest_frame_policy_drops_stale_frames(tmp_path):
    video = write_video(tmp_path / "clip.avi", n=40, fps=100.0)
    with FrameSource(str(video), realtime=True) as src:
        assert src.latest and src.pace and src.fps == 100.0
        got = drain(src, per_frame=0.035)  # "inference" takes 35 ms, frames come every 10 ms
    idx = [g[0] for g in got]
    assert src.frames_read == 40
    assert src.dropped > 10
    assert len(idx) + src.dropped == 40  # every frame is either processed or counted as dropped
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    assert max(np.diff(idx)) >= 3  # gaps: stale frames were skipped, inference worked on the newest
    assert idx[-1] == 39  # the end of the file still delivers its last frame


def test_realtime_paces_a_file_at_its_fps(tmp_path):
    video = write_video(tmp_path / "clip.avi", n=12, fps=50.0)
    with FrameSource(str(video), realtime=True) as src:
        got = drain(src)
    t = [g[2] for g in got]
    assert len(got) == 12 and src.dropped == 0
    assert t[-1] - t[0] >= 11 / 50.0 * 0.95  # paced (not as fast as decoding), never early


def test_image_folder_skips_undecodable_files(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"{i}.png"), frame_at(i * 10))
    (folder / "2.png").write_bytes((folder / "2.png").read_bytes()[:50])  # truncated
    notes: list[str] = []
    with FrameSource(str(folder), note=notes.append) as src:
        got = drain(src)
    assert len(got) == 3 and src.skipped == 1
    assert any("2.png" in n and "truncated" in n for n in notes)


# ---- a live network source that goes away ------------------------------------------------------------

def test_http_stream_reconnects_then_reports_loss():
    notes: list[str] = []
    with MjpegServer(plan=(8, 8)) as server:
        src = FrameSource(server.url, reconnect_timeout=1.0, note=notes.append)
        assert src.latest and src.spec.kind == "http"
        src.start()
        got = []
        t_end = time.monotonic() + 30
        with pytest.raises(SourceLostError) as exc:
            while time.monotonic() < t_end:
                f = src.get(0.1)
                if f is not None:
                    got.append(f.image.copy())
                    src.release(f)
        src.close()
    assert server.sent == [8, 8]
    assert src.reconnects == 1
    assert 8 < len(got) <= 16 and src.frames_read <= 16
    assert exc.value.exit_code == 3
    assert server.url in exc.value.message and "could not be reopened in 1 s" in exc.value.message
    assert "--reconnect-timeout" in exc.value.hint
    assert any("reconnected" in n for n in notes)


def test_capture_threads_alive_sees_a_capture_thread_left_blocked():
    """What the CLI checks before it exits hard (os._exit) past a capture thread left in native code."""
    import threading

    from edgetl.runtime.sources import CAPTURE_THREAD, capture_threads_alive

    release = threading.Event()
    other = threading.Thread(target=release.wait, name="not-a-capture-thread", daemon=True)
    other.start()
    assert not capture_threads_alive()
    blocked = threading.Thread(target=release.wait, name=f"{CAPTURE_THREAD}7", daemon=True)
    blocked.start()
    assert capture_threads_alive()
    release.set()
    blocked.join(5)
    other.join(5)
    assert not capture_threads_alive()
