"""`edgetl compile` of a model trained elsewhere: a torchvision/timm state dict (+ --arch), and a bare
ONNX model for a float (fp32/fp16) target. Tiny models (timm's ``test_efficientnet``, 0.1M
parameters, at 32x32) on generated images; every test takes seconds."""

from __future__ import annotations

import json

import pytest

from _tinyrun import PRE, TINY, flat_images, onnx_and_images, session_tiny_run, train_library_model, write_labels
from edgetl.cli import main
from edgetl.runtime.manifest import read_manifest, sha256_file, verify_files

pytest.importorskip("timm", reason="timm is not installed")
ARCH = "timm:test_efficientnet"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Toy models: one torch thread (two threads contend ~100x slower on a busy 2-core host)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return session_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """A timm test_efficientnet trained "elsewhere" on the tiny images: (weights.pth, labels.txt, images)."""
    import torch

    from _tinyrun import CLASSES

    tmp = tmp_path_factory.mktemp("external")
    images = tiny_run.parent / "images"
    model = train_library_model(ARCH, images, CLASSES)
    weights = tmp / "weights.pth"
    torch.save(model.state_dict(), weights)
    return weights, write_labels(tmp / "labels.txt", CLASSES), images


def _compile(weights, labels, images, out, *extra):
    return main(["compile", str(weights), "--arch", ARCH, "--labels", str(labels), "--images", str(images), *PRE,
                 "--target", "x86-cpu-onnxruntime", "--out", str(out), *TINY, *extra])


def _assert_origin(m, weights, arch=ARCH):
    assert m.backbone["name"] == arch and m.backbone["sha256"] == sha256_file(weights)
    src = m.training["source"]
    assert m.training["note"] == "trained outside edgetl"
    assert src["file"] == str(weights.resolve()) and src["sha256"] == sha256_file(weights) and src["arch"] == arch


def test_state_dict_ptq(trained, tmp_path, capsys):
    weights, labels, images = trained
    out = tmp_path / "artifacts" / "ptq"
    assert _compile(weights, labels, images, out, "--method", "ptq") == 0
    assert "deployable" in capsys.readouterr().out
    m = verify_files(out)
    assert m.kind == "artifact" and m.quantization["method"] == "ptq" and m.gate["passed"]
    assert m.builds[0]["backend"] == "onnxruntime" and m.builds[0]["gate"]["passed"]
    _assert_origin(m, weights)
    assert m.training["labelled"] and m.training["split_seed"] == 0
    assert m.gate["float_top1"] > 0.9  # real labels: the accuracy is measured, not agreement only
    report = json.loads((out / "report.json").read_text())
    assert report["run"] is None and report["source_model"]["arch"] == ARCH  # the temporary run is not kept
    assert report["name"] == "ptq"  # the artifact's name, not its temp folder's
    assert "trained outside edgetl" in (out / "report.md").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["ptq"]
    from edgetl.check import load_checkset

    cal = set((out / "calibration.txt").read_text().split())
    assert cal and not cal & set(load_checkset(out).paths)  # calibration (train) and checkset (test) are disjoint


def test_state_dict_qat(trained, tmp_path):
    pytest.importorskip("nncf", reason="nncf is not installed")
    weights, labels, images = trained
    out = tmp_path / "qat"
    assert _compile(weights, labels, images, out, "--method", "qat", "--qat-epochs", "1") == 0
    m = verify_files(out)
    assert m.quantization["method"] == "qat" and m.quantization["qat"]["epochs"] == 1 and m.gate["passed"]
    _assert_origin(m, weights)


def test_state_dict_fp32(trained, tmp_path):
    """A float target: the temporary run's float export, no quantization."""
    weights, labels, images = trained
    out = tmp_path / "sd-fp32"
    assert _compile(weights, labels, images, out, "--precision", "fp32") == 0
    m = verify_files(out)
    assert m.quantization is None and m.builds[0]["precision"] == "fp32" and m.builds[0]["gate"]["passed"]
    _assert_origin(m, weights)
    report = json.loads((out / "report.json").read_text())
    assert report["run"] is None and report["name"] == "sd-fp32" and report["parity"]["passed"]


def test_state_dict_without_labels_ptq_agreement_only(trained, tmp_path, capsys):
    weights, labels, images = trained
    flat = flat_images(images, tmp_path / "flat")
    out = tmp_path / "flat-art"
    # the profile's default method is QAT: without labels it is PTQ, and the output says so
    assert _compile(weights, labels, flat, out) == 0
    text = capsys.readouterr().out
    assert "agreement with the float model only" in text and "PTQ" in text
    m = verify_files(out)
    assert m.quantization["method"] == "ptq" and m.quantization["labels"].startswith("none")
    assert m.gate["thresholds"]["max_drop"] == 100.0 and m.gate["passed"]
    _assert_origin(m, weights)
    assert m.training["labelled"] is False
    assert json.loads((out / "report.json").read_text())["parity"]["passed"]  # edgetl's export vs PyTorch


def test_state_dict_without_labels_refuses_qat(trained, tmp_path, capsys):
    weights, labels, images = trained
    out = tmp_path / "x"
    assert _compile(weights, labels, flat_images(images, tmp_path / "flat"), out, "--method", "qat") == 2
    err = capsys.readouterr().err
    assert "--method qat needs labelled images" in err and "sub-folder" in err
    assert not out.exists() and not list(tmp_path.glob(".x*"))


def test_state_dict_wrong_class_count(tiny_run, tmp_path, capsys):
    """A torchvision model trained for 5 classes, a labels file with 3: exit 2, nothing written."""
    from safetensors.torch import save_file

    from _tinyrun import CLASSES
    from edgetl.backbones import build_external

    model = build_external("torchvision:mobilenet_v3_small", 5)
    weights = tmp_path / "five.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    labels = write_labels(tmp_path / "labels.txt", CLASSES)
    out = tmp_path / "art"
    assert main(["compile", str(weights), "--arch", "torchvision:mobilenet_v3_small", "--labels", str(labels),
                 "--images", str(tiny_run.parent / "images"), *PRE, "--target", "x86-cpu-onnxruntime",
                 "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert str(weights) in err and "has 5 outputs" in err and "lists 3 classes" in err and str(labels) in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["five.safetensors", "labels.txt"]


@pytest.mark.parametrize("arch,words", [
    ("torchvision:mobilenet_v9", ["torchvision has no classification model", "did you mean torchvision:mobilenet_v"]),
    ("timm:no_such_net", ["timm has no classification model", "timm.create_model"]),
    ("mobilenet_v2", ["LIBRARY:NAME"]),
    ("timm:test_resnet", ["does not fit --arch timm:test_resnet", "missing", "--arch the architecture"]),
])
def test_state_dict_bad_arch(trained, tmp_path, capsys, arch, words):
    weights, labels, images = trained
    out = tmp_path / "art"
    assert main(["compile", str(weights), "--arch", arch, "--labels", str(labels), "--images", str(images), *PRE,
                 "--target", "x86-cpu-onnxruntime", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_state_dict_input_refusals(trained, tmp_path, capsys):
    import torch

    weights, labels, images = trained
    common = ["--labels", str(labels), "--images", str(images), *PRE, "--target", "x86-cpu-onnxruntime",
              "--out", str(tmp_path / "art")]
    assert main(["compile", str(weights), *common]) == 2  # no --arch
    assert "--arch torchvision:NAME" in capsys.readouterr().err
    pickled = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 3), pickled)  # a pickled module, not a state dict
    assert main(["compile", str(pickled), "--arch", ARCH, *common]) == 2
    assert "weights_only=True" in capsys.readouterr().err
    assert not (tmp_path / "art").exists()


def test_load_state_dict_unwraps_checkpoints(tmp_path):
    import torch

    from edgetl.compile import load_state_dict

    sd = {"fc.weight": torch.ones(3, 2), "fc.bias": torch.zeros(3)}
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.pth")
    got = load_state_dict(tmp_path / "ckpt.pth")
    assert sorted(got) == ["fc.bias", "fc.weight"] and torch.equal(got["fc.weight"], sd["fc.weight"])


# ---- a bare ONNX model for a float target -----------------------------------------------------

def test_bare_onnx_fp32(tiny_run, tmp_path, capsys):
    model, labels, images = onnx_and_images(tiny_run, tmp_path)
    out = tmp_path / "fp32"
    assert main(["compile", str(model), "--labels", str(labels), "--images", str(images), *PRE,
                 "--target", "x86-cpu-onnxruntime", "--precision", "fp32", "--out", str(out), *TINY]) == 0
    assert "no quantization" in capsys.readouterr().out
    m = verify_files(out)
    assert m.quantization is None and m.gate is None and not (out / "model_int8.onnx").exists()
    build = m.builds[0]
    assert build["backend"] == "onnxruntime" and build["precision"] == "fp32" and build["model"] == "model_fp32.onnx"
    assert build["gate"]["passed"] and build["gate"]["quant_top1"] > 0.9 and build["gate"]["agreement"] == 1.0
    assert m.backbone["name"] == "external-onnx" and m.training["source"]["sha256"] == sha256_file(model)
    from edgetl.check import load_checkset

    assert len(load_checkset(out)) == 72  # every image: nothing is held back for calibration
    assert json.loads((out / "report.json").read_text())["name"] == "fp32"


def test_bare_onnx_fp16_for_jetson_nano(tiny_run, tmp_path):
    """The Nano's TensorRT 8.2 parses opset <= 13: the opset-17 model is converted down and parity-checked."""
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is importable here: the engine would be built instead")
    except ImportError:
        pass
    import onnx

    model, labels, images = onnx_and_images(tiny_run, tmp_path)
    out = tmp_path / "nano"
    assert main(["compile", str(model), "--labels", str(labels), "--images", str(images), *PRE,
                 "--target", "jetson-nano", "--out", str(out), *TINY]) == 0
    m = verify_files(out)
    assert m.quantization is None and onnx.load(str(out / "model_fp32.onnx")).opset_import[0].version == 13
    cfg = json.loads((out / "builds/tensorrt/build_config.json").read_text())
    assert cfg["flags"] == ["FP16"] and cfg["onnx"] == "model_fp32.onnx" and cfg["pre_build_gate"]["passed"]
    conv = json.loads((out / "report.json").read_text())["opset_conversion"]
    assert conv["from"] == 17 and conv["to"] == 13 and conv["parity"]["passed"]
    assert read_manifest(out).target["name"] == "jetson-nano"
