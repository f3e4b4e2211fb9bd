"""edgetl train --nproc N: torchrun, DistributedDataParallel on gloo, 2 CPU processes, tiny_cnn at 32x32.

What is decided, and the test that fails when it is decided wrong:
- each rank trains on its shard of one seeded order, so 2 x 8 trains what 1 x 16 does
  (test_two_processes_train_what_one_process_does: a rank on all the data trains what 1 x 8 does,
  which the test shows lands 300x the tolerance away);
- cached features are sharded and gathered, the weighted sampler draws one global order, and
  --scale-lr linear multiplies the learning rates by the processes (the cached test);
- rank 0 checkpoints; a run killed after epoch 1 resumes with 2 processes to the uninterrupted
  run's exact weights, and with 1 process x 16 (the same global batch) to within the tolerance;
  another global batch is refused;
- a failing rank stops the job: one error line, the exit code of the contract, no run folder.

Every launch is a real `python -m edgetl train --nproc 2` in a subprocess (~10 s on 2 busy cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_image_folder

torch = pytest.importorskip("torch")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from edgetl import distributed  # noqa: E402
from edgetl.cli import main  # noqa: E402
from edgetl.runs import load_run, partial_dir  # noqa: E402
from edgetl.runtime.errors import EdgetlError  # noqa: E402
from edgetl.train import train_run  # noqa: E402

CLASSES = ("disc", "stripes", "square")
ROOT = Path(__file__).resolve().parents[1]

# 1 x 16 and 2 x 8 must compute the same thing, so nothing may depend on how the global batch is
# split: BatchNorm frozen (--freeze-bn: fixed statistics, no per-rank batch statistics; tiny_cnn
# has BatchNorm after every convolution), no dropout, no augmentation, plain (unweighted) loss, and
# 48 training images (16 per class), a multiple of 16, so no rank pads its shard with repeats.
EQUIV = dict(backbone="tiny_cnn", pretrained="none", mode="fine-tune", freeze_bn=True, dropout=0.0, augment=False,
             epochs=3, lr=0.01, backbone_lr_factor=1.0, patience=0, warmup_epochs=0.0, num_workers=0,
             channels_last=False)
# What is left is float32 summation order: DDP averages two per-rank batch-mean gradients where one
# process takes one mean of 16, and the convolutions' weight gradients sum in another blocking.
# Measured: at most 3.5e-6 after 9 AdamW steps (lr 0.01), while training moved weights by ~0.03 and
# 1 x 8 (what a rank training on all the data with its batch of 8 computes) lands ~0.07 away.
TOL = 2e-4


def cli_args(opts: dict) -> list[str]:
    args = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        args += ([flag] if v else ["--no-" + flag[2:]]) if isinstance(v, bool) else [flag, str(v)]
    return args


def launch(args: list[str], fault: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # 2 processes on 2 cores
    env.pop(distributed.FAULT_ENV, None)
    if fault:
        env[distributed.FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "edgetl", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def max_diff(a: Path, b: Path, prefix: str = "") -> float:
    sa, sb = load_run(a).model.state_dict(), load_run(b).model.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if k.startswith(prefix))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("ddp") / "images", n_per_class=24, classes=CLASSES)


@pytest.fixture(scope="module")
def two_by_8(folder, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run (2 x 8) of EQUIV."""
    out = tmp_path_factory.mktemp("ddp-runs") / "two"
    r = launch([str(folder), "--out", str(out), "--nproc", "2", "--batch-size", "8", "-q", *cli_args(EQUIV)])
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_two_processes_train_what_one_process_does_with_the_same_global_batch(folder, two_by_8, tmp_path):
    one = train_run(folder, tmp_path / "one", quiet=True, batch_size=16, **EQUIV).out
    assert max_diff(one, two_by_8) <= TOL
    # the comparison decides: one process with batch 8 (a rank that trained on all the data instead
    # of its shard computes exactly this) ends far outside the tolerance, and training moved the weights
    eight = train_run(folder, tmp_path / "eight", quiet=True, batch_size=8, **EQUIV).out
    assert max_diff(one, eight) > 50 * TOL
    h1 = json.loads((one / "metrics.json").read_text())["history"]
    h2 = json.loads((two_by_8 / "metrics.json").read_text())["history"]
    assert [h["train_loss"] for h in h2] == pytest.approx([h["train_loss"] for h in h1], abs=1e-4)
    assert h2[-1]["train_loss"] < h2[0]["train_loss"] - 0.01
    assert [h["val_accuracy"] for h in h2] == [h["val_accuracy"] for h in h1]  # gathered over both ranks
    t = load_run(two_by_8).manifest.training
    assert (t["world_size"], t["backend"], t["sync_bn"], t["batch_size"], t["global_batch"], t["lr_scale"]) == \
        (2, "gloo", False, 8, 16, 1.0)
    assert load_run(one).manifest.training["world_size"] == 1
    assert not partial_dir(two_by_8).exists()


def test_cached_features_weighted_sampler_and_linear_lr_scaling(folder, tmp_path):
    """feature-extract with cached features: sharded over the ranks, gathered; the head trains under
    DDP on one weighted draw (with replacement) of the whole set per epoch; --scale-lr linear: lr x 2."""
    opts = dict(backbone="tiny_cnn", pretrained="none", mode="feature-extract", epochs=4, dropout=0.0,
                balance="sampler", num_workers=0, patience=0)
    one = train_run(folder, tmp_path / "one", quiet=True, batch_size=16, lr=0.1, **opts).out
    out = tmp_path / "two"
    r = launch([str(folder), "--out", str(out), "--nproc", "2", "--batch-size", "8", "--lr", "0.05", "--scale-lr",
                "linear", "--cache-dir", str(tmp_path / "cache"), "-q", *cli_args(opts)])
    assert r.returncode == 0, r.stdout + r.stderr
    # the head alone trains: a linear layer on the same features (float order only; see TOL)
    assert max_diff(one, out, "head.") <= TOL
    assert max_diff(one, out, "backbone.") == 0.0
    assert len(list((tmp_path / "cache").glob("features-tiny_cnn-*.safetensors"))) == 1  # rank 0 wrote it
    t = load_run(out).manifest.training
    assert (t["lr_scale"], t["global_batch"]) == (2.0, 16)
    h1 = json.loads((one / "metrics.json").read_text())["history"]
    h2 = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["lr"] for h in h2] == pytest.approx([h["lr"] for h in h1], rel=1e-9)  # 0.05 x 2 processes = 0.1


def test_an_interrupted_two_process_run_resumes(folder, two_by_8, tmp_path, capsys):
    out = tmp_path / "runs" / "r"
    base = [str(folder), "--out", str(out), "--nproc", "2", "--batch-size", "8", "-q", *cli_args(EQUIV)]
    r = launch(base, fault="1:1:kill")  # rank 1 dies (SIGKILL) once epoch 1's checkpoint is written
    assert r.returncode == 70, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1 of 2 was killed by SIGKILL (out of memory?)"], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert f"edgetl train --resume --out {out} --nproc 2" in r.stderr
    logs = Path(r.stderr.split("the log of every rank is in ")[1].split(";")[0])  # kept for a failure, named
    assert logs.name == "logs" and logs.parent.name.startswith("edgetl-ddp-")
    shutil.rmtree(logs.parent)
    assert not out.exists() and (partial_dir(out) / "checkpoint.pt").is_file()
    assert json.loads((partial_dir(out) / "distributed.json").read_text())["epoch"] == 1

    # another global batch is refused: 1 process x 8 is not the interrupted 2 x 8
    assert main(["train", "--resume", "--out", str(out)]) == 2
    assert "global batch of 16" in capsys.readouterr().err
    # 1 process x 16 keeps it: resumes a copy, to the 2-process result up to float order
    copy = tmp_path / "runs" / "r1"
    shutil.copytree(partial_dir(out), partial_dir(copy))
    train_run(out=copy, resume=True, batch_size=16, quiet=True)
    assert max_diff(copy, two_by_8) <= TOL

    r = launch(["--resume", "--out", str(out), "--nproc", "2", "-q"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert not partial_dir(out).exists()
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2, 3]
    assert max_diff(out, two_by_8) == 0.0  # every rank reseeds per epoch; gloo sums two ranks exactly


def test_one_failing_rank_stops_the_job_with_one_error_line(folder, tmp_path):
    out = tmp_path / "runs" / "x"
    r = launch([str(folder), "--out", str(out), "--nproc", "2", "--batch-size", "8", "-q", *cli_args(EQUIV)],
               fault="1:1:error")  # rank 1 raises an EdgetlError as epoch 1 starts; rank 0 is in its first step
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0] == f"error: rank 1 of 2: fault injected by {distributed.FAULT_ENV} in epoch 1", r.stderr
    assert len(lines) == 2 and lines[1].startswith("  hint:"), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []  # nothing, not even hidden


def test_a_rank_crash_is_one_internal_error_line_with_its_saved_traceback(tmp_path, monkeypatch):
    """What a worker of --nproc does with a bug (in-process: the marker and exit 70), and how the
    launcher picks the first failure among the ranks' markers and the killed ranks."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(distributed.ERRORS_ENV, str(tmp_path / "errors"))
    with pytest.raises(EdgetlError) as exc, distributed.rank_failures(["train"]):
        raise RuntimeError("boom")
    assert exc.value.exit_code == 70 and exc.value.message == "internal error (RuntimeError: boom)"
    saved = exc.value.hint.split("the traceback is saved in ")[1].split(";")[0]
    assert "RuntimeError: boom" in Path(saved).read_text()
    mark = json.loads((tmp_path / "errors" / "rank-1.json").read_text())
    assert (mark["rank"], mark["exit_code"]) == ("1", 70)

    class Failure:
        def __init__(self, exitcode, timestamp=0):
            self.exitcode, self.timestamp = exitcode, timestamp

    (tmp_path / "errors" / "rank-0.json").write_text(json.dumps(
        {"rank": "0", "time": mark["time"] + 1, "message": "peer lost", "hint": None, "exit_code": 70}))
    opts = {"nproc": 2}
    err = distributed.failure_error({0: Failure(70), 1: Failure(70)}, tmp_path / "errors", tmp_path, tmp_path / "o", opts)
    assert (err.message, err.exit_code) == ("rank 1 of 2: internal error (RuntimeError: boom)", 70)  # the earlier one
    err = distributed.failure_error({0: Failure(70), 2: Failure(-9)}, tmp_path / "errors", tmp_path, tmp_path / "o",
                                    opts)
    assert err.message.startswith("rank 2 of 2 was killed by SIGKILL")  # no marker: it died first
    err = distributed.failure_error({3: Failure(1)}, tmp_path / "none", tmp_path, tmp_path / "o", opts)
    assert (err.message, err.exit_code) == ("rank 3 of 2 failed (exit code 1)", 70)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_ranks_batches_make_up_the_single_process_batches(world, weighted):
    """Batch b of every rank together = batch b of one process with world x the batch (n = 10 does
    not divide by 3 or 4: the shards are padded with the order's start, as DistributedSampler does)."""
    n, batch = 10, 2
    weights = [1.0 + (i % 3) for i in range(n)] if weighted else None
    one = distributed.train_sampler(n, distributed.Dist(), seed=7, weights=weights)
    one.set_epoch(3)
    order = list(one)
    assert len(order) == n and (weighted or sorted(order) == list(range(n)))
    shards = []
    for rank in range(world):
        s = distributed.train_sampler(n, distributed.Dist(rank=rank, world_size=world), seed=7, weights=weights)
        s.set_epoch(3)
        shards.append(list(s))
    padded = (order * 2)[: -(-n // world) * world]
    for b in range(-(-len(shards[0]) // batch)):
        together = sorted(i for sh in shards for i in sh[b * batch:(b + 1) * batch])
        assert together == sorted(padded[b * batch * world:(b + 1) * batch * world])
    other = distributed.train_sampler(n, distributed.Dist(), seed=7, weights=weights)
    other.set_epoch(4)
    assert list(other) != order  # the order changes every epoch


def test_bad_distributed_options_are_one_line_errors(folder, tmp_path, capsys):
    out = tmp_path / "o"
    tiny = [str(folder), "--out", str(out), "--backbone", "tiny_cnn", "--pretrained", "none", "--epochs", "1"]
    cases = [
        (["--nnodes", "2"], "--nnodes needs --nproc"),
        (["--nproc", "0"], "must be at least 1"),
        (["--nproc", "2", "--nnodes", "2"], "--nnodes 2 needs --master-addr"),
        (["--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank 2 must be in 0..1"),
        (["--nproc", "2", "--sync-bn", "--device", "cpu"], "--sync-bn needs CUDA"),
        (["--sync-bn", "--device", "cpu"], "--sync-bn needs CUDA"),
        (["--sync-bn", "--freeze-bn"], "nothing to synchronise"),
        (["--scale-lr", "square"], "Invalid value for '--scale-lr'"),
        (["--nproc", "2", "--task", "detect"], "classification only"),
    ]
    for extra, want in cases:
        assert main(["train", *tiny, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert want in err and "Traceback" not in err, (extra, err)
    assert not out.exists() and not partial_dir(out).exists()
    os.environ.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    try:
        assert main(["train", *tiny, "--nproc", "2"]) == 2
        assert "--nproc inside a process torchrun started" in capsys.readouterr().err
    finally:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(k)
