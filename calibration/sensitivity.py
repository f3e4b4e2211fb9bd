"""Per-layer quantization sensitivity: which layers hurt most when quantized.

Method ("quantize only this layer"): for each weighted layer (Conv/Gemm/MatMul) a model is built
in which only that layer is quantized (its activation and weight inputs, with the same ranges and
QDQ form as the full model), and its logits on a few calibration images are compared with the
float logits. The error is the layer's own contribution, not the error accumulated from the
layers before it, which is what the mixed-precision fallback needs to pick layers to keep in
float. Ranked worst first; written as ``sensitivity.csv`` and into report.json/report.md.
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
    sqnr_db: float  # logit signal-to-quantization-noise ratio; lower = more sensitive
    rel_error: float  # mean squared logit error / mean squared float logit
    agreement: float  # top-1 agreement with float when only this layer is quantized

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


def rank_layers(layers: Sequence[tuple[str, str]], logits_with_only: Callable[[str], np.ndarray],
                reference: np.ndarray) -> list[LayerSensitivity]:
    """Rank ``layers`` (``(node name, op type)``) by the logit error of quantizing each one alone.

    ``logits_with_only(node)`` returns the logits, on the same inputs as ``reference``, of the
    model with only ``node`` quantized.
    """
    scored = []
    for name, op in layers:
        sqnr, rel, agree = logit_error(reference, logits_with_only(name))
        scored.append((name, op, sqnr, rel, agree))
    scored.sort(key=lambda r: (r[2], -r[3]))
    return [LayerSensitivity(i + 1, n, op, s, r, a) for i, (n, op, s, r, a) in enumerate(scored)]


FIELDS = ("rank", "node", "op_type", "sqnr_db", "rel_error", "agreement")


def to_csv(rows: Sequence[LayerSensitivity]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(FIELDS)
    for r in rows:
        w.writerow([r.rank, r.node, r.op_type, f"{r.sqnr_db:.2f}", f"{r.rel_error:.3e}", f"{r.agreement:.4f}"])
    return buf.getvalue()


def to_markdown(rows: Sequence[LayerSensitivity], top: int = 10) -> str:
    lines = ["| rank | layer | op | logit SQNR (dB) | rel. error | agreement |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows[:top]:
        lines.append(f"| {r.rank} | `{r.node}` | {r.op_type} | {r.sqnr_db:.1f} | {r.rel_error:.2e} | {r.agreement:.3f} |")
    if len(rows) > top:
        lines.append(f"| … | {len(rows) - top} more in sensitivity.csv | | | | |")
    return "\n".join(lines)
