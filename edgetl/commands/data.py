"""``edgetl data``: write bundled real datasets (classification image folders, detection sets)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def data() -> None:
    """Write a bundled real dataset: ELPV (classification), tree crowns and conveyor scenes (detection).

    \b
    Example:
      edgetl data elpv data/elpv --task binary
      edgetl data trees data/trees
      edgetl data scenes data/cells
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
    from ..runtime.errors import require

    require("edgetl data elpv", "elpv_dataset")
    counts = write_elpv(out, task=task, cell_type=cell_type, overwrite=overwrite)
    total = sum(counts.values())
    click.echo(f"wrote {total} images to {out} ({task}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@data.command("conveyor")
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--split", "split_name", default="test", show_default=True,
              help="Which split of the run the images come from (held-out: test).")
@click.option("--items", default=40, show_default=True, help="How many images pass the camera.")
@click.option("--frames-per-item", default=6, show_default=True)
@click.option("--fps", default=15.0, show_default=True)
@click.option("--size", default="1280x720", show_default=True, help="Frame size WIDTHxHEIGHT.")
@click.option("--seed", default=0, show_default=True, help="Which images, in which order.")
def conveyor(run: Path, out: Path, split_name: str, items: int, frames_per_item: int, fps: float, size: str,
             seed: int) -> None:
    """A "conveyor" video of a run's held-out images passing under a camera (+ a per-frame label CSV).

    \b
    Example:
      edgetl data conveyor runs/elpv demo/conveyor.mp4 --items 40
      edgetl run artifacts/elpv-ov --source demo/conveyor.mp4 --headless
    """
    import random

    from ..conveyor import make_conveyor_video
    from ..runs import SPLIT_FILE, split_samples
    from ..runtime.errors import EdgetlError
    from ..runtime.manifest import read_manifest

    manifest = read_manifest(run)
    if not (run / SPLIT_FILE).exists():
        raise EdgetlError(f"{run / SPLIT_FILE}: missing", hint="pass a run folder written by `edgetl train`")
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise EdgetlError(f"--size {size!r} is not WIDTHxHEIGHT", hint="e.g. --size 1280x720") from None
    samples = split_samples(json.loads((run / SPLIT_FILE).read_text()), split_name, manifest.labels, run)
    random.Random(seed).shuffle(samples)
    chosen = [(s.path, manifest.labels[s.label]) for s in samples[:items]]
    info = make_conveyor_video(chosen, out, fps=fps, frames_per_item=frames_per_item, size=(w, h))
    click.echo(f"wrote {out}: {info['frames']} frames ({info['items']} {split_name} images x {frames_per_item}) "
               f"at {w}x{h}, {fps:g} fps; labels per frame in {out}.labels.csv")


@data.command("trees")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--states/--one-class", default=False, show_default=True,
              help="Keep the Alive/Dead labels of the one image that has them (--states), or label every crown "
                   "Tree (the states exist in a single image: no held-out split could measure them).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if edgetl wrote it.")
def trees(out: Path, states: bool, overwrite: bool) -> None:
    """Hand-labelled tree crowns in NEON aerial images (detection; Pascal VOC), from the deepforest package.

    \b
    Example:
      edgetl data trees data/trees
      edgetl train data/trees --task detect --tile 320 --out runs/trees
    Source: the PyPI package deepforest (Weinstein et al.; MIT licence) ships these images and boxes;
    `make install` installs it without its dependencies (only its data is read).
    """
    from ..detect.trees import write_trees

    info = write_trees(out, overwrite=overwrite, single_class=not states)
    click.echo(f"wrote {out}: " + json.dumps(info, default=str))


@data.command("scenes")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--run", type=click.Path(path_type=Path), default=None,
              help="Take the cells of each split from this classification run's split.json (same held-out cells).")
@click.option("--train-scenes", default=300, show_default=True)
@click.option("--val-scenes", default=60, show_default=True)
@click.option("--test-scenes", default=60, show_default=True)
@click.option("--video-seconds", default=40.0, show_default=True, help="Length of the conveyor video (test cells).")
@click.option("--fps", default=15.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if edgetl wrote it.")
def scenes(out: Path, run: Path | None, train_scenes: int, val_scenes: int, test_scenes: int, video_seconds: float,
           fps: float, seed: int, overwrite: bool) -> None:
    """Conveyor scenes for detection: real ELPV cells laid out on a belt (COCO JSON + a counted video).

    The layout is synthetic; the objects are real ELPV cells (defective / functional). Training scenes
    use training cells only; the video and the test scenes use held-out cells.

    \b
    Example:
      edgetl data scenes data/cells
      edgetl train data/cells --task detect --out runs/cells   # its train/val/test splits as given
    """
    from ..detect.scenes import write_scenes
    from ..runtime.errors import require

    require("edgetl data scenes", "elpv_dataset")
    kw = {"run": run} if run is not None else {}
    info = write_scenes(out, seed=seed, train_scenes=train_scenes, val_scenes=val_scenes, test_scenes=test_scenes,
                        video_seconds=video_seconds, fps=fps, overwrite=overwrite, **kw)
    click.echo(f"wrote {out}: " + json.dumps(info, default=str))
