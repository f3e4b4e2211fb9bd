"""Calibration sets, range calibrators, sensitivity analysis, calibration-cache I/O (numpy; no torch).

* ``sets``: which images calibrate (train split, stratified, or ``--calib-dir``), recorded by sha256.
* ``calibrators``: min-max / percentile / entropy (ONNX Runtime) and mse (NNCF) -> tensor ranges.
* ``cache``: those ranges as ONNX Runtime's calibration cache (calibrate once, quantize many times).
* ``qdq``: reading QDQ graphs (quantized nodes, the ranges they hold, the float graph behind them).
* ``sensitivity``: per-layer "quantize only this layer" logit error, ranked.

onnx, onnxruntime.quantization and nncf are imported inside functions: importing this package
costs nothing on a device.
"""
