"""Per-layer quantization sensitivity: which layers, kept in float, help the quantized model most.

Method ("quantize everything except this layer", leave-one-out): for each weighted layer
(Conv/Gemm/MatMul) the model is rendered with the same ranges and QDQ form as the full INT8
model but that one layer left in float (``nodes_to_exclude``, exactly what the mixed-precision
fallback does), run by the runtime with its graph optimisations, and its logits on a few
calibration images compared with the float logits. ``gain_db`` = logit SQNR of that model minus
the SQNR of the fully quantized one: how much keeping the layer in float buys. Ranked by gain
(largest first); written as ``sensitivity.csv`` and into report.json/report.md.

Why not "quantize only this layer": measured on EfficientNet-Lite0, it ranks a conv by the error of
its pre-activation output (its ReLU6 is not folded into the range when the Clip is not quantized
with it), and keeping its top-ranked layer in float made the full model *worse* (logit MSE
0.13 -> 0.33): the errors of quantized layers do not add up, so the fallback is ranked by what it
actually does.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class LayerSensitivity:
    rank: int
    node: str
    op_type: str
    gain_db: float  # logit SQNR gained by keeping this layer in float (higher = more sensitive)
    sqnr_db: float  # logit SQNR of the model with only this layer in float
    agreement: float  # top-1 agreement with float of that model

    def to_dict(self) -> dict:
        return asdict(self)


def logit_error(reference: np.ndarray, test: np.ndarray) -> tuple[float, float, float]:
    """``(sqnr_db, rel_error, agreement)`` of ``test`` logits against ``reference`` logits."""
    ref = np.asarray(reference, np.float64)
    err = np.asarray(test, np.float64) - ref
    signal = float(np.mean(ref ** 2)) or 1e-12
    noise = float(np.mean(err ** 2))
    sqnr = 10.0 * np.log10(signal / noise) if noise > 0 else float("inf")
    agreement = float(np.mean(np.argmax(test, 1) == np.argmax(reference, 1)))
    return float(sqnr), noise / signal, agreement


def rank_layers(layers: Sequence[tuple[str, str]], logits_without: Callable[[str], np.ndarray],
                reference: np.ndarray, quantized: np.ndarray,
                error: Callable[[np.ndarray, np.ndarray], tuple] = logit_error) -> list[LayerSensitivity]:
    """Rank ``layers`` (``(node name, op type)``) by what keeping each one in float gains.

    ``logits_without(node)``: logits, on the inputs of ``reference`` (float logits), of the model
    quantized except ``node``; ``quantized``: the fully quantized model's logits on them.
    """
    base = logit_error(reference, quantized)[0]
    scored = []
    for name, op in layers:
        sqnr, _, agree = error(reference, logits_without(name))
        scored.append((name, op, sqnr - base, sqnr, agree))
    scored.sort(key=lambda r: (-r[2], -r[4]))
    return [LayerSensitivity(i + 1, n, op, g, s, a) for i, (n, op, g, s, a) in enumerate(scored)]


FIELDS = ("rank", "node", "op_type", "gain_db", "sqnr_db", "agreement")


def to_csv(rows: Sequence[LayerSensitivity]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FIELDS)
    for r in rows:
        w.writerow([r.rank, r.node, r.op_type, f"{r.gain_db:.3f}", f"{r.sqnr_db:.2f}", f"{r.agreement:.4f}"])
    return buf.getvalue()


def to_markdown(rows: Sequence[LayerSensitivity], top: int = 10) -> str:
    lines = ["| rank | layer kept in float | op | SQNR gain (dB) | logit SQNR (dB) | agreement |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows[:top]:
        lines.append(f"| {r.rank} | `{r.node}` | {r.op_type} | {r.gain_db:+.2f} | {r.sqnr_db:.1f} | {r.agreement:.3f} |")
    if len(rows) > top:
        lines.append(f"| … | {len(rows) - top} more in sensitivity.csv | | | | |")
    return "\n".join(lines)
