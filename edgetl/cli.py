"""The ``edgetl`` command line. Commands live in ``edgetl/commands/`` and are imported lazily,
so ``edgetl --help`` and ``edgetl run`` never import torch."""

from __future__ import annotations

import importlib
import sys

import click

from .runtime.errors import EdgetlError

# name -> "module:attribute" of a click command. Order = order in `edgetl --help`.
COMMANDS: dict[str, str] = {
    "data": "edgetl.commands.data:data",
    "train": "edgetl.commands.train:train",
    "eval": "edgetl.commands.train:eval_cmd",
    "predict": "edgetl.commands.train:predict",
    "quantize": "edgetl.commands.quantize:quantize",
    "check": "edgetl.commands.check:check",
    "run": "edgetl.commands.run:run",
    "targets": "edgetl.commands.targets:targets",
    "compile": "edgetl.commands.compile:compile_cmd",
    "build": "edgetl.commands.build:build",
    "bench": "edgetl.commands.bench:bench",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            try:
                cmd = self.get_command(ctx, name)
            except ImportError:  # a command whose module is not there yet is left out
                continue
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=70)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edgetl")
def cli() -> None:
    """edgetl: fine-tune, quantize, compile and run image classifiers on edge devices.

    \b
    A typical session:
      edgetl data elpv data/elpv                          # or bring your own image folder
      edgetl train data/elpv --backbone efficientnet_lite0 --out runs/elpv
      edgetl compile runs/elpv --target x86-cpu-openvino --out artifacts/elpv-ov
      edgetl run artifacts/elpv-ov --source 0              # camera, video, rtsp://, csi://, gst:
    """


def main(argv: list[str] | None = None) -> int:
    try:
        rv = cli.main(args=argv, prog_name="edgetl", standalone_mode=False)
    except EdgetlError as exc:
        click.secho(f"error: {exc.message}", fg="red", err=True)
        if exc.hint:
            click.echo(f"  hint: {exc.hint}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
