"""Several sources in one `edgetl run`: aggregate FPS and per-source latency for 1, 2, 4, 8 sources.

    .venv/bin/python benchmarks/multi_source.py                        # stand-in EfficientNet-Lite0 fp32
    .venv/bin/python benchmarks/multi_source.py --artifact artifacts/elpv --counts 1 2 4 8 --seconds 15

Each source is its own copy of a generated 1280x720 30 FPS video (its own capture thread and
decoder), run through ``edgetl.runtime.app.run_app`` (the loop of ``edgetl run --headless``, JSON
lines to /dev/null) in two modes:

* ``every-frame`` (``--realtime`` off): every frame of every file, as fast as the host allows: the
  throughput; the ready frames of the sources are inferred as one batch;
* ``realtime`` (``--realtime``): each file played like a 30 FPS camera (latest-frame policy): what a
  set of live cameras gets: aggregate FPS, per-source latency (capture -> result) and drops.

Prints a table and writes JSON (``--out``, default benchmarks/results/multi_source_<cpu>.json)
with the CPU class. Without ``--artifact`` a stand-in is exported (efficientnet_lite0 224x224,
random weights, fp32; needs torch, in a subprocess), as benchmarks/runtime_fps.py does.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def make_video(path: Path, frames: int = 300, size=(1280, 720), fps: float = 30.0) -> Path:
    """A conveyor-like clip: a textured belt moving right, bright/dark cells passing."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    rng = np.random.default_rng(0)
    belt = rng.integers(40, 90, (h, w * 2, 3), dtype=np.uint8)
    for i in range(frames):
        x = (i * 8) % w
        img = np.ascontiguousarray(belt[:, x:x + w])
        for k in range(3):
            cx = (i * 8 + k * 420) % (w + 300) - 150
            shade = 200 if (i // 30 + k) % 2 else 110
            cv2.rectangle(img, (cx, h // 4), (cx + 300, h // 4 + 300), (shade, shade, shade), -1)
        writer.write(img)
    writer.release()
    return path


def run_once(model, videos, realtime: bool, seconds: float) -> dict:
    from edgetl.runtime.app import AppOptions, StreamOptions, run_app

    opts = StreamOptions(realtime=True if realtime else None, duration=seconds)
    sink = io.StringIO()
    s = run_app(model, [str(v) for v in videos] if len(videos) > 1 else str(videos[0]), opts,
                AppOptions(headless=True), out=sink, err=io.StringIO())
    per = s["sources"] if "sources" in s else [s]
    return {
        "sources": len(videos), "mode": "realtime" if realtime else "every-frame",
        "fps_total": s["fps"], "frames": s["frames"], "elapsed_s": s["elapsed_s"],
        "mean_batch": s.get("mean_batch", 1.0), "model_calls": s.get("model_calls", s["frames"]),
        "fps_per_source": [e["fps"] for e in per],
        "latency_p50_ms": [e["latency_ms"]["p50"] for e in per],
        "latency_p90_ms": [e["latency_ms"]["p90"] for e in per],
        "dropped": [e["dropped"] for e in per], "frames_read": [e["frames_read"] for e in per],
        "infer_p50_ms": statistics.median(e["stages_ms"]["infer"]["p50"] for e in per),
    }


def table(rows: list) -> str:
    out = ["| mode | sources | FPS (all) | FPS per source | latency p50 (ms, per source) | p90 | mean batch | "
           "dropped |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat50 = f"{min(r['latency_p50_ms']):.1f}-{max(r['latency_p50_ms']):.1f}"
        lat90 = f"{min(r['latency_p90_ms']):.1f}-{max(r['latency_p90_ms']):.1f}"
        fps = f"{min(r['fps_per_source']):.1f}-{max(r['fps_per_source']):.1f}"
        drop = sum(r["dropped"]) / max(1, sum(r["frames_read"]))
        out.append(f"| {r['mode']} | {r['sources']} | {r['fps_total']:.1f} | {fps} | {lat50} | {lat90} | "
                   f"{r['mean_batch']:.2f} | {100 * drop:.0f} % |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", type=Path, default=None)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--seconds", type=float, default=12.0, help="each run's duration")
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    from edgetl import runtime as rt
    from edgetl.runtime.cpu import host_cpu

    work = Path(tempfile.mkdtemp(prefix="edgetl-multi-"))
    try:
        artifact = a.artifact
        if artifact is None:
            import runtime_fps
            artifact = runtime_fps.standin_artifact(work / "standin", "efficientnet_lite0")
        opts = {k: json.loads(v) if v.isdigit() else v for k, _, v in (o.partition("=") for o in a.option)}
        model = rt.load(artifact, backend=a.backend, options=opts)
        w, h = (int(v) for v in a.size.split("x"))
        base = make_video(work / "clip.mp4", size=(w, h))
        videos = [base] + [shutil.copy(base, work / f"clip{i}.mp4") for i in range(1, max(a.counts))]
        rows = []
        for realtime in (False, True):
            for n in a.counts:
                r = run_once(model, videos[:n], realtime, a.seconds)
                rows.append(r)
                print(f"{r['mode']:>11} x{n}: {r['fps_total']:.1f} FPS in all, latency p50 "
                      f"{statistics.median(r['latency_p50_ms']):.1f} ms, mean batch {r['mean_batch']:.2f}", flush=True)
        cpu = host_cpu()
        print(table(rows))
        slug = cpu.slug
        out = a.out or ROOT / "benchmarks" / "results" / f"multi_source_{slug}.json"
        doc = {"benchmark": "multi_source", "cpu": cpu.to_dict(), "cpu_short": cpu.short, "cores": cpu.cores,
               "python": platform.python_version(), "opencv": cv2.__version__, "model": model.info,
               "artifact": str(a.artifact) if a.artifact else "stand-in efficientnet_lite0 fp32 (random weights)",
               "video": f"{w}x{h} mp4v 30 FPS, one copy per source", "seconds": a.seconds,
               "command": " ".join(["benchmarks/multi_source.py", *sys.argv[1:]]), "rows": rows,
               "table": table(rows)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {out}")
        model.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
