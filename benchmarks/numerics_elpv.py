"""Two numerics of one quantization, on this CPU: what the QDQ graph computes (reference: Q/DQ as float
ops) against what each backend's INT8 kernels compute here, for 8-bit and 7-bit weights and both QDQ
forms; optionally NNCF's accuracy-aware quantizer on the OpenVINO build for comparison.

    .venv/bin/python benchmarks/numerics_elpv.py --run demo/runs/elpv-lite0 [--qwac]

One PTQ (min-max ranges, no float layer) of the run, rendered as u8s8 with 8-bit and with 7-bit
weights and as s8s8 (the TensorRT form), each judged on the run's held-out test split (the
checkset) in reference numerics, on ONNX Runtime's kernels and on the OpenVINO build as
``x86-cpu-openvino`` builds it (u8s8 only). ``--qwac``: ``nncf.quantize_with_accuracy_control`` on
the OpenVINO float model with the same calibration images, metric = agreement with float on the
checkset, ``max_drop`` 0.02 (what edgetl's gate asks), timed. Prints a table and writes
``benchmarks/results/numerics_elpv_<CPU class>.json``; the CPU class is in both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def numerics_table(run_path: Path, work: Path) -> tuple[list[dict], object, object]:
    from edgetl.calibration.cache import save_ranges
    from edgetl.calibration.calibrators import calibrate
    from edgetl.calibration.qdq import QDQ_FORMS
    from edgetl.export import export_onnx
    from edgetl.numerics import deployed, judge_for, reference
    from edgetl.quantize import QuantizeConfig, calibration_set, make_checkset, prepare_float, render_qdq
    from edgetl.runs import load_run
    from edgetl.targets import load_target

    run = load_run(run_path)
    spec = run.manifest.preprocess
    cal_inputs = calibration_set(run, QuantizeConfig()).load(spec)
    cs = make_checkset(run, 1000, 0)
    prepared = prepare_float(export_onnx(run.model, spec, work / "fp32.onnx"), work / "prepared.onnx")
    judges = {"reference": reference(), "onnxruntime": judge_for("onnxruntime", {}),
              "openvino": deployed("openvino", load_target("x86-cpu-openvino").options_for("openvino"))}
    float_pred = cs.float_logits.argmax(1)
    rows = []
    for short, reduce in (("u8s8", False), ("u8s8", True), ("s8s8", False)):
        form = QDQ_FORMS[short]
        cache = save_ranges(calibrate(prepared, cal_inputs, "minmax", form.symmetric_activations, 16), work / "r.json")
        model = render_qdq(prepared, cache, work / f"{short}_{reduce}.onnx", form, reduce_range=reduce)
        row = {"form": form.key, "weight_bits": 7 if reduce else 8}
        for name, judge in judges.items():
            if name == "openvino" and short == "s8s8":
                continue
            t0 = time.perf_counter()
            pred = judge.logits(model, cs.inputs, spec, work).argmax(1)
            row[name] = {"agreement": float((pred == float_pred).mean()), "flips": int((pred != float_pred).sum()),
                         "top1": float((pred == cs.labels).mean()), "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
    return rows, run, cs


def qwac(run, cs, work: Path) -> dict:
    """NNCF's accuracy-aware PTQ of the OpenVINO float model, metric = agreement with float."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    from edgetl.export import export_onnx
    from edgetl.quantize import QuantizeConfig, calibration_set

    spec = run.manifest.preprocess
    cal = calibration_set(run, QuantizeConfig()).load(spec)
    model = ov.convert_model(str(export_onnx(run.model, spec, work / "qwac_fp32.onnx")))
    float_pred = cs.float_logits.argmax(1)
    items = [(cs.inputs[i:i + 1], i) for i in range(len(cs))]

    def agreement(compiled, data) -> float:
        data = list(data)
        out = compiled.outputs[0]
        pred = np.array([compiled(x)[out].argmax(1)[0] for x, _ in data])
        return float((pred == float_pred[[i for _, i in data]]).mean())

    t0 = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(
        model, nncf.Dataset([cal[i:i + 1] for i in range(len(cal))]), nncf.Dataset(items, lambda it: it[0]),
        validation_fn=agreement, max_drop=0.02, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(cal),
        preset=nncf.QuantizationPreset.MIXED,
        advanced_quantization_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE))
    seconds = time.perf_counter() - t0
    compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return {"agreement": agreement(compiled, items), "seconds": round(seconds, 1),
            "fake_quantize_ops": sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")}


def main(argv: list[str] | None = None) -> int:
    from edgetl.runtime.cpu import host_cpu

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a trained run folder (e.g. demo/runs/elpv-lite0)")
    ap.add_argument("--qwac", action="store_true", help="also run NNCF's quantize_with_accuracy_control (~2-3 min)")
    ap.add_argument("--json", type=Path, help="where to write the JSON (default: benchmarks/results/numerics_elpv_<CPU class>.json)")
    a = ap.parse_args(argv)
    cpu = host_cpu()
    with tempfile.TemporaryDirectory(prefix="edgetl-numerics-") as tmp:
        rows, run, cs = numerics_table(a.run, Path(tmp))
        extra = {"qwac": qwac(run, cs, Path(tmp))} if a.qwac else {}
    print(f"CPU: {cpu.short}; {len(cs)} checkset images; agreement with float (flips)")
    print(f"{'QDQ graph':44s} {'reference':>16s} {'onnxruntime':>16s} {'openvino':>16s}")
    for r in rows:
        cells = [f"{100 * r[k]['agreement']:.2f} % ({r[k]['flips']})" if k in r else "-"
                 for k in ("reference", "onnxruntime", "openvino")]
        print(f"{r['form'] + ', ' + str(r['weight_bits']) + '-bit weights':44s} " + " ".join(f"{c:>16s}" for c in cells))
    if extra:
        q = extra["qwac"]
        print(f"NNCF quantize_with_accuracy_control on OpenVINO: {100 * q['agreement']:.2f} % in {q['seconds']} s")
    slug = cpu.slug
    out = a.json or ROOT / "benchmarks" / "results" / f"numerics_elpv_{slug}.json"
    out.write_text(json.dumps({"run": str(a.run), "cpu": cpu.to_dict(), "n": len(cs), "rows": rows, **extra},
                              indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
