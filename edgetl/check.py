"""The accuracy gate: does the quantized model, as the device runs it, still agree with the float one?

Every artifact holds ``checkset.npz``: held-out TEST images (capped) preprocessed by the one
deploy preprocessing, their labels, and the float model's logits (from PyTorch). The gate runs a
model through :func:`~edgetl.runtime.runners.open_runner` (any backend: the gate measures what the
device runs) on it and reports float vs quantized top-1, the drop (paired bootstrap 95% CI),
prediction agreement (Wilson 95% CI), per-class recall of both, the classes that lost most, the
max/mean logit error, and speed: the quantized model must be faster than the float model on the
same backend (median of interleaved batch-1 runs).

Python API (used by ``edgetl quantize``, ``edgetl check`` and the backend builds):

* :func:`evaluate` ``(runner, checkset, thresholds, ...) -> GateResult``
* :func:`check_artifact` ``(artifact_dir, backend=None, ...) -> GateResult`` (updates the manifest)
* :func:`load_checkset` / :class:`Checkset`, :class:`Thresholds`

No torch here: ``edgetl check`` runs on a device.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .runtime.errors import EdgetlError
from .runtime.manifest import Manifest, atomic_write, open_verified, seal

CHECKSET_NAME = "checkset.npz"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CONFUSION_PNG = "confusion.png"
FP32_ONNX = "model_fp32.onnx"
INT8_ONNX = "model_int8.onnx"
GATE_BACKEND = "onnxruntime"  # the runner of the artifact-level gate (manifest.gate), in reference numerics
REFERENCE = "reference"  # `edgetl check --backend reference`: the artifact gate (edgetl.numerics)
DEFAULT_STABILITY = 0.97  # worst perturbed agreement (edgetl.stability); profiles set their own


# ------------------------------------------------------------------------------------------
# Thresholds
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Thresholds:
    """When the gate passes. ``max_drop`` in points of top-1 accuracy; ``min_agreement`` 0..1."""

    max_drop: float = 1.0
    min_agreement: float = 0.98
    speed_check: bool = True
    min_speedup: float = 1.0  # quantized must be at least this many times faster than float
    speed_repeats: int = 30
    # worst agreement over the perturbed checksets (edgetl.stability); None: measured when asked, not gated
    min_stability_agreement: float | None = DEFAULT_STABILITY
    stability_jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if not (self.max_drop >= 0) or self.max_drop > 100:
            raise EdgetlError(f"--max-drop {self.max_drop} is not valid",
                              hint="give the allowed top-1 drop in points, 0..100 (e.g. --max-drop 1.0)")
        if not 0 <= self.min_agreement <= 1:
            raise EdgetlError(f"--min-agreement {self.min_agreement} is not valid",
                              hint="give a fraction 0..1 (e.g. --min-agreement 0.98)")
        if not self.min_speedup > 0:
            raise EdgetlError(f"--min-speedup {self.min_speedup} is not valid", hint="give a ratio > 0 (1.0 = faster)")
        if self.speed_repeats < 3:
            raise EdgetlError(f"speed_repeats {self.speed_repeats} is too small", hint="use at least 3")
        if self.min_stability_agreement is not None and not 0 <= self.min_stability_agreement <= 1:
            raise EdgetlError(f"--min-stability {self.min_stability_agreement} is not valid",
                              hint="give a fraction 0..1 (e.g. --min-stability 0.97)")

    @classmethod
    def coerce(cls, obj: Any = None) -> "Thresholds":
        """A Thresholds from itself, a target profile's ``Gate`` (max_accuracy_drop, min_agreement),
        a mapping with either spelling, or None (defaults)."""
        if obj is None:
            return cls()
        if isinstance(obj, cls):
            return obj
        get = obj.get if isinstance(obj, Mapping) else lambda k, d=None: getattr(obj, k, d)
        kw: dict[str, Any] = {}
        drop = get("max_drop", get("max_accuracy_drop", None))
        if drop is not None:
            kw["max_drop"] = float(drop)
        for key in ("min_agreement", "min_speedup", "speed_repeats", "speed_check", "stability_jpeg_quality"):
            if get(key, None) is not None:
                kw[key] = get(key)
        if isinstance(obj, Mapping) and "min_stability_agreement" in obj:  # a stored gate: None = not gated
            kw["min_stability_agreement"] = obj["min_stability_agreement"]
        elif get("min_stability_agreement", None) is not None:
            kw["min_stability_agreement"] = float(get("min_stability_agreement"))
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------
# Checkset
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Checkset:
    inputs: np.ndarray  # preprocessed (N, ...) float32, the manifest's input layout
    labels: np.ndarray  # (N,) int64 class index
    float_logits: np.ndarray  # (N, K) float32 from the float PyTorch model
    paths: tuple[str, ...] = ()  # the test images, relative to the run's data root
    # the float model's logits on each perturbed copy (edgetl.stability), stored like float_logits so
    # every later check compares against the same float answers; with the settings they were made with
    stability_logits: dict[str, np.ndarray] | None = None
    stability_settings: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        if len(self.inputs) != n or len(self.float_logits) != n or n == 0:
            raise EdgetlError(f"checkset: {len(self.inputs)} inputs, {n} labels, {len(self.float_logits)} logits",
                              hint="the checkset is damaged: re-create the artifact with `edgetl quantize`")

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: str | Path) -> Path:
        extra: dict[str, np.ndarray] = {}
        if self.stability_logits:
            extra = {f"stability__{k}": np.asarray(v, np.float32) for k, v in self.stability_logits.items()}
            extra["stability_settings"] = np.asarray(json.dumps(self.stability_settings or {}))
        np.savez_compressed(path, inputs=self.inputs.astype(np.float32), labels=self.labels.astype(np.int64),
                            float_logits=self.float_logits.astype(np.float32), paths=np.asarray(self.paths, dtype=str),
                            **extra)
        return Path(path)


def checkset_file(path: str | Path) -> Path:
    """``checkset.npz`` of an artifact folder (or the file itself), which must exist; either task's."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKSET_NAME
    if not p.is_file():
        raise EdgetlError(f"{p}: no checkset", hint="the artifact is incomplete: re-create it with `edgetl quantize`")
    return p


def load_checkset(path: str | Path) -> Checkset:
    """Read ``checkset.npz`` (or the artifact folder holding it)."""
    p = checkset_file(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            missing = [k for k in ("inputs", "labels", "float_logits") if k not in data]
            if missing:
                raise EdgetlError(f"{p}: missing array(s) {missing}", hint="re-create the artifact with `edgetl quantize`")
            paths = tuple(str(x) for x in data["paths"]) if "paths" in data else ()
            stab = {k[len("stability__"):]: np.asarray(data[k], np.float32) for k in data.files
                    if k.startswith("stability__")}
            settings = json.loads(str(data["stability_settings"])) if "stability_settings" in data else None
            return Checkset(np.asarray(data["inputs"], np.float32), np.asarray(data["labels"], np.int64),
                            np.asarray(data["float_logits"], np.float32), paths, stab or None, settings)
    except (OSError, ValueError) as exc:
        raise EdgetlError(f"{p}: not a readable checkset ({exc})", hint="re-create the artifact") from None


# ------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def paired_bootstrap_drop(correct_float: np.ndarray, correct_quant: np.ndarray, n_boot: int = 2000,
                          seed: int = 0) -> tuple[float, float]:
    """95% CI of (float top-1 - quantized top-1) in points, resampling images (paired).

    Each image's paired difference is -1, 0 or +1, so a resample of n images is fully described by
    how many of each it draws: a multinomial draw per resample (the same distribution as resampling
    indices, in O(n_boot) memory instead of n_boot x n)."""
    n = len(correct_float)
    rng = np.random.default_rng(seed)
    diff = correct_float.astype(np.int64) - correct_quant.astype(np.int64)
    if n == 0 or not diff.any():
        return 0.0, 0.0
    p = np.array([(diff == 1).sum(), (diff == -1).sum(), (diff == 0).sum()], dtype=np.float64) / n
    counts = rng.multinomial(n, p, size=n_boot)
    drops = 100.0 * (counts[:, 0] - counts[:, 1]) / n
    return float(np.percentile(drops, 2.5)), float(np.percentile(drops, 97.5))


def confusion(labels: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


# ------------------------------------------------------------------------------------------
# Speed
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Speed:
    float_ms: float
    quant_ms: float
    repeats: int
    backend: str
    batch: int = 1

    @property
    def speedup(self) -> float:
        return self.float_ms / self.quant_ms if self.quant_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}


def measure_speed(float_runner, quant_runner, sample: np.ndarray, repeats: int = 30, warmup: int = 5,
                  quant_sample: np.ndarray | None = None) -> Speed:
    """Median batch-1 latency of both runners, measured side by side (alternating every call).
    ``quant_sample``: the same images in the quantized build's own input form, when it differs
    (a build with folded preprocessing takes uint8)."""
    x = np.ascontiguousarray(sample[:1])
    xq = x if quant_sample is None else np.ascontiguousarray(quant_sample[:1])
    for _ in range(warmup):
        float_runner.infer(x)
        quant_runner.infer(xq)
    tf, tq = [], []
    for i in range(repeats):
        order = (float_runner, quant_runner) if i % 2 == 0 else (quant_runner, float_runner)
        for r in order:
            t0 = time.perf_counter()
            r.infer(x if r is float_runner else xq)
            (tf if r is float_runner else tq).append(time.perf_counter() - t0)
    return Speed(1000 * float(np.median(tf)), 1000 * float(np.median(tq)), repeats,
                 getattr(quant_runner, "backend", "?"))


# ------------------------------------------------------------------------------------------
# The gate
# ------------------------------------------------------------------------------------------

QUALITY_FAILURES = ("accuracy", "agreement", "stability")
SUGGEST_ACCURACY = [
    "calibrate on more images (--calib-size, default 300) or from the deployment scene (--calib-dir)",
    "try another calibrator (--calibrator percentile | entropy | mse)",
    "use quantization-aware training (--method qat)",
    "keep more layers in float (--max-fallback-rounds, --fallback-step; see sensitivity.csv)",
]
# a stability miss: QAT that distils on moved images (edgetl.stability.random_perturbation); on the ELPV
# Lite1 model it cut the INT8-only flips from 24 to 14 (docs/results.md)
SUGGEST_STABILITY = "QAT on images moved the way the stability check moves them (--qat-perturb 0.5; QAT only)"
SUGGEST_SPEED = [
    "the backend does not run this QDQ form faster than float: render the form that backend runs fast "
    "(--qdq-form auto --backend B), or check the device has fast INT8 (VNNI/DP4A/tensor cores)",
    "for toy models, where quantize/dequantize overhead dominates, relax it with --no-speed-check",
]


@dataclass
class GateResult:
    passed: bool
    n: int
    float_top1: float
    quant_top1: float
    drop: float  # points
    drop_ci: tuple[float, float]
    agreement: float
    agreement_ci: tuple[float, float]
    max_logit_error: float
    mean_logit_error: float
    per_class: list[dict[str, Any]]
    worst_classes: list[dict[str, Any]]
    confusion_float: list[list[int]]
    confusion_quant: list[list[int]]
    thresholds: dict[str, Any]
    speed: dict[str, Any] | None = None  # Speed.to_dict() + gated, or None when not measured
    speed_note: str = ""
    failures: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    runner: dict[str, Any] = field(default_factory=dict)  # backend, version, device, precision
    checked: str = ""
    margins: dict[str, int] = field(default_factory=dict)  # images to spare before each threshold fails
    stability: dict[str, Any] | None = None  # edgetl.stability.measure(), when measured
    numerics: str = ""  # "reference" | "deployed" (edgetl.numerics)
    cpu: dict[str, Any] | None = None  # the CPU it ran on (edgetl.runtime.cpu), for deployed numerics

    def without_tried(self, method: str | None) -> "GateResult":
        """Drop the suggestion of what was already done (QAT, when the artifact is QAT)."""
        if method == "qat":
            self.suggestions = [x for x in self.suggestions if "--method qat" not in x]
        return self

    @property
    def accuracy_passed(self) -> bool:
        """Every part but speed passed: accuracy drop, agreement and (when measured) stability."""
        return not any(f.startswith(QUALITY_FAILURES) for f in self.failures)

    def add_stability(self, st: dict[str, Any]) -> "GateResult":
        """Record a stability measurement (``edgetl.stability.measure``); a miss fails the gate."""
        self.stability = st
        if st.get("passed") is False:
            w = st["perturbations"][st["worst"]]
            also = (f"; float itself changed its prediction on {w['float_flips']}: images near the decision boundary"
                    if w.get("float_flips") else "")
            self.failures.append(f"stability: agreement {w['agreement']:.4f} on the {st['worst']} perturbation < "
                                 f"--min-stability {st['threshold']:g} ({w['int8_flips']} INT8 flip(s) where float "
                                 f"kept its prediction{also})")
            if SUGGEST_STABILITY not in self.suggestions:
                self.suggestions.insert(0, SUGGEST_STABILITY)
            if SUGGEST_ACCURACY[0] not in self.suggestions:
                self.suggestions += SUGGEST_ACCURACY
            self.passed = False
        if "margin_images" in st:
            self.margins["stability"] = st["margin_images"]
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["drop_ci"] = list(self.drop_ci)
        d["agreement_ci"] = list(self.agreement_ci)
        d["status"] = "passed" if self.passed else "failed"
        return d

    def summary(self) -> dict[str, Any]:
        """The compact form stored in manifest.json (the full one is in report.json)."""
        keep = ("passed", "status", "n", "float_top1", "quant_top1", "drop", "drop_ci", "agreement", "agreement_ci",
                "max_logit_error", "mean_logit_error", "speed", "speed_note", "failures", "thresholds", "runner", "checked",
                "margins", "stability", "numerics", "cpu")
        d = self.to_dict()
        return {k: d[k] for k in keep}


def gate_from_logits(quant_logits: np.ndarray, checkset: Checkset, thresholds: Any = None,
                     labels: Sequence[str] | None = None, speed: Speed | None = None, speed_gated: bool = True,
                     speed_note: str = "", runner_info: Mapping[str, Any] | None = None) -> GateResult:
    """The gate verdict from the quantized logits on the checkset (pure: no model is run here)."""
    th = Thresholds.coerce(thresholds)
    q = np.asarray(quant_logits, np.float32)
    f = checkset.float_logits
    if q.shape != f.shape:
        raise EdgetlError(f"the model returns logits of shape {q.shape[1:]}, the checkset's float model {f.shape[1:]}",
                          hint="the model and the checkset are from different runs: re-create the artifact")
    y = checkset.labels
    k = f.shape[1]
    names = list(labels) if labels is not None else [str(i) for i in range(k)]
    pf, pq = f.argmax(1), q.argmax(1)
    cf, cq = pf == y, pq == y
    n = len(y)
    agree_k = int((pf == pq).sum())
    float_top1, quant_top1 = float(cf.mean()), float(cq.mean())
    drop = 100.0 * (float_top1 - quant_top1)
    err = np.abs(q - f)
    per_class = []
    for c in range(k):
        m = y == c
        nc = int(m.sum())
        rf = float(cf[m].mean()) if nc else float("nan")
        rq = float(cq[m].mean()) if nc else float("nan")
        per_class.append({"label": names[c], "n": nc, "recall_float": rf, "recall_quant": rq,
                          "delta_points": 100.0 * (rq - rf) if nc else 0.0})
    worst = sorted((p for p in per_class if p["n"] and p["delta_points"] < 0), key=lambda p: p["delta_points"])[:3]
    failures = []
    spare = margins(agree_k, int(cf.sum()) - int(cq.sum()), n, th)  # decided in whole images, as reported
    if spare["drop"] < 0:
        failures.append(f"accuracy: top-1 drop {drop:.2f} points > --max-drop {th.max_drop:g} "
                        f"({-spare['drop']} image(s) too many)")
    agreement = agree_k / n
    if spare["agreement"] < 0:
        failures.append(f"agreement: {agreement:.4f} < --min-agreement {th.min_agreement:g} "
                        f"({-spare['agreement']} image(s) short)")
    speed_d = None
    if speed is not None:
        gated = bool(th.speed_check and speed_gated)
        speed_d = {**speed.to_dict(), "gated": gated, "min_speedup": th.min_speedup}
        if gated and speed.speedup < th.min_speedup:
            failures.append(f"speed: the quantized model is not faster than float on {speed.backend} "
                            f"({speed.quant_ms:.3g} ms vs {speed.float_ms:.3g} ms batch-1 median, "
                            f"speed-up {speed.speedup:.2f}x < {th.min_speedup:g}x)")
    elif th.speed_check and not speed_note:
        speed_note = "speed not measured: no float model on this backend to compare with"
    suggestions = []
    if any(x.startswith(QUALITY_FAILURES) for x in failures):
        suggestions += SUGGEST_ACCURACY
    if any(x.startswith("speed") for x in failures):
        suggestions += SUGGEST_SPEED
    info = {k2: v for k2, v in dict(runner_info or {}).items() if k2 != "options"}
    return GateResult(
        passed=not failures, n=n, float_top1=float_top1, quant_top1=quant_top1, drop=drop,
        drop_ci=paired_bootstrap_drop(cf, cq), agreement=agreement, agreement_ci=wilson(agree_k, n),
        max_logit_error=float(err.max()), mean_logit_error=float(err.mean()), per_class=per_class,
        worst_classes=worst, confusion_float=confusion(y, pf, k).tolist(), confusion_quant=confusion(y, pq, k).tolist(),
        thresholds=th.to_dict(), speed=speed_d, speed_note=speed_note, failures=failures, suggestions=suggestions,
        runner=info, checked=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        margins=spare)


def margins(agree: int, lost: int, n: int, th: Thresholds) -> dict[str, int]:
    """How many more images could go wrong before each threshold fails (negative: how many short).

    ``agreement``: disagreements to spare above ``min_agreement``; ``drop``: net top-1 losses to spare
    under ``max_drop`` (a value exactly on a threshold passes, as the gate decides)."""
    from .stability import images_needed

    allowed_loss = int(np.floor(th.max_drop * n / 100.0 + 1e-9))
    return {"agreement": agree - images_needed(th.min_agreement, n), "drop": allowed_loss - lost}


def evaluate(runner, checkset: Checkset, thresholds: Any = None, labels: Sequence[str] | None = None,
             float_runner=None, speed_gated: bool = True, speed_note: str = "",
             inputs: np.ndarray | None = None, stability: Any = None,
             to_input: Callable[[np.ndarray], np.ndarray] | None = None,
             stability_if_accurate: bool = False) -> GateResult:
    """Run ``runner`` (any backend's Runner) on the checkset and return the gate verdict.

    ``thresholds``: :class:`Thresholds`, a target profile's ``Gate``, a mapping, or None.
    ``float_runner``: the float model on the same backend; when given (and the speed check is on)
    the batch-1 latencies of both are measured side by side and gated (``speed_gated``).
    ``inputs``: the checkset images in ``runner``'s own input form when it is not the stored float
    form (``edgetl.runtime.preprocess.to_model_input``); ``float_runner`` always gets the stored form.
    ``stability``: an ``edgetl.stability.StabilityProbe``: the perturbed checkset is run too (each
    batch through ``to_input`` into the runner's form) and gated by ``min_stability_agreement``;
    ``stability_if_accurate``: only when the accuracy part passed (the repair loop's rounds).
    """
    th = Thresholds.coerce(thresholds)
    q_inputs = checkset.inputs if inputs is None else inputs
    logits = runner.infer_many(q_inputs)
    speed = None
    if th.speed_check and float_runner is not None:
        speed = measure_speed(float_runner, runner, checkset.inputs, repeats=th.speed_repeats,
                              quant_sample=None if inputs is None else q_inputs)
    gate = gate_from_logits(logits, checkset, th, labels, speed, speed_gated, speed_note, getattr(runner, "info", {}))
    if stability is not None and (gate.accuracy_passed or not stability_if_accurate):
        from .stability import measure

        convert = to_input or (lambda x: x)
        gate.add_stability(measure(stability, lambda x: runner.infer_many(convert(x)), logits,
                                   th.min_stability_agreement))
    return gate


# ------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def gate_markdown(g: Mapping[str, Any], title: str = "Accuracy gate") -> str:
    th = g["thresholds"]
    verdict = "PASSED" if g["passed"] else "FAILED"
    lines = [f"## {title}: {verdict}", ""]
    r = g.get("runner") or {}
    if r:
        lines.append(f"Run by **{r.get('backend', '?')}** {r.get('version', '')} on {r.get('device', '?')} "
                     f"(precision: {r.get('precision', '?')}), {g['n']} held-out test images.")
        lines.append("")
    if g.get("numerics") == "reference":
        lines += ["Numerics: **reference** (Q/DQ executed as float ops, graph optimisations off): what the "
                  "quantization computes, the same on every CPU.", ""]
    elif g.get("cpu"):
        from .runtime.cpu import describe

        lines += [f"Numerics: **deployed** on a CPU of class **{describe(g['cpu'])}** (INT8 kernels differ "
                  "between CPU classes: `edgetl check` on another class re-measures it).", ""]
    lo, hi = g["drop_ci"]
    alo, ahi = g["agreement_ci"]
    m = g.get("margins") or {}

    def spare(key: str) -> str:
        return f" (margin {m[key]:+d} images)" if key in m else ""

    lines += [
        "| | value | 95% CI | threshold |", "| --- | --- | --- | --- |",
        f"| float top-1 (PyTorch) | {_pct(g['float_top1'])} | | |",
        f"| quantized top-1 | {_pct(g['quant_top1'])} | | |",
        f"| drop (points) | {g['drop']:.2f} | [{lo:.2f}, {hi:.2f}] (paired bootstrap) | ≤ {th['max_drop']:g}"
        f"{spare('drop')} |",
        f"| agreement with float | {_pct(g['agreement'])} | [{_pct(alo)}, {_pct(ahi)}] (Wilson) | ≥ "
        f"{_pct(th['min_agreement'])}{spare('agreement')} |",
        f"| logit error max / mean | {g['max_logit_error']:.4f} / {g['mean_logit_error']:.4f} | | |",
    ]
    st = g.get("stability")
    if st:
        lines.append(f"| stability: worst perturbed agreement ({st['worst']}) | {_pct(st['min_agreement'])} | | "
                     + (f"≥ {_pct(st['threshold'])}{spare('stability')}" if st.get("threshold") is not None
                        else "not gated") + " |")
    s = g.get("speed")
    if s:
        gated = "gated" if s.get("gated") else "not gated"
        lines.append(f"| batch-1 latency float / quantized ({s['backend']}) | {s['float_ms']:.3g} / {s['quant_ms']:.3g} ms "
                     f"(×{s['speedup']:.2f}) | median of {s['repeats']} interleaved | ≥ ×{th['min_speedup']:g} ({gated}) |")
    if g.get("speed_note"):
        lines += ["", f"Speed: {g['speed_note']}"]
    if st:
        from .stability import markdown as stability_markdown

        lines += stability_markdown(st)
    lines += ["", "| class | n | recall float | recall quantized | Δ points |", "| --- | --- | --- | --- | --- |"]
    for p in g["per_class"]:
        lines.append(f"| {p['label']} | {p['n']} | {_pct(p['recall_float'])} | {_pct(p['recall_quant'])} | "
                     f"{p['delta_points']:+.2f} |")
    if g["worst_classes"]:
        lines += ["", "Classes that lost most: " + ", ".join(f"{w['label']} ({w['delta_points']:+.1f})"
                                                           for w in g["worst_classes"])]
    if g["failures"]:
        lines += ["", "**Failures:**", ""] + [f"- {f}" for f in g["failures"]]
        lines += ["", "**What to try:**", ""] + [f"- {s2}" for s2 in g["suggestions"]]
    return "\n".join(lines)


def notes_markdown(report: Mapping[str, Any]) -> list[str]:
    """report.json's ``notes`` (what a command said about the artifact, e.g. the compile's note that an ARM
    target's gate ran on x86 kernels) as report.md's "Notes" section; both tasks' renderers use it."""
    notes = report.get("notes") or []
    return ["## Notes", "", *(f"- {n}" for n in notes), ""] if notes else []


def render_report(report: Mapping[str, Any]) -> str:
    """report.md of either task, rendered from report.json's content alone (the one way report.md is written)."""
    if report.get("task") == "detection":
        from .detect.compile import render_report as render_detection

        return render_detection(dict(report))
    return render_report_md(report)


def render_report_md(report: Mapping[str, Any]) -> str:
    """report.md of a classification artifact, rendered from report.json's content (so a re-check re-renders it)."""
    g = report.get("gate")
    deployable = bool(report.get("deployable"))
    head = ("**VERIFIED: the quantized model passed its accuracy gate: deployable.**" if deployable else
            "**NOT DEPLOYABLE: the quantized model failed its gate** (manifest.gate.deployable = false).")
    lines = [f"# edgetl artifact report: {report.get('name', '')}", "", head, ""]
    src = report.get("source_model")
    if src:
        arch = f", architecture `{src['arch']}`" if src.get("arch") else ""
        lines += [f"Model trained outside edgetl: `{src.get('file')}` (sha256 `{str(src.get('sha256'))[:16]}…`{arch}).", ""]
    lines += notes_markdown(report)
    q = report.get("quantization") or {}
    if q:
        lines += ["## Quantization", "", "| | |", "| --- | --- |"]
        for key in ("method", "calibrator", "qdq_format", "for_backend", "calibration_images", "calibration_source",
                    "calibration_sha256", "float_layers", "seconds"):
            if key in q:
                val = ", ".join(f"`{v}`" for v in q[key]) if isinstance(q[key], list) else q[key]
                lines.append(f"| {key} | {val if val not in ('', None) else '—'} |")
        lines.append("")
    p = report.get("parity")
    if p:
        lines += [f"FP32 ONNX parity with PyTorch on {p['n']} test images: max |diff| {p['max_abs_diff']:.2e} "
                  f"(tolerance {p['tolerance']:.2e}), top-1 agreement {_pct(p['top1_agreement'])}.", ""]
    if g:
        title = "Artifact gate (reference numerics)" if g.get("numerics") == "reference" else "Accuracy gate"
        lines += [gate_markdown(g, title=title), ""]
        lines += [f"![float vs quantized confusion matrices]({CONFUSION_PNG})", ""]
    lines += _escalation_markdown(report.get("escalation"))
    rounds = report.get("rounds") or []
    if len(rounds) > 1 or (rounds and rounds[0].get("float_layers")):
        lines += ["## Mixed-precision rounds", "", "| round | layers kept in float | top-1 | drop | agreement | passed | kept |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rounds:
            kept = r.get("kept", r is rounds[-1])
            lines.append(f"| {r['round']} | {len(r['float_layers'])} | {_pct(r['quant_top1'])} | {r['drop']:.2f} | "
                         f"{_pct(r['agreement'])} | {r['accuracy_passed']} | {'yes' if kept else ''} |")
        lines.append("")
    forms = report.get("forms") or []
    if forms:
        lines += ["## QDQ forms measured", "", "| form | top-1 | agreement | ORT batch-1 ms | chosen |",
                  "| --- | --- | --- | --- | --- |"]
        for fm in forms:
            ms = f"{fm['ort_ms']:.3g}" if fm.get("ort_ms") is not None else "—"
            lines.append(f"| {fm['form']} | {_pct(fm['quant_top1'])} | {_pct(fm['agreement'])} | {ms} | {'**the artifact**' if fm.get('chosen') else ''} |")
        lines.append("")
    sens = report.get("sensitivity") or []
    if sens:
        from .calibration.sensitivity import LayerSensitivity, to_markdown

        lines += ["## Layer sensitivity (each layer kept in float in turn; largest gain first)", "",
                  to_markdown([LayerSensitivity(**s) for s in sens]), ""]
    builds = report.get("builds") or {}
    for backend, bg in builds.items():
        lines += [gate_markdown(bg, title=f"Gate of the {backend} build"), ""]
    return "\n".join(lines).rstrip() + "\n"


def _escalation_markdown(esc: Mapping[str, Any] | None) -> list[str]:
    """The repair ladder: each step's gate (in the numerics that judged it) and time."""
    if not esc or not esc.get("steps"):
        return []
    nm = esc.get("numerics") or {}
    cpu = nm.get("cpu")
    from .runtime.cpu import describe

    where = nm.get("label", "?") + (f" on {describe(cpu)}" if cpu else "")
    lines = ["## Repair ladder", "", f"Each step judged on **{where}**.", "",
             "| step | float layers | top-1 | drop | agreement | stability | passed | seconds | kept |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in esc["steps"]:
        if "skipped" in x:
            lines.append(f"| {x['step']} | | | | | | skipped: {x['skipped']} | | |")
            continue
        st = "—" if x.get("stability") is None else _pct(x["stability"])
        lines.append(f"| {x['step']} | {len(x['float_layers'])} | {_pct(x['quant_top1'])} | {x['drop']:.2f} | "
                     f"{_pct(x['agreement'])} | {st} | {'yes' if x['passed'] else 'no'} | {x['seconds']:.0f} | "
                     f"{'**yes**' if x.get('kept') else ''} |")
    return lines + ["", f"Verdict: {esc.get('verdict', '')}", ""]


def write_confusion_png(gate: GateResult | Mapping[str, Any], labels: Sequence[str], path: Path,
                        quant_title: str = "quantized") -> Path | None:
    """Float and quantized confusion matrices side by side (edgetl.plots.plot_confusion, twice)."""
    import tempfile

    import cv2

    try:
        from .plots import plot_confusion
        g = gate.to_dict() if isinstance(gate, GateResult) else dict(gate)
        with tempfile.TemporaryDirectory(prefix="edgetl-cm-") as tmp:
            a = plot_confusion(g["confusion_float"], labels, Path(tmp) / "f.png", title="float (PyTorch)")
            b = plot_confusion(g["confusion_quant"], labels, Path(tmp) / "q.png", title=quant_title)
            ia, ib = cv2.imread(str(a)), cv2.imread(str(b))
    except EdgetlError:  # matplotlib missing (a device install): keep the report without the picture
        return None
    h = max(ia.shape[0], ib.shape[0])
    pad = [cv2.copyMakeBorder(im, 0, h - im.shape[0], 0, 0, cv2.BORDER_CONSTANT, value=(255, 255, 255))
           for im in (ia, ib)]
    ok, png = cv2.imencode(".png", cv2.hconcat(pad))
    if not ok:
        return None
    atomic_write(path, png.tobytes())
    return path


def write_report(folder: Path, report: Mapping[str, Any], labels: Sequence[str], gate: GateResult | None = None) -> list[str]:
    """report.json + report.md (+ confusion.png when ``gate`` is given). Returns the names written."""
    from .report import keep_bench_section

    folder = Path(folder)
    atomic_write(folder / REPORT_JSON, json.dumps(report, indent=2, default=_json_default) + "\n")
    atomic_write(folder / REPORT_MD, keep_bench_section(folder / REPORT_MD, render_report(report)))
    names = [REPORT_JSON, REPORT_MD]
    if gate is not None:
        title = f"quantized ({(gate.runner or {}).get('backend', '?')})"
        if write_confusion_png(gate, labels, folder / CONFUSION_PNG, title):
            names.append(CONFUSION_PNG)
    return names


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o).__name__)


# ------------------------------------------------------------------------------------------
# Checking an artifact
# ------------------------------------------------------------------------------------------

def _build_entry(manifest: Manifest, backend: str) -> dict[str, Any] | None:
    return next((dict(b) for b in manifest.builds if b.get("backend") == backend), None)


def _resolve_entry(folder: Path, manifest: Manifest, backend: str | None) -> tuple[str, dict[str, Any]]:
    """``(backend, build entry)`` to gate: ``reference`` (the artifact gate), a build, or by default the
    build of the artifact's target when it has one, else the reference gate of the QDQ graph."""
    quantized = (folder / INT8_ONNX).is_file()
    if backend is None:  # the build that decides (see decisive), else the reference gate
        target_backend = (manifest.target or {}).get("backend") or (manifest.quantization or {}).get("for_backend")
        backend = (target_backend if target_backend and _build_entry(manifest, target_backend)
                   else REFERENCE if quantized else GATE_BACKEND)
    if backend == REFERENCE:
        if not quantized:
            raise EdgetlError(f"{folder}: has no {INT8_ONNX}: the reference numerics are those of a QDQ graph",
                              hint="check a build instead: edgetl check ARTIFACT --backend onnxruntime")
        from .numerics import REFERENCE_OPTIONS

        return REFERENCE, {"backend": GATE_BACKEND, "model": INT8_ONNX, "precision": "int8",
                           "options": dict(REFERENCE_OPTIONS)}
    entry = _build_entry(manifest, backend)
    if entry is None:
        if backend != GATE_BACKEND:
            raise EdgetlError(f"{folder}: has no {backend} build",
                              hint=f"build it first: edgetl build {folder} --backend {backend}")
        entry = {"backend": GATE_BACKEND, "model": INT8_ONNX if quantized else FP32_ONNX,
                 "precision": "int8" if quantized else "fp32", "options": {}}
    return backend, entry


def cpu_note(recorded: Mapping[str, Any] | None) -> str:
    """Why a deployed verdict recorded on another CPU may not hold here ("" when the class is the same)."""
    from .runtime.cpu import describe, host_cpu, same_int8_numerics

    here = host_cpu().to_dict()
    if not recorded or same_int8_numerics(recorded, here):
        return ""
    return (f"this build's gate was recorded on {describe(recorded)}; this CPU is {describe(here)}: its INT8 kernels "
            "sum products differently, so the deployed verdict is re-measured here and may differ (the reference "
            "verdict, `--backend reference`, is the same on every CPU)")


def check_artifact(folder: str | Path, backend: str | None = None, thresholds: Any = None,
                   options: Mapping[str, Any] | None = None, update: bool = True,
                   log: Callable[[str], None] = lambda s: None) -> GateResult:
    """Re-run the gate of an artifact on its checkset and record it, verifying every file first.

    ``backend``: ``reference`` (the artifact gate: the QDQ graph with Q/DQ as float ops, the same on
    every CPU), a build (its deployed numerics on this machine), or None: the build that decides the
    artifact (its target's, or the backend it was quantized for) when it has one, else ``reference``. The stability part runs when the thresholds gate it.
    The result goes to manifest.gate (reference) or the build's ``gate``, the verdict
    (``manifest.gate.deployable``) is re-derived, report.json/md and confusion.png are rewritten,
    hashes refreshed, the manifest rewritten atomically."""
    folder = Path(folder)
    manifest = open_verified(folder, "artifact", hint="pass the --out folder of `edgetl quantize` or `edgetl "
                                                      "compile` (a run is quantized first: edgetl quantize RUN --out "
                                                      "artifacts/NAME)")
    if manifest.task == "detection":
        from .detect.compile import check_detection
        from .detect.gate import DetThresholds

        backend, entry = _resolve_entry(folder, manifest, backend)
        th = DetThresholds.coerce(thresholds if thresholds is not None else (manifest.gate or {}).get("thresholds"))
        opts = {**dict(entry.get("options") or {}), **dict(options or {})}
        return check_detection(folder, manifest, backend, entry, opts, th, update, log)
    th = Thresholds.coerce(thresholds if thresholds is not None else (manifest.gate or {}).get("thresholds"))
    backend, entry = _resolve_entry(folder, manifest, backend)
    if backend == REFERENCE:
        th = replace(th, speed_check=False)  # Q/DQ as float ops is not a deployment: no speed to gate
    opts = {**dict(entry.get("options") or {}), **dict(options or {})}
    checkset = load_checkset(folder)
    from .calibration.qdq import form_by_key
    from .runtime.preprocess import build_input_spec, to_model_input
    from .runtime.runners import open_runner

    build_spec = build_input_spec(manifest.preprocess, entry.get("input"))  # what the build takes
    inputs = to_model_input(checkset.inputs, manifest.preprocess, build_spec)
    form = form_by_key((manifest.quantization or {}).get("qdq_format"))
    speed_gated = form is None or backend in form.fast_on
    note = "" if speed_gated else (f"measured, not gated: this artifact holds the {form.key} form, rendered for "
                                   f"{', '.join(form.fast_on)}; its speed is gated on that backend's build")
    if backend == REFERENCE:
        from .numerics import REFERENCE_NOTE

        note = REFERENCE_NOTE
    moved = cpu_note((entry.get("gate") or {}).get("cpu")) if backend != REFERENCE else ""
    if moved:
        log(f"note: {moved}")
    log(f"gate: {backend} {entry['model']} on {len(checkset)} checkset images")
    runner = open_runner(entry["backend"], folder / entry["model"], opts)
    float_runner = None
    if th.speed_check:
        try:
            float_runner = open_runner(backend, folder / FP32_ONNX, opts)
        except EdgetlError as exc:
            note = f"speed not measured: the float model does not load on {backend} ({exc.message})"
    try:
        probe = _probe(folder, checkset, manifest, th) if th.min_stability_agreement is not None else None
        result = evaluate(runner, checkset, th, manifest.labels, float_runner, speed_gated, note, inputs=inputs,
                          stability=probe, to_input=lambda x: to_model_input(x, manifest.preprocess, build_spec))
        result.without_tried((manifest.quantization or {}).get("method"))
        result.numerics = REFERENCE if backend == REFERENCE else "deployed"
        if backend != REFERENCE and runner.uses_cpu:
            from .runtime.cpu import host_cpu

            result.cpu = host_cpu().to_dict()
    finally:
        runner.close()
        if float_runner is not None:
            float_runner.close()
    if update:
        record_gate(folder, manifest, backend, entry, result)
    return result


def _probe(folder: Path, checkset: Checkset, manifest: Manifest, th: Thresholds):
    """The perturbed checkset of ``folder`` with the float model's predictions (model_fp32.onnx, ORT)."""
    from .runtime.runners import open_runner
    from .stability import make_probe

    if checkset.stability_logits:  # the float answers stored at compile time: no float model to run
        return make_probe(checkset.inputs, manifest.preprocess, checkset.float_logits, None,
                          th.stability_jpeg_quality, stored=checkset)
    runner = open_runner(GATE_BACKEND, folder / FP32_ONNX)
    try:
        return make_probe(checkset.inputs, manifest.preprocess, checkset.float_logits, runner.infer_many,
                          th.stability_jpeg_quality)
    finally:
        runner.close()


def gate_recorded(folder: Path, manifest: Manifest, backend: str, result: Any) -> tuple[dict[str, Any], Manifest]:
    """``(report, manifest)`` with ``result`` (a gate of either task: ``summary()``/``to_dict()``)
    recorded: in the build's entry, or as ``gate`` for the reference numerics; the verdict re-derived.
    The caller writes its task's report files and seals the folder."""
    report_path = folder / REPORT_JSON
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"name": folder.name}
    builds = [dict(b) for b in manifest.builds]
    for b in builds:
        if b.get("backend") == backend:
            b["gate"] = result.summary()
    changes: dict[str, Any] = {"builds": tuple(builds)}
    if backend == REFERENCE:
        report["gate"] = result.to_dict()
        changes["gate"] = {**result.summary(), "backend": GATE_BACKEND, "model": INT8_ONNX}
    else:
        report.setdefault("builds", {})[backend] = result.to_dict()
    new = with_verdict(manifest.replace(**changes))
    report["deployable"] = deployable(new)
    return report, new


def record_gate(folder: Path, manifest: Manifest, backend: str, entry: Mapping[str, Any], result: GateResult) -> Manifest:
    """Write ``result`` into report.json/md (+ confusion.png) and the manifest; refresh hashes."""
    report, new = gate_recorded(folder, manifest, backend, result)
    write_report(folder, report, manifest.labels, result if backend == REFERENCE else None)
    return seal(folder, new)


def decisive(manifest: Manifest) -> tuple[str, Mapping[str, Any] | None]:
    """``(what, gate)``: the gate that decides whether the artifact is deployable.

    The build of the artifact's target (``manifest.target.backend``, else the backend the
    quantization was rendered for) once it has a gate: its deployed numerics are what the device
    runs. Until then (a TensorRT engine is built on the device) the reference gate of the QDQ graph."""
    target = (manifest.target or {}).get("backend") or (manifest.quantization or {}).get("for_backend")
    if target:
        entry = _build_entry(manifest, target)
        if entry is not None and isinstance(entry.get("gate"), Mapping):
            return f"the {target} build", entry["gate"]
    if manifest.gate is not None:
        return "the reference numerics", manifest.gate
    gated = [b for b in manifest.builds if isinstance(b.get("gate"), Mapping)]
    return (f"the {gated[0]['backend']} build", gated[0]["gate"]) if gated else ("nothing", None)


def with_verdict(manifest: Manifest) -> Manifest:
    """``manifest.gate`` with ``deployable`` and ``decided_by`` re-derived from :func:`decisive`."""
    if manifest.gate is None:
        return manifest
    what, g = decisive(manifest)
    return manifest.replace(gate={**dict(manifest.gate), "deployable": bool(g and g.get("passed")),
                                  "decided_by": what})


def next_steps(gate: Mapping[str, Any], quantization: Mapping[str, Any] | None) -> str:
    """The hint of a failed gate, from what was tried: the gate's suggestions less what the
    quantization already did (QAT, the other calibrators, float layers), named as tried."""
    q = quantization or {}
    steps = [x for x in q.get("ladder") or [] if "skipped" not in x]
    tried = [x["step"] for x in steps] or ([q["method"]] if q.get("method") else [])
    qat = any(t.startswith("qat") for t in tried) or q.get("method") == "qat"
    calibrators = {t.split()[-1] for t in tried if t.startswith("ptq ")}
    out = []
    for s in gate.get("suggestions") or []:
        if "--method qat" in s and qat:
            epochs = (q.get("qat") or {}).get("epochs")
            s = f"QAT for longer (--qat-epochs {2 * epochs if epochs else 'N'}) or on more images (--qat-max-images)"
        elif "another calibrator" in s and len(calibrators) > 1:
            continue
        elif "--qat-perturb" in s and (q.get("qat") or {}).get("perturb"):
            continue
        elif "more layers in float" in s and q.get("fallback_rounds", 0) >= q.get("max_fallback_rounds", 99):
            s = f"allow more float layers than the {q['fallback_rounds']} rounds tried (--max-fallback-rounds)"
        out.append(s)
    if not out:
        return "report.md has the repair ladder and what would reach the gate"
    done = f"tried: {', '.join(tried)}; " if tried else ""
    return done + "next: " + "; ".join(out[:3]) + " (report.md has the details)"


def deployable(manifest: Manifest) -> bool:
    """Whether the artifact may ship: the decisive gate (:func:`decisive`) passed."""
    g = decisive(manifest)[1]
    return bool(g and g.get("passed"))


__all__ = ["Checkset", "GateResult", "Speed", "Thresholds", "check_artifact", "decisive", "deployable", "evaluate",
           "next_steps",
           "gate_from_logits", "with_verdict",
           "load_checkset", "measure_speed", "paired_bootstrap_drop", "notes_markdown", "record_gate", "render_report",
           "render_report_md", "wilson", "write_report"]
