"""``edgetl quantize``: a trained run -> a gated INT8 artifact (QDQ ONNX + checkset + report)."""

from __future__ import annotations

from pathlib import Path

import click

from .check import gate_options, thresholds_from


@click.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The artifact folder to write.")
@click.option("--method", type=click.Choice(["ptq", "qat", "auto"]), default="ptq", show_default=True,
              help="ptq: static post-training quantization; qat: NNCF quantization-aware fine-tuning, then rendered "
                   "in the chosen QDQ form; auto: the repair ladder (PTQ with each calibrator, then QAT) until one "
                   "passes the gate.")
@click.option("--weight-range", type=click.Choice(["auto", "full", "reduced"]), default="auto", show_default=True,
              help="reduced: 7-bit weights, exact on x86 CPUs without VNNI (their u8 x s8 sums saturate int16); "
                   "auto: reduced when --backend runs on this CPU and it has no VNNI/AMX.")
@click.option("--calibrator", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default=None,
              help="Activation range calibrator. [default: minmax for ptq, mse for qat]")
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "tensorrt"]), default="onnxruntime",
              show_default=True, help="The backend the artifact is for: picks the QDQ form with --qdq-form auto.")
@click.option("--qdq-form", type=click.Choice(["auto", "s8s8", "u8s8"]), default="auto", show_default=True,
              help="s8s8: signed symmetric int8 (TensorRT); u8s8: uint8 asymmetric activations (fast in ONNX Runtime "
                   "and OpenVINO on CPU); auto: the form --backend runs fast.")
@click.option("--calib-size", type=int, default=None,
              help="Calibration images (stratified from the train split). Given explicitly, fewer available is an "
                   "error. [default: 300, or all when fewer]")
@click.option("--calib-min", type=int, default=64, show_default=True,
              help="Refuse to calibrate on fewer images than this.")
@click.option("--calib-dir", type=click.Path(path_type=Path), default=None,
              help="Calibrate on this folder of images instead of the train split (must not hold test images).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration/checkset selection.")
@click.option("--checkset-cap", type=click.IntRange(1, 5000), default=1000, show_default=True,
              help="At most this many held-out test images in checkset.npz (at most 5000: the checkset holds "
                   "float tensors, ~0.6 MB an image at 224 px).")
@click.option("--static-batch", type=int, default=None, help="Export with this fixed batch (default: dynamic batch).")
@click.option("--max-fallback-rounds", type=int, default=3, show_default=True,
              help="Mixed-precision rounds: each keeps the next most sensitive layer(s) in float.")
@click.option("--fallback-step", type=int, default=1, show_default=True, help="Layers kept in float per round.")
@click.option("--sensitivity/--no-sensitivity", default=False, show_default=True,
              help="Rank all layers by quantization sensitivity (sensitivity.csv) even when the gate passes "
                   "without fallback (otherwise ranked only when a fallback round needs it; ~1-2 min on Lite0).")
@click.option("--sensitivity-images", type=int, default=32, show_default=True)
@click.option("--qat-epochs", type=int, default=2, show_default=True)
@click.option("--qat-lr", type=float, default=1e-5, show_default=True)
@click.option("--qat-batch-size", type=int, default=32, show_default=True)
@click.option("--qat-max-images", type=int, default=None, help="Training images per QAT epoch (default: all).")
@click.option("--qat-loss", type=click.Choice(["distill", "ce"]), default="distill", show_default=True,
              help="distill: match the float model's outputs (what the gate's agreement measures); ce: the labels.")
@click.option("--qat-perturb", type=float, default=0.0, show_default=True, metavar="SHARE",
              help="Share of QAT images moved as the gate's stability part moves the checkset (JPEG, brightness).")
@click.option("--all-forms", is_flag=True,
              help="Also render the other QDQ form(s) (and NNCF's own QAT export) under forms/, measured side by side "
                   "in the report.")
@gate_options
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def quantize(run: Path, out: Path, method: str, weight_range: str, calibrator: str | None, backend: str, qdq_form: str,
             calib_size: int | None, calib_min: int, calib_dir: Path | None, seed: int, checkset_cap: int,
             static_batch: int | None, max_fallback_rounds: int, fallback_step: int, sensitivity: bool,
             sensitivity_images: int, qat_epochs: int, qat_lr: float, qat_batch_size: int, qat_max_images: int | None,
             qat_loss: str, qat_perturb: float, all_forms: bool, overwrite: bool, **gate: object) -> int:
    """Quantize a trained run to INT8 and gate it against the float model.

    Writes OUT/ with model_fp32.onnx (parity-checked), model_int8.onnx (QDQ), checkset.npz,
    calibration.txt, sensitivity.csv, report.md/json, confusion.png and manifest.json. Exits 1 when
    the gate fails after all mixed-precision rounds: the artifact is still written, marked not
    deployable (manifest.gate.deployable = false).

    \b
    Examples:
      edgetl quantize runs/elpv --out artifacts/elpv-int8
      edgetl quantize runs/elpv --method qat --out artifacts/elpv-qat --backend tensorrt
      edgetl quantize runs/elpv --calib-dir data/line-camera --calibrator percentile --out artifacts/x
    """
    from ..runtime.errors import require

    require("edgetl quantize", "torch", "safetensors", "onnx", *(("nncf",) if method == "qat" else ()))
    from ..quantize import QuantizeConfig, quantize_run

    why = f"--weight-range {weight_range}"
    if weight_range == "auto":
        from ..runtime.cpu import host_cpu

        cpu = host_cpu()
        weight_range = "reduced" if backend != "tensorrt" and not cpu.int8_exact else "full"
        why = (f"{cpu.short}: " + ("u8 x s8 pair sums saturate int16 without VNNI" if weight_range == "reduced" else
                                   "no int16 saturation" if backend != "tensorrt" else "TensorRT runs on a GPU"))
    cfg = QuantizeConfig(method=method, calibrator=calibrator, backend=backend, qdq_form=qdq_form,
                         weight_range=weight_range, weight_range_reason=why,
                         calib_size=calib_size or 300, calib_exact=calib_size is not None, calib_min=calib_min,
                         calib_dir=str(calib_dir) if calib_dir else None, seed=seed, checkset_cap=checkset_cap,
                         static_batch=static_batch, thresholds=thresholds_from(gate),
                         max_fallback_rounds=max_fallback_rounds, fallback_step=fallback_step, sensitivity=sensitivity,
                         sensitivity_images=sensitivity_images, qat_epochs=qat_epochs, qat_lr=qat_lr,
                         qat_batch_size=qat_batch_size, qat_max_images=qat_max_images, qat_loss=qat_loss,
                         qat_perturb=qat_perturb, all_forms=all_forms)
    outcome = quantize_run(run, out, cfg, overwrite=overwrite, log=click.echo)
    verdict = "deployable" if outcome.passed else "NOT deployable (gate failed; see report.md)"
    click.echo(f"wrote {out}: {verdict}")
    return 0 if outcome.passed else 1
