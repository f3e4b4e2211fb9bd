"""RTSP end-to-end latency over a long run: minute 1 vs minute 10 (does it grow?).

    nice -n 10 .venv/bin/python benchmarks/rtsp_latency.py                      # 10 minutes, 640x480 30 FPS H.264
    .venv/bin/python benchmarks/rtsp_latency.py --minutes 0.5 --bucket 10 --out /tmp/rtsp.json   # a smoke run

A live RTSP camera: tests/rtsp_server.py ``--stamp`` (GStreamer's RTSP server, run by the system
python3, on 127.0.0.1, started and stopped here), H.264 from x264enc (ultrafast, zerolatency, 2000
kbit/s, a key frame a second) over RTP. Each frame carries its capture time (the wall clock, ms)
and its number as 64 black/white 16x16 blocks in its top-left corner, written just before the frame
is pushed into the server's pipeline (tests/rtsp_server.py ``draw_stamp``).

What runs is ``edgetl run --headless``'s loop, ``edgetl.runtime.app.run_app``, in this process (the
CLI calls the same function): the capture thread with OpenCV's RTSP client (FFmpeg over TCP with
``nobuffer``/``low_delay`` in the pip OpenCV; GStreamer ``rtspsrc latency=0`` where OpenCV has it),
the latest-frame policy, preprocessing, ONNX Runtime on the tiny 32x32 brightness artifact of the
tests (the stream pipeline is what is measured, not the model) and JSON lines to /dev/null.
``AppOptions.on_result`` hands each result, with its decoded frame, to a probe that reads the stamp
back: **end-to-end latency = the time the result was produced (``Result.time``) - the stamped
capture time** (same machine, same clock), so it includes the encoder, RTP packetisation, the
server's and the client's socket buffers, the RTSP client's demuxer and decoder, the capture
thread's hand-off and the runtime's own capture->result time (``latency_ms``, also recorded). The
frame numbers tell frames lost before the runtime (sent, never decoded) from frames the latest-frame
policy dropped.

Per bucket (``--bucket`` seconds, a minute by default, from the first result): results and FPS,
end-to-end p50/p90/max, the runtime's own latency, the rest (end-to-end - runtime: server, network,
buffers, decoder), dropped, lost before the runtime, stale results (older than ``--stale-ms``),
unreadable stamps, reconnects, the load average and the CPU of the server and of this process.
Verdict: the last bucket's p50 against the first's, "does not grow" within +``--tolerance-pct`` %
or +``--tolerance-ms`` ms (whichever is larger), and the slope of the 10-second p50s over the run.
Prints a table and writes JSON to benchmarks/results/rtsp_latency_<CPU class>.json (``_gstreamer``
added when this Python's OpenCV has GStreamer, e.g. ``.venv/gst/bin/python ... --artifact DIR``: that
venv has no onnx to build the tiny artifact, so give one built by the main venv).
"""

from __future__ import annotations

import argparse
import io
import json
import math
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
sys.path.insert(0, str(ROOT / "tests"))  # the RTSP server, its stamp and the tiny artifact of the tests


class Probe:
    """``AppOptions.on_result``: per result (time, end-to-end ms, runtime latency ms, capture index,
    server frame number, dropped so far). Reads 64 block means: about 30 microseconds in the loop."""

    def __init__(self):
        from rtsp_server import read_stamp, stamp_age_ms
        self.read_stamp, self.stamp_age_ms = read_stamp, stamp_age_ms
        self.rows: list = []

    def __call__(self, r) -> None:
        stamp = self.read_stamp(r.image)
        e2e = self.stamp_age_ms(stamp[0], r.time) if stamp is not None else math.nan
        self.rows.append((r.time, e2e, r.latency_ms, r.frame_index, stamp[1] if stamp is not None else -1, r.dropped))


class TimedLog(io.TextIOBase):
    """``run_app``'s notes (stderr), each line with the time it came: reconnects are counted per bucket."""

    def __init__(self):
        self.lines: list = []

    def write(self, text: str) -> int:
        now = time.time()
        self.lines.extend((now, line) for line in text.splitlines() if line.strip())
        return len(text)


class Sampler(threading.Thread):
    """Every ``every`` seconds: the load average, the CPU seconds of the server and of this process."""

    def __init__(self, server_pid: int, every: float = 5.0):
        super().__init__(daemon=True)
        self.pid, self.every = server_pid, every
        self.samples: list = []
        self.halt = threading.Event()

    def cpu_s(self, pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return math.nan

    def sample(self) -> None:
        self.samples.append((time.time(), os.getloadavg()[0], self.cpu_s(self.pid), self.cpu_s(os.getpid())))

    def run(self) -> None:
        self.sample()
        while not self.halt.wait(self.every):
            self.sample()
        self.sample()


def pct(values, q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if len(values) else math.nan


def buckets(rows: list, t0: float, span: float, bucket: float, stale_ms: float, log: list, samples: list) -> list:
    """Per bucket of ``bucket`` seconds from ``t0`` (the first result) up to ``span`` seconds."""
    out = []
    prev_index = prev_counter = None
    prev_dropped = 0
    n_buckets = max(1, math.ceil(span / bucket - 1e-9))
    for k in range(n_buckets):
        lo, hi = t0 + k * bucket, t0 + min((k + 1) * bucket, span)
        sel = [r for r in rows if lo <= r[0] < hi]
        if not sel:
            out.append({"bucket": k + 1, "from_s": k * bucket, "to_s": round(hi - t0, 1), "results": 0})
            continue
        e2e = np.array([r[1] for r in sel if not math.isnan(r[1])])
        own = np.array([r[2] for r in sel if not math.isnan(r[1])])
        rest = e2e - own
        counters = [r[4] for r in sel if r[4] >= 0]
        last_index, last_counter, last_dropped = sel[-1][3], (counters[-1] if counters else None), sel[-1][5]
        # frames the capture decoded / the server sent since the previous bucket's last result
        decoded = last_index - (prev_index if prev_index is not None else sel[0][3] - 1)
        sent = (last_counter - (prev_counter if prev_counter is not None else counters[0] - 1)
                if counters else math.nan)
        dropped = last_dropped - prev_dropped
        prev_index, prev_dropped = last_index, last_dropped
        prev_counter = last_counter if last_counter is not None else prev_counter
        cpu = [s for s in samples if lo - 5 <= s[0] <= hi + 5]
        dt = (cpu[-1][0] - cpu[0][0]) if len(cpu) > 1 else math.nan
        out.append({
            "bucket": k + 1, "from_s": k * bucket, "to_s": round(hi - t0, 1), "results": len(sel),
            "fps": round(len(sel) / (hi - lo), 2),
            "e2e_ms": {"p50": pct(e2e, 50), "p90": pct(e2e, 90), "p99": pct(e2e, 99),
                       "max": round(float(e2e.max()), 1) if len(e2e) else math.nan,
                       "min": round(float(e2e.min()), 1) if len(e2e) else math.nan},
            "runtime_latency_ms": {"p50": pct(own, 50), "p90": pct(own, 90)},
            "before_runtime_ms": {"p50": pct(rest, 50), "p90": pct(rest, 90)},
            "sent": sent, "decoded": decoded, "dropped": dropped,
            "lost_before_runtime": (sent - decoded) if counters else math.nan,
            "stale": int((e2e > stale_ms).sum()), "unreadable_stamps": len(sel) - len(e2e),
            "reconnects": sum(1 for t, line in log if lo <= t < hi and "reconnected" in line),
            "load_avg_1min": round(float(np.mean([s[1] for s in cpu])), 2) if cpu else math.nan,
            "server_cpu_pct": round(100 * (cpu[-1][2] - cpu[0][2]) / dt, 1) if len(cpu) > 1 else math.nan,
            "edgetl_cpu_pct": round(100 * (cpu[-1][3] - cpu[0][3]) / dt, 1) if len(cpu) > 1 else math.nan,
        })
    return out


def series(rows: list, t0: float, span: float, step: float = 10.0) -> list:
    """The end-to-end p50 and FPS every ``step`` seconds (the slope of the verdict)."""
    out = []
    for k in range(max(1, math.ceil(span / step - 1e-9))):
        lo, hi = t0 + k * step, t0 + min((k + 1) * step, span)
        e2e = [r[1] for r in rows if lo <= r[0] < hi and not math.isnan(r[1])]
        if e2e:
            out.append({"t_s": round((lo + hi) / 2 - t0, 1), "e2e_p50_ms": pct(e2e, 50),
                        "fps": round(len(e2e) / (hi - lo), 2)})
    return out


def verdict(rows: list, tol_pct: float, tol_ms: float, trend: list) -> dict:
    first, last = rows[0], rows[-1]
    a, b = first["e2e_ms"]["p50"], last["e2e_ms"]["p50"]
    allowed = max(a * tol_pct / 100.0, tol_ms)
    slope = float(np.polyfit([s["t_s"] for s in trend], [s["e2e_p50_ms"] for s in trend], 1)[0]) * 60 \
        if len(trend) > 2 else math.nan
    return {"first_bucket": first["bucket"], "last_bucket": last["bucket"],
            "e2e_p50_first_ms": a, "e2e_p50_last_ms": b, "growth_p50_ms": round(b - a, 1),
            "growth_p50_pct": round(100 * (b - a) / a, 1) if a else math.nan,
            "e2e_p90_first_ms": first["e2e_ms"]["p90"], "e2e_p90_last_ms": last["e2e_ms"]["p90"],
            "growth_p90_ms": round(last["e2e_ms"]["p90"] - first["e2e_ms"]["p90"], 1),
            "fps_first": first["fps"], "fps_last": last["fps"],
            "slope_p50_ms_per_min": round(slope, 2),
            "tolerance": f"p50 growth <= max({tol_pct:g} % of the first, {tol_ms:g} ms) = {allowed:.1f} ms",
            "does_not_grow": bool(b - a <= allowed)}


def table(rows: list, label: str) -> str:
    out = [(f"| {label} | results | FPS | end-to-end p50 / p90 / max (ms) | runtime p50 (ms) | before the runtime "
            "p50 (ms) | dropped | lost before | stale | unreadable | reconnects | load | server CPU | edgetl CPU |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["results"]:
            out.append(f"| {r['bucket']} | 0 | - | - | - | - | - | - | - | - | - | - | - | - |")
            continue
        e = r["e2e_ms"]
        out.append(f"| {r['bucket']} | {r['results']} | {r['fps']:.1f} | {e['p50']:.1f} / {e['p90']:.1f} / "
                   f"{e['max']:.1f} | {r['runtime_latency_ms']['p50']:.1f} | {r['before_runtime_ms']['p50']:.1f} | "
                   f"{r['dropped']} | {r['lost_before_runtime']} | {r['stale']} | {r['unreadable_stamps']} | "
                   f"{r['reconnects']} | {r['load_avg_1min']:.2f} | {r['server_cpu_pct']:.0f} % | "
                   f"{r['edgetl_cpu_pct']:.0f} % |")
    return "\n".join(out)


def _clean(obj):
    """NaN -> None (strict JSON)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--artifact", type=Path, default=None, help="default: the tiny artifact of the tests (needs onnx)")
    ap.add_argument("--bucket", type=float, default=60.0, help="seconds per row of the table (a minute)")
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--stale-ms", type=float, default=200.0, help="a result older than this is counted stale")
    ap.add_argument("--tolerance-pct", type=float, default=20.0)
    ap.add_argument("--tolerance-ms", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    span = a.minutes * 60.0
    if span < 2 * a.bucket:
        ap.error("--minutes must cover at least two --bucket's (the verdict compares the first with the last)")

    from _streams import rtsp_server, rtsp_server_missing
    from edgetl.runtime.app import AppOptions, StreamOptions, run_app
    from edgetl.runtime.cpu import host_cpu
    from edgetl.runtime.sources import RTSP_FFMPEG_OPTIONS, opencv_has_gstreamer

    from edgetl import runtime as rt

    why = rtsp_server_missing()
    if why:
        sys.exit(f"rtsp_latency: {why}")
    work = Path(tempfile.mkdtemp(prefix="edgetl-rtsp-"))
    server = rtsp_server("--stamp", "--size", a.size, "--fps", str(a.fps), "--lifetime", str(span + 300))
    sampler = None
    try:
        artifact = a.artifact
        if artifact is None:
            from _tinyartifact import make_tiny_artifact
            artifact = make_tiny_artifact(work / "tiny")
        model = rt.load(artifact)
        server.start()
        sampler = Sampler(server.proc.pid)
        sampler.start()
        probe, log = Probe(), TimedLog()
        # the opening (RTSP handshake, first key frame) counts in the duration: a few seconds more, cut below
        opts = StreamOptions(duration=span + 10.0)
        t_run = time.time()
        with open(os.devnull, "w") as devnull:
            s = run_app(model, server.url, opts, AppOptions(headless=True, on_result=probe), out=devnull, err=log)
        wall = time.time() - t_run
        sampler.halt.set()
        sampler.join(10)
        model_info = model.info
        model.close()
        if not probe.rows:
            sys.exit(f"rtsp_latency: no result came; notes: {[line for _, line in log.lines]}")
        t0 = probe.rows[0][0]
        rows = [r for r in probe.rows if r[0] < t0 + span]
        per = buckets(rows, t0, span, a.bucket, a.stale_ms, log.lines, sampler.samples)
        trend = series(rows, t0, span)
        v = verdict([r for r in per if r["results"]], a.tolerance_pct, a.tolerance_ms, trend)
        e2e_all = [r[1] for r in rows if not math.isnan(r[1])]
        cpu = host_cpu()
        label = "minute" if a.bucket == 60 else f"{a.bucket:g} s"
        text = table(per, label)
        print(text)
        gst = opencv_has_gstreamer()
        path = "GStreamer rtspsrc latency=0" if gst else f"FFmpeg ({RTSP_FFMPEG_OPTIONS})"
        print(f"rtsp_latency: {len(rows)} results in {span / 60:g} min ({path}, {a.size} {a.fps} FPS H.264); "
              f"end-to-end p50 {v['e2e_p50_first_ms']:.1f} ms in {label} {v['first_bucket']} -> "
              f"{v['e2e_p50_last_ms']:.1f} ms in {label} {v['last_bucket']} ({v['growth_p50_ms']:+.1f} ms, "
              f"p90 {v['growth_p90_ms']:+.1f} ms; trend {v['slope_p50_ms_per_min']:+.2f} ms/min): "
              f"{'does not grow' if v['does_not_grow'] else 'GROWS'} ({v['tolerance']}); "
              f"reconnects {s['reconnects']}; {cpu.short}", flush=True)
        slug = cpu.slug
        out = a.out or ROOT / "benchmarks" / "results" / f"rtsp_latency_{slug}{'_gstreamer' if gst else ''}.json"
        summary = {k: val for k, val in s.items() if k not in ("skipped",)}
        doc = {"benchmark": "rtsp_latency", "cpu": cpu.to_dict(), "cpu_short": cpu.short, "cores": cpu.cores,
               "python": platform.python_version(), "opencv": cv2.__version__, "numpy": np.__version__,
               "model": model_info,
               "artifact": str(a.artifact or "tests/_tinyartifact.py brightness model (32x32, fp32 ONNX)"),
               "command": " ".join(["benchmarks/rtsp_latency.py", *sys.argv[1:]]),
               "stream": {"server": "tests/rtsp_server.py --stamp (GStreamer RTSP server, system python3, 127.0.0.1)",
                          "size": a.size, "fps": a.fps,
                          "encoder": "x264enc tune=zerolatency speed-preset=ultrafast bitrate=2000 "
                                     f"key-int-max={a.fps}, rtph264pay",
                          "capture": path, "policy": s.get("policy")},
               "method": "end-to-end = Result.time (wall clock when the result was produced, read through "
                         "AppOptions.on_result) - the capture time stamped into the frame by the server just "
                         "before it entered the encoder (same machine, same clock); runtime latency = the "
                         "runtime's own capture->result latency_ms; before the runtime = the difference",
               "minutes": a.minutes, "bucket_s": a.bucket, "stale_ms": a.stale_ms, "wall_s": round(wall, 1),
               "results": len(rows),
               "e2e_ms_all": {"p50": pct(e2e_all, 50), "p90": pct(e2e_all, 90), "p99": pct(e2e_all, 99),
                              "max": round(max(e2e_all), 1) if e2e_all else None},
               "verdict": v, "buckets": per, "series_10s": trend, "run_summary": summary,
               "notes": [line for _, line in log.lines], "table": text}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_clean(doc), indent=1) + "\n")
        print(f"wrote {out}")
    finally:
        if sampler is not None:
            sampler.halt.set()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
