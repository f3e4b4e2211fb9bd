"""The runtime loop: frames in, labels out, with timings, smoothing, overlay, JSON, video and signals.

:class:`Stream` is the library iterator (``model.stream(source)``): it starts the capture thread
(``edgetl.runtime.sources``), and per frame runs preprocess -> inference -> softmax / smoothing /
top-k / threshold, yielding a :class:`Result` with per-stage timings. :func:`run_app` is
``edgetl run``: a window or JSON lines, events, the annotated video, SIGINT/SIGTERM, the summary.

Timings (milliseconds, ``time.perf_counter``):

* ``wait``: the loop waiting for a frame (near 0 when the source is faster than inference)
* ``preprocess`` (in every-frame mode it runs on the capture thread, overlapping inference),
  ``infer``, ``post`` (softmax, smoothing, top-k)
* ``latency``: from the frame's capture timestamp (the decoded frame became available) to the result
* FPS: results / seconds since the loop started (source opening and model loading excluded)

Statistics use constant memory however long the run: counts, sums and maxima are exact; the p50/p90
percentiles come from a uniform random sample of at most ``STATS_SAMPLE`` frames (a reservoir,
exact while fewer frames came), so a day at 30 FPS keeps a few hundred KB, not gigabytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np

from .errors import EdgetlError
from .heads import UNKNOWN, head_for  # noqa: F401 (UNKNOWN: re-exported, the label below --threshold)
from .model import Model, Roi, parse_roi
from .sources import FrameSource, Note, SourceLostError, stderr_note

STAGES = ("wait", "preprocess", "infer", "post")
STATS_SAMPLE = 8192  # frames kept for the percentiles (reservoir)


class FrameStats:
    """Per-frame timings (latency and the stages) in constant memory: exact count, mean and max, and
    p50/p90 over a uniform random sample (Algorithm R) of at most ``size`` frames, exact below it."""

    COLUMNS = ("latency",) + STAGES

    def __init__(self, size: int = STATS_SAMPLE, seed: int = 0):
        self.n = 0
        self.sample = np.zeros((int(size), len(self.COLUMNS)), np.float64)
        self.total = np.zeros(len(self.COLUMNS), np.float64)
        self.peak = np.zeros(len(self.COLUMNS), np.float64)
        self._rng = random.Random(seed)

    def add(self, latency: float, timings: Dict[str, float]) -> None:
        row = (latency,) + tuple(timings[s] for s in STAGES)
        n, size = self.n, len(self.sample)
        j = n if n < size else self._rng.randrange(n + 1)
        if j < size:
            self.sample[j] = row
        self.total += row
        np.maximum(self.peak, row, out=self.peak)
        self.n = n + 1

    def column(self, name: str) -> Dict[str, float]:
        if not self.n:
            return {"p50": 0.0, "p90": 0.0, "mean": 0.0, "max": 0.0}
        k = self.COLUMNS.index(name)
        a = self.sample[:min(self.n, len(self.sample)), k]
        return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
                "mean": round(float(self.total[k] / self.n), 3), "max": round(float(self.peak[k]), 3)}


@dataclass(frozen=True)
class StreamOptions:
    """How frames become results. ``smooth`` is an EMA span in frames over the class probabilities
    (``alpha = 2 / (smooth + 1)``; 0 or 1 = off); below ``threshold`` the label is ``unknown``.
    ``decode_threads``: FFmpeg decoding threads for files and network streams; None = 1 when the
    model runs on the CPU (decoding then stays on one core instead of spreading over the cores
    inference uses), else FFmpeg's default (one per core)."""

    top_k: int = 1
    roi: Roi | str | None = None
    smooth: float = 0.0
    threshold: float = 0.0
    realtime: bool | None = None
    fps: float | None = None
    reconnect_timeout: float = 10.0
    queue_size: int = 4
    max_frames: int | None = None
    duration: float | None = None
    decode_threads: int | None = None
    track: bool = False  # detection: follow objects across frames (ids, entries, exits)
    count_line: str | Tuple[int, int, int, int] | None = None  # detection: count tracks crossing x1,y1,x2,y2
    count_confidence: float = 0.5  # detection: the mean box score a track needs to be counted (track.LineCounter)

    def __post_init__(self) -> None:
        object.__setattr__(self, "roi", parse_roi(self.roi))
        if isinstance(self.count_line, str):  # checked before the artifact loads
            from .track import parse_line
            object.__setattr__(self, "count_line", parse_line(self.count_line))
        if int(self.top_k) < 1:
            raise EdgetlError(f"--top-k {self.top_k} is not valid", hint="give 1 or more")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise EdgetlError(f"--threshold {self.threshold} is not valid", hint="give a probability in [0, 1]")
        from .track import check_count_confidence
        check_count_confidence(self.count_confidence)  # checked before the artifact loads, like --count-line
        if float(self.smooth) < 0:
            raise EdgetlError(f"--smooth {self.smooth} is not valid", hint="give a span in frames (0 = off)")
        if self.reconnect_timeout < 0:
            raise EdgetlError("--reconnect-timeout must be >= 0 seconds")
        if self.decode_threads is not None and int(self.decode_threads) < 0:
            raise EdgetlError(f"--decode-threads {self.decode_threads} is not valid",
                              hint="give 1 or more, or 0 for FFmpeg's default (one per core)")


@dataclass
class Result:
    """One frame's result. ``image`` is the captured frame (a pooled buffer): valid until the
    iteration moves on, copy it to keep it."""

    frame_index: int
    image: np.ndarray
    label: str
    score: float
    top_k: list[tuple[str, float]]
    probs: np.ndarray
    timings_ms: dict[str, float]
    latency_ms: float
    dropped: int
    time: float  # wall clock (time.time()) when the result was ready
    file: Optional[str] = None  # the image file of the frame (image-folder sources)
    # detection (edgetl.runtime.heads.DetectHead): boxes in frame pixels, per-class counts, tracks, events
    detections: Any = None
    counts: Optional[Dict[str, int]] = None
    tracks: Optional[List[Any]] = None
    events: List[Dict[str, Any]] = field(default_factory=list)
    source: Optional[str] = None  # several sources: the source's name
    batch: Optional[int] = None  # several sources: how many frames were inferred together


_RESULT_EXTRA = ("detections", "counts", "tracks", "events")


class Stream:
    """Iterate :class:`Result` over a source; ``summary()`` afterwards (or at any time)."""

    def __init__(self, model: Model, source: Any, options: StreamOptions | None = None,
                 stop: threading.Event | None = None, note: Note = stderr_note):
        self.model = model
        self.options = options or StreamOptions()
        self.stop = stop or threading.Event()
        o = self.options
        roi = o.roi
        decode_threads = o.decode_threads if o.decode_threads is not None else (1 if model.runner.uses_cpu else 0)
        self.source = FrameSource(source, realtime=o.realtime, fps=o.fps, reconnect_timeout=o.reconnect_timeout,
                                  queue_size=o.queue_size, note=note, decode_threads=decode_threads,
                                  prepare=lambda img: model.input_tensor(img, roi))
        self.head = head_for(model, self.options)  # the task's post-processing, drawing and JSON
        self.stop_reason = ""
        self.frames = 0
        self._t_start = self._t_last = 0.0
        self.stats = FrameStats()

    def __iter__(self) -> Iterator[Result]:
        o, model, src, stop, head = self.options, self.model, self.source, self.stop, self.head
        roi = o.roi
        clock = time.perf_counter
        src.start()
        self._t_start = self._t_last = clock()
        deadline = self._t_start + o.duration if o.duration else None
        stats = self.stats
        try:
            while True:
                if stop.is_set():
                    self.stop_reason = self.stop_reason or "stopped"
                    break
                if o.max_frames is not None and self.frames >= o.max_frames:
                    self.stop_reason = "max frames"
                    break
                t0 = clock()
                if deadline is not None and t0 >= deadline:
                    self.stop_reason = "duration"
                    break
                frame = src.get(0.1)
                if frame is None:
                    if src.done:
                        self.stop_reason = src.end_reason or "end of source"
                        break
                    continue  # re-check stop / deadline
                t1 = clock()
                if frame.tensor is None:
                    try:
                        x = model.input_tensor(frame.image, roi)
                    except EdgetlError as exc:
                        if frame.name is None:  # a camera/video: every frame would fail alike
                            raise
                        src.skip_image(frame, exc.message)  # an image the ROI does not fit: next one
                        continue
                    t2 = clock()
                    prep = (t2 - t1) * 1e3
                else:  # prepared on the capture thread, overlapping the previous inference
                    x, t2, prep = frame.tensor, t1, frame.prep_ms
                outputs = model.outputs(x)
                t3 = clock()
                fields = head.step(outputs, frame)
                t4 = clock()
                timings = {"wait": (t1 - t0) * 1e3, "preprocess": prep, "infer": (t3 - t2) * 1e3,
                           "post": (t4 - t3) * 1e3}
                latency = (t4 - frame.t_capture) * 1e3
                stats.add(latency, timings)
                self.frames += 1
                self._t_last = t4
                yield Result(frame.index, frame.image, fields.pop("label"), fields.pop("score"), fields.pop("top_k"),
                             fields.pop("probs"), timings, latency, src.dropped, time.time(), frame.name,
                             **{k: v for k, v in fields.items() if k in _RESULT_EXTRA})
                src.release(frame)
        finally:
            if self.frames == 0:
                self._t_last = clock()
            src.close()

    def head_of(self, r: Result) -> Any:
        return self.head

    def summary(self) -> dict[str, Any]:
        src = self.source
        elapsed = max(self._t_last - self._t_start, 1e-9)
        return {
            "source": src.spec.uri, "source_kind": src.spec.kind,  # spec.uri: credentials redacted
            "policy": "latest-frame" if src.latest else "every-frame", "decode_threads": src.decode_threads,
            "frames": self.frames, "frames_read": src.frames_read, "dropped": src.dropped,
            "reconnects": src.reconnects, "skipped_files": src.skipped, "skipped_unusable": src.unusable,
            "skipped": src.skipped_list,
            "elapsed_s": round(elapsed, 3), "fps": round(self.frames / elapsed, 2) if self.frames else 0.0,
            "latency_ms": self.stats.column("latency"), "stages_ms": {s: self.stats.column(s) for s in STAGES},
            "stop_reason": self.stop_reason or src.end_reason, "model": self.model.info,
            "task": self.model.manifest.task, **self.head.summary(),
        }


# ---- edgetl run: outputs around the stream ------------------------------------------------------------

@dataclass(frozen=True)
class AppOptions:
    headless: bool = False
    events: bool = False
    save: Path | None = None
    summary_json: Path | None = None
    window: str = "edgetl"
    serve: str | None = None  # HOST:PORT: the annotated stream(s) as MJPEG, a status page, /health
    mqtt: str | None = None  # mqtt://HOST[:PORT]: publish the JSON lines there (edgetl.runtime.mqtt)
    mqtt_topic: str | None = None
    mqtt_qos: int = 0
    # called with each Result before the outputs (its image is the decoded frame, not yet drawn on;
    # valid during the call): embedding and measurements, e.g. benchmarks/rtsp_latency.py
    on_result: Optional[Callable[[Result], None]] = None


def display_available() -> tuple[bool, str]:
    """Whether cv2.imshow can open a window here, and why not."""
    if re.search(r"GUI:\s*NONE", cv2.getBuildInformation()):
        return False, (f"this OpenCV ({cv2.__version__}) is built without GUI support (e.g. "
                       "opencv-python-headless): install opencv-python for a window")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display here ($DISPLAY is not set)"
    return True, ""


FOURCC = {".mp4": "mp4v", ".mov": "mp4v", ".m4v": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


def partial_path(path: Path) -> Path:
    """Where ``--save out.mp4`` writes until the run ends: ``out.partial.mp4`` beside it (visible, so a
    killed run's leftover is seen; the real suffix, so OpenCV picks the same container)."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def _writable_file(path: Path, option: str) -> None:
    """Refuse, before anything runs, an output file whose folder cannot be made or written."""
    if path.is_dir():
        raise EdgetlError(f"{option} {path}: is a folder", hint="give a file name inside it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgetlError(f"{option} {path}: cannot create the folder {path.parent} ({exc.strerror or exc})",
                          hint="give a path in a folder you can write to") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise EdgetlError(f"{option} {path}: the folder {path.parent} is not writable by this user",
                          hint="give a path in a folder you can write to") from None


class VideoSaver:
    """Writes annotated frames to ``out.partial.mp4`` (:func:`partial_path`) and renames it to the
    requested name on close, so a video under that name is always finalised (playable). A run killed
    outright (SIGKILL, power loss) leaves the visible partial file; the next run with the same
    ``--save`` removes it. The folder, permissions and container are checked here, before any frame
    is processed: an unusable path is a one-line error."""

    def __init__(self, path: Path, fps: float | None = None, note: Note = stderr_note):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in FOURCC:
            raise EdgetlError(f"--save {path}: unsupported video type {suffix or '(none)'}",
                              hint=f"use one of {', '.join(sorted(FOURCC))}")
        _writable_file(self.path, "--save")
        self.tmp = partial_path(self.path)
        legacy = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")  # the hidden name of earlier versions
        for stale in (self.tmp, legacy):
            if stale.is_symlink() or stale.is_file():
                try:
                    stale.unlink()
                except OSError as exc:
                    raise EdgetlError(f"--save {path}: cannot remove the partial video {stale} of an interrupted "
                                      f"run ({exc.strerror or exc})", hint="remove it, or save elsewhere") from None
                note(f"removed {stale}: the partial video of an interrupted run")
        self.fourcc = cv2.VideoWriter_fourcc(*FOURCC[suffix])
        self._probe()
        self.fps = fps  # None: set from the source once it is open (else 30)
        self.size: tuple[int, int] | None = None
        self.writer: cv2.VideoWriter | None = None
        self.frames = 0

    def _probe(self) -> None:
        """Open a writer on the partial file once (then remove it): the container and the folder work."""
        probe = cv2.VideoWriter(str(self.tmp), self.fourcc, 30.0, (64, 64))
        ok = probe.isOpened()
        probe.release()
        with contextlib.suppress(OSError):
            self.tmp.unlink()
        if not ok:
            raise EdgetlError(f"--save {self.path}: OpenCV cannot write a {self.path.suffix} video here",
                              hint="try another container (.avi writes MJPG, .mp4 writes mp4v), or another folder")

    def write(self, img: np.ndarray) -> None:
        if self.writer is None:
            self.size = (img.shape[1], img.shape[0])
            self.fps = self.fps or 30.0
            writer = cv2.VideoWriter(str(self.tmp), self.fourcc, self.fps, self.size)
            if not writer.isOpened():
                writer.release()
                with contextlib.suppress(OSError):
                    self.tmp.unlink()
                raise EdgetlError(f"--save {self.path}: OpenCV cannot write a {self.size[0]}x{self.size[1]} "
                                  f"{self.path.suffix} video here",
                                  hint="try another container (.avi writes MJPG, .mp4 writes mp4v)")
            self.writer = writer
        if (img.shape[1], img.shape[0]) != self.size:  # image folders with mixed sizes
            img = cv2.resize(img, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(img)
        self.frames += 1

    def close(self) -> None:
        """Finalise the video and give it its name (nothing to do when no frame was written)."""
        if self.writer is None:
            return
        self.writer.release()
        self.writer = None
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise EdgetlError(f"--save {self.path}: cannot rename the finished video {self.tmp} to it "
                              f"({exc.strerror or exc})", hint=f"the {self.frames} frames are in {self.tmp}") from None


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[str]]:
    """SIGINT/SIGTERM set ``stop`` (the loop ends cleanly); a second one acts as usual (forces)."""
    got: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, _frame: Any) -> None:
        got.append(signal.Signals(signum).name)
        stop.set()
        signal.signal(signum, previous[signum])

    for s in (signal.SIGINT, signal.SIGTERM):
        previous[s] = signal.signal(s, handler)
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _json_line(r: Result, head: Any) -> str:
    """One result as a JSON line (hand-formatted; the task's fields from its head: a classifier's
    label/score/top_k, a detector's detections/counts/events). Results from an image folder also
    carry ``"file"``: the image's path."""
    t = r.timings_ms
    file = f',"file":{json.dumps(r.file)}' if r.file is not None else ""
    src = f'"source":{json.dumps(r.source)},"batch":{r.batch},' if r.source is not None else ""
    return (f'{{"t":{r.time:.3f},{src}"frame":{r.frame_index},{head.json_fields(r)},'
            f'"latency_ms":{r.latency_ms:.3f},"timings_ms":{{"wait":{t["wait"]:.3f},'
            f'"preprocess":{t["preprocess"]:.3f},"infer":{t["infer"]:.3f},"post":{t["post"]:.3f}}},'
            f'"dropped":{r.dropped}{file}}}\n')


def format_summary(s: dict[str, Any]) -> str:
    m, lat, st = s["model"], s["latency_ms"], s["stages_ms"]
    lines = [
        f"edgetl run: {s['frames']} frames from {s['source']} in {s['elapsed_s']:.2f} s = {s['fps']:.1f} FPS "
        f"({m.get('backend')} {m.get('device', '')}, {m.get('model')})",
        f"  latency capture->result p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms",
        "  stages p50: " + ", ".join(f"{k} {v['p50']:.2f}" for k, v in st.items()) + " ms",
        f"  {s['policy']}: frames read {s['frames_read']}, dropped {s['dropped']}, reconnects {s['reconnects']}"
        + (f", undecodable files skipped {s['skipped_files']}" if s["skipped_files"] else "")
        + f"; stopped: {s['stop_reason']}",
    ]
    if s.get("skipped_unusable"):
        names = ", ".join(Path(e["file"]).name for e in s.get("skipped", []) if e.get("file"))
        lines.append(f"  skipped {s['skipped_unusable']} images the model input could not be made from "
                     f"(e.g. smaller than the --roi): {names[:300]}{' …' if len(names) > 300 else ''}")
    if s.get("task") == "detection":
        per = ", ".join(f"{k} {v}" for k, v in (s.get("max_per_frame") or {}).items())
        lines.append(f"  detections: most in one frame {per or '-'}"
                     + (f"; tracks {s['tracks']}" if s.get("tracks") is not None else ""))
        lc = s.get("line_counts")
        if lc:
            lines.append(f"  line crossings: {lc['total']} (in: " + ", ".join(f"{k} {v}" for k, v in lc["in"].items())
                         + "; out: " + ", ".join(f"{k} {v}" for k, v in lc["out"].items()) + ")")
        if s.get("crossings_low_confidence"):
            lines.append(f"  not counted: {s['crossings_low_confidence']} crossing(s) by tracks whose boxes scored "
                         f"below {s['count_confidence']} on average (--count-confidence)")
    if s.get("saved"):
        lines.append(f"  saved {s['saved']['frames']} annotated frames to {s['saved']['path']}")
    return "\n".join(lines)


def _open_window(name: str, note: Note) -> bool:
    """Open the display window; False (with a note saying why) where none can be shown."""
    ok, why = display_available()
    if ok:
        try:
            cv2.namedWindow(name, cv2.WINDOW_NORMAL)
        except cv2.error as exc:
            ok, why = False, f"cv2 cannot open a window ({str(exc).strip().splitlines()[-1]})"
    if not ok:
        note(f"{why}; running headless (JSON lines on stdout; --headless silences this note)")
    return ok


def _write_summary_json(dest: Path, summary: dict[str, Any]) -> None:
    """``--summary-json``: written whole (a partial file renamed) or not at all."""
    tmp = dest.with_name(dest.name + ".partial")
    try:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, dest)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise EdgetlError(f"--summary-json {dest}: cannot write it ({exc.strerror or exc})",
                          hint="give a path in a folder you can write to") from None


def make_stream(model: Model, source: Any, options: StreamOptions, stop: threading.Event, note: Note) -> Any:
    """A :class:`Stream` for one source; a :class:`~edgetl.runtime.multi.MultiStream` for a list of
    several (``NAME=URI`` names a source)."""
    if isinstance(source, (list, tuple)):
        if len(source) > 1:
            from .multi import MultiStream, name_sources
            return MultiStream(model, name_sources(source), options, stop=stop, note=note)
        from .multi import name_sources
        source = name_sources(source)[0][1]
    return Stream(model, source, options, stop=stop, note=note)


class _Outputs:
    """What ``edgetl run`` does with each result: JSON lines, the window, ``--save``, ``--serve``."""

    def __init__(self, stream: Any, app: AppOptions, headless: bool, out: IO[str], note: Note, server: Any = None,
                 mqtt: Any = None):
        self.stream, self.app, self.headless, self.out, self.server = stream, app, headless, out, server
        self.mqtt = mqtt  # an edgetl.runtime.mqtt.MqttPublisher: each JSON line also goes there
        self.json_out = headless or app.events
        self.saver = VideoSaver(app.save, note=note) if app.save is not None else None  # checked before the start
        self.multi = not isinstance(stream, Stream)
        self.dt_ema: Dict[Any, Tuple[float, float]] = {}  # per source: (EMA of the result interval, last time)

    def _fps(self, key: Any) -> float:
        """The overlay's FPS: 1 / EMA of the interval between results (an EMA of 1/interval would be
        biased up by the back-to-back results of a batch)."""
        now = time.perf_counter()
        ema, prev = self.dt_ema.get(key, (0.0, 0.0))
        if prev:
            dt = now - prev
            ema = 0.9 * ema + 0.1 * dt if ema else dt
        self.dt_ema[key] = (ema, now)
        return 1.0 / ema if ema > 0 else 0.0

    def result(self, r: Result) -> None:
        if self.app.on_result is not None:
            self.app.on_result(r)
        head = self.stream.head_of(r)
        if self.server is not None:
            self.server.observe(r)
        if (self.json_out or self.mqtt is not None) and (head.wanted(r) or not self.app.events):
            line = _json_line(r, head)
            if self.mqtt is not None:
                self.mqtt.publish(line[:-1])  # the same JSON object, without the newline
            if self.json_out:
                self._write(line)
        watched = self.server is not None and self.server.watched()
        if self.saver is None and self.headless and not watched:
            return
        head.draw(r.image, r, self._fps(r.source), self.stream.options.roi)
        if self.saver is not None:
            self.saver.fps = self.saver.fps or self.stream.source.fps  # the source is open now
            self.saver.write(r.image)
        if watched:
            self.server.publish(r.source, r.image)
        if not self.headless:
            window = self.app.window if r.source is None else f"{self.app.window} [{r.source}]"
            cv2.imshow(window, r.image)
            key = cv2.waitKey(1) & 0xFF
            if key in (27, ord("q")) or cv2.getWindowProperty(window, cv2.WND_PROP_VISIBLE) < 1:
                self.stream.stop_reason = "window closed"
                self.stream.stop.set()

    def _write(self, line: str) -> None:
        try:
            self.out.write(line)
            self.out.flush()
        except BrokenPipeError:  # e.g. `edgetl run ... | head`: stop quietly
            self.json_out = False
            if self.out is sys.stdout:  # python docs' recipe: no second error at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            self.stream.stop_reason = "stdout closed"
            self.stream.stop.set()

    def tail(self) -> None:
        """The end of the stream: e.g. the exits of the tracks still in view when a source ended."""
        lanes = [(lane.name, lane.head) for lane in self.stream.lanes] if self.multi else [(None, self.stream.head)]
        for name, head in lanes:
            tail = head.finish()
            if tail and (self.json_out or self.mqtt is not None):
                obj: Dict[str, Any] = {"t": round(time.time(), 3)}
                if name is not None:
                    obj["source"] = name
                obj["events"] = tail
                line = json.dumps(obj)
                if self.mqtt is not None:
                    self.mqtt.publish(line)
                if self.json_out:
                    self._write(line + "\n")

    def close(self) -> None:
        if self.saver is not None:
            self.saver.close()
        if not self.headless:
            with contextlib.suppress(cv2.error):
                cv2.destroyAllWindows()


def _check_multi(stream: Any, app: AppOptions) -> None:
    if app.save is not None and not isinstance(stream, Stream):
        raise EdgetlError(f"--save {app.save}: writes one video, and this run has {len(stream.lanes)} sources",
                          hint="watch them with --serve HOST:PORT, or run one edgetl per source with --save")


def run_app(model: Model, source: Any, options: StreamOptions, app: AppOptions,
            out: IO[str] | None = None, err: IO[str] | None = None) -> dict[str, Any]:
    """``edgetl run``: returns the summary; raises SourceLostError (after the summary) when a live
    source was lost for good (several sources: when every source is gone and one was lost).
    ``source`` may be a list: several sources in one process (:mod:`edgetl.runtime.multi`)."""
    out = out or sys.stdout
    err = err or sys.stderr

    def note(msg: str) -> None:
        print(f"note: {msg}", file=err, flush=True)

    for w in model.warnings:
        note(w)
    stop = threading.Event()
    stream = make_stream(model, source, options, stop, note)
    _check_multi(stream, app)
    if app.summary_json is not None:
        _writable_file(Path(app.summary_json), "--summary-json")  # before the run, not after it
    publisher = None
    if app.mqtt is not None:  # the broker must answer before any frame or output file
        from .mqtt import MqttPublisher
        publisher = MqttPublisher(app.mqtt, app.mqtt_topic, app.mqtt_qos, note=note).start()
    server = None
    try:
        if app.serve is not None:
            from .serve import StatusServer
            server = StatusServer(stream, app.serve, note=note).start()
        headless = app.headless or not _open_window(app.window, note)
        outputs = _Outputs(stream, app, headless, out, note, server, publisher)
        summary, error = _drive(stream, outputs, stop)
    finally:
        if server is not None:
            server.close()
        mqtt_summary = publisher.close() if publisher is not None else None
    if outputs.saver is not None:
        summary["saved"] = {"path": str(app.save), "frames": outputs.saver.frames, "fps": outputs.saver.fps}
    if mqtt_summary is not None:
        summary["mqtt"] = mqtt_summary
    summary_out = err if outputs.json_out else out  # stdout stays pure JSON lines
    if outputs.multi:
        from .multi import format_multi_summary
        text = format_multi_summary(summary)
    else:
        text = format_summary(summary)
    if mqtt_summary is not None:
        from .mqtt import format_mqtt_summary
        text += "\n" + format_mqtt_summary(mqtt_summary)
    print(text, file=summary_out, flush=True)
    if app.summary_json is not None:
        _write_summary_json(Path(app.summary_json), summary)
    if error is not None:
        raise error
    return summary


def _drive(stream: Any, outputs: _Outputs, stop: threading.Event) -> Tuple[dict, Optional[EdgetlError]]:
    """Run the stream through the outputs until it ends; the summary, and the SourceLostError to raise."""
    error: Optional[EdgetlError] = None
    with stop_on_signals(stop) as signals:
        try:
            for r in stream:
                outputs.result(r)
            outputs.tail()
        except SourceLostError as exc:
            error = exc
        finally:
            outputs.close()
    summary = stream.summary()
    if outputs.multi and error is None:
        error = stream.gone_error()
    if signals:
        summary["stop_reason"] = signals[0]
    if error is not None:
        summary["stop_reason"] = "source lost"
        summary["error"] = error.message
    return summary, error
