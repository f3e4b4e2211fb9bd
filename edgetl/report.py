"""Sections that later commands add to an artifact's ``report.md`` (the gate writes the first part)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .runtime.cpu import describe
from .runtime.manifest import atomic_write, read_manifest, seal

BENCH_BEGIN = "<!-- edgetl bench: begin -->"
BENCH_END = "<!-- edgetl bench: end -->"


def _latency_text(result: dict[str, Any]) -> str:
    """What the latency spans (and, for a detector, what its quality columns are)."""
    det = result.get("detection")
    if result.get("task") != "detection":
        return "Latency is from a decoded uint8 frame to a label, preprocessing included."
    size = ", ".join(result.get("frame_sizes") or []) or "?"
    return (f"Latency is from a decoded uint8 frame ({size}) to boxes in frame pixels: preprocessing, inference "
            f"(every output) and post-processing (decoding, score threshold {det['score_threshold']:g}, NMS, boxes "
            "mapped to the frame); the p50 of each part is shown too. mAP@0.5 and mAP@0.5:0.95 on the checkset's "
            f"{det['n']} held-out images ({det['n_gt']} ground-truth "
            f"boxes; detections at score >= {det['map_score_threshold']:g}, pycocotools); agreement is the detection "
            "F1 against the float model's stored outputs at the deployed score threshold (same class, IoU >= 0.5). "
            f"The float model: mAP@0.5 {100 * det['float_map50']:.2f}, mAP@0.5:0.95 {100 * det['float_map']:.2f}.")


def bench_markdown(result: dict[str, Any]) -> str:
    from .bench import metric_columns

    cols = metric_columns(result)
    lines = [BENCH_BEGIN, "## Benchmark (`edgetl bench`)", "",
             f"Machine: {result['machine']['processor']}, {result['machine']['cpus']} CPUs"
             f"{', class ' + describe(result['machine']['cpu']) if result['machine'].get('cpu') else ''} (INT8 "
             "speed-ups differ by CPU class: VNNI/AMX sum int8 products in one instruction, AVX2 does not); "
             "threads per backend: "
             f"{result['threads']}; timed frames: {result['frames']}; {result['reps']} batch-1 runs per row in "
             f"{result['rounds']} interleaved rounds. " + _latency_text(result), ""]
    if result.get("busy_warning"):
        lines += [f"**Warning:** {result['busy_warning']}.", ""]
    lines += ["| backend | precision (actual) | p50 ms | p90 ms | preprocess ms | " + " | ".join(c[1] for c in cols)
              + " | size MB | peak RSS MB |", "| --- | --- |" + " ---: |" * (5 + len(cols))]
    for r in result["rows"].values():
        failed = " (**gate FAILED: not deployable**)" if r.get("gate") == "FAILED" else ""
        lines.append(f"| {r['label']} | {r['precision']}{failed} | {r['latency_p50_ms']:.2f} | {r['latency_p90_ms']:.2f} | "
                     f"{r['preprocess_p50_ms']:.2f} | " + " | ".join(c[2](r) for c in cols)
                     + f" | {r['size_mb']:.1f} | {r['peak_rss_mb'] or 0:.0f} |")
    if result["skipped"]:
        lines += ["", "Not run here:"] + [f"- {k}: {v}" for k, v in result["skipped"].items()]
    sp = result["speedups"]
    if sp:
        lines += ["", "Speed-ups (p50 ratios from this run): " + ", ".join(
            f"{k.replace('_', ' ')} **{v:.2f}x**" for k, v in sp.items() if isinstance(v, float)) + "."]
    lines += ["", "![benchmark](bench.png)", BENCH_END, ""]
    return "\n".join(lines)


def _bench_section(text: str) -> str | None:
    if BENCH_BEGIN in text and BENCH_END in text:
        return BENCH_BEGIN + text.split(BENCH_BEGIN, 1)[1].split(BENCH_END, 1)[0] + BENCH_END + "\n"
    return None


def keep_bench_section(report: Path, text: str) -> str:
    """``text`` (a new report.md) with the benchmark section of the current ``report`` carried over:
    re-running the gate does not erase the last benchmark."""
    try:
        old = report.read_text(encoding="utf-8") if report.is_file() and not report.is_symlink() else ""
    except (OSError, UnicodeDecodeError):
        old = ""
    section = _bench_section(old)
    if section is None or _bench_section(text) is not None:
        return text
    return text.rstrip() + "\n\n" + section


def append_bench_section(artifact: Path, result: dict[str, Any]) -> None:
    """Put (or replace) the benchmark section in report.md and seal the folder (bench.json and
    bench.png are listed in the manifest with report.md). Run inside ``edgetl.artifact.update``."""
    report = artifact / "report.md"
    text = report.read_text(encoding="utf-8") if report.is_file() else "# edgetl artifact report\n"
    if _bench_section(text) is not None:
        head, rest = text.split(BENCH_BEGIN, 1)
        tail = rest.split(BENCH_END, 1)[1].lstrip("\n")
        text = head.rstrip() + "\n\n" + bench_markdown(result) + tail
    else:
        text = text.rstrip() + "\n\n" + bench_markdown(result)
    atomic_write(report, text)
    seal(artifact, read_manifest(artifact))
