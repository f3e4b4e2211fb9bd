"""``edgetl check``: re-run an artifact's accuracy gate on its checkset (no dataset, no torch needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import click


def gate_options(fn: Callable) -> Callable:
    """The gate thresholds, shared by ``edgetl quantize`` and ``edgetl check``."""
    for opt in reversed([
        click.option("--max-drop", type=float, default=None,
                     help="Allowed top-1 drop, in points (float -> quantized). [default: 1.0]"),
        click.option("--min-agreement", type=float, default=None,
                     help="Minimum top-1 agreement with the float model, 0..1. [default: 0.98]"),
        click.option("--speed-check/--no-speed-check", default=None,
                     help="Fail when the quantized model is not faster than float on the same backend (median of "
                          "interleaved batch-1 runs). --no-speed-check for toy models. [default: on]"),
        click.option("--min-speedup", type=float, default=None, help="Required float/quantized latency ratio. [default: 1.0]"),
        click.option("--min-stability", type=float, default=None,
                     help="Minimum agreement with float on the worst of the perturbed checksets (an equivalent float "
                          "rendering, JPEG re-encoding, ±2 % brightness), 0..1. [default: 0.97]"),
    ]):
        fn = opt(fn)
    return fn


def thresholds_from(opts: Mapping[str, Any], base: Any = None):
    """Thresholds from the CLI options given (others from ``base``: a stored gate's thresholds, or defaults)."""
    from ..check import Thresholds

    th = Thresholds.coerce(base)
    given = {k: v for k, v in {"max_drop": opts.get("max_drop"), "min_agreement": opts.get("min_agreement"),
                               "speed_check": opts.get("speed_check"), "min_speedup": opts.get("min_speedup"),
                               "min_stability_agreement": opts.get("min_stability")}.items()
             if v is not None}
    return Thresholds.coerce({**th.to_dict(), **given})


def det_thresholds_from(opts: Mapping[str, Any], base: Any = None):
    """A detection artifact's thresholds: --max-drop is points of mAP@0.5, --min-agreement the F1 of
    quantized vs float detections (others from the stored gate, or the defaults)."""
    from ..detect.gate import DetThresholds

    th = DetThresholds.coerce(base).to_dict()
    for opt, key in (("max_drop", "max_map_drop"), ("min_agreement", "min_agreement")):
        if opts.get(opt) is not None:
            th[key] = opts[opt]
    return DetThresholds.coerce(th)


def _detection_lines(g: Mapping[str, Any]) -> int:
    from ..runtime.cpu import describe

    where = "reference numerics (Q/DQ as float ops)" if g.get("numerics") == "reference" else \
        f"deployed numerics{' on ' + describe(g['cpu']) if g.get('cpu') else ''}"
    lo, hi = g["drop_ci"]
    click.echo(f"{where}: mAP@0.5 float {100 * g['float_map50']:.2f}  quantized {100 * g['quant_map50']:.2f}  drop "
               f"{g['drop']:.2f} points [{lo:.2f}, {hi:.2f}]  mAP@0.5:0.95 {100 * g['float_map']:.2f} -> "
               f"{100 * g['quant_map']:.2f}  detection agreement F1 {g['agreement']:.4f} "
               f"[{g['agreement_ci'][0]:.4f}, {g['agreement_ci'][1]:.4f}] at score {g['score_threshold']:.2f}")
    o = g.get("objects_agreement")
    if o:
        click.echo(f"objects (what --track and --count-line follow, every class as one, at {o['threshold']:.2f}): "
                   f"agreement F1 {o['f1']:.4f} ({o['matched']} of {o['n_float']} float and {o['n_quant']} quantized "
                   "matched; reported, not gated)")
    if g["passed"]:
        click.echo("gate PASSED")
        return 0
    click.secho("gate FAILED", fg="red")
    for f in g["failures"]:
        click.echo(f"  {f}")
    return 1


CHECK_HINT = ("pass the --out folder of `edgetl quantize` or `edgetl compile` (a run is quantized first: "
              "edgetl quantize RUN --out artifacts/NAME)")


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["reference", "onnxruntime", "openvino", "tensorrt"]), default=None,
              help="Check this backend's build (from manifest.builds), or 'reference': model_int8.onnx with Q/DQ as "
                   "float ops, the same on every CPU (the artifact gate). [default: the build that decides the "
                   "artifact (its target's, or the backend it was quantized for), else reference]")
@gate_options
@click.option("--no-update", is_flag=True, help="Only report: leave manifest.json and the report files unchanged.")
def check(artifact: Path, backend: str | None, no_update: bool, **gate: Any) -> int:
    """Run an artifact's quantized model on its checkset and gate it against the float model.

    Verifies every file's sha256 first. A detection artifact reports mAP@0.5 and mAP@0.5:0.95 float vs
    quantized, the drop (with --max-drop in mAP points) and the detection agreement (F1 of quantized vs
    float boxes at the deployed score; --min-agreement). A classifier: float vs quantized top-1, the drop and the
    agreement with 95% confidence intervals, per-class recall, the worst classes, the logit error
    and the batch-1 speed-up over the float model. Exits 1 when the gate fails and records the
    result in manifest.json (gate.passed) and report.md/json.

    \b
    Examples:
      edgetl check artifacts/elpv-int8
      edgetl check artifacts/elpv-int8 --max-drop 0.5 --min-agreement 0.99
      edgetl check artifacts/elpv-ov --backend openvino
    """
    from ..check import check_artifact
    from ..runtime.manifest import read_manifest

    stored, task = None, "classification"
    if (artifact / "manifest.json").is_file():
        m = read_manifest(artifact)
        stored, task = (m.gate or {}).get("thresholds"), m.task
    th = det_thresholds_from(gate, stored) if task == "detection" else thresholds_from(gate, stored)
    if no_update:
        result = check_artifact(artifact, backend=backend, thresholds=th, update=False, log=click.echo)
    else:  # one transaction: the artifact is the old one or the new one, verified, whatever happens
        from ..artifact import update

        with update(artifact, "artifact", hint=CHECK_HINT) as job:
            for note in job.notes:
                click.echo(f"note: {note}")
            result = check_artifact(job.path, backend=backend, thresholds=th, update=True, log=click.echo)
    g = result
    if task == "detection":
        return _detection_lines(g.gate)
    from ..runtime.cpu import describe

    where = "reference numerics (Q/DQ as float ops)" if g.numerics == "reference" else \
        f"deployed numerics{' on ' + describe(g.cpu) if g.cpu else ''}"
    click.echo(f"{where}: float top-1 {g.float_top1:.4f}  quantized top-1 {g.quant_top1:.4f}  drop {g.drop:.2f} "
               f"points [{g.drop_ci[0]:.2f}, {g.drop_ci[1]:.2f}]  agreement {g.agreement:.4f} "
               f"[{g.agreement_ci[0]:.4f}, {g.agreement_ci[1]:.4f}]  max logit error {g.max_logit_error:.4f}")
    if g.margins:
        click.echo("margins (images to spare before a threshold fails): "
                   + ", ".join(f"{k} {v:+d}" for k, v in g.margins.items()))
    if g.stability:
        st = g.stability
        click.echo("stability (agreement with float on perturbed copies): " + ", ".join(
            f"{k} {v['agreement']:.4f} ({v['int8_flips']} INT8-only flips)" for k, v in st["perturbations"].items()))
    if g.speed:
        click.echo(f"batch-1 latency: float {g.speed['float_ms']:.3g} ms, quantized {g.speed['quant_ms']:.3g} ms "
                   f"(x{g.speed['speedup']:.2f}{'' if g.speed['gated'] else ', not gated'})")
    elif g.speed_note:
        click.echo(g.speed_note)
    for w in g.worst_classes:
        click.echo(f"  lost most: {w['label']} recall {w['recall_float']:.3f} -> {w['recall_quant']:.3f}")
    if g.passed:
        click.echo("gate PASSED")
        return 0
    click.secho("gate FAILED", fg="red")
    for f in g.failures:
        click.echo(f"  {f}")
    for s in g.suggestions:
        click.echo(f"  try: {s}")
    return 1
