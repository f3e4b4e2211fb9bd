"""TensorRT for detection (issue 12): `edgetl compile DETECTION_RUN --target jetson-*` on a host without
TensorRT writes builds/tensorrt/build_config.json with the conformance check of the detector's s8s8
QDQ ONNX (two outputs) and the pre-build gate computed by the *detection* gate in reference numerics;
the device's `edgetl build` turns it into an engine whose two outputs come back in the ONNX's order.

TensorRT cannot be installed here. The device half runs against a simulated TensorRT + CUDA runtime
(``fake_tensorrt``: the builder "serializes" the parsed ONNX, the engine runs it on ONNX Runtime in
reference numerics and lists its outputs in the *reverse* order, device memory is host memory), so
edgetl's own code on that path (build_engine, the build record, TensorRTRunner's buffers and output
order, the detection gate of the engine, `edgetl run`) runs as written; TensorRT itself is not tested.

One tiny detection run (tiny_cnn, 96 px, 2 epochs: a poor detector, so the gate may fail; every
assertion holds either way) is trained and compiled for jetson-orin-nano once per module."""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")
onnx = pytest.importorskip("onnx")

from edgetl.cli import main  # noqa: E402
from edgetl.runtime.manifest import read_manifest, verify_files  # noqa: E402

SIZE = 96
DETECTION_KEYS = {"task", "passed", "float_map50", "quant_map50", "float_map", "quant_map", "drop", "drop_ci",
                  "agreement", "agreement_ci", "per_class", "thresholds", "score_threshold"}


def tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(tensorrt_importable(), reason="tensorrt is importable here: the engine would be "
                                                              "built instead of the host's build_config.json")


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    from test_detect_train import write_rectangles

    from edgetl.detect.train import DetTrainConfig, train_detector

    root = tmp_path_factory.mktemp("dettrt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on a busy 2-core machine: one thread is ~20x faster
    try:
        cfg = DetTrainConfig(backbone="tiny_cnn", pretrained="none", input_size=SIZE, epochs=2, batch_size=8, lr=1e-2,
                             backbone_lr_mult=0.1, patience=0, num_workers=0, device="cpu", warmup_epochs=0.5,
                             val_fraction=0.2, test_fraction=0.2)
        run = train_detector(write_rectangles(root / "data", n=40), root / "run", cfg, progress=lambda m: None)
        yield run
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def orin(det_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("orin") / "det-orin"
    rc = main(["compile", str(det_run), "--target", "jetson-orin-nano", "--out", str(out)])
    cfg = json.loads((out / "builds/tensorrt/build_config.json").read_text())
    return types.SimpleNamespace(path=out, rc=rc, cfg=cfg, gate=cfg["pre_build_gate"])


def test_orin_build_config_conformance_and_detection_gate(orin):
    cfg, gate = orin.cfg, orin.gate
    assert cfg["target"] == "jetson-orin-nano" and cfg["onnx"] == "model_int8.onnx" and cfg["engine"] is None
    assert cfg["task"] == "detection" and cfg["outputs"] == ["boxes", "scores"] and cfg["flags"] == ["INT8", "FP16"]
    assert cfg["input"]["opt"] == [1, 3, SIZE, SIZE]
    # the conformance check of the s8s8 QDQ detector, for every TensorRT version the profile lists
    assert set(cfg["conformance"]) == {"8.5", "8.6", "10.3"}
    for report in cfg["conformance"].values():
        assert report["ok"] and report["problems"] == [], report
        assert report["stats"]["qdq_nodes"] > 0 and report["stats"]["per_channel_qdq"] > 0
    m = verify_files(orin.path)
    raw = json.loads((orin.path / "manifest.json").read_text())
    assert raw["schema_version"] == "2.1" and m.task == "detection"
    assert m.quantization["qdq_format"] == "s8s8-symmetric-per-channel" and m.quantization["for_backend"] == "tensorrt"
    assert m.target["build_config"] == "builds/tensorrt/build_config.json"
    model = onnx.load(str(orin.path / "model_int8.onnx"))
    assert [o.name for o in model.graph.output] == ["boxes", "scores"]
    zero_points = [i for i in model.graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(onnx.numpy_helper.to_array(z).dtype == np.int8 and not onnx.numpy_helper.to_array(z).any()
                               for z in zero_points)  # signed, symmetric
    # the pre-build gate is the detection gate, with the profile's detection thresholds
    assert DETECTION_KEYS <= set(gate) and gate["task"] == "detection" and "quant_top1" not in gate
    assert gate["numerics"] == "reference" and gate["graph"] == "model_int8.onnx"
    assert gate["thresholds"]["max_map_drop"] == 1.0 and gate["thresholds"]["min_agreement"] == 0.95
    host = gate["host_kernels"]
    assert {"quant_map50", "agreement", "passed", "cpu"} <= set(host) and "never deciding" in host["note"]
    # the verdict: decided by the reference numerics (the pre-build gate's), the exit code follows it
    assert m.gate["decided_by"] == "the reference numerics" and m.gate["deployable"] == gate["passed"]
    assert orin.rc == (0 if gate["passed"] else 1)
    assert gate["quant_map50"] == pytest.approx(m.gate["quant_map50"], abs=1e-9)
    assert gate["agreement"] == pytest.approx(m.gate["agreement"], abs=1e-9)


def test_pre_build_gate_is_the_detection_gate_recomputed(orin):
    """The pre-build gate equals evaluate_detection on the QDQ graph run here in reference numerics;
    a classification gate (top-1 on logits) would have neither these keys nor these numbers."""
    from edgetl.detect.gate import DetThresholds, evaluate_detection, load_det_checkset
    from edgetl.numerics import REFERENCE_OPTIONS
    from edgetl.runtime.model import _postprocess_spec
    from edgetl.runtime.runners import open_runner

    m = read_manifest(orin.path)
    checkset = load_det_checkset(orin.path)
    runner = open_runner("onnxruntime", orin.path / "model_int8.onnx", dict(REFERENCE_OPTIONS))
    try:
        raw = runner.infer_many_all(checkset.inputs)[:2]
    finally:
        runner.close()
    want = evaluate_detection(raw, checkset, _postprocess_spec(orin.path, m, verify=True),
                              DetThresholds(max_map_drop=1.0, min_agreement=0.95), m.labels)
    for k in ("passed", "n", "float_map50", "quant_map50", "drop", "agreement"):
        assert orin.gate[k] == pytest.approx(want[k], abs=1e-9), k


def test_pre_build_gate_never_calls_the_classification_gate(orin, tmp_path, monkeypatch):
    from edgetl import backends, check
    from edgetl.backends import BuildContext, tensorrt
    from edgetl.targets import load_target

    def classification(*a, **k):
        raise AssertionError("the classification gate ran on a detection artifact")

    monkeypatch.setattr(backends, "run_gate", classification)
    monkeypatch.setattr(check, "evaluate", classification)
    art = Path(shutil.copytree(orin.path, tmp_path / "art"))
    ctx = BuildContext(art, verify_files(art), load_target("jetson-orin-nano"), "tensorrt", lambda s: None)
    gate = tensorrt.pre_build_gate(ctx, "model_int8.onnx")
    assert gate["task"] == "detection" and gate["quant_map50"] == pytest.approx(orin.gate["quant_map50"], abs=1e-9)


def test_check_reference_on_the_tensorrt_artifact(orin, tmp_path, capsys):
    want = 0 if orin.gate["passed"] else 1
    assert main(["check", str(orin.path), "--backend", "reference", "--no-update"]) == want
    out = capsys.readouterr().out
    assert "gate: reference model_int8.onnx" in out and "(detection)" in out and "mAP@0.5" in out
    art = Path(shutil.copytree(orin.path, tmp_path / "art"))
    assert main(["check", str(art)]) == want  # no TensorRT build yet: the reference numerics decide
    m = verify_files(art)
    assert m.gate["decided_by"] == "the reference numerics" and m.gate["quant_map50"] == pytest.approx(
        orin.gate["quant_map50"], abs=1e-9)


@pytest.mark.parametrize("target,sets,versions,device", [
    ("jetson-agx-orin", ["--set", "tensorrt.dla_core=0"], {"8.5", "8.6", "10.3"}, "DLA"),
    ("jetson-xavier-nx", [], {"8.5"}, "GPU")])
def test_other_int8_jetsons(orin, tmp_path, target, sets, versions, device):
    """The same QDQ artifact re-prepared for the other INT8 Jetsons (their numerics are the same
    reference numerics: only conformance versions, flags and DLA differ)."""
    art = Path(shutil.copytree(orin.path, tmp_path / "art"))
    assert main(["build", str(art), "--target", target, *sets]) == (0 if orin.gate["passed"] else 1)
    cfg = json.loads((art / "builds/tensorrt/build_config.json").read_text())
    assert cfg["target"] == target and set(cfg["conformance"]) == versions
    assert all(r["ok"] for r in cfg["conformance"].values()) and cfg["device_type"] == device
    assert cfg["pre_build_gate"]["task"] == "detection" and cfg["outputs"] == ["boxes", "scores"]
    if device == "DLA":
        assert cfg["static_shapes"] and cfg["flags"] == ["INT8", "FP16", "GPU_FALLBACK"]


def test_jetson_nano_builds_fp16_and_refuses_int8(det_run, tmp_path, capsys):
    """The Nano's profile says fp16 (its Maxwell GPU has no fast INT8): the detector is exported in
    float at the opset TensorRT 8.2 parses and gated as such; --precision int8 is refused as for
    classification, before anything is written."""
    out = tmp_path / "nano"
    assert main(["compile", str(det_run), "--target", "jetson-nano", "--out", str(out)]) == 0
    m = verify_files(out)
    assert m.task == "detection" and m.quantization is None and not (out / "model_int8.onnx").exists()
    assert set(m.files) >= {"model_fp32.onnx", "anchors.npy", "checkset.npz", "builds/tensorrt/build_config.json"}
    assert onnx.load(str(out / "model_fp32.onnx")).opset_import[0].version == 13
    cfg = json.loads((out / "builds/tensorrt/build_config.json").read_text())
    assert cfg["flags"] == ["FP16"] and cfg["onnx"] == "model_fp32.onnx" and cfg["quantization"] == "none"
    assert cfg["conformance"]["8.2"]["ok"] and cfg["outputs"] == ["boxes", "scores"]
    gate = cfg["pre_build_gate"]
    assert gate["task"] == "detection" and gate["passed"] and gate["drop"] == pytest.approx(0, abs=1e-6)
    assert gate["agreement"] == pytest.approx(1.0) and "host_kernels" not in gate
    capsys.readouterr()
    assert main(["compile", str(det_run), "--target", "jetson-nano", "--precision", "int8",
                 "--out", str(tmp_path / "nano8")]) == 2
    assert "Maxwell" in capsys.readouterr().err and not (tmp_path / "nano8").exists()


# ---- the device half, against a simulated TensorRT -------------------------------------------------

MAGIC = b"FAKE-TRT-ENGINE\n"


def fake_tensorrt() -> tuple[types.ModuleType, types.SimpleNamespace]:
    """A stand-in for the ``tensorrt`` module and cuda-python's runtime with the calls edgetl makes."""
    import onnxruntime as ort

    ns = types.SimpleNamespace

    class Network:
        def __init__(self):
            self.inputs, self.outputs, self.path = [], [], None
        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i):
            return ns(name=self.inputs[i])

        def get_output(self, i):
            return ns(name=self.outputs[i])

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            g = onnx.load(path).graph
            inits = {i.name for i in g.initializer}
            self.network.inputs = [i.name for i in g.input if i.name not in inits]
            self.network.outputs = [o.name for o in g.output]  # as TensorRT's parser marks them
            self.network.path = path
            return True

    class BuilderConfig:
        def __init__(self):
            self.flags = []

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, profile):
            self.profile = profile

        def create_timing_cache(self, data):
            return data

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return ns(serialize=lambda: b"fake timing cache")

    class Builder:
        platform_has_fast_int8 = True
        num_DLA_cores = 0

        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return BuilderConfig()

        def create_optimization_profile(self):
            return ns(set_shape=lambda *a: None)

        def build_serialized_network(self, network, bconf):
            assert "INT8" in bconf.flags
            return MAGIC + Path(network.path).read_bytes()

    class Engine:
        """Runs the ONNX in reference numerics; lists its outputs in reverse (scores before boxes)."""

        def __init__(self, data):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            self.sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
            self.input = self.sess.get_inputs()[0]
            self.shapes = {o.name: list(o.shape) for o in self.sess.get_outputs()}
            self.shapes[self.input.name] = list(self.input.shape)
            self.names = [self.input.name] + [o.name for o in self.sess.get_outputs()][::-1]
        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return "input" if name == self.input.name else "output"

        def get_tensor_shape(self, name):
            return tuple(self.shapes[name])

        def get_tensor_dtype(self, name):
            return "float32"

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.addr, self.shape = engine, {}, None

        def set_input_shape(self, name, shape):
            self.shape = tuple(shape)

        def get_tensor_shape(self, name):
            return (self.shape[0], *self.engine.shapes[name][1:])

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):
            e = self.engine
            n = int(np.prod(self.shape)) * 4
            x = np.frombuffer(ctypes.string_at(self.addr[e.input.name], n), np.float32).reshape(self.shape)
            for o, y in zip(e.sess.get_outputs(), e.sess.run(None, {e.input.name: x})):
                y = np.ascontiguousarray(y, np.float32)
                ctypes.memmove(self.addr[o.name], y.ctypes.data, y.nbytes)
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            assert data.startswith(MAGIC)
            return Engine(data[len(MAGIC):])

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    trt = types.ModuleType("tensorrt")
    trt.__dict__.update(
        __version__="10.3.0", Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
        MemoryPoolType=ns(WORKSPACE=0), BuilderFlag=ns(INT8="INT8", FP16="FP16", GPU_FALLBACK="GPU_FALLBACK"),
        NetworkDefinitionCreationFlag=ns(EXPLICIT_BATCH=0), TensorIOMode=ns(INPUT="input", OUTPUT="output"),
        DeviceType=ns(DLA="DLA", GPU="GPU"), nptype=lambda dtype: np.float32)

    memory: dict[int, ctypes.Array] = {}

    def malloc(n):
        buf = ctypes.create_string_buffer(int(n))
        memory[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def free(ptr):
        memory.pop(ptr, None)
        return (0,)

    def memcpy(dst, src, n, kind, stream):
        ctypes.memmove(dst, src, n)
        return (0,)

    cudart = ns(cudaGetDeviceProperties=lambda d: (0, ns(name=b"Orin", major=8, minor=7)),
                cudaStreamCreate=lambda: (0, 1), cudaStreamSynchronize=lambda s: (0,),
                cudaStreamDestroy=lambda s: (0,), cudaMalloc=malloc, cudaFree=free,
                cudaMemcpyAsync=memcpy, cudaMemcpyKind=ns(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2))
    return trt, cudart


@pytest.fixture
def simulated_tensorrt(monkeypatch):
    trt, cudart = fake_tensorrt()
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda.bindings = bindings
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    return trt


def test_device_build_runs_the_build_config_and_gates_the_engine(orin, tmp_path, simulated_tensorrt, capsys):
    art = Path(shutil.copytree(orin.path, tmp_path / "art"))
    want = 0 if orin.gate["passed"] else 1
    assert main(["build", str(art)]) == want
    out = capsys.readouterr().out
    assert "executing the artifact's builds/tensorrt/build_config.json" in out and "2 output(s) boxes, scores" in out
    m = verify_files(art)
    entry = m.builds[0]
    assert entry["backend"] == "tensorrt" and entry["model"] == "builds/tensorrt/model.trt10.3.sm87.int8.engine"
    assert entry["options"]["outputs"] == ["boxes", "scores"] and entry["options"]["key"]["gpu"] == "Orin"
    cfg = json.loads((art / "builds/tensorrt/build_config.json").read_text())
    assert cfg["engine"]["outputs"] == ["boxes", "scores"] and cfg["engine"]["key"]["tensorrt"] == "10.3.0"
    # the engine's gate: the detection gate through the TensorRT runner (here: reference numerics)
    gate = entry["gate"]
    assert gate["task"] == "detection" and gate["numerics"] == "deployed" and gate["cpu"] is None
    for k in ("passed", "quant_map50", "agreement"):
        assert gate[k] == pytest.approx(orin.gate[k], abs=1e-6), k
    assert m.gate["decided_by"] == "the tensorrt build" and m.gate["deployable"] == gate["passed"]
    assert main(["check", str(art), "--no-update"]) == want  # default: the build that decides
    assert "gate: tensorrt builds/tensorrt/model.trt10.3.sm87.int8.engine" in capsys.readouterr().out


def test_device_build_without_pycocotools_is_refused_before_the_engine(orin, tmp_path, simulated_tensorrt,
                                                                       monkeypatch, capsys):
    """The engine's detection gate needs pycocotools: a device without it is told so before the build
    (and how to go on), and the artifact is left as it was."""
    art = Path(shutil.copytree(orin.path, tmp_path / "art"))
    before = (art / "manifest.json").read_bytes()
    monkeypatch.setitem(sys.modules, "pycocotools.cocoeval", None)  # import -> ImportError
    assert main(["build", str(art)]) == 2
    err = capsys.readouterr().err
    assert "pycocotools" in err and "--no-gate" in err
    assert (art / "manifest.json").read_bytes() == before and not list((art / "builds/tensorrt").glob("*.engine"))


def test_tensorrt_runner_returns_outputs_in_the_onnx_order(orin, tmp_path, simulated_tensorrt, capsys):
    """The simulated engine lists scores before boxes: with the recorded ``outputs`` the runner gives
    boxes, scores (the order every head and gate reads); without it, the engine's order."""
    from edgetl.detect.gate import load_det_checkset
    from edgetl.runtime.errors import EdgetlError
    from edgetl.runtime.runners import open_runner

    art = Path(shutil.copytree(orin.path, tmp_path / "art"))
    main(["build", str(art), "--no-gate"])
    entry = read_manifest(art).builds[0]
    x = load_det_checkset(art).inputs[:2]
    a = len(np.load(art / "anchors.npy"))
    runner = open_runner("tensorrt", art / entry["model"], entry["options"])
    assert [o.shape for o in runner.infer_many_all(x)] == [(2, a, 4), (2, a, 3)]
    runner.close()
    bare = {k: v for k, v in entry["options"].items() if k != "outputs"}
    runner = open_runner("tensorrt", art / entry["model"], bare)
    assert [o.shape for o in runner.infer_all(x[:1])] == [(1, a, 3), (1, a, 4)]
    runner.close()
    with pytest.raises(EdgetlError, match="not the recorded"):
        open_runner("tensorrt", art / entry["model"], {**entry["options"], "outputs": ["boxes", "logits"]})
    # the device loop runs the engine: boxes in frame pixels from the two outputs
    import cv2

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"f{i}.png"), np.full((SIZE, SIZE, 3), 120, np.uint8))
    capsys.readouterr()
    assert main(["run", str(art), "--source", str(frames), "--headless", "--backend", "tensorrt"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all("detections" in r and "counts" in r for r in lines)
