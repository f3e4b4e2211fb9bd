"""PNG plots shared by the stages: a confusion matrix and training curves.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global state, no display needed);
matplotlib is imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        from .runtime.errors import MissingDependencyError

        raise MissingDependencyError("matplotlib", "train", "writing plots") from None
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path,
                   title: str = "Confusion matrix") -> Path:
    """Rows = true class, columns = predicted; colour = row-normalised recall, text = count (and %)."""
    cm = np.asarray(confusion, dtype=np.int64)
    k = len(labels)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    side = min(2.0 + 0.7 * k, 14.0)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(k), labels=list(labels), rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
    ax.set_yticks(range(k), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(cm) / max(1, cm.sum())
    ax.set_title(f"{title}  (n={int(cm.sum())}, accuracy {acc:.1%})", fontsize=10)
    if k <= 25:
        for i in range(k):
            for j in range(k):
                txt = f"{cm[i, j]}" if k > 8 else f"{cm[i, j]}\n{frac[i, j]:.0%}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | Path, best_epoch: int | None = None,
                metric: str = "macro_f1") -> Path:
    """Loss (train and val) and val accuracy / the selection metric per epoch; the best epoch marked."""
    epochs = [int(r["epoch"]) for r in history]
    fig = _figure(10, 3.8)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        ax1.plot(epochs, [r.get(key, np.nan) for r in history], marker="o", ms=3, label=label)
    ax1.set_title("loss")
    ax1.set_xlabel("epoch")
    for key, label in (("train_accuracy", "train accuracy"), ("val_accuracy", "val accuracy"),
                       ("val_macro_f1", "val macro-F1")):
        if any(key in r for r in history):
            ax2.plot(epochs, [r.get(key, np.nan) for r in history], marker="o", ms=3, label=label)
    ax2.set_title(f"validation (selection metric: {metric})")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0.0, 1.02)
    for ax in (ax1, ax2):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch {best_epoch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
