"""``edgetl compile``: a run (or a model trained elsewhere: FP32 ONNX, or a torchvision/timm state dict)
-> a quantized, built, gated artifact for one target."""

from __future__ import annotations

from pathlib import Path

import click


def _floats(text: str | None, what: str, n: int = 3) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        vals = ()
    if len(vals) != n:
        from ..runtime.errors import EdgetlError

        raise EdgetlError(f"{what} {text!r}: give {n} numbers, e.g. \"123.675,116.28,103.53\"")
    return vals


def _spec_from_flags(preprocess: Path | None, input_size: str | None, mean: str | None, std: str | None,
                     resize: str | None, color: str | None, layout: str | None):
    from ..compile import read_preprocess
    from ..runtime.errors import EdgetlError
    from ..runtime.preprocess import PreprocessSpec

    if preprocess is not None:
        spec = read_preprocess(preprocess)
    elif mean is None or std is None:
        raise EdgetlError("a model trained elsewhere needs its preprocessing: --preprocess pre.toml, or at least --mean "
                          "and --std (plus --input-size, --resize, --color, --layout when not the defaults)",
                          hint="the same normalisation the model was trained with; a mismatch silently ruins accuracy")
    else:
        spec = PreprocessSpec()
    changes = {}
    if input_size:
        size = _floats(input_size, "--input-size", 2 if ("," in input_size or " " in input_size) else 1)
        changes["input_size"] = (int(size[0]), int(size[-1]))
    for key, val in (("mean", _floats(mean, "--mean")), ("std", _floats(std, "--std")), ("resize", resize),
                     ("color", color), ("layout", layout)):
        if val is not None:
            changes[key] = val
    return PreprocessSpec.from_dict({**spec.to_dict(), **changes}) if changes else spec


def summary_table(result):
    from rich.table import Table

    from ..runtime.cpu import describe, host_cpu
    from .build import gate_cell

    t = Table(title=f"edgetl compile -> {result.artifact}", header_style="bold", show_lines=False)
    t.add_column("step")
    t.add_column("seconds", justify="right")
    t.add_column("result")
    for row in result.steps:
        t.add_row(row["step"], f"{row['seconds']:.1f}", row["detail"])
    t.add_section()
    p = result.profile
    t.add_row("target", "", f"{p.name}: {p.backend} {p.precision}, method {result.method or 'none'}")
    t.add_row("this CPU", "", describe(host_cpu()))
    if result.artifact_gate is not None:
        t.add_row("reference gate (Q/DQ as float ops, any CPU)", "", gate_cell(result.artifact_gate))
    entry = result.build.entry
    if entry is not None:
        t.add_row(f"{entry['backend']} build gate (deployed, this CPU)", "", gate_cell(entry.get("gate")))
        t.add_row("runs as", "", f"{entry.get('precision')} on {entry.get('device')} ({entry['model']})")
    else:
        t.add_row("pre-build gate (reference numerics)", "", gate_cell(result.build.gate))
        host = (result.build.gate or {}).get("host_kernels")
        if host:
            t.add_row("  host ONNX Runtime kernels (not deciding)", "",
                      f"agreement {100 * host['agreement']:.1f} %, " + (
                          f"mAP@0.5 {100 * host['quant_map50']:.1f}" if "quant_map50" in host  # detection
                          else f"top-1 {100 * host['quant_top1']:.1f} %"))
        t.add_row("engine", "", "built on the device: edgetl build ARTIFACT")
    decided = result.decided_by if entry is not None else "the pre-build gate"
    t.add_row("deployable", "", ("[green]yes[/]" if result.passed else "[red]NO[/] (see report.md)") + f", decided by "
              f"{decided}")
    return t


@click.command("compile")
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.option("--target", required=True, help="Target profile name (see `edgetl targets`) or a TOML path.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The artifact folder to write.")
@click.option("--method", type=click.Choice(["auto", "ptq", "qat"]),
              help="auto: the repair ladder (PTQ with each calibrator + mixed-precision fallback, then QAT) until a "
                   "step passes the gate on the target's own build; ptq/qat: that one step. [default: the profile's, "
                   "auto in the bundled profiles]")
@click.option("--time-budget", type=float, metavar="SECONDS",
              help="Cap the repair ladder: no new step starts after it, and QAT stops its training there.")
@click.option("--weight-range", type=click.Choice(["auto", "full", "reduced"]),
              help="reduced: 7-bit weights (exact on x86 CPUs without VNNI); auto: by the device's CPU. "
                   "[default: the profile's, auto]")
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]), help="Override the profile's precision.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a profile key (repeatable).")
@click.option("--calib-size", type=int, help="Calibration images (default 300).")
@click.option("--calib-min", type=int, help="Fewest calibration images accepted (default 64).")
@click.option("--calibrator", type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
              help="Range calibrator (default: minmax for PTQ, mse for QAT).")
@click.option("--qat-epochs", type=int, help="QAT fine-tuning epochs (default 2).")
@click.option("--qat-max-images", type=int,
              help="Training images per QAT epoch (default: the whole train split). Fewer is faster but may "
                   "miss the gate: on ELPV 640 was enough for one model and not for another.")
@click.option("--qat-perturb", type=float, metavar="SHARE",
              help="Share of QAT images (0..1) moved as the gate's stability part moves the checkset (JPEG, "
                   "brightness) before the float teacher and the quantized student see them: for a model whose "
                   "INT8 passes agreement and fails stability. [default: 0]")
@click.option("--max-fallback-rounds", type=int,
              help="Mixed-precision rounds per step: each keeps the next most sensitive layer in float. [default: 3]")
@click.option("--seek-margin", type=int,
              help="A step that passes closer than this many checkset images to a threshold tries up to 2 more "
                   "fallback rounds and keeps the pass with the largest margin (0: keep the first pass). [default: 2]")
@click.option("--no-speed-check", is_flag=True,
              help="Do not require the quantized model to be faster than float (toy models).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--arch", metavar="LIB:NAME",
              help="[state dict] its architecture: torchvision:NAME (torchvision.models.get_model) or timm:NAME "
                   "(timm.create_model), e.g. torchvision:mobilenet_v2, timm:efficientnet_b0.")
@click.option("--labels", type=click.Path(path_type=Path),
              help="[ONNX/state dict] class names, one per line, in the order of the model's outputs.")
@click.option("--images", type=click.Path(path_type=Path),
              help="[ONNX/state dict] images for calibration and the gate (class sub-folders = labelled).")
@click.option("--preprocess", type=click.Path(path_type=Path), help="[ONNX/state dict] preprocessing TOML.")
@click.option("--input-size", help="[ONNX/state dict] e.g. 224 or 224,224 (height,width).")
@click.option("--mean", help="[ONNX/state dict] per-channel mean in 0..255 units, e.g. 123.675,116.28,103.53.")
@click.option("--std", help="[ONNX/state dict] per-channel std in 0..255 units, e.g. 58.395,57.12,57.375.")
@click.option("--resize", type=click.Choice(["shorter_crop", "stretch", "letterbox"]), help="[ONNX/state dict]")
@click.option("--color", type=click.Choice(["RGB", "BGR"]), help="[ONNX/state dict]")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), help="[ONNX/state dict]")
def compile_cmd(source: Path, target: str, out: Path, method: str | None, time_budget: float | None,
                weight_range: str | None, precision: str | None,
                sets: tuple[str, ...], calib_size: int | None, calib_min: int | None, calibrator: str | None,
                qat_epochs: int | None, qat_max_images: int | None, qat_perturb: float | None,
                max_fallback_rounds: int | None,
                seek_margin: int | None, no_speed_check: bool, overwrite: bool, arch: str | None,
                labels: Path | None, images: Path | None,
                preprocess: Path | None, input_size: str | None, mean: str | None, std: str | None,
                resize: str | None, color: str | None, layout: str | None) -> None:
    """Quantize SOURCE as the target profile says, build it for the target, gate it, and write the
    artifact OUT (in a temp folder, renamed when complete).

    SOURCE is one of:

    \b
    - a run folder from `edgetl train`;
    - an FP32 ONNX classifier trained elsewhere: the method is PTQ (QAT needs the PyTorch model);
    - a state dict trained elsewhere (.pt/.pth read with torch.load(weights_only=True), or
      .safetensors) of a plain torchvision/timm classifier, named with --arch: it is loaded strictly
      into get_model(NAME, num_classes=N) / create_model(NAME, num_classes=N), N = lines of --labels.
      With class sub-folders in --images it is compiled through a temporary run (a seeded train/test
      split of --images), so PTQ and QAT (trained on the train half) work as for an edgetl run.

    A model trained elsewhere needs --labels, --images and its preprocessing (--preprocess TOML, or
    --mean/--std and the other flags). Without class sub-folders in --images the gate checks
    agreement with the float model only (and says so); the method is then PTQ. fp16/fp32 targets
    get the float model (no quantization), built and gated the same way.

    \b
    Examples:
      edgetl compile runs/elpv --target x86-cpu-openvino --out artifacts/elpv-ov
      edgetl compile runs/elpv --target jetson-agx-orin --method qat --out artifacts/elpv-orin
      edgetl compile model.onnx --labels labels.txt --images data/val --mean 123.675,116.28,103.53 \\
          --std 58.395,57.12,57.375 --input-size 224 --target x86-cpu-onnxruntime --out artifacts/mine
      edgetl compile weights.pth --arch torchvision:mobilenet_v2 --labels labels.txt --images data/ \\
          --mean 123.675,116.28,103.53 --std 58.395,57.12,57.375 --input-size 224 \\
          --target x86-cpu-onnxruntime --method qat --out artifacts/mine-qat
      edgetl compile model.onnx --labels labels.txt --images data/val --preprocess pre.toml \\
          --target x86-cpu-onnxruntime --precision fp32 --out artifacts/mine-fp32
    """
    from rich.console import Console

    from ..runtime.errors import EdgetlError, require

    # before any work: an ONNX model needs `onnx` (ONNX Runtime's quantizer too); a run or state dict, torch
    require("edgetl compile", "onnx", *(() if source.suffix.lower() == ".onnx" else ("torch", "safetensors")))
    from ..compile import STATE_DICT_SUFFIXES, compile_run
    from ..targets import apply_overrides, load_target

    console = Console()
    profile = apply_overrides(load_target(target), precision=precision, method=method, sets=sets)
    if time_budget is not None and not time_budget > 0:
        raise EdgetlError(f"--time-budget {time_budget:g} is not valid", hint="give the seconds the repair may take, > 0")
    overrides = {k: v for k, v in (("calib_size", calib_size), ("calib_min", calib_min), ("calibrator", calibrator),
                                   ("qat_epochs", qat_epochs), ("qat_max_images", qat_max_images),
                                   ("qat_perturb", qat_perturb),
                                   ("weight_range", weight_range), ("time_budget", time_budget),
                                   ("max_fallback_rounds", max_fallback_rounds),
                                   ("seek_margin", seek_margin)) if v is not None}
    if calib_size is not None:
        overrides["calib_exact"] = True
    progress = _progress_printer(console)
    console.print(f"[bold]edgetl compile[/] {source} for [cyan]{profile.name}[/] ({profile.backend}, "
                  f"{profile.precision})", soft_wrap=True)
    suffix = source.suffix.lower()
    external = source.is_file() and (suffix == ".onnx" or suffix in STATE_DICT_SUFFIXES)
    if arch is not None and not (source.is_file() and suffix in STATE_DICT_SUFFIXES):
        raise EdgetlError(f"--arch is for a state dict ({', '.join(STATE_DICT_SUFFIXES)}); {source} is not one",
                          hint="a run folder and an ONNX model carry their architecture: drop --arch")
    if external:
        result = _compile_elsewhere(source, arch, labels, images, method, out, profile, not no_speed_check, overwrite,
                                    progress, overrides, (preprocess, input_size, mean, std, resize, color, layout))
    elif source.is_dir():
        result = compile_run(source, out, profile, method, not no_speed_check, overwrite, progress, **overrides)
    else:
        raise EdgetlError(f"{source}: neither a run folder, an .onnx file nor a state dict "
                          f"({', '.join(STATE_DICT_SUFFIXES)})",
                          hint="pass the --out folder of `edgetl train`, an FP32 ONNX classifier, or a state dict "
                               "with --arch")
    for note in result.notes:
        console.print(f"  note: {note}", soft_wrap=True, markup=False, style="yellow")
    console.print(summary_table(result))
    _raise_if_failed(result, out)


def _progress_printer(console):
    """The compile's progress lines: a pipeline step (``[...]``) in bold, the rest indented."""
    def progress(msg: str) -> None:
        if msg.startswith("[") and msg.endswith("]"):
            console.print(msg[1:-1], style="bold", markup=False, soft_wrap=True)
        else:
            console.print(f"  · {msg}", markup=False, soft_wrap=True, highlight=False)
    return progress


def _compile_elsewhere(source: Path, arch: str | None, labels: Path | None, images: Path | None, method: str | None,
                       out: Path, profile, speed_check: bool, overwrite: bool, progress, overrides: dict,
                       flags: tuple):
    """A model trained elsewhere (an ONNX file, or a state dict with --arch): its flags checked, then
    compiled through ``compile_onnx`` / ``compile_external``."""
    from ..compile import compile_external, compile_onnx, read_labels
    from ..runtime.errors import EdgetlError

    suffix = source.suffix.lower()
    what = "an ONNX model" if suffix == ".onnx" else "a state dict"
    if labels is None or images is None:
        raise EdgetlError(f"compiling {what} needs --labels labels.txt and --images DIR",
                          hint="--images: a folder of images for calibration and the gate (one sub-folder per class "
                               "for an accuracy gate)")
    if suffix != ".onnx" and arch is None:
        raise EdgetlError(f"{source}: a state dict needs its architecture: --arch torchvision:NAME or --arch "
                          "timm:NAME", hint="the name the model was built with, e.g. torchvision:mobilenet_v2 "
                                            "or timm:efficientnet_b0")
    if suffix == ".onnx" and method == "qat":
        raise EdgetlError("--method qat needs the PyTorch model (a run folder or a state dict with --arch); "
                          "a bare ONNX model is quantized by PTQ")
    class_names = read_labels(labels)
    spec = _spec_from_flags(*flags)
    if suffix == ".onnx":
        return compile_onnx(source, class_names, spec, images, out, profile, speed_check, overwrite, progress,
                            **overrides)
    return compile_external(source, arch, class_names, spec, images, out, profile, method, speed_check, overwrite,
                            progress, labels_file=labels, **overrides)


def _raise_if_failed(result, out: Path) -> None:
    """Exit 1 (GateFailed) when the gate that decides the artifact failed; it is written either way."""
    if result.passed:
        return
    from ..backends import GateFailed
    from ..check import next_steps
    from ..runtime.manifest import read_manifest

    gate = result.build_gate if result.build.entry is None else result.decisive_gate
    raise GateFailed(f"{out}: {result.decided_by if result.build.entry is not None else 'the pre-build gate'} "
                     "failed its gate: " + "; ".join((gate or {}).get("failures") or ["see report.md"]),
                     hint="the artifact is written and marked not deployable; "
                          + next_steps(gate or {}, read_manifest(out).quantization))
