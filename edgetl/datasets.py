"""Real datasets written out as plain image folders, so users, the demo and the benchmarks all go
through the same image-folder path as a user's own data."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from .fsutil import atomic_output_dir
from .runtime.errors import MissingDependencyError

ELPV_TASKS = {
    # defect probability -> class folder
    "binary": lambda p: "defective" if p >= 0.5 else "functional",
    "4class": lambda p: {0: "p0_functional", 1: "p1_mildly", 2: "p2_likely", 3: "p3_defective"}[round(p * 3)],
}


def elpv_root() -> Path:
    try:
        import elpv_dataset
    except ImportError:
        raise MissingDependencyError("elpv-dataset", "train", "the ELPV solar-cell dataset") from None
    return Path(elpv_dataset.__file__).parent / "data"


def read_elpv_labels(root: Path) -> list[tuple[str, float, str]]:
    """(relative image path, defect probability, cell type) for each of the 2,624 cells."""
    rows = []
    for line in (root / "labels.csv").read_text().splitlines():
        if line.strip():
            path, prob, kind = line.split()[:3]
            rows.append((path, float(prob), kind))
    return rows


def write_elpv(out: Path, task: str = "binary", cell_type: str = "all", overwrite: bool = False) -> dict[str, int]:
    """Write ELPV as ``out/<class>/cellNNNN.png`` plus ``elpv_meta.csv``; returns class counts."""
    root = elpv_root()
    rows = read_elpv_labels(root)
    to_class = ELPV_TASKS[task]
    counts: dict[str, int] = {}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        with open(tmp / "elpv_meta.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "defect_probability", "cell_type"])
            for rel, prob, kind in rows:
                if cell_type != "all" and kind != cell_type:
                    continue
                cls = to_class(prob)
                dst = tmp / cls / Path(rel).name
                dst.parent.mkdir(exist_ok=True)
                shutil.copyfile(root / rel, dst)
                counts[cls] = counts.get(cls, 0) + 1
                w.writerow([f"{cls}/{dst.name}", cls, f"{prob:.4f}", kind])
    return dict(sorted(counts.items()))
