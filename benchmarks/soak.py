"""Soak: 100,000 frames through the loop of `edgetl run --headless`, memory sampled along the way.

    nice -n 19 .venv/bin/python benchmarks/soak.py                     # 100k frames, MQTT to a local mosquitto
    .venv/bin/python benchmarks/soak.py --frames 20000 --mqtt off      # shorter, no broker

What runs is ``edgetl.runtime.app.run_app`` (capture thread, every-frame policy, preprocessing,
ONNX Runtime, the head, JSON lines, the summary statistics and, with a broker, ``--mqtt``
publishing) on the tiny brightness artifact of the tests (32x32 input, a real ONNX graph: the
runtime's own costs dominate, which is what a soak is about). The source is a short generated
video (300 frames, 320x240 MJPG) looped by a Reader that seeks back to its start, so FFmpeg decodes
every one of the frames. The JSON lines go to a sink that, every ``--every`` lines, reads the
process's RSS (``/proc/self/status`` VmRSS), its open file descriptors, its threads and the number
of objects the garbage collector tracks.

Verdict: the RSS growth from the 10 % mark (allocators and caches warmed up) to the end, and the
slope of a least-squares line over those samples; "flat" when the growth is under ``--flat-mib``.
Prints a table and writes JSON to benchmarks/results/soak_<CPU class>.json.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny artifact, the generated video and the broker of the tests


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class SamplingSink(io.TextIOBase):
    """Where the JSON lines go: counts them and samples the process every ``every`` lines."""

    def __init__(self, every: int, t0: float):
        self.every, self.t0 = every, t0
        self.lines = 0
        self.bytes = 0
        self.samples: list = []

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        self.bytes += len(text)
        if self.lines % self.every == 0 and text.endswith("\n"):
            self.sample()
        return len(text)

    def flush(self) -> None:
        pass

    def sample(self) -> None:
        self.samples.append({"frames": self.lines, "t_s": round(time.perf_counter() - self.t0, 2),
                             "rss_mib": round(rss_kib() / 1024, 2), "fds": len(os.listdir("/proc/self/fd")),
                             "threads": threading.active_count(), "gc_objects": len(gc.get_objects())})


def looped_source(video: Path, frames: int):
    """A SourceSpec (kind "file": every frame, in order) whose reader plays ``video`` again and
    again, ``frames`` frames in all."""
    from edgetl.runtime.sources import CaptureReader, SourceSpec

    class LoopReader(CaptureReader):
        def __init__(self):
            super().__init__(cv2.VideoCapture(str(video), cv2.CAP_FFMPEG), str(video))
            self.left = frames
            self.rewinds = 0

        def read(self, out):
            if self.left <= 0:
                return None
            img = super().read(out)
            if img is None:  # the end of the clip: from its start again
                self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                self.rewinds += 1
                img = super().read(out)
            if img is not None:
                self.left -= 1
            return img

    class LoopSpec(SourceSpec):
        def open(self, note=None, decode_threads: int = 0):
            return LoopReader()

    return LoopSpec(f"{video.name} looped to {frames} frames", "file", str(video))


def verdict(samples: list, frames: int, flat_mib: float) -> dict:
    ten = next(s for s in samples if s["frames"] >= frames // 10)
    tail = [s for s in samples if s["frames"] >= ten["frames"]]
    x = np.array([s["frames"] for s in tail], float)
    y = np.array([s["rss_mib"] for s in tail], float)
    slope = float(np.polyfit(x, y, 1)[0]) * 100_000 if len(tail) > 2 else 0.0
    growth = samples[-1]["rss_mib"] - ten["rss_mib"]
    return {"rss_at_10pct_mib": ten["rss_mib"], "rss_end_mib": samples[-1]["rss_mib"],
            "rss_max_after_10pct_mib": float(y.max()), "rss_first_mib": samples[0]["rss_mib"],
            "growth_10pct_to_end_mib": round(growth, 2), "slope_mib_per_100k_frames": round(slope, 2),
            "fds_range": [min(s["fds"] for s in tail), max(s["fds"] for s in tail)],
            "threads_range": [min(s["threads"] for s in tail), max(s["threads"] for s in tail)],
            "gc_objects_range": [min(s["gc_objects"] for s in tail), max(s["gc_objects"] for s in tail)],
            "flat_threshold_mib": flat_mib, "flat": abs(growth) < flat_mib}


def table(samples: list, step: int) -> str:
    out = ["| frames | time (s) | RSS (MiB) | fds | threads | gc objects |", "|---|---|---|---|---|---|"]
    for s in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        out.append(f"| {s['frames']} | {s['t_s']:.1f} | {s['rss_mib']:.1f} | {s['fds']} | {s['threads']} | "
                   f"{s['gc_objects']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--every", type=int, default=1000, help="sample every N frames")
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--mqtt", default="auto", help="auto: a local mosquitto if there is one; off; or mqtt://HOST:PORT")
    ap.add_argument("--flat-mib", type=float, default=4.0, help="the RSS growth below which the verdict is flat")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.frames < 10 * a.every:
        ap.error("--frames must be at least 10 x --every (the verdict starts at the 10 % mark)")

    from _tinyartifact import frame_at, make_tiny_artifact, write_video
    from edgetl import runtime as rt
    from edgetl.runtime.app import AppOptions, StreamOptions, run_app
    from edgetl.runtime.cpu import host_cpu

    work = Path(tempfile.mkdtemp(prefix="edgetl-soak-"))
    broker = None
    try:
        artifact = make_tiny_artifact(work / "tiny")
        w, h = (int(v) for v in a.size.split("x"))
        video = write_video(work / "clip.avi", n=300, size=(w, h),
                            frames=(frame_at(i, (w, h)) for i in range(300)))
        mqtt = None if a.mqtt == "off" else a.mqtt
        if a.mqtt == "auto":
            from _mqtt import Broker, broker_missing
            why = broker_missing()
            if why is None:
                broker = Broker().start()
                mqtt = broker.url
            else:
                print(f"soak: no MQTT ({why})", flush=True)
                mqtt = None
        model = rt.load(artifact)
        t0 = time.perf_counter()
        sink = SamplingSink(a.every, t0)
        sink.sample()  # before the first frame
        sink.samples[0]["frames"] = 0
        err = io.StringIO()
        app = AppOptions(headless=True, mqtt=mqtt, mqtt_topic="edgetl/soak" if mqtt else None)
        s = run_app(model, looped_source(video, a.frames), StreamOptions(), app, out=sink, err=err)
        wall = time.perf_counter() - t0
        model.close()
        samples = sink.samples
        v = verdict(samples, a.frames, a.flat_mib)
        cpu = host_cpu()
        print(table(samples, max(1, len(samples) // 20)))
        print(f"soak: {s['frames']} frames in {wall:.0f} s ({s['fps']:.0f} FPS); RSS {v['rss_at_10pct_mib']:.1f} MiB "
              f"at 10 % -> {v['rss_end_mib']:.1f} MiB at the end: {v['growth_10pct_to_end_mib']:+.2f} MiB "
              f"(slope {v['slope_mib_per_100k_frames']:+.2f} MiB per 100k frames): "
              f"{'flat' if v['flat'] else 'NOT flat'}; {cpu.short}", flush=True)
        if mqtt:
            print(f"soak: mqtt {s['mqtt']}")
        slug = cpu.slug
        out = a.out or ROOT / "benchmarks" / "results" / f"soak_{slug}.json"
        summary = {k: v for k, v in s.items() if k not in ("skipped",)}
        doc = {"benchmark": "soak", "cpu": cpu.to_dict(), "cpu_short": cpu.short, "cores": cpu.cores,
               "python": platform.python_version(), "opencv": cv2.__version__, "numpy": np.__version__,
               "model": model.info, "artifact": "tests/_tinyartifact.py brightness model (32x32, fp32 ONNX)",
               "source": f"{w}x{h} MJPG clip of 300 frames, looped (every frame decoded), every-frame policy",
               "mqtt": "a local mosquitto, QoS 0" if mqtt else "off",
               "command": " ".join(["benchmarks/soak.py", *sys.argv[1:]]), "frames": a.frames,
               "sample_every": a.every, "wall_s": round(wall, 1), "verdict": v,
               "json_lines": sink.lines, "json_bytes": sink.bytes, "run_summary": summary,
               "notes": err.getvalue().splitlines(), "samples": samples, "table": table(samples, max(1, len(samples) // 20))}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}")
    finally:
        if broker is not None:
            broker.__exit__()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
