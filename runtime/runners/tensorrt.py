"""TensorRT runner: deserialize an engine built on this device and run it with the CUDA runtime API.

A TensorRT engine only runs on the TensorRT version and GPU it was built with. The builder
(``edgetl/backends/tensorrt.py``) records a *key* beside the engine, in
``builds/tensorrt/build_config.json`` -> ``engine.key`` (and in the manifest's build entry):
``{"tensorrt": "10.3.0", "gpu": "Orin", "compute_capability": "8.7", "precision": "int8"}``.
This runner computes the same key for the device it runs on and REFUSES an engine whose key does
not match, telling the user to run ``edgetl build ARTIFACT`` on the device (the artifact carries the
QDQ ONNX and the resolved build configuration, so that rebuilds the same engine here).

Works with TensorRT 8.5 .. 10.x: the name-based tensor API (``num_io_tensors``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``; 8.5+, the only one in 10.x) and,
for older 8.x, the bindings API (``num_bindings``, ``set_binding_shape``, ``execute_async_v2``).
Device memory and copies use ``cuda-python`` (``cuda.bindings.runtime`` or the older ``cuda.cudart``).

Options: ``key`` (the recorded key; when absent it is read from ``build_config.json`` beside the
engine), ``dla_core`` (the DLA core the engine was built for, if any), ``outputs`` (the ONNX's
output names in its order, recorded by the builder: ``infer_all`` returns the outputs in that order,
whatever order the engine lists its I/O tensors in; a detector's are ``boxes``, ``scores``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Mapping

import numpy as np

from ..errors import EdgetlError, MissingDependencyError
from .base import Runner, int_option

BUILD_CONFIG = "build_config.json"
KEY_FIELDS = ("tensorrt", "compute_capability", "gpu", "precision")


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError("tensorrt", "tensorrt", "the TensorRT backend") from None
    if not hasattr(trt, "Builder"):  # the PyPI placeholder package that only downloads on install
        raise MissingDependencyError("tensorrt", "tensorrt", "the TensorRT backend (the installed package is a "
                                                             "stub without the TensorRT libraries)")
    return trt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python (the 11.x line on JetPack 5)
        except ImportError:
            raise MissingDependencyError("cuda-python", "tensorrt", "the TensorRT runner (CUDA memory)") from None
    return cudart


def _cuda(result: tuple) -> Any:
    """cuda-python returns (err, value...) tuples: raise on error, return the value(s)."""
    err, *rest = result
    if int(err) != 0:
        raise EdgetlError(f"CUDA error {err}", hint="check the GPU is visible (nvidia-smi / tegrastats) and not out of memory")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def trt_major_minor(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


def engine_file_name(trt_version: str, compute_capability: str, precision: str, dla_core: int | None = None) -> str:
    """``model.trt10.3.sm87.int8.engine`` (``.dla0`` before ``.engine`` for a DLA engine)."""
    sm = str(compute_capability).replace(".", "")
    dla = f".dla{dla_core}" if dla_core is not None else ""
    return f"model.trt{trt_major_minor(trt_version)}.sm{sm}.{precision}{dla}.engine"


def device_key(trt=None, cudart=None, device: int = 0) -> dict[str, str]:
    """The key of this machine: TensorRT version, GPU name and compute capability."""
    trt = trt or import_tensorrt()
    cudart = cudart or import_cudart()
    prop = _cuda(cudart.cudaGetDeviceProperties(device))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {"tensorrt": str(trt.__version__), "gpu": name.strip("\x00 "),
            "compute_capability": f"{prop.major}.{prop.minor}"}


def check_engine_key(recorded: Mapping[str, Any], here: Mapping[str, Any], engine: Path | str) -> None:
    """Refuse an engine built for another TensorRT version or GPU (pure function, tested host-side)."""
    missing = [k for k in ("tensorrt", "compute_capability") if k not in recorded]
    if missing:
        raise EdgetlError(f"{engine}: the build record has no {', '.join(missing)}: cannot tell what it was built for",
                          hint="run `edgetl build ARTIFACT` on this device to rebuild the engine")
    diffs = []
    if str(recorded["tensorrt"]) != str(here["tensorrt"]):
        diffs.append(f"TensorRT {recorded['tensorrt']} (here {here['tensorrt']})")
    if str(recorded["compute_capability"]) != str(here["compute_capability"]):
        diffs.append(f"GPU compute capability {recorded['compute_capability']} (here {here['compute_capability']})")
    if recorded.get("gpu") and here.get("gpu") and str(recorded["gpu"]) != str(here["gpu"]):
        diffs.append(f"GPU {recorded['gpu']!r} (here {here['gpu']!r})")
    if diffs:
        raise EdgetlError(f"{engine}: this engine was built for {'; '.join(diffs)}. A TensorRT engine only runs on "
                          "the TensorRT version and GPU it was built with",
                          hint="run `edgetl build ARTIFACT` on this device (it rebuilds the engine from the "
                               "artifact's ONNX and build configuration)")
    name = Path(engine).name
    if recorded.get("precision"):
        expected = engine_file_name(str(recorded["tensorrt"]), str(recorded["compute_capability"]),
                                    str(recorded["precision"]), recorded.get("dla_core"))
        if name.endswith(".engine") and name != expected:
            raise EdgetlError(f"{engine}: the file name does not match its build record (expected {expected})",
                              hint="the engine was renamed or replaced: run `edgetl build ARTIFACT` on this device")


def recorded_key(engine: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    if options.get("key"):
        if not isinstance(options["key"], Mapping):
            raise EdgetlError(f"tensorrt option key = {options['key']!r} is not a build record",
                              hint="leave it out: it is read from build_config.json beside the engine")
        return dict(options["key"])
    cfg = engine.parent / BUILD_CONFIG
    if not cfg.is_file():
        raise EdgetlError(f"{cfg}: missing: nothing says which TensorRT version and GPU {engine.name} was built for",
                          hint="run `edgetl build ARTIFACT` on this device")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
        return dict(data["engine"]["key"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EdgetlError(f"{cfg}: unreadable or has no engine.key ({exc})",
                          hint="run `edgetl build ARTIFACT` on this device") from None


def order_outputs(engine_outputs: List[str], wanted: Any, engine: Path | str) -> List[str]:
    """The engine's output names in the order ``wanted`` (the ONNX's, recorded at build time) lists them."""
    if not isinstance(wanted, (list, tuple)) or not all(isinstance(n, str) for n in wanted):
        raise EdgetlError(f"tensorrt option outputs = {wanted!r} is not a list of output names",
                          hint="leave it out: edgetl build records it")
    if sorted(wanted) != sorted(engine_outputs) or len(set(wanted)) != len(wanted):
        raise EdgetlError(f"{engine}: the engine's outputs {engine_outputs} are not the recorded {list(wanted)}",
                          hint="run `edgetl build ARTIFACT` on this device to rebuild the engine")
    return list(wanted)


_BUILD_ONLY = "a build option (edgetl build), not used to run the engine"


class TensorRTRunner(Runner):
    backend = "tensorrt"
    OPTIONS = {"key": "the engine's build record {tensorrt, gpu, compute_capability, precision}",
               "dla_core": "the DLA core the engine was built for, or none",
               "outputs": "the output names in the ONNX's order (recorded by edgetl build)",
               **{k: _BUILD_ONLY for k in ("workspace_mb", "gpu_fallback", "fp16_fallback", "builder_optimization_level",
                                           "timing_cache", "max_batch", "min_version", "supported_versions")}}

    def __init__(self, model_path: Path, options: dict[str, Any], blobs: Mapping[str, bytes] | None = None):
        super().__init__(model_path, options, blobs)
        trt = import_tensorrt()
        cudart = import_cudart()
        if self.model_path.suffix not in (".engine", ".plan"):
            raise EdgetlError(f"{model_path}: TensorRT runs a serialized engine (.engine), not {self.model_path.suffix}",
                              hint="build the engine on this device: edgetl build ARTIFACT")
        self.trt, self.cudart = trt, cudart
        self.key = recorded_key(self.model_path, options)
        self.here = device_key(trt, cudart)
        check_engine_key(self.key, self.here, self.model_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        dla_core = int_option(self.backend, options, "dla_core", None, example=0)
        if dla_core is not None:
            self._runtime.DLA_core = dla_core
        self.engine = self._runtime.deserialize_cuda_engine(self.read(self.model_path))
        if self.engine is None:
            raise EdgetlError(f"{model_path}: TensorRT could not deserialize this engine",
                              hint="run `edgetl build ARTIFACT` on this device")
        self.context = self.engine.create_execution_context()
        self.stream = _cuda(cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._tensor_api = hasattr(self.engine, "num_io_tensors")
        if self._tensor_api:
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self.outputs = [n for n in names if n not in self.inputs]
            shape = tuple(self.engine.get_tensor_shape(self.inputs[0]))
        else:  # TensorRT < 8.5: bindings API
            names = [self.engine.get_binding_name(i) for i in range(self.engine.num_bindings)]
            self.inputs = [n for i, n in enumerate(names) if self.engine.binding_is_input(i)]
            self.outputs = [n for n in names if n not in self.inputs]
            shape = tuple(self.engine.get_binding_shape(0))
        if len(self.inputs) != 1 or not self.outputs:
            raise EdgetlError(f"{model_path}: expected one input and at least one output, "
                              f"found {self.inputs} -> {self.outputs}")
        if options.get("outputs") is not None:
            self.outputs = order_outputs(self.outputs, options["outputs"], self.model_path)
        self._batch = shape[0] if shape and shape[0] > 0 else None

    # ---- memory --------------------------------------------------------------------------
    def _device_buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _cuda(self.cudart.cudaFree(ptr))
            ptr = int(_cuda(self.cudart.cudaMalloc(nbytes)))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _dtype(self, name: str) -> np.dtype:
        if self._tensor_api:
            return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
        return np.dtype(self.trt.nptype(self.engine.get_binding_dtype(self.engine.get_binding_index(name))))

    # ---- inference -----------------------------------------------------------------------
    def _output_shape(self, name: str) -> tuple:
        if self._tensor_api:
            return tuple(self.context.get_tensor_shape(name))
        return tuple(self.context.get_binding_shape(self.engine.get_binding_index(name)))

    def infer_all(self, batch: np.ndarray) -> List[np.ndarray]:
        """Every output, in the engine's order (a classifier has one: (N, K); a detector two)."""
        cudart, engine, ctx = self.cudart, self.engine, self.context
        inp = self.inputs[0]
        x = np.ascontiguousarray(batch, dtype=self._dtype(inp))
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        d_in = self._device_buffer(inp, x.nbytes)
        if self._tensor_api:
            ctx.set_input_shape(inp, x.shape)
        else:
            ctx.set_binding_shape(engine.get_binding_index(inp), x.shape)
        ys = [np.empty(self._output_shape(out), dtype=self._dtype(out)) for out in self.outputs]
        d_outs = [self._device_buffer(out, y.nbytes) for out, y in zip(self.outputs, ys)]
        _cuda(cudart.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, h2d, self.stream))
        if self._tensor_api:
            ctx.set_tensor_address(inp, d_in)
            for out, d_out in zip(self.outputs, d_outs):
                ctx.set_tensor_address(out, d_out)
            ok = ctx.execute_async_v3(self.stream)
        else:
            bindings = [0] * engine.num_bindings
            bindings[engine.get_binding_index(inp)] = d_in
            for out, d_out in zip(self.outputs, d_outs):
                bindings[engine.get_binding_index(out)] = d_out
            ok = ctx.execute_async_v2(bindings, self.stream)
        if not ok:
            raise EdgetlError(f"{self.model_path}: TensorRT execution failed")
        for y, d_out in zip(ys, d_outs):
            _cuda(cudart.cudaMemcpyAsync(y.ctypes.data, d_out, y.nbytes, d2h, self.stream))
        _cuda(cudart.cudaStreamSynchronize(self.stream))
        outs = [y.astype(np.float32, copy=False) for y in ys]
        if len(outs) == 1:  # a classifier: (N, K) whatever trailing axes the engine kept
            outs[0] = outs[0].reshape(len(x), -1)
        return outs

    @property
    def fixed_batch(self) -> int | None:
        return self._batch

    @property
    def uses_cpu(self) -> bool:
        return False

    @property
    def info(self) -> dict[str, Any]:
        dla = self.key.get("dla_core")
        device = f"{self.here['gpu']} (sm_{self.here['compute_capability'].replace('.', '')})"
        return {"backend": self.backend, "version": self.here["tensorrt"],
                "device": device + (f", DLA core {dla}" if dla is not None else ""),
                "precision": f"{self.key.get('precision', '?')} (as built; explicit Q/DQ layers run int8)"
                if self.key.get("precision") == "int8" else str(self.key.get("precision", "?")),
                "options": self.options}

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cudart.cudaFree(ptr)
        self._buffers.clear()
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
