"""The repair loop: from a quantization that misses the gate to one that meets it, judged on the target.

Every candidate QDQ graph is judged by the numerics that decide the target (``edgetl.numerics``):
the target's own build on this CPU (OpenVINO IR with its folded preprocessing and inference
precision; ONNX Runtime with the profile's session options), or, for TensorRT, the reference
numerics. Judging on ONNX Runtime alone passed graphs that the OpenVINO build then failed (ELPV on
an AVX2-only EPYC: 98.22 % agreement on ONNX Runtime, 97.46 % on OpenVINO), and failed TensorRT
graphs that were fine (the host's fused s8s8 kernels on AVX2: 23 % agreement; the same graph in
reference numerics: 99 %).

Two levels:

* :func:`quantize_with_fallback` (one quantization result): render the QDQ graph, judge it; while it
  misses, keep the next most sensitive layer in float (leave-one-out ranking,
  ``calibration.sensitivity``) and judge again, up to ``max_fallback_rounds``; when every round
  misses, keep the best round (more float layers is not always better).
* :func:`escalate` (the ladder of ``edgetl compile``): PTQ with the default calibrator (+ fallback)
  -> PTQ with the other calibrators (+ fallback) -> QAT (when there is a run to fine-tune; capped by
  ``--time-budget``) -> a verdict naming what would reach the gate. Each step is recorded with its
  gate result and time; the first that passes is kept, else the best. ``--method`` pins one step.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .calibration import sensitivity as sens
from .calibration.calibrators import calibrate
from .calibration.cache import save_ranges
from .calibration.qdq import QdqForm, weighted_nodes
from .check import FP32_ONNX, Checkset, GateResult, evaluate
from .numerics import REFERENCE, Numerics, host_kernels

Log = Callable[[str], None]
LADDER_CALIBRATORS = ("minmax", "percentile", "mse")  # PTQ steps of the ladder, in order


@dataclass
class Material:
    """What every step of the repair shares, computed once: the float export, the calibration
    images, the checkset, the perturbed checkset (stability) and, when QAT is possible, the run."""

    folder: Path  # the artifact folder being written (holds model_fp32.onnx)
    work: Path  # scratch space (removed afterwards)
    source: Any  # the run's Manifest (or a stand-in for a model trained elsewhere)
    cal: Any  # calibration.sets.CalibrationSet
    cal_inputs: np.ndarray
    checkset: Checkset
    parity: dict[str, Any] | None = None
    run: Any = None  # a loaded run: QAT can fine-tune it
    _prepared: Path | None = None
    _probe: Any = None

    @property
    def spec(self):
        return self.source.preprocess

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.source.labels)

    @property
    def fp32(self) -> Path:
        return self.folder / FP32_ONNX

    @property
    def prepared(self) -> Path:
        """The float graph PTQ quantizes (``quant_pre_process`` of the export), made once."""
        if self._prepared is None:
            from .quantize import prepare_float

            self._prepared = prepare_float(self.fp32, self.work / "prepared.onnx")
        return self._prepared

    def probe(self, jpeg_quality: int | None = None):
        """The perturbed checkset and the float model's predictions on it (``edgetl.stability``)."""
        if self._probe is None:
            from .runtime.runners import open_runner
            from .stability import JPEG_QUALITY, make_probe

            runner = open_runner("onnxruntime", self.fp32)
            try:
                self._probe = make_probe(self.checkset.inputs, self.spec, self.checkset.float_logits,
                                         runner.infer_many, jpeg_quality or JPEG_QUALITY, stored=self.checkset)
            finally:
                runner.close()
            # the artifact's checkset keeps the float answers, so later checks compare with these
            self.checkset = replace(self.checkset, stability_logits=dict(self._probe.float_logits),
                                    stability_settings=dict(self._probe.settings))
        return self._probe


@dataclass
class Candidate:
    """One quantization result, ready to render: a prepared float graph and its activation ranges."""

    step: str  # "ptq minmax", "qat mse", ...
    cfg: Any  # quantize.QuantizeConfig of this step
    prepared: Path
    ranges_for: Callable[[QdqForm], dict]
    qat_info: dict[str, Any] | None = None
    extra_forms: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Rendered:
    """The outcome of the mixed-precision loop on one candidate."""

    gate: GateResult
    float_layers: list[str]
    rounds: list[dict[str, Any]]
    sensitivity: list[sens.LayerSensitivity] | None
    model: Path  # the rendered QDQ graph of the kept round


def judge(numerics: Numerics, model: Path, mat: Material, cfg: Any, work: Path,
          stability_if_accurate: bool = True, stability: bool = True) -> GateResult:
    """The gate (accuracy, agreement, then stability when those pass) of ``model`` in ``numerics``
    (``stability`` False: not measured, e.g. for a gate that does not decide the artifact)."""
    runner = numerics.open(model, mat.spec, work)
    try:
        th = replace(cfg.thresholds, speed_check=False)
        probe = mat.probe(th.stability_jpeg_quality) if stability and th.min_stability_agreement is not None else None
        gate = evaluate(runner, mat.checkset, th, mat.labels, inputs=numerics.model_inputs(mat.checkset.inputs, mat.spec),
                        stability=probe, to_input=lambda x: numerics.model_inputs(x, mat.spec),
                        stability_if_accurate=stability_if_accurate, speed_note="speed is measured on the build")
    finally:
        runner.close()
    gate.numerics = numerics.kind
    gate.cpu = numerics.to_dict()["cpu"]
    return gate


def ranking_numerics(numerics: Numerics) -> Numerics:
    """Where the sensitivity ranking runs (it only orders the layers; every fallback round is judged
    on ``numerics`` itself): for a CPU target, ONNX Runtime's fused kernels on this CPU (the judge
    itself for ONNX Runtime; for OpenVINO the closest fast stand-in: one OpenVINO conversion per
    layer would cost minutes, and the reference numerics run 5x slower, ~0.9 vs 0.2 s per probe on
    Lite0); for TensorRT the reference numerics (this CPU's kernels are not TensorRT's)."""
    if numerics.kind == REFERENCE:
        return numerics
    return numerics if numerics.backend == "onnxruntime" else host_kernels()


def cache_dir() -> Path:
    """Where edgetl keeps what it can recompute: ``$EDGETL_CACHE``, else ``$XDG_CACHE_HOME/edgetl``,
    else ``~/.cache/edgetl``."""
    if os.environ.get("EDGETL_CACHE"):
        return Path(os.environ["EDGETL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetl"


@dataclass(frozen=True)
class RankMetric:
    """What the sensitivity ranking compares between the float model and each candidate: ``outputs``
    (a runner and the probe inputs -> one array), ``error`` (float array, candidate array ->
    ``(sqnr_db, rel_error, agreement)`` as ``calibration.sensitivity.logit_error``); ``name`` (with
    every parameter the metric has) is part of the ranking's cache key. Classification compares
    logits; a task with other outputs (detection: ``edgetl.detect.repair``) provides its own."""

    name: str
    outputs: Callable[[Any, np.ndarray], np.ndarray]
    error: Callable[[np.ndarray, np.ndarray], tuple] = sens.logit_error
    method: Callable[..., list] | None = None  # how layers are ranked, as _rank_layers (log= too); None = leave-one-out


LOGITS = RankMetric("logits", lambda runner, x: runner.infer_many(x))


def _ranking_key(prepared: Path, cache: Path, cfg: Any, inputs: np.ndarray, numerics: Numerics, kept,
                 metric: RankMetric = LOGITS) -> str:
    """Everything the ranking depends on but the ranges (compared with a tolerance, see
    :func:`rank_layers`): the graph, the QDQ form and weight range, the layers already in float, the
    numerics that ran it, the probe images and the tool versions."""
    import hashlib

    import onnxruntime

    h = hashlib.sha256()
    h.update(Path(prepared).read_bytes())
    h.update(np.ascontiguousarray(inputs).tobytes())
    h.update(json.dumps([cfg.form.key, cfg.reduce_range, sorted(kept), numerics.kind, numerics.backend,
                         sorted((k, str(v)) for k, v in numerics.options.items()), onnxruntime.__version__,
                         sens.FIELDS] + ([] if metric is LOGITS else [metric.name])).encode())
    return h.hexdigest()


def rank_layers(prepared: Path, cache: Path, cfg: Any, inputs: np.ndarray, numerics: Numerics,
                kept: list[str] | tuple = (), log: Log = lambda s: None,
                metric: RankMetric = LOGITS) -> list[sens.LayerSensitivity]:
    """Leave-one-out sensitivity: the model with each layer in float in turn (same ranges and form),
    ranked by the logit SQNR that buys (``calibration.sensitivity``), run in ``numerics`` (ONNX Runtime).
    ``kept``: layers already in float (the baseline the gains are measured from).

    The renders are ``render_qdq``'s, byte for byte, made by one ``quantize.QdqRenderer`` (the weights
    quantized once: ~0.2 instead of ~1.4 s a Lite0 render). A cold ranking of the ELPV demo run
    (Lite0, 50 layers, 32 images, 2-vCPU AVX2 EPYC shared with another job) took 35-37 s, 94 s with
    ``render_qdq`` per layer; ~0.4 s a layer is ONNX Runtime running the model.

    A ranking is a pure function of its inputs, so it is kept in :func:`cache_dir` under their sha256
    (``_ranking_key``): compiling one run for several targets whose rankings run in the same numerics
    ranks once. The ranges are matched within a relative 1e-4, not by their bytes: two calibrations of
    the same images differ in their last bits between processes (threaded reductions), and a
    detector's compile ranked again every time (~8-13 min on 2 cores); a difference that small does
    not change a ranking."""
    from .calibration.cache import load_ranges

    key = _ranking_key(prepared, cache, cfg, inputs, numerics, kept, metric)
    stored = cache_dir() / "sensitivity" / f"{key}.json"
    ranges = load_ranges(cache)
    try:
        entries = json.loads(stored.read_text(encoding="utf-8"))
        for e in entries:
            if _same_ranges(e["ranges"], ranges):
                ranking = [sens.LayerSensitivity(**row) for row in e["ranking"]]
                log(f"sensitivity: the same graph, ranges and numerics were ranked before: reusing {stored}")
                return ranking
    except (OSError, ValueError, TypeError, KeyError):
        entries = []
    ranking = (metric.method or _rank_layers)(prepared, cache, cfg, inputs, numerics, kept, metric, log=log)
    entries = [*entries[-3:], {"ranges": {k: list(v) for k, v in ranges.items()},
                               "ranking": [r.to_dict() for r in ranking]}]
    try:  # a cache: failing to write it (read-only home, full disk) costs only the next ranking
        stored.parent.mkdir(parents=True, exist_ok=True)
        tmp = stored.with_name(f".{stored.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries), encoding="utf-8")
        tmp.replace(stored)
    except OSError:
        pass
    return ranking


def _same_ranges(a: dict, b: dict, rtol: float = 1e-4) -> bool:
    """The same tensors with ranges equal within ``rtol`` of their span (a stored entry vs now)."""
    if set(a) != set(b):
        return False
    for k, (lo, hi) in b.items():
        lo2, hi2 = a[k]
        tol = rtol * max(abs(hi - lo), abs(hi), abs(lo), 1e-12)
        if abs(lo2 - lo) > tol or abs(hi2 - hi) > tol:
            return False
    return True


def _rank_layers(prepared: Path, cache: Path, cfg: Any, inputs: np.ndarray, numerics: Numerics,
                 kept: list[str] | tuple = (), metric: RankMetric = LOGITS,
                 log: Log = lambda s: None) -> list[sens.LayerSensitivity]:
    from .quantize import QdqRenderer

    probe = prepared.parent / "sensitivity_probe.onnx"
    renderer = QdqRenderer(prepared, cache, cfg.form, cfg.reduce_range, log)  # the renders of render_qdq, faster

    def logits(model: Path) -> np.ndarray:
        runner = numerics.open(model, None)
        try:
            return metric.outputs(runner, inputs)
        finally:
            runner.close()

    def render(exclude: list[str]) -> Path:
        return renderer.render(probe, exclude=[*kept, *exclude])

    layers = [x for x in weighted_nodes(prepared) if x[0] not in kept]
    return sens.rank_layers(layers, lambda node: logits(render([node])), logits(prepared), logits(render([])),
                            error=metric.error)


def _round_row(rnd: int, exclude: list[str], gate: GateResult) -> dict[str, Any]:
    st = gate.stability or {}
    return {"round": rnd, "float_layers": list(exclude), "quant_top1": gate.quant_top1, "drop": gate.drop,
            "agreement": gate.agreement, "stability": st.get("min_agreement"), "margins": dict(gate.margins),
            "accuracy_passed": gate.accuracy_passed}


def better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether round/step ``a`` is better than ``b``: passed first, then agreement, then the smaller
    drop, then stability, then fewer float layers."""
    def key(x: dict[str, Any]) -> tuple:
        return (bool(x["accuracy_passed"]), x["agreement"], -x["drop"], x.get("stability") or 0.0,
                -len(x.get("float_layers") or []))
    return key(a) > key(b)


@dataclass
class Verdict:
    """A task's judgement of one fallback round: ``passed``; ``row``, the round's record (the keys
    ``better`` orders by); ``gate``, the task's gate object; ``line``, what the log says of it."""

    passed: bool
    row: dict[str, Any]
    gate: Any
    line: str = ""


def fallback_rounds(render: Callable[[list[str]], Path], judge_round: Callable[[Path], Verdict],
                    rank: Callable[[list[str]], list], max_rounds: int, step: int | Callable[[int], int], log: Log,
                    ranking: list | None = None, order: Callable[[dict, dict], bool] = better,
                    ranker_label: str = "", seek_margin: int = 0, seek_rounds: int = 2,
                    margin_unit: str = "image(s)") -> tuple[Verdict, list[str], list[dict[str, Any]], list | None]:
    """The mixed-precision loop of any task: render the graph with ``exclude`` in float, judge it;
    while it misses, add the next ``step`` layers of the sensitivity ranking that gain in float
    (``rank(kept)``, layers with ``node`` and ``gain_db``; ``step`` may be a function of the number
    already in float, e.g. doubling them), up to ``max_rounds``; when every round
    misses, re-render and re-judge the best by ``order``. ``ranking``: computed up front, or None
    (ranked when round 0 misses). Returns the kept verdict, its float layers, every round's row and
    the first full ranking.

    ``seek_margin`` (images, or ``margin_unit``): a round that passes with less margin than this to one of its
    thresholds (``row["margins"]``) is a pass on the line, which another CPU, another rendering of the
    same images or a few more images can turn into a failure; up to ``seek_rounds`` more rounds are
    tried (also past ``max_rounds``), and the passing round with the largest margin is kept (ties:
    fewer float layers)."""
    full_ranking, ranked_from = ranking, []
    exclude: list[str] = []
    rounds: list[dict[str, Any]] = []
    passed: list[bool] = []
    first_pass: int | None = None
    for rnd in range(max_rounds + seek_rounds + 1):
        v = judge_round(render(exclude))
        rounds.append({"round": rnd, "float_layers": list(exclude), **v.row})
        passed.append(v.passed)
        log(f"round {rnd}: {len(exclude)} float layer(s)  {v.line}")
        if v.passed and first_pass is None:
            first_pass = rnd
        if (first_pass is None and rnd >= max_rounds) or (first_pass is not None and rnd - first_pass >= seek_rounds) \
                or (v.passed and (_margin(v.row) >= seek_margin or _perfect(v.row))):
            break
        if first_pass is not None:  # the widest pass so far is still on the line
            widest = max((r for r, ok in zip(rounds, passed) if ok), key=_margin)
            log(f"the widest pass so far (round {widest['round']}) is {_margin(widest)} {margin_unit} from a "
                f"threshold (< {seek_margin}): one more round in search of margin")
        if ranking is None:
            log(f"sensitivity: ranking layers for the mixed-precision fallback ({ranker_label})")
            ranking = full_ranking = rank([])
            ranked_from = []
        candidates = [r.node for r in ranking if r.node not in exclude and r.gain_db > 0]
        if not candidates and exclude != ranked_from:
            # the layers kept so far dominated the error, so the others ranked as gaining nothing: rank
            # them again from the current mixed-precision model
            log(f"sensitivity: ranking again with {len(exclude)} layer(s) in float ({ranker_label})")
            ranked_from = list(exclude)
            ranking = rank(ranked_from)
            candidates = [r.node for r in ranking if r.gain_db > 0]
        if not candidates:
            log("fallback: no remaining layer gains anything in float; stopping")
            break
        exclude += candidates[:step(len(exclude)) if callable(step) else step]
    best = _kept_round(rounds, passed, order)
    if len(rounds) > 1:
        if best is not rounds[-1]:
            exclude = list(best["float_layers"])
            why = "the largest margin" if passed[rounds.index(best)] else "the best"
            log(f"fallback: keeping round {best['round']} ({why}), {len(exclude)} float layer(s)")
            v = judge_round(render(exclude))
        for x in rounds:
            x["kept"] = x is best
    return v, exclude, rounds, full_ranking


def _margin(row: dict[str, Any]) -> int:
    """The smallest margin, in images, of a round to its thresholds (a large number when unrecorded)."""
    margins = [m for m in (row.get("margins") or {}).values() if isinstance(m, (int, float))]
    return int(min(margins)) if margins else 10 ** 9


def _perfect(row: dict[str, Any]) -> bool:
    """Nothing left to gain: every image agrees, no accuracy lost, stable wherever float is (a small
    checkset's margin is at its largest then, however few images that is)."""
    return row.get("agreement") == 1.0 and (row.get("drop") or 0.0) <= 0.0 and row.get("stability") in (None, 1.0)


def _kept_round(rounds: list[dict[str, Any]], passed: list[bool], order: Callable[[dict, dict], bool]) -> dict:
    """The passing round with the largest margin (ties: the earlier, fewer float layers); when none
    passed, the best by ``order``."""
    ok = [x for x, p in zip(rounds, passed) if p]
    if ok:
        return max(ok, key=lambda x: (_margin(x), -x["round"]))
    best = rounds[0]
    for x in rounds[1:]:
        if order(x, best):
            best = x
    return best


def quantize_with_fallback(mat: Material, cand: Candidate, numerics: Numerics, out: Path, log: Log) -> Rendered:
    """Render ``cand`` into ``out`` and judge it in ``numerics``; while it misses the gate keep the
    next most sensitive layer in float, up to ``max_fallback_rounds``; keep the best round
    (:func:`fallback_rounds` with the classification gate)."""
    from .quantize import render_qdq

    cfg = cand.cfg
    work = out.parent
    cache = save_ranges(cand.ranges_for(cfg.form), work / "ranges.json")
    sens_inputs = mat.cal_inputs[:cfg.sensitivity_images]
    ranker = ranking_numerics(numerics)
    ranking = None
    if cfg.sensitivity:
        log(f"sensitivity: keeping each of {len(weighted_nodes(cand.prepared))} layers in float in turn, "
            f"on {len(sens_inputs)} calibration images ({ranker.label})")
        ranking = rank_layers(cand.prepared, cache, cfg, sens_inputs, ranker, log=log)

    def render(exclude: list[str]) -> Path:
        return render_qdq(cand.prepared, cache, out, cfg.form, exclude, reduce_range=cfg.reduce_range)

    def judge_round(model: Path) -> Verdict:
        gate = judge(numerics, model, mat, cfg, work)
        row = {k: v for k, v in _round_row(0, [], gate).items() if k not in ("round", "float_layers")}
        st = f", stability {gate.stability['min_agreement']:.4f}" if gate.stability else ""
        line = (f"top-1 {gate.quant_top1:.4f} (float {gate.float_top1:.4f})  agreement {gate.agreement:.4f}{st}  "
                f"{'ok' if gate.accuracy_passed else 'misses the gate'}  [{numerics.label}]")
        return Verdict(gate.accuracy_passed, row, gate, line)

    def rank(kept: list[str]) -> list:
        return rank_layers(cand.prepared, cache, cfg, sens_inputs, ranker, kept=kept, log=log)

    v, exclude, rounds, full = fallback_rounds(render, judge_round, rank, cfg.max_fallback_rounds, cfg.fallback_step,
                                               log, ranking, better, ranker.label, seek_margin=cfg.seek_margin)
    return Rendered(v.gate, exclude, rounds, full, out)


# ------------------------------------------------------------------------------------------
# The escalation ladder
# ------------------------------------------------------------------------------------------

def ladder(cfg: Any, qat_possible: bool) -> list[Any]:
    """The steps to try, in order: ``cfg.method`` "auto" -> PTQ with each calibrator, then QAT;
    "ptq"/"qat" -> that one step (``--method`` pins it)."""
    if cfg.method != "auto":
        return [cfg]
    first = cfg.calibrator or LADDER_CALIBRATORS[0]
    steps = [replace(cfg, method="ptq", calibrator=first)]
    if getattr(cfg, "depthwise_forms", False):  # the same calibration in the other weight form
        steps.append(replace(steps[0], depthwise_full=not cfg.prefers_depthwise_full))
    steps += [replace(cfg, method="ptq", calibrator=c) for c in LADDER_CALIBRATORS if c != first]
    if qat_possible:  # NNCF's overflow fix trains 7-bit weights everywhere: QAT renders in that form
        steps.append(replace(cfg, method="qat", calibrator=None,
                             **({"depthwise_full": False} if getattr(cfg, "depthwise_forms", False) else {})))
    return steps


def step_name(cfg: Any) -> str:
    dense = ", 8-bit depthwise" if getattr(cfg, "reduce_range", False) == "dense" else ""
    return f"{cfg.method} {cfg.resolved_calibrator}{dense}"


def make_candidate(mat: Material, cfg: Any, work: Path, log: Log, deadline: float | None = None) -> Candidate:
    """Calibrate (PTQ) or fine-tune (QAT) one step's quantization result."""
    t0 = time.perf_counter()
    if cfg.method == "qat":
        from .quantize import qat

        prepared, ranges_for, info, nncf_onnx = qat(mat.run, mat.cal_inputs, mat.fp32, cfg, work, log, deadline)
        return Candidate(step_name(cfg), cfg, prepared, ranges_for, info, {"nncf-native": nncf_onnx},
                         time.perf_counter() - t0)
    memo: dict[str, dict] = {}
    prepared = mat.prepared

    def ranges_for(form: QdqForm) -> dict:
        if form.key not in memo:
            memo[form.key] = calibrate(prepared, mat.cal_inputs, cfg.resolved_calibrator, form.symmetric_activations,
                                       cfg.static_batch or 16)
        return memo[form.key]

    ranges_for(cfg.form)
    return Candidate(step_name(cfg), cfg, prepared, ranges_for, seconds=time.perf_counter() - t0)


@dataclass
class Escalation:
    candidate: Candidate
    rendered: Rendered
    steps: list[dict[str, Any]]  # one row per step: tried (gate, seconds) or skipped (why)
    numerics: Numerics
    verdict: str


def _step_row(name: str, r: Rendered, seconds: float, cand: Candidate) -> dict[str, Any]:
    g = r.gate
    return {"step": name, "method": cand.cfg.method, "calibrator": cand.cfg.resolved_calibrator,
            "float_layers": list(r.float_layers), "rounds": len(r.rounds), "passed": g.accuracy_passed,
            "quant_top1": g.quant_top1, "drop": g.drop, "agreement": g.agreement,
            "stability": (g.stability or {}).get("min_agreement"), "margins": dict(g.margins),
            "failures": [f for f in g.failures if not f.startswith("speed")], "seconds": round(seconds, 1),
            "accuracy_passed": g.accuracy_passed}


def escalate(mat: Material, cfg: Any, numerics: Numerics, log: Log, time_budget: float | None = None,
             profile: Any = None) -> Escalation:
    """Climb the ladder until a step passes the gate in ``numerics``; keep the first that passes, else the best."""
    plan = ladder(cfg, qat_possible=mat.run is not None)
    t_start = time.perf_counter()
    deadline = t_start + time_budget if time_budget else None
    rows: list[dict[str, Any]] = []
    best: tuple[Candidate, Rendered, dict[str, Any]] | None = None
    for i, step_cfg in enumerate(plan):
        name = step_name(step_cfg)
        if deadline is not None and best is not None and time.perf_counter() >= deadline:
            rows.append({"step": name, "skipped": f"--time-budget {time_budget:g} s spent"})
            log(f"escalation: {name} skipped (the --time-budget of {time_budget:g} s is spent)")
            continue
        if len(plan) > 1:
            log(f"escalation {i + 1}/{len(plan)}: {name} (judged on {numerics.label})")
        t0 = time.perf_counter()
        work = mat.work / f"step{i}"
        work.mkdir(parents=True, exist_ok=True)
        cand = make_candidate(mat, step_cfg, work, log, deadline)
        r = quantize_with_fallback(mat, cand, numerics, work / "model_int8.onnx", log)
        row = _step_row(name, r, time.perf_counter() - t0, cand)
        rows.append(row)
        if best is None or better(row, best[2]):
            best = (cand, r, row)
        if r.gate.accuracy_passed:
            break
    assert best is not None
    cand, r, row = best
    for x in rows:
        x["kept"] = x is row
    return Escalation(cand, r, rows, numerics, _verdict(rows, row, numerics, profile))


def _verdict(rows: list[dict[str, Any]], kept: dict[str, Any], numerics: Numerics, profile: Any) -> str:
    if kept["passed"]:
        tried = [x["step"] for x in rows if "skipped" not in x]
        return (f"{kept['step']} passes on {numerics.label}" +
                (f" (after {', '.join(tried[:-1])})" if len(tried) > 1 else ""))
    hw = getattr(profile, "hardware", None)
    floats = "fp16 or fp32" if hw is None or hw.fp16_capable else "fp32"
    skipped = [x["step"] for x in rows if "skipped" in x]
    more = f"; {', '.join(skipped)} did not run within --time-budget (give it more time)" if skipped else ""
    return (f"no step reached the gate on {numerics.label}; kept the best, {kept['step']} (agreement "
            f"{kept['agreement']:.4f}, drop {kept['drop']:.2f} points){more}. What would reach it: a float build "
            f"(--precision {floats.split(' or ')[0]}: {floats} keeps the float model's predictions), more calibration "
            "images from the deployment scene (--calib-size, --calib-dir), or QAT with more epochs or images")


__all__ = ["Candidate", "Escalation", "Material", "RankMetric", "Rendered", "Verdict", "escalate", "fallback_rounds", "judge", "ladder",
           "make_candidate", "quantize_with_fallback", "rank_layers"]
