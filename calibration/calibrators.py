"""Range calibrators: min-max, percentile, entropy (ONNX Runtime) and MSE (NNCF), by name.

All of them produce the same thing, ``{tensor name: (low, high)}`` for the tensors ONNX Runtime's
QDQ quantizer will quantize, which ``calibration.cache`` writes as ORT's calibration cache:

* ``minmax``, ``percentile``, ``entropy``: ``onnxruntime.quantization.create_calibrator`` with
  ``CalibrationMethod.MinMax`` / ``Percentile`` (99.999th) / ``Entropy`` (KL divergence).
* ``mse``: NNCF's ``RangeEstimatorParametersSet.HISTOGRAM`` (the histogram search that minimises
  the L2 quantization error, as torch's HistogramObserver), run by ``nncf.quantize`` on the ONNX
  model; its quantizer ranges are read back with ``qdq.strip_qdq``. Tensors NNCF does not quantize
  (ORT also quantizes Conv outputs) keep their min-max range.

For QAT the same names pick NNCF's torch range estimators (``nncf_estimator``) to initialise the
quantizers; ``entropy`` has no NNCF equivalent and is refused there.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.errors import EdgetlError
from .cache import Ranges, merge_ranges, pair


@dataclass(frozen=True)
class Calibrator:
    name: str
    description: str
    ort_method: str | None  # onnxruntime.quantization.CalibrationMethod member, None = not ORT
    ort_options: dict[str, Any] = field(default_factory=dict)
    nncf_estimator: str | None = None  # nncf RangeEstimatorParametersSet member for QAT init / mse


CALIBRATORS: dict[str, Calibrator] = {c.name: c for c in (
    Calibrator("minmax", "global min/max of each tensor over the calibration set", "MinMax", {},
               "MINMAX"),
    Calibrator("percentile", "99.999th percentile of |x| (clips rare outliers)", "Percentile",
               {"percentile": 99.999}, "MEAN_QUANTILE"),
    Calibrator("entropy", "range minimising the KL divergence of the quantized histogram", "Entropy", {},
               None),
    Calibrator("mse", "range minimising the L2 quantization error on the histogram (NNCF)", None, {},
               "HISTOGRAM"),
)}


def get_calibrator(name: str) -> Calibrator:
    if name not in CALIBRATORS:
        raise EdgetlError(f"unknown calibrator {name!r}", hint=f"choose one of: {', '.join(CALIBRATORS)}")
    return CALIBRATORS[name]


def _reader(inputs: np.ndarray, input_name: str, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class ArrayReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            if self.i >= len(inputs):
                return None
            chunk = inputs[self.i:self.i + batch_size]
            self.i += batch_size
            return {input_name: np.ascontiguousarray(chunk)}

        def __len__(self) -> int:
            return len(inputs)

    return ArrayReader()


def _input_name(model_path: Path) -> str:
    from .qdq import load_model

    g = load_model(model_path).graph
    inits = {i.name for i in g.initializer}
    return next(i.name for i in g.input if i.name not in inits)


def ort_ranges(model_path: str | Path, inputs: np.ndarray, method: str = "MinMax", symmetric: bool = False,
               options: dict[str, Any] | None = None, batch_size: int = 16, chunk: int = 32) -> Ranges:
    """Run an ONNX Runtime calibrator over ``inputs``; ranges of every tensor ORT would quantize.

    Memory stays bounded: ORT keeps every intermediate output of the images it is given, so they
    are fed ``chunk`` images at a time (the histogram collectors and min-max merge across calls)."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    model_path = Path(model_path)
    # equal batches: ORT's histogram calibrators stack per-batch outputs and fail on a short last one
    batch_size = max(b for b in range(1, batch_size + 1) if len(inputs) % b == 0)
    chunk = max(batch_size, (chunk // batch_size) * batch_size)
    with tempfile.TemporaryDirectory(prefix="edgetl-calib-") as tmp:
        calib = create_calibrator(
            model_path, list(set(QLinearOpsRegistry) | set(QDQRegistry)),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=getattr(CalibrationMethod, method),
            extra_options={"symmetric": symmetric, **(options or {})})  # (not max_intermediate_outputs: in
        # ORT 1.32 MinMax drops the outputs it clears with it; each collect_data call merges and clears anyway)
        name = _input_name(model_path)
        # ORT's histogram calibrators print() their progress ("Collecting tensor data and making
        # histogram ...") between edgetl's own lines: kept off the terminal
        with contextlib.redirect_stdout(io.StringIO()):
            for i in range(0, len(inputs), chunk):
                calib.collect_data(_reader(inputs[i:i + chunk], name, batch_size))
            data = calib.compute_data()
    return {k: pair(v.range_value) for k, v in data.data.items()}


def nncf_ranges(model_path: str | Path, inputs: np.ndarray, estimator: str = "HISTOGRAM",
                batch_size: int = 1) -> Ranges:
    """The activation ranges NNCF's ONNX post-training quantization picks with ``estimator``."""
    try:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    except ImportError:
        from ..runtime.errors import MissingDependencyError

        raise MissingDependencyError("nncf", "train", "the 'mse' calibrator") from None
    from .qdq import load_model, strip_qdq

    model = load_model(model_path)
    name = _input_name(Path(model_path))
    items = [{name: inputs[i:i + batch_size]} for i in range(0, len(inputs), batch_size)]
    params = AdvancedQuantizationParameters(
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, estimator),
        disable_bias_correction=True, overflow_fix=OverflowFix.DISABLE)
    quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items), advanced_parameters=params)
    return strip_qdq(quantized)[1]


def calibrate(model_path: str | Path, inputs: np.ndarray, calibrator: str = "minmax",
              symmetric: bool = False, batch_size: int = 16) -> Ranges:
    """Ranges for ``model_path`` (the pre-processed float ONNX) from ``inputs`` with ``calibrator``.

    ``batch_size`` must be the model's batch when its batch axis is static."""
    cal = get_calibrator(calibrator)
    if len(inputs) == 0:
        raise EdgetlError("the calibration set is empty", hint="give calibration images (--calib-dir or a train split)")
    if cal.ort_method is not None:
        return ort_ranges(model_path, inputs, cal.ort_method, symmetric, cal.ort_options, batch_size)
    base = ort_ranges(model_path, inputs, "MinMax", symmetric, batch_size=batch_size)
    learned = nncf_ranges(model_path, inputs, cal.nncf_estimator or "HISTOGRAM", batch_size)
    return merge_ranges(base, {k: v for k, v in learned.items() if k in base})
