"""``edgetl quantize``: a trained run -> a gated artifact (FP32 ONNX + QDQ INT8 ONNX + checkset + report).

Pipeline (every step recorded in the manifest and report):

1. FP32 export (``model_fp32.onnx``), parity-checked against PyTorch on held-out test images.
2. Calibration set from the run's TRAIN split (stratified) or ``--calib-dir``; ranges computed once
   by the chosen calibrator and kept as an ONNX Runtime calibration cache.
3. PTQ: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel weights) in the QDQ form
   the consuming backend runs fast (``calibration.qdq.QDQ_FORMS``).
   QAT: NNCF quantizes the PyTorch model (ranges initialised by the calibrator's NNCF range
   estimator on the same calibration set = PTQ ranges), fine-tunes it a few epochs at a small LR,
   exports it (``nncf.strip`` + TorchScript ONNX export: NNCF's QDQ form), then that result, the
   QAT-trained weights (fake-quantized) and the learned activation ranges, is re-rendered by
   ``quantize_static`` in the chosen form (``calibration.qdq.strip_qdq``). Both forms are measured.
4. The gate (``edgetl.check``) on the checkset; when accuracy misses it, layers ranked most
   sensitive are kept in float (``nodes_to_exclude``), re-quantized and re-checked, up to
   ``max_fallback_rounds``.
5. The artifact is written atomically whether the gate passed or not; a failed gate marks it not
   deployable (manifest.gate.passed = false) and the command exits 1.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .calibration import sensitivity as sens
from .calibration.cache import merge_ranges, save_ranges
from .calibration.calibrators import calibrate, get_calibrator
from .calibration.qdq import QDQ_FORMS, QdqForm, qdq_form, quantized_nodes, strip_qdq, weighted_nodes
from .calibration.sets import (DEFAULT_MIN, DEFAULT_SIZE, LISTING_NAME, CalibrationSet, assert_disjoint, from_folder,
                               load_images, select_stratified)
from .check import (CHECKSET_NAME, FP32_ONNX, GATE_BACKEND, INT8_ONNX, Checkset, GateResult, Thresholds,
                    gate_from_logits, measure_speed, write_report)
from .export import check_parity, export_onnx, torch_logits
from .fsutil import atomic_output_dir, check_output_dir
from .runtime.errors import EdgetlError, MissingDependencyError
from .runtime.manifest import Manifest, default_input, hash_files, write_manifest
from .runtime.runners import open_runner

METHODS = ("ptq", "qat")
QAT_LOSSES = ("distill", "ce")
DEFAULT_CALIBRATOR = {"ptq": "minmax", "qat": "mse"}
SENSITIVITY_CSV = "sensitivity.csv"
FORMS_DIR = "forms"
PARITY_IMAGES = 200
Log = Callable[[str], None]


@dataclass(frozen=True)
class QuantizeConfig:
    method: str = "ptq"
    calibrator: str | None = None  # None: DEFAULT_CALIBRATOR[method]
    backend: str = GATE_BACKEND  # the backend the artifact is rendered for (picks the QDQ form)
    qdq_form: str = "auto"  # auto | s8s8 | u8s8
    calib_size: int = DEFAULT_SIZE
    calib_exact: bool = False  # the size was asked for explicitly: fewer available is an error
    calib_min: int = DEFAULT_MIN
    calib_dir: str | None = None
    seed: int = 0
    checkset_cap: int = 1000
    static_batch: int | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    max_fallback_rounds: int = 3
    fallback_step: int = 1  # layers kept in float per round
    sensitivity: bool = False  # rank every layer even when round 0 passes (else: only when a fallback needs it)
    sensitivity_images: int = 32
    qat_epochs: int = 2
    qat_lr: float = 1e-5
    qat_batch_size: int = 32
    qat_max_images: int | None = None  # training images per epoch (None: the whole train split)
    qat_freeze_bn: bool = True
    qat_loss: str = "distill"  # distill: match the float model's logits (KL, the gate's agreement); ce: labels
    all_forms: bool = False  # also write the other QDQ forms under forms/ and measure them side by side

    def __post_init__(self) -> None:
        def bad(opt: str, value: Any, hint: str) -> EdgetlError:
            return EdgetlError(f"{opt} {value!r} is not valid", hint=hint)

        if self.method not in METHODS:
            raise bad("--method", self.method, f"use one of {METHODS}")
        cal = get_calibrator(self.resolved_calibrator)
        if self.method == "qat" and cal.nncf_estimator is None:
            raise EdgetlError(f"--calibrator {cal.name} cannot initialise QAT (NNCF has no {cal.name} range estimator)",
                              hint="use --calibrator mse, minmax or percentile with --method qat")
        qdq_form(self.qdq_form, self.backend)
        for opt, v, lo in (("--calib-size", self.calib_size, 1), ("--calib-min", self.calib_min, 1),
                           ("--checkset-cap", self.checkset_cap, 1), ("--max-fallback-rounds", self.max_fallback_rounds, 0),
                           ("--fallback-step", self.fallback_step, 1), ("--sensitivity-images", self.sensitivity_images, 1),
                           ("--qat-epochs", self.qat_epochs, 1), ("--qat-batch-size", self.qat_batch_size, 1)):
            if int(v) < lo:
                raise bad(opt, v, f"give an integer ≥ {lo}")
        if self.qat_max_images is not None and self.qat_max_images < 1:
            raise bad("--qat-max-images", self.qat_max_images, "give a number of images ≥ 1, or leave it out for all")
        if self.static_batch is not None and self.static_batch < 1:
            raise bad("--static-batch", self.static_batch, "give a batch size ≥ 1, or leave it out for a dynamic batch")
        if self.qat_loss not in QAT_LOSSES:
            raise bad("--qat-loss", self.qat_loss, f"use one of {QAT_LOSSES}")
        if not self.qat_lr > 0:
            raise bad("--qat-lr", self.qat_lr, "give a positive learning rate, e.g. 1e-5")

    @property
    def resolved_calibrator(self) -> str:
        return self.calibrator or DEFAULT_CALIBRATOR.get(self.method, "minmax")

    @property
    def form(self) -> QdqForm:
        return qdq_form(self.qdq_form, self.backend)


@dataclass
class QuantizeOutcome:
    artifact: Path
    gate: GateResult
    manifest: Manifest

    @property
    def passed(self) -> bool:
        return self.gate.passed


# ------------------------------------------------------------------------------------------
# ONNX Runtime: pre-process, render a QDQ form from cached ranges, run
# ------------------------------------------------------------------------------------------

def prepare_float(fp32: Path, out: Path) -> Path:
    """``quant_pre_process``: symbolic shape inference + ORT's basic graph optimisation (BN folding)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(out))
    return out


def render_qdq(prepared: Path, cache: Path, out: Path, form: QdqForm, exclude: list[str] | tuple = (),
               only: list[str] | None = None) -> Path:
    """``quantize_static`` of the prepared float graph with the ranges in ``cache`` (no calibration run)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # ORT logs its progress as root-logger warnings
    try:
        quantize_static(str(prepared), str(out), None, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=getattr(QuantType, form.activation), weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(exclude) or None, nodes_to_quantize=only,
                        calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache),
                        extra_options=form.extra_options())
    finally:
        root.setLevel(level)
    return out


def ort_logits(model: Path, inputs: np.ndarray) -> np.ndarray:
    runner = open_runner("onnxruntime", model)
    try:
        return runner.infer_many(inputs)
    finally:
        runner.close()


def _static_trim(x: np.ndarray, batch: int | None) -> np.ndarray:
    """Whole batches only, for a model with a static batch axis."""
    if not batch:
        return x
    n = (len(x) // batch) * batch
    if n == 0:
        raise EdgetlError(f"--static-batch {batch} is larger than the {len(x)} calibration images",
                          hint="use a smaller static batch or more calibration images")
    return x[:n]


# ------------------------------------------------------------------------------------------
# Data: calibration set, checkset
# ------------------------------------------------------------------------------------------

def calibration_set(run, cfg: QuantizeConfig) -> CalibrationSet:
    """From ``--calib-dir`` or the run's train split; never overlapping the val/test splits."""
    test = [s.path for s in run.samples("test")]
    val = [s.path for s in run.samples("val")] if "val" in run.split.get("splits", {}) else []
    if cfg.calib_dir:
        cal = from_folder(cfg.calib_dir, cfg.calib_size, cfg.seed, cfg.calib_min, cfg.calib_exact)
    else:
        train = run.samples("train")
        root = Path(run.split.get("root", "."))
        cal = select_stratified([(s.path, s.label) for s in train], cfg.calib_size, cfg.seed, cfg.calib_min,
                                cfg.calib_exact, root=root, where=f"{run.path}/split.json train split")
    assert_disjoint(cal, test, "test")
    assert_disjoint(cal, val, "val")
    return cal


def make_checkset(run, cap: int, seed: int) -> Checkset:
    """Held-out TEST images (stratified subset when above ``cap``), preprocessed; float logits from PyTorch."""
    samples = run.samples("test")
    if not samples:
        raise EdgetlError(f"{run.path}/split.json: the test split is empty",
                          hint="the accuracy gate needs held-out images: train the run with a test split")
    root = Path(run.split.get("root", "."))
    chosen = select_stratified([(s.path, s.label) for s in samples], min(cap, len(samples)), seed, min_images=1,
                               root=root, where=f"{run.path}/split.json test split")
    inputs = load_images(chosen.paths, run.manifest.preprocess)
    logits = torch_logits(run.model, inputs)
    paths = tuple(chosen.listing().splitlines())
    return Checkset(inputs, np.asarray(chosen.labels, np.int64), logits, paths)


# ------------------------------------------------------------------------------------------
# QAT (NNCF, PyTorch)
# ------------------------------------------------------------------------------------------

def _nncf():
    # NNCF JIT-compiles a C++ torch extension the first time QAT runs on a machine, and gives up after
    # 60 s by default: on a busy 2-core host or a small board that first build takes longer and QAT
    # failed with ExtensionLoaderTimeoutException. Allow 15 minutes unless the user set a value.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")
    try:
        import nncf  # noqa: F401
    except ImportError:
        raise MissingDependencyError("nncf", "train", "quantization-aware training") from None
    return nncf


def qat_finetune(model, cal_inputs: np.ndarray, train_paths: list[tuple[Path, int]], spec, cfg: QuantizeConfig,
                 log: Log = print) -> tuple[Any, dict[str, Any]]:
    """NNCF QAT: quantizers initialised on the calibration set, then a few epochs at a small LR.

    ``qat_loss="distill"`` (default) trains the quantized model to reproduce the float model's
    logits (KL divergence of the softmaxes, the float model as teacher): the gate measures agreement
    with that model, and with plain cross-entropy QAT re-fits the decision boundary instead (on ELPV
    it moved ~14 points of recall between the two classes: top-1 held, agreement fell to 90.6 %)."""
    import torch

    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    cal = get_calibrator(cfg.resolved_calibrator)
    bs = cfg.static_batch or 16
    batches = [torch.from_numpy(cal_inputs[i:i + bs]) for i in range(0, len(cal_inputs), bs)]
    params = AdvancedQuantizationParameters(
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, cal.nncf_estimator),
        overflow_fix=OverflowFix.DISABLE)
    t0 = time.perf_counter()
    qmodel = nncf.quantize(copy.deepcopy(model).eval(), nncf.Dataset(batches), subset_size=len(batches),
                           advanced_parameters=params)
    init_s = time.perf_counter() - t0
    teacher = copy.deepcopy(model).eval()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.Adam([p for p in qmodel.parameters() if p.requires_grad], lr=cfg.qat_lr)
    losses = []
    per_epoch = min(len(train_paths), cfg.qat_max_images or len(train_paths))
    for epoch in range(cfg.qat_epochs):
        qmodel.train()
        if cfg.qat_freeze_bn:  # small batches: keep the float model's BN statistics
            for m in qmodel.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        order = rng.permutation(len(train_paths))[:per_epoch]
        total, seen = 0.0, 0
        t_epoch, next_report = time.perf_counter(), 0.25
        for i in range(0, len(order), cfg.qat_batch_size):
            idx = order[i:i + cfg.qat_batch_size]
            x = torch.from_numpy(load_images([train_paths[j][0] for j in idx], spec))
            y = torch.tensor([train_paths[j][1] for j in idx])
            opt.zero_grad()
            out = qmodel(x)
            if cfg.qat_loss == "distill":
                with torch.no_grad():
                    target = torch.softmax(teacher(x), dim=1)
                loss = torch.nn.functional.kl_div(torch.log_softmax(out, dim=1), target, reduction="batchmean")
            else:
                loss = torch.nn.functional.cross_entropy(out, y)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            if seen / len(order) >= next_report and seen < len(order):  # a sign of life every quarter epoch
                rate = seen / (time.perf_counter() - t_epoch)
                log(f"qat: epoch {epoch + 1}/{cfg.qat_epochs}  {seen}/{len(order)} images  {rate:.1f} img/s  "
                    f"~{(len(order) - seen) / rate:.0f} s left in the epoch")
                next_report = (int(seen / len(order) * 4) + 1) / 4
        losses.append(total / max(1, seen))
        log(f"qat: epoch {epoch + 1}/{cfg.qat_epochs}  loss {losses[-1]:.4f}  ({time.perf_counter() - t_epoch:.0f} s)")
    qmodel.eval()
    info = {"epochs": cfg.qat_epochs, "lr": cfg.qat_lr, "batch_size": cfg.qat_batch_size, "images_per_epoch": per_epoch,
            "freeze_bn": cfg.qat_freeze_bn, "objective": cfg.qat_loss, "loss": losses, "init": f"nncf RangeEstimatorParametersSet.{cal.nncf_estimator}",
            "init_seconds": init_s, "nncf": nncf.__version__}
    return qmodel, info


def export_nncf_form(qmodel, spec, path: Path, static_batch: int | None) -> Path:
    """NNCF's own QDQ ONNX: ``nncf.strip`` (fake-quantizers -> torch Q/DQ ops) + TorchScript export."""
    import torch

    nncf = _nncf()
    example = torch.zeros(spec.tensor_shape(static_batch or 1))
    try:
        stripped = nncf.strip(qmodel, do_copy=True, strip_format=nncf.StripFormat.NATIVE, example_input=example)
    except ImportError as exc:  # nncf.strip needs torchao in NNCF >= 3
        raise MissingDependencyError(exc.name or "torchao", "train", "exporting the QAT model") from None
    return export_onnx(stripped, spec, path, static_batch)


def qat(run, cal_inputs: np.ndarray, fp32: Path, cfg: QuantizeConfig, work: Path,
        log: Log = print) -> tuple[Path, Callable[[QdqForm], dict], dict[str, Any], Path]:
    """QAT, then its result (QAT-trained weights, fake-quantized, + learned activation ranges) as a
    prepared float graph and ranges for ``quantize_static``; also returns NNCF's own QDQ export.
    Tensors NNCF does not quantize (ORT also quantizes Conv outputs) get min-max ranges."""
    import onnx

    train = [(s.path, s.label) for s in run.samples("train")]
    qmodel, info = qat_finetune(run.model, cal_inputs, train, run.manifest.preprocess, cfg, log)
    nncf_onnx = export_nncf_form(qmodel, run.manifest.preprocess, work / "qat_nncf.onnx", cfg.static_batch)
    float_graph, learned = strip_qdq(nncf_onnx)
    onnx.save(float_graph, str(work / "qat_float.onnx"))
    prepared = prepare_float(work / "qat_float.onnx", work / "prepared.onnx")

    memo: dict[str, dict] = {}

    def ranges_for(form: QdqForm) -> dict:
        if form.key not in memo:
            base = calibrate(prepared, cal_inputs, "minmax", form.symmetric_activations, cfg.static_batch or 16)
            memo[form.key] = merge_ranges(base, {k: v for k, v in learned.items() if k in base})
        return memo[form.key]

    info["learned_ranges"] = len(set(learned) & set(ranges_for(cfg.form)))
    return prepared, ranges_for, info, nncf_onnx


# ------------------------------------------------------------------------------------------
# Sensitivity and mixed precision
# ------------------------------------------------------------------------------------------

def layer_sensitivity(prepared: Path, cache: Path, form: QdqForm, inputs: np.ndarray, work: Path) -> list[sens.LayerSensitivity]:
    """Leave-one-out: render the model with each layer in float in turn (same ranges and form) and
    rank the layers by the logit SQNR that buys (``calibration.sensitivity``)."""
    reference = ort_logits(prepared, inputs)
    probe = work / "sensitivity_probe.onnx"
    quantized = ort_logits(render_qdq(prepared, cache, probe, form), inputs)

    def logits_without(node: str) -> np.ndarray:
        return ort_logits(render_qdq(prepared, cache, probe, form, exclude=[node]), inputs)

    return sens.rank_layers(weighted_nodes(prepared), logits_without, reference, quantized)


@dataclass
class Rendered:
    """The outcome of the mixed-precision loop."""

    gate: GateResult
    float_layers: list[str]
    rounds: list[dict[str, Any]]
    sensitivity: list[sens.LayerSensitivity] | None


def quantize_with_fallback(prepared: Path, cache: Path, form: QdqForm, out: Path, checkset: Checkset,
                           labels, cfg: QuantizeConfig, sens_inputs: np.ndarray, work: Path, log: Log) -> Rendered:
    ranking = None
    if cfg.sensitivity:
        log(f"sensitivity: keeping each of {len(weighted_nodes(prepared))} layers in float in turn, "
            f"on {len(sens_inputs)} calibration images")
        ranking = layer_sensitivity(prepared, cache, form, sens_inputs, work)
    exclude: list[str] = []
    rounds: list[dict[str, Any]] = []
    for rnd in range(cfg.max_fallback_rounds + 1):
        render_qdq(prepared, cache, out, form, exclude)
        gate = gate_from_logits(ort_logits(out, checkset.inputs), checkset, replace(cfg.thresholds, speed_check=False),
                                labels)
        rounds.append({"round": rnd, "float_layers": list(exclude), "quant_top1": gate.quant_top1, "drop": gate.drop,
                       "agreement": gate.agreement, "accuracy_passed": gate.accuracy_passed})
        log(f"round {rnd}: {len(exclude)} float layer(s)  top-1 {gate.quant_top1:.4f} (float {gate.float_top1:.4f})  "
            f"agreement {gate.agreement:.4f}  {'ok' if gate.accuracy_passed else 'misses the gate'}")
        if gate.accuracy_passed or rnd == cfg.max_fallback_rounds:
            break
        if ranking is None:
            log("sensitivity: ranking layers for the mixed-precision fallback")
            ranking = layer_sensitivity(prepared, cache, form, sens_inputs, work)
        candidates = [r.node for r in ranking if r.node not in exclude and r.gain_db > 0]
        if not candidates:
            log("fallback: no remaining layer gains anything in float; stopping")
            break
        exclude += candidates[:cfg.fallback_step]
    if not gate.accuracy_passed and len(rounds) > 1:
        # every round missed: keep the best one (more float layers is not always better), not the last
        best = max(rounds, key=lambda x: (x["agreement"], -x["drop"], -len(x["float_layers"])))
        if best is not rounds[-1]:
            exclude = list(best["float_layers"])
            log(f"fallback: keeping round {best['round']} (the best agreement), {len(exclude)} float layer(s)")
            render_qdq(prepared, cache, out, form, exclude)
            gate = gate_from_logits(ort_logits(out, checkset.inputs), checkset,
                                    replace(cfg.thresholds, speed_check=False), labels)
        for x in rounds:
            x["kept"] = x is best
    return Rendered(gate, exclude, rounds, ranking)


# ------------------------------------------------------------------------------------------
# The whole stage
# ------------------------------------------------------------------------------------------

def quantize_run(run_path: str | Path, out: str | Path, cfg: QuantizeConfig = QuantizeConfig(),
                 overwrite: bool = False, log: Log = print) -> QuantizeOutcome:
    """Quantize a run into an artifact folder at ``out`` (atomically) and gate it."""
    from .runs import load_run

    t_start = time.perf_counter()
    out = check_output_dir(out, overwrite)
    run = load_run(run_path)
    spec = run.manifest.preprocess
    cal = calibration_set(run, cfg)
    log(f"calibration: {len(cal)} images from {cal.source} ({cfg.resolved_calibrator})")
    cal_inputs = _static_trim(cal.load(spec), cfg.static_batch)
    checkset = make_checkset(run, cfg.checkset_cap, cfg.seed)
    log(f"checkset: {len(checkset)} held-out test images")
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="edgetl-quantize-") as tmpdir, atomic_output_dir(out, overwrite) as d:
        work = Path(tmpdir)
        fp32 = export_onnx(run.model, spec, d / FP32_ONNX, cfg.static_batch)
        n_par = min(PARITY_IMAGES, len(checkset))
        parity = check_parity(checkset.float_logits[:n_par], fp32, checkset.inputs[:n_par])
        log(f"export: {FP32_ONNX} parity max |diff| {parity.max_abs_diff:.2e}, top-1 agreement {parity.top1_agreement:.4f}")
        t0 = time.perf_counter()
        qat_info: dict[str, Any] | None = None
        extra: dict[str, Path] = {}
        if cfg.method == "ptq":
            prepared = prepare_float(fp32, work / "prepared.onnx")

            def ranges_for(form: QdqForm) -> dict:
                return calibrate(prepared, cal_inputs, cfg.resolved_calibrator, form.symmetric_activations,
                                 cfg.static_batch or 16)
        else:
            prepared, ranges_for, qat_info, extra["nncf-native"] = qat(run, cal_inputs, fp32, cfg, work, log)
        ranges = ranges_for(cfg.form)
        timings["calibrate_or_train_s"] = time.perf_counter() - t0
        manifest, gate = finish_artifact(d, prepared, ranges, cal, cal_inputs, checkset, run.manifest, cfg, work, log,
                                         parity=parity.to_dict(), qat_info=qat_info, timings=timings,
                                         report_extra={"name": out.name, "run": str(Path(run_path))}, t_start=t_start,
                                         ranges_for=ranges_for, extra_forms=extra)
    return QuantizeOutcome(out, gate, manifest)


def finish_artifact(folder: Path, prepared: Path, ranges: dict, cal: CalibrationSet, cal_inputs: np.ndarray,
                    checkset: Checkset, source: Manifest, cfg: QuantizeConfig, work: Path, log: Log = print, *,
                    parity: dict[str, Any] | None = None, qat_info: dict[str, Any] | None = None,
                    timings: dict[str, float] | None = None, report_extra: dict[str, Any] | None = None,
                    t_start: float | None = None, ranges_for: Callable[[QdqForm], dict] | None = None,
                    extra_forms: dict[str, Path] | None = None) -> tuple[Manifest, GateResult]:
    """From a prepared float graph and its ranges to a finished artifact folder.

    ``folder`` already holds ``model_fp32.onnx``. Renders ``model_int8.onnx`` (mixed-precision
    fallback included), runs the final gate (speed measured side by side on ONNX Runtime, gated
    when the form is one ORT runs fast), and writes checkset.npz, calibration.txt, sensitivity.csv,
    report.json/md, confusion.png and manifest.json (kind "artifact", fields of ``source``: the
    run's manifest or a stand-in for an external model).

    Every form in ``extra_forms`` (e.g. NNCF's own QAT export) is measured (checkset accuracy,
    ORT batch-1 latency) for the report; with ``cfg.all_forms`` the other QDQ forms are rendered
    too (ranges from ``ranges_for``) and all of them are kept under ``forms/``.
    """
    form = cfg.form
    timings = dict(timings or {})
    forms: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    cache = save_ranges(ranges, work / "ranges.json")
    sens_inputs = cal_inputs[:cfg.sensitivity_images] if not cfg.static_batch else \
        _static_trim(cal_inputs[:max(cfg.sensitivity_images, cfg.static_batch)], cfg.static_batch)
    r = quantize_with_fallback(prepared, cache, form, folder / INT8_ONNX, checkset, source.labels, cfg,
                               sens_inputs, work, log)
    leaked = set(quantized_nodes(folder / INT8_ONNX)) & set(r.float_layers)
    if leaked:  # pragma: no cover - guards ORT's nodes_to_exclude contract
        raise EdgetlError(f"layers {sorted(leaked)} were to stay in float but are quantized")
    timings["quantize_s"] = time.perf_counter() - t0
    speed = _ort_speed(folder / FP32_ONNX, folder / INT8_ONNX, checkset, cfg) if cfg.thresholds.speed_check else None
    gated = GATE_BACKEND in form.fast_on
    note = "" if gated else (f"measured, not gated: the {form.key} form is rendered for {', '.join(form.fast_on)}; "
                             "its speed is gated on that backend's build")
    runner = open_runner(GATE_BACKEND, folder / INT8_ONNX)
    try:
        gate = gate_from_logits(runner.infer_many(checkset.inputs), checkset, cfg.thresholds, source.labels,
                                speed, gated, note, runner.info).without_tried(cfg.method)
    finally:
        runner.close()
    forms.append(_form_row(form.key, gate, speed, chosen=True))
    others: dict[str, Path] = {}
    if cfg.all_forms and ranges_for is not None:
        (folder / FORMS_DIR).mkdir(exist_ok=True)
        for other in QDQ_FORMS.values():
            if other.key != form.key:
                path = folder / FORMS_DIR / f"model_int8_{other.short}.onnx"
                render_qdq(prepared, save_ranges(ranges_for(other), work / f"ranges_{other.short}.json"), path,
                           other, r.float_layers)
                others[other.key] = path
    for name, src in (extra_forms or {}).items():
        if cfg.all_forms:
            (folder / FORMS_DIR).mkdir(exist_ok=True)
            others[name] = Path(shutil.copyfile(src, folder / FORMS_DIR / f"model_int8_{name}.onnx"))
        else:
            others[name] = Path(src)
    for name, path in others.items():
        g = gate_from_logits(ort_logits(path, checkset.inputs), checkset, replace(cfg.thresholds, speed_check=False),
                             source.labels)
        sp = _ort_speed(folder / FP32_ONNX, path, checkset, cfg) if cfg.thresholds.speed_check else None
        row = _form_row(name, g, sp)
        if cfg.all_forms:
            row["file"] = str(path.relative_to(folder))
        forms.append(row)
        log(f"form {name}: top-1 {g.quant_top1:.4f}, agreement {g.agreement:.4f}" +
            (f", batch-1 {sp.quant_ms:.3g} ms vs float {sp.float_ms:.3g} ms" if sp else ""))
    log(f"gate: {'PASSED' if gate.passed else 'FAILED'}  top-1 {gate.quant_top1:.4f} vs float {gate.float_top1:.4f} "
        f"(drop {gate.drop:.2f} points), agreement {gate.agreement:.4f}" +
        (f", batch-1 {speed.quant_ms:.3g} ms vs float {speed.float_ms:.3g} ms" if speed else ""))
    for f in gate.failures:
        log(f"  failure: {f}")
    checkset.save(folder / CHECKSET_NAME)
    (folder / LISTING_NAME).write_text(cal.listing(), encoding="utf-8")
    if r.sensitivity:
        (folder / SENSITIVITY_CSV).write_text(sens.to_csv(r.sensitivity), encoding="utf-8")
    if t_start is not None:
        timings["total_s"] = time.perf_counter() - t_start
    quant = _quantization_record(cfg, form, cal, r, qat_info, parity or {}, timings)
    report = {"name": folder.name, **dict(report_extra or {}), "deployable": gate.passed, "quantization": quant, "parity": parity,
              "gate": gate.to_dict(), "rounds": r.rounds, "forms": forms,
              "sensitivity": [x.to_dict() for x in (r.sensitivity or [])]}
    write_report(folder, report, source.labels, gate)
    manifest = _artifact_manifest(source, cfg, quant, gate, folder)
    write_manifest(manifest, folder)
    return manifest, gate


def _ort_speed(fp32: Path, int8: Path, checkset: Checkset, cfg: QuantizeConfig):
    f, q = open_runner(GATE_BACKEND, fp32), open_runner(GATE_BACKEND, int8)
    try:
        return measure_speed(f, q, checkset.inputs, repeats=cfg.thresholds.speed_repeats)
    finally:
        f.close()
        q.close()


def _form_row(name: str, g: GateResult, speed, chosen: bool = False) -> dict[str, Any]:
    return {"form": name, "quant_top1": g.quant_top1, "agreement": g.agreement, "drop": g.drop,
            "ort_ms": speed.quant_ms if speed else None, "fp32_ms": speed.float_ms if speed else None, "chosen": chosen}


def _quantization_record(cfg: QuantizeConfig, form: QdqForm, cal: CalibrationSet, r: Rendered,
                         qat_info: dict[str, Any] | None, parity: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    import onnxruntime

    c = get_calibrator(cfg.resolved_calibrator)
    rec: dict[str, Any] = {
        "method": cfg.method, "calibrator": c.name, "calibrator_description": c.description,
        "qdq_format": form.key, "qdq_format_description": form.description, "for_backend": cfg.backend,
        "fast_on": list(form.fast_on), "per_channel": True,
        "calibration_source": cal.source, "calibration_images": len(cal), "calibration_file": LISTING_NAME,
        "calibration_sha256": cal.sha256, "calibration_seed": cfg.seed,
        "calibration_classes": {str(k): v for k, v in cal.class_counts().items()},
        "float_layers": list(r.float_layers), "fallback_rounds": len(r.rounds) - 1,
        "max_fallback_rounds": cfg.max_fallback_rounds, "sensitivity_file": SENSITIVITY_CSV if r.sensitivity else None,
        "onnxruntime": onnxruntime.__version__, "parity": parity, "seconds": round(timings.get("total_s", 0.0), 1),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    if qat_info is not None:
        rec["qat"] = qat_info
    return rec


def _artifact_manifest(run_manifest: Manifest, cfg: QuantizeConfig, quant: dict[str, Any], gate: GateResult,
                       folder: Path) -> Manifest:
    import onnxruntime

    batch: int | str = cfg.static_batch or "dynamic"
    gate_rec = {**gate.summary(), "deployable": gate.passed, "backend": GATE_BACKEND, "model": INT8_ONNX}
    build = {"backend": GATE_BACKEND, "model": INT8_ONNX, "precision": "int8", "options": {},
             "version": onnxruntime.__version__, "device": "CPUExecutionProvider", "qdq_format": quant["qdq_format"],
             "gate": gate.summary()}
    return Manifest(kind="artifact", labels=run_manifest.labels, preprocess=run_manifest.preprocess,
                    task=run_manifest.task, input=default_input(run_manifest.preprocess, batch),
                    backbone=run_manifest.backbone, training=run_manifest.training, quantization=quant,
                    gate=gate_rec, builds=(build,), files=hash_files(folder))


__all__ = ["QuantizeConfig", "QuantizeOutcome", "quantize_run", "render_qdq", "prepare_float", "layer_sensitivity",
           "qat_finetune", "export_nncf_form"]
