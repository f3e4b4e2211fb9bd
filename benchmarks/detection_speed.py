"""Where the detector's INT8 speed goes on this CPU: model inference alone, side by side in one process.

    .venv/bin/python benchmarks/detection_speed.py --artifact demo/artifacts/cells-x86-cpu-onnxruntime \
        --run demo/runs/cells-lite0

``edgetl bench`` measures frame to boxes (resize, inference, decode + NMS) for each backend; this
isolates the inference and asks which part of the graph INT8 could still speed up. On the artifact's
checkset inputs (batch 1, 2 threads, interleaved rounds, medians): PyTorch eager FP32 (channels_last,
the bench's eager baseline), ONNX Runtime FP32, the artifact's INT8 model, and three renders of one
min-max PTQ with the artifact's weight width: every layer INT8, the depthwise convolutions in float,
the detection head in float. Prints a table and writes ``benchmarks/results/detection_speed_<CPU
class>.json``; the CPU class is in both. Run it on an otherwise idle machine: only the ratios
measured in one run mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def depthwise_nodes(prepared: Path) -> list[str]:
    """The depthwise Convs, as the quantizer's weight-width choice defines them."""
    import onnx

    from edgetl.calibration.depthwise import depthwise_weights

    model = onnx.load(str(prepared))
    weights = depthwise_weights(model)
    return [n.name for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in weights]


def renders(art: Path, inputs: np.ndarray, work: Path, reduce_range: bool) -> dict[str, Path]:
    """The ONNX models timed by ONNX Runtime, by row name."""
    from edgetl.calibration.cache import save_ranges
    from edgetl.calibration.calibrators import calibrate
    from edgetl.calibration.qdq import qdq_form
    from edgetl.detect.compile import head_nodes
    from edgetl.quantize import prepare_float, render_qdq

    prep = prepare_float(art / "model_fp32.onnx", work / "prepared.onnx")
    form = qdq_form("auto", "onnxruntime")
    ranges = save_ranges(calibrate(prep, inputs, "minmax", form.symmetric_activations, 1), work / "ranges.json")

    def render(name: str, exclude: list[str]) -> Path:
        return render_qdq(prep, ranges, work / f"{name}.onnx", form, exclude, reduce_range=reduce_range)

    return {"onnxruntime fp32": art / "model_fp32.onnx", "artifact int8": art / "model_int8.onnx",
            "every layer int8": render("all", []), "depthwise convs in float": render("dw", depthwise_nodes(prep)),
            "head in float": render("head", head_nodes(prep))}


def time_all(models: dict[str, Path], torch_model, x: np.ndarray, rounds: int, threads: int) -> dict[str, list[float]]:
    import torch

    from edgetl.runtime.runners import open_runner

    # the runner `edgetl bench` and the device time (its session options), at this thread count
    sessions = {k: open_runner("onnxruntime", p, {"intra_op_threads": threads}) for k, p in models.items()}
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {"pytorch eager fp32 (channels_last)": [], **{k: [] for k in sessions}}
    for _ in range(rounds):  # interleaved: drift on a shared VM hits every row alike
        for k, s in sessions.items():
            for xi in x[:8]:  # warm-up
                s.infer_all(xi[None])
            for xi in x:
                t = time.perf_counter()
                s.infer_all(xi[None])
                times[k].append(time.perf_counter() - t)
        with torch.inference_mode():
            for xi in x:
                xt = torch.from_numpy(xi[None]).contiguous(memory_format=torch.channels_last)
                t = time.perf_counter()
                torch_model(xt)
                times["pytorch eager fp32 (channels_last)"].append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=ROOT / "demo/artifacts/cells-x86-cpu-onnxruntime")
    ap.add_argument("--run", type=Path, default=ROOT / "demo/runs/cells-lite0")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/detection_speed_<CPU class>.json")
    args = ap.parse_args(argv)
    import torch

    from edgetl.detect.gate import load_det_checkset
    from edgetl.detect.train import load_detection_run
    from edgetl.runtime.cpu import host_cpu
    from edgetl.runtime.manifest import read_manifest

    cpu = host_cpu()
    checkset = load_det_checkset(args.artifact)
    x = np.ascontiguousarray(checkset.inputs[:args.images], dtype=np.float32)
    quant = read_manifest(args.artifact).quantization or {}
    reduce_range = quant.get("weight_bits") == 7
    _, model, _, _ = load_detection_run(args.run)
    model = model.eval().to(memory_format=torch.channels_last)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgetl-detspeed-") as tmp:
        times = time_all(renders(args.artifact, checkset.inputs[:40], Path(tmp), reduce_range), model, x,
                         args.rounds, args.threads)
    eager = float(np.median(times["pytorch eager fp32 (channels_last)"]) * 1e3)
    rows = [{"model": k, "p50_ms": round(float(np.median(v) * 1e3), 3), "eager_over_this": round(eager / (np.median(v) * 1e3), 3),
             "n": len(v)} for k, v in times.items()]
    print(f"inference only, batch 1, {args.threads} threads, {len(x)} inputs x {args.rounds} rounds; "
          f"{cpu.model}, {cpu.isa_class}; INT8 weights {'7' if reduce_range else '8'}-bit")
    print(f"{'model':38s} {'p50 ms':>8s} {'eager / this':>13s}")
    for r in rows:
        print(f"{r['model']:38s} {r['p50_ms']:8.2f} {r['eager_over_this']:12.2f}x")
    result = {"artifact": str(args.artifact), "run": str(args.run), "cpu": cpu.to_dict(), "threads": args.threads,
              "images": len(x), "rounds": args.rounds, "weight_bits": 7 if reduce_range else 8,
              "loadavg_start": load0, "loadavg_end": os.getloadavg()[0], "rows": rows,
              "command": "python benchmarks/detection_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = args.json or ROOT / "benchmarks" / "results" / f"detection_speed_{cpu.slug}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
