"""``edgetl compile`` of a detection run: export, INT8 PTQ judged on the target's numerics, artifact.

The float detector is exported up to its raw outputs (``edgetl.detect.export``), calibrated on
training images, rendered as a QDQ graph in the target's form (the same ONNX Runtime quantizer,
ranges cache and QDQ forms as classification: ``edgetl.quantize.render_qdq``,
``edgetl.calibration.calibrators.calibrate``) and judged by the detection gate
(``edgetl.detect.gate``: mAP@0.5 drop with its bootstrap CI, and detection agreement) in the
numerics that decide the target (``edgetl.compile.judge_numerics``: the target's own build on this
CPU, or the reference numerics for TensorRT). The ladder tries calibrators, then keeps the head's
convolutions in float (box regression is where INT8 rounding shows first), and keeps the first step
that passes (else the best, recorded as failed). The artifact is then built for the target and its
build gated through ``edgetl.check.check_artifact``, which dispatches on the task.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..runtime.errors import EdgetlError
from ..runtime.manifest import Manifest, default_input, read_manifest, seal
from ..runtime.preprocess import PreprocessSpec, preprocess

Progress = Callable[[str], None]
# the PTQ ladder's calibrators, cheapest first; each with the sensitivity-ranked mixed-precision fallback
LADDER = ("minmax", "percentile")
MAX_FALLBACK_ROUNDS = 6  # float layers double a round: 1, 2, 4, ... 32 (of ~85 on Lite0)
ANCHORS = "anchors.npy"


@dataclass
class Material:
    """What every ladder step shares: the float export, calibration inputs, the checkset."""

    fp32: Path
    prepared: Path
    cal_inputs: np.ndarray
    cal_paths: list[str]
    checkset: Any  # edgetl.detect.gate.DetCheckset
    post: Any  # edgetl.runtime.detect.PostprocessSpec
    spec: PreprocessSpec
    labels: tuple[str, ...]


def _inputs(images: Sequence[Any], spec: PreprocessSpec) -> np.ndarray:
    from .data import load_pixels

    return np.stack([preprocess(load_pixels(img), spec) for img in images]).astype(np.float32)


def _pick(images: Sequence[Any], n: int, seed: int) -> list[Any]:
    if len(images) <= n:
        return list(images)
    idx = np.random.default_rng(seed).choice(len(images), n, replace=False)
    return [images[i] for i in sorted(idx)]


def make_checkset(model: Any, images: Sequence[Any], spec: PreprocessSpec, root: Path, cap: int, seed: int):
    """The held-out images (capped), their ground truth in model-input pixels and the float
    (PyTorch) model's raw outputs."""
    import torch

    from .gate import DetCheckset
    from .train import to_input_boxes

    chosen = _pick(images, cap, seed)
    x = _inputs(chosen, spec)
    with torch.no_grad():
        outs = [model(torch.from_numpy(x[i:i + 16])) for i in range(0, len(x), 16)]
    fb = torch.cat([o[0] for o in outs]).numpy()
    fs = torch.cat([o[1] for o in outs]).numpy()
    gt_boxes = [to_input_boxes(img.boxes, (img.height, img.width), spec) for img in chosen]  # as in training
    paths = [_shown_path(img, root) for img in chosen]
    return DetCheckset(x, gt_boxes, [np.asarray(img.classes, np.int64) for img in chosen], fb, fs, paths)


def _shown_path(img: Any, root: Path) -> str:
    try:
        rel = str(Path(img.path).relative_to(root))
    except ValueError:
        rel = str(img.path)
    return rel + (f"#{','.join(map(str, img.window))}" if img.window else "")


def head_nodes(prepared: Path) -> list[str]:
    """The detector head's quantizable nodes (the exported names keep the module path ``head``)."""
    from ..calibration.qdq import weighted_nodes

    return [name for name, _ in weighted_nodes(prepared) if "head" in name.split("/")]


def judge(numerics: Any, model: Path, mat: Material, thresholds: Any, work: Path) -> dict[str, Any]:
    """The detection gate of ``model`` (a QDQ ONNX) run in ``numerics`` on the checkset."""
    from .gate import evaluate_detection

    runner = numerics.open(model, mat.spec, work)
    try:
        boxes, scores = runner.infer_many_all(numerics.model_inputs(mat.checkset.inputs, mat.spec))[:2]
    finally:
        runner.close()
    gate = evaluate_detection((boxes, scores), mat.checkset, mat.post, thresholds, mat.labels)
    gate["numerics"] = numerics.kind
    gate["cpu"] = numerics.to_dict()["cpu"]
    return gate


def ladder(mat: Material, form: Any, reduce_range: bool, numerics: Any, thresholds: Any, work: Path,
           steps: Sequence[str], progress: Progress, max_rounds: int = MAX_FALLBACK_ROUNDS
           ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Climb ``steps`` (calibrators), each PTQ with the mixed-precision fallback (``detect.repair``)
    judged on ``numerics``; returns the kept step (its ``model`` path in ``work``) and every row. The
    layers are ranked once, with the first calibrator's ranges (the later steps use that order)."""
    from ..calibration.cache import save_ranges
    from ..calibration.calibrators import calibrate
    from .repair import det_better, fallback

    rows, best, ranking = [], None, None
    for i, calibrator in enumerate(steps):
        t0 = time.perf_counter()
        progress(f"  step {i + 1}/{len(steps)}: ptq {calibrator} + mixed-precision fallback (up to {max_rounds} rounds)")
        ranges = save_ranges(calibrate(mat.prepared, mat.cal_inputs, calibrator, form.symmetric_activations, 1),
                             work / f"ranges_{calibrator}.json")
        (work / f"step{i}").mkdir(exist_ok=True)
        r = fallback(mat, ranges, form, reduce_range, numerics, thresholds, work / f"step{i}" / "model_int8.onnx",
                     max_rounds, progress, ranking=ranking)  # the first step's ranking orders the later ones
        ranking = ranking or r["ranking"]
        gate = r["gate"]
        n = len(r["float_layers"])
        row = {"step": f"ptq {calibrator}" + (f" + {n} float layer(s)" if n else ""), "calibrator": calibrator,
               "float_layers": r["float_layers"], "passed": gate["passed"], "drop": round(gate["drop"], 3),
               "agreement": round(gate["agreement"], 4), "quant_map50": gate["quant_map50"],
               "rounds": r["rounds"], "seconds": round(time.perf_counter() - t0, 1), "kept": False}
        rows.append(row)
        progress(f"  ptq {calibrator}: kept {n} float layer(s) after {len(r['rounds'])} round(s): drop "
                 f"{gate['drop']:+.2f} pts, agreement {gate['agreement']:.3f} -> "
                 f"{'PASSED' if gate['passed'] else 'failed'} ({row['seconds']} s)")
        if best is None or det_better(row, best["row"]):
            best = {"gate": gate, "model": r["model"], "row": row, "ranking": r["ranking"]}
        if gate["passed"]:
            break
    best["row"]["kept"] = True
    return best, rows


def _material(run_path: Path, work: Path, calib_size: int, checkset_cap: int, seed: int, progress: Progress,
              opset: int | None = None) -> tuple:
    """Load the run, export the float model (at ``opset`` when the target's parser needs a lower one),
    pick calibration and checkset images."""
    from .train import load_detection_run

    manifest, model, splits, names = load_detection_run(run_path)
    if not (splits.get("test") or splits.get("val")) or not splits.get("train"):
        raise EdgetlError(f"{run_path}: the run has no held-out (test/val) or no train images",
                          hint="re-train with --test/--val fractions above 0")
    mat, parity = material_of(manifest, model, splits, names, work, calib_size, checkset_cap, seed, progress, opset)
    return manifest, mat, parity


def material_of(manifest: Manifest, model: Any, splits: dict, names: Sequence[str], work: Path, calib_size: int,
                checkset_cap: int, seed: int, progress: Progress, opset: int | None = None) -> tuple:
    """:class:`Material` of a loaded detector (``load_detection_run``'s parts) and the export's parity."""
    from ..quantize import prepare_float
    from ..runtime.detect import PostprocessSpec
    from .export import export_detector

    model.eval()
    spec = manifest.preprocess
    held_out = splits.get("test") or splits.get("val") or []
    cal = _pick(splits["train"], calib_size, seed) if calib_size else []  # 0: a float target, no calibration
    root = Path(manifest.training.get("data_root", "")) if manifest.training.get("data_root") else Path("/")
    progress((f"calibration: {len(cal)} training images; " if cal else "") +
             f"checkset: up to {checkset_cap} held-out images")
    checkset = make_checkset(model, held_out, spec, root, checkset_cap, seed)
    progress(f"export: float ONNX of the detector ({spec.input_size[1]}x{spec.input_size[0]}, raw boxes + scores)")
    parity = export_detector(model, spec, work / "model_fp32.onnx", inputs=checkset.inputs[:8],  # real held-out inputs
                             **({"opset": opset} if opset else {}))
    prepared = prepare_float(work / "model_fp32.onnx", work / "prepared.onnx")
    post = PostprocessSpec.from_manifest(manifest.postprocess, np.asarray(model.anchors, np.float32),
                                         image_size=spec.input_size)
    cal_inputs = _inputs(cal, spec) if cal else np.zeros((0, *checkset.inputs.shape[1:]), np.float32)
    mat = Material(work / "model_fp32.onnx", prepared, cal_inputs, [_shown_path(i, root) for i in cal],
                   checkset, post, spec, tuple(names))
    return mat, parity


def _quant_record(form: Any, profile: Any, weight: tuple[str, str], mat: Material, rows: list, kept: dict,
                  numerics: Any, parity: dict, seconds: float) -> dict[str, Any]:
    import onnxruntime

    from ..runtime.cpu import host_cpu

    row = kept["row"]
    verdict = _verdict(rows, row, numerics, kept["gate"])
    ranking = kept.get("ranking") or []
    return {"method": "ptq", "calibrator": row["calibrator"], "qdq_format": form.key, "for_backend": profile.backend,
            "per_channel": True, "weight_range": weight[0], "weight_bits": 7 if weight[0] == "reduced" else 8,
            "weight_range_reason": weight[1], "cpu": host_cpu().to_dict(), "judged_on": numerics.to_dict(),
            "calibration_images": len(mat.cal_inputs), "calibration_file": "calibration.txt",
            "float_layers": row["float_layers"], "ladder": rows, "verdict": verdict, "parity": parity,
            "sensitivity": {"metric": "leave-one-out on calibration images: SQNR of foreground probabilities and "
                                      "box regressions where float sees something (edgetl.detect.repair)",
                            "top": [r.to_dict() for r in ranking[:15]]},
            "onnxruntime": onnxruntime.__version__, "seconds": round(seconds, 1)}


def _verdict(rows: list[dict[str, Any]], row: dict[str, Any], numerics: Any, gate: dict[str, Any]) -> str:
    """What the ladder found: the step that passed, or why none did and what would reach the gate."""
    if row["passed"]:
        return f"passed: {row['step']} on {numerics.label}"
    near = gate.get("disagreement") or {}
    most = max((x for r in rows for x in r.get("rounds") or []),
               key=lambda x: (len(x.get("float_layers") or []), x["agreement"]), default={})
    why = (f"; {near.get('near_threshold', 0)} of {near.get('unmatched', 0)} disagreeing detections score within "
           f"{near.get('band', 0.1):g} of the deployed threshold {gate.get('score_threshold', 0):g} (float's own "
           "boxes sit there: a longer fine-tune that separates scores is what INT8 needs)") if near.get("unmatched") else ""
    return (f"FAILED: no PTQ step reached the gate on {numerics.label}; kept the best, {row['step']} (agreement "
            f"{row['agreement']:.4f}, drop {row['drop']:+.2f} points); with {len(most.get('float_layers') or [])} "
            f"layer(s) in float agreement {most.get('agreement', float('nan')):.4f}{why}. What would reach it: an "
            "fp32 build of this model, or a model trained longer")


def write_artifact(d: Path, run_manifest: Manifest, mat: Material, kept: dict, quant: dict, ref_gate: dict,
                   name: str, profile: Any) -> Manifest:
    """The artifact folder's files and manifest (task detection, schema 2), sealed."""
    import shutil

    import onnxruntime

    from ..check import deployable, with_verdict

    shutil.copyfile(mat.fp32, d / "model_fp32.onnx")
    shutil.copyfile(kept["model"], d / "model_int8.onnx")
    np.save(d / ANCHORS, mat.post.anchors)
    mat.checkset.save(d / "checkset.npz")
    (d / "calibration.txt").write_text("\n".join(mat.cal_paths) + "\n", encoding="utf-8")
    deployed = kept["gate"]
    build = {"backend": "onnxruntime", "model": "model_int8.onnx", "precision": "int8", "options": {},
             "version": onnxruntime.__version__, "device": "CPUExecutionProvider", "qdq_format": quant["qdq_format"]}
    if profile.backend == "onnxruntime" and deployed.get("numerics") == "deployed":
        build["gate"] = deployed
    from ..doctor import machine_facts

    manifest = with_verdict(Manifest(
        kind="artifact", labels=run_manifest.labels, preprocess=run_manifest.preprocess, task="detection",
        input=default_input(run_manifest.preprocess, 1), backbone=run_manifest.backbone, training=run_manifest.training,
        quantization=quant, gate={**ref_gate, "backend": "onnxruntime", "model": "model_int8.onnx"},
        target=profile.to_dict(), builds=(build,), postprocess={**dict(run_manifest.postprocess), "anchors": ANCHORS}))
    report = {"name": name, "task": "detection", "machine": machine_facts(), "deployable": deployable(manifest),
              "gate": ref_gate, "escalation": quant["ladder"], "quantization": quant,
              "builds": {"onnxruntime": build.get("gate")}}
    (d / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    (d / "report.md").write_text(render_report(report), encoding="utf-8")
    return seal(d, manifest)


def write_float_artifact(d: Path, run_manifest: Manifest, mat: Material, parity: dict, name: str,
                         profile: Any) -> Manifest:
    """A detection artifact without quantization (an fp16/fp32 target: the Jetson Nano's FP16 engine):
    the float export, anchors, checkset; no gate until the target's build is gated."""
    import shutil

    shutil.copyfile(mat.fp32, d / "model_fp32.onnx")
    np.save(d / ANCHORS, mat.post.anchors)
    mat.checkset.save(d / "checkset.npz")
    report = {"name": name, "task": "detection", "gate": None, "parity": parity,
              "quantization": {"method": f"none (a {profile.precision} target)"}, "builds": {}}
    (d / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    (d / "report.md").write_text(render_report(report), encoding="utf-8")
    manifest = Manifest(kind="artifact", labels=run_manifest.labels, preprocess=run_manifest.preprocess,
                        task="detection", input=default_input(run_manifest.preprocess, 1),
                        backbone=run_manifest.backbone, training=run_manifest.training, quantization=None,
                        target=profile.to_dict(), postprocess={**dict(run_manifest.postprocess), "anchors": ANCHORS})
    return seal(d, manifest)


def render_report(report: dict[str, Any]) -> str:
    """report.md of a detection artifact: the verdict, the notes, the ladder, each gate."""
    from ..check import notes_markdown
    from .gate import det_gate_markdown

    lines = [f"# {report.get('name', 'artifact')}: detection", ""]
    if "deployable" in report:
        lines += [("**VERIFIED**: the gate that decides this artifact passed" if report["deployable"] else
                   "**NOT DEPLOYABLE**: the gate that decides this artifact failed (see below)"), ""]
    lines += notes_markdown(report)
    esc = report.get("escalation") or []
    if esc:
        lines += ["## Quantization ladder", "", "| step | round | float layers | mAP@0.5 quantized | drop (pts) | "
                  "agreement | passed | s | kept |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in esc:
            for x in r.get("rounds") or []:
                lines.append(f"| ptq {r['calibrator']} | {x['round']} | {len(x['float_layers'])} | "
                             f"{100 * x['quant_map50']:.2f} | {x['drop']:+.2f} | {x['agreement']:.3f} | "
                             f"{'yes' if x['passed'] else 'no'} | {x.get('seconds', '')} | |")
            lines.append(f"| **{r['step']}** | kept | {len(r['float_layers'])} | {100 * r['quant_map50']:.2f} | "
                         f"{r['drop']:+.2f} | {r['agreement']:.3f} | {'yes' if r['passed'] else 'no'} | {r['seconds']} | "
                         f"{'**kept**' if r['kept'] else ''} |")
        lines.append("")
    verdict = (report.get("quantization") or {}).get("verdict")
    if verdict:
        lines += [f"Verdict: {verdict}", ""]
    if report.get("gate"):
        lines += [det_gate_markdown(report["gate"], "Reference gate (Q/DQ as float ops)"), ""]
    for backend, g in (report.get("builds") or {}).items():
        if g:
            lines += [det_gate_markdown(g, f"{backend} build gate (deployed numerics)"), ""]
    return "\n".join(lines) + "\n"


def compile_detection(run_path: str | Path, out: str | Path, profile: Any, calib_size: int = 100,
                      checkset_cap: int = 300, seed: int = 0, overwrite: bool = False, speed_check: bool = False,
                      progress: Progress = print) -> Any:
    """Quantize (PTQ ladder), build and gate a detection run for ``profile`` into ``out``."""
    import tempfile

    from ..artifact import new_folder
    from ..backends import build_artifact
    from ..calibration.qdq import qdq_form
    from ..compile import judge_numerics
    from ..numerics import reference
    from ..targets import weight_range_for

    t0 = time.perf_counter()
    out = Path(out)
    if profile.precision != "int8":  # fp16/fp32 (the Jetson Nano): the float export, built and gated as it is
        return _compile_float(run_path, out, profile, checkset_cap, seed, overwrite, speed_check, progress)
    weight = weight_range_for(profile)
    form = qdq_form("auto", profile.backend)
    numerics = judge_numerics(profile)
    th = profile.gate
    with new_folder(out, overwrite) as d, tempfile.TemporaryDirectory(prefix="edgetl-detc-") as tmp:
        work = Path(tmp)
        run_manifest, mat, parity = _material(Path(run_path), work, calib_size, checkset_cap, seed, progress)
        progress(f"quantize: PTQ ladder ({form.key}, {'7' if weight[0] == 'reduced' else '8'}-bit weights; "
                 f"judged on {numerics.label})")
        kept, rows = ladder(mat, form, weight[0] == "reduced", numerics, th, work, LADDER, progress)
        ref_gate = kept["gate"] if numerics.kind == "reference" else judge(reference(), kept["model"], mat, th, work)
        quant = _quant_record(form, profile, weight, mat, rows, kept, numerics, parity, time.perf_counter() - t0)
        write_artifact(d, run_manifest, mat, kept, quant, ref_gate, out.name, profile)
        from ..backends import BuildOutcome

        entry = read_manifest(d).builds[0]
        outcome = BuildOutcome(dict(entry), [], entry.get("gate"))
        if profile.backend != "onnxruntime":
            progress(f"build: {profile.backend}")
            outcome = build_artifact(d, profile, speed_check=speed_check, progress=progress)
        from ..compile import _add_report_notes, foreign_kernels_note

        foreign = foreign_kernels_note(profile)  # an ARM target gated on this x86 machine's kernels, as classification's
        if foreign:
            _add_report_notes(d, [foreign])
            outcome.notes.insert(0, foreign)
    return read_manifest(out), outcome


def _compile_float(run_path: str | Path, out: Path, profile: Any, checkset_cap: int, seed: int, overwrite: bool,
                   speed_check: bool, progress: Progress) -> Any:
    import tempfile

    from ..artifact import new_folder
    from ..backends import build_artifact
    from ..compile import export_opset

    opset = export_opset(profile)
    with new_folder(out, overwrite) as d, tempfile.TemporaryDirectory(prefix="edgetl-detc-") as tmp:
        run_manifest, mat, parity = _material(Path(run_path), Path(tmp), 0, checkset_cap, seed, progress, opset)
        write_float_artifact(d, run_manifest, mat, parity, out.name, profile)
        progress(f"build: {profile.backend} {profile.precision} (no quantization)")
        outcome = build_artifact(d, profile, speed_check=speed_check, progress=progress)
    return read_manifest(out), outcome


def check_detection(folder: Path, manifest: Manifest, backend: str, entry: dict[str, Any], options: dict[str, Any],
                    thresholds: Any, update: bool, log: Progress) -> "DetGate":
    """``edgetl check`` of a detection artifact: the detection gate of one build (or the reference
    numerics) on the stored checkset, recorded like classification's (``edgetl.check.check_artifact``)."""
    from ..runtime.model import _postprocess_spec
    from ..runtime.preprocess import build_input_spec, to_model_input
    from ..runtime.runners import open_runner
    from .gate import evaluate_detection, load_det_checkset

    checkset = load_det_checkset(folder)
    post = _postprocess_spec(folder, manifest, verify=True)
    build_spec = build_input_spec(manifest.preprocess, entry.get("input"))
    inputs = to_model_input(checkset.inputs, manifest.preprocess, build_spec)
    log(f"gate: {backend} {entry['model']} on {len(checkset)} checkset images (detection)")
    runner = open_runner(entry["backend"], folder / entry["model"], options)
    try:
        boxes, scores = runner.infer_many_all(inputs)[:2]
        cpu = None
        if backend != "reference" and runner.uses_cpu:
            from ..runtime.cpu import host_cpu

            cpu = host_cpu().to_dict()
    finally:
        runner.close()
    gate = evaluate_detection((boxes, scores), checkset, post, thresholds, manifest.labels)
    gate["numerics"] = "reference" if backend == "reference" else "deployed"
    gate["cpu"] = cpu
    result = DetGate(gate)
    if update:
        record_detection_gate(folder, manifest, backend, result)
    return result


class DetGate:
    """A detection gate dict with the face of ``check.GateResult`` that the builders and the CLI use."""

    def __init__(self, gate: dict[str, Any]):
        self.gate = gate
        self.passed = bool(gate["passed"])
        self.failures = list(gate.get("failures") or [])

    def summary(self) -> dict[str, Any]:
        return dict(self.gate)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.gate)


def record_detection_gate(folder: Path, manifest: Manifest, backend: str, result: DetGate) -> Manifest:
    """The gate into the manifest (the build's entry, or ``gate`` for the reference numerics),
    report.json and report.md (keeping its benchmark section); the verdict re-derived; the folder sealed."""
    from ..check import gate_recorded
    from ..report import keep_bench_section
    from ..runtime.manifest import atomic_write

    report, new = gate_recorded(folder, manifest, backend, result)
    report_path = folder / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    # the `edgetl bench` section of report.md survives a re-gate, as classification's (edgetl.check.write_report)
    atomic_write(folder / "report.md", keep_bench_section(folder / "report.md", render_report(report)))
    return seal(folder, new)
