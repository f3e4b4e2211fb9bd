"""Sections that later commands add to an artifact's ``report.md`` (the gate writes the first part)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .runtime.cpu import describe
from .runtime.manifest import read_manifest, sha256_file, write_manifest

BENCH_BEGIN = "<!-- edgetl bench: begin -->"
BENCH_END = "<!-- edgetl bench: end -->"


def bench_markdown(result: dict[str, Any]) -> str:
    lines = [BENCH_BEGIN, "## Benchmark (`edgetl bench`)", "",
             f"Machine: {result['machine']['processor']}, {result['machine']['cpus']} CPUs"
             f"{', class ' + describe(result['machine']['cpu']) if result['machine'].get('cpu') else ''} (INT8 "
             "speed-ups differ by CPU class: VNNI/AMX sum int8 products in one instruction, AVX2 does not); "
             "threads per backend: "
             f"{result['threads']}; timed frames: {result['frames']}; {result['reps']} batch-1 runs per row in "
             f"{result['rounds']} interleaved rounds. Latency is from a decoded uint8 frame to a label, "
             "preprocessing included.", ""]
    if result.get("busy_warning"):
        lines += [f"**Warning:** {result['busy_warning']}.", ""]
    lines += ["| backend | precision (actual) | p50 ms | p90 ms | preprocess ms | batch-8 img/s | top-1 % | "
              "agreement % | size MB | peak RSS MB |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"].values():
        thr = next((v for k, v in r.items() if k.startswith("throughput_")), None)
        lines.append(f"| {r['label']} | {r['precision']} | {r['latency_p50_ms']:.2f} | {r['latency_p90_ms']:.2f} | "
                     f"{r['preprocess_p50_ms']:.2f} | {thr:.0f} | {100 * r['top1']:.2f} | {100 * r['agreement']:.2f} | "
                     f"{r['size_mb']:.1f} | {r['peak_rss_mb'] or 0:.0f} |")
    if result["skipped"]:
        lines += ["", "Not run here:"] + [f"- {k}: {v}" for k, v in result["skipped"].items()]
    sp = result["speedups"]
    if sp:
        lines += ["", "Speed-ups (p50 ratios from this run): " + ", ".join(
            f"{k.replace('_', ' ')} **{v:.2f}x**" for k, v in sp.items() if isinstance(v, float)) + "."]
    lines += ["", "![benchmark](bench.png)", BENCH_END, ""]
    return "\n".join(lines)


def append_bench_section(artifact: Path, result: dict[str, Any]) -> None:
    """Put (or replace) the benchmark section in report.md and keep the manifest's hashes true."""
    report = artifact / "report.md"
    text = report.read_text() if report.exists() else "# edgetl artifact report\n"
    if BENCH_BEGIN in text and BENCH_END in text:
        head, rest = text.split(BENCH_BEGIN, 1)
        tail = rest.split(BENCH_END, 1)[1].lstrip("\n")
        text = head.rstrip() + "\n\n" + bench_markdown(result) + tail
    else:
        text = text.rstrip() + "\n\n" + bench_markdown(result)
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(report)
    manifest = read_manifest(artifact)
    files = dict(manifest.files)
    changed = False
    for name in ("report.md", "bench.json", "bench.png"):
        if name in files:
            files[name] = sha256_file(artifact / name)
            changed = True
    if changed:
        write_manifest(manifest.replace(files=files), artifact)
