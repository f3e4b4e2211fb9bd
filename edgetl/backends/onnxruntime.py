"""ONNX Runtime "build": the artifact's QDQ (or FP32) ONNX plus the session options of the profile.

Nothing is converted: ONNX Runtime runs the QDQ graph as it is (its CPU provider fuses Q/DQ around
Conv/MatMul into integer kernels). The build is the manifest entry naming the model file and the
``[onnxruntime]`` options, and a check that ONNX Runtime loads and runs it here.
"""

from __future__ import annotations

import numpy as np

from . import BuildContext, BuildOutcome


def build(ctx: BuildContext) -> BuildOutcome:
    from ..runtime.runners import open_runner

    source = ctx.source
    options = ctx.options
    ctx.progress(f"onnxruntime: load {source} with {options.get('providers')}")
    runner = open_runner("onnxruntime", ctx.folder / source, options)
    try:
        shape = [runner.fixed_batch or 1, *ctx.manifest.input.get("shape", [])]
        dtype = np.uint8 if ctx.manifest.preprocess.dtype == "uint8" else np.float32
        out = runner.infer(np.zeros(shape, dtype=dtype))
        info = runner.info
    finally:
        runner.close()
    precision = "int8 (QDQ)" if ctx.profile.precision == "int8" else "fp32"
    entry = {"backend": "onnxruntime", "model": source, "precision": precision, "options": options,
             "version": info["version"], "device": info["device"], "outputs": int(out.shape[-1])}
    return BuildOutcome(entry)
