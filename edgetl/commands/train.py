"""``edgetl train``, ``edgetl eval`` and ``edgetl predict``.

Every option of ``train`` is a key of the training config (``--batch-size`` = ``batch_size``);
``--config FILE.toml`` supplies keys, options given on the command line win, and the resolved
config is saved in the run as ``config.toml``. torch is imported only inside the command bodies.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..backbones import REGISTRY
from ..train import BALANCES, DEVICES, MODES, SCALE_LR, SELECTION_METRICS, TrainConfig
from .cv_options import by_option, cv_options, pop_cv_options, run_cv_if_asked, run_eval_by_if_asked

D = TrainConfig()
_RESIZES = ("shorter_crop", "stretch", "letterbox")


def _d(value) -> str:
    return f" [default: {value}]"


@click.command(context_settings={"max_content_width": 100})
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Run folder to write, e.g. runs/NAME.")
@click.option("--task", type=click.Choice(["classify", "detect"]), default="classify", show_default=True,
              help="classify: DATA is class folders or a CSV; detect: DATA is COCO JSON, a YOLO folder "
                   "(images/ + labels/ + class names) or Pascal VOC XML, and the model an SSDLite detector.")
@click.option("--format", "det_format", type=click.Choice(["auto", "coco", "yolo", "voc"]), default=None,
              help="detect: the annotation format. [default: auto]")
@click.option("--tile", type=int, help="detect: cut large images into tiles of this many pixels (aerial, line-scan).")
@click.option("--tile-overlap", type=float, help="detect: overlap of neighbouring tiles, 0..0.9. [default: 0.2]")
@click.option("--score-threshold", type=float, help="detect: the deployed minimum box score. [default: 0.3]")
@click.option("--anchor-scales", help="detect: anchor sizes as fractions of the input side, LO,HI; the log says how "
                                      "many training boxes they cover. [default: torchvision's 0.2,0.95]")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="TOML file of config keys (flat, as in a run's config.toml); command-line options win.")
@click.option("--backbone", "-b", help=f"Backbone: {', '.join(REGISTRY)}." + _d(D.backbone))
@click.option("--mode", "-m", type=click.Choice(MODES), help="What trains." + _d(D.mode))
@click.option("--pretrained", type=click.Choice(["imagenet", "none"]), help="Start weights." + _d(D.pretrained))
@click.option("--weights", type=click.Path(path_type=Path), help="Pretrained backbone weights file (a state dict).")
@click.option("--input-size", help="Input size: 224 or HEIGHTxWIDTH. [default: the backbone's]")
@click.option("--resize", type=click.Choice(_RESIZES),
              help="Resize policy of the preprocessing. [default: the backbone's, shorter_crop]")
@click.option("--epochs", type=int, help="Max epochs. [default: 30 for cached feature-extract, 10 otherwise]")
@click.option("--batch-size", type=int, help="Batch size (per process with --nproc)." + _d(D.batch_size))
@click.option("--lr", type=float, help="Head learning rate (AdamW)." + _d(D.lr))
@click.option("--backbone-lr-factor", type=float,
              help="Backbone LR = head LR x this." + _d(D.backbone_lr_factor) + " (detection: 1.0)")
@click.option("--backbone-lr", type=float, help="Explicit backbone LR (instead of the factor).")
@click.option("--weight-decay", type=float, help="AdamW weight decay (not on biases/norms)." + _d(D.weight_decay))
@click.option("--warmup-epochs", type=float, help="Linear warm-up before the cosine decay." + _d(D.warmup_epochs))
@click.option("--label-smoothing", type=float, help="Label smoothing." + _d(D.label_smoothing))
@click.option("--dropout", type=float, help="Dropout before the head." + _d(D.dropout))
@click.option("--patience", type=int, help="Early stopping: epochs without improvement (0 = off)." + _d(D.patience))
@click.option("--metric", type=click.Choice(SELECTION_METRICS), help="Validation metric that picks the best epoch."
              + _d(D.metric))
@click.option("--balance", type=click.Choice(BALANCES), help="Class-imbalance handling." + _d(D.balance))
@click.option("--unfreeze-every", type=int,
              help="gradual-unfreeze: one more backbone layer group (from the top) every N epochs; the head "
                   "alone for the first N." + _d(D.unfreeze_every))
@click.option("--freeze-bottom", type=int, metavar="K",
              help="fine-tune / gradual-unfreeze: the backbone's bottom K layer groups (stem first) stay frozen: "
                   "ImageNet's low-level features kept, and a CPU step much cheaper (Lite0, K=3: about half the "
                   "time)." + _d(D.freeze_bottom))
@click.option("--freeze-bn/--no-freeze-bn", default=None,
              help="Keep BatchNorm statistics and affine frozen (eval mode) while training. [default: off]")
@click.option("--augment/--no-augment", default=None,
              help="Random augmentation of the decoded training images. [default: on, except cached feature-extract]")
@click.option("--aug-scale", type=float, help="Random resized crop keeps >= this fraction of the area." + _d(D.aug_scale))
@click.option("--aug-hflip", type=float, help="Horizontal flip probability." + _d(D.aug_hflip))
@click.option("--aug-vflip", type=float, help="Vertical flip probability." + _d(D.aug_vflip))
@click.option("--aug-rotate", type=float, help="Max rotation in degrees." + _d(D.aug_rotate))
@click.option("--aug-brightness", type=float, help="Brightness jitter (factor 1 +- x)." + _d(D.aug_brightness))
@click.option("--aug-contrast", type=float, help="Contrast jitter (factor 1 +- x)." + _d(D.aug_contrast))
@click.option("--cache/--no-cache", default=None,
              help="feature-extract: compute backbone features once and train the head on them; --no-cache runs "
                   "the frozen backbone every step (with augmentation). [default: cache]")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="feature-extract: also keep the features on disk here.")
@click.option("--val", type=click.Path(path_type=Path), help="Separate validation folder (one sub-folder per class).")
@click.option("--test", type=click.Path(path_type=Path), help="Separate test folder (one sub-folder per class).")
@click.option("--val-fraction", type=float, help="Stratified validation share, when not given." + _d(D.val_fraction))
@click.option("--test-fraction", type=float, help="Stratified test share, when not given." + _d(D.test_fraction))
@click.option("--split-seed", type=int, help="Seed of the stratified split." + _d(D.split_seed))
@click.option("--seed", type=int, help="Seed of initialisation, shuffling, augmentation, dropout." + _d(D.seed))
@click.option("--device", type=click.Choice(DEVICES), help="cuda uses mixed precision." + _d(D.device))
@click.option("--amp/--no-amp", default=None, help="Mixed precision on CUDA. [default: on]")
@click.option("--channels-last/--no-channels-last", default=None, help="channels_last memory format. [default: on]")
@click.option("--num-workers", type=int, help="DataLoader worker processes. [default: min(2, CPUs - 2): none on 2 cores]")
@click.option("--nproc", type=int,
              help="Train with N processes on this node through torchrun (DistributedDataParallel: NCCL with one GPU "
                   "each on CUDA, gloo on the CPU); --batch-size is per process, the global batch N x it. [default: 1, "
                   "no torchrun]")
@click.option("--nnodes", type=int, help="Several nodes: how many (each runs the same command with its --node-rank).")
@click.option("--node-rank", type=int, help="Several nodes: this node's rank, 0..nnodes-1 (node 0 hosts the rendezvous).")
@click.option("--master-addr", help="Several nodes: the address of node 0, reachable from every node.")
@click.option("--master-port", type=int, help="Several nodes: a free port on node 0. [default: 29500]")
@click.option("--sync-bn/--no-sync-bn", default=None,
              help="SyncBatchNorm across the processes (CUDA/NCCL only: torch's SyncBatchNorm does not run on the CPU). "
                   "[default: off: each process normalises with its own batch]")
@click.option("--scale-lr", type=click.Choice(SCALE_LR),
              help="linear: learning rates x the number of processes (the global batch grows with them)." + _d(D.scale_lr))
@cv_options
@click.option("--resume", is_flag=True, help="Continue the interrupted run of --out (from OUT.partial).")
@click.option("--overwrite", is_flag=True, help="Replace --out (and any interrupted run of it).")
@click.option("--quiet", "-q", is_flag=True, help="No progress or log lines.")
def train(data, out, config_file, resume, overwrite, quiet, **options) -> None:
    """Fine-tune a backbone on DATA and write a run folder.

    DATA is an image folder with one sub-folder per class, a folder laid out as DATA/train,
    DATA/val, DATA/test, or a CSV with path,label columns (paths relative to the CSV).
    Splits not given are drawn stratified (70/15/15) with --split-seed and saved in split.json.

    --nproc N trains with N processes (torchrun, DistributedDataParallel; torchrun ... -m edgetl
    train works too); several nodes add --nnodes, --node-rank and --master-addr (docs/training.md).

    With --task detect, DATA is COCO JSON, a YOLO folder or Pascal VOC XML (a folder of
    train.json/val.json/test.json: those splits as given); the run holds an SSDLite detector on the
    backbone (anchors, post-processing and the split with every box). Detection defaults differ
    from the ones shown: 30 epochs, batch 16, lr 1e-3, backbone x0.1, weight decay 1e-4, patience 10,
    320x320; the split follows --seed (docs/detection.md).

    \b
    Examples:
      edgetl train data/elpv --backbone efficientnet_lite0 --mode feature-extract --out runs/elpv-fe
      edgetl train data/elpv --mode fine-tune --resize stretch --epochs 12 --out runs/elpv-ft
      edgetl train --config runs/elpv-ft/config.toml --epochs 20 --out runs/elpv-ft20
      edgetl train --resume --out runs/elpv-ft          # after Ctrl-C
      edgetl train data/elpv --nproc 4 --batch-size 16 --out runs/elpv-ddp   # 4 GPUs, global batch 64
      edgetl train data/cells --task detect --epochs 20 --out runs/cells
      edgetl train data/trees --task detect --tile 400 --out runs/trees
    """
    from ..runtime.errors import require

    require("edgetl train", "torch", "safetensors", "matplotlib")  # before any work (curves.png is last)
    from ..distributed import LAUNCH_KEYS

    cv_args = pop_cv_options(options)
    task = options.pop("task")
    det = {k: options.pop(k) for k in ("det_format", "tile", "tile_overlap", "score_threshold", "anchor_scales")}
    launch = {k: options.pop(k) for k in LAUNCH_KEYS}
    if task == "detect":
        require("edgetl train --task detect", "pycocotools")
        given = [k for k, v in launch.items() if v is not None]
        if given:
            from ..runtime.errors import EdgetlError

            raise EdgetlError(f"--{given[0].replace('_', '-')}: distributed training is for classification only so far",
                              hint="train the detector in one process (drop the option)")
        return _train_detection(data, out, config_file, resume, overwrite, quiet, det, options)
    given = [k for k, v in det.items() if v is not None]
    if given:
        from ..runtime.errors import EdgetlError

        flag = "--" + given[0].replace("det_format", "format").replace("_", "-")
        raise EdgetlError(f"{flag} is an option of --task detect", hint="add --task detect, or leave it out")
    from ..distributed import planned_world, rank_failures
    from ..train import Reporter, resolve_config, run_training

    cli = {"data": str(data) if data else None, "out": str(out) if out else None,
           **{k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}}
    with rank_failures():  # a worker of --nproc: its failure is reported by the launcher
        world = planned_world(launch)
        cfg = resolve_config(cli, config_file, resume=resume and not cv_args["cv"], world_size=world)
        if run_cv_if_asked(cfg, **cv_args, overwrite=overwrite, quiet=quiet):
            return
        if launch["nproc"] is not None:
            return _launch(cfg, launch, resume, overwrite, quiet)
        run_training(cfg, resume=resume, overwrite=overwrite, reporter=Reporter(quiet=quiet))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _launch(cfg, launch: dict, resume: bool, overwrite: bool, quiet: bool) -> None:
    """``edgetl train --nproc N``: the checks that need no data here, then torchrun runs
    ``python -m edgetl train --config <this resolved config>`` in N processes per node."""
    import tempfile

    from ..distributed import launch as torchrun_launch
    from ..fsutil import check_output_dir
    from ..runs import partial_dir
    from ..runtime.errors import EdgetlError
    from ..train import to_toml

    check_output_dir(Path(cfg.out), overwrite)
    part = partial_dir(cfg.out)
    if not resume and not overwrite and part.exists():
        raise EdgetlError(f"{part}: an interrupted run of {cfg.out} is waiting there",
                          hint=f"continue it with `edgetl train --resume --out {cfg.out} --nproc {launch['nproc']}`, "
                               "or pass --overwrite to start over")
    if cfg.sync_bn and (cfg.device == "cpu" or (cfg.device == "auto" and not _cuda_available())):
        raise EdgetlError("--sync-bn needs CUDA: torch's SyncBatchNorm runs on GPUs (NCCL), not on the CPU (gloo)",
                          hint="drop --sync-bn: each process then normalises with its own batch's statistics")
    with tempfile.TemporaryDirectory(prefix="edgetl-train-config-") as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(to_toml(cfg.to_dict(), "edgetl train --nproc: the resolved config every process trains"))
        worker = ["train", "--config", str(config), "--out", str(cfg.out)]
        worker += ["--resume"] * resume + ["--overwrite"] * overwrite + ["--quiet"] * quiet
        torchrun_launch(worker, launch, cfg.out)


# classification options that mean the same for detection: CLI name -> DetTrainConfig key
_DET_SAME = {"backbone": "backbone", "mode": "mode", "pretrained": "pretrained", "weights": "weights",
             "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "backbone_lr_factor": "backbone_lr_mult",
             "weight_decay": "weight_decay", "warmup_epochs": "warmup_epochs", "patience": "patience",
             "augment": "augment", "unfreeze_every": "unfreeze_every", "val_fraction": "val_fraction",
             "test_fraction": "test_fraction", "seed": "seed", "device": "device", "num_workers": "num_workers"}


def _train_detection(data, out, config_file, resume, overwrite, quiet, det: dict, options: dict) -> None:
    """``edgetl train DATA --task detect``: the SSDLite detector (``edgetl.detect.train``)."""
    import dataclasses

    from ..detect.train import DetTrainConfig, train_detector
    from ..runtime.errors import EdgetlError

    if resume or config_file:
        raise EdgetlError(f"{'--resume' if resume else '--config'} is not available with --task detect yet",
                          hint="give the options on the command line; an interrupted detection run starts again")
    if data is None or out is None:
        raise EdgetlError("edgetl train --task detect needs DATA and --out",
                          hint="e.g. edgetl train data/cells/train.json --task detect --out runs/cells")
    unknown = sorted(k for k, v in options.items() if v is not None and k not in _DET_SAME | {"input_size": 0})
    if unknown:
        raise EdgetlError(f"--{unknown[0].replace('_', '-')} is a classification option, not one of --task detect",
                          hint="see edgetl train --help: the detection options are the backbone, mode, learning "
                               "rates, epochs, batch, split, seed, device, --tile, --score-threshold and "
                               "--anchor-scales")
    kw = {_DET_SAME[k]: (str(v) if isinstance(v, Path) else v) for k, v in options.items()
          if v is not None and k in _DET_SAME}
    if options.get("input_size"):
        size = str(options["input_size"]).lower().replace("x", ",").split(",")
        if len(set(size)) != 1 or not size[0].strip().isdigit():
            raise EdgetlError(f"--input-size {options['input_size']!r}: a detector takes a square input",
                              hint="e.g. --input-size 320")
        kw["input_size"] = int(size[0])
    kw.update({k: v for k, v in det.items() if v is not None and k != "det_format"})
    if det.get("det_format"):
        kw["data_format"] = det["det_format"]
    known = {f.name for f in dataclasses.fields(DetTrainConfig)}
    cfg = DetTrainConfig(**{k: v for k, v in kw.items() if k in known})
    train_detector(data, out, cfg, overwrite=overwrite, progress=(lambda s: None) if quiet else click.echo)


def _eval_detection(run, data, split, out, overwrite, as_json, device) -> None:
    """``edgetl eval`` of a detection run: mAP (per class), class-agnostic mAP and how often a found
    box's class is right, on a split of the run's data or on DATA (COCO / YOLO / VOC)."""
    from ..detect.train import evaluate_images, evaluate_run, load_detection_run, postprocess_spec
    from ..fsutil import atomic_output_dir
    from ..runtime.errors import EdgetlError

    if data is None:
        res = evaluate_run(run, split, device=device)
        where = f"its {split} split"
    else:
        from ..detect.data import read_detection

        manifest, model, _, names = load_detection_run(run)
        ds = read_detection(data)
        if tuple(ds.class_names) != tuple(names):
            raise EdgetlError(f"{data}: classes {list(ds.class_names)} are not the run's {list(names)}",
                              hint="evaluate on data annotated with the run's classes, in the same order")
        post = postprocess_spec(model, manifest_section=manifest.postprocess)
        res = {"data": str(data), **evaluate_images(model, ds.images, manifest.preprocess, post, names)}
        where = str(data)
    if as_json:
        click.echo(json.dumps(res, indent=1, default=float))
    else:
        click.echo(f"{run} on {where}: {res['n_images']} images, {res['n_gt']} boxes: mAP@0.5 {100 * res['map50']:.2f}, "
                   f"mAP@0.5:0.95 {100 * res['map']:.2f}")
        for c in res["per_class"]:
            ap = "-" if c["ap50"] is None else f"{100 * c['ap50']:.2f}"
            click.echo(f"  {c['class']}: AP@0.5 {ap} ({c['n_gt']} boxes)")
        ca = res.get("class_agnostic")
        if ca:
            acc = "-" if ca["class_accuracy"] is None else f"{100 * ca['class_accuracy']:.2f} %"
            where = "chosen on these images: the run stores none" if ca["threshold_chosen_here"] else "the run's"
            click.echo(f"  objects, every class (scored by P(object)): mAP@0.5 {100 * ca['map50']:.2f} (per-class boxes "
                       f"merged: {100 * ca['map50_class_boxes']:.2f}); at score {ca['score_threshold']:.2f} ({where}) "
                       f"{ca['found']} of {ca['n_gt']} boxes found (IoU >= 0.5, F1 {ca['f1']:.3f}), their class right {acc}")
    if out:
        with atomic_output_dir(out, overwrite=overwrite) as d:
            (d / "metrics.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
        if not as_json:
            click.echo(f"wrote {out}/metrics.json")


@click.command("eval", context_settings={"max_content_width": 100})
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True,
              help="Without DATA: evaluate on this split of the run's own data (split.json).")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Also write metrics.json and confusion.png here.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--batch-size", type=int, help="Inference batch. [default: 16 on CPU, 64 on CUDA]")
@click.option("--num-workers", type=int, help="DataLoader worker processes. [default: min(2, CPUs - 2): none on 2 cores]")
@by_option
def eval_cmd(run, data, split, out, overwrite, as_json, device, batch_size, num_workers, by) -> None:
    """Accuracy, macro-F1, per-class recall and the confusion matrix of RUN on DATA (a detection run:
    mAP@0.5, mAP@0.5:0.95, per-class AP, class-agnostic mAP and the class accuracy of found boxes).

    DATA is a labelled folder (one sub-folder per class) or a path,label CSV, preprocessed exactly as
    in training and on the device. Without DATA, the run's own --split is used.

    \b
    Examples:
      edgetl eval runs/elpv-ft data/elpv-new
      edgetl eval runs/elpv-ft --split test --out runs/elpv-ft-eval
    """
    from ..runtime.errors import require

    require("edgetl eval", "torch", "safetensors", *(("matplotlib",) if out else ()))
    if run_eval_by_if_asked(run, data, by, split=split, out=out, overwrite=overwrite, as_json=as_json,
                            device=device, batch_size=batch_size, workers=num_workers):
        return
    from ..runtime.manifest import read_manifest

    if read_manifest(run).task == "detection":
        return _eval_detection(run, data, split, out, overwrite, as_json, device)
    from ..fsutil import atomic_output_dir
    from ..plots import plot_confusion
    from ..train import Reporter, evaluate_run, format_metrics

    res = evaluate_run(run, data, split=split, device=device, batch_size=batch_size, workers=num_workers,
                       reporter=Reporter(quiet=as_json))
    m = res["metrics"]
    labels = list(m["per_class"])
    if as_json:
        click.echo(json.dumps(res, indent=1))
    else:
        skipped = res["data_report"].get("skipped", [])
        click.echo(f"{run} on {res['data']}" + (f" ({len(skipped)} unreadable files skipped)" if skipped else ""))
        for s in skipped[:10]:
            click.echo(f"  skipped {s['path']}: {s['reason']}")
        click.echo(format_metrics(m, labels))
    if out:
        with atomic_output_dir(out, overwrite=overwrite) as d:
            (d / "metrics.json").write_text(json.dumps(res, indent=1) + "\n")
            plot_confusion(m["confusion"], labels, d / "confusion.png", title=f"{Path(run).name} on {Path(res['data']).name}")
        if not as_json:
            click.echo(f"wrote {out}/metrics.json and confusion.png")


@click.command(context_settings={"max_content_width": 100})
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", "-k", type=int, default=1, show_default=True, help="How many labels per image.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines, one per image.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
def predict(run, images, top_k, as_json, device) -> None:
    """Classify IMAGE files (or folders of images) with RUN, preprocessed as on the device.

    \b
    Examples:
      edgetl predict runs/elpv-ft data/elpv/defective/cell0001.png --top-k 2
      edgetl predict runs/elpv-ft some/folder --json
    """
    from ..runtime.errors import EdgetlError, require

    require("edgetl predict", "torch", "safetensors")
    from ..train import predict_images

    preds, bad = predict_images(run, images, top_k=top_k, device=device)
    for p in preds:
        if as_json:
            click.echo(json.dumps(p))
        else:
            click.echo(f"{p['path']}\t" + "\t".join(f"{t['label']} {t['prob']:.3f}" for t in p["top"]))
    for b in bad:
        click.echo(f"skipped {b['path']}: {b['reason']}", err=True)
    if not preds:
        raise EdgetlError("no image could be decoded", hint="pass image files (png, jpg, ...) or folders of them")
