"""Detection on real data, end to end: tree crowns (human-labelled) and conveyor cells (real cells,
synthetic layout). Each step is a real ``edgetl`` command (a child process), printed as it runs.

    nice -n 10 .venv/bin/python benchmarks/detection.py trees --epochs 40      # the record: both x86 gates pass (24 min on 2 cores)
    nice -n 10 .venv/bin/python benchmarks/detection.py cells --epochs 15

``trees``: ``edgetl data trees`` (deepforest's 4 NEON aerial images, 951 hand-drawn crowns, one class)
-> ``edgetl train --task detect --tile 200`` (regions of 800 px held out whole) -> ``edgetl eval``
-> ``edgetl compile`` for x86-cpu-openvino and x86-cpu-onnxruntime (each gated on its own build).

``cells``: ``edgetl data scenes`` -> train -> eval (per-class AP, class-agnostic mAP, the class accuracy
of found boxes) -> compile for both targets -> ``edgetl run --count-line`` on the conveyor video, the
crossings scored against its ground truth (``edgetl.detect.counting``).

Prints a table and writes ``benchmarks/results/detection_<set>_<CPU class>.json`` (``--json`` to
choose). The CPU class is named in both: INT8 numerics and speed differ between classes.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EDGETL = [sys.executable, "-m", "edgetl.cli"]
TARGETS = ("x86-cpu-openvino", "x86-cpu-onnxruntime")
RECIPES = {  # data-specific training options (on top of --epochs)
    # tiles of 200 px stretched to the 320 px input: crowns (median 40 px in the images) become ~64 px,
    # the SSDLite head's smallest anchor (0.2 x 320); at 400 px tiles they were half of it and val
    # mAP@0.5 stayed below 0.01 for 3 epochs
    "trees": ["--tile", "200", "--batch-size", "16", "--backbone", "efficientnet_lite0", "--mode", "fine-tune"],
    "cells": ["--batch-size", "16", "--backbone", "efficientnet_lite0", "--mode", "fine-tune"],
}


def edgetl(args: list[str], log: list[dict], stdout=None, ok=(0,)) -> int:
    print(f"\n$ edgetl {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(EDGETL + args, stdout=stdout).returncode
    log.append({"command": "edgetl " + shlex.join(args), "seconds": round(time.perf_counter() - t0, 1), "exit": rc})
    if rc not in ok:
        raise SystemExit(f"benchmark: `edgetl {shlex.join(args)}` failed (exit {rc})")
    return rc


def gate_of(art: Path) -> dict:
    m = json.loads((art / "manifest.json").read_text())
    backend = (m.get("target") or {}).get("backend")
    build = next((b for b in m.get("builds") or [] if b.get("backend") == backend), {})
    g = build.get("gate") or {}
    keys = ("passed", "float_map50", "quant_map50", "float_map", "quant_map", "drop", "drop_ci", "agreement",
            "agreement_ci", "n", "n_gt", "numerics", "score_threshold")
    q = m.get("quantization") or {}
    return {"deployed": {k: g.get(k) for k in keys}, "reference": {k: (m.get("gate") or {}).get(k) for k in keys},
            "precision": build.get("precision"), "kept_step": next((x["step"] for x in q.get("ladder") or []
                                                                     if x.get("kept")), None),
            "ladder": q.get("ladder"), "weight_bits": q.get("weight_bits")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("set", choices=sorted(RECIPES))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgetl-detection-bench"))
    ap.add_argument("--train", default="", help="extra `edgetl train` options (one quoted string)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reuse-run", action="store_true",
                    help="keep the run already trained in --work by this recipe (re-measure eval, compile, run)")
    a = ap.parse_args(argv)
    from edgetl.runtime.cpu import describe, host_cpu

    cpu = host_cpu().to_dict()
    work = a.work / a.set
    work.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    data, run = work / "data", work / "run"
    if not data.exists():
        edgetl(["data", "trees" if a.set == "trees" else "scenes", str(data)], log)
    if a.reuse_run and (run / "manifest.json").exists():
        log.append({"command": f"(edgetl train skipped: --reuse-run keeps {run})", "seconds": 0, "exit": 0})
    else:
        edgetl(["train", str(data), "--task", "detect", *RECIPES[a.set], "--epochs", str(a.epochs),
                *shlex.split(a.train), "--out", str(run), "--overwrite"], log)
    with open(work / "eval.json", "w") as fh:
        edgetl(["eval", str(run), "--split", "test", "--json"], log, stdout=fh)
    result = {"set": a.set, "cpu": cpu, "epochs": a.epochs, "recipe": RECIPES[a.set] + shlex.split(a.train),
              "float_test": json.loads((work / "eval.json").read_text()), "targets": {}, "steps": log}
    for target in TARGETS:
        art = work / f"art-{target}"
        edgetl(["compile", str(run), "--target", target, "--out", str(art), "--overwrite"], log, ok=(0, 1))
        result["targets"][target] = gate_of(art)
    if a.set == "cells":
        from edgetl.detect.counting import score_counts

        line = json.loads((data / "conveyor_gt.json").read_text())["line"]
        with open(work / "run.jsonl", "w") as fh:
            edgetl(["run", str(work / f"art-{TARGETS[0]}"), "--source", str(data / "conveyor.mp4"), "--headless",
                    "--count-line", ",".join(str(int(v)) for v in line), "--summary-json", str(work / "run.json")],
                   log, stdout=fh)
        result["counting"] = score_counts(work / "run.jsonl", data / "conveyor_gt.json")
        result["runtime"] = {k: json.loads((work / "run.json").read_text()).get(k)
                             for k in ("fps", "frames", "stages_ms", "count_confidence", "crossings_low_confidence")}
    ft = result["float_test"]
    print(f"\n{a.set}: float test mAP@0.5 {100 * ft['map50']:.2f}, mAP@0.5:0.95 {100 * ft['map']:.2f} "
          f"({ft['n_images']} images, {ft['n_gt']} boxes; CPU {describe(cpu)})")
    print(f"{'target':<22}{'gate':<8}{'float mAP50':>12}{'INT8 mAP50':>12}{'drop':>8}{'agreement':>11}  kept step")
    for t, r in result["targets"].items():
        g = r["deployed"]
        print(f"{t:<22}{'passed' if g['passed'] else 'FAILED':<8}{100 * (g['float_map50'] or 0):>12.2f}"
              f"{100 * (g['quant_map50'] or 0):>12.2f}{g['drop'] or 0:>8.2f}{g['agreement'] or 0:>11.3f}  {r['kept_step']}")
    if "counting" in result:
        c = result["counting"]
        print(f"counting: {c['counted']}/{c['objects']} counted once, {c['missed']} missed, {c['extra']} extra, class "
              f"right {c['class_correct']}/{c['counted']}; runtime {result['runtime']['fps']} FPS")
    slug = re.sub(r"[^a-z0-9]+", "-", str(cpu.get("isa_class", "cpu")).lower()).strip("-")
    out = a.json or ROOT / "benchmarks" / "results" / f"detection_{a.set}_{slug}.json"
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
