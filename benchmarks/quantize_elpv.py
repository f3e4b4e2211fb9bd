"""Quantization on real data: ELPV (binary) with EfficientNet-Lite0, float vs PTQ vs QAT, side by side.

    nice -n 10 .venv/bin/python benchmarks/quantize_elpv.py                    # trains a run if needed
    nice -n 10 .venv/bin/python benchmarks/quantize_elpv.py --run runs/elpv   # an existing run

1. Data: ``edgetl data elpv`` (binary) into ``--work``/data (once).
2. Run: ``--run`` or, when absent, ``edgetl.train.train_run`` (feature-extract head on the frozen
   ImageNet Lite0, cached features) into ``--work``/run.
3. ``edgetl quantize`` (``quantize_run``) with ``--method ptq`` and ``--method qat``, each with
   ``all_forms`` so the other QDQ rendering (and NNCF's own QAT export) is kept and measured:
   test accuracy (the checkset = the run's held-out test split), agreement with float, the gate,
   quantization wall time.
4. The four range calibrators (PTQ, both QDQ forms) on the same prepared graph and calibration
   images: agreement, top-1 and logit MSE against float (accuracy only).
5. One interleaved batch-1 latency loop over every ONNX file (fp32 and each INT8 form) on ONNX
   Runtime (CPU EP) and OpenVINO (CPU, ``inference_precision=f32`` so non-INT8 layers run f32, not
   the bf16 this CPU would default to); medians, so the rows are comparable within this run.

Prints a table and writes JSON (``--json``). Goal: INT8 within 0.5 point of float, >= 98 % agreement.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ensure_run(work: Path, run: Path | None, log) -> Path:
    if run is not None:
        return run
    run = work / "run"
    if (run / "manifest.json").is_file():
        return run
    data = work / "data"
    if not (data / "elpv_meta.csv").is_file():
        from edgetl.datasets import write_elpv

        log(f"data: writing ELPV (binary) to {data}")
        write_elpv(data, task="binary", overwrite=True)
    from edgetl.train import train_run

    log(f"train: EfficientNet-Lite0 feature-extract head on {data} -> {run}")
    train_run(data, run, backbone="efficientnet_lite0", mode="feature-extract", pretrained="imagenet",
              overwrite=True, quiet=False)
    return run


def quantize(run: Path, out: Path, method: str, args, log) -> dict:
    from edgetl.check import Thresholds
    from edgetl.quantize import QuantizeConfig, quantize_run

    cfg = QuantizeConfig(method=method, all_forms=True, qat_epochs=args.qat_epochs, qat_lr=args.qat_lr,
                         qat_max_images=args.qat_max_images, thresholds=Thresholds(speed_repeats=args.repeats))
    t0 = time.perf_counter()
    outcome = quantize_run(run, out, cfg, overwrite=True, log=lambda s: log(f"  [{method}] {s}"))
    seconds = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    return {"method": method, "artifact": str(out), "seconds": seconds, "gate_passed": outcome.passed,
            "gate": outcome.manifest.gate, "quantization": report["quantization"], "forms": report["forms"],
            "float_layers": report["quantization"]["float_layers"]}


def latency_table(models: dict[str, Path], sample: np.ndarray, repeats: int, log) -> dict[str, dict[str, float]]:
    """Batch-1 median latency of every model on each backend, all interleaved in one loop."""
    from edgetl.runtime.errors import EdgetlError
    from edgetl.runtime.runners import open_runner

    backends = {"onnxruntime": {}, "openvino": {"inference_precision": "f32", "num_streams": 1,
                                               "performance_hint": "LATENCY"}}
    runners = {}
    for name, path in models.items():
        for be, opts in backends.items():
            try:
                runners[(name, be)] = open_runner(be, path, opts)
            except EdgetlError as exc:
                log(f"latency: {name} on {be} skipped ({exc.message})")
    x = np.ascontiguousarray(sample[:1])
    for r in runners.values():
        for _ in range(5):
            r.infer(x)
    times: dict = {k: [] for k in runners}
    keys = list(runners)
    for i in range(repeats):
        for k in (keys if i % 2 == 0 else keys[::-1]):
            t0 = time.perf_counter()
            runners[k].infer(x)
            times[k].append(time.perf_counter() - t0)
    out: dict[str, dict[str, float]] = {}
    for (name, be), t in times.items():
        out.setdefault(name, {})[be] = 1000 * float(np.median(t))
        out[name][f"{be}_precision"] = runners[(name, be)].info.get("precision")
    for r in runners.values():
        r.close()
    return out


def calibrator_sweep(artifact: Path, data_root: Path, log) -> list[dict]:
    """PTQ with each calibrator x QDQ form from the artifact's own FP32 graph and calibration list."""
    import tempfile

    from edgetl.calibration.cache import save_ranges
    from edgetl.calibration.calibrators import CALIBRATORS, calibrate
    from edgetl.calibration.qdq import QDQ_FORMS
    from edgetl.calibration.sets import load_images
    from edgetl.check import load_checkset
    from edgetl.quantize import ort_logits, prepare_float, render_qdq
    from edgetl.runtime.manifest import read_manifest

    cs = load_checkset(artifact)
    spec = read_manifest(artifact).preprocess
    cal = load_images([data_root / line for line in (artifact / "calibration.txt").read_text().split()], spec)
    rows = []
    with tempfile.TemporaryDirectory(prefix="calib-sweep-") as tmp:
        prep = prepare_float(artifact / "model_fp32.onnx", Path(tmp) / "prep.onnx")
        for name in CALIBRATORS:
            for form in QDQ_FORMS.values():
                t0 = time.perf_counter()
                cache = save_ranges(calibrate(prep, cal, name, form.symmetric_activations), Path(tmp) / "r.json")
                q = ort_logits(render_qdq(prep, cache, Path(tmp) / "q.onnx", form), cs.inputs)
                f = cs.float_logits
                rows.append({"calibrator": name, "form": form.key, "seconds": time.perf_counter() - t0,
                             "agreement": float((q.argmax(1) == f.argmax(1)).mean()),
                             "top1": float((q.argmax(1) == cs.labels).mean()), "logit_mse": float(((q - f) ** 2).mean())})
                log(f"calibrators: {name:10s} {form.short}  agreement {rows[-1]['agreement']:.4f}  "
                    f"top-1 {rows[-1]['top1']:.4f}  logit MSE {rows[-1]['logit_mse']:.4f}")
    return rows


def accuracy(path: Path, checkset) -> dict[str, float]:
    from edgetl.runtime.runners import open_runner

    r = open_runner("onnxruntime", path)
    logits = r.infer_many(checkset.inputs)
    pred, fpred = logits.argmax(1), checkset.float_logits.argmax(1)
    return {"top1": float((pred == checkset.labels).mean()), "agreement": float((pred == fpred).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=None, help="an existing ELPV run (default: train one in --work)")
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "quantize_elpv")
    ap.add_argument("--json", type=Path, default=None, help="default: WORK/quantize_elpv.json")
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--qat-lr", type=float, default=1e-5)
    ap.add_argument("--qat-max-images", type=int, default=640, help="training images per QAT epoch")
    ap.add_argument("--repeats", type=int, default=50, help="latency repeats per model (interleaved)")
    ap.add_argument("--methods", default="ptq,qat")
    ap.add_argument("--no-calibrators", action="store_true", help="skip the calibrator sweep")
    args = ap.parse_args(argv)

    def log(s: str) -> None:
        print(s, flush=True)

    import torch

    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    run = ensure_run(args.work, args.run, log)
    results = {}
    for method in args.methods.split(","):
        log(f"quantize: {method}")
        results[method] = quantize(run, args.work / f"art_{method}", method, args, log)

    from edgetl.check import load_checkset

    first = Path(results[next(iter(results))]["artifact"])
    checkset = load_checkset(first)
    models = {"fp32": first / "model_fp32.onnx"}
    for method, res in results.items():
        art = Path(res["artifact"])
        models[f"{method} {res['quantization']['qdq_format']} (artifact)"] = art / "model_int8.onnx"
        for f in res["forms"]:
            if f.get("file"):
                models[f"{method} {f['form']}"] = art / f["file"]
    split = json.loads((run / "split.json").read_text())
    sweep = [] if args.no_calibrators else calibrator_sweep(first, Path(split.get("root", ".")), log)
    log(f"latency: {len(models)} models x 2 backends, {args.repeats} interleaved batch-1 runs each")
    lat = latency_table(models, checkset.inputs, args.repeats, log)
    rows = []
    for name, path in models.items():
        acc = accuracy(path, checkset)
        rows.append({"model": name, "file": str(path.relative_to(args.work)) if args.work in path.parents else str(path),
                     **acc, **lat.get(name, {})})
    float_top1 = float((checkset.float_logits.argmax(1) == checkset.labels).mean())
    summary = {
        "dataset": "ELPV binary (defect probability >= 0.5), held-out test split",
        "n_test": len(checkset), "float_top1_pytorch": float_top1, "host": platform.processor() or platform.machine(),
        "methods": {m: {"seconds": r["seconds"], "gate_passed": r["gate_passed"], "drop": r["gate"]["drop"],
                        "agreement": r["gate"]["agreement"], "agreement_ci": r["gate"]["agreement_ci"],
                        "drop_ci": r["gate"]["drop_ci"], "calibrator": r["quantization"]["calibrator"],
                        "qdq_format": r["quantization"]["qdq_format"], "float_layers": r["float_layers"],
                        "qat": r["quantization"].get("qat")} for m, r in results.items()},
        "rows": rows, "repeats": args.repeats, "calibrators": sweep,
        "notes": "latency = median of interleaved batch-1 runs in this process; OpenVINO with "
                 "inference_precision=f32 (this CPU defaults to bf16 for non-INT8 layers)",
    }
    out = args.json or args.work / "quantize_elpv.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")

    print()
    print(f"ELPV binary test split: n={len(checkset)}, float (PyTorch) top-1 {100 * float_top1:.2f}%")
    print(f"{'model':52s} {'top-1':>7s} {'Δ pts':>6s} {'agree':>7s} {'ORT ms':>7s} {'OV ms':>7s}")
    for r in rows:
        print(f"{r['model'][:52]:52s} {100 * r['top1']:6.2f}% {100 * (r['top1'] - float_top1):+6.2f} "
              f"{100 * r['agreement']:6.2f}% {r.get('onnxruntime', float('nan')):7.2f} {r.get('openvino', float('nan')):7.2f}")
    if sweep:
        print(f"{'calibrator':12s} {'form':30s} {'agree':>7s} {'top-1':>7s} {'logit MSE':>10s}")
        for c in sweep:
            print(f"{c['calibrator']:12s} {c['form']:30s} {100 * c['agreement']:6.2f}% {100 * c['top1']:6.2f}% "
                  f"{c['logit_mse']:10.4f}")
    for m, s in summary["methods"].items():
        print(f"{m}: quantization {s['seconds']:.0f} s, calibrator {s['calibrator']}, gate "
              f"{'passed' if s['gate_passed'] else 'FAILED'} (drop {s['drop']:.2f} [{s['drop_ci'][0]:.2f}, "
              f"{s['drop_ci'][1]:.2f}], agreement {100 * s['agreement']:.2f}%), float layers {len(s['float_layers'])}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
