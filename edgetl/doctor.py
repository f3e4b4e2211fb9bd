"""``edgetl doctor``: what this machine has, and what it can do with each target profile.

Speed and INT8 numerics depend on the CPU class (AVX2, AVX-512 VNNI, AMX, ARM dot-product) and on
the backends installed; a camera pipeline depends on what OpenCV was built with (a window, GStreamer,
FFmpeg, V4L2). This gathers those facts in one place, torch-free (torch is only asked about when it
is installed), as a dict (``--json``) that ``edgetl bench`` also records in ``bench.json``.

For each target: ``build+gate`` (this machine builds the artifact for it and gates the build in the
target's own numerics), ``build+gate (other kernels)`` (an ARM target gated on x86 kernels: re-gate on
the board), ``prepare`` (TensorRT: the build config and the pre-build gate in reference numerics
here, the engine on the device), or ``no`` with the reason (a backend not installed).
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from typing import Any

PACKAGES = ("numpy", "opencv-python-headless", "opencv-python", "onnxruntime", "onnxruntime-gpu", "openvino",
            "tensorrt", "torch", "torchvision", "nncf", "onnx", "pycocotools")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def opencv_facts() -> dict[str, Any]:
    """What OpenCV was built with: a GUI backend (windows), GStreamer, FFmpeg, V4L2."""
    import cv2

    info = cv2.getBuildInformation()

    def flag(name: str) -> bool:
        m = re.search(rf"^\s*{name}:\s*(\S+)", info, re.MULTILINE)
        return bool(m) and m.group(1).upper() not in ("NO", "NONE")

    return {"version": cv2.__version__, "gui": flag("GUI"), "gstreamer": flag("GStreamer"), "ffmpeg": flag("FFMPEG"),
            "v4l2": flag("v4l/v4l2")}


def gpu_facts() -> dict[str, Any] | None:
    """NVIDIA GPUs (nvidia-smi; torch.cuda when torch is installed), else None."""
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.TimeoutExpired):
            pass
    cuda = None
    if _version("torch"):
        try:
            import torch

            cuda = torch.version.cuda if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001 - a broken torch install must not stop the doctor
            cuda = None
    return {"gpus": gpus, "torch_cuda": cuda} if gpus or cuda else None


def backend_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {}
    try:
        import onnxruntime as ort

        facts["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        facts["onnxruntime"] = None
    try:
        import openvino as ov

        facts["openvino"] = {"version": ov.__version__ if hasattr(ov, "__version__") else ov.get_version(),
                             "devices": list(ov.Core().available_devices)}
    except ImportError:
        facts["openvino"] = None
    facts["tensorrt"] = {"version": _version("tensorrt")} if _version("tensorrt") else None
    return facts


def target_verdict(profile: Any, cpu: Any, backends: dict[str, Any]) -> tuple[str, str]:
    """What this machine can do for ``profile``: (``build+gate`` | ``build+gate (other kernels)`` |
    ``prepare`` | ``no``, why)."""
    b = profile.backend
    if b == "tensorrt":
        if backends.get("tensorrt") and gpu_facts():
            return "build+gate", "TensorRT and an NVIDIA GPU are here (the engine is keyed to this GPU)"
        return "prepare", "no TensorRT here: the build config and the pre-build gate (reference numerics); " \
                          "`edgetl build` on the device makes and gates the engine"
    if not backends.get(b):
        extra = "openvino" if b == "openvino" else b
        return "no", f"{b} is not installed (pip install 'edgetl[{extra}]')"
    device = str(profile.options_for(b).get("device", "CPU"))
    if b == "openvino" and device.split(".")[0] not in ("CPU", "AUTO") and \
            not any(d.startswith(device.split(".")[0]) for d in backends["openvino"]["devices"]):
        return "no", f"OpenVINO has no {device} device here (it sees {', '.join(backends['openvino']['devices'])})"
    arch = profile.hardware.cpu_arch
    if arch and arch != cpu.arch:
        return "build+gate (other kernels)", f"the device is {arch}, this CPU {cpu.arch}: INT8 kernels differ, " \
                                             "re-gate on the device (`edgetl check ARTIFACT` there)"
    return "build+gate", f"{b} on this {cpu.isa_class} CPU"


def report() -> dict[str, Any]:
    """Everything ``edgetl doctor`` prints, as a JSON-able dict."""
    from . import __version__
    from .runtime.cpu import host_cpu
    from .targets import list_targets

    cpu = host_cpu()
    backends = backend_facts()
    targets = []
    for p in list_targets():
        verdict, why = target_verdict(p, cpu, backends)
        targets.append({"name": p.name, "backend": p.backend, "precision": p.precision, "here": verdict, "why": why})
    return {"python": sys.version.split()[0], "platform": platform.platform(), "edgetl": __version__,
            "packages": {d: v for d in PACKAGES if (v := _version(d))},
            "cpu": {**cpu.to_dict(), "int8_note": _int8_note(cpu)}, "gpu": gpu_facts(), "backends": backends,
            "opencv": opencv_facts(), "targets": targets}


def _int8_note(cpu: Any) -> str:
    if cpu.arch == "x86_64" and not cpu.int8_exact:
        return ("u8 x s8 products are summed in a saturating int16 (no VNNI): INT8 builds use 7-bit weights, and "
                "INT8 gains less over FP32 than on a VNNI/AMX CPU")
    if cpu.int8_fast:
        return "an int8 dot-product instruction (VNNI, AMX or ARM dotprod): INT8 is exact and fast here"
    return "INT8 sums are exact; no int8 dot-product instruction"


def machine_facts() -> dict[str, Any]:
    """:func:`report` for a record (bench.json, report.json): a fact-finding failure is recorded, never
    allowed to lose the numbers it accompanies."""
    try:
        return report()
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"}
