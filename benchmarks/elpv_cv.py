"""5-fold cross-validation of a cheap recipe on ELPV (binary), with mean ± std and per cell type.

    nice -n 10 .venv/bin/python benchmarks/elpv_cv.py --work /work/scratch/cv/cvbench

The recipe (``RECIPE``): EfficientNet-Lite0 with ImageNet weights, ``--mode feature-extract`` with
cached features (the frozen backbone runs once per fold over that fold's images; a linear head
trains on the features, 30 epochs, early stopping on validation macro-F1), the backbone's own
preprocessing (224 px, shorter side + centre crop), no augmentation. DATA is ``elpv_meta.csv`` of
``edgetl data elpv`` (all 2,624 cells), so the fold CSVs carry ``cell_type`` and each fold's test
part is also measured per cell type (``edgetl eval FOLD --by cell_type``). Folds are stratified by
class (no groups: ELPV has one image per cell). The same as, once ``--cv`` is wired into train:

    edgetl train data/elpv/elpv_meta.csv --backbone efficientnet_lite0 --mode feature-extract --cv 5 --out OUT

Prints the table and writes ``benchmarks/results/elpv_cv_<CPU class>.json`` (``--json``), with the
CPU class, CPU model and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.elpv_domain import ensure_data, machine  # noqa: E402

RECIPE = dict(backbone="efficientnet_lite0", pretrained="imagenet", mode="feature-extract", cache=True)


def per_type(folds_dir: Path, k: int) -> dict:
    """Each fold's test part by cell type; mean ± std over folds per type."""
    import numpy as np

    from edgetl.adapt import evaluate_by

    by_fold = []
    for i in range(1, k + 1):
        res = evaluate_by(folds_dir / f"fold-{i}", None, "cell_type", device="cpu", workers=0)
        by_fold.append({t: {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
                        for t, m in res["domains"].items()})
    out = {"folds": by_fold}
    for t in sorted(by_fold[0]):
        acc = np.array([f[t]["accuracy"] for f in by_fold])
        f1 = np.array([f[t]["macro_f1"] for f in by_fold])
        out[t] = {"n": int(sum(f[t]["n"] for f in by_fold)), "accuracy_mean": float(acc.mean()),
                  "accuracy_std": float(acc.std(ddof=1)), "macro_f1_mean": float(f1.mean()),
                  "macro_f1_std": float(f1.std(ddof=1))}
    return out


def main(argv: list[str] | None = None) -> int:
    from edgetl.cv import cross_validate
    from edgetl.runtime.cpu import host_cpu
    from edgetl.train import Reporter, TrainConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/work/scratch/cv/cvbench"))
    ap.add_argument("--data", type=Path, help="an ELPV binary folder (default: WORK/data, written once)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--epochs", type=int, help="head epochs (default: the feature-extract default, 30)")
    ap.add_argument("--no-by-type", action="store_true", help="skip the per-cell-type evaluation of each fold")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    data = a.data or a.work / "data"
    ensure_data(data)
    meta = data / "elpv_meta.csv"
    cfg = TrainConfig(data=str(meta), out=str(a.work / "cv"), device="cpu", epochs=a.epochs, **RECIPE)
    host = machine()  # the load average before the work
    t0 = time.time()
    cv = cross_validate(cfg, a.k, None, False, a.work / "cv", reporter=Reporter())
    cv_s = time.time() - t0
    types = None if a.no_by_type else per_type(a.work / "cv", a.k)
    cmd = (f"edgetl train {meta} --backbone efficientnet_lite0 --pretrained imagenet --mode feature-extract"
           + (f" --epochs {a.epochs}" if a.epochs else "") + f" --cv {a.k} --out {a.work / 'cv'}")
    result = {"benchmark": "elpv_cv", "machine": {**host, "loadavg_end": os.getloadavg()}, "command": cmd,
              "recipe": cv["recipe_text"], "k": a.k, "folding": cv["folding"], "std": cv["std"],
              "accuracy": cv["accuracy"], "macro_f1": cv["macro_f1"], "pooled": cv["pooled"],
              "folds": [{k: v for k, v in f.items() if k != "confusion"} for f in cv["folds"]],
              "per_cell_type": types, "cv_s": round(cv_s, 1), "total_s": round(time.time() - t0, 1)}
    print(f"\nCPU: {host_cpu().short}; {cmd}")
    print(f"accuracy {cv['accuracy']['mean']:.4f} ± {cv['accuracy']['std']:.4f}, "
          f"macro-F1 {cv['macro_f1']['mean']:.4f} ± {cv['macro_f1']['std']:.4f} (sample std over {a.k} folds)")
    if types:
        for t in ("mono", "poly"):
            if t in types:
                r = types[t]
                print(f"  {t}: n={r['n']}, accuracy {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}, "
                      f"macro-F1 {r['macro_f1_mean']:.4f} ± {r['macro_f1_std']:.4f}")
    slug = host_cpu().slug
    out = a.json or ROOT / "benchmarks" / "results" / f"elpv_cv_{slug}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
