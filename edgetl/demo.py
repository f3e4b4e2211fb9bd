"""The main job end to end on real data (``make demo``; ``make demo FULL=1`` for the better recipe).

Every step is a real ``edgetl`` command, printed before it runs so any step can be re-run by hand:
write ELPV as an image folder, fine-tune EfficientNet-Lite0, compile INT8 for two x86 targets (gate
on), build a 1280x720 "conveyor" video from held-out test images, run the device runtime headless
on it with ``--save``, benchmark every backend side by side, and print a summary whose numbers are
read back from what ``edgetl check`` (the artifacts' gates) and ``edgetl bench`` (bench.json) wrote.

    python -m edgetl.demo [--full] [--out demo]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TARGETS = ("x86-cpu-openvino", "x86-cpu-onnxruntime")
# Quick (the default, ~7 min of training on 2 cores): the best recipe's settings (whole cell
# stretched to 224, flips both ways, mild crop and rotation, backbone at 0.3x the head's rate) for 6
# epochs instead of 12. Shorter runs score lower and their INT8 versions are fragile around the 98 %
# agreement gate: the former 3-epoch quick recipe (test 81.9 %) kept 98.7 % after PTQ + 1 float layer
# on one machine but 97.7 % on another (so the demo failed there; QAT on 320 images: 96.9 %), a
# 4-epoch run of these settings (84.0 %) 97.5 %; the 6-epoch model (84.7 %) keeps 99.5 % with 2 float
# layers. A frozen-backbone head (feature-extract) flips 3-5 % of the test cells.
QUICK = ["--mode", "fine-tune", "--resize", "stretch", "--epochs", "6", "--lr", "1e-3", "--backbone-lr-factor", "0.3",
         "--aug-vflip", "0.5", "--aug-scale", "0.7", "--aug-rotate", "5"]
# Full (make demo FULL=1; benchmarks/train_elpv.py "best"): the best recipe found for Lite0 on ELPV
# (whole cell stretched to 224, flips both ways, mild crop and rotation), then QAT. 20 epochs (best
# val 0.901 at epoch 14; test 88.30 %) beat 12 (best val 0.878; test 87.79 %) on validation.
FULL = ["--mode", "fine-tune", "--resize", "stretch", "--epochs", "20", "--lr", "1e-3", "--backbone-lr-factor", "0.3",
        "--aug-vflip", "0.5", "--aug-scale", "0.7", "--aug-rotate", "5", "--patience", "6"]


# compile: the ladder, pinned to its PTQ steps for the quick recipe (QAT on a 2-core AVX2 CPU trains at
# ~2-4 img/s: minutes per hundred images), with the time the repair may take capped
QUICK_COMPILE = ["--time-budget", "420"]
BENCH = ["--reps", "60"]  # 60 interleaved batch-1 runs per row (200 by default): the demo's time budget
# the first artifact is benchmarked against every backend; the second only against what its row needs
BENCH_ROWS = {"x86-cpu-onnxruntime": "torch-channels-last,ort-fp32,ort-int8"}


def weights_label(row: dict[str, Any]) -> str:
    """``w7`` / ``w8``, and ``dw8`` where the depthwise layers kept 8 bits beside 7-bit others."""
    bits, dw = row.get("weight_bits") or 8, row.get("depthwise_weight_bits")
    return f"w{bits}" + (f"/dw{dw}" if dw and dw != bits else "")


def _edgetl() -> list[str]:
    exe = Path(sys.executable).with_name("edgetl")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edgetl.cli"]


GATE_FAILED = 1  # the exit code of compile/quantize/check when the artifact misses its gate


def step(title: str, args: list[str], log: list[dict], stdout=None, ok=(0,)) -> int:
    print(f"\n=== {title}\n$ edgetl {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(_edgetl() + args, stdout=stdout)
    dt = time.perf_counter() - t0
    log.append({"step": title, "command": "edgetl " + shlex.join(args), "seconds": round(dt, 1),
                "exit": proc.returncode})
    if proc.returncode not in ok:
        raise SystemExit(f"demo: step '{title}' failed (exit {proc.returncode}); see the output above")
    return proc.returncode


def summarize(out: Path, run: Path, artifacts: dict[str, Path], log: list[dict], t_total: float) -> dict[str, Any]:
    run_m = json.loads((run / "manifest.json").read_text())
    test = run_m["training"]["metrics"].get("test", {})
    rows = []
    for target, art in artifacts.items():
        m = json.loads((art / "manifest.json").read_text())
        bench = json.loads((art / "bench.json").read_text()) if (art / "bench.json").exists() else {}
        backend = (m.get("target") or {}).get("backend")
        build = next((b for b in m.get("builds") or [] if b.get("backend") == backend), {})
        # the gate of the target's own build (what `edgetl check ARTIFACT` runs), else the artifact's
        g = build.get("gate") or m["gate"] or {}
        row_name = {"openvino": "ov-int8", "onnxruntime": "ort-int8"}.get(build.get("backend"), "")
        brow = bench.get("rows", {}).get(row_name, {})
        sp = bench.get("speedups", {})
        eager = bench.get("rows", {}).get(sp.get("eager_baseline", ""), {})
        ref = m.get("gate") or {}
        q = m.get("quantization") or {}
        rows.append({
            "target": target, "artifact": str(art), "backend": build.get("backend"),
            "precision": brow.get("precision") or build.get("precision"),
            "deployable": bool(g.get("passed")), "decided_by": ref.get("decided_by"),
            "float_top1": g.get("float_top1"), "int8_top1": g.get("quant_top1"),
            "drop_points": g.get("drop"), "agreement": g.get("agreement"), "n_checkset": g.get("n"),
            "stability": (g.get("stability") or {}).get("min_agreement"), "margins": g.get("margins"),
            "reference_gate": {k: ref.get(k) for k in ("passed", "agreement", "drop", "margins")},
            "weight_bits": q.get("weight_bits"), "depthwise_weight_bits": q.get("depthwise_weight_bits"),
            "float_layers": len(q.get("float_layers") or []),
            "ladder": q.get("ladder"), "kept_step": next((x["step"] for x in q.get("ladder") or [] if x.get("kept")), None),
            "int8_p50_ms": brow.get("latency_p50_ms"), "eager_p50_ms": eager.get("latency_p50_ms"),
            "eager_baseline": sp.get("eager_baseline"),
            "speedup_vs_eager": (eager["latency_p50_ms"] / brow["latency_p50_ms"]) if eager and brow else None,
        })
    every = json.loads((out / "run_summary.json").read_text())
    live = json.loads((out / "run_realtime_summary.json").read_text())
    from .runtime.cpu import host_cpu

    return {"run": str(run), "test_accuracy_float": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
            "cpu": host_cpu().to_dict(), "targets": rows,
            "runtime": {"artifact": str(artifacts[TARGETS[0]]), "precision": (every.get("model") or {}).get("precision"),
                        "every_frame": {"fps": every.get("fps"), "frames": every.get("frames"),
                                        "stages_p50_ms": {k: v["p50"] for k, v in every.get("stages_ms", {}).items()}},
                        "realtime": {"fps": live.get("fps"),
                                     "frames": live.get("frames"), "dropped": live.get("dropped"),
                                     "latency_ms": live.get("latency_ms"),
                                     "stages_p50_ms": {k: v["p50"] for k, v in live.get("stages_ms", {}).items()}}},
            "outputs": {"run": str(run), "artifacts": {k: str(v) for k, v in artifacts.items()},
                        "annotated_video": str(out / "annotated.mp4"),
                        "json_lines": [str(out / "run.jsonl"), str(out / "run_realtime.jsonl")],
                        "reports": [str(a / "report.md") for a in artifacts.values()],
                        "library_logs": os.environ.get("EDGETL_LOG_DIR", str(out / "logs"))},
            "steps": log, "total_seconds": round(t_total, 1)}


def print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=max(150, Console().width))
    acc = s["test_accuracy_float"]
    from .runtime.cpu import describe

    con.print(f"\n[bold]edgetl demo: ELPV solar cells, EfficientNet-Lite0[/bold]  (float test accuracy "
              f"{100 * acc:.2f}%, macro-F1 {s['test_macro_f1']:.3f}; {s['total_seconds'] / 60:.1f} min in all; "
              f"CPU: {describe(s.get('cpu'))})")
    t = Table(title="float vs INT8 on the held-out checkset (each target's own build on this CPU), and batch-1 "
                    "latency from a decoded frame to a label")
    for c in ("target", "runs as", "gate", "float %", "INT8 %", "drop", "agree %", "stable %", "margin",
              "INT8 ms", "eager ms", "vs eager"):
        t.add_column(c, justify="left" if c in ("target", "runs as") else "right", no_wrap=True)
    for r in s["targets"]:
        f = lambda v, k=1: "-" if v is None else f"{v:.{k}f}"  # noqa: E731
        pct = lambda v: f(100 * v, 2) if v is not None else "-"  # noqa: E731
        margin = min((r.get("margins") or {}).values(), default=None)
        t.add_row(r["target"], f"{r['precision']}, {weights_label(r)}",
                  "[green]passed[/green]" if r["deployable"] else "[red]FAILED[/red]",
                  pct(r["float_top1"]), pct(r["int8_top1"]), f(r["drop_points"], 2), pct(r["agreement"]),
                  pct(r.get("stability")), "-" if margin is None else f"{margin:+d} img", f(r["int8_p50_ms"], 2),
                  f(r["eager_p50_ms"], 2), f(r["speedup_vs_eager"], 1) + "x" if r["speedup_vs_eager"] else "-")
    con.print(t)
    con.print("gate: each target's own build, judged on this CPU (agreement with float >= 98 %, drop <= 1 point, "
              "stability = worst agreement on perturbed copies >= 97 %); margin = images to spare before the "
              "tightest threshold fails; the reference numerics (Q/DQ as float ops, any CPU): "
              + ", ".join(f"{r['target']} {'passed' if (r['reference_gate'] or {}).get('passed') else 'FAILED'}"
                          for r in s["targets"]), soft_wrap=True)
    rt = s["runtime"]
    ev, live = rt["every_frame"], rt["realtime"]
    lat = live.get("latency_ms") or {}
    con.print(f"runtime (edgetl run --headless, {rt['precision']}, 1280x720 conveyor video): every frame of the file "
              f"with the annotated video written {ev['fps']} FPS ({ev['frames']} frames; p50 ms per frame: "
              + ", ".join(f"{k} {v}" for k, v in ev["stages_p50_ms"].items())
              + f"); played as a live camera (--realtime, {live['frames']} frames, {live['dropped']} dropped): "
              f"capture->result latency p50 {lat.get('p50')} ms, p90 {lat.get('p90')} ms", soft_wrap=False)
    o = s["outputs"]
    con.print("outputs:\n  run             " + o["run"] + "\n  artifacts       " + ", ".join(o["artifacts"].values())
              + "\n  annotated video " + o["annotated_video"] + "\n  reports         " + ", ".join(o["reports"])
              + "\n  this summary    " + str(Path(o["annotated_video"]).with_name("summary.json"))
              + "\n  library logs    " + o.get("library_logs", "-") + "  (NNCF, ONNX Runtime, OpenVINO, PyTorch)")


def record_path(cpu: dict[str, Any]) -> Path | None:
    """``benchmarks/results/demo-<cpu class>.json`` in a source checkout (None in an installed package)."""
    from .runtime.cpu import class_slug

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    if not results.is_dir():
        return None
    return results / f"demo-{class_slug(str(cpu.get('isa_class', 'cpu')))}.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgetl.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the higher-accuracy fine-tuning recipe (slower)")
    ap.add_argument("--out", type=Path, default=Path("demo"), help="where everything goes (default: demo/)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--data", type=Path, help="an image folder (one sub-folder per class) instead of ELPV")
    ap.add_argument("--train", help="the `edgetl train` options instead of the recipe (one quoted string)")
    ap.add_argument("--compile", default="", help="extra options of every `edgetl compile` (one quoted string)")
    ap.add_argument("--bench", default="", help="extra options of every `edgetl bench` (one quoted string)")
    ap.add_argument("--no-record", action="store_true",
                    help="do not write benchmarks/results/demo-<CPU class>.json (the per-machine record)")
    ap.add_argument("--task", choices=("classify", "detect"), default="classify",
                    help="detect: the detection leg (conveyor scenes -> SSDLite -> INT8 -> tracked counts)")
    a = ap.parse_args(argv)
    out: Path = a.out
    # the libraries' own output of every step (NNCF, ONNX Runtime, OpenVINO, PyTorch: edgetl.logs) is
    # kept with the demo's outputs, not in the user's cache; the steps' terminal output is edgetl's own
    os.environ.setdefault("EDGETL_LOG_DIR", str((out / "logs").resolve()))
    if a.task == "detect":
        from .demo_detect import main_detect

        out.mkdir(parents=True, exist_ok=True)
        return main_detect(out, a.train, a.compile, a.bench, a.threads, record=not a.no_record)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log: list[dict] = []
    data = a.data or out / "data" / "elpv"
    run = out / "runs" / ("elpv-lite0-full" if a.full else "elpv-lite0")
    if a.data is None and not (data / "elpv_meta.csv").exists():
        step("1. the ELPV dataset as an image folder", ["data", "elpv", str(data), "--task", "binary", "--overwrite"], log)
    recipe = shlex.split(a.train) if a.train else ["--backbone", "efficientnet_lite0", *(FULL if a.full else QUICK)]
    step("2. fine-tune EfficientNet-Lite0 (ImageNet weights)" if not a.train else "2. train",
         ["train", str(data), *recipe, "--out", str(run), "--overwrite"], log)
    artifacts = {}
    for i, target in enumerate(TARGETS):
        art = out / "artifacts" / f"elpv-{target}"
        step(f"3.{i + 1} compile INT8 for {target} (repaired and gated on the target's own build)",
             ["compile", str(run), "--target", target, "--out", str(art), "--overwrite",
              *(["--method", "qat"] if a.full else QUICK_COMPILE), *shlex.split(a.compile)], log, ok=(0, GATE_FAILED))
        artifacts[target] = art
    video = out / "conveyor.mp4"
    step("4. a 1280x720 conveyor video of held-out test cells", ["data", "conveyor", str(run), str(video)], log)
    with open(out / "run.jsonl", "w") as fh:
        step("5.1 the device runtime on the video: every frame, annotated video saved (throughput)",
             ["run", str(artifacts[TARGETS[0]]), "--source", str(video), "--headless", "--save",
              str(out / "annotated.mp4"), "--summary-json", str(out / "run_summary.json")], log, stdout=fh)
    with open(out / "run_realtime.jsonl", "w") as fh:
        step("5.2 the device runtime on the video played as a live camera (latency)",
             ["run", str(artifacts[TARGETS[0]]), "--source", str(video), "--headless", "--realtime",
              "--summary-json", str(out / "run_realtime_summary.json")], log, stdout=fh)
    for i, (target, art) in enumerate(artifacts.items()):
        rows = [] if i == 0 else ["--backends", BENCH_ROWS.get(target, "")] if BENCH_ROWS.get(target) else []
        step(f"6. benchmark {target} side by side with PyTorch eager and float backends",
             ["bench", str(art), "--run", str(run), "--threads", str(a.threads), *rows, *BENCH, *shlex.split(a.bench)],
             log)
    s = summarize(out, run, artifacts, log, time.perf_counter() - t0)
    (out / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    print_summary(s)
    record = None if (a.no_record or a.data or a.train) else record_path(s["cpu"])
    if record is not None:
        record.write_text(json.dumps({**s, "recipe": "full" if a.full else "quick"}, indent=2) + "\n")
        print(f"record of this machine's run: {record}")
    failed = [r["target"] for r in s["targets"] if not r["deployable"]]
    if failed:
        print(f"\ndemo: the INT8 artifact for {', '.join(failed)} missed its accuracy gate and is marked not "
              "deployable (see its report.md); `make demo FULL=1` runs the fine-tune + QAT recipe", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
