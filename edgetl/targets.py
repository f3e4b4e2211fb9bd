"""Target profiles: one TOML per device (``targets/*.toml``, shipped as package data ``edgetl.target_profiles``).

A profile is data: which backend builds the model, in which precision, with which backend options,
and the hardware facts that constrain it (a Jetson Nano has no fast INT8; DLA needs a static batch;
an AVX-512 BF16 CPU makes OpenVINO run bf16 unless told f32). Loading validates everything:
an unknown key is an error naming the key and the file, and a combination the hardware cannot
run (``precision = "int8"`` on a Jetson Nano, a DLA core on an Orin Nano) is refused with the
reason. The resolved profile is written into the artifact's manifest (``manifest.target``) so
``edgetl build`` on the device rebuilds exactly what was checked on the host.

Pure functions: :func:`load_target` (name or path), :func:`apply_overrides` (``--precision``,
``--set tensorrt.dla_core=0``), :func:`list_targets`. No backend package is imported here.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .runtime.errors import EdgetlError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

BACKENDS = ("tensorrt", "openvino", "onnxruntime")
PRECISIONS = ("int8", "fp16", "fp32")
METHODS = ("auto", "qat", "ptq")  # auto: the repair ladder (PTQ, other calibrators, then QAT)
WEIGHT_RANGES = ("auto", "full", "reduced")  # reduced: 7-bit weights (see weight_range_for)
OV_PRECISIONS = ("f32", "bf16", "f16", "default")
OV_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
ORT_LEVELS = ("disable", "basic", "extended", "all")


class TargetError(EdgetlError):
    """A target profile that cannot be read, has an unknown/invalid key, or asks the impossible."""


# ------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gate:
    """Accuracy gate thresholds: top-1 drop in points (float -> quantized) and agreement (0..1)."""

    max_accuracy_drop: float = 1.0
    min_agreement: float = 0.98
    # worst agreement with float over perturbed copies of the checkset (edgetl.stability)
    min_stability_agreement: float = 0.97
    stability_jpeg_quality: int = 90  # the JPEG quality of the perturbation (the camera's/recorder's)
    # detection (edgetl.detect.gate): mAP@0.5 drop in points, and the F1 of quantized vs float detections
    max_map_drop: float = 1.0
    min_det_agreement: float = 0.95


@dataclass(frozen=True)
class Quantization:
    method: str = "auto"  # auto | qat | ptq: the default method of `edgetl compile` for this target
    # auto: 7-bit weights where the device CPU sums u8 x s8 products in saturating int16 (no VNNI)
    weight_range: str = "auto"


@dataclass(frozen=True)
class Hardware:
    """Facts about the device that decide what may be built for it."""

    int8_capable: bool = True
    int8_reason: str = ""  # why not, when int8_capable is false (shown when int8 is refused)
    fp16_capable: bool = True
    dla_cores: int = 0  # NVIDIA Deep Learning Accelerator cores (0 = none)
    gpu: str = ""
    compute_capability: str = ""  # e.g. "8.7" (sm_87)
    cpu: str = ""
    cpu_arch: str = ""  # x86_64 | aarch64: the device CPU's architecture ("" = the machine that compiles)
    jetpack: str = ""  # JetPack releases this profile was written for
    python: str = ""  # the Python the device's OS/JetPack ships (its TensorRT bindings are for it); the runtime needs >= 3.8
    notes: str = ""


@dataclass(frozen=True)
class TensorRTOptions:
    workspace_mb: int = 1024
    dla_core: int | None = None  # None: GPU; N: run on DLA core N (static batch, int8/fp16 only)
    gpu_fallback: bool = True  # layers DLA cannot run fall back to the GPU
    fp16_fallback: bool = True  # int8 builds: allow FP16 for layers left in float
    builder_optimization_level: int = 3  # 0..5 (TensorRT >= 8.6; ignored on older versions)
    timing_cache: str = "timing.cache"  # a name inside builds/tensorrt/ of the artifact (EDGETL_TRT_TIMING_CACHE: a shared file)
    max_batch: int = 8  # upper bound of the optimization profile when batch = "dynamic"
    min_version: str = "8.5"
    supported_versions: tuple[str, ...] = ("8.5", "8.6", "10.3")


@dataclass(frozen=True)
class OpenVINOOptions:
    device: str = "CPU"  # CPU | GPU | NPU | AUTO
    performance_hint: str = "LATENCY"
    inference_precision: str = "default"  # f32 | bf16 | f16 | default (the device decides: bf16 on AMX/AVX512-BF16 CPUs)
    num_streams: int | str = "AUTO"  # an int, or "AUTO"
    threads: int = 0  # INFERENCE_NUM_THREADS; 0 = OpenVINO's default
    # true: the IR takes the uint8 NHWC image and converts/normalises it itself (PrePostProcessor),
    # so the device only resizes; the build records its input in manifest.builds[].input
    fold_preprocessing: bool = False


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 0  # 0 = ONNX Runtime's default
    graph_optimization_level: str = "all"


SECTION_TYPES: dict[str, type] = {
    "quantization": Quantization, "gate": Gate, "hardware": Hardware,
    "tensorrt": TensorRTOptions, "openvino": OpenVINOOptions, "onnxruntime": OnnxRuntimeOptions,
}


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    backend: str
    precision: str
    batch: int | str = 1  # the batch the device runs per call; "dynamic" for a dynamic batch axis
    input_size: tuple[int, ...] = ()  # (height, width); empty = the model's own input size
    quantization: Quantization = field(default_factory=Quantization)
    gate: Gate = field(default_factory=Gate)
    hardware: Hardware = field(default_factory=Hardware)
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    openvino: OpenVINOOptions = field(default_factory=OpenVINOOptions)
    onnxruntime: OnnxRuntimeOptions = field(default_factory=OnnxRuntimeOptions)
    source: str = ""  # where it was loaded from (file path or "bundled targets/NAME.toml")

    def __post_init__(self) -> None:
        _check_profile(self)

    # ---- views ---------------------------------------------------------------------------
    def options_for(self, backend: str | None = None) -> dict[str, Any]:
        """The backend section as the plain dict the runner of that backend takes."""
        backend = backend or self.backend
        if backend not in BACKENDS:
            raise TargetError(f"unknown backend {backend!r}", hint=f"use one of {BACKENDS}")
        return _plain(dataclasses.asdict(getattr(self, backend)))

    def to_dict(self) -> dict[str, Any]:
        d = _plain(dataclasses.asdict(self))
        d.pop("source")
        if not self.input_size:
            d.pop("input_size")
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "target") -> "TargetProfile":
        return _from_table(data, source)

    def with_changes(self, **changes: Any) -> "TargetProfile":
        """A copy with top-level fields or whole sections replaced (re-validated)."""
        try:
            return dataclasses.replace(self, **changes)
        except TargetError as exc:
            raise TargetError(exc.message, hint=exc.hint) from None

    def check_input_size(self, model_size: tuple[int, int], where: str = "the model") -> None:
        if self.input_size and tuple(self.input_size) != tuple(model_size):
            raise TargetError(
                f"target {self.name!r} ({self.source}) wants input_size {list(self.input_size)} but {where} "
                f"takes {list(model_size)}",
                hint="train at the profile's size, or remove input_size from the profile")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------

# ``int | None`` is a types.UnionType from Python 3.10; before, :func:`dataclass_hints` makes it a typing.Union
_UNIONS = (typing.Union, getattr(types, "UnionType", typing.Union))


def dataclass_hints(cls: type) -> dict[str, Any]:
    """The field types of dataclass ``cls``. Its annotations are strings (``from __future__ import
    annotations``) written in 3.10 syntax (``int | None``, ``tuple[str, ...]``), which
    ``typing.get_type_hints`` cannot evaluate on the device runtime's older Pythons (JetPack 5: 3.8;
    Debian 11: 3.9): there each ``|`` part is evaluated alone, builtin generics as typing's."""
    try:
        return typing.get_type_hints(cls)
    except TypeError:  # Python < 3.10 (PEP 604), < 3.9 (PEP 585)
        pass
    ns = dict(vars(sys.modules[cls.__module__]))
    ns.update({"tuple": typing.Tuple, "list": typing.List, "dict": typing.Dict})
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not isinstance(f.type, str):
            out[f.name] = f.type
            continue
        parts, depth, cur = [], 0, ""
        for ch in f.type:  # split on the top-level "|" only
            depth += ch == "["
            depth -= ch == "]"
            if ch == "|" and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        types_ = [eval(x.strip(), ns) for x in parts + [cur]]  # noqa: S307 - our own annotations
        out[f.name] = types_[0] if len(types_) == 1 else typing.Union[tuple(types_)]
    return out


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in _UNIONS:
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is tuple:
        (item, *_rest) = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in _UNIONS:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    if typing.get_origin(tp) is tuple or (isinstance(value, list) and tp is not str):
        return tuple(value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def _build(cls: type, table: Any, where: str, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a TOML table: unknown keys and wrong types name the key."""
    if not isinstance(table, Mapping):
        raise TargetError(f"{where}: [{prefix.rstrip('.')}] must be a table")
    hints = dataclass_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise TargetError(f"{where}: unknown key '{prefix}{unknown[0]}'"
                          + (f" (and {', '.join(prefix + u for u in unknown[1:])})" if len(unknown) > 1 else ""),
                          hint=f"known keys{' in [' + prefix.rstrip('.') + ']' if prefix else ''}: {', '.join(known)}")
    kwargs = {}
    for key, value in table.items():
        tp = hints[key]
        if key in SECTION_TYPES and not prefix:
            kwargs[key] = _build(SECTION_TYPES[key], value, where, f"{key}.")
            continue
        if not _type_ok(value, tp):
            raise TargetError(f"{where}: key {prefix}{key} = {value!r} must be {_type_name(tp)}")
        kwargs[key] = _coerce(value, tp)
    return cls(**kwargs)


def _from_table(table: Mapping[str, Any], where: str) -> TargetProfile:
    for key in ("name", "description", "backend", "precision"):
        if key not in table:
            raise TargetError(f"{where}: missing key {key!r}", hint="a target profile needs name, description, "
                                                                    "backend and precision")
    try:
        profile = _build(TargetProfile, table, where)
    except TargetError as exc:
        msg = exc.message if exc.message.startswith(where) else f"{where}: {exc.message}"
        raise TargetError(msg, hint=exc.hint) from None
    return dataclasses.replace(profile, source=where) if not profile.source else profile


def _bad(p: TargetProfile, key: str, value: Any, allowed: Any) -> TargetError:
    return TargetError(f"target {p.name!r}: {key} = {value!r} is not valid", hint=f"use one of {allowed}")


def _check_profile(p: TargetProfile) -> None:
    """Each value in its range, then the device's facts (what it can run)."""
    _check_values(p)
    _check_hardware(p)


def _check_values(p: TargetProfile) -> None:
    def bad(key: str, value: Any, allowed: Any) -> TargetError:
        return _bad(p, key, value, allowed)

    if p.backend not in BACKENDS:
        raise bad("backend", p.backend, BACKENDS)
    from .runtime.errors import ManifestError
    from .runtime.manifest import check_name

    try:  # an artifact never chooses where edgetl writes: the cache is a file of builds/tensorrt/
        check_name(p.tensorrt.timing_cache, "tensorrt.timing_cache")
    except ManifestError:
        raise TargetError(f"target {p.name!r}: tensorrt.timing_cache = {p.tensorrt.timing_cache!r} must be a file "
                          "name inside the artifact's builds/tensorrt/",
                          hint="use a plain name such as timing.cache; to share one cache file between artifacts "
                               "on a device, set EDGETL_TRT_TIMING_CACHE=/path/to/file") from None
    if p.precision not in PRECISIONS:
        raise bad("precision", p.precision, PRECISIONS)
    if p.quantization.method not in METHODS:
        raise bad("quantization.method", p.quantization.method, METHODS)
    if p.quantization.weight_range not in WEIGHT_RANGES:
        raise bad("quantization.weight_range", p.quantization.weight_range, WEIGHT_RANGES)
    if p.hardware.cpu_arch not in ("", "x86_64", "aarch64"):
        raise bad("hardware.cpu_arch", p.hardware.cpu_arch, ("x86_64", "aarch64"))
    if not 0 <= p.gate.min_stability_agreement <= 1:
        raise bad("gate.min_stability_agreement", p.gate.min_stability_agreement, "a fraction 0..1 (0.97 = 97 %)")
    if not 1 <= p.gate.stability_jpeg_quality <= 100:
        raise bad("gate.stability_jpeg_quality", p.gate.stability_jpeg_quality, "1..100")
    if not (isinstance(p.batch, int) and p.batch >= 1) and p.batch != "dynamic":
        raise bad("batch", p.batch, "an integer >= 1, or \"dynamic\"")
    if p.input_size and (len(p.input_size) != 2 or min(p.input_size) < 8):
        raise bad("input_size", list(p.input_size), "[height, width], each at least 8")
    if not 0 <= p.gate.max_accuracy_drop <= 100:
        raise bad("gate.max_accuracy_drop", p.gate.max_accuracy_drop, "points of top-1 accuracy, 0..100")
    if not 0 <= p.gate.min_agreement <= 1:
        raise bad("gate.min_agreement", p.gate.min_agreement, "a fraction 0..1 (0.98 = 98 %)")
    ov, ort, trt = p.openvino, p.onnxruntime, p.tensorrt
    if ov.inference_precision not in OV_PRECISIONS:
        raise bad("openvino.inference_precision", ov.inference_precision, OV_PRECISIONS)
    if ov.performance_hint not in OV_HINTS:
        raise bad("openvino.performance_hint", ov.performance_hint, OV_HINTS)
    if isinstance(ov.num_streams, str) and ov.num_streams != "AUTO" or isinstance(ov.num_streams, int) and ov.num_streams < 1:
        raise bad("openvino.num_streams", ov.num_streams, "an integer >= 1, or \"AUTO\"")
    if ort.graph_optimization_level not in ORT_LEVELS:
        raise bad("onnxruntime.graph_optimization_level", ort.graph_optimization_level, ORT_LEVELS)
    if not 0 <= trt.builder_optimization_level <= 5:
        raise bad("tensorrt.builder_optimization_level", trt.builder_optimization_level, "0..5")
    if trt.workspace_mb < 16:
        raise bad("tensorrt.workspace_mb", trt.workspace_mb, "at least 16 (MiB)")


def _check_hardware(p: TargetProfile) -> None:
    """What the device can run: INT8/FP16, the backend's precisions, DLA."""
    ov, trt = p.openvino, p.tensorrt
    if p.precision == "int8" and not p.hardware.int8_capable:
        raise TargetError(f"target {p.name!r}: precision int8 is refused: "
                          f"{p.hardware.int8_reason or 'this device has no fast INT8'}",
                          hint="use precision fp16 for this device (e.g. --precision fp16)")
    if p.precision == "fp16" and not p.hardware.fp16_capable:
        raise TargetError(f"target {p.name!r}: precision fp16 is refused: this device has no fast FP16",
                          hint="use precision int8 or fp32")
    if p.backend == "onnxruntime" and p.precision == "fp16":
        raise TargetError(f"target {p.name!r}: the onnxruntime backend builds int8 (QDQ) or fp32, not fp16",
                          hint="use precision int8 or fp32, or an OpenVINO/TensorRT target for fp16")
    if p.backend == "openvino":
        ip = ov.inference_precision
        if p.precision == "fp32" and ip in ("bf16", "f16"):
            raise TargetError(f"target {p.name!r}: precision fp32 contradicts openvino.inference_precision = {ip!r}",
                              hint="set openvino.inference_precision = \"f32\" (or precision to fp16)")
        if p.precision == "fp16" and ip in ("f32", "bf16"):
            raise TargetError(f"target {p.name!r}: precision fp16 contradicts openvino.inference_precision = {ip!r}",
                              hint="set openvino.inference_precision = \"f16\"")
    if p.backend == "tensorrt" and trt.dla_core is not None:
        if p.hardware.dla_cores == 0:
            raise TargetError(f"target {p.name!r}: tensorrt.dla_core = {trt.dla_core} but this device has no DLA",
                              hint="remove tensorrt.dla_core (the GPU runs the model)")
        if not 0 <= trt.dla_core < p.hardware.dla_cores:
            raise _bad(p, "tensorrt.dla_core", trt.dla_core, f"0..{p.hardware.dla_cores - 1} "
                                                              f"(this device has {p.hardware.dla_cores} DLA cores)")
        if p.batch == "dynamic":
            raise TargetError(f"target {p.name!r}: DLA needs static shapes, but batch = \"dynamic\"",
                              hint="set batch to a fixed integer (e.g. 1) when tensorrt.dla_core is set")
        if p.precision == "fp32":
            raise TargetError(f"target {p.name!r}: DLA runs int8 or fp16 only, not fp32",
                              hint="use precision int8 or fp16 with tensorrt.dla_core")


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------

def weight_range_for(profile: TargetProfile) -> tuple[str, str]:
    """``(weight range, why)`` of an INT8 build for ``profile``: "reduced" (7-bit weights) where the
    device CPU sums u8 x s8 products in a saturating int16 (x86 without VNNI), else "full".

    ``quantization.weight_range = "auto"`` decides by the device: a GPU/NPU, TensorRT or an arm64 CPU
    never saturates; an x86 CPU target is the machine that compiles (``hardware.cpu_arch`` empty or
    this machine's architecture: the build host is taken to be of the device's class, and the class
    is recorded so that ``edgetl check`` on another class says so); an x86 device compiled on another
    architecture gets 7-bit weights, which are exact on every x86 CPU."""
    from .runtime.cpu import host_cpu

    wr = profile.quantization.weight_range
    if wr != "auto":
        return wr, f"pinned by the profile (quantization.weight_range = {wr!r})"
    if profile.backend == "tensorrt":
        return "full", "TensorRT on an NVIDIA GPU accumulates int8 products in int32"
    device = str(profile.openvino.device if profile.backend == "openvino" else
                 (profile.onnxruntime.providers or ("CPUExecutionProvider",))[0])
    if not (device.startswith("CPU") or device == "CPUExecutionProvider"):
        return "full", f"{device} accumulates int8 products without int16 saturation"
    host = host_cpu()
    arch = profile.hardware.cpu_arch or host.arch
    if arch == "aarch64":
        return "full", "arm64 NEON widens int8 products before adding them (no saturation)"
    if arch != host.arch:
        return "reduced", (f"the device is {arch}, this machine {host.arch}: 7-bit weights are exact on every x86 "
                           "CPU, with or without VNNI")
    if host.int8_exact:
        return "full", f"{host.short}: int8 products accumulate in int32 (no saturation)"
    return "reduced", (f"{host.short}: u8 x s8 pair sums saturate int16 without VNNI; 7-bit weights keep them exact "
                       "(ONNX Runtime's reduce_range, NNCF's overflow fix)")


def _builtin_dir():
    if not hasattr(resources, "files"):  # Python 3.8 (JetPack 5): the installed package's folder
        import importlib

        return Path(importlib.import_module("edgetl.target_profiles").__file__).parent
    return resources.files("edgetl.target_profiles")  # novermin: 3.8 takes the branch above


def list_targets() -> list[TargetProfile]:
    """Every bundled profile (validated), sorted by name."""
    out = []
    for entry in sorted(_builtin_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            out.append(_load_text(entry.read_text(encoding="utf-8"), f"bundled targets/{entry.name}"))
    return out


def _load_text(text: str, where: str) -> TargetProfile:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"{where}: not valid TOML ({exc})") from None
    return _from_table(table, where)


def load_target(name_or_path: str | Path) -> TargetProfile:
    """A bundled profile by name (``jetson-agx-orin``) or a user's TOML file by path."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    if s.endswith(".toml") or p.is_file() or "/" in s:
        if not p.is_file():
            raise TargetError(f"{p}: target profile file not found",
                              hint="pass a bundled target name (see `edgetl targets`) or a path to a TOML file")
        return _load_text(p.read_text(encoding="utf-8"), str(p))
    entry = _builtin_dir() / f"{s}.toml"
    if not entry.is_file():
        names = [t.name for t in list_targets()]
        raise TargetError(f"unknown target {s!r}", hint=f"bundled targets: {', '.join(names)}; "
                                                         "or pass a path to your own TOML profile")
    profile = _load_text(entry.read_text(encoding="utf-8"), f"bundled targets/{s}.toml")
    if profile.name != s:
        raise TargetError(f"bundled targets/{s}.toml: name = {profile.name!r} does not match the file name")
    return profile


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: take it as a string


def apply_overrides(profile: TargetProfile, precision: str | None = None, method: str | None = None,
                    backend: str | None = None, sets: tuple[str, ...] | list[str] = ()) -> TargetProfile:
    """``--precision``, ``--method``, ``--backend`` and ``--set section.key=value`` on a profile.

    The result is validated like a file would be: ``--precision int8`` on a Jetson Nano is refused
    with the profile's reason, ``--set tensorrt.dla_core=5`` on a 2-DLA device is refused.
    """
    table = profile.to_dict()
    if precision is not None:
        table["precision"] = precision
    if method is not None:
        table.setdefault("quantization", {})["method"] = method
    if backend is not None:
        table["backend"] = backend
    for item in sets:
        if "=" not in item:
            raise TargetError(f"--set {item!r}: expected KEY=VALUE", hint="e.g. --set tensorrt.dla_core=0")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = table
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TargetError(f"--set {key}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value.strip())
    where = f"{profile.source} (with overrides)" if (precision or method or backend or sets) else profile.source
    new = _from_table(table, where)
    return dataclasses.replace(new, source=profile.source)


def to_toml(profile: TargetProfile, all_sections: bool = False) -> str:
    """The resolved profile as TOML (what `edgetl targets show` prints).

    Only the profile's own backend section is printed unless ``all_sections``; empty hardware
    facts are left out.
    """
    d = profile.to_dict()
    if not all_sections:
        for b in BACKENDS:
            if b != profile.backend:
                d.pop(b)
        d["hardware"] = {k: v for k, v in d["hardware"].items() if v not in ("", None)}
    top = [(k, v) for k, v in d.items() if not isinstance(v, dict)]
    lines = [f"# resolved from {profile.source}"] + [f"{k} = {_toml_value(v)}" for k, v in top]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            for kk, vv in v.items():
                lines.append(f"{kk} = {_toml_value(vv)}" if vv is not None else f"# {kk} = (not set)")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)
