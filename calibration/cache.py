"""Calibration-cache I/O: tensor ranges ``{tensor name: (low, high)}`` in ONNX Runtime's own format.

Ranges are computed once (by a calibrator, by NNCF's range estimators, or learned by QAT) and
then fed to ``onnxruntime.quantization.quantize_static(calibration_cache_path=...)`` as many times
as needed (sensitivity analysis, mixed-precision rounds, several QDQ forms) without re-running
calibration. The file is written and read with ORT's ``save_tensors_data`` / ``load_tensors_data``
(``TensorsData`` with ``CalibrationMethod.MinMax``), so quantize_static reads it as its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

Ranges = dict[str, tuple[float, float]]


def pair(range_value) -> tuple[float, float]:
    """ORT's ``TensorData.range_value`` (two 0-d or 1-element arrays) -> ``(low, high)`` floats."""
    lo, hi = range_value
    return float(np.asarray(lo).reshape(-1)[0]), float(np.asarray(hi).reshape(-1)[0])


def save_ranges(ranges: Mapping[str, tuple[float, float]], path: str | Path) -> Path:
    """Write ``ranges`` as an ORT calibration cache (MinMax TensorsData JSON)."""
    from onnxruntime.quantization.calibrate import (CalibrationMethod, TensorData, TensorsData,
                                                    save_tensors_data)

    data = {name: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
            for name, (lo, hi) in ranges.items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), Path(path))
    return Path(path)


def load_ranges(path: str | Path) -> Ranges:
    from onnxruntime.quantization.calibrate import load_tensors_data

    td = load_tensors_data(Path(path))
    return {name: pair(td.data[name].range_value) for name in td.data}


def merge_ranges(base: Mapping[str, tuple[float, float]], override: Mapping[str, tuple[float, float]]) -> Ranges:
    """``base`` with the tensors of ``override`` replaced (override's names not in base are added)."""
    out = {k: (float(v[0]), float(v[1])) for k, v in base.items()}
    out.update({k: (float(v[0]), float(v[1])) for k, v in override.items()})
    return out
