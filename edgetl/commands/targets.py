"""``edgetl targets``: list the bundled device profiles; ``edgetl targets show`` prints one resolved."""

from __future__ import annotations

import click


@click.group(invoke_without_command=True)
@click.pass_context
def targets(ctx: click.Context) -> None:
    """List the bundled target profiles (one line each), or show one resolved.

    \b
    Examples:
      edgetl targets
      edgetl targets show jetson-agx-orin
      edgetl targets show my-board.toml --set tensorrt.dla_core=0
    """
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    from ..targets import list_targets

    table = Table(box=None, header_style="bold")
    for col in ("name", "backend", "precision", "description"):
        table.add_column(col)
    for t in list_targets():
        table.add_row(t.name, t.backend, t.precision, t.description)
    Console(width=160).print(table)


@targets.command("show")
@click.argument("target")
@click.option("--precision", type=click.Choice(["int8", "fp16", "fp32"]), help="Override the profile's precision.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a profile key, e.g. tensorrt.dla_core=0 (repeatable).")
@click.option("--all", "all_sections", is_flag=True, help="Also print the sections of the other backends.")
def show(target: str, precision: str | None, sets: tuple[str, ...], all_sections: bool) -> None:
    """Print the resolved profile TARGET (a bundled name or a path to your own TOML).

    \b
    Examples:
      edgetl targets show x86-cpu-openvino
      edgetl targets show jetson-nano --precision int8     # refused, with the reason
    """
    from ..targets import apply_overrides, load_target, to_toml

    profile = apply_overrides(load_target(target), precision=precision, sets=sets)
    click.echo(to_toml(profile, all_sections=all_sections), nl=False)
