"""OpenVINO runner: an IR (``model.xml`` + ``.bin``) or an ONNX file, compiled for one device.

Options (``[openvino]`` of a target profile): ``device`` (CPU, GPU, NPU, AUTO), ``performance_hint``
(LATENCY, THROUGHPUT, CUMULATIVE_THROUGHPUT), ``inference_precision`` (f32, bf16, f16, or
``default`` = the device decides), ``num_streams`` (int or "AUTO"), ``threads`` (0 = default),
``batch`` (optional int: reshape the model to this static batch before compiling).

``info["precision"]`` is read back from the *compiled* model: the ``INFERENCE_PRECISION_HINT`` it
really uses (on a CPU with AVX-512 BF16 or AMX, "default" resolves to bf16), prefixed with ``int8+``
when the graph holds FakeQuantize (a QDQ ONNX becomes FakeQuantize) and the runtime graph runs
layers in i8/u8. ``info["int8_layers"]`` counts the compute layers (convolutions, fully connected,
MatMul) that run in i8/u8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping

import numpy as np

from ..errors import EdgetlError, MissingDependencyError
from .base import Runner, bool_option, check_option_names, choice_option, int_option

_PRECISIONS = {"f32": "f32", "bf16": "bf16", "f16": "f16"}
# the layers whose int8 execution is what INT8 is for; data movement on a uint8 input (a folded
# preprocessing's Transpose/Eltwise) is not counted as "running in int8"
_COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
OPTIONS = {"device": "CPU, GPU, NPU, AUTO, …", "performance_hint": "LATENCY, THROUGHPUT or CUMULATIVE_THROUGHPUT",
           "inference_precision": "f32, bf16, f16 or default", "num_streams": "a whole number >= 1, or AUTO",
           "threads": "a whole number, 0 = OpenVINO's default", "batch": "a static batch size to reshape to",
           "fold_preprocessing": "true/false (a build option: preprocessing folded into the IR)"}


def import_openvino():
    try:
        import openvino as ov
    except ImportError:
        raise MissingDependencyError("openvino", "openvino", "the OpenVINO backend") from None
    return ov


def compile_config(options: dict[str, Any]) -> dict[str, Any]:
    """The OpenVINO properties for ``core.compile_model`` from the profile's options."""
    config: dict[str, Any] = {}
    check_option_names("openvino", options, OPTIONS)
    hint = choice_option("openvino", options, "performance_hint", "LATENCY", _HINTS, upper=True)
    config["PERFORMANCE_HINT"] = hint
    prec = choice_option("openvino", options, "inference_precision", "default", list(_PRECISIONS) + ["default"])
    if prec != "default":
        config["INFERENCE_PRECISION_HINT"] = _PRECISIONS[prec]
    streams = options.get("num_streams", "AUTO")
    if streams not in (None, "AUTO", "auto"):
        config["NUM_STREAMS"] = str(int_option("openvino", options, "num_streams", None, minimum=1, example="AUTO"))
    threads = int_option("openvino", options, "threads", 0) or 0
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = threads
    bool_option("openvino", options, "fold_preprocessing", False)
    int_option("openvino", options, "batch", None, minimum=1, example=1)
    return config


def _type_name(value: Any) -> str:
    """``ov.Type`` (or a string) -> short name: f32, bf16, f16, i8..."""
    name = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(name, name)


class OpenVINORunner(Runner):
    backend = "openvino"
    OPTIONS = OPTIONS

    def __init__(self, model_path: Path, options: dict[str, Any], blobs: Mapping[str, bytes] | None = None):
        super().__init__(model_path, options, blobs)
        ov = import_openvino()
        if self.model_path.suffix not in (".xml", ".onnx"):
            raise EdgetlError(f"{model_path}: OpenVINO loads an IR (.xml + .bin) or an .onnx file")
        weights = self.model_path.with_suffix(".bin")
        if self.model_path.suffix == ".xml" and str(weights) not in self.blobs and not weights.exists():
            raise EdgetlError(f"{self.model_path.with_suffix('.bin')}: the IR weights file is missing",
                              hint="copy the whole builds/openvino folder, or run `edgetl build ARTIFACT`")
        config = compile_config(options)  # a wrong option is a one-line error before anything loads
        batch = int_option(self.backend, options, "batch", None, minimum=1, example=1)
        core = ov.Core()
        device = str(options.get("device", "CPU"))
        if device.split(":")[0] not in ("AUTO", "MULTI", "HETERO") and device.split(".")[0] not in core.available_devices:
            raise EdgetlError(f"OpenVINO device {device!r} is not available here (available: {core.available_devices})",
                              hint="install the device's driver (e.g. the Intel GPU compute runtime), or use a "
                                   "target whose openvino.device is CPU")
        try:
            if str(self.model_path) not in self.blobs:  # no verified copy handed over: OpenVINO reads the file
                model = core.read_model(str(self.model_path))
            elif self.model_path.suffix == ".xml":  # an IR from verified bytes: OpenVINO owns a copy of
                import numpy as np  # the weights (shared_memory=False), so no constant points into our buffer

                data = np.frombuffer(self.read(weights), np.uint8)
                model = core.read_model(model=self.read(self.model_path),
                                        weights=ov.Tensor(data, shared_memory=False))
            else:
                model = core.read_model(self.read(self.model_path))
            if batch is not None:
                shape = model.input(0).get_partial_shape()
                shape[0] = batch
                model.reshape({model.input(0): shape})
            self.compiled = core.compile_model(model, device, config)
        except RuntimeError as exc:
            raise EdgetlError(f"{model_path}: OpenVINO cannot load or compile this model for {device} "
                              f"({str(exc).splitlines()[0]})") from None
        self._device = device
        self._version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
        self._fake_quantize = sum(1 for op in model.get_ops() if op.get_type_name() == "FakeQuantize")
        self._int8_layers = self._count_int8_layers()
        self._precision = _type_name(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self._request = self.compiled.create_infer_request()
        pshape = self.compiled.input(0).get_partial_shape()
        self._batch = pshape[0].get_length() if pshape[0].is_static else None
        try:
            self._device_name = core.get_property(device.split(":")[0], "FULL_DEVICE_NAME")
        except RuntimeError:  # AUTO/MULTI have no single name
            self._device_name = device

    def _count_int8_layers(self) -> int:
        try:
            runtime = self.compiled.get_runtime_model()
        except RuntimeError:  # pragma: no cover - some plugins do not expose it
            return 0
        n = 0
        for op in runtime.get_ops():
            info = op.get_rt_info()
            if "runtimePrecision" in info and info["runtimePrecision"].astype(str) in ("i8", "u8"):
                if "layerType" in info and info["layerType"].astype(str) in _COMPUTE_LAYERS:
                    n += 1
        return n

    def infer_all(self, batch: np.ndarray) -> List[np.ndarray]:
        res = self._request.infer({0: np.ascontiguousarray(batch)})
        return [np.asarray(res[out], dtype=np.float32) for out in self.compiled.outputs]

    @property
    def fixed_batch(self) -> int | None:
        return self._batch

    @property
    def uses_cpu(self) -> bool:
        """CPU, and AUTO/MULTI/HETERO (they may place work on the CPU); not GPU or NPU alone."""
        return self._device.split(".")[0] not in ("GPU", "NPU")

    @property
    def precision(self) -> str:
        """What really runs: e.g. ``int8+f32`` (quantized layers int8, the rest f32) or ``bf16``."""
        if self._fake_quantize and self._int8_layers:
            return f"int8+{self._precision}"
        return self._precision

    @property
    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "version": self._version, "device": f"{self._device} ({self._device_name})",
                "precision": self.precision, "inference_precision": self._precision,
                "int8_layers": self._int8_layers, "fake_quantize_ops": self._fake_quantize,
                "options": self.options}
