"""The one owner of run and artifact folders on the host: locks, new folders, in-place updates.

A folder is only ever replaced whole, never edited in place:

- **new** (``train``, ``quantize``, ``compile``, ``eval``: :func:`new_folder`): built in a hidden
  ``.NAME.partial-*`` folder beside ``--out``, sealed (every file hashed into the manifest, its
  digest written), renamed over ``--out`` when complete;
- **update** (``check``, ``build``, ``bench``: :func:`update`): the verified folder is copied to a
  private stage ``.NAME.update-*/NAME``, the command works on the copy, the copy is sealed and
  verified as a whole, renamed to ``.NAME.ready-*`` (the commit point), then swapped with the old
  folder (``NAME`` -> ``.NAME.old-*``, ready -> ``NAME``, old deleted).

Each is done under a lock per folder (``.NAME.edgetl-lock`` beside it, ``flock``; a second
command on the same folder is refused at once, naming the lock). Before any work the lock holder
finishes what an interrupted command left (:func:`recover`): an unfinished stage or partial folder
is deleted, a ready one is swapped in, an old one is restored or removed. So after a crash or a
kill at any point the folder is the old one or the new one, verified, and the next command on it
leaves no temp folder behind.

Only folders edgetl wrote are replaced by ``--overwrite`` (a manifest of a run or artifact, or an
empty folder): ``--out runs --overwrite`` cannot wipe a folder of runs.

Fault points (``EDGETL_FAULT=<point>``, tests only) kill the process at the named step, so the
fault-injection tests hit every step of a transaction deterministically.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .runtime.errors import EdgetlError, ManifestError
from .runtime.manifest import MANIFEST_NAME, Manifest, open_verified, read_manifest, seal, verify_files

LOCK_SUFFIX = ".edgetl-lock"
DATA_MARKER = "elpv_meta.csv"  # written by `edgetl data elpv` into the image folders it makes
# every `edgetl data` folder carries one of these (elpv, scenes, trees): --overwrite may replace it
DATA_MARKERS = (DATA_MARKER, "scenes.json", "edgetl_trees.json")
STATES = ("partial", "update", "ready", "old")  # hidden siblings: .NAME.<state>-<pid>-<random>
FAULT_POINTS = ("new:work", "new:sealed", "new:moved-old", "new:swapped", "update:staged", "update:work", "update:sealed",
                "update:ready", "update:moved-old", "update:swapped")


def fault(point: str) -> None:
    """Kill this process at ``point`` when EDGETL_FAULT names it (``point`` or ``point:TERM``)."""
    want = os.environ.get("EDGETL_FAULT", "")
    if not want:
        return
    name, _, sig = want.partition("@")
    if name == point:
        os.kill(os.getpid(), signal.SIGTERM if sig == "TERM" else signal.SIGKILL)


def _siblings(folder: Path, state: str) -> list[Path]:
    prefix = f".{folder.name}.{state}-"
    try:
        return sorted(p for p in folder.parent.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold the lock of ``folder`` (a file beside it); refuse at once if another command holds it."""
    import fcntl

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f".{folder.name}{LOCK_SUFFIX}"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise EdgetlError(f"{path}: cannot create the lock of {folder} ({exc.strerror})",
                              hint="remove it if it is not a plain file, or check the folder's permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise EdgetlError(f"{folder}: another edgetl command is working on it (lock {path})",
                                  hint="wait for it to finish; the lock goes with the process that holds it") from None
            raise
        try:  # the holder before us may have removed the file we opened: lock the one that is there
            same = os.fstat(fd).st_ino == os.lstat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def recover(folder: str | Path) -> list[str]:
    """Finish what an interrupted command left beside ``folder`` (call with its lock held).

    Returns what was done, one line each (for a note)."""
    folder = Path(folder)
    done: list[str] = []
    for stale in _siblings(folder, "partial") + _siblings(folder, "update"):
        _rmtree(stale)
        done.append(f"removed the unfinished {stale.name}")
    ready = _siblings(folder, "ready")
    for extra in ready[:-1]:
        _rmtree(extra)
    ready = ready[-1:]
    if ready:
        try:
            verify_files(ready[0])
        except EdgetlError:
            _rmtree(ready[0])
            done.append(f"removed {ready[0].name} (it did not verify)")
            ready = []
    olds = _siblings(folder, "old")
    if ready:
        if folder.exists() and not olds:  # the swap had not begun
            _swap(folder, ready[0])
        else:
            os.replace(ready[0], folder)
        done.append(f"finished the interrupted update of {folder.name}")
    elif olds and not folder.exists():
        os.replace(olds[-1], folder)
        olds = olds[:-1]
        done.append(f"restored {folder.name} from before an interrupted update")
    for old in _siblings(folder, "old"):
        _rmtree(old)
    return done


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP during the few renames of a commit: a signal then acts once the
    folder is the new one (SIGKILL cannot be held: :func:`recover` finishes the job).

    Done with Python handlers, not a signal mask: a process-directed signal is delivered to any
    thread (ONNX Runtime's, OpenMP's) that does not mask it."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    sigs = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending[:1]:  # now act on it as the process would have
            handler = previous[s]
            if callable(handler):
                handler(s, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), s)


def _swap(folder: Path, new: Path, stage: str = "update") -> None:
    """``folder`` -> ``.NAME.old-*``, ``new`` -> ``folder``, old deleted (put back if the second rename fails)."""
    old = folder.parent / f".{folder.name}.old-{os.getpid()}-{os.urandom(3).hex()}"
    os.replace(folder, old)
    fault(f"{stage}:moved-old")
    try:
        os.replace(new, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    fault(f"{stage}:swapped")
    _rmtree(old)


def is_edgetl_folder(path: Path) -> bool:
    """A folder edgetl wrote (its manifest names a run or an artifact, or ``edgetl data`` wrote it) or
    an empty folder."""
    if not path.is_dir() or path.is_symlink():
        return False
    if not any(path.iterdir()) or any((path / m).is_file() for m in DATA_MARKERS):
        return True
    try:
        read_manifest(path)
    except EdgetlError:
        return False
    return True


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse to clobber an existing output folder unless asked to, and then only one edgetl wrote."""
    out = Path(out)
    if out.is_symlink():
        raise EdgetlError(f"{out} is a symlink", hint="give --out a real path (the link's target is not replaced)")
    if out.exists() and not out.is_dir():
        raise EdgetlError(f"{out} exists and is not a folder", hint="choose another --out")
    if out.exists() and not overwrite:
        raise EdgetlError(f"{out} already exists", hint="choose another --out, or pass --overwrite to replace it")
    if out.exists() and not is_edgetl_folder(out):
        raise EdgetlError(f"{out} is not an edgetl run or artifact (no valid {MANIFEST_NAME}), so --overwrite "
                          "does not delete it", hint="choose a new --out folder, or remove that folder yourself")
    return out


@contextlib.contextmanager
def new_folder(out: str | Path, overwrite: bool = False, locked: bool = False) -> Iterator[Path]:
    """Yield a hidden temp folder beside ``out``; when the block ends without error, rename it to
    ``out`` (replacing an edgetl folder there with ``overwrite``); on any error or signal, delete it.

    The caller seals it (``runtime.manifest.seal``) before the block ends; ``locked``: the caller
    already holds the folder's lock (``edgetl train`` holds it for the whole training)."""
    out = check_output_dir(out, overwrite)
    with contextlib.nullcontext() if locked else folder_lock(out):
        recover(out)
        check_output_dir(out, overwrite)  # recovery may have restored a folder
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        try:
            yield tmp
            fault("new:work")
            if (tmp / MANIFEST_NAME).is_file():
                verify_files(tmp)
            fault("new:sealed")
            with _signals_deferred():
                if out.exists():
                    _swap(out, tmp, "new")
                else:
                    os.replace(tmp, out)
        except BaseException:
            _rmtree(tmp)
            raise


@dataclass
class Update:
    """An in-place update in progress: work on ``path`` (a verified private copy of ``folder``)."""

    folder: Path
    path: Path
    manifest: Manifest
    notes: list[str]  # what recover() finished or undid before this update


@contextlib.contextmanager
def update(folder: str | Path, kind: str = "artifact", hint: str = "") -> Iterator[Update]:
    """Update ``folder`` as one transaction: lock, recover, verify, copy, work on the copy, seal and
    verify it, commit (rename to ready), swap. An error or a signal at any point leaves ``folder``
    as it was (or, once ready, as the new one): verifiable either way."""
    folder = Path(folder)
    if folder.is_symlink():  # the user's link to the folder: update the folder, keep the link
        folder = folder.resolve()
    hint = hint or f"pass the folder of an edgetl {kind}"
    if not folder.exists() and not _siblings(folder, "old") and not _siblings(folder, "ready"):
        raise ManifestError(f"{folder}: no such {kind} folder", hint=hint)
    with folder_lock(folder):
        notes = recover(folder)
        manifest = open_verified(folder, kind, hint)
        box = Path(tempfile.mkdtemp(prefix=f".{folder.name}.update-{os.getpid()}-", dir=folder.parent))
        stage = box / folder.name  # the same name, so reports that name the folder stay right
        try:
            shutil.copytree(folder, stage, symlinks=True)
            verify_files(stage, manifest)  # what we work on is what was verified
            fault("update:staged")
            yield Update(folder, stage, manifest, notes)
            fault("update:work")
            seal(stage, read_manifest(stage))  # scans (no links, no specials) and hashes every file
            fault("update:sealed")
            ready = folder.parent / f".{folder.name}.ready-{os.getpid()}-{os.urandom(3).hex()}"
            with _signals_deferred():
                os.replace(stage, ready)  # the commit point: from here on recovery rolls forward
                fault("update:ready")
                _rmtree(box)
                _swap(folder, ready)
        except BaseException:
            _rmtree(box)
            raise


def take_up_plan_folder(out: Path, plan: dict, overwrite: bool, what: str, plan_name: str,
                        words: dict[str, str], describe=None) -> list[str]:
    """A folder a multi-run job (``edgetl train --cv``, ``edgetl search``) fills over many commands:
    created, or taken up when it holds the same ``plan`` (the job resumes), or replaced with
    ``overwrite``; another plan there is refused naming the first differing key (``words``: key ->
    what the user changes; ``describe(key, old, new)`` may say more). Writes the plan; returns notes.
    Call with OUT's ``folder_lock`` held."""
    import json

    from .runtime.manifest import atomic_write

    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise EdgetlError(f"--out {out}: not a folder", hint="choose another --out")
    notes: list[str] = []
    plan_file = out / plan_name
    if out.exists() and any(out.iterdir()):
        if not plan_file.is_file():
            raise EdgetlError(f"--out {out} exists and is not an edgetl {what} folder (no {plan_name})",
                              hint="choose a new --out folder")
        if overwrite:
            shutil.rmtree(out)
            notes.append(f"--overwrite: removed the {what} in {out}")
        else:
            try:
                old = json.loads(plan_file.read_text())
            except (OSError, ValueError) as exc:
                raise EdgetlError(f"{plan_file}: cannot be read ({exc})", hint="pass --overwrite to start over") from None
            if not isinstance(old, dict):
                raise EdgetlError(f"{plan_file}: not a {what} plan", hint="pass --overwrite to start over")
            diff = next((key for key in plan if old.get(key) != plan[key]), None)
            if diff is not None:
                said = (describe(diff, old.get(diff), plan[diff]) if describe else None) or words.get(diff, diff)
                raise EdgetlError(f"--out {out} holds a {what} with another {said}",
                                  hint="run it with the same settings to resume it, pass --overwrite to start over, "
                                       "or choose another --out")
            notes.append(f"resuming the {what} in {out}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(plan_file, json.dumps(plan, indent=1) + "\n")
    return notes


__all__ = ["FAULT_POINTS", "Update", "check_output_dir", "fault", "folder_lock", "is_edgetl_folder", "new_folder", "take_up_plan_folder",
           "recover", "update"]
