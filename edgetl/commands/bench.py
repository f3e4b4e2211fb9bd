"""``edgetl bench``: side-by-side latency, throughput, accuracy (or mAP), size and memory of every backend."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..bench import ALL_ROWS, COMPARE_ROWS


def _rows(value: str | None) -> tuple[str, ...]:
    if not value:
        return ALL_ROWS
    rows = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [r for r in rows if r not in ALL_ROWS]
    if bad:
        raise click.BadParameter(f"unknown row(s) {bad}; choose from {', '.join(ALL_ROWS)}", param_hint="--backends")
    return rows


def _size(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter("use WIDTHxHEIGHT, e.g. 1280x720", param_hint="--frame-size") from None
    return w, h


@click.command()
@click.argument("artifacts", metavar="ARTIFACT [ARTIFACT...]", nargs=-1, required=True,
                type=click.Path(path_type=Path))
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="The float run: the PyTorch eager rows, and its held-out test images as the timed frames. "
                   "Without it those rows are skipped and the frames are generated (1280x720 or --frame-size).")
@click.option("--backends", default=None, help=f"Comma-separated rows to run (default all; with several artifacts: "
                                               f"{','.join(COMPARE_ROWS)}): {', '.join(ALL_ROWS)}.")
@click.option("--threads", default=2, show_default=True, help="Threads for every backend (fixed, recorded).")
@click.option("--reps", default=200, show_default=True, help="Timed batch-1 runs per row.")
@click.option("--rounds", default=5, show_default=True, help="Interleaved rounds the reps are split into.")
@click.option("--frame-size", default=None, help="Resize the timed frames to WIDTHxHEIGHT (e.g. 1280x720).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Where bench.json and bench.png go (default: the artifact, whose report.md gains the table; "
                   "required with several artifacts).")
def bench(artifacts: tuple[Path, ...], run_dir: Path | None, backends: str | None, threads: int, reps: int,
          rounds: int, frame_size: str | None, out_dir: Path | None) -> None:
    """Benchmark an artifact on every backend available here, side by side in one run; or several
    artifacts (models) against each other.

    Latency is batch-1 from a decoded uint8 frame to a label (preprocessing included); accuracy and
    agreement are on the artifact's checkset of real held-out images. For a detection artifact the
    latency ends at boxes in frame pixels (decoding, score threshold and NMS included; the p50 of
    preprocess / inference / post-processing shown) and the quality is mAP@0.5, mAP@0.5:0.95 and
    detection agreement (F1 vs the float model). Rows that cannot run here are listed with the reason.

    With several artifacts the same rows of each (default: the INT8 builds) are timed in the same
    interleaved rounds on the same frames, so the ratios between the models come from one machine
    state; each row keeps its own artifact's accuracy and gate. The artifacts are only read.

    \b
    Example:
      edgetl bench artifacts/elpv-ov --threads 2
      edgetl bench artifacts/elpv-ov --backends torch-channels-last,ov-f32,ov-int8 --frame-size 1280x720
      edgetl bench artifacts/lite0-ov artifacts/lite2-ov --backends ov-int8 --out bench/lite0-vs-lite2
    """
    if len(artifacts) > 1:
        return _compare(artifacts, run_dir, backends, threads, reps, rounds, frame_size, out_dir)
    from rich.console import Console

    from ..bench import run_bench
    from ..report import append_bench_section

    artifact = artifacts[0]
    console = Console(stderr=True)
    rows = _rows(backends)
    if out_dir is not None:  # the artifact is only read
        with console.status("benchmarking") as status:
            result = run_bench(artifact, run=run_dir, rows=rows, threads=threads, reps=reps, rounds=rounds,
                               frame_size=_size(frame_size), progress=lambda s: status.update(s))
        _report(result)
        _write(result, out_dir)
        click.echo(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")
        return
    from ..artifact import update

    # one transaction: bench.json, bench.png and report.md join the artifact (listed and hashed) or nothing does
    with update(artifact, "artifact", hint="pass the --out folder of `edgetl compile` or `edgetl quantize`") as job:
        with console.status("benchmarking") as status:
            result = run_bench(job.path, run=run_dir, rows=rows, threads=threads, reps=reps, rounds=rounds,
                               frame_size=_size(frame_size), progress=lambda s: status.update(s))
        result["artifact"] = str(artifact)  # measured on the private copy: name the artifact itself
        _report(result)
        _write(result, job.path)
        append_bench_section(job.path, result)
    click.echo(f"wrote {artifact / 'bench.json'} and {artifact / 'bench.png'}")


def _compare(artifacts: tuple[Path, ...], run_dir: Path | None, backends: str | None, threads: int, reps: int,
             rounds: int, frame_size: str | None, out_dir: Path | None) -> None:
    """Several artifacts side by side (``bench.run_compare``), written to --out only."""
    from rich.console import Console

    from ..bench import run_compare

    if run_dir is not None:
        raise click.UsageError("--run names the float run of one artifact: with several artifacts there is no "
                               "eager row and the timed frames are generated (drop --run)")
    if out_dir is None:
        raise click.UsageError(f"comparing {len(artifacts)} artifacts writes bench.json and bench.png to a new "
                               "folder: pass --out DIR")
    rows = _rows(backends) if backends else COMPARE_ROWS
    size = _size(frame_size)
    with Console(stderr=True).status("benchmarking") as status:
        result = run_compare(list(artifacts), rows=rows, threads=threads, reps=reps, rounds=rounds,
                             frame_size=size, progress=lambda s: status.update(s))
    _report(result)
    if result["relative"]:
        click.echo("p50 relative to the first artifact's same row (same run): " + ", ".join(
            f"{k} {v:.2f}x" for k, v in result["relative"].items()))
    _write(result, out_dir)
    click.echo(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.png'}")


def _report(result: dict) -> None:
    from rich.console import Console

    from ..bench import render_table

    Console(width=max(140, Console().width)).print(render_table(result))
    if result.get("busy_warning"):
        click.secho("warning: " + result["busy_warning"], fg="yellow", err=True)
    sp = result["speedups"]
    if sp:
        click.echo("speed-ups (p50, same run): " + ", ".join(
            f"{k} {v:.2f}x" for k, v in sp.items() if isinstance(v, float)))


def _write(result: dict, out: Path) -> None:
    from ..bench import write_chart
    from ..runtime.manifest import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bench.json", json.dumps(result, indent=2) + "\n")
    write_chart(result, out / "bench.png")
