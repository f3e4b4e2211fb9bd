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
from .calibration.qdq import QDQ_FORMS, QdqForm, qdq_form, quantized_nodes, strip_qdq
from .calibration.sets import (DEFAULT_MIN, DEFAULT_SIZE, LISTING_NAME, CalibrationSet, assert_disjoint, from_folder,
                               load_images, select_stratified)
from .check import (CHECKSET_NAME, FP32_ONNX, GATE_BACKEND, INT8_ONNX, Checkset, GateResult, Thresholds, evaluate,
                    gate_from_logits, measure_speed, write_report)
from .export import check_parity, export_onnx, torch_logits
from .fsutil import atomic_output_dir, check_output_dir
from .runtime.errors import EdgetlError, MissingDependencyError
from .runtime.manifest import Manifest, default_input, seal
from .numerics import REFERENCE, REFERENCE_NOTE, Numerics, judge_for, reference
from .repair import Candidate, Escalation, Material, Rendered, escalate, judge
from .runtime.runners import open_runner

METHODS = ("ptq", "qat", "auto")  # auto: the escalation ladder (edgetl.repair.escalate)
WEIGHT_RANGES = ("full", "reduced")  # reduced: 7-bit weights, for CPUs whose u8 x s8 sums saturate
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
    # a pass closer than this many images to a threshold tries up to 2 more fallback rounds and keeps
    # the passing one with the largest margin (repair.fallback_rounds): a pass on the line is luck
    seek_margin: int = 2
    sensitivity: bool = False  # rank every layer even when round 0 passes (else: only when a fallback needs it)
    sensitivity_images: int = 32
    qat_epochs: int = 2
    qat_lr: float = 1e-5
    qat_batch_size: int = 32
    qat_max_images: int | None = None  # training images per epoch (None: the whole train split)
    qat_freeze_bn: bool = True
    qat_loss: str = "distill"  # distill: match the float model's logits (KL, the gate's agreement); ce: labels
    # share of QAT images moved as the stability check moves the checkset (JPEG, brightness; edgetl.stability.
    # random_perturbation) before teacher and student see them: 0 = the images as loaded
    qat_perturb: float = 0.0
    all_forms: bool = False  # also write the other QDQ forms under forms/ and measure them side by side
    weight_range: str = "full"  # "reduced": 7-bit weights (edgetl.runtime.cpu: no saturation without VNNI)
    weight_range_reason: str = ""  # why (recorded in manifest.quantization)
    # reduced weight range: depthwise Convs keep 8 bits (where probed exact); None = the backend's
    # default (OpenVINO yes, ONNX Runtime no); the repair ladder tries the other form next
    depthwise_full: bool | None = None

    def __post_init__(self) -> None:
        def bad(opt: str, value: Any, hint: str) -> EdgetlError:
            return EdgetlError(f"{opt} {value!r} is not valid", hint=hint)

        if self.method not in METHODS:
            raise bad("--method", self.method, f"use one of {METHODS}")
        if self.weight_range not in WEIGHT_RANGES:
            raise bad("--weight-range", self.weight_range, f"use one of {WEIGHT_RANGES} (or auto on the command line)")
        cal = get_calibrator(self.resolved_calibrator)
        if self.method == "qat" and cal.nncf_estimator is None:
            raise EdgetlError(f"--calibrator {cal.name} cannot initialise QAT (NNCF has no {cal.name} range estimator)",
                              hint="use --calibrator mse, minmax or percentile with --method qat")
        qdq_form(self.qdq_form, self.backend)
        for opt, v, lo in (("--calib-size", self.calib_size, 1), ("--calib-min", self.calib_min, 1),
                           ("--checkset-cap", self.checkset_cap, 1), ("--max-fallback-rounds", self.max_fallback_rounds, 0),
                           ("--fallback-step", self.fallback_step, 1), ("--sensitivity-images", self.sensitivity_images, 1),
                           ("--seek-margin", self.seek_margin, 0),
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
        if not 0 <= self.qat_perturb <= 1:
            raise bad("--qat-perturb", self.qat_perturb, "give the share of QAT images to perturb, 0..1 (e.g. 0.5)")

    @property
    def resolved_calibrator(self) -> str:
        return self.calibrator or DEFAULT_CALIBRATOR.get(self.method, "minmax")

    @property
    def form(self) -> QdqForm:
        return qdq_form(self.qdq_form, self.backend)

    @property
    def depthwise_forms(self) -> bool:
        """Two weight forms to choose from: 7-bit everywhere, or 8-bit depthwise Convs, where this
        CPU's depthwise INT8 kernels were probed exact on the backends that run the artifact
        (``calibration.depthwise``)."""
        if self.weight_range != "reduced":
            return False
        from .calibration.depthwise import depthwise_exact

        return depthwise_exact({"onnxruntime", self.backend})

    @property
    def prefers_depthwise_full(self) -> bool:
        """The form tried first. Measured on the demo's ELPV recipe (Lite0, AVX2 EPYC), two trainings:
        OpenVINO passed in the 8-bit-depthwise form both times (round 0 at 98.2 % and 1 float layer for
        99.5 % instead of 3 for 98.5 %; 5 % faster; the other run 99.5 % with 2), while ONNX Runtime
        passed in one form on one run and in the other on the other (first run: 7 bits passed at 98.5 %
        with 2 float layers, 8-bit depthwise stuck at 97.5 %; second run: 7 bits stuck at 97.96 %, the
        8-bit-depthwise graph OpenVINO kept agreed 99.0 % on ONNX Runtime's kernels): the ladder tries both."""
        return self.depthwise_full if self.depthwise_full is not None else self.backend == "openvino"

    @property
    def reduce_range(self) -> bool | str:
        """False: 8-bit weights; True: 7-bit weights; "dense": 7-bit except depthwise Convs (8-bit)."""
        if self.weight_range != "reduced":
            return False
        return "dense" if self.prefers_depthwise_full and self.depthwise_forms else True

    @property
    def weight_bits_label(self) -> str:
        """The weight form(s) in a few words (the compile's step label)."""
        if not self.reduce_range:
            return "8-bit weights"
        return "7-bit weights or 8-bit depthwise" if self.depthwise_forms else "7-bit weights"

    @property
    def weight_bits_note(self) -> str:
        """The weight form(s) the ladder will try, in order, for the compile's first lines."""
        rr = self.reduce_range
        if not rr or not self.depthwise_forms:
            return self.weight_bits_label
        probed = "this CPU's depthwise kernels probed exact"
        first, then = (f"8-bit depthwise weights ({probed}), 7-bit others", "7-bit everywhere") if rr == "dense" \
            else ("7-bit weights", f"8-bit depthwise ({probed})")
        return f"{first}, then {then} if that misses the gate"


@dataclass
class QuantizeOutcome:
    artifact: Path
    gate: GateResult  # the reference gate (manifest.gate)
    manifest: Manifest

    @property
    def passed(self) -> bool:
        """The verdict: the gate that decides the artifact (``check.decisive``), not only the reference."""
        from .check import deployable

        return deployable(self.manifest)


# ------------------------------------------------------------------------------------------
# ONNX Runtime: pre-process, render a QDQ form from cached ranges, run
# ------------------------------------------------------------------------------------------

def prepare_float(fp32: Path, out: Path) -> Path:
    """``quant_pre_process``: symbolic shape inference + ORT's basic graph optimisation (BN folding)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32), str(out))
    return out


def render_qdq(prepared: Path, cache: Path, out: Path, form: QdqForm, exclude: list[str] | tuple = (),
               only: list[str] | None = None, reduce_range: bool | str = False) -> Path:
    """``quantize_static`` of the prepared float graph with the ranges in ``cache`` (no calibration run).
    ``reduce_range``: 7-bit weights (-64..64), so u8 x s8 pair sums fit a saturating int16 (no VNNI);
    ``"dense"``: the same except the depthwise Convs' weights, which keep 8 bits (ONNX Runtime's
    per-weight ``reduce_range`` override, one entry per channel). Rendering one graph many times (a
    sensitivity ranking): :class:`QdqRenderer`, the same files faster."""
    return _quantize_static(prepared, cache, out, form, _render_options(prepared, form, reduce_range), exclude, only,
                            reduce_range)


def _render_options(prepared: Path, form: QdqForm, reduce_range: bool | str) -> dict[str, Any]:
    """``quantize_static``'s ``extra_options`` for ``form`` and ``reduce_range`` (see :func:`render_qdq`)."""
    options = form.extra_options()
    if reduce_range == "dense":
        import onnx

        from .calibration.depthwise import depthwise_weights

        dw = depthwise_weights(onnx.load(str(prepared), load_external_data=False))
        # one entry per output channel: a single entry makes ONNX Runtime quantize the tensor per-tensor
        options["TensorQuantOverrides"] = {name: [{"axis": 0, "reduce_range": False}] + [{"reduce_range": False}] * (n - 1)
                                           for name, n in dw.items()}
    return options


def _quantize_static(prepared: Path, cache: Path, out: Path, form: QdqForm, options: dict[str, Any],
                     exclude: list[str] | tuple, only: list[str] | None, reduce_range: bool | str) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from .calibration.render_memo import LOCK

    root = logging.getLogger()
    with LOCK:  # never beside a memoized render (QdqRenderer) in another thread
        level = root.level
        root.setLevel(max(level, logging.ERROR))  # ORT logs its progress as root-logger warnings
        try:
            quantize_static(str(prepared), str(out), None, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=getattr(QuantType, form.activation), weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(exclude) or None, nodes_to_quantize=only,
                            reduce_range=bool(reduce_range), calibrate_method=CalibrationMethod.MinMax,
                            calibration_cache_path=str(cache), extra_options=copy.deepcopy(options))
        finally:
            root.setLevel(level)
    return out


class QdqRenderer:
    """:func:`render_qdq` of one prepared graph, range file, QDQ form and weight range, many times
    over with other layers in float (``exclude``) or quantized (``only``): what a sensitivity ranking
    does, one render per layer. Each render is ``quantize_static``'s own and writes the same file,
    byte for byte; what every render would recompute identically (per-channel weight scales, the
    int32-bias scale adjustment, the int8 weights: ~80 % of a render, in Python) is computed once
    (``calibration.render_memo``): ~0.2 instead of ~1.4 s a render of Lite0 on a 2-vCPU AVX2 EPYC.

    The first render that reuses something is checked against a plain render (one extra render per
    renderer): if the two files differ (an ONNX Runtime whose quantizer computes them otherwise), or
    this ONNX Runtime cannot be memoized, or a memoized render fails, every render is a plain
    :func:`render_qdq` from then on and ``log`` says why."""

    def __init__(self, prepared: Path, cache: Path, form: QdqForm, reduce_range: bool | str = False,
                 log: Log = lambda s: None):
        from .calibration.render_memo import WeightMemo, unsupported

        self.prepared, self.cache, self.form, self.reduce_range, self.log = Path(prepared), Path(cache), form, \
            reduce_range, log
        self.options = _render_options(self.prepared, form, reduce_range)
        why = unsupported()
        self.memo: Any = None if why else WeightMemo()
        self.checked = False
        if why:
            self._plain(why)

    def _plain(self, why: str) -> None:
        self.memo = None
        self.log(f"QDQ rendering: every render a full quantize_static from now on (slower): {why}")

    def _static(self, out: Path, exclude: list[str] | tuple, only: list[str] | None) -> Path:
        return _quantize_static(self.prepared, self.cache, out, self.form, self.options, exclude, only,
                                self.reduce_range)

    def render(self, out: Path, exclude: list[str] | tuple = (), only: list[str] | None = None) -> Path:
        """``render_qdq(prepared, cache, out, form, exclude, only, reduce_range)``, the same file."""
        if self.memo is None:
            return self._static(out, exclude, only)
        hits = self.memo.hits
        try:
            with self.memo.installed():
                self._static(out, exclude, only)
        except Exception as exc:  # ONNX Runtime's internals are not an API: a failure costs speed only
            self._plain(f"a memoized render failed ({type(exc).__name__}: {exc})")
            return self._static(out, exclude, only)
        if not self.checked and self.memo.hits > hits:
            self.checked = True
            check = Path(out).with_name(f".{Path(out).stem}.check.onnx")
            try:
                if self._static(check, exclude, only).read_bytes() != Path(out).read_bytes():
                    self._plain("a memoized render differs from quantize_static's own on this ONNX Runtime "
                                f"{_ort_version()}")
                    check.replace(out)
            finally:
                check.unlink(missing_ok=True)
        return out


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


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
                 log: Log = print, deadline: float | None = None) -> tuple[Any, dict[str, Any]]:
    """NNCF QAT: quantizers initialised on the calibration set, then a few epochs at a small LR.

    ``qat_loss="distill"`` (default) trains the quantized model to reproduce the float model's
    logits (KL divergence of the softmaxes, the float model as teacher): the gate measures agreement
    with that model, and with plain cross-entropy QAT re-fits the decision boundary instead (on ELPV
    it moved ~14 points of recall between the two classes: top-1 held, agreement fell to 90.6 %).

    ``deadline`` (``time.perf_counter()`` value, from ``--time-budget``): training stops after the
    batch that crosses it (recorded as ``stopped_early``). With ``cfg.reduce_range`` NNCF trains
    7-bit weights (``OverflowFix.ENABLE``), the weights the CPU without VNNI will run."""
    import torch

    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    cal = get_calibrator(cfg.resolved_calibrator)
    bs = cfg.static_batch or 16
    batches = [torch.from_numpy(cal_inputs[i:i + bs]) for i in range(0, len(cal_inputs), bs)]
    params = AdvancedQuantizationParameters(
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, cal.nncf_estimator),
        overflow_fix=OverflowFix.ENABLE if cfg.reduce_range else OverflowFix.DISABLE)
    log(f"qat: initialising the quantizers on {len(cal_inputs)} calibration images (NNCF; the first QAT on a "
        "machine also builds NNCF's C++ extension, about a minute on 2 cores, cached afterwards)")
    t0 = time.perf_counter()
    qmodel = nncf.quantize(copy.deepcopy(model).eval(), nncf.Dataset(batches), subset_size=len(batches),
                           advanced_parameters=params)
    init_s = time.perf_counter() - t0
    teacher = copy.deepcopy(model).eval()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.Adam([p for p in qmodel.parameters() if p.requires_grad], lr=cfg.qat_lr)
    losses, trained, stopped = [], 0, False
    per_epoch = min(len(train_paths), cfg.qat_max_images or len(train_paths))

    def estimate(rate: float) -> None:  # announced once the first batches give the rate
        total = cfg.qat_epochs * per_epoch / rate
        log(f"qat: about {_duration(total)} for {cfg.qat_epochs} epoch(s) x {per_epoch} images at {rate:.1f} img/s "
            f"(the first batches); --method ptq needs no training (a calibration pass like the {init_s:.0f} s just "
            f"done), --qat-max-images or --time-budget cap it")

    for epoch in range(cfg.qat_epochs):
        order = rng.permutation(len(train_paths))[:per_epoch]
        t_epoch = time.perf_counter()
        loss, seen, stopped = _qat_epoch(qmodel, teacher, opt, [train_paths[j] for j in order], spec, cfg,
                                         lambda m: log(f"qat: epoch {epoch + 1}/{cfg.qat_epochs}  {m}"), deadline,
                                         estimate if epoch == 0 else None, rng)
        losses.append(loss)
        trained += seen
        log(f"qat: epoch {epoch + 1}/{cfg.qat_epochs}  loss {loss:.4f}  ({time.perf_counter() - t_epoch:.0f} s)"
            + (f"  stopped by --time-budget after {seen} images" if stopped else ""))
        if stopped:
            break
    qmodel.eval()
    info = {"epochs": cfg.qat_epochs, "lr": cfg.qat_lr, "batch_size": cfg.qat_batch_size, "images_per_epoch": per_epoch,
            "images_trained": trained, "stopped_early": stopped, "weight_range": cfg.weight_range,
            "freeze_bn": cfg.qat_freeze_bn, "objective": cfg.qat_loss, "perturb": cfg.qat_perturb, "loss": losses, "init": f"nncf RangeEstimatorParametersSet.{cal.nncf_estimator}",
            "init_seconds": init_s, "nncf": nncf.__version__}
    return qmodel, info


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _qat_epoch(qmodel, teacher, opt, samples: list[tuple[Path, int]], spec, cfg: QuantizeConfig, log: Log,
               deadline: float | None, estimate: Callable[[float], None] | None,
               rng: np.random.Generator) -> tuple[float, int, bool]:
    """One pass over ``samples``: ``(mean loss, images seen, stopped at the deadline)``. ``estimate``
    gets the training rate (images/s) once, after the second batch (the first one warms up). With
    ``cfg.qat_perturb`` a share of each batch is perturbed first (``rng``)."""
    import torch

    from .stability import random_perturbation

    qmodel.train()
    if cfg.qat_freeze_bn:  # small batches: keep the float model's BN statistics
        for m in qmodel.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    total, seen = 0.0, 0
    t0, next_report = time.perf_counter(), 0.25
    for i in range(0, len(samples), cfg.qat_batch_size):
        if deadline is not None and seen and time.perf_counter() >= deadline:
            return total / max(1, seen), seen, True
        batch = samples[i:i + cfg.qat_batch_size]
        x = load_images([p for p, _ in batch], spec)
        if cfg.qat_perturb > 0:
            x = random_perturbation(x, spec, rng, cfg.qat_perturb, cfg.thresholds.stability_jpeg_quality)
        x = torch.from_numpy(x)
        opt.zero_grad()
        out = qmodel(x)
        if cfg.qat_loss == "distill":
            with torch.no_grad():
                target = torch.softmax(teacher(x), dim=1)
            loss = torch.nn.functional.kl_div(torch.log_softmax(out, dim=1), target, reduction="batchmean")
        else:
            loss = torch.nn.functional.cross_entropy(out, torch.tensor([y for _, y in batch]))
        loss.backward()
        opt.step()
        total += loss.item() * len(batch)
        seen += len(batch)
        if i == 0:
            t_first, seen_first = time.perf_counter(), seen
        elif estimate is not None and i == cfg.qat_batch_size:
            estimate((seen - seen_first) / max(time.perf_counter() - t_first, 1e-9))
        if seen / len(samples) >= next_report and seen < len(samples):  # a sign of life every quarter epoch
            rate = seen / (time.perf_counter() - t0)
            log(f"{seen}/{len(samples)} images  {rate:.1f} img/s  ~{(len(samples) - seen) / rate:.0f} s left in the epoch")
            next_report = (int(seen / len(samples) * 4) + 1) / 4
    return total / max(1, seen), seen, False


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
        log: Log = print, deadline: float | None = None) -> tuple[Path, Callable[[QdqForm], dict], dict[str, Any], Path]:
    """QAT, then its result (QAT-trained weights, fake-quantized, + learned activation ranges) as a
    prepared float graph and ranges for ``quantize_static``; also returns NNCF's own QDQ export.
    Tensors NNCF does not quantize (ORT also quantizes Conv outputs) get min-max ranges."""
    import onnx

    train = [(s.path, s.label) for s in run.samples("train")]
    qmodel, info = qat_finetune(run.model, cal_inputs, train, run.manifest.preprocess, cfg, log, deadline)
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
# The whole stage
# ------------------------------------------------------------------------------------------

def default_judge(cfg: QuantizeConfig) -> Numerics:
    """The numerics that decide an artifact of ``edgetl quantize`` (no target profile): ONNX Runtime's
    own kernels for an ONNX Runtime artifact, else the reference numerics (the OpenVINO or TensorRT
    build is judged by ``edgetl build``/``compile`` on its own numerics)."""
    return judge_for("onnxruntime", {}) if cfg.backend == GATE_BACKEND else reference()


def quantize_run(run_path: str | Path, out: str | Path, cfg: QuantizeConfig = QuantizeConfig(),
                 overwrite: bool = False, log: Log = print, numerics: Numerics | None = None,
                 time_budget: float | None = None, profile: Any = None) -> QuantizeOutcome:
    """Quantize a run into an artifact folder at ``out`` (atomically), repaired and gated in
    ``numerics`` (default: :func:`default_judge`); ``cfg.method`` "auto" climbs the whole ladder."""
    from .runs import load_run

    t_start = time.perf_counter()
    out = check_output_dir(out, overwrite)
    run = load_run(run_path)
    spec = run.manifest.preprocess
    cal = calibration_set(run, cfg)
    log(f"calibration: {len(cal)} images from {cal.source}")
    cal_inputs = _static_trim(cal.load(spec), cfg.static_batch)
    checkset = make_checkset(run, cfg.checkset_cap, cfg.seed)
    log(f"checkset: {len(checkset)} held-out test images")
    with tempfile.TemporaryDirectory(prefix="edgetl-quantize-") as tmpdir, atomic_output_dir(out, overwrite) as d:
        fp32 = export_onnx(run.model, spec, d / FP32_ONNX, cfg.static_batch)
        n_par = min(PARITY_IMAGES, len(checkset))
        parity = check_parity(checkset.float_logits[:n_par], fp32, checkset.inputs[:n_par])
        log(f"export: {FP32_ONNX} parity max |diff| {parity.max_abs_diff:.2e}, top-1 agreement {parity.top1_agreement:.4f}")
        mat = Material(d, Path(tmpdir), run.manifest, cal, cal_inputs, checkset, parity.to_dict(), run)
        t0 = time.perf_counter()
        esc = escalate(mat, cfg, numerics or default_judge(cfg), log, time_budget, profile)
        manifest, gate = finish_artifact(mat, esc, log, timings={"repair_s": time.perf_counter() - t0},
                                         report_extra={"name": out.name, "run": str(Path(run_path))}, t_start=t_start)
    return QuantizeOutcome(out, gate, manifest)


def finish_artifact(mat: Material, esc: Escalation, log: Log = print, *, timings: dict[str, float] | None = None,
                    report_extra: dict[str, Any] | None = None, t_start: float | None = None,
                    quant_extra: dict[str, Any] | None = None) -> tuple[Manifest, GateResult]:
    """From the repair's outcome to a finished artifact folder (``mat.folder`` holds model_fp32.onnx).

    Writes ``model_int8.onnx`` (the kept rendering), runs the artifact gate in reference numerics
    (the CPU-independent verdict of the quantization) and the ONNX Runtime build's gate (deployed
    numerics, speed measured side by side), and writes checkset.npz, calibration.txt,
    sensitivity.csv, report.json/md, confusion.png and manifest.json (kind "artifact", fields of
    ``mat.source``: the run's manifest or a stand-in for an external model).

    Every form in the candidate's ``extra_forms`` (e.g. NNCF's own QAT export) is measured (checkset
    accuracy, ORT batch-1 latency) for the report; with ``cfg.all_forms`` the other QDQ forms are
    rendered too and all of them are kept under ``forms/``.
    """
    folder, cand, r = mat.folder, esc.candidate, esc.rendered
    cfg, form = cand.cfg, cand.cfg.form
    timings = dict(timings or {})
    shutil.copyfile(r.model, folder / INT8_ONNX)
    leaked = set(quantized_nodes(folder / INT8_ONNX)) & set(r.float_layers)
    if leaked:  # pragma: no cover - guards ORT's nodes_to_exclude contract
        raise EdgetlError(f"layers {sorted(leaked)} were to stay in float but are quantized")
    # the reference gate measures stability when it decides (TensorRT; an artifact for no CPU build), the
    # deciding build's gate measures it otherwise (each costs a pass over the checkset per perturbation)
    decides = esc.numerics.kind == REFERENCE
    if decides and (r.gate.stability is not None or cfg.thresholds.min_stability_agreement is None):
        gate = r.gate  # judged in reference numerics already
    else:
        log("gate: the artifact in reference numerics (Q/DQ as float ops, the same on every CPU)")
        gate = judge(reference(), folder / INT8_ONNX, mat, cfg, mat.work, stability_if_accurate=False,
                     stability=decides)
    gate.without_tried(cfg.method).speed_note = REFERENCE_NOTE + "; speed is measured on the builds"
    ort_gate = _ort_build_gate(mat, cfg, stability=cfg.backend == GATE_BACKEND)
    forms = [_form_row(form.key, ort_gate, _speed_of(ort_gate), chosen=True)]
    forms += _other_forms(mat, cand, r, log)
    ort_decides = not decides and cfg.backend == GATE_BACKEND
    aside = f" (for the record: {esc.numerics.label} decides this artifact)"  # a verdict that does not decide
    log(f"gate: {'PASSED' if gate.passed else 'FAILED'} in reference numerics: top-1 {gate.quant_top1:.4f} vs float "
        f"{gate.float_top1:.4f} (drop {gate.drop:.2f} points), agreement {gate.agreement:.4f}"
        + ("" if decides else aside))
    for f in gate.failures:
        log(f"  failure: {f}")
    sp = f", batch-1 {ort_gate.speed['quant_ms']:.3g} ms vs float {ort_gate.speed['float_ms']:.3g} ms" \
        if ort_gate.speed else ""
    log(f"gate: {'PASSED' if ort_gate.passed else 'FAILED'} on ONNX Runtime's kernels on this CPU: top-1 "
        f"{ort_gate.quant_top1:.4f}, agreement {ort_gate.agreement:.4f}{sp}" + ("" if ort_decides else aside))
    for f in ort_gate.failures:
        log(f"  failure: {f}")
    mat.checkset.save(folder / CHECKSET_NAME)
    (folder / LISTING_NAME).write_text(mat.cal.listing(), encoding="utf-8")
    if r.sensitivity:
        (folder / SENSITIVITY_CSV).write_text(sens.to_csv(r.sensitivity), encoding="utf-8")
    if t_start is not None:
        timings["total_s"] = time.perf_counter() - t_start
    quant = {**_quantization_record(cfg, form, mat.cal, r, cand.qat_info, mat.parity or {}, timings, esc),
             **dict(quant_extra or {})}
    manifest = _artifact_manifest(mat.source, cfg, quant, gate, ort_gate, folder)
    from .doctor import machine_facts

    report = {"name": folder.name, **dict(report_extra or {}), "machine": machine_facts(),
              "deployable": bool(manifest.gate["deployable"]),
              "quantization": quant, "parity": mat.parity, "gate": gate.to_dict(),
              "builds": {GATE_BACKEND: ort_gate.to_dict()}, "rounds": r.rounds, "forms": forms,
              "escalation": {"numerics": esc.numerics.to_dict(), "steps": esc.steps, "verdict": esc.verdict},
              "sensitivity": [x.to_dict() for x in (r.sensitivity or [])]}
    write_report(folder, report, mat.labels, gate)
    return seal(folder, manifest), gate


def _ort_build_gate(mat: Material, cfg: QuantizeConfig, stability: bool = True) -> GateResult:
    """The gate of ``model_int8.onnx`` on ONNX Runtime's own kernels on this CPU (default options),
    with its batch-1 speed against the FP32 export measured side by side (and its stability when
    ``stability``: when this build decides the artifact)."""
    form = cfg.form
    gated = GATE_BACKEND in form.fast_on
    note = "" if gated else (f"measured, not gated: the {form.key} form is rendered for {', '.join(form.fast_on)}; "
                             "its speed is gated on that backend's build")
    numerics = judge_for(GATE_BACKEND, {})
    runner = open_runner(GATE_BACKEND, mat.folder / INT8_ONNX)
    float_runner = open_runner(GATE_BACKEND, mat.fp32) if cfg.thresholds.speed_check else None
    try:
        probe = mat.probe(cfg.thresholds.stability_jpeg_quality) if stability and \
            cfg.thresholds.min_stability_agreement is not None else None
        gate = evaluate(runner, mat.checkset, cfg.thresholds, mat.labels, float_runner, gated, note, stability=probe)
    finally:
        runner.close()
        if float_runner is not None:
            float_runner.close()
    gate.numerics, gate.cpu = numerics.kind, numerics.to_dict()["cpu"]
    return gate.without_tried(cfg.method)


def _speed_of(gate: GateResult):
    from .check import Speed

    s = gate.speed
    return Speed(s["float_ms"], s["quant_ms"], s["repeats"], s["backend"]) if s else None


def _other_forms(mat: Material, cand: Candidate, r: Rendered, log: Log) -> list[dict[str, Any]]:
    """The other QDQ forms (``--all-forms``) and the candidate's extra forms, measured on ONNX Runtime."""
    cfg, folder = cand.cfg, mat.folder
    others: dict[str, Path] = {}
    if cfg.all_forms:
        (folder / FORMS_DIR).mkdir(exist_ok=True)
        for other in QDQ_FORMS.values():
            if other.key != cfg.form.key:
                path = folder / FORMS_DIR / f"model_int8_{other.short}.onnx"
                render_qdq(cand.prepared, save_ranges(cand.ranges_for(other), mat.work / f"ranges_{other.short}.json"),
                           path, other, r.float_layers, reduce_range=cfg.reduce_range)
                others[other.key] = path
    for name, src in cand.extra_forms.items():
        if cfg.all_forms:
            others[name] = Path(shutil.copyfile(src, folder / FORMS_DIR / f"model_int8_{name}.onnx"))
        else:
            others[name] = Path(src)
    rows = []
    for name, path in others.items():
        g = gate_from_logits(ort_logits(path, mat.checkset.inputs), mat.checkset,
                             replace(cfg.thresholds, speed_check=False), mat.labels)
        sp = _ort_speed(mat.fp32, path, mat.checkset, cfg) if cfg.thresholds.speed_check else None
        row = _form_row(name, g, sp)
        if cfg.all_forms:
            row["file"] = str(path.relative_to(folder))
        rows.append(row)
        log(f"form {name}: top-1 {g.quant_top1:.4f}, agreement {g.agreement:.4f}" +
            (f", batch-1 {sp.quant_ms:.3g} ms vs float {sp.float_ms:.3g} ms" if sp else ""))
    return rows


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
                         qat_info: dict[str, Any] | None, parity: dict[str, Any], timings: dict[str, float],
                         esc: Escalation | None = None) -> dict[str, Any]:
    import onnxruntime

    from .runtime.cpu import host_cpu

    c = get_calibrator(cfg.resolved_calibrator)
    rec: dict[str, Any] = {
        "method": cfg.method, "calibrator": c.name, "calibrator_description": c.description,
        "qdq_format": form.key, "qdq_format_description": form.description, "for_backend": cfg.backend,
        "fast_on": list(form.fast_on), "per_channel": True,
        "weight_range": cfg.weight_range, "weight_bits": 7 if cfg.reduce_range else 8,
        "depthwise_weight_bits": 8 if cfg.reduce_range in (False, "dense") else 7,
        "weight_range_reason": cfg.weight_range_reason, "cpu": host_cpu().to_dict(),
        "calibration_source": cal.source, "calibration_images": len(cal), "calibration_file": LISTING_NAME,
        "calibration_sha256": cal.sha256, "calibration_seed": cfg.seed,
        "calibration_classes": {str(k): v for k, v in cal.class_counts().items()},
        "float_layers": list(r.float_layers), "fallback_rounds": len(r.rounds) - 1,
        "max_fallback_rounds": cfg.max_fallback_rounds, "sensitivity_file": SENSITIVITY_CSV if r.sensitivity else None,
        "onnxruntime": onnxruntime.__version__, "parity": parity, "seconds": round(timings.get("total_s", 0.0), 1),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    if esc is not None:
        rec["judged_on"] = esc.numerics.to_dict()
        rec["ladder"] = [{k: x.get(k) for k in ("step", "passed", "agreement", "drop", "stability", "seconds",
                                                 "skipped", "kept") if k in x} for x in esc.steps]
        rec["verdict"] = esc.verdict
    if qat_info is not None:
        rec["qat"] = qat_info
    return rec


def _artifact_manifest(run_manifest: Manifest, cfg: QuantizeConfig, quant: dict[str, Any], gate: GateResult,
                       ort_gate: GateResult, folder: Path) -> Manifest:
    """The artifact's manifest: ``gate`` = the reference gate (+ the verdict, ``check.with_verdict``),
    ``builds`` = the ONNX Runtime build of the QDQ graph with its deployed gate."""
    import onnxruntime

    from .check import with_verdict

    batch: int | str = cfg.static_batch or "dynamic"
    gate_rec = {**gate.summary(), "backend": GATE_BACKEND, "model": INT8_ONNX}
    build = {"backend": GATE_BACKEND, "model": INT8_ONNX, "precision": "int8", "options": {},
             "version": onnxruntime.__version__, "device": "CPUExecutionProvider", "qdq_format": quant["qdq_format"],
             "gate": ort_gate.summary()}
    return with_verdict(Manifest(kind="artifact", labels=run_manifest.labels, preprocess=run_manifest.preprocess,
                                 task=run_manifest.task, input=default_input(run_manifest.preprocess, batch),
                                 backbone=run_manifest.backbone, training=run_manifest.training, quantization=quant,
                                 gate=gate_rec, builds=(build,)))


__all__ = ["QdqRenderer", "QuantizeConfig", "QuantizeOutcome", "default_judge", "finish_artifact", "quantize_run",
           "render_qdq", "prepare_float", "qat_finetune", "export_nncf_form"]
