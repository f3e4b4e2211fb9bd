"""TensorRT build: an engine from the QDQ ONNX (explicit quantization) with the TensorRT Python API.

TensorRT cannot cross-build: an engine is built on the device it runs on (same TensorRT version,
same GPU). So the build has two halves:

1. **Prepare** (host or device, no TensorRT needed): check the QDQ graph against TensorRT's
   explicit-quantization rules for every TensorRT version the profile supports
   (:mod:`edgetl.backends.trt_conformance`), resolve the build configuration from the profile
   (flags, DLA, workspace, optimization level, timing cache, input shapes), run the accuracy gate of
   that exact QDQ graph through ONNX Runtime (``pre_build_gate``) and write all of it to
   ``builds/tensorrt/build_config.json`` inside the artifact.
2. **Engine** (on the device, by ``edgetl build ARTIFACT``): execute that configuration with
   ``trt.Builder`` / ``OnnxParser`` / ``build_serialized_network``, load and save the timing cache,
   and write the engine under a name keyed by TensorRT version, GPU compute capability and precision
   (``model.trt10.3.sm87.int8.engine``); the key is recorded in ``build_config.json`` and the
   manifest so the runner refuses an engine from another device.

API coverage: TensorRT 8.5 .. 10.x (JetPack 5 and 6): ``EXPLICIT_BATCH`` only before 10 (implicit
batch is gone in 10), ``set_memory_pool_limit`` (``max_workspace_size`` before 8.4),
``builder_optimization_level`` when present (8.6+).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..runtime.errors import EdgetlError, MissingDependencyError
from ..runtime.manifest import sha256_file
from ..runtime.runners.tensorrt import (BUILD_CONFIG, device_key, engine_file_name, import_cudart,
                                        import_tensorrt, trt_major_minor)
from ..targets import TargetProfile
from . import BuildContext, BuildOutcome, commit_build_dir, fresh_build_dir

CONFIG_SCHEMA = 1


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(v).split(".")[:2] if p.isdigit())


def resolve_build_config(profile: TargetProfile, onnx_name: str, input_name: str, input_shape: list[int]) -> dict:
    """The TensorRT build configuration of ``profile`` for a model with input ``input_shape`` (C,H,W).

    Pure: no TensorRT, no files. DLA implies a static batch (min = opt = max), ``DLA`` as default
    device type, and ``GPU_FALLBACK`` when the profile allows it.
    """
    trt = profile.tensorrt
    precision = profile.precision
    flags = []
    if precision == "int8":
        flags.append("INT8")
        if trt.fp16_fallback and profile.hardware.fp16_capable:
            flags.append("FP16")
    elif precision == "fp16":
        flags.append("FP16")
    dla = trt.dla_core is not None
    if dla and trt.gpu_fallback:
        flags.append("GPU_FALLBACK")
    if isinstance(profile.batch, int):
        b_min = b_opt = b_max = profile.batch
    else:
        b_min, b_opt, b_max = 1, 1, trt.max_batch
    shape = [int(d) for d in input_shape]
    return {
        "schema": CONFIG_SCHEMA,
        "target": profile.name,
        "onnx": onnx_name,
        "precision": precision,
        "quantization": "explicit (Q/DQ in the ONNX)" if precision == "int8" else "none",
        "flags": flags,
        "device_type": "DLA" if dla else "GPU",
        "dla_core": trt.dla_core,
        "gpu_fallback": bool(dla and trt.gpu_fallback),
        "workspace_mb": trt.workspace_mb,
        "builder_optimization_level": trt.builder_optimization_level,
        "timing_cache": trt.timing_cache,
        "static_shapes": b_min == b_max,
        "input": {"name": input_name, "min": [b_min, *shape], "opt": [b_opt, *shape], "max": [b_max, *shape]},
        "tensorrt": {"min_version": trt.min_version, "supported_versions": list(trt.supported_versions)},
        "hardware": {"gpu": profile.hardware.gpu, "compute_capability": profile.hardware.compute_capability,
                     "dla_cores": profile.hardware.dla_cores, "jetpack": profile.hardware.jetpack},
        "engine_name": "model.trt{tensorrt}.sm{compute_capability}.{precision}"
                       + (f".dla{trt.dla_core}" if dla else "") + ".engine",
    }


def _input_of(onnx_path: Path) -> tuple[str, list[int]]:
    """Name and (C,H,W) of the model's input, read with ONNX Runtime (a core dependency)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dims = [d for d in inp.shape[1:]]
    if not all(isinstance(d, int) for d in dims):
        raise EdgetlError(f"{onnx_path}: input {inp.name!r} has non-static dims {inp.shape[1:]}",
                          hint="export with a static image size (only the batch axis may be dynamic)")
    return inp.name, dims


def onnx_outputs(onnx_path: Path) -> list[str]:
    """The model's output names in the ONNX's order (a classifier: one; a detector: ``boxes``, ``scores``)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return [o.name for o in sess.get_outputs()]


def conformance(onnx_path: Path, profile: TargetProfile) -> dict[str, Any]:
    """Check the QDQ graph for every TensorRT version the profile lists; raises naming the nodes."""
    from .trt_conformance import check

    out = {}
    for version in profile.tensorrt.supported_versions:
        report = check(onnx_path, version, require_qdq=profile.precision == "int8")
        report.raise_if_failed()
        out[version] = report.to_dict()
    return out


def pre_build_gate(ctx: BuildContext, onnx_name: str) -> dict[str, Any]:
    """The accuracy gate of the exact graph TensorRT will build, in reference numerics: ONNX Runtime
    with its graph optimisations off, so Q/DQ run as float ops (what the QDQ graph computes). The
    host CPU's fused integer kernels are not TensorRT's (on an AVX2 CPU without VNNI its s8s8 kernels
    collapsed a graph that is fine: 23 % agreement vs 99 % in reference numerics): their figure is
    reported beside the gate (``host_kernels``) and never decides a TensorRT artifact.

    The gate is the artifact's task's: the classification gate (``edgetl.check.evaluate``: top-1 drop,
    agreement, stability) or the detection gate (``edgetl.detect.gate.evaluate_detection``: mAP@0.5
    drop, detection agreement) with the profile's thresholds for that task."""
    if ctx.manifest.task == "detection":
        gate = _detection_gate(ctx, onnx_name)
    else:
        gate = _classification_gate(ctx, onnx_name)
    gate["numerics"] = "reference"
    gate["graph"] = onnx_name
    return gate


HOST_KERNELS_NOTE = "ONNX Runtime's fused integer kernels on this CPU: reported, never deciding a TensorRT artifact"


def _classification_gate(ctx: BuildContext, onnx_name: str) -> dict[str, Any]:
    from ..numerics import REFERENCE_NOTE, REFERENCE_OPTIONS
    from ..runtime.cpu import host_cpu
    from ..runtime.runners import open_runner
    from . import run_gate

    int8 = ctx.profile.precision == "int8"
    runner = open_runner("onnxruntime", ctx.folder / onnx_name, dict(REFERENCE_OPTIONS))
    try:
        gate = run_gate(runner, ctx.folder, ctx.profile, ctx.manifest.labels, stability=int8,
                        note=REFERENCE_NOTE + "; speed is not gated before the build: the engine's gate on the device "
                                              "measures it")
    finally:
        runner.close()
    if int8:
        host = open_runner("onnxruntime", ctx.folder / onnx_name, {"providers": ["CPUExecutionProvider"]})
        try:
            h = run_gate(host, ctx.folder, ctx.profile, ctx.manifest.labels, stability=False)
        finally:
            host.close()
        gate["host_kernels"] = {"note": HOST_KERNELS_NOTE, "cpu": host_cpu().to_dict(),
                                **{k: h[k] for k in ("passed", "quant_top1", "float_top1", "drop", "agreement", "n")}}
    return gate


def _detection_gate(ctx: BuildContext, onnx_name: str) -> dict[str, Any]:
    """The detection gate of ``onnx_name`` on the artifact's detection checkset (``check_detection``,
    not recorded: the build config holds it), with the profile's ``max_map_drop`` / ``min_det_agreement``."""
    from ..detect.compile import check_detection
    from ..detect.gate import DetThresholds
    from ..numerics import REFERENCE, REFERENCE_NOTE, REFERENCE_OPTIONS
    from ..runtime.cpu import host_cpu

    th = DetThresholds.coerce(ctx.profile.gate)

    def gate_in(backend: str, options: dict[str, Any]) -> dict[str, Any]:
        entry = {"backend": "onnxruntime", "model": onnx_name, "options": options}
        return check_detection(ctx.folder, ctx.manifest, backend, entry, dict(options), th, update=False,
                               log=lambda s: None).summary()

    gate = gate_in(REFERENCE, dict(REFERENCE_OPTIONS))
    gate["note"] = REFERENCE_NOTE + "; speed is not gated before the build: the engine's gate on the device measures it"
    if ctx.profile.precision == "int8":
        h = gate_in("onnxruntime", {"providers": ["CPUExecutionProvider"]})
        gate["host_kernels"] = {"note": HOST_KERNELS_NOTE, "cpu": host_cpu().to_dict(),
                                **{k: h[k] for k in ("passed", "quant_map50", "float_map50", "drop", "agreement", "n")}}
    return gate


def resolve_for(ctx: BuildContext) -> dict[str, Any]:
    """The configuration ``ctx.profile`` resolves to for the artifact's ONNX (+ the ONNX's sha256)."""
    onnx_name = ctx.source
    onnx_path = ctx.folder / onnx_name
    name, shape = _input_of(onnx_path)
    config = resolve_build_config(ctx.profile, onnx_name, name, shape)
    config["onnx_sha256"] = sha256_file(onnx_path)
    return config


def recorded_config(ctx: BuildContext, resolved: dict[str, Any]) -> dict[str, Any] | None:
    """The artifact's ``build_config.json`` when it is the same configuration for the same ONNX."""
    existing = read_config(ctx.out_dir)
    if existing is None or any(existing.get(k) != v for k, v in resolved.items()):
        return None
    return existing


def prepare(ctx: BuildContext, dest: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Conformance + resolved configuration + pre-build gate, written to ``dest/build_config.json``."""
    config = dict(config or resolve_for(ctx))
    onnx_name = config["onnx"]
    onnx_path = ctx.folder / onnx_name
    try:
        rules = "explicit-quantization rules" if ctx.profile.precision == "int8" else "ONNX parser (opset, ops)"
        ctx.progress(f"tensorrt: check {onnx_name} against TensorRT {', '.join(ctx.profile.tensorrt.supported_versions)} "
                     f"{rules}")
        config["conformance"] = conformance(onnx_path, ctx.profile)
    except MissingDependencyError:  # on a device without the `onnx` package: the host's check stands
        config["conformance"] = "not re-checked here (the onnx package is not installed)"
    config["task"] = ctx.manifest.task
    config["outputs"] = onnx_outputs(onnx_path)  # the engine's outputs must come back in this order
    if ctx.gate:
        how = "Q/DQ as float ops" if ctx.profile.precision == "int8" else "the float graph on ONNX Runtime"
        ctx.progress(f"tensorrt: pre-build gate ({ctx.manifest.task}: the same {onnx_name} in reference numerics, {how})")
        config["pre_build_gate"] = pre_build_gate(ctx, onnx_name)
    config["engine"] = None
    write_config(dest, config)
    return config


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    path = folder / BUILD_CONFIG
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / BUILD_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EdgetlError(f"{path}: not valid JSON ({exc})", hint="re-create it: edgetl build ARTIFACT --target T") from None
    if config.get("schema") != CONFIG_SCHEMA:
        raise EdgetlError(f"{path}: build config schema {config.get('schema')!r} is not {CONFIG_SCHEMA}",
                          hint="re-create it: edgetl build ARTIFACT --target T")
    return config


def check_version(version: str, config: dict[str, Any]) -> list[str]:
    """Refuse a TensorRT older than the profile's minimum; note one the profile does not list."""
    spec = config["tensorrt"]
    if _version_tuple(version) < _version_tuple(spec["min_version"]):
        raise EdgetlError(f"TensorRT {version} is older than this target's minimum {spec['min_version']}",
                          hint="update JetPack / TensorRT, or use a target profile written for this version")
    if trt_major_minor(version) not in spec["supported_versions"]:
        return [f"tensorrt: {version} is not among the versions this profile was checked for "
                f"({', '.join(spec['supported_versions'])}); the conformance check ran for those"]
    return []


def timing_cache_path(config: dict[str, Any], build_dir: Path) -> Path:
    """The timing cache: a name inside the artifact's builds/tensorrt/ (an artifact never chooses
    where edgetl writes), or the file the user names in EDGETL_TRT_TIMING_CACHE (shared between
    artifacts on one device)."""
    shared = os.environ.get("EDGETL_TRT_TIMING_CACHE")
    if shared:
        return Path(shared).expanduser()
    from ..runtime.manifest import check_name

    return build_dir / check_name(config["timing_cache"], "tensorrt.timing_cache")


def build_engine(onnx_path: Path, config: dict[str, Any], dest: Path, old_dir: Path,
                 progress=print) -> dict[str, Any]:
    """Execute ``config`` with the TensorRT builder; writes the engine (+ timing cache) into ``dest``.

    Every output of the ONNX is an output of the engine (a detector has two: ``boxes``, ``scores``):
    their names, in the ONNX's order, are recorded as ``outputs`` so the runner returns them in that
    order whatever order the engine lists its I/O tensors in."""
    trt = import_tensorrt()
    cudart = import_cudart()
    key = device_key(trt, cudart)
    key["precision"] = config["precision"]
    if config.get("dla_core") is not None:
        key["dla_core"] = config["dla_core"]
    notes = check_version(key["tensorrt"], config)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if config["precision"] == "int8" and not getattr(builder, "platform_has_fast_int8", True):
        raise EdgetlError(f"this GPU ({key['gpu']}, sm_{key['compute_capability']}) has no fast INT8 "
                          "(TensorRT: platform_has_fast_int8 = False)",
                          hint="use a target with precision fp16 for this device (e.g. jetson-nano)")
    network, outputs = parse_network(trt, builder, logger, onnx_path, config, key["tensorrt"], progress)
    bconf, cache_bytes = builder_config(trt, builder, network, config, old_dir)
    progress(f"tensorrt: build {config['precision']} engine for {key['gpu']} "
             f"({config['device_type']}{'' if config['dla_core'] is None else ' core %d' % config['dla_core']}; "
             f"{len(outputs)} output(s) {', '.join(outputs)}; timing cache {'loaded' if cache_bytes else 'new'})")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, bconf)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise EdgetlError(f"TensorRT could not build an engine from {onnx_path.name} (see the TensorRT log above)",
                          hint="for DLA, allow gpu_fallback; otherwise check workspace_mb")
    name = engine_file_name(key["tensorrt"], key["compute_capability"], config["precision"], config.get("dla_core"))
    (dest / name).write_bytes(bytes(serialized))
    new_cache = timing_cache_path(config, dest)
    new_cache.parent.mkdir(parents=True, exist_ok=True)
    new_cache.write_bytes(bytes(bconf.get_timing_cache().serialize()))
    return {"file": name, "key": key, "outputs": outputs, "build_seconds": round(seconds, 1),
            "timing_cache": str(config["timing_cache"]), "timing_cache_loaded": bool(cache_bytes), "notes": notes}


def parse_network(trt: Any, builder: Any, logger: Any, onnx_path: Path, config: dict[str, Any], version: str,
                  progress=print) -> tuple[Any, list[str]]:
    """The network TensorRT's ONNX parser makes of ``onnx_path`` and its output names, checked against
    the outputs the host recorded (``config["outputs"]``: same names, same order)."""
    major = int(version.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    progress(f"tensorrt {version}: parse {onnx_path.name}")
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EdgetlError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}",
                          hint="check the ops/opset against `edgetl.backends.trt_conformance` for this version")
    if network.num_inputs != 1:
        raise EdgetlError(f"{onnx_path}: the network has {network.num_inputs} inputs; edgetl builds models with one",
                          hint="export the model with a single image input")
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    expected = config.get("outputs")
    if expected is not None and list(expected) != outputs:
        raise EdgetlError(f"{onnx_path}: TensorRT's parser gives the outputs {outputs}, the ONNX has {list(expected)}",
                          hint="the build configuration and the ONNX disagree: re-create it with "
                               "`edgetl build ARTIFACT --target T` on the host")
    if config.get("task") == "detection" and len(outputs) != 2:
        raise EdgetlError(f"{onnx_path}: a detector has two outputs (boxes, scores); the network has {outputs}",
                          hint="re-create the artifact with `edgetl compile RUN --target T`")
    return network, outputs


def builder_config(trt: Any, builder: Any, network: Any, config: dict[str, Any], old_dir: Path) -> tuple[Any, bytes]:
    """The ``IBuilderConfig`` of ``config`` (workspace, flags, DLA, optimisation level, the input's
    optimisation profile, the timing cache) and the timing cache bytes it started from."""
    bconf = builder.create_builder_config()
    workspace = int(config["workspace_mb"]) << 20
    if hasattr(bconf, "set_memory_pool_limit"):
        bconf.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    else:  # TensorRT < 8.4
        bconf.max_workspace_size = workspace
    for flag in config["flags"]:
        bconf.set_flag(getattr(trt.BuilderFlag, flag))
    if config["device_type"] == "DLA":
        cores = getattr(builder, "num_DLA_cores", 0)
        if config["dla_core"] >= cores:
            raise EdgetlError(f"DLA core {config['dla_core']} requested but this device has {cores} DLA core(s)",
                              hint="pick another dla_core, or remove it to build for the GPU")
        bconf.default_device_type = trt.DeviceType.DLA
        bconf.DLA_core = int(config["dla_core"])
    if hasattr(bconf, "builder_optimization_level"):  # TensorRT >= 8.6
        bconf.builder_optimization_level = int(config["builder_optimization_level"])

    inp = config["input"]
    net_input = network.get_input(0)
    profile = builder.create_optimization_profile()
    profile.set_shape(net_input.name, tuple(inp["min"]), tuple(inp["opt"]), tuple(inp["max"]))
    bconf.add_optimization_profile(profile)

    cache_file = timing_cache_path(config, old_dir)
    cache_bytes = cache_file.read_bytes() if cache_file.is_file() else b""
    cache = bconf.create_timing_cache(cache_bytes)
    bconf.set_timing_cache(cache, ignore_mismatch=False)
    return bconf, cache_bytes


def _tensorrt_here() -> str | None:
    """None when TensorRT can build here, else why not."""
    try:
        import_tensorrt()
        import_cudart()
    except MissingDependencyError as exc:
        return exc.message.rstrip(".")
    return None


def _detection_gate_here(ctx: BuildContext) -> None:
    """Refuse, before a build of minutes, an engine whose detection gate could not run here: it needs
    pycocotools (mAP): ``edgetl[tensorrt]`` and ``edgetl[detect]`` bring it; a device that installed
    TensorRT from JetPack and edgetl without them may lack it."""
    if not (ctx.gate and ctx.manifest.task == "detection"):
        return
    try:
        import pycocotools.cocoeval  # noqa: F401
    except ImportError:
        raise EdgetlError("the detection gate of the engine needs the Python package 'pycocotools', which is not "
                          "installed here", hint="pip install 'edgetl[detect]' (pycocotools only; torch is not "
                                                 "needed on the device), or build without the gate: edgetl build "
                                                 "ARTIFACT --no-gate") from None


def build(ctx: BuildContext) -> BuildOutcome:
    resolved = resolve_for(ctx)
    config = recorded_config(ctx, resolved)
    missing = _tensorrt_here()
    if missing is None:
        _detection_gate_here(ctx)
    if missing and config is not None:  # nothing changed and no TensorRT here: leave the build as it is
        return BuildOutcome(None, [f"tensorrt: {missing}; builds/tensorrt/{BUILD_CONFIG} is up to date: run "
                                   "`edgetl build ARTIFACT` on the device to build the engine"],
                            gate=config.get("pre_build_gate"), keep_existing=True)
    tmp = fresh_build_dir(ctx)
    try:
        if config is None:  # new, or the profile / ONNX changed: check and gate again
            config = prepare(ctx, tmp, resolved)
        else:  # the configuration written on the host: execute it as it is
            ctx.progress(f"tensorrt: executing the artifact's builds/tensorrt/{BUILD_CONFIG}")
            config["engine"] = None
            write_config(tmp, config)
        if missing:
            commit_build_dir(ctx, tmp)
            return BuildOutcome(None, [f"tensorrt: {missing}; wrote builds/tensorrt/{BUILD_CONFIG} (conformance "
                                       f"checked, pre-build gate {_gate_word(config.get('pre_build_gate'))}); copy "
                                       "the artifact to the device and run `edgetl build ARTIFACT` there"],
                                gate=config.get("pre_build_gate"))
        engine = build_engine(ctx.folder / config["onnx"], config, tmp, ctx.out_dir, ctx.progress)
        config["engine"] = engine
        write_config(tmp, config)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_build_dir(ctx, tmp)
    key = engine["key"]
    entry = {"backend": "tensorrt", "model": f"builds/tensorrt/{engine['file']}", "precision": config["precision"],
             "options": {"key": key, "dla_core": config.get("dla_core"), "outputs": engine["outputs"]},
             "version": key["tensorrt"],
             "device": f"{key['gpu']} (sm_{key['compute_capability'].replace('.', '')})"
                       + ("" if config.get("dla_core") is None else f", DLA core {config['dla_core']}"),
             "build_config": f"builds/tensorrt/{BUILD_CONFIG}", "pre_build_gate": config.get("pre_build_gate")}
    return BuildOutcome(entry, engine["notes"])


def _gate_word(gate: Any) -> str:
    if not isinstance(gate, dict):
        return "not run"
    return "passed" if gate.get("passed") else "FAILED"
