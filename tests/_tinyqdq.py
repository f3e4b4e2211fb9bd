"""Tiny QDQ models and artifact folders for the target/backend/TensorRT-conformance tests.

``qdq_onnx`` quantizes an exported ``tiny_cnn`` (32x32) with ONNX Runtime's ``quantize_static``:
``signed=True`` gives the TensorRT form (s8 activations and weights, symmetric, per-channel weights,
float biases); ``signed=False`` gives the asymmetric uint8-activation form TensorRT rejects.
``make_qdq_artifact`` writes an artifact folder (manifest kind "artifact", model_fp32.onnx,
model_int8.onnx, checkset.npz) from them. Seconds on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetl.runtime.manifest import Manifest, hash_files, write_manifest
from edgetl.runtime.preprocess import PreprocessSpec

LABELS = ("a", "b", "c")
SPEC = PreprocessSpec(input_size=(32, 32), resize="stretch", mean=(127.5,) * 3, std=(127.5,) * 3)


def fp32_onnx(path: Path, num_classes: int = len(LABELS), seed: int = 0) -> Path:
    from _tinyartifact import tiny_cnn_onnx

    return tiny_cnn_onnx(path, num_classes=num_classes, seed=seed)


def sample_inputs(n: int = 16, seed: int = 1) -> np.ndarray:
    """Model inputs as ``preprocess`` makes them from uint8 pixels with SPEC (so a build that folds
    the normalisation into its model can be fed the same images as uint8)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32)).astype(np.float32)
    return (pixels - np.float32(127.5)) * np.float32(1 / 127.5)


def qdq_onnx(fp32: Path, out: Path, signed: bool = True, quantize_bias: bool = False) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    batches = [{"input": b} for b in np.split(sample_inputs(16), 4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    extra = {"QuantizeBias": quantize_bias}
    if signed:
        extra.update(ActivationSymmetric=True, WeightSymmetric=True)
    quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8 if signed else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True, extra_options=extra)
    return out


def make_qdq_artifact(folder: Path, n_check: int = 24) -> Path:
    """An artifact folder with both ONNX files, a checkset (labels = the float model's argmax) and a manifest."""
    import onnxruntime as ort

    folder.mkdir(parents=True, exist_ok=True)
    fp32 = fp32_onnx(folder / "model_fp32.onnx")
    qdq_onnx(fp32, folder / "model_int8.onnx")
    x = sample_inputs(n_check, seed=7)
    logits = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.savez(folder / "checkset.npz", inputs=x, labels=logits.argmax(1).astype(np.int64), float_logits=logits)
    manifest = Manifest(kind="artifact", labels=LABELS, preprocess=SPEC, backbone={"name": "tiny_cnn"},
                        quantization={"method": "ptq", "tool": "onnxruntime.quantize_static (test)"},
                        files=hash_files(folder))
    write_manifest(manifest, folder)
    return folder
