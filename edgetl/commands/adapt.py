"""``edgetl adapt``: a finished run adapted to images of a new domain, written as a new run folder."""

from __future__ import annotations

from pathlib import Path

import click

from ..train import DEVICES


@click.command(context_settings={"max_content_width": 100})
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--images", required=True, type=click.Path(path_type=Path),
              help="Folder of images of the new domain (recursively; no labels needed).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="The adapted run folder to write.")
@click.option("--labels", type=click.Path(path_type=Path),
              help="A few labelled images of the new domain to fine-tune on: a path,label CSV or a folder with one "
                   "sub-folder per class. Without it only the BatchNorm statistics adapt.")
@click.option("--epochs", type=int, default=10, show_default=True, help="--labels: fine-tuning epochs.")
@click.option("--unfreeze", type=click.Choice(["head", "top"]), default="head", show_default=True,
              help="--labels: what trains: the head, or the head and the backbone's top layer group (at 0.1 x lr).")
@click.option("--bn-stats/--no-bn-stats", "use_adabn", default=True, show_default=True,
              help="Re-estimate the BatchNorm statistics on --images first (AdaBN).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="--labels: head learning rate (AdamW).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Batch of the statistics and fine-tuning.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="--labels: augment as the source run did (its config.toml).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace --out if it is an edgetl folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress or log lines.")
def adapt(run, images, out, labels, epochs, unfreeze, use_adabn, lr, batch_size, augment, seed, device, overwrite,
          quiet) -> None:
    """Adapt RUN to a new domain (another camera, line, lighting, cell type) and write a new run.

    Without --labels: the BatchNorm statistics are re-estimated on --images (AdaBN): no weight
    changes, no labels. With --labels: then the head (or --unfreeze top) is fine-tuned on them.
    The new run keeps RUN's split and records the adaptation in its manifest; compile, check and
    eval take it as any run.

    \b
    Examples:
      edgetl adapt runs/elpv-mono --images data/poly-unlabelled --out runs/elpv-mono-adabn
      edgetl adapt runs/elpv-mono --images data/poly --labels data/poly-20.csv --out runs/elpv-mono-ft
      edgetl eval runs/elpv-mono-adabn data/poly-test
    """
    from ..runtime.errors import require

    require("edgetl adapt", "torch", "safetensors")
    from ..adapt import adapt_run
    from ..train import Reporter

    adapt_run(run, images, out, labels=labels, epochs=epochs, unfreeze=unfreeze, use_adabn=use_adabn, lr=lr,
              batch_size=batch_size, seed=seed, augment=augment, device=device, overwrite=overwrite,
              reporter=Reporter(quiet=quiet))
