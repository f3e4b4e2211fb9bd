"""``edgetl search``: the most accurate deployable model for a target within a latency / throughput /
size budget (successive halving over backbone x input size x transfer mode, each finalist compiled,
gated and timed on the target's backend)."""

from __future__ import annotations

from pathlib import Path

import click


def _rungs(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter("give the epochs of each rung, e.g. 2,6", param_hint="--rungs") from None


@click.command("search", short_help="The most accurate deployable model within a latency, fps or size budget.")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--target", required=True, help="Target profile name (see `edgetl targets`) or a TOML path.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="The search folder (runs, artifacts, search.json, pareto.png, chosen/). Re-running resumes.")
@click.option("--latency-ms", type=float, help="Budget: frame-to-label p50 latency on the target, in ms.")
@click.option("--fps", type=float, help="Budget: frames per second, one after another (= latency <= 1000/FPS ms).")
@click.option("--max-mb", type=float, help="Budget: the deployed model's size on disk, in MB.")
@click.option("--hours", type=float, help="Time budget: no training starts after it (finalists are still compiled).")
@click.option("--candidates", "candidates_file", type=click.Path(path_type=Path),
              help="A TOML list of [[candidate]] tables (backbone, input_size, mode, screen, training keys) "
                   "instead of the default set; may set rungs, eta and [defaults].")
@click.option("--latency-table", type=click.Path(path_type=Path),
              help="CSV candidate,latency_ms measured on the device (edgetl bench there): used for the "
                   "candidates it names, and the only source for a target this machine cannot run.")
@click.option("--rungs", help="Epochs per rung for fine-tuning, e.g. 2,6 (cached feature-extract: 10x). [default: 2,6]")
@click.option("--eta", type=int, help="Keep the best 1/ETA of the candidates at each rung. [default: 3]")
@click.option("--pretrained", type=click.Choice(["imagenet", "none"]), default="imagenet", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Training device. [default: auto]")
@click.option("--batch-size", type=int, help="Training batch size. [default: 32]")
@click.option("--seed", type=int, help="Training seed. [default: 0]")
@click.option("--split-seed", type=int, help="The data split's seed (the same for every candidate). [default: 0]")
@click.option("--val-fraction", type=float, help="Validation share (the halving's yardstick). [default: 0.15]")
@click.option("--test-fraction", type=float, help="Test share (the artifact's checkset). [default: 0.15]")
@click.option("--method", type=click.Choice(["auto", "ptq", "qat"]),
              help="Quantization of each finalist. [default: the profile's, auto = the repair ladder]")
@click.option("--compile-time-budget", type=float, metavar="SECONDS", help="Cap each finalist's repair ladder.")
@click.option("--calib-min", type=int, help="Fewest calibration images accepted (default 64).")
@click.option("--calib-size", type=int, help="Calibration images (default 300).")
@click.option("--no-speed-check", is_flag=True, help="Do not require INT8 to be faster than float (toy models).")
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]), help="Override the profile's precision.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a profile key (repeatable).")
@click.option("--threads", type=int, default=2, show_default=True, help="Threads of the latency measure.")
@click.option("--reps", type=int, default=100, show_default=True, help="Timed frames per finalist.")
@click.option("--overwrite", is_flag=True, help="Start over in OUT (only an edgetl search folder).")
def search(data: Path, target: str, out: Path, latency_ms: float | None, fps: float | None, max_mb: float | None,
           hours: float | None, candidates_file: Path | None, latency_table: Path | None, rungs: str | None,
           eta: int | None, pretrained: str, device: str | None, batch_size: int | None, seed: int | None,
           split_seed: int | None, val_fraction: float | None, test_fraction: float | None, method: str | None,
           compile_time_budget: float | None, calib_min: int | None, calib_size: int | None, no_speed_check: bool,
           precision: str | None, sets: tuple[str, ...], threads: int, reps: int, overwrite: bool) -> None:
    """Find the most accurate model that is deployable on TARGET within a budget.

    Candidates (backbone x input size x transfer mode; default: EfficientNet-Lite0/1/2 and
    MobileNetV3-Small where their weights are here) are trained by successive halving: every one for
    the first rung's epochs, the best third (--eta) by validation metric for the next rung's, and so
    on. Each finalist is compiled for the target (the repair ladder and the gate, as `edgetl compile`)
    and timed with `edgetl bench`'s frame-to-label measure on the target's backend here; for a
    target this machine cannot run (a Jetson) the latency comes from --latency-table, else it is
    unknown and nothing is chosen by latency. Writes OUT/search.json, OUT/pareto.png and
    OUT/chosen/{run,artifact}; exits 1 when no candidate is deployable within the budget.

    \b
    Examples:
      edgetl search data/elpv --target x86-cpu-openvino --latency-ms 10 --hours 2 --out search/elpv
      edgetl search data/elpv --target jetson-orin-nano --fps 60 --out search/orin
      edgetl search data/elpv --target jetson-orin-nano --fps 60 --latency-table orin.csv --out search/orin
      edgetl search data/elpv --target x86-cpu-onnxruntime --max-mb 5 --candidates mine.toml --out search/x
    """
    from ..runtime.errors import EdgetlError, require

    require("edgetl search", "torch", "onnx", "matplotlib")
    from ..search import Budget, Settings, default_candidates, read_candidates, run_search
    from ..targets import apply_overrides, load_target

    profile = apply_overrides(load_target(target), precision=precision, method=method, sets=sets)
    cands, file_settings = (read_candidates(candidates_file) if candidates_file else (default_candidates(), {}))
    base = {k: v for k, v in (("device", device), ("batch_size", batch_size), ("seed", seed), ("split_seed", split_seed),
                              ("val_fraction", val_fraction), ("test_fraction", test_fraction)) if v is not None}
    overrides = {k: v for k, v in (("calib_min", calib_min), ("calib_size", calib_size)) if v is not None}
    if calib_size is not None:
        overrides["calib_exact"] = True
    if compile_time_budget is not None and not compile_time_budget > 0:
        raise EdgetlError(f"--compile-time-budget {compile_time_budget:g} is not valid", hint="give seconds, > 0")
    file_rungs = file_settings.get("rungs")
    if file_rungs is not None and not isinstance(file_rungs, list):
        raise EdgetlError(f"--candidates {candidates_file}: rungs = {file_rungs!r} is not a list", hint="e.g. rungs = [2, 6]")
    settings = Settings(
        data=str(data), out=out, profile=profile, rungs=_rungs(rungs) or tuple(file_rungs or (2, 6)),
        eta=eta if eta is not None else file_settings.get("eta", 3), pretrained=pretrained, base=base,
        method=method, speed_check=not no_speed_check, compile_overrides=overrides,
        compile_time_budget=compile_time_budget, threads=threads, reps=reps)
    budget = Budget(latency_ms=latency_ms, fps=fps, max_mb=max_mb, hours=hours)
    run_search(settings, cands, budget, latency_table=latency_table, overwrite=overwrite)
