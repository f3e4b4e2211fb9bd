"""Fine-tuning on real data: ELPV (binary) with EfficientNet-Lite0 at 224 px (or another backbone).

    nice -n 10 .venv/bin/python benchmarks/train_elpv.py                       # all three parts
    nice -n 10 .venv/bin/python benchmarks/train_elpv.py --parts feature-extract,fine-tune-speed
    nice -n 10 .venv/bin/python benchmarks/train_elpv.py --parts best --backbone efficientnet_lite1  # at its 240 px

Parts (each one ``edgetl train`` child process, measured from outside):
1. ``feature-extract``: end to end (validate + decode 2,624 images, features once, head training,
   test evaluation, run folder): wall time and the child's peak RSS (``os.wait4`` rusage).
   Targets: <= 3 min, <= 4 GB.
2. ``fine-tune-speed``: one epoch of full fine-tuning (augmentation on, DataLoader workers):
   training images/s.
3. ``best``: the best recipe found for Lite0 (``BEST_RECIPE`` below): test accuracy and macro-F1 on
   the held-out 15 % test split (reference: fine-tuned VGG-19, 88.4 %, Deitsch et al. 2019).

Data: ``edgetl data elpv`` (binary) into ``--work``/data once. Prints a table, writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edgetl.demo import FULL as DEMO_FULL  # noqa: E402
EDGETL = [sys.executable, "-m", "edgetl.cli"]

COMMON = ["--pretrained", "imagenet", "--overwrite"]
PARTS = {
    "feature-extract": ["--mode", "feature-extract"],
    "fine-tune-speed": ["--mode", "fine-tune", "--epochs", "1"],
    # The best recipe found (docs/results.md), shared with `make demo FULL=1`: full fine-tune, the whole
    # 300x300 cell stretched to 224 (defects can sit at the border), flips both ways (cells are
    # symmetric), mild crop and rotation.
    "best": list(DEMO_FULL),
}


def run_child(argv: list[str], log_path: Path) -> dict:
    """Run one command; wall time and the child's own peak RSS (ru_maxrss, KiB on Linux)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def summarize(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    test = m["test"] or m["val"]
    hist = m["history"]
    ips = sorted(h["images_per_s"] for h in hist)
    return {"test_accuracy": round(test["accuracy"], 4), "test_macro_f1": round(test["macro_f1"], 4),
            "per_class_recall": {k: round(v, 4) for k, v in test["per_class_recall"].items()},
            "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"], "train_time_s": round(m["train_time_s"], 1),
            "train_images_per_s_median": round(ips[len(ips) // 2], 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "train_elpv")
    ap.add_argument("--data", type=Path, help="an existing ELPV binary folder (default: WORK/data)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    ap.add_argument("--json", type=Path, help="default: WORK/train_elpv.json")
    ap.add_argument("--backbone", default="efficientnet_lite0", help="any registered backbone (default: %(default)s)")
    ap.add_argument("--input-size", help="default: the backbone's native size (Lite0 224, Lite1 240, Lite2 260)")
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data or args.work / "data"
    if not (data / "elpv_meta.csv").is_file():
        print(f"data: edgetl data elpv {data} --task binary", flush=True)
        subprocess.run(EDGETL + ["data", "elpv", str(data), "--task", "binary", "--overwrite"], check=True, cwd=ROOT)

    import torch

    results = {"host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__, "cuda": torch.cuda.is_available()},
               "data": str(data), "backbone": args.backbone, "input_size": args.input_size or "native", "rows": {}}
    for part in parts:
        run = args.work / "runs" / part
        size = ["--input-size", args.input_size] if args.input_size else []
        argv = EDGETL + ["train", str(data), "--out", str(run), "--backbone", args.backbone, *size] + COMMON + PARTS[part]
        cmd = "edgetl " + shlex.join(argv[len(EDGETL):])
        print(f"[{part}] {cmd}", flush=True)
        meas = run_child(argv, args.work / f"{part}.log")
        row = {"command": cmd, **meas}
        if meas["rc"] == 0:
            row.update(summarize(run))
        else:
            print(f"[{part}] failed (rc {meas['rc']}); see {args.work / (part + '.log')}", flush=True)
        results["rows"][part] = row
        print(f"[{part}] {json.dumps({k: v for k, v in row.items() if k != 'command'})}", flush=True)

    out = args.json or args.work / "train_elpv.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(f"{'part':<18}{'wall s':>8}{'peak RSS MB':>13}{'train img/s':>13}{'test acc':>10}{'macro-F1':>10}{'best ep':>9}")
    for part, r in results["rows"].items():
        if r["rc"] != 0:
            print(f"{part:<18}  failed (rc {r['rc']})")
            continue
        print(f"{part:<18}{r['wall_s']:>8.1f}{r['peak_rss_mb']:>13.0f}{r['train_images_per_s_median']:>13.1f}"
              f"{r['test_accuracy']:>10.4f}{r['test_macro_f1']:>10.4f}{r['best_epoch']:>9}")
    print(f"\nwrote {out}")
    fe = results["rows"].get("feature-extract")
    if fe and fe["rc"] == 0:
        ok = fe["wall_s"] <= 180 and fe["peak_rss_mb"] <= 4096
        print(f"feature-extract targets (<= 180 s, <= 4096 MB): {'met' if ok else 'MISSED'}")
    return 0 if all(r["rc"] == 0 for r in results["rows"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
