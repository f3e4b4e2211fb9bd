"""Distributed fine-tuning: ``edgetl train DATA --nproc N`` and ``torchrun ... -m edgetl train``.

Two halves:

* **the worker** (every process torchrun starts): :func:`setup` reads torchrun's environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins the process group — NCCL with one GPU per
  local rank on CUDA, gloo on the CPU. :class:`Dist` holds the few collectives training needs
  (sums, the rank-0 decision broadcast, gathering sharded rows, BatchNorm buffers from rank 0) and
  wraps the model in DistributedDataParallel. Without torchrun's variables it is the one process
  (world size 1) and every collective is the identity, so one code path trains both ways.
* **the launcher** (:func:`launch`): ``--nproc`` runs torchrun's own launcher
  (``torch.distributed.run``: standalone rendezvous on one node, static rendezvous across nodes)
  on ``python -m edgetl train --config <resolved config>``. Each worker's stderr goes to a log
  file; a failing worker leaves a small marker (its one-line error, exit code and the time) so the
  launcher can name the rank that failed *first* (the others then fail on a lost peer, or are
  stopped by torchrun) in one ``error:`` line with the exit code of the contract (2 bad input,
  70 internal error or a killed process; 130/143 when interrupted).

Sharding keeps the single-process semantics: each epoch's order is one permutation (or weighted
draw) of the whole training set, seeded by ``seed + epoch`` and cut ``order[rank::world]`` (torch's
``DistributedSampler``), so the union of the ranks' b-th batches is exactly the b-th batch of one
process with ``world x batch_size`` — the global batch. torch is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from .runtime.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EdgetlError, Terminated

ERRORS_ENV = "EDGETL_DDP_ERRORS"  # set by the launcher: where a failing worker leaves its marker
FAULT_ENV = "EDGETL_DDP_FAULT"  # tests only: "RANK:EPOCH:error|crash|kill"
LAUNCH_FILE = "distributed.json"  # beside the resumable checkpoint: world size and batch of the interrupted run


class DistributedError(EdgetlError):
    """A worker of a distributed run failed; ``exit_code`` is the one the contract gives its failure."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = EXIT_INTERNAL):
        super().__init__(message, hint)
        self.exit_code = exit_code


# ------------------------------------------------------------------------------------------
# the worker's side
# ------------------------------------------------------------------------------------------

def env_world() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when torchrun (or any launcher setting its variables)
    started this process, else None."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not all(os.environ.get(n) for n in names):
        return None
    try:
        rank, world, local = (int(os.environ[n]) for n in names)
    except ValueError:
        raise EdgetlError(f"RANK/WORLD_SIZE/LOCAL_RANK = {[os.environ[n] for n in names]} are not integers",
                          hint="start distributed training with torchrun or edgetl train --nproc") from None
    return rank, world, local


def world_size_from_env() -> int:
    env = env_world()
    return env[1] if env else 1


@dataclass
class Dist:
    """This process's place in the job. ``backend`` None: one process, no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: Any = None  # torch.device of this rank (None: the caller resolves --device)
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launched(self) -> bool:
        """Started by ``edgetl train --nproc`` (its launcher reports failures and resume hints)."""
        return self.active and bool(os.environ.get(ERRORS_ENV))

    def _comm(self):
        import torch

        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        if not self.active:
            return [float(v) for v in values]
        import torch
        import torch.distributed as td

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm())
        td.all_reduce(t)
        return t.cpu().tolist()

    def from_main(self, values: Sequence[int]) -> list[int]:
        """Rank 0's integers on every rank (decisions: improved, stop)."""
        if not self.active:
            return [int(v) for v in values]
        import torch
        import torch.distributed as td

        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self._comm())
        td.broadcast(t, 0)
        return [int(v) for v in t.cpu().tolist()]

    def barrier(self) -> None:
        self.all_sum([0.0])  # a tiny all-reduce: NCCL's barrier() guesses the device and warns

    def broadcast_(self, tensor) -> Any:
        """Rank 0's ``tensor`` (any device) into every rank's ``tensor``, in place; returns it."""
        if not self.active:
            return tensor
        import torch.distributed as td

        t = tensor.to(self._comm())
        td.broadcast(t, 0)
        if t is not tensor:
            tensor.copy_(t)
        return tensor

    def sync_buffers(self, module) -> None:
        """BatchNorm running statistics (every buffer) from rank 0: without SyncBatchNorm each rank
        updated them with its own batches; the model that is evaluated and saved is rank 0's."""
        if self.active:
            for b in module.buffers():
                self.broadcast_(b.data)

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share of an evaluation list: ``items[rank::world]`` (no padding)."""
        return list(items[self.rank::self.world_size])

    def gather_rows(self, local, n: int, dim: int):
        """The rows of every rank's :meth:`shard` (``local``: this rank's ``(n_r, dim)`` rows) back in
        the original order, on every rank (CPU float32)."""
        import torch

        if not self.active:
            return local
        if n == 0:
            return torch.zeros(0, dim)
        import torch.distributed as td

        m = math.ceil(n / self.world_size)
        pad = torch.zeros(m, dim, dtype=torch.float32, device=self._comm())
        local = local.reshape(-1, dim).float()
        pad[: len(local)] = local.to(self._comm())
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        td.all_gather(parts, pad)
        out = torch.empty(n, dim, dtype=torch.float32)
        for r, part in enumerate(parts):
            count = len(range(r, n, self.world_size))
            out[r::self.world_size] = part[:count].cpu()
        return out

    def wrap(self, module):
        """``module`` under DistributedDataParallel (its parameters that require grad at this moment;
        rebuild after changing which do). The identity for one process."""
        if not self.active:
            return module
        import warnings

        from torch.nn.parallel import DistributedDataParallel

        # channels_last weights give gradients whose strides differ from DDP's flat buckets: torch
        # notes a copy once ("Grad strides do not match bucket view strides"); it costs a copy, no more
        warnings.filterwarnings("ignore", message=".*[Gg]rad strides do not match bucket view strides.*")
        ids = [self.device.index] if self.backend == "nccl" else None
        # no buffer broadcast at every forward: BatchNorm statistics come from rank 0 at each epoch's
        # end (sync_buffers), which is what the broadcast would leave too (rank 0's own statistics)
        import inspect

        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}  # newer torch / older (2.11)
        return DistributedDataParallel(module, device_ids=ids, **sync)

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()
            self.owns_group = False


def setup(device_name: str) -> Dist:
    """Join torchrun's process group when started by it: NCCL on CUDA (one GPU per local rank,
    ``torch.cuda.set_device(local_rank)``), gloo on the CPU. Otherwise the one process."""
    env = env_world()
    if env is None:
        return Dist()
    rank, world, local = env
    import torch
    import torch.distributed as td

    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise EdgetlError("--device cuda: no CUDA device is available to torch", hint="use --device cpu (gloo)")
        n = torch.cuda.device_count()
        if local >= n:
            raise EdgetlError(f"local rank {local}: this node has {n} CUDA device(s) and NCCL takes one per process",
                              hint=f"start at most {n} processes per node (--nproc {n}), or train on the CPU "
                                   "with --device cpu (gloo)")
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    owns = False
    if not td.is_initialized():
        td.init_process_group(backend=backend)
        owns = True
    return Dist(rank, world, local, backend, device, owns)


def train_sampler(n: int, dist: Dist, seed: int, weights: Sequence[float] | None = None):
    """This rank's sampler of the training set: torch's ``DistributedSampler`` (seeded permutation
    of all ``n`` samples, ``seed + epoch``, cut ``[rank::world]``; padded by repeating its start
    when ``n`` does not divide), or for ``--balance sampler`` the same cut of one seeded weighted
    draw with replacement of all ``n`` (what ``WeightedRandomSampler`` draws). Call ``set_epoch``."""
    from torch.utils.data import DistributedSampler

    cls = DistributedSampler if weights is None else _weighted_sampler_class()
    sampler = cls(range(n), num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed, drop_last=False)
    if weights is not None:
        import torch

        sampler.weights = torch.as_tensor(list(weights), dtype=torch.float64)
    return sampler


_WEIGHTED: list[type] = []


def _weighted_sampler_class() -> type:
    if _WEIGHTED:
        return _WEIGHTED[0]
    import torch
    from torch.utils.data import DistributedSampler

    class WeightedDistributedSampler(DistributedSampler):
        """One weighted draw (with replacement) of the whole set per epoch, seeded by
        ``seed + epoch`` as ``DistributedSampler`` seeds its permutation, cut ``[rank::world]``."""

        weights: Any = None

        def __iter__(self) -> Iterator[int]:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            n = len(self.dataset)
            idx = torch.multinomial(self.weights, n, replacement=True, generator=g).tolist()
            pad = self.total_size - n
            if pad > 0:
                idx += (idx * math.ceil(pad / n))[:pad]
            return iter(idx[self.rank:self.total_size:self.num_replicas])

    _WEIGHTED.append(WeightedDistributedSampler)
    return WeightedDistributedSampler


def convert_sync_batchnorm(model):
    """Every BatchNorm of ``model`` as SyncBatchNorm (timm's converter when timm is there: it keeps
    timm's BatchNormAct2d activation); ``model.layer_groups`` re-pointed at the new modules."""
    try:
        from timm.layers import convert_sync_batchnorm as convert
    except ImportError:
        from torch.nn import SyncBatchNorm

        convert = SyncBatchNorm.convert_sync_batchnorm
    names = {id(m): name for name, m in model.named_modules()}
    groups = getattr(model, "layer_groups", None)
    feature_dim = getattr(model, "feature_dim", None)
    new = convert(model)
    if groups is not None:
        mods = dict(new.named_modules())
        new.layer_groups = [[mods[names[id(m)]] for m in g] for g in groups]
    if feature_dim is not None:
        new.feature_dim = feature_dim
    return new


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """torch's seed of ``rank`` in ``epoch`` (dropout): fixed by (seed, epoch, rank), so a resumed
    run draws what the uninterrupted one did without saving every rank's RNG state."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


def fault(dist: Dist, epoch: int, point: str) -> None:
    """Tests only: ``EDGETL_DDP_FAULT=RANK:EPOCH:KIND`` fails rank RANK in epoch EPOCH (1-based).
    ``error`` (an EdgetlError) and ``crash`` (a bug) at the epoch's start; ``kill`` (SIGKILL) once
    the epoch's checkpoint is written (every rank waits for it there)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    try:
        rank, ep, kind = spec.split(":")
        rank, ep = int(rank), int(ep)
    except ValueError:
        raise EdgetlError(f"{FAULT_ENV}={spec!r} is not RANK:EPOCH:error|crash|kill") from None
    if ep != epoch or (point == "start") != (kind in ("error", "crash")):
        return
    if kind == "kill":
        dist.barrier()  # rank 0 has written the checkpoint
    if rank != dist.rank:
        return
    if kind == "error":
        raise EdgetlError(f"fault injected by {FAULT_ENV} in epoch {epoch}", hint="unset " + FAULT_ENV)
    if kind == "crash":
        raise RuntimeError(f"fault injected by {FAULT_ENV} in epoch {epoch}")
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def rank_failures(argv: Sequence[str] | None = None) -> Iterator[None]:
    """In a worker of ``edgetl train --nproc``: leave a marker for the launcher when this rank fails
    (its one-line error, exit code and the time). A bug is saved like the CLI saves it and leaves
    as a one-line error with exit 70. Elsewhere: nothing."""
    where = os.environ.get(ERRORS_ENV) if env_world() else None
    if not where:
        yield
        return
    try:
        yield
    except EdgetlError as exc:
        _mark(where, exc.message, exc.hint, exc.exit_code)
        raise
    except KeyboardInterrupt as exc:
        term = isinstance(exc, Terminated)
        _mark(where, "terminated (SIGTERM)" if term else "interrupted (SIGINT)", None, 143 if term else 130)
        raise
    except Exception as exc:
        from .cli import ISSUES_URL, _first_line, save_crash

        path = save_crash(exc, list(sys.argv[1:] if argv is None else argv))
        msg = f"internal error ({type(exc).__name__}: {_first_line(exc)})"
        hint = (f"the traceback is saved in {path}; " if path else "") + f"please report it at {ISSUES_URL}"
        _mark(where, msg, hint, EXIT_INTERNAL)
        raise DistributedError(msg, hint) from None


def _mark(where: str, message: str, hint: str | None, code: int) -> None:
    rank = os.environ.get("RANK", "?")
    data = {"rank": rank, "time": time.time(), "message": message, "hint": hint, "exit_code": code}
    try:
        Path(where).mkdir(parents=True, exist_ok=True)
        tmp = Path(where) / f".rank-{rank}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, Path(where) / f"rank-{rank}.json")
    except OSError:
        pass  # the launcher still reports the exit code


# ------------------------------------------------------------------------------------------
# the launcher: edgetl train --nproc N [--nnodes M --node-rank R --master-addr A --master-port P]
# ------------------------------------------------------------------------------------------

LAUNCH_KEYS = ("nproc", "nnodes", "node_rank", "master_addr", "master_port")


def planned_world(launch: dict[str, Any]) -> int:
    """World size of this command: ``nproc x nnodes`` when launching, torchrun's WORLD_SIZE inside
    one of its workers, else 1. Refuses launch options that do not go together."""
    given = [k for k in LAUNCH_KEYS if launch.get(k) is not None]
    if launch.get("nproc") is None:
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise EdgetlError(f"{flag} needs --nproc (processes per node)", hint="e.g. --nproc 4 " + flag + " ...")
        return world_size_from_env()
    if env_world() is not None:
        raise EdgetlError("--nproc inside a process torchrun started", hint="drop --nproc (torchrun already launched "
                          "the processes), or run edgetl train --nproc without torchrun")
    nproc, nnodes = launch["nproc"], launch.get("nnodes") or 1
    if nproc < 1 or nnodes < 1:
        raise EdgetlError(f"--nproc {nproc} --nnodes {nnodes}: both must be at least 1")
    if nnodes > 1 and not launch.get("master_addr"):
        raise EdgetlError(f"--nnodes {nnodes} needs --master-addr (the host of node 0, reachable from every node)",
                          hint="e.g. --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500")
    rank = launch.get("node_rank") or 0
    if not 0 <= rank < nnodes:
        raise EdgetlError(f"--node-rank {rank} must be in 0..{nnodes - 1} (--nnodes {nnodes})")
    return nproc * nnodes


def resume_command(out: str | Path, nproc: int | None, nnodes: int | None) -> str:
    cmd = f"edgetl train --resume --out {out}"
    if nproc:
        cmd += f" --nproc {nproc}" + (" (with the same --nnodes/--node-rank/--master-addr on every node)"
                                      if (nnodes or 1) > 1 else "")
    return cmd


def torchrun_args(launch: dict[str, Any], logs: Path, worker: list[str]) -> list[str]:
    """torchrun's own command line for ``worker`` (arguments of ``python -m edgetl``)."""
    # the underscore spellings: torch's first ones (every version has them; the dashed ones came later)
    args = ["--nproc_per_node", str(launch["nproc"]), "--max_restarts", "0", "--monitor_interval", "0.5",
            "--log_dir", str(logs), "--redirects", "2"]
    nnodes = launch.get("nnodes") or 1
    if nnodes > 1:
        args += ["--nnodes", str(nnodes), "--node_rank", str(launch.get("node_rank") or 0),
                 "--master_addr", str(launch["master_addr"]), "--master_port", str(launch.get("master_port") or 29500)]
    else:
        args += ["--standalone"]
    return args + ["-m", "edgetl", *worker]


@contextlib.contextmanager
def _launch_environment(errors: Path, nproc: int) -> Iterator[None]:
    """Workers inherit: the marker folder, OMP threads (the cores shared out, unless set), and
    torch's launcher keeps its log lines and signal handlers to itself for the duration."""
    import logging

    saved_env = {k: os.environ.get(k) for k in (ERRORS_ENV, "OMP_NUM_THREADS")}
    os.environ[ERRORS_ENV] = str(errors)
    if not os.environ.get("OMP_NUM_THREADS"):
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    saved_sig = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    # torch's own loggers print to stderr (their handlers sit on "torch" and "torch.distributed")
    loggers = [logging.getLogger(n) for n in ("torch.distributed", "torch")] if not os.environ.get("EDGETL_DEBUG") else []
    saved_log = [(lg.handlers[:], lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [logging.NullHandler()], False
    try:
        yield
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved_log):
            lg.handlers, lg.propagate = handlers, propagate
        for s, h in saved_sig.items():
            if h is not None:
                signal.signal(s, h)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def launch(worker: list[str], launch_opts: dict[str, Any], out: str | Path) -> None:
    """Run ``python -m edgetl WORKER...`` in ``--nproc`` processes per node through torchrun's
    launcher; a failure becomes one :class:`DistributedError` (or KeyboardInterrupt/Terminated)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError

    tmp = Path(tempfile.mkdtemp(prefix="edgetl-ddp-"))
    errors, logs = tmp / "errors", tmp / "logs"
    args = torchrun.parse_args(torchrun_args(launch_opts, logs, worker))
    keep = True
    try:
        with _launch_environment(errors, launch_opts["nproc"]):
            torchrun.run(args)
        keep = False
    except ChildFailedError as exc:
        err = failure_error(exc.failures, errors, logs, out, launch_opts)
        keep = err.exit_code != EXIT_BAD_INPUT  # bad input says it all; else the logs are named in the hint
        raise err from None
    except SignalException as exc:
        keep = False
        note = saved_note(out, launch_opts)
        if note:
            print(note, file=sys.stderr, flush=True)
        raise (Terminated() if exc.sigval == signal.SIGTERM else KeyboardInterrupt()) from None
    except RendezvousError as exc:
        keep = False
        raise EdgetlError(f"--master-addr {launch_opts.get('master_addr') or 'localhost'}: the processes could not "
                          f"meet ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                          hint="check that node 0 runs the same command with --node-rank 0 and that its "
                               "--master-port is reachable from every node") from None
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def saved_note(out: str | Path, launch_opts: dict[str, Any]) -> str | None:
    """"epoch N is saved ...; continue with ..." when the interrupted run left a checkpoint."""
    from .runs import CHECKPOINT_FILE, partial_dir

    part = partial_dir(out)
    if not (part / CHECKPOINT_FILE).is_file():
        return None
    try:
        epoch = json.loads((part / LAUNCH_FILE).read_text()).get("epoch")
    except (OSError, ValueError):
        epoch = None
    what = f"epoch {epoch}" if epoch else "the last finished epoch"
    return (f"{what} is saved in {part}; continue with: "
            f"{resume_command(out, launch_opts.get('nproc'), launch_opts.get('nnodes'))}")


def failure_error(failures: dict[int, Any], errors: Path, logs: Path, out: str | Path,
                  launch_opts: dict[str, Any]) -> DistributedError:
    """The one error of a failed job: the rank that failed first (a rank killed by a signal leaves no
    marker and comes first: the others fail after it; else the earliest marker; else torch's
    first failure), its message, and the exit code of the contract."""
    world = (launch_opts.get("nproc") or 1) * (launch_opts.get("nnodes") or 1)
    marks = []
    for p in sorted(errors.glob("rank-*.json")):
        with contextlib.suppress(OSError, ValueError):
            marks.append(json.loads(p.read_text()))
    marked = {str(m.get("rank")) for m in marks}
    killed = sorted((r, f) for r, f in failures.items() if f.exitcode is not None and f.exitcode < 0
                    and str(r) not in marked)
    where = f"the log of every rank is in {logs}"
    if killed:
        rank, f = killed[0]
        try:
            name = signal.Signals(-f.exitcode).name
        except ValueError:
            name = f"signal {-f.exitcode}"
        msg = f"rank {rank} of {world} was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        hint, code = where, EXIT_INTERNAL
    elif marks:
        first = min(marks, key=lambda m: m.get("time", math.inf))
        msg = f"rank {first.get('rank')} of {world}: {first.get('message')}"
        code = int(first.get("exit_code", EXIT_INTERNAL))
        code = code if code in (EXIT_BAD_INPUT, EXIT_INTERNAL, 130, 143) else EXIT_INTERNAL
        hint = first.get("hint") if code == EXIT_BAD_INPUT else "; ".join(filter(None, (first.get("hint"), where)))
    else:
        rank, f = min(failures.items(), key=lambda kv: (kv[1].timestamp, kv[0])) if failures else ("?", None)
        msg = f"rank {rank} of {world} failed" + (f" (exit code {f.exitcode})" if f is not None else "")
        hint, code = where, EXIT_INTERNAL
    note = saved_note(out, launch_opts)
    if note:
        hint = f"{hint}; {note}"
    return DistributedError(msg, hint, code)
