"""FP32 ONNX export: names, batch axis, parity with PyTorch (and a loud failure when it breaks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import make_class_image
from edgetl.export import ExportParityError, check_parity, export_onnx, torch_logits
from edgetl.runtime.preprocess import PreprocessSpec, preprocess
from edgetl.runtime.runners import open_runner

SPEC = PreprocessSpec(input_size=(32, 32), resize="stretch", mean=(127.5,) * 3, std=(127.5,) * 3)


@pytest.fixture(scope="module")
def model_and_inputs():
    import torch

    from edgetl.backbones import build_classifier

    torch.manual_seed(0)
    model, _ = build_classifier("tiny_cnn", 3, pretrained="none", dropout=0.0)
    rng = np.random.default_rng(0)
    x = np.stack([preprocess(make_class_image(i % 3, rng), SPEC) for i in range(12)])
    return model.eval(), x


def test_dynamic_batch_export_has_the_contract_names_and_parity(model_and_inputs, tmp_path: Path):
    import onnx

    model, x = model_and_inputs
    path = export_onnx(model, SPEC, tmp_path / "m.onnx")
    g = onnx.load(str(path)).graph
    assert [i.name for i in g.input] == ["input"] and [o.name for o in g.output] == ["logits"]
    assert not g.input[0].type.tensor_type.shape.dim[0].dim_value  # symbolic batch
    runner = open_runner("onnxruntime", path)
    assert runner.fixed_batch is None
    assert runner.infer(x[:5]).shape == (5, 3) and runner.infer(x[:2]).shape == (2, 3)
    parity = check_parity(torch_logits(model, x), path, x)
    assert parity.passed and parity.top1_agreement == 1.0 and parity.max_abs_diff < 1e-4 and parity.n == 12


def test_static_batch_export(model_and_inputs, tmp_path: Path):
    model, x = model_and_inputs
    path = export_onnx(model, SPEC, tmp_path / "s.onnx", static_batch=4)
    runner = open_runner("onnxruntime", path)
    assert runner.fixed_batch == 4
    assert runner.infer_many(x[:7]).shape == (7, 3)  # padded to whole batches by the runner
    assert check_parity(torch_logits(model, x), path, x).passed


def test_parity_failure_is_loud(model_and_inputs, tmp_path: Path):
    import torch

    model, x = model_and_inputs
    path = export_onnx(model, SPEC, tmp_path / "m.onnx")
    with torch.no_grad():  # the PyTorch model changes after export: the ONNX no longer matches it
        model.head.weight.mul_(-1.0)
    try:
        with pytest.raises(ExportParityError) as exc:
            check_parity(torch_logits(model, x), path, x)
        assert "does not match PyTorch" in exc.value.message and str(path) in exc.value.message
    finally:
        with torch.no_grad():
            model.head.weight.mul_(-1.0)


def test_runtime_shape_arithmetic_is_folded(tmp_path: Path):
    """timm's TF-"SAME" padding computes its pads from x.shape at run time; the export folds that into
    constants (a quantizer would otherwise quantize the pad amounts like activations)."""
    import torch
    from timm.layers.padding import pad_same

    from edgetl.calibration.qdq import op_counts

    class SameConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            y = torch.relu(self.conv(pad_same(x, [3, 3], [2, 2])))
            return self.head(y.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = SameConv().eval()
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    path = export_onnx(model, SPEC, tmp_path / "same.onnx")
    ops = op_counts(path)
    assert not {"Shape", "Gather", "Cast", "Concat"} & set(ops), ops
    assert check_parity(torch_logits(model, x), path, x).passed  # still dynamic batch (5 != 1)

