"""The frame stamp of ``tests/rtsp_server.py --stamp`` (benchmarks/rtsp_latency.py reads capture
times back from decoded frames with it): it survives lossy compression and blur, a damaged or
missing stamp reads as None, and ages are right across the 2**32 ms wrap; ``AppOptions.on_result``
(the benchmark's probe) sees every result of ``run_app`` with its decoded, undrawn frame. No server
needed."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from _tinyartifact import decode_video, make_tiny_artifact, write_video
from edgetl.runtime.app import AppOptions, StreamOptions, run_app
from rtsp_server import StampedFrames, draw_stamp, read_stamp, stamp_age_ms

from edgetl import runtime as rt

VALUES = [(0, 0), (2 ** 32 - 1, 2 ** 24 - 1), (1_764_537_600_123 % 2 ** 32, 12345), (0x5A5A5A5A, 0xA5A5A5)]


def bgr(luma: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(luma, cv2.COLOR_GRAY2BGR)


@pytest.mark.parametrize("ms,counter", VALUES)
def test_round_trip_through_jpeg_and_blur(ms, counter):
    luma = StampedFrames(640, 480).picture(7)
    draw_stamp(luma, ms, counter)
    ok, jpg = cv2.imencode(".jpg", bgr(luma), [cv2.IMWRITE_JPEG_QUALITY, 20])
    assert ok
    img = cv2.GaussianBlur(cv2.imdecode(jpg, cv2.IMREAD_COLOR), (7, 7), 2.0)
    assert read_stamp(img) == (ms, counter)
    assert read_stamp(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)) == (ms, counter)  # gray works too


def test_round_trip_through_a_lossy_video_codec(tmp_path):
    """The server's moving picture, stamped, through mp4v (motion-compensated, like H.264) at 320x240."""
    frames = StampedFrames(320, 240)
    path = tmp_path / "stamped.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (320, 240))
    sent = [(1_000_000 + 33 * n, n) for n in range(20)]
    for n, (ms, counter) in enumerate(sent):
        writer.write(bgr(draw_stamp(frames.picture(n), ms, counter)))
    writer.release()
    assert [read_stamp(img) for img in decode_video(path)] == sent


def test_no_stamp_or_a_damaged_one_reads_as_none():
    luma = StampedFrames(320, 240).picture(0)
    assert read_stamp(bgr(luma)) is None  # the texture alone
    draw_stamp(luma, 123456, 42)
    assert read_stamp(bgr(luma)) == (123456, 42)
    luma[16:32, 48:64] = 255 - luma[16:32, 48:64]  # one block flipped: the CRC says so
    assert read_stamp(bgr(luma)) is None
    assert read_stamp(np.zeros((40, 400, 3), np.uint8)) is None  # smaller than the 256x64 stamp


def test_age_across_the_wrap():
    now = 1_764_537_600.5  # seconds
    ms = int(now * 1000 - 40) % 2 ** 32
    assert stamp_age_ms(ms, now) == pytest.approx(40, abs=1)
    wrapped_now = (2 ** 32 + 5) / 1000.0  # 5 ms after the wrap; stamped 10 ms before it
    assert stamp_age_ms(2 ** 32 - 10, wrapped_now) == pytest.approx(15, abs=1e-6)
    assert stamp_age_ms(int(now * 1000 + 3) % 2 ** 32, now) == pytest.approx(-3, abs=1)  # the clock stepped back


def test_on_result_sees_each_decoded_frame_of_run_app(tmp_path):
    frames = StampedFrames(320, 240)
    sent = [(5_000 + 33 * n, n) for n in range(12)]
    video = write_video(tmp_path / "v.avi", size=(320, 240),
                        frames=(bgr(draw_stamp(frames.picture(n), ms, c)) for n, (ms, c) in enumerate(sent)))
    model = rt.load(make_tiny_artifact(tmp_path / "tiny"))
    seen, out = [], io.StringIO()
    try:
        s = run_app(model, str(video), StreamOptions(), AppOptions(headless=True, on_result=lambda r: seen.append(
            (r.frame_index, read_stamp(r.image), r.time))), out=out, err=io.StringIO())
    finally:
        model.close()
    assert [i for i, _, _ in seen] == list(range(12)) and s["frames"] == 12
    assert [st for _, st, _ in seen] == sent
    assert len(out.getvalue().splitlines()) == 12  # the JSON lines still come
