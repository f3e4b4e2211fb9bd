"""The detection leg of the demo (``make demo TASK=detect``): cells on a conveyor, found, counted.

Every step is a real ``edgetl`` command, printed before it runs: compose conveyor scenes from real
ELPV cells (``edgetl data scenes``: training scenes from training cells only; the video and test
scenes from held-out cells), fine-tune an SSDLite detector on EfficientNet-Lite0, compile INT8 for
both x86 targets (gated on mAP@0.5 drop and detection agreement on each target's own build), run the
device runtime on the conveyor video with tracking and a counting line, score the counts against the
video's ground truth (``edgetl.detect.counting``), benchmark, and print a summary read back from the
artifacts' manifests, ``bench.json`` and the run's JSON lines.

    python -m edgetl.demo --task detect [--out demo]
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from .demo import GATE_FAILED, record_path, step, weights_label

TARGETS = ("x86-cpu-openvino", "x86-cpu-onnxruntime")
# The quick recipe: 300 training scenes, fine-tuned 8 epochs at 320x320 (see benchmarks/results/
# demo-detect-*.json for what it reaches); the scenes' own val/test splits are used as given.
QUICK = ["--backbone", "efficientnet_lite0", "--mode", "fine-tune", "--epochs", "8", "--batch-size", "16"]
BENCH = ["--reps", "40"]


def _ladder_row(x: dict[str, Any]) -> dict[str, Any]:
    """One ladder step of the manifest, its fallback rounds without the layer names (counted)."""
    rounds = [{k: r.get(k) for k in ("round", "passed", "drop", "agreement", "seconds")} | {
        "float_layers": len(r.get("float_layers") or [])} for r in x.get("rounds") or []]
    return {k: x.get(k) for k in ("step", "passed", "drop", "agreement", "seconds", "kept")} | {"rounds": rounds}


def _gate_row(target: str, art: Path) -> dict[str, Any]:
    m = json.loads((art / "manifest.json").read_text())
    backend = (m.get("target") or {}).get("backend")
    build = next((b for b in m.get("builds") or [] if b.get("backend") == backend), {})
    g = build.get("gate") or m.get("gate") or {}
    ref = m.get("gate") or {}
    q = m.get("quantization") or {}
    bench = json.loads((art / "bench.json").read_text()) if (art / "bench.json").exists() else {}
    return {"target": target, "artifact": str(art), "backend": backend, "precision": build.get("precision"),
            "deployable": bool(ref.get("deployable", g.get("passed"))), "decided_by": ref.get("decided_by"),
            "float_map50": g.get("float_map50"), "int8_map50": g.get("quant_map50"), "float_map": g.get("float_map"),
            "int8_map": g.get("quant_map"), "drop_points": g.get("drop"), "drop_ci": g.get("drop_ci"),
            "agreement": g.get("agreement"), "n_checkset": g.get("n"), "per_class": g.get("per_class"),
            "kept_step": next((x["step"] for x in q.get("ladder") or [] if x.get("kept")), None),
            "weight_bits": q.get("weight_bits"), "float_layers": q.get("float_layers"),
            "ladder": [_ladder_row(x) for x in q.get("ladder") or []], "verdict": q.get("verdict"),
            "reference_gate": {k: ref.get(k) for k in ("passed", "drop", "agreement")},
            "bench": {k: bench.get(k) for k in ("rows", "speedups", "machine") if k in bench}}


def summarize(out: Path, run: Path, artifacts: dict[str, Path], scenes: Path, log: list, t_total: float) -> dict:
    from .detect.counting import score_counts
    from .runtime.cpu import host_cpu

    run_m = json.loads((run / "manifest.json").read_text())
    metrics = run_m["training"].get("metrics", {})
    live = json.loads((out / "run_detect_summary.json").read_text())
    counts = score_counts(out / "run_detect.jsonl", scenes / "conveyor_gt.json")
    return {"task": "detection", "run": str(run), "float_test": metrics.get("test"), "float_val": metrics.get("val"),
            "cpu": host_cpu().to_dict(), "targets": [_gate_row(t, a) for t, a in artifacts.items()],
            "counting": counts,
            "runtime": {"artifact": str(artifacts[TARGETS[0]]), "fps": live.get("fps"), "frames": live.get("frames"),
                        "precision": (live.get("model") or {}).get("precision"),
                        "stages_p50_ms": {k: v["p50"] for k, v in live.get("stages_ms", {}).items()},
                        "line_counts": live.get("line_counts"),
                        "crossings_low_confidence": live.get("crossings_low_confidence")},
            "outputs": {"scenes": str(scenes), "run": str(run), "artifacts": {k: str(v) for k, v in artifacts.items()},
                        "annotated_video": str(out / "annotated_detect.mp4"),
                        "json_lines": str(out / "run_detect.jsonl")},
            "steps": log, "total_seconds": round(t_total, 1)}


def print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from .runtime.cpu import describe

    con = Console(width=max(150, Console().width))
    ft = s.get("float_test") or {}
    con.print(f"\n[bold]edgetl demo (detection): ELPV cells on a conveyor, SSDLite + EfficientNet-Lite0[/bold] "
              f"(float test mAP@0.5 {100 * (ft.get('map50') or 0):.1f}, mAP@0.5:0.95 {100 * (ft.get('map') or 0):.1f}"
              + (f", cells found (every class as one) mAP@0.5 {100 * ft['objects_map50']:.1f}"
                 if ft.get("objects_map50") is not None else "") + "; "
              f"{s['total_seconds'] / 60:.1f} min in all; CPU: {describe(s.get('cpu'))})")
    t = Table(title="float vs INT8 on the held-out scenes (each target's own build on this CPU)")
    for c in ("target", "runs as", "gate", "float mAP50", "INT8 mAP50", "drop", "agreement F1", "kept step"):
        t.add_column(c, justify="left" if c in ("target", "runs as", "kept step") else "right", no_wrap=True)
    for r in s["targets"]:
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        t.add_row(r["target"], f"{r['precision']}, {weights_label(r)}",
                  "[green]passed[/green]" if r["deployable"] else "[red]FAILED[/red]", pct(r["float_map50"]),
                  pct(r["int8_map50"]), "-" if r["drop_points"] is None else f"{r['drop_points']:.2f}",
                  "-" if r["agreement"] is None else f"{r['agreement']:.3f}", str(r.get("kept_step")))
    con.print(t)
    c, rt = s["counting"], s["runtime"]
    con.print(f"counting (edgetl run --count-line on the conveyor video, {rt['frames']} frames at {rt['fps']} FPS, "
              f"{rt['precision']}): {c['counted']} of {c['objects']} cells counted once "
              f"({100 * c['counted_fraction']:.1f} %), {c['missed']} missed, {c['extra']} extra counts"
              + (f" ({rt['crossings_low_confidence']} low-confidence crossings not counted)"
                 if rt.get("crossings_low_confidence") else "") + "; class right "
              f"for {c['class_correct']} of {c['counted']}; per class "
              + ", ".join(f"{k} {v['counted']}/{v['objects']}" for k, v in c["per_class"].items()), soft_wrap=True)
    o = s["outputs"]
    con.print("outputs:\n  scenes          " + o["scenes"] + "\n  run             " + o["run"]
              + "\n  artifacts       " + ", ".join(o["artifacts"].values())
              + "\n  annotated video " + o["annotated_video"])


def _train(scenes: Path, run: Path, train: str | None, log: list) -> None:
    step("2. fine-tune an SSDLite detector on EfficientNet-Lite0 (ImageNet weights)",
         ["train", str(scenes), "--task", "detect", *(shlex.split(train) if train else QUICK), "--out", str(run),
          "--overwrite"], log)


def main_detect(out: Path, train: str | None = None, compile_opts: str = "", bench: str = "", threads: int = 2,
                record: bool = True, reuse_run: bool = False, reuse_artifacts: bool = False) -> int:
    """The detection leg; ``reuse_run``: keep a run already trained in ``out`` by this recipe (the
    compile, runtime and bench steps re-measured on the same model); ``reuse_artifacts``: also keep
    artifacts already compiled there from that run by the same `edgetl compile` command (the
    runtime and bench steps re-measured). Either is said so in the summary's steps."""
    t0 = time.perf_counter()
    log: list[dict] = []
    scenes = out / "data" / "cells"
    if not (scenes / "scenes.json").exists():
        step("1. conveyor scenes of real ELPV cells (COCO + a counted video)", ["data", "scenes", str(scenes)], log)
    run = out / "runs" / "cells-lite0"
    if reuse_run and (run / "manifest.json").exists():
        log.append({"step": "2. fine-tune (skipped: the run already trained in this folder is reused)", "run": str(run)})
        print(f"\n2. reusing the trained run {run}", flush=True)
    else:
        _train(scenes, run, train, log)
    artifacts = {}
    for i, target in enumerate(TARGETS):
        art = out / "artifacts" / f"cells-{target}"
        artifacts[target] = art
        if reuse_artifacts and (art / "manifest.json").exists():
            log.append({"step": f"3.{i + 1} compile for {target} (skipped: the artifact compiled from this run by "
                                f"`edgetl compile {run} --target {target}` is reused)", "artifact": str(art)})
            continue
        step(f"3.{i + 1} compile INT8 for {target} (gated on mAP and detection agreement on the target's build)",
             ["compile", str(run), "--target", target, "--out", str(art), "--overwrite", *shlex.split(compile_opts)],
             log, ok=(0, GATE_FAILED))
    line = json.loads((scenes / "conveyor_gt.json").read_text())["line"]
    with open(out / "run_detect.jsonl", "w") as fh:
        step("4. the device runtime on the conveyor video: track, count cells crossing the line, save the video",
             ["run", str(artifacts[TARGETS[0]]), "--source", str(scenes / "conveyor.mp4"), "--headless",
              "--count-line", ",".join(str(int(v)) for v in line), "--save", str(out / "annotated_detect.mp4"),
              "--summary-json", str(out / "run_detect_summary.json")], log, stdout=fh)
    for target, art in artifacts.items():
        step(f"5. benchmark {target} side by side", ["bench", str(art), "--run", str(run), "--threads", str(threads),
                                                     *BENCH, *shlex.split(bench)], log)
    s = summarize(out, run, artifacts, scenes, log, time.perf_counter() - t0)
    (out / "summary_detect.json").write_text(json.dumps(s, indent=2, default=float) + "\n")
    print_summary(s)
    path = record_path(s["cpu"]) if record and not train else None
    if path is not None:
        path = path.with_name(path.name.replace("demo-", "demo-detect-"))
        path.write_text(json.dumps(s, indent=2, default=float) + "\n")
        print(f"record of this machine's run: {path}")
    failed = [r["target"] for r in s["targets"] if not r["deployable"]]
    if failed:
        print(f"\ndemo: the INT8 detector for {', '.join(failed)} missed its gate and is marked not deployable "
              "(see its report.md)", file=sys.stderr)
        return 1
    return 0
