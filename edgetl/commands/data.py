"""``edgetl data``: write bundled real datasets as image folders."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def data() -> None:
    """Write a bundled real dataset as an image folder (one sub-folder per class).

    \b
    Example:
      edgetl data elpv data/elpv --task binary
    """


@data.command("elpv")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--task", type=click.Choice(["binary", "4class"]), default="binary", show_default=True,
              help="binary: defect probability >= 0.5 vs < 0.5; 4class: the four annotated probabilities.")
@click.option("--cell-type", type=click.Choice(["all", "mono", "poly"]), default="all", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def elpv(out: Path, task: str, cell_type: str, overwrite: bool) -> None:
    """The ELPV solar-cell electroluminescence dataset (2,624 cells, 300x300 grayscale).

    \b
    Example:
      edgetl data elpv data/elpv --task binary
    Source: PyPI elpv-dataset (Buerhop-Lutz et al. 2018; Deitsch et al. 2019), installed with edgetl[train].
    """
    from ..datasets import write_elpv

    counts = write_elpv(out, task=task, cell_type=cell_type, overwrite=overwrite)
    total = sum(counts.values())
    click.echo(f"wrote {total} images to {out} ({task}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
