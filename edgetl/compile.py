"""``edgetl compile``: a trained run, or a model trained elsewhere (an FP32 ONNX classifier, or a
torchvision/timm state dict with its architecture name) -> a built, gated artifact for one target.

Steps, each reported through ``progress``:

1. **quantize** as the target profile says: ``int8`` -> ``edgetl.quantize.quantize_run`` (QAT or
   PTQ, the QDQ form the target's backend runs: s8s8 symmetric for TensorRT, u8s8 for ONNX
   Runtime/OpenVINO); ``fp16``/``fp32`` -> the float export and checkset only. A bare ONNX model is
   quantized by PTQ (``quantize_onnx``): there is no PyTorch model to fine-tune; for a float target
   it becomes a float artifact (``float_onnx_artifact``). A state dict (``compile_external``) is
   loaded strictly into its architecture and, with labelled images, compiled through a temporary
   run folder (PTQ or QAT, as any run); without labels, through its ONNX export (PTQ).
2. **build** for the target (``edgetl.backends.build_artifact``) and **gate** the build (the
   device's runner on the checkset); for TensorRT on a host without it, the build configuration
   and the pre-build gate are written for ``edgetl build`` on the device.
3. the artifact is written in a temp folder and renamed when complete (``atomic_output_dir``);
   a failed gate still leaves the (not deployable) artifact, and the caller exits non-zero.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .backends import BuildOutcome, build_artifact
from .fsutil import atomic_output_dir, check_output_dir
from .runtime.errors import EdgetlError
from .runtime.manifest import Manifest, read_manifest, seal, sha256_file
from .runtime.preprocess import PreprocessSpec
from .targets import TargetProfile

Progress = Callable[[str], None]


@dataclass
class CompileResult:
    artifact: Path
    profile: TargetProfile
    method: str | None  # the method kept (qat | ptq), or None (no quantization: fp16/fp32 target)
    artifact_gate: dict[str, Any] | None  # manifest.gate (the QDQ graph in reference numerics + the verdict)
    build: BuildOutcome
    steps: list[dict[str, Any]] = field(default_factory=list)  # {step, seconds, detail}
    notes: list[str] = field(default_factory=list)
    decided_by: str = ""  # what decides deployability (check.decisive): the target's build, or the reference
    decisive_gate: dict[str, Any] | None = None

    @property
    def build_gate(self) -> dict[str, Any] | None:
        return self.build.gate

    @property
    def passed(self) -> bool:
        """The decisive gate passed: the target's build on this machine, or (TensorRT before its engine
        is built on the device) the pre-build gate in reference numerics."""
        gate = self.build_gate if self.build.entry is None and isinstance(self.build_gate, dict) else self.decisive_gate
        return bool(isinstance(gate, dict) and gate.get("passed"))


def _result(out: Path, profile: TargetProfile, quantized: bool, outcome: BuildOutcome, steps: "_Steps",
            notes: list[str]) -> CompileResult:
    from .check import decisive

    manifest = read_manifest(out)
    what, gate = decisive(manifest)
    method = (manifest.quantization or {}).get("method") if quantized else None
    return CompileResult(out, profile, method, dict(manifest.gate) if manifest.gate else None, outcome, steps.rows,
                         notes, what, dict(gate) if isinstance(gate, dict) else None)


class _Steps:
    def __init__(self, progress: Progress):
        self.progress = progress
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], Any], detail: Callable[[Any], str] = lambda r: "") -> Any:
        self.progress(f"[{name}]")
        t0 = time.perf_counter()
        out = fn()
        self.rows.append({"step": name, "seconds": round(time.perf_counter() - t0, 1), "detail": detail(out)})
        return out


def quantize_config(profile: TargetProfile, method: str | None, speed_check: bool, **overrides: Any):
    """The QuantizeConfig of ``profile``: its gate (stability included), QDQ form and weight range
    (``targets.weight_range_for``: 7-bit weights where the device CPU's int8 sums saturate)."""
    from .backends import thresholds_for
    from .quantize import QuantizeConfig
    from .targets import weight_range_for

    wr, why = weight_range_for(profile)
    if overrides.get("weight_range") not in (None, "auto"):
        wr, why = overrides["weight_range"], f"--weight-range {overrides['weight_range']}"
    overrides = {k: v for k, v in overrides.items() if k != "weight_range"}
    return QuantizeConfig(method=method or profile.quantization.method, backend=profile.backend,
                          thresholds=thresholds_for(profile, speed_check, overrides.pop("labelled", True)),
                          weight_range=wr, weight_range_reason=why, **overrides)


def judge_numerics(profile: TargetProfile):
    """The numerics every repair round of ``profile`` is judged on (``edgetl.numerics.judge_for``)."""
    from .numerics import judge_for

    return judge_for(profile.backend, profile.options_for(profile.backend))


def _gate_detail(gate: Any) -> str:
    if not isinstance(gate, dict):
        return "no gate"
    return (f"{'passed' if gate.get('passed') else 'FAILED'}: top-1 {gate.get('quant_top1', 0):.4f} vs float "
            f"{gate.get('float_top1', 0):.4f}, agreement {gate.get('agreement', 0):.4f}")


def _ladder_detail(quant: Any) -> str:
    steps = [x for x in (quant or {}).get("ladder") or [] if "skipped" not in x]
    tried = ", ".join(f"{x['step']} {'passed' if x['passed'] else 'missed'}" for x in steps)
    return f"{tried}; kept {next((x['step'] for x in steps if x.get('kept')), '?')}" if steps else ""


def _build_detail(outcome: BuildOutcome) -> str:
    if outcome.entry is None:
        return "prepared for the device (" + ("pre-build gate " + _gate_detail(outcome.gate) if outcome.gate else
                                              "no gate") + ")"
    e = outcome.entry
    version = str(e.get("version", "")).split("-")[0]
    return f"{e['backend']} {version} {e.get('precision', '')} on {e.get('device', '')}"


def export_opset(profile: TargetProfile) -> int | None:
    """The ONNX opset a float export for ``profile`` needs (TensorRT: what every listed version parses)."""
    if profile.backend != "tensorrt":  # e.g. the Nano's TensorRT 8.2 parses up to opset 13
        return None
    from .backends.trt_conformance import max_opset

    return min(17, max_opset(profile.tensorrt.supported_versions))


def compile_run(run_path: str | Path, out: str | Path, profile: TargetProfile, method: str | None = None,
                speed_check: bool = True, overwrite: bool = False, progress: Progress = print,
                origin: dict[str, Any] | None = None, time_budget: float | None = None,
                **quantize_overrides: Any) -> CompileResult:
    """Quantize (as ``profile`` says), build and gate a run into the artifact folder ``out``.

    Every repair step is judged on the target's own numerics (``judge_numerics``); method "auto"
    climbs the ladder (``edgetl.repair.escalate``) within ``time_budget`` seconds.
    ``origin`` (a model trained elsewhere, see :func:`compile_external`): the run is a temporary
    stand-in; report.json names the source model instead of the run folder."""
    from .runs import load_run
    from .runtime.manifest import read_manifest

    if read_manifest(run_path).task == "detection":
        return _compile_detection(run_path, out, profile, method, overwrite, progress, quantize_overrides)
    out = Path(out)
    steps = _Steps(progress)
    run = load_run(run_path)
    profile.check_input_size(run.manifest.preprocess.input_size, f"the run {run_path}")
    quantized = profile.precision == "int8"
    if quantized:
        cfg = quantize_config(profile, method, speed_check, **quantize_overrides)
    with atomic_output_dir(out, overwrite) as d:
        if quantized:
            from .quantize import quantize_run

            judge = judge_numerics(profile)
            progress(f"weights: {cfg.weight_bits_note}. Why: {cfg.weight_range_reason}")
            steps.run(f"quantize ({'escalation ladder' if cfg.method == 'auto' else cfg.method}, {cfg.form.key}, "
                      f"{cfg.weight_bits_label}; judged on {judge.label})",
                      lambda: quantize_run(run_path, d, cfg, overwrite=True, log=progress, numerics=judge,
                                           time_budget=time_budget, profile=profile),
                      lambda r: _ladder_detail(r.manifest.quantization))
        else:
            opset = export_opset(profile)
            steps.run("export (float: no quantization for a " + profile.precision + " target)",
                      lambda: float_artifact(run, d, out.name, progress, opset=opset),
                      lambda m: f"FP32 ONNX (opset {opset or 'default'}) + checkset")
        _name_report(d, out.name, origin)
        outcome = steps.run(f"build ({profile.backend})",
                            lambda: build_artifact(d, profile, speed_check=speed_check, progress=progress),
                            _build_detail)
        foreign = foreign_kernels_note(profile)
        if foreign:
            _add_report_notes(d, [foreign])
    return _result(out, profile, quantized, outcome, steps, ([foreign] if foreign else []) + list(outcome.notes))


def foreign_kernels_note(profile: TargetProfile) -> str | None:
    """A note when ``profile`` is a CPU target of another architecture than this machine's (an
    ``arm64-cpu-onnxruntime`` artifact compiled on x86): its gate ran on this machine's kernels, whose
    INT8 arithmetic is not the device's, and the note says how to gate it on the device's."""
    from .runtime.cpu import host_cpu

    want = profile.hardware.cpu_arch
    if profile.backend == "tensorrt" or not want:
        return None
    host = host_cpu()
    if want == host.arch:
        return None
    return (f"the gate of this {profile.name} artifact ran on this machine's {host.arch} kernels "
            f"({host.short}), not on the {want} kernels the device runs; INT8 results differ between "
            f"them. Re-gate on {want}: `edgetl check ARTIFACT --backend {profile.backend}` on the board, or "
            "`make arm64-check` (the same check in an emulated Debian arm64 root, see docs/targets.md)")


def _add_report_notes(folder: Path, notes: list[str]) -> None:
    """Record ``notes`` in report.json (``notes``), re-render report.md from it, then reseal."""
    from .check import REPORT_JSON, write_report

    report = json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))
    report["notes"] = list(report.get("notes") or []) + [n for n in notes if n not in (report.get("notes") or [])]
    write_report(folder, report, labels=())
    seal(folder, read_manifest(folder))


def _compile_detection(run_path: str | Path, out: str | Path, profile: TargetProfile, method: str | None,
                       overwrite: bool, progress: Progress, overrides: dict[str, Any]) -> CompileResult:
    """A detection run: the PTQ ladder of ``edgetl.detect.compile`` (QAT is not offered for detection yet)."""
    from .detect.compile import compile_detection

    if method not in (None, "auto", "ptq"):
        raise EdgetlError(f"--method {method}: detection runs are quantized by PTQ (its ladder of calibrators and "
                          "float head) in this version", hint="leave --method out, or give --method ptq")
    steps = _Steps(progress)
    kw = {k: overrides[k] for k in ("calib_size", "checkset_cap", "seed") if overrides.get(k) is not None}
    manifest, outcome = steps.run("quantize + build (detection)",
                                  lambda: compile_detection(run_path, out, profile, overwrite=overwrite,
                                                            progress=progress, **kw),
                                  lambda r: (r[0].quantization or {}).get("verdict", ""))
    return _result(Path(out), profile, True, outcome, steps, list(outcome.notes) if outcome else [])


def _name_report(folder: Path, name: str, origin: dict[str, Any] | None) -> None:
    """report.json/md carry the artifact's name (not the temp folder's it was written in) and, for a
    model trained elsewhere (``origin``), name that model instead of the temporary run folder."""
    from .check import REPORT_JSON, write_report

    manifest = read_manifest(folder)
    report = json.loads((folder / REPORT_JSON).read_text(encoding="utf-8"))
    if report.get("name") == name and origin is None:
        return
    report["name"] = name
    if origin is not None:
        report["run"] = None
        report["source_model"] = origin
    write_report(folder, report, manifest.labels)
    seal(folder, manifest)


def write_float_artifact(folder: Path, name: str, checkset: Any, source: Manifest,
                         report_extra: dict[str, Any]) -> Manifest:
    """checkset.npz, report.json/md and manifest.json of a float artifact (``model_fp32.onnx`` is in
    ``folder`` already); labels, preprocessing, backbone and training come from ``source``."""
    from .check import CHECKSET_NAME, write_report
    from .runtime.manifest import default_input

    checkset.save(folder / CHECKSET_NAME)
    report = {"name": name, **report_extra, "deployable": True, "quantization": {"method": "none (float target)"}}
    write_report(folder, report, source.labels)
    manifest = Manifest(kind="artifact", labels=source.labels, preprocess=source.preprocess, task=source.task,
                        input=default_input(source.preprocess, "dynamic"), backbone=source.backbone,
                        training=source.training, quantization=None)
    return seal(folder, manifest)


def float_artifact(run: Any, folder: Path, name: str, progress: Progress = print, checkset_cap: int = 1000,
                   seed: int = 0, opset: int | None = None) -> Manifest:
    """An artifact without quantization (fp16/fp32 targets): FP32 ONNX (parity-checked) + checkset."""
    from .check import FP32_ONNX
    from .export import check_parity, export_onnx
    from .quantize import make_checkset

    spec = run.manifest.preprocess
    checkset = make_checkset(run, checkset_cap, seed)
    export_onnx(run.model, spec, folder / FP32_ONNX, **({"opset": opset} if opset else {}))
    parity = check_parity(checkset.float_logits[:200], folder / FP32_ONNX, checkset.inputs[:200])
    progress(f"export: {FP32_ONNX} parity max |diff| {parity.max_abs_diff:.2e}")
    return write_float_artifact(folder, name, checkset, run.manifest,
                                {"run": str(run.path), "parity": parity.to_dict()})


# ------------------------------------------------------------------------------------------
# A model trained elsewhere: FP32 ONNX, or a torchvision/timm state dict + its architecture name,
# with labels + preprocessing + a folder of images
# ------------------------------------------------------------------------------------------

STATE_DICT_SUFFIXES = (".pt", ".pth", ".safetensors")
AGREEMENT_ONLY = "none: the gate checks agreement with the float model only (accuracy drop not measured)"


def read_labels(path: Path) -> tuple[str, ...]:
    if not Path(path).is_file():
        raise EdgetlError(f"--labels {path}: no such file", hint="give a text file with one class name per line")
    labels = tuple(line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise EdgetlError(f"--labels {path}: needs at least two distinct class names, one per line")
    return labels


def read_preprocess(path: Path) -> PreprocessSpec:
    from .targets import tomllib

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise EdgetlError(f"--preprocess {path}: cannot read it as TOML ({exc})") from None
    data = data.get("preprocess", data)
    try:
        return PreprocessSpec.from_dict(data)
    except EdgetlError as exc:
        raise EdgetlError(f"--preprocess {path}: {exc.message}", hint=exc.hint) from None


def labelled_images(folder: Path, labels: tuple[str, ...]) -> tuple[list[tuple[Path, int]], bool]:
    """``(path, label index)`` of every image; labelled when all images sit in sub-folders named after labels."""
    from .calibration.sets import list_images

    folder = Path(folder)
    if not folder.is_dir():
        raise EdgetlError(f"--images {folder}: no such folder", hint="pass a folder of images (one sub-folder per class)")
    files = list_images(folder)
    if not files:
        raise EdgetlError(f"--images {folder}: no images found")
    subdirs = {p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1}
    top = [p for p in files if len(p.relative_to(folder).parts) == 1]
    if subdirs and not top:
        unknown = sorted(subdirs - set(labels))
        if unknown:
            raise EdgetlError(f"--images {folder}: sub-folder(s) {unknown[:5]} are not in --labels",
                              hint="name the class sub-folders exactly as the lines of the labels file")
        index = {name: i for i, name in enumerate(labels)}
        return [(p, index[p.relative_to(folder).parts[0]]) for p in files], True
    return [(p, -1) for p in files], False


def origin_record(path: Path, arch: str | None = None) -> dict[str, Any]:
    """Where a model trained elsewhere came from: file, sha256, format (and architecture for a state dict)."""
    path = Path(path)
    rec: dict[str, Any] = {"file": str(path.resolve()), "sha256": sha256_file(path),
                           "format": path.suffix.lower().lstrip(".")}
    if arch:
        rec["arch"] = arch
    return rec


def external_source(origin: dict[str, Any], labels: tuple[str, ...], spec: PreprocessSpec, images: Path,
                    labelled: bool, **training: Any) -> Manifest:
    """The run-manifest stand-in of a model trained elsewhere: backbone and training say where it came
    from (``training.labelled`` false: the checkset's labels are the float model's own predictions)."""
    backbone = {"name": origin.get("arch", "external-onnx"), "source": origin["file"], "sha256": origin["sha256"],
                "format": origin["format"]}
    return Manifest(kind="run", labels=labels, preprocess=spec, backbone=backbone,
                    training={"note": "trained outside edgetl", "source": dict(origin),
                              "images": str(Path(images).resolve()), "labelled": labelled, **training})


def _holdout(samples: list[tuple[Path, int]], images: Path, n: int, seed: int):
    """A stratified, seeded pick of ``n`` images (the checkset / test split) and the rest."""
    from .calibration.sets import select_stratified

    strat = [(p, max(lab, 0)) for p, lab in samples]
    chosen = select_stratified(strat, n, seed, min_images=1, root=Path(images), where=f"--images {images}")
    picked = set(chosen.paths)
    return chosen, [(p, lab) for p, lab in strat if p not in picked]


def _image_checkset(chosen: Any, labelled: bool, spec: PreprocessSpec, float_runner: Any):
    """The checkset of ``chosen`` images: float logits from the FP32 ONNX model (``float_runner``);
    labels from the class sub-folders, or the float model's predictions when there are none."""
    from .calibration.sets import load_images
    from .check import Checkset

    inputs = load_images(chosen.paths, spec)
    float_logits = float_runner.infer_many(inputs)
    y = np.asarray(chosen.labels, np.int64) if labelled else float_logits.argmax(1).astype(np.int64)
    return Checkset(inputs, y, float_logits, tuple(chosen.listing().splitlines()))


def check_onnx_file(model: Path) -> None:
    """A file that is not an ONNX model (random bytes, truncated) or whose graph is broken is bad
    input, named, before any work: ``onnx.checker`` on the file."""
    import onnx

    try:
        onnx.checker.check_model(str(model))
    except Exception as exc:  # DecodeError, ValidationError, InferenceError, ... (no common base)
        raise EdgetlError(f"{model}: not a valid ONNX model ({type(exc).__name__}: {_line(exc)})",
                          hint="pass an FP32 ONNX classifier (e.g. from torch.onnx.export), complete and "
                               "unmodified") from None


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= 200 else line[:197] + "..."


def _check_onnx_io(path: Path, shown: Path, labels: tuple[str, ...], spec: PreprocessSpec) -> None:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's Fail / InvalidGraph / NotImplemented (an op it does not run)
        raise EdgetlError(f"{shown}: ONNX Runtime cannot load the model ({type(exc).__name__}: {_line(exc)})",
                          hint="pass an FP32 ONNX classifier with standard ONNX ops (re-export it, e.g. with "
                               "another opset_version)") from None
    out_dim = sess.get_outputs()[0].shape[-1]
    if isinstance(out_dim, int) and out_dim != len(labels):
        raise EdgetlError(f"{shown}: the model outputs {out_dim} classes but --labels lists {len(labels)}")
    in_shape = sess.get_inputs()[0].shape
    if all(isinstance(d, int) for d in in_shape[1:]) and list(in_shape[1:]) != list(spec.tensor_shape(1)[1:]):
        raise EdgetlError(f"{shown}: input shape {in_shape[1:]} does not match the preprocessing "
                          f"({list(spec.tensor_shape(1)[1:])}, layout {spec.layout})",
                          hint="set input_size/layout in --preprocess (or --input-size) to the model's")


def _copy_fp32(model: Path, dst: Path, profile: TargetProfile) -> dict[str, Any] | None:
    """Copy the ONNX model to ``dst``; for a TensorRT target whose parser stops below the model's
    opset, convert it down (``onnx.version_converter``). Returns ``{from, to}`` when converted."""
    import onnx

    limit = export_opset(profile)
    m = onnx.load(str(model))
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    if limit is None or opset is None or opset <= limit:
        shutil.copyfile(model, dst)
        return None
    versions = ", ".join(profile.tensorrt.supported_versions)
    try:
        from onnx import version_converter

        conv = version_converter.convert_version(m, limit)
        onnx.checker.check_model(conv)
    except Exception as exc:  # the converter raises plain RuntimeErrors/ValueErrors per op
        raise EdgetlError(f"{model}: opset {opset} is newer than TensorRT {versions} parses (up to {limit}) and "
                          f"converting it failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                          hint=f"re-export the model with opset_version={limit}") from None
    onnx.save(conv, str(dst))
    return {"from": opset, "to": limit, "for": f"TensorRT {versions}"}


def _conversion_parity(model: Path, converted: Path, checkset: Any) -> dict[str, Any]:
    """The converted graph must compute what the given one computes (on the checkset images)."""
    from .export import ExportParityError, check_parity
    from .quantize import ort_logits

    n = min(200, len(checkset))
    try:
        return check_parity(ort_logits(model, checkset.inputs[:n]), converted, checkset.inputs[:n]).to_dict()
    except ExportParityError as exc:
        raise EdgetlError(f"{model}: after converting it to an older opset it computes other logits "
                          f"({exc.message.split('(', 1)[-1]}", hint="re-export the model at the opset the target "
                          "parses (see the profile's tensorrt.supported_versions)") from None


def quantize_onnx(model: Path, labels: tuple[str, ...], spec: PreprocessSpec, images: Path, folder: Path,
                  profile: TargetProfile, speed_check: bool = True, progress: Progress = print,
                  checkset_cap: int = 1000, seed: int = 0, origin: dict[str, Any] | None = None,
                  parity: dict[str, Any] | None = None, name: str | None = None, method: str | None = None,
                  time_budget: float | None = None, **quantize_overrides: Any) -> Manifest:
    """PTQ of an FP32 ONNX classifier into ``folder``: calibration and checkset split from ``images``,
    repaired on the target's numerics (the ladder's PTQ steps: there is no PyTorch model for QAT).

    With class sub-folders the gate checks accuracy and agreement; without labels it checks
    agreement with the float model only (the drop is not gated) and the manifest says so.
    ``origin``: where the model came from when ``model`` is edgetl's export of a state dict
    (``parity``: that export against PyTorch); default: ``model`` itself.
    """
    from .calibration.sets import CalibrationSet, assert_disjoint, select_stratified
    from .check import FP32_ONNX, GATE_BACKEND
    from .quantize import finish_artifact
    from .repair import Material, escalate
    from .runtime.runners import open_runner

    samples, labelled = labelled_images(images, labels)
    origin = origin or origin_record(model)
    cfg = quantize_config(profile, "ptq" if method == "ptq" else "auto", speed_check, labelled=labelled,
                          **quantize_overrides)
    conversion = _copy_fp32(model, folder / FP32_ONNX, profile)
    _check_onnx_io(folder / FP32_ONNX, model, labels, spec)
    n_check = min(checkset_cap, max(1, len(samples) // 2))
    chosen, rest = _holdout(samples, images, n_check, seed)
    cal = select_stratified(rest, cfg.calib_size, seed, cfg.calib_min, cfg.calib_exact, root=Path(images),
                            where=f"--images {images} (after the checkset split)")
    cal = CalibrationSet(cal.paths, cal.labels, f"dir:{images}", Path(images))
    assert_disjoint(cal, chosen.paths, "checkset")
    progress(f"images: {len(chosen)} for the checkset, {len(cal)} for calibration "
             f"({'labelled' if labelled else 'no labels: agreement with the float model only'})")
    float_runner = open_runner(GATE_BACKEND, folder / FP32_ONNX)
    try:
        checkset = _image_checkset(chosen, labelled, spec, float_runner)
    finally:
        float_runner.close()
    if conversion:
        conversion["parity"] = _conversion_parity(model, folder / FP32_ONNX, checkset)
    source = external_source(origin, labels, spec, images, labelled)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgetl-compile-") as tmp:
        mat = Material(folder, Path(tmp), source, cal, cal.load(spec), checkset, parity)
        esc = escalate(mat, cfg, judge_numerics(profile), progress, time_budget, profile)
        manifest, _ = finish_artifact(
            mat, esc, progress, timings={"repair_s": time.perf_counter() - t0}, t_start=t0,
            report_extra={"name": name or folder.name, "model": origin["file"], "source_model": origin,
                          "opset_conversion": conversion},
            quant_extra={"source_model": {"file": origin["file"], "sha256": origin["sha256"]}, "labelled": labelled,
                         "labels": "from --images sub-folders" if labelled else AGREEMENT_ONLY})
    return manifest


def float_onnx_artifact(model: Path, labels: tuple[str, ...], spec: PreprocessSpec, images: Path, folder: Path,
                        name: str, profile: TargetProfile, progress: Progress = print, checkset_cap: int = 1000,
                        seed: int = 0, origin: dict[str, Any] | None = None,
                        parity: dict[str, Any] | None = None) -> Manifest:
    """A float artifact (fp16/fp32 targets) of an FP32 ONNX classifier: the model (converted down to
    the opset a TensorRT target parses, parity-checked) + a checkset of up to ``checkset_cap`` of
    ``images`` (every image: nothing is held back for calibration)."""
    from .check import FP32_ONNX, GATE_BACKEND
    from .runtime.runners import open_runner

    samples, labelled = labelled_images(images, labels)
    origin = origin or origin_record(model)
    conversion = _copy_fp32(model, folder / FP32_ONNX, profile)
    _check_onnx_io(folder / FP32_ONNX, model, labels, spec)
    chosen, _ = _holdout(samples, images, min(checkset_cap, len(samples)), seed)
    runner = open_runner(GATE_BACKEND, folder / FP32_ONNX)
    try:
        checkset = _image_checkset(chosen, labelled, spec, runner)
    finally:
        runner.close()
    if conversion:
        conversion["parity"] = _conversion_parity(model, folder / FP32_ONNX, checkset)
        progress(f"opset {conversion['from']} -> {conversion['to']} for {conversion['for']}: max |diff| "
                 f"{conversion['parity']['max_abs_diff']:.2e}")
    progress(f"images: {len(checkset)} for the checkset "
             f"({'labelled' if labelled else 'no labels: agreement with the float model only'})")
    report = {"model": origin["file"], "source_model": origin, "parity": parity, "opset_conversion": conversion,
              "labels": "from --images sub-folders" if labelled else AGREEMENT_ONLY}
    return write_float_artifact(folder, name, checkset, external_source(origin, labels, spec, images, labelled),
                                report)


def compile_onnx(model: str | Path, labels: tuple[str, ...], spec: PreprocessSpec, images: str | Path,
                 out: str | Path, profile: TargetProfile, speed_check: bool = True, overwrite: bool = False,
                 progress: Progress = print, origin: dict[str, Any] | None = None,
                 parity: dict[str, Any] | None = None, method: str | None = None,
                 time_budget: float | None = None, **quantize_overrides: Any) -> CompileResult:
    """Compile an FP32 ONNX classifier trained elsewhere: PTQ for an int8 target, the float model for
    fp16/fp32 (labels optional, see :func:`quantize_onnx`). ``origin``/``parity``: see there."""
    model, out = Path(model), Path(out)
    if not model.is_file():
        raise EdgetlError(f"{model}: no such ONNX file")
    check_onnx_file(model)
    profile.check_input_size(spec.input_size, "--preprocess")
    _, labelled = labelled_images(Path(images), labels)
    steps = _Steps(progress)
    quantized = profile.precision == "int8"
    why = ("QAT needs labelled images: --images has no class sub-folders" if origin and origin.get("arch") else
           "a bare ONNX model has no training loop for QAT")
    with atomic_output_dir(out, overwrite) as d:
        if quantized:
            steps.run(f"quantize (ptq: {why})",
                      lambda: quantize_onnx(model, labels, spec, Path(images), d, profile, speed_check, progress,
                                            origin=origin, parity=parity, name=out.name, method=method,
                                            time_budget=time_budget, **quantize_overrides),
                      lambda m: _ladder_detail(m.quantization))
        else:
            steps.run(f"float artifact (no quantization for a {profile.precision} target)",
                      lambda: float_onnx_artifact(model, labels, spec, Path(images), d, out.name, profile, progress,
                                                  origin=origin, parity=parity),
                      lambda m: "FP32 ONNX + checkset")
        outcome = steps.run(f"build ({profile.backend})",
                            lambda: build_artifact(d, profile, speed_check=speed_check, progress=progress),
                            _build_detail)
        foreign = foreign_kernels_note(profile)
        if foreign:
            _add_report_notes(d, [foreign])
    notes = [foreign] if foreign else []
    if quantized:
        notes.append(f"method: PTQ ({why}: QAT fine-tunes the PyTorch model on labelled images)")
    if not labelled:
        notes.append("no labels (--images has no class sub-folders): the gate checks agreement with the float "
                     "model only; the accuracy drop is not measured")
    return _result(out, profile, quantized, outcome, steps, notes + list(outcome.notes))


# ---- a state dict of a torchvision/timm architecture ----------------------------------------

def load_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` file.

    A training checkpoint holding the weights under ``state_dict``/``model_state_dict``/``model`` is
    unwrapped, and a ``module.`` prefix (DataParallel/DDP) is removed."""
    import torch

    path = Path(path)
    how = "save the weights alone: torch.save(model.state_dict(), 'weights.pth') (or safetensors.torch.save_file)"
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd: Any = load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
            raise EdgetlError(f"{path}: cannot read it as safetensors ({exc})", hint=how) from None
    else:
        import pickle

        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise EdgetlError(f"{path}: not a plain state dict: torch.load(weights_only=True) refused it "
                              f"({str(exc).strip().splitlines()[0][:200]})",
                              hint=how + "; a pickled whole model or extra Python objects are not loaded "
                                         "(unpickling can run code)") from None
        except Exception as exc:  # truncated file, not a torch file, ...
            raise EdgetlError(f"{path}: torch.load cannot read it ({type(exc).__name__}: {exc})", hint=how) from None
        if isinstance(sd, dict):
            for key in ("state_dict", "model_state_dict", "model"):
                if isinstance(sd.get(key), dict):
                    sd = sd[key]
                    break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EdgetlError(f"{path}: holds no state dict (a mapping of parameter names to tensors)", hint=how)
    if all(str(k).startswith("module.") for k in sd):
        sd = {str(k)[len("module."):]: v for k, v in sd.items()}
    return sd


def external_model(weights: Path, arch: str, labels: tuple[str, ...], labels_file: str | Path = "--labels"):
    """``arch`` (``torchvision:NAME``/``timm:NAME``) with ``len(labels)`` outputs and the weights of
    ``weights`` loaded strictly; a mismatch is an error that says which side is wrong."""
    from .backbones import build_external

    model = build_external(arch, len(labels))
    sd = load_state_dict(weights)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    n = len(labels)
    if wrong and not missing and not unexpected and all(o[:1] == (n,) and s[1:] == o[1:] for _, s, o in wrong):
        outs = sorted({s[0] if s else 0 for _, s, _ in wrong})
        raise EdgetlError(f"{weights}: its classifier ({', '.join(k for k, _, _ in wrong)}) has "
                          f"{' or '.join(map(str, outs))} outputs, but --labels {labels_file} lists {n} classes",
                          hint="the labels file must list exactly the classes the model was trained on, one per line, "
                               "in the order of its outputs")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) of {arch} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} not in {arch} (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {wrong[0][0]}: {list(wrong[0][1])} in the file, "
                         f"{list(wrong[0][2])} in {arch})")
        raise EdgetlError(f"{weights}: the state dict does not fit --arch {arch}: " + "; ".join(parts),
                          hint="give --arch the architecture the model was trained as (the exact name passed to "
                               "torchvision.models.get_model / timm.create_model), and a state dict of that model "
                               "itself, not of a wrapper around it")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # pragma: no cover - the checks above catch what strict loading refuses
        raise EdgetlError(f"{weights}: does not load into --arch {arch}: {str(exc).splitlines()[0]}") from None
    return model.eval()


def materialise_run(model: Any, origin: dict[str, Any], labels: tuple[str, ...], spec: PreprocessSpec,
                    samples: list[tuple[Path, int]], images: Path, folder: Path, seed: int = 0,
                    test_cap: int = 1000) -> Path:
    """A run folder (the contract of ``edgetl/runs.py``) for a model trained elsewhere, so that
    ``compile_run`` quantizes it exactly like a run trained with edgetl.

    split.json: a stratified, seeded split of the labelled ``images``: ``test`` (half, at most
    ``test_cap``: the checkset) and ``train`` (calibration and QAT); ``val`` is empty (no model is
    selected here). backbone ``torchvision:NAME``/``timm:NAME``, training names the source file."""
    from .runs import SPLIT_FILE, save_weights

    images = Path(images)
    root = images.resolve()
    test, train = _holdout(samples, images, min(test_cap, max(1, len(samples) // 2)), seed)

    def rows(pairs: Any) -> list[dict[str, str]]:
        return [{"path": Path(p).relative_to(images).as_posix(), "label": labels[lab]} for p, lab in pairs]

    splits = {"train": rows(train), "val": [], "test": rows(zip(test.paths, test.labels))}
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder)
    (folder / SPLIT_FILE).write_text(json.dumps({"root": str(root), "seed": seed, "splits": splits}, indent=1) + "\n")
    counts = {name: {lab: sum(1 for r in part if r["label"] == lab) for lab in labels} for name, part in splits.items()}
    stand_in = external_source(origin, labels, spec, images, True, split_seed=seed, class_counts=counts)
    seal(folder, stand_in)
    return folder


def compile_external(weights: str | Path, arch: str, labels: tuple[str, ...], spec: PreprocessSpec,
                     images: str | Path, out: str | Path, profile: TargetProfile, method: str | None = None,
                     speed_check: bool = True, overwrite: bool = False, progress: Progress = print,
                     labels_file: str | Path = "--labels", seed: int = 0, **quantize_overrides: Any) -> CompileResult:
    """Compile a torchvision/timm state dict trained elsewhere (``arch`` = ``torchvision:NAME``/``timm:NAME``).

    The weights are loaded strictly into the plain architecture with ``len(labels)`` outputs. With
    labelled ``images`` (one sub-folder per class) a temporary run folder is materialised
    (:func:`materialise_run`) and handed to :func:`compile_run`: PTQ and QAT work exactly as for a
    run trained with edgetl. Without labels: the model is exported to ONNX (parity-checked) and
    compiled like a bare ONNX model (PTQ, agreement-only gate); ``--method qat`` is refused. The
    temporary run is deleted afterwards; the artifact's manifest records the source file, its
    sha256 and the architecture (``backbone`` and ``training.source``).
    """
    from .export import check_parity, export_onnx, torch_logits

    weights, images, out = Path(weights), Path(images), Path(out)
    if not weights.is_file():
        raise EdgetlError(f"{weights}: no such file")
    if weights.suffix.lower() not in STATE_DICT_SUFFIXES:
        raise EdgetlError(f"{weights}: a state dict is read from {', '.join(STATE_DICT_SUFFIXES)} files",
                          hint="save it with torch.save(model.state_dict(), 'weights.pth'), or pass an .onnx model")
    check_output_dir(out, overwrite)
    profile.check_input_size(spec.input_size, "--preprocess")
    samples, labelled = labelled_images(images, labels)
    if profile.precision == "int8" and not labelled and method == "qat":
        raise EdgetlError(f"--method qat needs labelled images, and --images {images} has no class sub-folders",
                          hint="put the images in one sub-folder per class, named as in --labels, or use --method ptq "
                               "(the gate then checks agreement with the float model only)")
    model = external_model(weights, arch, labels, labels_file)
    origin = origin_record(weights, arch)
    progress(f"{arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters loaded from {weights}")
    with tempfile.TemporaryDirectory(prefix="edgetl-external-") as tmp:
        if labelled:
            run = materialise_run(model, origin, labels, spec, samples, images, Path(tmp) / "run", seed)
            progress(f"temporary run: {len(samples)} labelled images split train/test (seed {seed})")
            result = compile_run(run, out, profile, method, speed_check, overwrite, progress, origin=origin,
                                 **quantize_overrides)
            result.notes.insert(0, f"model trained elsewhere: {arch} from {weights} (sha256 {origin['sha256'][:12]}…), "
                                   "compiled through a temporary run folder (not kept)")
            return result
        opset = export_opset(profile)
        onnx_path = export_onnx(model, spec, Path(tmp) / "model.onnx", **({"opset": opset} if opset else {}))
        from .calibration.sets import load_images

        probe = load_images([p for p, _ in samples[:: max(1, len(samples) // 64)]], spec)
        parity = check_parity(torch_logits(model, probe), onnx_path, probe).to_dict()
        progress(f"export: ONNX parity with PyTorch max |diff| {parity['max_abs_diff']:.2e} on {len(probe)} images")
        return compile_onnx(onnx_path, labels, spec, images, out, profile, speed_check, overwrite, progress,
                            origin=origin, parity=parity, method=method, **quantize_overrides)
