"""Domain shift on real data: ELPV monocrystalline vs polycrystalline cells, before and after ``edgetl adapt``.

    nice -n 10 .venv/bin/python benchmarks/elpv_domain.py --work /work/scratch/cv/domain
    nice -n 10 .venv/bin/python benchmarks/elpv_domain.py --directions mono:poly --epochs 5

Per direction SOURCE:TARGET (default both):
1. ``edgetl train SOURCE.csv`` (the SOURCE cells only; its own stratified 70/15/15 split), recipe
   ``RECIPE`` below (EfficientNet-Lite0, ImageNet weights, full fine-tune, so BatchNorm statistics
   are the source domain's);
2. the TARGET cells split once, stratified (seed 0), into an unlabelled adaptation pool (half) and a
   labelled target test set (the other half), on which every row below is measured (``edgetl eval``);
3. rows: the source run as is; ``edgetl adapt --images POOL`` (AdaBN: BatchNorm statistics only, no
   labels); ``--labels FEW`` (``--few`` labelled pool cells per class: AdaBN then the head fine-tuned);
   the same without AdaBN (``--no-bn-stats``: the head alone); and ``--unfreeze top`` (AdaBN, head +
   top layer group). Also per row: the source run's in-domain test accuracy (manifest metrics).

Prints a table and writes ``benchmarks/results/elpv_domain_<CPU class>.json`` (``--json``); the CPU
class (``edgetl.runtime.cpu``), the CPU model and the load average are recorded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EDGETL = [sys.executable, "-m", "edgetl.cli"]

# fine-tune recipe (the demo's quick one, with fewer epochs: 2 shared cores); --epochs overrides
RECIPE = ["--backbone", "efficientnet_lite0", "--pretrained", "imagenet", "--mode", "fine-tune", "--resize", "stretch",
          "--lr", "1e-3", "--backbone-lr-factor", "0.3", "--aug-vflip", "0.5", "--aug-scale", "0.7", "--aug-rotate", "5"]


def machine() -> dict:
    from edgetl.runtime.cpu import host_cpu

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
    field = lambda k: next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()  # noqa: E731
                            if line.startswith(k + ":")), "")
    import torch

    zen3 = field("Vendor ID") == "AuthenticAMD" and field("CPU family") == "25" and field("Model") in ("1", "8")
    return {"cpu": host_cpu().to_dict(), "lscpu_model": field("Model name"), "family": field("CPU family"),
            "model": field("Model"), "cores": os.cpu_count(),
            "note": "AMD family 25 model 1 = Zen 3 (Milan): AVX2, no AVX-512, no VNNI" if zen3 else "",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__,
            "loadavg_start": os.getloadavg()}


def sh(argv: list[str], log: Path) -> float:
    """Run one edgetl command (printed), its output to ``log``; raise on failure; seconds taken."""
    print("$ edgetl " + shlex.join(argv), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ edgetl " + shlex.join(argv) + "\n")
        fh.flush()
        rc = subprocess.run(EDGETL + argv, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if rc != 0:
        raise SystemExit(f"failed (rc {rc}): edgetl {shlex.join(argv)}; see {log}")
    return round(time.perf_counter() - t0, 1)


def ensure_data(data: Path) -> list[dict]:
    if not (data / "elpv_meta.csv").is_file():
        from edgetl.datasets import write_elpv

        print(f"data: edgetl data elpv {data} (binary)", flush=True)
        write_elpv(data, "binary")
    rows = list(csv.DictReader((data / "elpv_meta.csv").open()))
    for r in rows:
        r["path"] = str((data / r["path"]).resolve())
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "cell_type"])
        w.writerows([r["path"], r["label"], r["cell_type"]] for r in rows)
    return path


def split_target(rows: list[dict], few: int, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(adaptation pool, target test, few labelled from the pool): stratified halves, seeded."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool, test, labelled = [], [], []
    for label in sorted({r["label"] for r in rows}):
        cls = sorted((r for r in rows if r["label"] == label), key=lambda r: r["path"])
        order = rng.permutation(len(cls))
        half = len(cls) // 2
        pool += [cls[i] for i in order[:half]]
        test += [cls[i] for i in order[half:]]
        labelled += [cls[i] for i in order[:few]]
    return pool, test, labelled


def evaluate(run: Path, test_csv: Path, log: Path) -> dict:
    from edgetl.train import evaluate_run

    m = evaluate_run(run, test_csv, workers=0)["metrics"]  # the device training used (auto)
    with open(log, "a") as fh:
        fh.write(f"eval {run} on {test_csv}: accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f}\n")
    return {"accuracy": round(m["accuracy"], 4), "macro_f1": round(m["macro_f1"], 4), "n": m["n"],
            "per_class_recall": {k: round(v, 4) for k, v in m["per_class_recall"].items()}}


def direction(src: str, dst: str, rows: list[dict], work: Path, epochs: int, few: int, log: Path,
              backbone: list[str]) -> dict:
    d = work / f"{src}-to-{dst}"
    d.mkdir(parents=True, exist_ok=True)
    src_csv = write_csv(d / f"{src}.csv", [r for r in rows if r["cell_type"] == src])
    pool, test, labelled = split_target([r for r in rows if r["cell_type"] == dst], few)
    test_csv, few_csv = write_csv(d / f"{dst}_test.csv", test), write_csv(d / f"{dst}_few.csv", labelled)
    images = d / f"{dst}_pool"
    if not images.is_dir():
        images.mkdir()
        for r in pool:
            shutil.copyfile(r["path"], images / Path(r["path"]).name)
    run = d / f"src-{src}"
    out = {"source": src, "target": dst, "n_source": sum(r["cell_type"] == src for r in rows), "n_pool": len(pool),
           "n_target_test": len(test), "n_few": len(labelled), "rows": {}}
    recipe = [*backbone, *RECIPE[4:]] if backbone else RECIPE
    train_cmd = ["train", str(src_csv), *recipe, "--epochs", str(epochs), "--out", str(run), "--overwrite"]
    out["train_s"] = sh(train_cmd, log)
    out["train_command"] = "edgetl " + shlex.join(train_cmd)
    src_test = json.loads((run / "manifest.json").read_text())["training"]["metrics"]["test"]
    out["source_in_domain_test"] = {"accuracy": round(src_test["accuracy"], 4), "macro_f1": round(src_test["macro_f1"], 4),
                                    "n": src_test["n"]}
    out["rows"]["source run, no adaptation"] = {"command": None, **evaluate(run, test_csv, log)}
    variants = {
        "AdaBN (BN statistics, unlabelled)": [],
        f"AdaBN + head on {few}/class labels": ["--labels", str(few_csv), "--epochs", "20"],
        f"head only on {few}/class labels (no AdaBN)": ["--labels", str(few_csv), "--epochs", "20", "--no-bn-stats"],
        f"AdaBN + head + top group on {few}/class": ["--labels", str(few_csv), "--epochs", "20", "--unfreeze", "top"],
    }
    for i, (name, extra) in enumerate(variants.items()):
        adapted = d / f"adapted-{i}"
        cmd = ["adapt", str(run), "--images", str(images), "--out", str(adapted), "--overwrite", *extra]
        secs = sh(cmd, log)
        rec = json.loads((adapted / "manifest.json").read_text())["training"]["adaptation"]
        out["rows"][name] = {"command": "edgetl " + shlex.join(cmd), "seconds": secs, "method": rec["method"],
                             "adapt_s": rec["time_s"], **evaluate(adapted, test_csv, log)}
        print(f"  {name}: {out['rows'][name]['accuracy']:.4f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    from edgetl.runtime.cpu import host_cpu

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/work/scratch/cv/domain"))
    ap.add_argument("--data", type=Path, help="an ELPV binary folder (default: WORK/data, written once)")
    ap.add_argument("--directions", default="mono:poly,poly:mono")
    ap.add_argument("--epochs", type=int, default=5, help="source fine-tuning epochs (default 5)")
    ap.add_argument("--few", type=int, default=20, help="labelled target cells per class (default 20)")
    ap.add_argument("--backbone", help="smoke runs only: another backbone (e.g. tiny_cnn with --pretrained none)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    log = a.work / "elpv_domain.log"
    rows = ensure_data(a.data or a.work / "data")
    backbone = ["--backbone", a.backbone, "--pretrained", "none"] if a.backbone else []
    t0 = time.time()
    recipe = [*backbone, *RECIPE[4:]] if backbone else RECIPE
    result = {"benchmark": "elpv_domain", "machine": machine(), "recipe": "edgetl train " + shlex.join(recipe),
              "epochs": a.epochs, "few_per_class": a.few, "directions": []}
    slug = host_cpu().slug
    slug += "-" + re.sub(r"[^a-z0-9]+", "-", result["machine"]["gpu"].lower()).strip("-") if result["machine"]["gpu"] else ""
    out = a.json or ROOT / "benchmarks" / "results" / f"elpv_domain_{slug}.json"
    for pair in a.directions.split(","):  # the JSON is written after each direction (a long run keeps what it has)
        src, dst = pair.split(":")
        result["directions"].append(direction(src, dst, rows, a.work, a.epochs, a.few, log, backbone))
        result["machine"]["loadavg_end"] = os.getloadavg()
        result["total_s"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nCPU: {host_cpu().short}; recipe: {result['recipe']} --epochs {a.epochs}")
    for d in result["directions"]:
        s = d["source_in_domain_test"]
        print(f"\n{d['source']} -> {d['target']}: source in-domain test accuracy {s['accuracy']:.4f} (n={s['n']}); "
              f"target test n={d['n_target_test']}, unlabelled pool {d['n_pool']}")
        print(f"  {'':46}{'accuracy':>10}{'macro-F1':>10}{'recall defective':>18}")
        for name, r in d["rows"].items():
            print(f"  {name:<46}{r['accuracy']:>10.4f}{r['macro_f1']:>10.4f}{r['per_class_recall']['defective']:>18.4f}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
