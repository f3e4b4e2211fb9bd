"""The CPU features that decide INT8 numerics and speed, read from the machine (torch-free).

INT8 on a CPU is a matter of one instruction: how the u8 x s8 products of a convolution are summed.

* x86 without VNNI (AVX2, or AVX-512 before Cascade Lake / Zen 4): ``vpmaddubsw`` adds two u8 x s8
  products into a *saturating* int16. With 8-bit weights a pair of products can exceed 32767, so the
  INT8 model computes something else than its QDQ graph says, and what it computes depends on the
  kernel (ONNX Runtime's and oneDNN's differ). 7-bit weights (``|w| <= 64``: 2 x 255 x 64 = 32640)
  keep every sum exact; ONNX Runtime's ``reduce_range`` and NNCF's ``OverflowFix`` do exactly this.
* x86 with VNNI (AVX-512 VNNI, AVX-VNNI) or AMX: ``vpdpbusd`` / tile multiplies accumulate into int32:
  exact, and 2-4x the FP32 throughput.
* ARM: NEON widens products before it adds them (exact); ``dotprod`` (``sdot``/``udot``, ARMv8.2)
  and ``i8mm`` (ARMv8.6) make INT8 fast.

:func:`host_cpu` reads ``/proc/cpuinfo`` (Linux; elsewhere the class is "unknown" and nothing is
assumed). :func:`classify` is pure, so tests and target profiles can name a CPU by its flags.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

# the flags that matter, as /proc/cpuinfo spells them
X86_FLAGS = ("sse4_1", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
             "amx_int8", "amx_bf16")
ARM_FLAGS = ("asimd", "asimddp", "i8mm", "bf16", "sve", "asimdhp")


@dataclass(frozen=True)
class CpuInfo:
    arch: str  # x86_64 | aarch64 | ...
    model: str  # the marketing name ("AMD EPYC 7B13", "Cortex-A78AE" ...), "" when unknown
    flags: tuple[str, ...]  # the features among X86_FLAGS / ARM_FLAGS it has
    isa_class: str  # e.g. "x86 AVX2 (no VNNI)", "x86 AVX-512 VNNI", "x86 AMX", "arm64 dotprod"
    int8_exact: bool  # u8 x s8 products are summed without saturation (VNNI/AMX, or any ARM)
    int8_fast: bool  # a dot-product instruction for int8 (VNNI, AMX, ARM dotprod/i8mm)
    bf16: bool  # native bf16 (OpenVINO's CPU plugin then runs float layers in bf16 by default)
    cores: int

    @property
    def short(self) -> str:
        """One line for tables and summaries: the class, and the model when known."""
        return f"{self.isa_class}" + (f", {self.model}" if self.model else "")

    @property
    def slug(self) -> str:
        """The class as a file-name part, e.g. ``x86-avx2-no-vnni`` (benchmarks/results/*_<slug>.json)."""
        return class_slug(self.isa_class)

    @property
    def weight_range(self) -> str:
        """The weight range INT8 needs on this CPU: "reduced" (7-bit) where u8 x s8 sums saturate."""
        return "full" if self.int8_exact else "reduced"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"] = list(self.flags)
        return d


def class_slug(isa_class: str) -> str:
    """``"x86 AVX2 (no VNNI)"`` -> ``"x86-avx2-no-vnni"``: a CPU class in file names."""
    return re.sub(r"[^a-z0-9]+", "-", isa_class.lower()).strip("-")


def classify(arch: str, flags: Iterable[str], model: str = "", cores: int = 0) -> CpuInfo:
    """The INT8 class of a CPU from its architecture and its ``/proc/cpuinfo`` flags."""
    arch = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(arch.lower(), arch.lower())
    have = set(flags)
    if arch == "x86_64":
        kept = tuple(f for f in X86_FLAGS if f in have)
        bf16 = bool(have & {"avx512_bf16", "amx_bf16"})
        if "amx_int8" in have:
            cls, exact, fast = "x86 AMX", True, True
        elif "avx512_vnni" in have:
            cls, exact, fast = "x86 AVX-512 VNNI", True, True
        elif "avx_vnni" in have:
            cls, exact, fast = "x86 AVX2 + AVX-VNNI", True, True
        elif "avx512bw" in have:
            cls, exact, fast = "x86 AVX-512 (no VNNI)", False, False
        elif "avx2" in have:
            cls, exact, fast = "x86 AVX2 (no VNNI)", False, False
        else:
            cls, exact, fast = "x86 SSE (no AVX2)", False, False
        if bf16 and "AMX" not in cls:
            cls += " + BF16"
        return CpuInfo(arch, model, kept, cls, exact, fast, bf16, cores)
    if arch == "aarch64":
        kept = tuple(f for f in ARM_FLAGS if f in have)
        if "i8mm" in have:
            cls, fast = "arm64 i8mm + dotprod", True
        elif "asimddp" in have:
            cls, fast = "arm64 dotprod", True
        else:
            cls, fast = "arm64 NEON (no dotprod)", False
        return CpuInfo(arch, model, kept, cls, True, fast, "bf16" in have, cores)
    return CpuInfo(arch or "unknown", model, tuple(sorted(have)), f"{arch or 'unknown'} (INT8 class unknown)", True,
                   False, False, cores)


def parse_cpuinfo(text: str) -> tuple[set[str], str]:
    """``(flags, model name)`` from the text of ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``)."""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
    return flags, model


@lru_cache(maxsize=1)
def host_cpu() -> CpuInfo:
    """This machine's CPU (cached). Off Linux the flags are unknown: class "unknown", nothing assumed."""
    arch = platform.machine()
    text = ""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        pass
    flags, model = parse_cpuinfo(text)
    if not flags and arch.lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        return CpuInfo(arch, model or platform.processor(), (), f"{arch} (flags unreadable: INT8 class unknown)",
                       True, False, False, os.cpu_count() or 0)
    return classify(arch, flags, model, os.cpu_count() or 0)


def describe(info: CpuInfo | Mapping[str, Any] | None) -> str:
    """The one-line class of a CpuInfo or of its dict as recorded in a manifest/report ("" for None)."""
    if info is None:
        return ""
    if isinstance(info, CpuInfo):
        return info.short
    cls, model = info.get("isa_class", "?"), info.get("model", "")
    return f"{cls}" + (f", {model}" if model else "")


def same_int8_numerics(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two recorded CPUs run INT8 kernels of the same kind (so a deployed verdict carries over)."""
    if not a or not b:
        return False
    return a.get("arch") == b.get("arch") and a.get("isa_class") == b.get("isa_class")


__all__ = ["CpuInfo", "classify", "describe", "host_cpu", "parse_cpuinfo", "same_int8_numerics"]
