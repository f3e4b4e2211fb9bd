"""``edgetl build``: (re)build an artifact's backend build on this machine, gate it, record it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def resolve_profile(folder: Path, target: str | None, backend: str | None, precision: str | None,
                    sets: tuple[str, ...]):
    """--target (a name or TOML path) or the profile recorded in the artifact, with overrides."""
    from ..backends import profile_from_manifest
    from ..runtime.errors import EdgetlError
    from ..runtime.manifest import read_manifest
    from ..targets import apply_overrides, load_target

    if target:
        profile = load_target(target)
    else:
        profile = profile_from_manifest(read_manifest(folder))
        if profile is None:
            raise EdgetlError(f"{folder}: the artifact records no target profile",
                              hint="pass one: edgetl build ARTIFACT --target NAME (see `edgetl targets`)")
    return apply_overrides(profile, precision=precision, backend=backend, sets=sets)


def gate_cell(gate: Any) -> str:
    if not isinstance(gate, dict):
        return "not run"
    word = "[green]passed[/]" if gate.get("passed") else "[red]FAILED[/]"
    if gate.get("task") == "detection":
        return word + (f" (mAP@0.5 {100 * gate['float_map50']:.1f} -> {100 * gate['quant_map50']:.1f}, drop "
                       f"{gate['drop']:.2f} pt, detection agreement F1 {gate['agreement']:.3f})")
    bits = []
    if gate.get("drop") is not None:
        bits.append(f"drop {gate['drop']:.2f} pt")
    if gate.get("agreement") is not None:
        bits.append(f"agreement {100 * gate['agreement']:.1f} %")
    st = gate.get("stability") or {}
    if st.get("min_agreement") is not None:
        bits.append(f"stability {100 * st['min_agreement']:.1f} %")
    m = gate.get("margins") or {}
    if m:
        bits.append("margin " + min(((v, k) for k, v in m.items()), key=lambda x: x[0])[1] +
                    f" {min(m.values()):+d} img")
    return word + (f" ({', '.join(bits)})" if bits else "")


def build_table(rows: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title="build", header_style="bold")
    for col in ("backend", "model", "precision", "version", "device", "gate"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in ("backend", "model", "precision", "version", "device")),
                      gate_cell(r.get("gate")))
    return table


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--target", help="Target profile name or TOML path (default: the one recorded in the artifact).")
@click.option("--backend", type=click.Choice(["tensorrt", "openvino", "onnxruntime"]),
              help="Build for this backend instead of the profile's (its options come from the profile).")
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]), help="Override the profile's precision.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a profile key, e.g. tensorrt.dla_core=0 (repeatable).")
@click.option("--no-gate", is_flag=True, help="Skip the accuracy gate (the build is recorded as not gated).")
@click.option("--no-speed-check", is_flag=True,
              help="Do not require the quantized build to be faster than float (toy models).")
def build(artifact: Path, target: str | None, backend: str | None, precision: str | None, sets: tuple[str, ...],
          no_gate: bool, no_speed_check: bool) -> None:
    """Build ARTIFACT for its target on this machine, run the accuracy gate through the build, and
    record backend, version, device, precision and gate in the manifest.

    The normal path on a Jetson: copy the portable artifact (ONNX + checkset + manifest +
    builds/tensorrt/build_config.json) to the device and build the engine there.

    \b
    Examples:
      edgetl build artifacts/elpv-orin                       # on the Jetson: TensorRT engine
      edgetl build artifacts/elpv-ov --target x86-cpu-openvino
      edgetl build artifacts/elpv-orin --set tensorrt.dla_core=0
    """
    from rich.console import Console

    from ..backends import build_artifact

    console = Console()
    profile = resolve_profile(artifact, target, backend, precision, sets)
    console.print(f"[bold]edgetl build[/] {artifact} for [cyan]{profile.name}[/] "
                  f"({profile.backend}, {profile.precision})", soft_wrap=True)
    from ..artifact import update

    with update(artifact, "artifact",
                hint="compile the run first: edgetl compile RUN --target T --out artifacts/NAME") as job:
        outcome = build_artifact(job.path, profile, gate=not no_gate, speed_check=not no_speed_check,
                                 progress=lambda msg: console.print(f"  [dim]·[/] {msg}", soft_wrap=True))
    for note in outcome.notes:
        console.print(f"  note: {note}", soft_wrap=True, markup=False, style="yellow")
    if outcome.entry is not None:
        console.print(build_table([outcome.entry]))
    elif outcome.gate is not None:
        console.print(f"pre-build gate (the same graph in reference numerics: Q/DQ as float ops): "
                      f"{gate_cell(outcome.gate)}")
    raise_if_gate_failed(outcome.gate, f"{artifact}: the {profile.backend} build", artifact)


def raise_if_gate_failed(gate: Any, what: str, artifact: Path) -> None:
    """Exit 1 on a failed gate, with a hint built from what the artifact's quantization tried."""
    from ..backends import GateFailed
    from ..check import next_steps
    from ..runtime.manifest import read_manifest

    if isinstance(gate, dict) and not gate.get("passed"):
        raise GateFailed(f"{what} failed its gate: " + "; ".join(gate.get("failures") or ["see report.md"]),
                         hint="the build is recorded as not deployable; recompile on the host, "
                              + next_steps(gate, read_manifest(artifact).quantization))
