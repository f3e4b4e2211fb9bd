"""Real stream servers for the tests, on 127.0.0.1 only, as subprocesses a test can kill and restart:
GStreamer's RTSP server (tests/rtsp_server.py, run by the system python3 with python3-gi) and an
MJPEG-over-HTTP camera (tests/mjpeg_server.py); and the Python whose OpenCV has GStreamer (for gst:,
csi:// and GStreamer RTSP). What a machine lacks is a skip reason naming the set-up that adds it
(``sudo make system-deps && make gst-env``, see .ci/system-deps.sh)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SYSTEM_PYTHON = os.environ.get("EDGETL_SYSTEM_PYTHON", "/usr/bin/python3")
SETUP = "run `sudo make system-deps && make gst-env` (Debian/Ubuntu packages, see .ci/system-deps.sh)"


def _works(cmd: List[str], timeout: float = 60) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.lru_cache(maxsize=None)
def rtsp_server_missing() -> Optional[str]:
    """None when GStreamer's RTSP server runs here, else why not (a skip reason)."""
    code = ("import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import Gst, GstRtspServer; "
            "Gst.init(None); assert all(Gst.ElementFactory.find(e) for e in "
            "('videotestsrc', 'x264enc', 'rtph264pay', 'jpegenc'))")
    if _works([SYSTEM_PYTHON, "-c", code]):
        return None
    return f"no GStreamer RTSP server for {SYSTEM_PYTHON} (gir1.2-gst-rtsp-server-1.0, python3-gi, x264enc): {SETUP}"


def gst_python_default() -> Path:
    return Path(os.environ.get("EDGETL_GST_PYTHON", REPO / ".venv" / "gst" / "bin" / "python"))


@functools.lru_cache(maxsize=None)
def gst_python_missing() -> Optional[str]:
    """None when ``gst_python_default()`` has an OpenCV with GStreamer and edgetl, else why not."""
    py = gst_python_default()
    code = ("from edgetl.runtime.sources import opencv_has_gstreamer; import onnxruntime, click, rich; "
            "assert opencv_has_gstreamer()")
    if py.exists() and _works([str(py), "-c", code]):
        return None
    return (f"no Python with an OpenCV built with GStreamer and edgetl at {py} (EDGETL_GST_PYTHON): {SETUP}")


class ManagedProcess:
    """A server subprocess the tests start (``start()``, in the subclass), crash (``kill()``: SIGKILL),
    stop (``stop()``: SIGTERM, then SIGKILL after 5 s) and always stop on ``__exit__``."""

    proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 20.0) -> "ManagedProcess":
        raise NotImplementedError

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.kill()
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()
            self.proc = None

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(ManagedProcess):
    """A stream server subprocess on 127.0.0.1: ``url``, ``kill()`` (SIGKILL, like a crash),
    ``start()`` again on the same port, always stopped by ``__exit__``."""

    def __init__(self, argv: List[str], url: str, port: int = 0):
        self.argv, self.url_form, self.port = argv, url, port
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""

    def start(self, timeout: float = 20.0) -> "ServerProcess":
        self.proc = subprocess.Popen(self.argv + ["--port", str(self.port)], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        t_end = time.monotonic() + timeout
        line = ""
        while time.monotonic() < t_end:
            line = self.proc.stdout.readline()
            if line.startswith("PORT ") or not line:
                break
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"{self.argv[1]} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.url = self.url_form.format(port=self.port)
        return self



def rtsp_server(*args: str) -> ServerProcess:
    """tests/rtsp_server.py (args: --size WxH, --fps N, --codec, --mode silent, --resize-after S ...)."""
    return ServerProcess([SYSTEM_PYTHON, str(HERE / "rtsp_server.py"), *args], "rtsp://127.0.0.1:{port}/live")


def mjpeg_server(*args: str) -> ServerProcess:
    """tests/mjpeg_server.py (args: --size WxH, --fps N, --mode silent, --resize-after S ...)."""
    return ServerProcess([sys.executable, str(HERE / "mjpeg_server.py"), *args],
                         "http://127.0.0.1:{port}/stream.mjpg")
