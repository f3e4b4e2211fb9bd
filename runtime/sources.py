"""Frame sources as URIs, and the capture thread that feeds the runtime loop.

Source URIs (what ``edgetl run --source`` accepts):

=========================================  ================================================
``0``, ``1`` …                             camera by index (V4L2 on Linux)
``v4l2:///dev/video0?width=1280&height=720&fps=30&fourcc=MJPG``   a V4L2 device with capture settings
``csi://0?width=1920&height=1080&fps=30&flip=0``   Jetson CSI camera (GStreamer ``nvarguscamerasrc``)
``rtsp://user:pw@host:554/stream``          RTSP, low latency (GStreamer if OpenCV has it, else FFmpeg)
``http://host/stream.mjpg``, ``https://…``  HTTP(S) streams (MJPEG, HLS, …) through FFmpeg
``video.mp4``, ``clip.avi`` …               a video file
``images/``, ``'shots/*.png'``              an image folder (recursive, sorted) or a glob
``gst:videotestsrc ! videoconvert ! appsink``   a raw GStreamer pipeline ending in ``appsink``
=========================================  ================================================

Capture runs on its own thread (decoding overlaps inference). Two policies:

* **latest** (live sources, and files with ``realtime=True``): only the newest frame is kept; a
  frame the loop did not take before the next one arrived is dropped and counted, so inference
  never works on the past. Files are paced at their FPS (``realtime``) to behave like a camera.
* **ordered** (files and image folders by default): every frame, in order, through a small
  bounded queue (decode runs ahead by a few frames, nothing is dropped).

A live source that stops delivering frames is reopened with back-off for ``reconnect_timeout``
seconds, then the run fails with :class:`SourceLostError` (exit code 3). The deadline runs from the
last frame actually received: a camera that opens but sends nothing does not restart it. A live
source that is not up yet when the run starts (a device that boots before its camera) is retried
the same way. The end of a file or image folder ends the run cleanly.

Credentials in a URI (``rtsp://user:password@host/…``) never reach a note, an error or the summary:
``SourceSpec.uri`` is the redacted form (``rtsp://user:***@host/…``); only ``target`` (what OpenCV
opens) holds the secret. A URI put into a GStreamer pipeline is checked against the characters
``gst_parse_launch`` would read as syntax (spaces, quotes, ``!``, …): percent-encode them.

Frame buffers come from a small pool and are reused (``cv2.VideoCapture.read`` decodes into
them), so a 720p stream does not allocate 2.7 MB per frame; the consumer hands each frame back
with :meth:`FrameSource.release`.
"""

from __future__ import annotations

import collections
import functools
import glob
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List
from urllib.parse import parse_qsl, urlsplit

import cv2
import numpy as np

from .errors import EdgetlError, ImageDecodeError
from .imageio import is_image_file, read_image

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv",
                  ".mjpg", ".mjpeg", ".h264", ".h265", ".hevc", ".y4m", ".gif")
URI_FORMS = ("a camera index (0), v4l2:///dev/videoN, csi://N, rtsp://…, http(s)://…, "
             "a video file, an image folder or glob, gst:<pipeline ending in appsink>")
# FFmpeg options for low-latency RTSP when OpenCV has no GStreamer (read by OpenCV at open time).
RTSP_FFMPEG_OPTIONS = "rtsp_transport;tcp|fflags;nobuffer|flags;low_delay"
NETWORK_TIMEOUT_MS = 5000
# A read (or an opening) blocked this long is abandoned and the source reopened: OpenCV's GStreamer
# backend waits for a sample forever when a stream freezes (no read timeout before OpenCV 4.7).
STALL_TIMEOUT_S = NETWORK_TIMEOUT_MS / 1000
MAX_LISTED = 100  # skipped image files named in the summary (all are counted)
CAPTURE_THREAD = "edgetl-capture-"  # the capture threads' name prefix (capture_threads_alive)
Note = Callable[[str], None]


class SourceLostError(EdgetlError):
    """A live source stopped delivering frames and could not be reopened in time."""

    exit_code = 3


def stderr_note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)


# ---- credentials and pipeline syntax ---------------------------------------------------------------

# scheme://user:password@ anywhere in a text (a URI, or a gst: pipeline that holds one)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):[^/\s]*@")  # greedy: to the last @ of the authority
# query parameters that carry secrets (?password=…&token=…)
_SECRET_PARAMS = re.compile(r"(?i)([?&;](?:password|passwd|pwd|pass|token|access_token|api_key|apikey|key|secret|"
                            r"auth|signature|sig)=)[^&;#\s\"']*")


def redact_uri(text: str) -> str:
    """``rtsp://user:secret@host/x?token=abc`` -> ``rtsp://user:***@host/x?token=***``: what may be
    printed, logged or written to the summary."""
    return _SECRET_PARAMS.sub(r"\1***", _USERINFO.sub(r"\1:***@", str(text)))


# Characters a URI may carry into a gst_parse_launch description without being read as syntax:
# RFC 3986's unreserved, reserved and percent signs, less "!" (links elements) and "'" (quotes).
_GST_SAFE = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@$&()*+,;=%]*")


def _gst_uri(uri: str, shown: str) -> str:
    """``uri`` if it can be put into a GStreamer pipeline description as a property value, else an
    EdgetlError naming the first character that would break out of it."""
    bad = next((ch for ch in uri if not _GST_SAFE.fullmatch(ch)), None)
    if bad is not None:
        what = {" ": "a space", "\n": "a newline", "\r": "a carriage return", "\t": "a tab", "!": "'!'",
                '"': "a double quote", "'": "a single quote", "\\": "a backslash"}.get(bad, repr(bad))
        raise EdgetlError(f"source {shown!r}: {what} in the URI would end the GStreamer pipeline's location "
                          "property (gst_parse_launch syntax)",
                          hint=f"percent-encode it (e.g. {bad!r} -> %{ord(bad):02X}, as in "
                               "rtsp://user:p%21ss@host/stream)" if ord(bad) < 128 else
                               "percent-encode non-ASCII characters as UTF-8 bytes (%XX)")
    return uri


def _rtsp_pipeline(uri: str, shown: str | None = None) -> str:
    """The low-latency GStreamer pipeline for an RTSP URI (refuses one that would inject syntax)."""
    location = _gst_uri(uri, shown or redact_uri(uri))
    # tcp-timeout: a server that accepts and then says nothing fails the opening after 5 s (default 20 s)
    return (f"rtspsrc location={location} latency=0 tcp-timeout={NETWORK_TIMEOUT_MS * 1000} ! decodebin ! "
            "videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1 sync=false")


@functools.lru_cache(maxsize=1)
def opencv_has_gstreamer() -> bool:
    """True when this OpenCV build was compiled with the GStreamer video I/O backend."""
    return re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()) is not None


def _need_gstreamer(uri: str, what: str) -> None:
    if not opencv_has_gstreamer():
        raise EdgetlError(
            f"source {uri!r}: {what} needs OpenCV built with GStreamer, and this OpenCV "
            f"({cv2.__version__}) has none (cv2.getBuildInformation(): 'GStreamer: NO')",
            hint="on a Jetson use JetPack's OpenCV (python3-opencv, built with GStreamer) instead of the pip "
                 "wheel: `pip uninstall opencv-python-headless` in this environment, or create it with "
                 "--system-site-packages; elsewhere build OpenCV with -DWITH_GSTREAMER=ON")


# ---- readers: one open device/stream/file, read() -> BGR uint8 or None ---------------------------

class Reader:
    """An opened source. ``read(out)`` returns the next BGR uint8 frame (decoded into ``out`` when it
    fits) or None when there is none (end of file, or a failed live stream)."""

    fps: float | None = None

    def read(self, out: np.ndarray | None) -> np.ndarray | None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class CaptureReader(Reader):
    def __init__(self, cap: cv2.VideoCapture, uri: str):
        self.cap = cap
        fps = cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and np.isfinite(fps) and 0 < fps < 1000 else None
        self.frame_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)

    def read(self, out: np.ndarray | None) -> np.ndarray | None:
        ok, img = self.cap.read(out) if out is not None else self.cap.read()
        if not ok or img is None:
            return None
        if img.ndim == 2 or img.shape[2] != 3:  # gray/BGRA from odd cameras or pipelines
            from .imageio import to_bgr8
            img = to_bgr8(img)
        return img

    def close(self) -> None:
        self.cap.release()


class ImageListReader(Reader):
    """The images of a folder/glob in order; ``current`` is the file the last frame came from.
    Undecodable (or too large) files are skipped, counted, and the first ``MAX_LISTED`` named in
    ``skipped_list``."""

    def __init__(self, paths: List[Path], note: Note):
        self.paths = paths
        self.pos = 0
        self.note = note
        self.skipped = 0
        self.skipped_list: List[Dict[str, str]] = []
        self.current: str | None = None

    def read(self, out: np.ndarray | None) -> np.ndarray | None:
        while self.pos < len(self.paths):
            path = self.paths[self.pos]
            self.pos += 1
            try:
                img = read_image(path)
            except ImageDecodeError as exc:
                self.skipped += 1
                if len(self.skipped_list) < MAX_LISTED:
                    self.skipped_list.append({"file": str(path), "reason": exc.message.replace(f"{path}: ", "")})
                self.note(f"skipped {exc.message}")
                continue
            self.current = str(path)
            return img
        return None


# ---- URI parsing ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceSpec:
    """A parsed source URI. ``open()`` opens it (again, for reconnects) and returns a Reader.

    ``uri`` is what may be shown (credentials redacted, see :func:`redact_uri`); ``target`` is what
    OpenCV opens and may hold them (kept out of the repr)."""

    uri: str
    kind: str  # camera | csi | rtsp | http | gst | file | images
    target: Any = field(repr=False)  # camera index or device path, URL, pipeline, file path, image paths
    params: dict = field(default_factory=dict, repr=False)

    @property
    def live(self) -> bool:
        return self.kind not in ("file", "images")

    def open(self, note: Note = stderr_note, decode_threads: int = 0) -> Reader:
        """``decode_threads``: FFmpeg's decoding threads for files and network streams (0 = FFmpeg's
        choice, one per core: on a small CPU device they then compete with inference)."""
        if self.kind == "images":
            return ImageListReader(list(self.target), note)
        cap = self._capture(decode_threads)
        if not cap.isOpened():
            cap.release()
            raise EdgetlError(f"source {self.uri!r}: OpenCV cannot open it", hint=self._open_hint())
        if self.live and cap.getBackendName() != "GSTREAMER":
            # keep the driver/demuxer queue short (where supported); a GStreamer pipeline has its own
            # (appsink max-buffers=1), and OpenCV's GStreamer backend stops the pipeline on this set()
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return CaptureReader(cap, self.uri)

    def _capture(self, decode_threads: int = 0) -> cv2.VideoCapture:
        p = self.params
        if self.kind == "camera":
            api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
            cap = cv2.VideoCapture(self.target, api)
            if cap.isOpened():
                if "fourcc" in p:
                    cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*str(p["fourcc"])[:4].ljust(4)))
                for key, prop in (("width", cv2.CAP_PROP_FRAME_WIDTH), ("height", cv2.CAP_PROP_FRAME_HEIGHT),
                                  ("fps", cv2.CAP_PROP_FPS)):
                    if key in p:
                        cap.set(prop, float(p[key]))
            return cap
        if self.kind in ("gst", "csi") or (self.kind == "rtsp" and self.target.startswith("rtspsrc ")):
            return cv2.VideoCapture(self.target, cv2.CAP_GSTREAMER)
        # FFmpeg: files, http(s), and rtsp without GStreamer
        # (OpenCV < 4.7, e.g. JetPack's 4.5 and Debian 12's 4.6, has no CAP_PROP_N_THREADS: FFmpeg's default then)
        params: list[int] = []
        if self.kind in ("rtsp", "http"):
            for name in ("CAP_PROP_OPEN_TIMEOUT_MSEC", "CAP_PROP_READ_TIMEOUT_MSEC"):
                if hasattr(cv2, name):
                    params += [getattr(cv2, name), NETWORK_TIMEOUT_MS]
        if self.kind == "rtsp":
            os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", RTSP_FFMPEG_OPTIONS)
        if decode_threads > 0 and hasattr(cv2, "CAP_PROP_N_THREADS"):
            params += [cv2.CAP_PROP_N_THREADS, int(decode_threads)]
        return cv2.VideoCapture(self.target, cv2.CAP_FFMPEG, params)

    def _open_hint(self) -> str:
        if self.kind == "camera":
            return ("check the camera is connected and not in use by another program (`v4l2-ctl --list-devices`), "
                    "and that this user may open it (group 'video')")
        if self.kind in ("rtsp", "http"):
            return "check the URL, credentials and network (try it with `ffplay URL`)"
        if self.kind in ("gst", "csi"):
            return "test the pipeline with `gst-launch-1.0` (replace appsink with fakesink); it must end in appsink"
        return "check the file is a complete video that FFmpeg can decode (`ffprobe FILE`)"


def _query(uri: str) -> tuple[Any, dict]:
    parts = urlsplit(uri)
    return parts, dict(parse_qsl(parts.query, keep_blank_values=True))


# capture settings a URI may carry: key -> (type, lowest, highest, example)
CSI_PARAMS = {"width": (int, 16, 16384, "1920"), "height": (int, 16, 16384, "1080"), "fps": (int, 1, 1000, "30"),
              "flip": (int, 0, 7, "0")}
V4L2_PARAMS = {"width": (float, 1, 16384, "1280"), "height": (float, 1, 16384, "720"), "fps": (float, 0.1, 1000, "30"),
               "fourcc": (str, 1, 4, "MJPG")}


def _check_settings(shown: str, q: Dict[str, str], allowed: Dict[str, Any], example: str) -> Dict[str, str]:
    """The query parameters of a camera URI, checked (returned as given); a one-line error names the key."""
    unknown = sorted(set(q) - set(allowed))
    if unknown:
        raise EdgetlError(f"source {shown!r}: unknown setting {unknown[0]!r}",
                          hint=f"known settings: {', '.join(allowed)} (e.g. {example})")
    for key, text in q.items():
        tp, lo, hi, ex = allowed[key]
        if tp is str:
            if not (lo <= len(text) <= hi and text.isascii() and text.replace(" ", "").isalnum()):
                raise EdgetlError(f"source {shown!r}: {key}={text!r} is not a code of {lo} to {hi} letters/digits",
                                  hint=f"e.g. {key}={ex}")
            continue
        try:
            value = tp(text)
            if tp is float and not np.isfinite(value):
                raise ValueError(text)
        except ValueError:
            kind = "a whole number" if tp is int else "a number"
            raise EdgetlError(f"source {shown!r}: {key}={text!r} is not {kind}", hint=f"e.g. {key}={ex}") from None
        if not lo <= value <= hi:
            raise EdgetlError(f"source {shown!r}: {key}={text} is out of range", hint=f"give {lo:g}..{hi:g}, e.g. {key}={ex}")
    return q


def _csi_pipeline(sensor: int, p: dict) -> str:
    w, h, fps, flip = int(p.get("width", 1280)), int(p.get("height", 720)), int(p.get("fps", 30)), int(p.get("flip", 0))
    return (f"nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM),width={w},height={h},"
            f"framerate={fps}/1 ! nvvidconv flip-method={flip} ! video/x-raw,format=BGRx ! videoconvert ! "
            f"video/x-raw,format=BGR ! appsink drop=1 max-buffers=1 sync=false")


def _image_list(uri: str, paths: list[Path]) -> SourceSpec:
    paths = sorted(p for p in paths if p.is_file() and is_image_file(p))
    if not paths:
        raise EdgetlError(f"source {uri!r}: no image files found",
                          hint="give a folder or glob with .jpg/.png/.bmp/.tif/.webp images, or a video file")
    return SourceSpec(uri, "images", tuple(paths))


def parse_source(uri: str | int) -> SourceSpec:
    """Resolve a source URI (see the module doc) or raise an EdgetlError that lists the forms."""
    uri = str(uri).strip()
    if not uri:
        raise EdgetlError("empty --source", hint=f"give {URI_FORMS}")
    if uri.isdigit():
        return SourceSpec(uri, "camera", int(uri))
    low = uri.lower()
    shown = redact_uri(uri)  # the only form that goes into messages and the summary
    if low.startswith("gst:"):
        pipeline = uri[4:].strip()
        _need_gstreamer(shown, "a gst: pipeline")
        if "appsink" not in pipeline:
            raise EdgetlError(f"source {shown!r}: a gst: pipeline must end in appsink",
                              hint="e.g. gst:v4l2src ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1")
        return SourceSpec(shown, "gst", pipeline)
    if low.startswith("v4l2://"):
        parts, q = _query(uri)
        device = parts.path or parts.netloc
        if not device:
            raise EdgetlError(f"source {shown!r}: no device path", hint="e.g. v4l2:///dev/video0")
        _check_settings(shown, q, V4L2_PARAMS, "v4l2:///dev/video0?width=1280&height=720&fps=30&fourcc=MJPG")
        target: Any = int(device) if device.isdigit() else device
        return SourceSpec(shown, "camera", target, q)
    if low.startswith("csi://"):
        parts, q = _query(uri)
        sensor = parts.netloc or "0"
        if not sensor.isdigit():
            raise EdgetlError(f"source {shown!r}: the CSI sensor id must be a number", hint="e.g. csi://0")
        _check_settings(shown, q, CSI_PARAMS, "csi://0?width=1920&height=1080&fps=30&flip=0")
        _need_gstreamer(shown, "a Jetson CSI camera (nvarguscamerasrc)")
        return SourceSpec(shown, "csi", _csi_pipeline(int(sensor), q), q)
    if low.startswith(("rtsp://", "rtsps://")):
        if opencv_has_gstreamer():
            return SourceSpec(shown, "rtsp", _rtsp_pipeline(uri, shown))
        return SourceSpec(shown, "rtsp", uri)
    if low.startswith(("http://", "https://")):
        return SourceSpec(shown, "http", uri)
    if re.match(r"^[a-z][a-z0-9+.-]*://", low):
        raise EdgetlError(f"source {shown!r}: unknown scheme", hint=f"use {URI_FORMS}")
    path = Path(uri).expanduser()
    if path.is_dir():
        return _image_list(uri, list(path.rglob("*")))
    if any(ch in uri for ch in "*?[") and not path.exists():
        return _image_list(uri, [Path(p) for p in glob.glob(str(path), recursive=True)])
    if path.is_file():
        if is_image_file(path):
            return _image_list(uri, [path])
        return SourceSpec(uri, "file", str(path))
    raise EdgetlError(f"source {shown!r}: no such file or folder, and not a camera index or URI",
                      hint=f"give {URI_FORMS}")


# ---- the capture thread ---------------------------------------------------------------------------

@dataclass
class Frame:
    """One captured frame. ``index`` counts every frame the source delivered (dropped ones too), so
    gaps in the indices of results are the dropped frames. ``t_capture`` (``time.perf_counter``) is
    when the decoded frame became available; latency is measured from it."""

    index: int
    image: np.ndarray
    t_capture: float
    tensor: np.ndarray | None = None  # the model input, when the capture thread prepared it
    prep_ms: float = 0.0
    name: str | None = None  # the image file it came from (image-folder sources)


class FrameSource:
    """Reads a source on a background thread; ``get()`` hands frames to the inference loop.

    ``realtime=None`` picks the policy from the source: latest-frame for live sources, every frame
    in order for files/image folders; ``realtime=True`` paces files at ``fps`` (the file's own by
    default; 30 for image folders) with the latest-frame policy.

    ``prepare`` (image -> model input) runs on the capture thread in every-frame mode, so decoding
    and preprocessing of the next frames overlap inference of the current one. In latest-frame mode
    the loop preprocesses only the frames it takes (no work is spent on frames that get dropped).
    ``decode_threads`` caps FFmpeg's decoding threads (0 = FFmpeg's default, one per core).
    ``ready`` (an Event shared by several sources) is set whenever a frame is published or the
    source ends, so one loop can wait for whichever source has a frame.

    A watchdog (run by :meth:`get`) abandons a capture thread that is blocked in a read or an
    opening for ``stall_timeout`` seconds (OpenCV's GStreamer backend waits for a sample forever when
    a stream freezes): a new thread reopens the source, within the same reconnect deadline.
    """

    def __init__(self, source: str | int | SourceSpec, *, realtime: bool | None = None, fps: float | None = None,
                 reconnect_timeout: float = 10.0, queue_size: int = 4, note: Note = stderr_note,
                 prepare: Callable[[np.ndarray], np.ndarray] | None = None, decode_threads: int = 0,
                 ready: threading.Event | None = None):
        self.spec = source if isinstance(source, SourceSpec) else parse_source(source)
        self.decode_threads = max(0, int(decode_threads))
        self.latest = self.spec.live or bool(realtime)
        self.pace = self.latest and not self.spec.live
        self.prepare = None if self.latest else prepare
        self.reconnect_timeout = float(reconnect_timeout)
        self.stall_timeout = STALL_TIMEOUT_S
        self._fps_override = fps
        self._maxlen = 1 if self.latest else max(1, int(queue_size))
        self._note = note
        self._ready = ready
        self._queue: collections.deque[Frame] = collections.deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._free: list[np.ndarray] = []
        self._thread: threading.Thread | None = None
        self._reader: Reader | None = None
        self._ended = False
        self.error: EdgetlError | None = None
        self.frames_read = 0
        self.dropped = 0
        self.reconnects = 0
        self.stalls = 0  # blocked reads/openings abandoned by the watchdog
        self.end_reason = ""
        self.unusable = 0  # image files skipped because the model input could not be made (e.g. the ROI)
        self._unusable_list: List[Dict[str, str]] = []
        self._lost_since: float | None = None  # monotonic time since which no frame came (None: frames flow)
        self._opened = False  # the source was opened at least once
        self._last_error: EdgetlError | None = None  # why the last opening failed
        self._backoff = 0.1  # seconds before the next reopening
        self._loss_noted = False  # the current loss was announced
        self._gen = 0  # the capture thread's generation; an abandoned (blocked) thread has an older one
        self._busy_since: float | None = None  # monotonic time the current thread entered a read/opening
        self.last_frame_at: float | None = None  # monotonic time of the last frame received
        self.shape: tuple | None = None  # (height, width) of the last frame

    # -- lifecycle
    def start(self) -> "FrameSource":
        """Start capturing. A file or image folder is opened here (errors surface in the caller's
        thread). A live source is opened on the capture thread, under the watchdog (a GStreamer
        opening can block): one that does not open yet (a camera or stream not up when the device
        boots) is retried for ``reconnect_timeout`` seconds, like a lost one, and then fails with
        :class:`SourceLostError` from :meth:`get`."""
        if self._thread is None:
            if self.spec.live and self.reconnect_timeout > 0:
                self._lost_since = time.monotonic()  # a source that does not open is waited for from here
                self._spawn(None)
                return self
            self._reader = self.spec.open(self._note, self.decode_threads)
            self._opened = True
            self._spawn(self._reader)
        return self

    def _spawn(self, reader: Reader | None) -> None:
        self._thread = threading.Thread(target=self._capture, args=(reader, self._gen),
                                        name=f"{CAPTURE_THREAD}{self._gen}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the capture thread; one blocked in a native read or opening is left behind (see
        :func:`capture_threads_alive`)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            since = self._busy_since
        if self._thread is not None:  # a thread blocked in a read (a frozen GStreamer stream) is left behind
            blocked = since is not None and time.monotonic() - since > 1.0
            self._thread.join(timeout=1.0 if blocked else 10)
        elif self._reader is not None:
            self._reader.close()

    def __enter__(self) -> "FrameSource":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def fps(self) -> float | None:
        """The rate the source delivers at: the override, else what the file/camera reports."""
        if self._fps_override:
            return float(self._fps_override)
        reported = self._reader.fps if self._reader is not None else None
        return reported or (30.0 if self.spec.kind == "images" else None)

    @property
    def skipped(self) -> int:
        """Image files that could not be decoded (image-folder sources)."""
        return getattr(self._reader, "skipped", 0)

    @property
    def skipped_list(self) -> List[Dict[str, str]]:
        """The first ``MAX_LISTED`` skipped image files: ``{"file", "reason"}`` (undecodable or unusable)."""
        return (list(getattr(self._reader, "skipped_list", [])) + self._unusable_list)[:MAX_LISTED]

    def skip_image(self, frame: Frame, reason: str) -> None:
        """An image of a folder the model cannot take (e.g. smaller than the ROI): count it, name it, go on."""
        self.unusable += 1
        if len(self._unusable_list) < MAX_LISTED:
            self._unusable_list.append({"file": str(frame.name), "reason": reason})
        self._note(f"skipped {frame.name}: {reason}")
        self.release(frame)

    def state(self) -> str:
        """``starting`` (no frame yet), ``delivering``, ``stalled`` (no frame for 2 s, not yet given up),
        ``reconnecting``, ``lost`` (given up: SourceLostError) or ``ended`` (end of file, stopped)."""
        if self.error is not None:
            return "lost"
        if self.done or (self._ended and not self.spec.live):
            return "ended"
        if self._lost_since is not None:
            return "reconnecting" if self._opened or self.frames_read else "starting"
        if self.last_frame_at is None:
            return "starting"
        interval = 1.0 / self.fps if self.fps else 0.0
        return "delivering" if time.monotonic() - self.last_frame_at < max(2.0, 3 * interval) else "stalled"

    # -- consumer side
    def get(self, timeout: float | None = None) -> Frame | None:
        """The next frame; None on timeout or at the end (see :attr:`done`). Raises the source's
        error (e.g. :class:`SourceLostError`) once every frame before it has been handed out."""
        self._watch()
        with self._cond:
            if not self._queue and not self._ended:
                self._cond.wait(timeout)
            if self._queue:
                frame = self._queue.popleft()
                self._cond.notify_all()
                return frame
            if self._ended and self.error is not None:
                raise self.error
            return None

    @property
    def done(self) -> bool:
        with self._cond:
            return self._ended and not self._queue

    def release(self, frame: Frame) -> None:
        """Give a frame's buffer back for reuse (the caller must not use ``frame.image`` after)."""
        if len(self._free) < 4:
            self._free.append(frame.image)

    def _watch(self) -> None:
        """The watchdog: a live source's capture thread blocked in a read or an opening for
        ``stall_timeout`` (at most the reconnect timeout) is abandoned, and a new one reopens the
        source; past the reconnect deadline the source is lost."""
        since = self._busy_since
        if since is None or not self.spec.live:
            return
        limit = min(self.stall_timeout, max(self.reconnect_timeout, 0.5))
        with self._cond:
            now = time.monotonic()
            if self._busy_since is None or self._ended or self._stop.is_set() or now - self._busy_since < limit:
                return
            blocked = now - self._busy_since
            self._gen += 1  # the blocked thread closes its reader and leaves, if its call ever returns
            self._busy_since, self._reader = None, None
            self.stalls += 1
            if self._lost_since is None:
                self._lost_since = self.last_frame_at if self.last_frame_at is not None else since
            if now - self._lost_since >= self.reconnect_timeout:
                after = f"after {self.frames_read} frames, " if self.frames_read else ""
                self.error = SourceLostError(
                    f"source {self.spec.uri!r} sent no frame for {self.reconnect_timeout:g} s ({after}a read or an "
                    f"opening blocked for {blocked:.1f} s, reopened {self.reconnects} times)",
                    hint="check the camera/stream and its network; pass a longer --reconnect-timeout to wait longer")
                self.end_reason = "source lost"
                self._ended = True
                self._thread = None  # left blocked (a daemon thread): close() does not wait for it
                self._signal()
                return
        self._loss_noted = True
        self._note(f"source {self.spec.uri!r}: a read or an opening blocked for {blocked:.1f} s without a frame; "
                   "reopening it")
        self._spawn(None)

    # -- producer side (capture thread)
    def _signal(self) -> None:
        """Under ``self._cond``: wake the consumer (and a loop waiting on several sources)."""
        self._cond.notify_all()
        if self._ready is not None:
            self._ready.set()

    def _enter(self, gen: int) -> None:
        with self._cond:
            if gen == self._gen:
                self._busy_since = time.monotonic()

    def _leave(self, gen: int) -> bool:
        """The read/opening returned: False when the watchdog abandoned this thread meanwhile."""
        with self._cond:
            if gen != self._gen:
                return False
            self._busy_since = None
            return True

    def _publish(self, frame: Frame) -> None:
        with self._cond:
            if self.latest:
                while self._queue:  # the loop has not taken it: it is stale now
                    old = self._queue.popleft()
                    self.dropped += 1
                    self.release(old)
            else:
                while len(self._queue) >= self._maxlen and not self._stop.is_set():
                    self._cond.wait(0.1)
            self._queue.append(frame)
            self._signal()

    def _capture(self, reader: Reader | None, gen: int) -> None:
        interval = 1.0 / self.fps if self.pace and self.fps else 0.0
        t0 = 0.0
        try:
            if reader is None:  # a live source that did not open at start (or a blocked one): retry
                reader = self._reconnect(gen)
            while reader is not None and not self._stop.is_set():
                if interval:  # like a camera: the frame "arrives" on its due time, then is decoded
                    if self.frames_read == 0:
                        t0 = time.perf_counter()
                    delay = t0 + self.frames_read * interval - time.perf_counter()
                    if delay > 0 and self._stop.wait(delay):
                        break
                buf = self._free.pop() if self._free else None
                self._enter(gen)
                img = reader.read(buf)
                if not self._leave(gen):
                    break  # abandoned by the watchdog while blocked: a newer thread owns the source
                if img is None:
                    if not self.spec.live:
                        self.end_reason = "end of source"
                        break
                    reader.close()
                    reader = self._reader = None
                    reader = self._reconnect(gen)
                    continue
                self._frame_in(img, reader)
        except EdgetlError as exc:  # e.g. an ROI outside the frame, found while preparing it
            if gen == self._gen:
                self.error = exc
        except Exception as exc:  # a bug or a backend crash: end the run with it rather than hang
            if gen == self._gen:
                self.error = EdgetlError(f"source {self.spec.uri!r}: capture failed ({type(exc).__name__}: "
                                         f"{redact_uri(str(exc))})")
        finally:
            if reader is not None:
                reader.close()
            with self._cond:
                if gen == self._gen:
                    if self._stop.is_set() and not self.end_reason:
                        self.end_reason = "stopped"
                    self._ended = True
                    self._signal()

    def _frame_in(self, img: np.ndarray, reader: Reader) -> None:
        """A frame came: restart the loss deadline, prepare it (every-frame mode) and publish it."""
        self._lost_since, self._backoff, self._loss_noted = None, 0.1, False  # the next loss: a new deadline
        self.last_frame_at = time.monotonic()
        self.shape = img.shape[:2]
        frame = Frame(self.frames_read, img, time.perf_counter(), name=getattr(reader, "current", None))
        if self.prepare is not None:
            try:
                frame.tensor = self.prepare(img)
            except EdgetlError as exc:
                if frame.name is None:  # a camera/video: every frame would fail alike
                    raise
                self.skip_image(frame, exc.message)
                return
            frame.prep_ms = (time.perf_counter() - frame.t_capture) * 1e3
        self.frames_read += 1
        self._publish(frame)

    def _reconnect(self, gen: int) -> Reader | None:
        """Reopen a lost (or not yet up) live source with back-off; None (and ``self.error`` set) once
        ``reconnect_timeout`` seconds passed since the last frame received (or since the start, when
        none came): reopening a source that then sends nothing does not restart the deadline."""
        uri, limit = self.spec.uri, self.reconnect_timeout
        if self._lost_since is None:
            self._lost_since = time.monotonic()
        if self._opened and not self._loss_noted:  # one note per loss, not one per reopening
            self._loss_noted = True
            self._note(f"source {uri!r}: no frame after {self.frames_read} frames; reconnecting for up to {limit:g} s")
        deadline = self._lost_since + limit
        attempts = 0
        last = self._last_error.message if self._last_error is not None else ""
        first = not self._opened and self._last_error is None  # the first opening: no back-off before it
        while not self._stop.is_set() and gen == self._gen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not (first and attempts == 0):
                if self._stop.wait(min(self._backoff, remaining)):
                    return None
                self._backoff = min(self._backoff * 2, 2.0)  # kept across reopenings until a frame comes
            attempts += 1
            self._enter(gen)
            try:
                reader = self.spec.open(self._note, self.decode_threads)
            except EdgetlError as exc:
                last = exc.message
                if not self._leave(gen):
                    return None
                if first and attempts == 1:
                    self._last_error = exc
                    self._note(f"source {uri!r} does not open yet ({exc.message}); retrying for up to {limit:g} s")
                continue
            if not self._leave(gen):  # abandoned while the opening blocked
                reader.close()
                return None
            if self._opened:
                self.reconnects += 1
                self._note(f"source {uri!r}: reconnected (attempt {attempts})")
            elif attempts > 1:
                self._note(f"source {uri!r}: opened (attempt {attempts})")
            self._opened = True
            self._last_error = None
            self._reader = reader
            return reader
        if self._stop.is_set() or gen != self._gen:
            return None
        self.end_reason = "source lost"
        self.error = self._lost_error(attempts, last)
        return None

    def _lost_error(self, attempts: int, last: str) -> SourceLostError:
        uri, limit = self.spec.uri, self.reconnect_timeout
        hint = "check the camera/stream and its network; pass a longer --reconnect-timeout to wait longer"
        if not self._opened:
            return SourceLostError(
                f"source {uri!r} did not open in {limit:g} s ({attempts} attempts{': ' + last if last else ''})",
                hint=f"{self.spec._open_hint()}; or pass a longer --reconnect-timeout to wait longer")
        if not last:  # it opens, then nothing comes (a camera that is there but sends no frame)
            after = f"after {self.frames_read} frames, " if self.frames_read else ""
            return SourceLostError(
                f"source {uri!r} opens but sent no frame for {limit:g} s ({after}reopened {self.reconnects} times)",
                hint=hint)
        return SourceLostError(
            f"source {uri!r} stopped delivering frames after {self.frames_read} frames and could not be reopened "
            f"in {limit:g} s ({attempts} attempts{': ' + last if last else ''})", hint=hint)


def capture_threads_alive() -> bool:
    """Whether a capture thread is still alive: one left blocked in a native call (OpenCV's FFmpeg or
    GStreamer opening or read, abandoned by the watchdog or by ``close``). If that call returns while
    the interpreter shuts down, the C++ side can abort the process ("terminate called without an
    active exception", SIGABRT) in place of the exit code: the CLI then leaves with ``os._exit``."""
    return any(t.name.startswith(CAPTURE_THREAD) and t.is_alive() for t in threading.enumerate())
