"""Several sources in one process: one capture thread per source, one model, batched inference.

``edgetl run ART --source A --source B ...`` (or ``--sources FILE``) runs :class:`MultiStream`:

* each source has its own :class:`~edgetl.runtime.sources.FrameSource` (capture thread, the
  latest-frame policy for live sources, reconnects with back-off), its own head (smoothing,
  tracking and line counts are per source) and its own statistics;
* the loop waits until any source has a frame (one Event shared by the capture threads), takes the
  frame of every source that has one, and runs them through the model as one batch: one call for a
  dynamic-batch build, as many calls as needed for a static-batch one (batch 1: one per frame;
  batch N: chunks of N, the last padded). When every source is read frame by frame (files and image
  folders without ``--realtime``: nothing is live, no frame goes stale) the loop waits for the next
  frame of every source still running, so each batch holds one frame of each and the batching does
  not depend on which capture thread happened to be ahead;
* a source that is lost (``SourceLostError`` after its reconnect timeout) or ends (a file) leaves
  the loop, with a note; the others go on. The run ends when every source is gone: exit 3 when at
  least one of them was lost, 0 when they all ended (files), and 0 on ``--duration``, ``--max-frames``
  (per source) or a signal.

Results carry ``source`` (the source's name: ``NAME=URI`` names it, else its position, "0", "1" ...).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import EdgetlError
from .heads import head_for
from .sources import FrameSource, Note, SourceLostError, stderr_note

_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]{0,31})=(.+)$", re.S)
MAX_SOURCES = 64


def name_sources(uris: Sequence[str]) -> List[Tuple[str, str]]:
    """``[(name, uri)]``: ``NAME=URI`` names a source (a letter first, then letters, digits, ``_.-``;
    at most 32), else its position ("0", "1" ...). Names must differ."""
    named: List[Tuple[str, str]] = []
    for i, text in enumerate(uris):
        text = str(text).strip()
        m = None if Path(text).exists() else _NAME.match(text)  # a file named "a=b.mp4" is a file
        named.append((m.group(1), m.group(2).strip()) if m else (str(i), text))
    seen: Dict[str, int] = {}
    for name, _ in named:
        if name in seen:
            raise EdgetlError(f"--source: the name {name!r} is given to two sources",
                              hint="give each source its own name (NAME=URI), e.g. --source left=rtsp://... "
                                   "--source right=rtsp://...")
        seen[name] = 1
    if len(named) > MAX_SOURCES:
        raise EdgetlError(f"--source: {len(named)} sources; at most {MAX_SOURCES} in one process",
                          hint="split them over several edgetl run processes")
    return named


def read_sources_file(path: Path) -> List[str]:
    """``--sources FILE``: one source per line (``URI`` or ``NAME=URI``); blank lines and ``#`` comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise EdgetlError(f"--sources {path}: cannot read it ({why})",
                          hint="give a UTF-8 text file with one source per line (URI or NAME=URI)") from None
    lines = [ln.strip() for ln in text.splitlines()]
    uris = [ln for ln in lines if ln and not ln.startswith("#")]
    if not uris:
        raise EdgetlError(f"--sources {path}: no source in it",
                          hint="one source per line: URI or NAME=URI (e.g. left=rtsp://10.0.0.5/stream)")
    return uris


class Lane:
    """One source of a MultiStream: its capture, head, statistics and state."""

    def __init__(self, name: str, source: FrameSource, head: Any):
        from .app import FrameStats
        self.name, self.source, self.head = name, source, head
        self.stats = FrameStats()
        self.frames = 0
        self.finished = ""  # why this source left the loop ("" while it is in)
        self.error: Optional[EdgetlError] = None
        self.t_first = self.t_last = 0.0
        self.last: Any = None  # the last Result (for the status page)

    def fps(self) -> float:
        """Results per second between this source's first and last result."""
        span = (self.t_last - self.t_first) if self.frames > 1 else 0.0
        return round((self.frames - 1) / span, 2) if span > 0 else 0.0


def infer_batch(model: Any, x: np.ndarray) -> Tuple[List[np.ndarray], int]:
    """Every output for a batch of frames, and how many model calls it took: one for a dynamic
    batch; one per frame for a batch-1 build; chunks of N (the last padded) for a batch-N build."""
    fixed = model.runner.fixed_batch
    if fixed == 1 and len(x) > 1:
        per = [model.outputs(x[i:i + 1]) for i in range(len(x))]
        return [np.concatenate([p[k] for p in per]) for k in range(len(per[0]))], len(x)
    calls = 1 if fixed in (None, 1) else -(-len(x) // fixed)
    return model.outputs(x), calls


class MultiStream:
    """Iterate :class:`~edgetl.runtime.app.Result` (with ``source``) over several sources."""

    def __init__(self, model: Any, sources: Sequence[Tuple[str, str]], options: Any,
                 stop: threading.Event | None = None, note: Note = stderr_note):
        self.model, self.options, self.note = model, options, note
        self.stop = stop or threading.Event()
        self.ready = threading.Event()
        o = options
        decode_threads = o.decode_threads if o.decode_threads is not None else (1 if model.runner.uses_cpu else 0)
        self.lanes: List[Lane] = []
        for name, uri in sources:  # parsed (and refused) before any capture starts
            src = FrameSource(uri, realtime=o.realtime, fps=o.fps, reconnect_timeout=o.reconnect_timeout,
                              queue_size=o.queue_size, note=note, decode_threads=decode_threads, ready=self.ready,
                              prepare=lambda img: model.input_tensor(img, o.roi))
            self.lanes.append(Lane(name, src, head_for(model, o)))
        self.by_name = {lane.name: lane for lane in self.lanes}
        self.stop_reason = ""
        self.frames = self.batches = self.calls = 0
        self._t_start = self._t_last = 0.0

    def head_of(self, r: Any) -> Any:
        return self.by_name[r.source].head

    def _take(self) -> List[Tuple[Lane, Any]]:
        """The frame of every source that has one (sources that ended or were lost leave the loop); when
        every source is read frame by frame, the next frame of every source still running."""
        o, got = self.options, []
        wait = not any(lane.source.latest for lane in self.lanes)
        for lane in self.lanes:
            if lane.finished:
                continue
            if o.max_frames is not None and lane.frames >= o.max_frames:
                lane.finished = "max frames"
                continue
            try:
                frame = lane.source.get(0)
                while frame is None and wait and not lane.source.done and not self.stop.is_set():
                    frame = lane.source.get(0.1)
            except SourceLostError as exc:
                lane.finished, lane.error = "source lost", exc
                left = sum(not ln.finished for ln in self.lanes)
                self.note(f"source {lane.name!r} lost: {exc.message}" + (f"; {left} other sources go on" if left else ""))
                continue
            if frame is None:
                if lane.source.done:
                    lane.finished = lane.source.end_reason or "end of source"
                continue
            got.append((lane, frame))
        return got

    def _inputs(self, batch: List[Tuple[Lane, Any]]) -> Tuple[List[Tuple[Lane, Any]], List[np.ndarray], List[float]]:
        kept, xs, preps = [], [], []
        for lane, frame in batch:
            if frame.tensor is not None:
                kept.append((lane, frame))
                xs.append(frame.tensor)
                preps.append(frame.prep_ms)
                continue
            t = time.perf_counter()
            try:
                x = self.model.input_tensor(frame.image, self.options.roi)
            except EdgetlError as exc:
                if frame.name is None:  # a camera/video: every frame would fail alike
                    raise
                lane.source.skip_image(frame, exc.message)
                continue
            kept.append((lane, frame))
            xs.append(x)
            preps.append((time.perf_counter() - t) * 1e3)
        return kept, xs, preps

    def __iter__(self) -> Iterator[Any]:
        o, clock = self.options, time.perf_counter
        for lane in self.lanes:
            lane.source.start()
        self._t_start = self._t_last = clock()
        deadline = self._t_start + o.duration if o.duration else None
        try:
            while True:
                t0 = clock()
                if self.stop.is_set() or (deadline is not None and t0 >= deadline):
                    self.stop_reason = self.stop_reason or ("stopped" if self.stop.is_set() else "duration")
                    break
                self.ready.clear()  # before looking: a frame published after this sets it again
                batch = self._take()
                if not batch:
                    if all(lane.finished for lane in self.lanes):
                        self.stop_reason = self.stop_reason or "all sources gone"
                        break
                    self.ready.wait(0.1)
                    continue
                yield from self._run_batch(batch, t0)
        finally:
            if self.frames == 0:
                self._t_last = clock()
            for lane in self.lanes:
                lane.source.close()

    def _run_batch(self, batch: List[Tuple[Lane, Any]], t0: float) -> Iterator[Any]:
        from .app import _RESULT_EXTRA, Result
        clock = time.perf_counter
        t1 = clock()
        batch, xs, preps = self._inputs(batch)
        if not batch:
            return
        t2 = clock()
        outs, calls = infer_batch(self.model, np.concatenate(xs) if len(xs) > 1 else xs[0])
        t3 = clock()
        self.batches += 1
        self.calls += calls
        n = len(batch)
        for i, (lane, frame) in enumerate(batch):
            ta = clock()
            fields = lane.head.step([out[i:i + 1] for out in outs], frame)
            t4 = clock()
            timings = {"wait": (t1 - t0) * 1e3, "preprocess": preps[i] + (t2 - t1) * 1e3 / n,
                       "infer": (t3 - t2) * 1e3, "post": (t4 - ta) * 1e3}
            latency = (t4 - frame.t_capture) * 1e3
            lane.stats.add(latency, timings)
            lane.frames += 1
            lane.t_first = lane.t_first or t4
            lane.t_last = self._t_last = t4
            self.frames += 1
            r = Result(frame.index, frame.image, fields.pop("label"), fields.pop("score"), fields.pop("top_k"),
                       fields.pop("probs"), timings, latency, lane.source.dropped, time.time(), frame.name,
                       **{k: v for k, v in fields.items() if k in _RESULT_EXTRA}, source=lane.name, batch=n)
            lane.last = r
            yield r
            lane.source.release(frame)

    def lost(self) -> List[Lane]:
        return [lane for lane in self.lanes if lane.error is not None]

    def summary(self) -> Dict[str, Any]:
        from .app import STAGES
        elapsed = max(self._t_last - self._t_start, 1e-9)
        per = []
        for lane in self.lanes:
            src = lane.source
            entry = {"name": lane.name, "source": src.spec.uri, "source_kind": src.spec.kind,
                     "policy": "latest-frame" if src.latest else "every-frame", "frames": lane.frames,
                     "frames_read": src.frames_read, "dropped": src.dropped, "reconnects": src.reconnects,
                     "stalls": src.stalls, "fps": round(lane.frames / elapsed, 2) if lane.frames else 0.0,
                     "latency_ms": lane.stats.column("latency"),
                     "stages_ms": {s: lane.stats.column(s) for s in STAGES},
                     "stop_reason": lane.finished or self.stop_reason or src.end_reason,
                     "skipped_files": src.skipped, "skipped_unusable": src.unusable, **lane.head.summary()}
            if lane.error is not None:
                entry["error"] = lane.error.message
            per.append(entry)
        return {"sources": per, "frames": self.frames, "elapsed_s": round(elapsed, 3),
                "fps": round(self.frames / elapsed, 2) if self.frames else 0.0, "batches": self.batches,
                "model_calls": self.calls, "mean_batch": round(self.frames / self.batches, 2) if self.batches else 0.0,
                "stop_reason": self.stop_reason, "model": self.model.info, "task": self.model.manifest.task,
                "frames_read": sum(e["frames_read"] for e in per), "dropped": sum(e["dropped"] for e in per),
                "reconnects": sum(e["reconnects"] for e in per)}

    def gone_error(self) -> Optional[SourceLostError]:
        """Exit 3 when the run ended because every source was gone and at least one was lost."""
        lost = self.lost()
        if self.stop_reason != "all sources gone" or not lost:
            return None
        names = ", ".join(repr(lane.name) for lane in lost)
        first = lost[0].error
        return SourceLostError(f"every source is gone ({len(lost)} of {len(self.lanes)} lost: {names}); "
                               f"{first.message if first else ''}",
                               hint="check the cameras/streams and their network; pass a longer --reconnect-timeout "
                                    "to wait longer")


def format_multi_summary(s: Dict[str, Any]) -> str:
    m = s["model"]
    lines = [f"edgetl run: {s['frames']} frames from {len(s['sources'])} sources in {s['elapsed_s']:.2f} s = "
             f"{s['fps']:.1f} FPS in all ({m.get('backend')} {m.get('device', '')}, {m.get('model')}); "
             f"{s['batches']} batches (mean {s['mean_batch']:.2f} frames), {s['model_calls']} model calls; "
             f"stopped: {s['stop_reason']}"]
    for e in s["sources"]:
        lat = e["latency_ms"]
        lines.append(f"  [{e['name']}] {e['source']}: {e['frames']} frames, {e['fps']:.1f} FPS, latency p50 "
                     f"{lat['p50']:.1f} / p90 {lat['p90']:.1f} ms, dropped {e['dropped']}, reconnects "
                     f"{e['reconnects']}; {e['stop_reason']}" + (f" ({e['error']})" if e.get("error") else ""))
    return "\n".join(lines)
