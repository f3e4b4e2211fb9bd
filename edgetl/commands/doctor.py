"""``edgetl doctor``: this machine's Python, packages, CPU class, GPU, OpenCV build and what it can do per target."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON (what edgetl bench records).")
def doctor(as_json: bool) -> int:
    """What this machine has and what it can do with each target profile (no torch needed).

    Python and edgetl versions, the backends installed (ONNX Runtime providers, OpenVINO devices,
    TensorRT), the CPU and the ISA features that decide INT8 numerics and speed (AVX2, AVX-512, VNNI,
    AMX, bf16; ARM dot-product, i8mm), NVIDIA GPUs, what OpenCV was built with (a window, GStreamer,
    FFmpeg, V4L2), and per target whether this machine builds and gates it, only prepares it (TensorRT:
    the engine is built on the device), or cannot (and why).

    \b
    Examples:
      edgetl doctor
      edgetl doctor --json > machine.json
    """
    from ..doctor import report

    r = report()
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return 0
    cpu, cv = r["cpu"], r["opencv"]
    click.echo(f"edgetl {r['edgetl']} on Python {r['python']} ({r['platform']})")
    click.echo(f"CPU: {cpu['model'] or cpu['arch']}, {cpu['cores']} cores, class {cpu['isa_class']}: {cpu['int8_note']}")
    click.echo(f"  INT8-relevant features: {', '.join(cpu['flags']) or 'none found'}; bf16 {'yes' if cpu['bf16'] else 'no'}")
    gpu = r["gpu"]
    click.echo("GPU: " + (("; ".join(gpu["gpus"]) or f"CUDA {gpu['torch_cuda']}") if gpu else "none found"))
    b = r["backends"]
    click.echo("backends: " + "; ".join(
        f"{name} {info['version']}" + (f" ({', '.join(info.get('providers') or info.get('devices') or [])})"
                                       if info.get("providers") or info.get("devices") else "")
        if info else f"{name} not installed" for name, info in b.items()))
    yes = lambda v: "yes" if v else "no"  # noqa: E731
    click.echo(f"OpenCV {cv['version']}: window {yes(cv['gui'])}, GStreamer {yes(cv['gstreamer'])}, "
               f"FFmpeg {yes(cv['ffmpeg'])}, V4L2 {yes(cv['v4l2'])}")
    click.echo("packages: " + ", ".join(f"{k} {v}" for k, v in r["packages"].items()))
    click.echo("targets:")
    width = max(len(t["name"]) for t in r["targets"])
    for t in r["targets"]:
        click.echo(f"  {t['name']:<{width}}  {t['backend']:<11} {t['precision']:<5} {t['here']:<26} {t['why']}")
    return 0
