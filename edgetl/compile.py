"""``edgetl compile``: a trained run (or an FP32 ONNX classifier) -> a built, gated artifact for one target.

Steps, each reported through ``progress``:

1. **quantize** as the target profile says: ``int8`` -> ``edgetl.quantize.quantize_run`` (QAT or
   PTQ, the QDQ form the target's backend runs: s8s8 symmetric for TensorRT, u8s8 for ONNX
   Runtime/OpenVINO); ``fp16``/``fp32`` -> the float export and checkset only. A bare ONNX model is
   quantized by PTQ (``quantize_onnx``): there is no PyTorch model to fine-tune.
2. **build** for the target (``edgetl.backends.build_artifact``) and **gate** the build (the
   device's runner on the checkset); for TensorRT on a host without it, the build configuration
   and the pre-build gate are written for ``edgetl build`` on the device.
3. the artifact is written in a temp folder and renamed when complete (``atomic_output_dir``);
   a failed gate still leaves the (not deployable) artifact, and the caller exits non-zero.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .backends import BuildOutcome, build_artifact
from .fsutil import atomic_output_dir
from .runtime.errors import EdgetlError
from .runtime.manifest import Manifest, read_manifest, sha256_file, write_manifest
from .runtime.preprocess import PreprocessSpec
from .targets import TargetProfile

Progress = Callable[[str], None]


@dataclass
class CompileResult:
    artifact: Path
    profile: TargetProfile
    method: str | None  # qat | ptq | None (no quantization: fp16/fp32 target)
    artifact_gate: dict[str, Any] | None  # manifest.gate (the QDQ graph through ONNX Runtime)
    build: BuildOutcome
    steps: list[dict[str, Any]] = field(default_factory=list)  # {step, seconds, detail}
    notes: list[str] = field(default_factory=list)

    @property
    def build_gate(self) -> dict[str, Any] | None:
        return self.build.gate

    @property
    def passed(self) -> bool:
        gates = [g for g in (self.artifact_gate, self.build_gate) if isinstance(g, dict)]
        return all(g.get("passed") for g in gates)


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
    from .check import Thresholds
    from .quantize import QuantizeConfig

    th = Thresholds(max_drop=profile.gate.max_accuracy_drop, min_agreement=profile.gate.min_agreement,
                    speed_check=speed_check)
    return QuantizeConfig(method=method or profile.quantization.method, backend=profile.backend, thresholds=th,
                          **overrides)


def _gate_detail(gate: Any) -> str:
    if not isinstance(gate, dict):
        return "no gate"
    return (f"{'passed' if gate.get('passed') else 'FAILED'}: top-1 {gate.get('quant_top1', 0):.4f} vs float "
            f"{gate.get('float_top1', 0):.4f}, agreement {gate.get('agreement', 0):.4f}")


def _build_detail(outcome: BuildOutcome) -> str:
    if outcome.entry is None:
        return "prepared for the device (" + ("pre-build gate " + _gate_detail(outcome.gate) if outcome.gate else
                                              "no gate") + ")"
    e = outcome.entry
    version = str(e.get("version", "")).split("-")[0]
    return f"{e['backend']} {version} {e.get('precision', '')} on {e.get('device', '')}"


def compile_run(run_path: str | Path, out: str | Path, profile: TargetProfile, method: str | None = None,
                speed_check: bool = True, overwrite: bool = False, progress: Progress = print,
                **quantize_overrides: Any) -> CompileResult:
    """Quantize (as ``profile`` says), build and gate a run into the artifact folder ``out``."""
    from .runs import load_run

    out = Path(out)
    steps = _Steps(progress)
    run = load_run(run_path)
    profile.check_input_size(run.manifest.preprocess.input_size, f"the run {run_path}")
    quantized = profile.precision == "int8"
    if quantized:
        cfg = quantize_config(profile, method, speed_check, **quantize_overrides)
        method = cfg.method
    with atomic_output_dir(out, overwrite) as d:
        if quantized:
            from .quantize import quantize_run

            steps.run(f"quantize ({cfg.method}, {cfg.form.key})",
                      lambda: quantize_run(run_path, d, cfg, overwrite=True, log=progress),
                      lambda r: _gate_detail(r.gate.summary()))
        else:
            method = None
            opset = None
            if profile.backend == "tensorrt":  # e.g. the Nano's TensorRT 8.2 parses up to opset 13
                from .backends.trt_conformance import max_opset

                opset = min(17, max_opset(profile.tensorrt.supported_versions))
            steps.run("export (float: no quantization for a " + profile.precision + " target)",
                      lambda: float_artifact(run, d, out.name, progress, opset=opset),
                      lambda m: f"FP32 ONNX (opset {opset or 'default'}) + checkset")
        outcome = steps.run(f"build ({profile.backend})",
                            lambda: build_artifact(d, profile, speed_check=speed_check, progress=progress),
                            _build_detail)
    manifest = read_manifest(out)
    return CompileResult(out, profile, method, dict(manifest.gate) if manifest.gate else None, outcome, steps.rows,
                         list(outcome.notes))


def float_artifact(run: Any, folder: Path, name: str, progress: Progress = print, checkset_cap: int = 1000,
                   seed: int = 0, opset: int | None = None) -> Manifest:
    """An artifact without quantization (fp16/fp32 targets): FP32 ONNX (parity-checked) + checkset."""
    from .check import CHECKSET_NAME, FP32_ONNX, write_report
    from .export import check_parity, export_onnx
    from .quantize import make_checkset
    from .runtime.manifest import default_input, hash_files

    spec = run.manifest.preprocess
    checkset = make_checkset(run, checkset_cap, seed)
    export_onnx(run.model, spec, folder / FP32_ONNX, **({"opset": opset} if opset else {}))
    parity = check_parity(checkset.float_logits[:200], folder / FP32_ONNX, checkset.inputs[:200])
    progress(f"export: {FP32_ONNX} parity max |diff| {parity.max_abs_diff:.2e}")
    checkset.save(folder / CHECKSET_NAME)
    report = {"name": name, "run": str(run.path), "deployable": True, "parity": parity.to_dict(),
              "quantization": {"method": "none (float target)"}}
    write_report(folder, report, run.manifest.labels)
    manifest = Manifest(kind="artifact", labels=run.manifest.labels, preprocess=spec, task=run.manifest.task,
                        input=default_input(spec, "dynamic"), backbone=run.manifest.backbone,
                        training=run.manifest.training, quantization=None, files=hash_files(folder))
    write_manifest(manifest, folder)
    return manifest


# ------------------------------------------------------------------------------------------
# A model trained elsewhere: FP32 ONNX + labels + preprocessing + a folder of images
# ------------------------------------------------------------------------------------------

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


def quantize_onnx(model: Path, labels: tuple[str, ...], spec: PreprocessSpec, images: Path, folder: Path,
                  profile: TargetProfile, speed_check: bool = True, progress: Progress = print,
                  checkset_cap: int = 1000, seed: int = 0, **quantize_overrides: Any) -> Manifest:
    """PTQ of an FP32 ONNX classifier into ``folder``: calibration and checkset split from ``images``.

    With class sub-folders the gate checks accuracy and agreement; without labels it checks
    agreement with the float model only (the drop is not gated) and the manifest says so.
    """
    import onnxruntime as ort

    from .calibration.cache import save_ranges
    from .calibration.calibrators import calibrate
    from .calibration.sets import CalibrationSet, LISTING_NAME, assert_disjoint, load_images, select_stratified
    from .check import CHECKSET_NAME, FP32_ONNX, GATE_BACKEND, INT8_ONNX, Checkset, evaluate, write_report
    from .quantize import _artifact_manifest, _quantization_record, prepare_float, quantize_with_fallback
    from .runtime.runners import open_runner

    samples, labelled = labelled_images(images, labels)
    cfg = quantize_config(profile, "ptq", speed_check, **quantize_overrides)
    if not labelled:
        from dataclasses import replace

        cfg = replace(cfg, thresholds=replace(cfg.thresholds, max_drop=100.0))
    form = cfg.form
    shutil.copyfile(model, folder / FP32_ONNX)
    sess = ort.InferenceSession(str(folder / FP32_ONNX), providers=["CPUExecutionProvider"])
    out_dim = sess.get_outputs()[0].shape[-1]
    if isinstance(out_dim, int) and out_dim != len(labels):
        raise EdgetlError(f"{model}: the model outputs {out_dim} classes but --labels lists {len(labels)}")
    in_shape = sess.get_inputs()[0].shape
    if all(isinstance(d, int) for d in in_shape[1:]) and list(in_shape[1:]) != list(spec.tensor_shape(1)[1:]):
        raise EdgetlError(f"{model}: input shape {in_shape[1:]} does not match the preprocessing "
                          f"({list(spec.tensor_shape(1)[1:])}, layout {spec.layout})",
                          hint="set input_size/layout in --preprocess (or --input-size) to the model's")
    del sess
    n_check = min(checkset_cap, max(1, len(samples) // 2))
    strat = [(p, max(lab, 0)) for p, lab in samples]
    chosen = select_stratified(strat, n_check, seed, min_images=1, root=Path(images), where=f"--images {images}")
    chosen_set = set(chosen.paths)
    rest = [(p, lab) for p, lab in strat if p not in chosen_set]
    cal = select_stratified(rest, cfg.calib_size, seed, cfg.calib_min, cfg.calib_exact, root=Path(images),
                            where=f"--images {images} (after the checkset split)")
    cal = CalibrationSet(cal.paths, cal.labels, f"dir:{images}", Path(images))
    assert_disjoint(cal, chosen.paths, "checkset")
    progress(f"images: {len(chosen)} for the checkset, {len(cal)} for calibration "
             f"({'labelled' if labelled else 'no labels: agreement with the float model only'})")
    check_inputs = load_images(chosen.paths, spec)
    float_runner = open_runner(GATE_BACKEND, folder / FP32_ONNX)
    float_logits = float_runner.infer_many(check_inputs)
    y = np.asarray(chosen.labels, np.int64) if labelled else float_logits.argmax(1).astype(np.int64)
    checkset = Checkset(check_inputs, y, float_logits, tuple(chosen.listing().splitlines()))
    cal_inputs = cal.load(spec)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgetl-compile-") as tmp:
        work = Path(tmp)
        prepared = prepare_float(folder / FP32_ONNX, work / "prepared.onnx")
        ranges = calibrate(prepared, cal_inputs, cfg.resolved_calibrator, form.symmetric_activations, 16)
        cache = save_ranges(ranges, work / "ranges.json")
        r = quantize_with_fallback(prepared, cache, form, folder / INT8_ONNX, checkset, labels, cfg,
                                   cal_inputs[:cfg.sensitivity_images], work, progress)
    runner = open_runner(GATE_BACKEND, folder / INT8_ONNX)
    gated = GATE_BACKEND in form.fast_on
    note = "" if gated else f"measured, not gated: the {form.key} form is rendered for {', '.join(form.fast_on)}"
    try:
        gate = evaluate(runner, checkset, cfg.thresholds, labels, float_runner if speed_check else None, gated, note)
    finally:
        runner.close()
        float_runner.close()
    checkset.save(folder / CHECKSET_NAME)
    (folder / LISTING_NAME).write_text(cal.listing(), encoding="utf-8")
    quant = _quantization_record(cfg, form, cal, r, None, {}, {"total_s": time.perf_counter() - t0})
    quant["source_model"] = {"file": str(model), "sha256": sha256_file(folder / FP32_ONNX)}
    quant["labelled"] = labelled
    quant["labels"] = "from --images sub-folders" if labelled else \
        "none: the gate checks agreement with the float model only (accuracy drop not measured)"
    report = {"name": folder.name, "model": str(model), "deployable": gate.passed, "quantization": quant,
              "gate": gate.to_dict(), "rounds": r.rounds}
    write_report(folder, report, labels, gate)
    pseudo_run = Manifest(kind="run", labels=labels, preprocess=spec,
                          backbone={"name": "external-onnx", "source": str(model),
                                    "sha256": quant["source_model"]["sha256"]},
                          training={"note": "trained outside edgetl"})
    manifest = _artifact_manifest(pseudo_run, cfg, quant, gate, folder)
    write_manifest(manifest, folder)
    return manifest


def compile_onnx(model: str | Path, labels: tuple[str, ...], spec: PreprocessSpec, images: str | Path,
                 out: str | Path, profile: TargetProfile, speed_check: bool = True, overwrite: bool = False,
                 progress: Progress = print, **quantize_overrides: Any) -> CompileResult:
    """Compile an FP32 ONNX classifier trained elsewhere (PTQ; labels optional, see :func:`quantize_onnx`)."""
    model, out = Path(model), Path(out)
    if not model.is_file():
        raise EdgetlError(f"{model}: no such ONNX file")
    if profile.precision != "int8":
        raise EdgetlError(f"compiling a bare ONNX model for a {profile.precision} target is not supported yet",
                          hint="use an int8 target, or train the model with edgetl and compile the run")
    profile.check_input_size(spec.input_size, "--preprocess")
    steps = _Steps(progress)
    with atomic_output_dir(out, overwrite) as d:
        steps.run("quantize (ptq: a bare ONNX model has no training loop for QAT)",
                  lambda: quantize_onnx(model, labels, spec, Path(images), d, profile, speed_check, progress,
                                        **quantize_overrides),
                  lambda m: _gate_detail(m.gate))
        outcome = steps.run(f"build ({profile.backend})",
                            lambda: build_artifact(d, profile, speed_check=speed_check, progress=progress),
                            _build_detail)
    manifest = read_manifest(out)
    return CompileResult(out, profile, "ptq", dict(manifest.gate) if manifest.gate else None, outcome, steps.rows,
                         ["method: PTQ (a bare ONNX model cannot be fine-tuned: QAT needs the PyTorch model)"]
                         + list(outcome.notes))
