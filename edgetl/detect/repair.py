"""The mixed-precision fallback of a detector: ``edgetl.repair``'s loop with the detection gate.

The loop itself is the classifier's (``edgetl.repair.fallback_rounds``: render with some layers in
float, judge on the target's numerics, keep the best round when none passes); what differs is what
the task provides:

* **ranking metric** (:data:`DET_OUTPUTS`): leave-one-out, each weighted layer kept in float in turn
  on calibration images (training images: the checkset that judges the rounds is never used to
  choose them), scored by the SQNR of what decides a detection: the foreground class probabilities
  and the box regressions at the anchors where the float model sees something (a foreground
  probability >= :data:`FG_MIN`). A logit SQNR over all anchors would be dominated by the thousands
  of background anchors that never become a box. The ranking's ``agreement`` column is the
  detection F1 (same class, IoU >= 0.5, at the deployed score) of that model on the probe images;
* **judge**: the detection gate (mAP@0.5 drop and detection agreement) in the target's numerics;
* **order** (:func:`det_better`): passed first, then agreement minus the mAP drop (an INT8 mAP above
  float is no gain), then fewer float layers;
* **step**: the number of float layers doubles each round (1, 2, 4, ...): on the demo detector no
  single layer closes the gap (the error is spread over the backbone), so a fixed step of one layer
  a round would need tens of rounds, each a build and a gate.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from ..repair import RankMetric, Verdict, fallback_rounds, rank_layers, ranking_numerics

FG_MIN = 0.05  # anchors whose float foreground probability reaches this are compared by the ranking
RANK_IMAGES = 32  # calibration images the ranking runs on


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _outputs(runner: Any, inputs: np.ndarray) -> np.ndarray:
    """``(N, A, 4 + C + 1)``: the raw box regressions and the class probabilities (softmax of the logits)."""
    boxes, scores = runner.infer_many_all(inputs)[:2]
    return np.concatenate([np.asarray(boxes, np.float32), _softmax(np.asarray(scores, np.float64)).astype(np.float32)],
                          -1)


def det_error(post: Any) -> Callable[[np.ndarray, np.ndarray], tuple]:
    """``(sqnr_db, rel_error, agreement)`` of a candidate's :func:`_outputs` against the float model's:
    the relative error of the foreground probabilities and of the box regressions at the anchors
    float sees something at, averaged; agreement = detection F1 at the deployed score (``post``)."""
    from .gate import _decode, _pairs

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean((b.astype(np.float64) - a) ** 2) / max(float(np.mean(a.astype(np.float64) ** 2)), 1e-12))

    def error(ref: np.ndarray, test: np.ndarray) -> tuple[float, float, float]:
        fg = ref[..., 5:].max(-1) >= FG_MIN
        if not fg.any():
            fg = np.ones(ref.shape[:2], bool)
        r = 0.5 * (rel(ref[..., 5:][fg], test[..., 5:][fg]) + rel(ref[..., :4][fg], test[..., :4][fg]))
        sqnr = 10.0 * np.log10(1.0 / r) if r > 0 else float("inf")
        logit = (lambda p: np.log(np.maximum(p[..., 4:], 1e-12)))  # softmax(log p) = p: the decoder's input
        pairs = _pairs(_decode(ref[..., :4], logit(ref), post, post.score_threshold),
                       _decode(test[..., :4], logit(test), post, post.score_threshold))
        m, nf, nq = (int(pairs[k].sum()) for k in ("matched", "n_float", "n_quant"))
        return float(sqnr), r, (2.0 * m / (nf + nq) if nf + nq else 1.0)

    return error


def rank_cumulative(prepared: Path, cache: Path, cfg: Any, inputs: np.ndarray, numerics: Any,
                    kept: list[str] | tuple, metric: RankMetric, log: Callable[[str], None] = lambda s: None) -> list:
    """Accumulation-aware ranking: the layers are quantized one more at a time in graph order (all
    the ones before it INT8, all after it float, ``kept`` always float) and each is scored by the
    output error it adds, ``gain_db`` = the SQNR the fully quantized model gains with that error
    removed. Leave-one-out misses an error spread over many layers (removing one of twenty noise
    sources gains ~nothing each: on the demo detector every layer ranked within 0.1 dB of the others
    while the first half of the backbone in float passed the gate). The renders are ``render_qdq``'s,
    made by one ``QdqRenderer`` (the same files, the weights quantized once): a cold ranking of a Lite0
    SSDLite (85 layers, 32 images at 320x320, 2-vCPU AVX2 EPYC shared with another job) took 174 s,
    268 s with ``render_qdq`` per step; 115 s of it is ONNX Runtime running the 86 models (batch 1)."""
    from ..calibration import sensitivity as sens
    from ..calibration.qdq import weighted_nodes
    from ..quantize import QdqRenderer

    probe = prepared.parent / "sensitivity_probe.onnx"
    layers = [x for x in weighted_nodes(prepared) if x[0] not in kept]
    names = [n for n, _ in layers]
    renderer = QdqRenderer(prepared, cache, cfg.form, cfg.reduce_range, log)

    def outputs(exclude: list[str] | None) -> np.ndarray:
        model = prepared if exclude is None else renderer.render(probe, [*kept, *exclude])
        runner = numerics.open(model, None)
        try:
            return metric.outputs(runner, inputs)
        finally:
            runner.close()

    ref = outputs(None)
    prev = metric.error(ref, outputs(names))[1]  # only the data-movement ops quantized
    added = []
    for k in range(len(layers)):
        sqnr, rel, agree = metric.error(ref, outputs(names[k + 1:]))
        added.append((rel - prev, sqnr, agree))
        prev = rel
    full = max(prev, 1e-12)
    scored = [(n, op, 10.0 * np.log10(full / max(full - a, 1e-12)), s, g) for (n, op), (a, s, g) in zip(layers, added)]
    scored.sort(key=lambda r: -r[2])
    return [sens.LayerSensitivity(i + 1, n, op, float(gn), float(s), float(g)) for i, (n, op, gn, s, g) in enumerate(scored)]


def det_metric(post: Any) -> RankMetric:
    """The detection outputs compared by :func:`det_error`, ranked by :func:`rank_cumulative`."""
    return RankMetric(f"detection fg>={FG_MIN} score {post.score_threshold:g} cumulative", _outputs, det_error(post),
                      rank_cumulative)


def det_better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Round/step ``a`` before ``b``: passed, then agreement minus the mAP@0.5 drop (a drop below 0
    counts as 0), then fewer float layers."""
    def key(x: dict[str, Any]) -> tuple:
        return bool(x["passed"]), x["agreement"] - max(x["drop"], 0.0) / 100, -len(x.get("float_layers") or [])

    return key(a) > key(b)


SEEK_MARGIN = 2  # boxes: a round that passes closer than this to a threshold tries more rounds (repair.fallback_rounds)


def margins_in_boxes(g: dict[str, Any]) -> dict[str, float]:
    """A detection gate's margins in boxes, as the classification gate counts images: the agreement's
    margin times half the float + quantized detections (one box more or less matched moves F1 by
    about 2 / (n_float + n_quant)); the mAP@0.5 drop's in ground-truth boxes (one box of n_gt found
    or lost moves mAP@0.5 by about 100 / n_gt points)."""
    ad, m = g["agreement_detail"], g["margins"]
    return {"agreement": m["agreement"] * (ad["n_float"] + ad["n_quant"]) / 2, "drop": m["drop"] * g["n_gt"] / 100}


def doubling(n_float: int) -> int:
    return max(1, n_float)


def fallback(mat: Any, ranges: Path, form: Any, reduce_range: bool, numerics: Any, thresholds: Any, out: Path,
             max_rounds: int, progress: Callable[[str], None], first: list[str] | tuple = (),
             ranking: list | None = None, seek_margin: int = SEEK_MARGIN) -> dict[str, Any]:
    """PTQ of ``mat.prepared`` with ``ranges`` rendered into ``out``, judged by the detection gate in
    ``numerics``, with the sensitivity-ranked mixed-precision fallback. ``first``: layers kept in float
    from round 0 on; ``ranking``: a ranking to use (another calibrator's: ranking Lite0's 85 layers
    costs 85 renders, minutes on 2 cores), None = rank these ranges when round 0 misses; ``seek_margin``
    (boxes, :func:`margins_in_boxes`): a pass closer to a threshold tries more rounds. Returns
    ``{"gate", "model", "float_layers", "rounds", "ranking"}``."""
    from ..quantize import render_qdq
    from .compile import judge

    cfg = SimpleNamespace(form=form, reduce_range=reduce_range)
    ranker = ranking_numerics(numerics)
    probe = mat.cal_inputs[:RANK_IMAGES]
    metric = det_metric(mat.post)

    def render(exclude: list[str]) -> Path:
        return render_qdq(mat.prepared, ranges, out, form, [*first, *exclude], reduce_range=reduce_range)

    def judge_round(model: Path) -> Verdict:
        t0 = time.perf_counter()
        g = judge(numerics, model, mat, thresholds, out.parent)
        row = {"passed": g["passed"], "drop": round(g["drop"], 3), "agreement": round(g["agreement"], 4),
               "quant_map50": g["quant_map50"], "margins": margins_in_boxes(g),
               "seconds": round(time.perf_counter() - t0, 1)}
        line = (f"mAP@0.5 {100 * g['float_map50']:.1f} -> {100 * g['quant_map50']:.1f} (drop {g['drop']:+.2f} pts), "
                f"agreement {g['agreement']:.3f} -> {'PASSED' if g['passed'] else 'failed'}  [{numerics.label}]")
        return Verdict(g["passed"], row, g, line)

    def rank(kept: list[str]) -> list:
        progress(f"    sensitivity: layers quantized one more at a time, on {len(probe)} calibration images ({ranker.label})")
        return rank_layers(mat.prepared, ranges, cfg, probe, ranker, kept=[*first, *kept], metric=metric,
                           log=lambda s: progress("    " + s))

    v, exclude, rounds, ranking = fallback_rounds(render, judge_round, rank, max_rounds, doubling,
                                                  lambda s: progress("    " + s), ranking, det_better, ranker.label,
                                                  seek_margin=seek_margin, margin_unit="box(es)")
    return {"gate": v.gate, "model": out, "float_layers": [*first, *exclude], "rounds": rounds, "ranking": ranking}


__all__ = ["FG_MIN", "RANK_IMAGES", "SEEK_MARGIN", "det_better", "det_error", "det_metric", "doubling", "fallback",
           "margins_in_boxes"]
