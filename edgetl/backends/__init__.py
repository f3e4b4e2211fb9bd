"""Host-side backend builders: turn an artifact's ONNX into what a backend runs, then gate it.

One module per backend, registered by name in ``BUILDERS`` (imported lazily; heavy packages are
imported inside them). Each module has ``build(ctx: BuildContext) -> BuildOutcome``: it writes
``builds/<backend>/`` (in a temp folder renamed when complete) and returns the manifest build entry
``{"backend", "model", "precision", "options", "version", "device", ...}``, or no entry when the
build can only be finished on the device (a TensorRT engine on a host without TensorRT: the build
configuration is written, the engine is built by ``edgetl build`` on the Jetson).

:func:`build_artifact` is what ``edgetl build`` and ``edgetl compile`` call: verify the artifact,
build, run the accuracy gate through the built model (the runner the device uses), and record
backend, version, device, precision and gate in ``manifest.builds`` (manifest rewritten atomically
with fresh file hashes).

Adding a backend = one module here + one line in ``BUILDERS`` (+ its runner in
``edgetl/runtime/runners/``).
"""

from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..runtime.errors import EdgetlError
from ..runtime.manifest import Manifest, open_verified, read_manifest, seal
from ..targets import TargetProfile

BUILDERS: dict[str, str] = {
    "onnxruntime": "edgetl.backends.onnxruntime",
    "openvino": "edgetl.backends.openvino",
    "tensorrt": "edgetl.backends.tensorrt",
}
INT8_ONNX = "model_int8.onnx"
FP32_ONNX = "model_fp32.onnx"
Progress = Callable[[str], None]


class GateFailed(EdgetlError):
    """The build was made and recorded, but it misses the target's accuracy gate: not deployable."""

    exit_code = 1  # as `edgetl quantize` and `edgetl check`: 1 = gate failed, 2 = bad input


@dataclass(frozen=True)
class BuildContext:
    folder: Path  # the artifact folder
    manifest: Manifest
    profile: TargetProfile
    backend: str
    progress: Progress = print
    gate: bool = True  # run accuracy gates (the builder's own, e.g. TensorRT's pre-build gate)

    @property
    def source(self) -> str:
        """The artifact ONNX this build starts from (relative name)."""
        return source_model(self.folder, self.profile.precision)

    @property
    def out_dir(self) -> Path:
        return self.folder / "builds" / self.backend

    @property
    def options(self) -> dict[str, Any]:
        return self.profile.options_for(self.backend)


@dataclass
class BuildOutcome:
    entry: dict[str, Any] | None  # the manifest build entry; None = prepared, finish on the device
    notes: list[str] = field(default_factory=list)
    gate: dict[str, Any] | None = None  # the gate that was run (pre-build gate when entry is None)
    keep_existing: bool = False  # entry None and nothing changed: keep this backend's manifest entry


def source_model(folder: Path, precision: str) -> str:
    name = INT8_ONNX if precision == "int8" else FP32_ONNX
    if not (Path(folder) / name).is_file():
        why = ("precision int8 builds from the QDQ graph: quantize first (`edgetl compile RUN --target ...`)"
               if precision == "int8" else "the artifact has no float export")
        raise EdgetlError(f"{Path(folder) / name}: missing", hint=why)
    return name


def get_builder(backend: str):
    if backend not in BUILDERS:
        raise EdgetlError(f"unknown backend {backend!r}", hint=f"known backends: {', '.join(BUILDERS)}")
    return importlib.import_module(BUILDERS[backend])


def fresh_build_dir(ctx: BuildContext) -> Path:
    """A temp folder beside ``builds/<backend>`` (renamed over it by :func:`commit_build_dir`)."""
    tmp = ctx.out_dir.parent / f".{ctx.backend}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_build_dir(ctx: BuildContext, tmp: Path) -> None:
    old = ctx.out_dir.parent / f".{ctx.backend}.old"
    shutil.rmtree(old, ignore_errors=True)
    if ctx.out_dir.exists():
        ctx.out_dir.rename(old)
    tmp.rename(ctx.out_dir)
    shutil.rmtree(old, ignore_errors=True)


def thresholds_for(profile: TargetProfile, speed_check: bool = True, labelled: bool = True):
    """The gate thresholds of ``profile`` in the form ``edgetl.check`` takes.

    ``labelled=False`` (a checkset whose labels are the float model's own predictions): the accuracy
    drop is not measurable, only agreement is gated."""
    from ..check import Thresholds

    g = profile.gate
    return Thresholds(max_drop=g.max_accuracy_drop if labelled else 100.0, min_agreement=g.min_agreement,
                      speed_check=speed_check, min_stability_agreement=g.min_stability_agreement,
                      stability_jpeg_quality=g.stability_jpeg_quality)


def is_labelled(manifest: Manifest) -> bool:
    """False when the artifact's checkset labels are the float model's predictions (no real labels):
    ``quantization.labelled``, or ``training.labelled`` for a float artifact of a model trained elsewhere."""
    for section in (manifest.quantization, manifest.training):
        if section and "labelled" in section:
            return bool(section["labelled"])
    return True


def run_gate(runner: Any, folder: Path, profile: TargetProfile, labels: tuple[str, ...], note: str = "",
             stability: bool = True) -> dict:
    """Accuracy gate of ``runner`` on the artifact's checkset (no speed gate; the stability part when
    ``stability`` and the profile gates it): the summary dict."""
    from .. import check

    manifest = read_manifest(folder)
    th = thresholds_for(profile, speed_check=False, labelled=is_labelled(manifest))
    checkset = check.load_checkset(folder)
    probe = check._probe(folder, checkset, manifest, th) if stability else None
    result = check.evaluate(runner, checkset, th, labels, speed_note=note or "speed not gated here", stability=probe)
    return result.summary()


def build_artifact(folder: str | Path, profile: TargetProfile, backend: str | None = None, gate: bool = True,
                   speed_check: bool = True, progress: Progress = print) -> BuildOutcome:
    """Build ``folder`` for ``profile`` on this machine, gate it, record it in the manifest.

    The gate is ``edgetl.check.check_artifact`` on the new build (accuracy against the checkset with
    the profile's thresholds; speed against the float model on the same backend unless
    ``speed_check`` is off or the build is fp32); it is written into the build entry, report.json/md
    and the manifest (hashes refreshed).
    """
    folder = Path(folder)
    manifest = open_verified(folder, "artifact",
                             hint="compile the run first: edgetl compile RUN --target T --out artifacts/NAME")
    backend = backend or profile.backend
    if backend != profile.backend:
        profile = profile.with_changes(backend=backend)
    profile.check_input_size(manifest.preprocess.input_size, f"the artifact {folder}")
    ctx = BuildContext(folder, manifest, profile, backend, progress, gate)
    outcome = get_builder(backend).build(ctx)
    entry = outcome.entry
    if entry is not None and backend != "tensorrt":
        outcome.notes += cpu_notes(profile, entry)
    builds = [dict(b) for b in manifest.builds if b.get("backend") != backend or outcome.keep_existing]
    if entry is not None:
        builds.insert(0, entry)
    target = profile.to_dict()
    config = folder / "builds" / backend / "build_config.json"
    if config.is_file():
        target["build_config"] = str(config.relative_to(folder))
    from ..check import with_verdict

    seal(folder, with_verdict(manifest.replace(builds=tuple(builds), target=target)))
    if entry is not None and gate:
        from ..check import check_artifact

        th = profile.gate if manifest.task == "detection" else thresholds_for(  # detection: edgetl.detect.gate
            profile, speed_check=speed_check and profile.precision != "fp32", labelled=is_labelled(manifest))
        result = check_artifact(folder, backend, th, update=True, log=progress)
        outcome.gate = entry["gate"] = result.summary()
    return outcome


def cpu_notes(profile: TargetProfile, entry: dict[str, Any]) -> list[str]:
    """Record the CPU class a CPU build was made and gated on (``entry["cpu"]``) and say what it means
    for INT8: where products saturate without VNNI, and where INT8 cannot be expected to be faster."""
    from ..runtime.cpu import host_cpu

    device = str((entry.get("options") or {}).get("device", "CPU"))
    if device.split(".")[0] in ("GPU", "NPU") or profile.precision != "int8":
        return []
    cpu = host_cpu()
    entry["cpu"] = cpu.to_dict()
    if cpu.arch == "x86_64" and "avx2" not in cpu.flags:
        return [f"{cpu.short}: no AVX2, so the INT8 kernels have no fast path here and INT8 may not beat FP32 "
                "(the speed part of the gate measures it)"]
    if not cpu.int8_fast:
        return [f"{cpu.short}: no int8 dot-product instruction (VNNI/AMX/dotprod), so INT8 gains less over FP32 "
                "here than on a VNNI CPU (ELPV Lite0: about 1.3-1.6x vs 2-2.4x)"]
    return []


def profile_from_manifest(manifest: Manifest) -> TargetProfile | None:
    """The resolved profile recorded in an artifact (``manifest.target``), if any."""
    if not manifest.target:
        return None
    data = {k: v for k, v in dict(manifest.target).items() if k != "build_config"}
    return TargetProfile.from_dict(data, source="manifest.json target")
