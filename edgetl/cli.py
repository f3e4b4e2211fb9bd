"""The ``edgetl`` command line. Commands live in ``edgetl/commands/`` and are imported lazily,
so ``edgetl --help`` and ``edgetl run`` never import torch.

One exit-code contract for every command (``runtime/errors.py``, docs/reliability.md "Exit codes and errors"):
0 ok, 1 gate failed, 2 bad input, 3 source lost, 70 internal error, 130 Ctrl-C, 143 SIGTERM. Bad
input (an :class:`EdgetlError`, a usage error, a missing extra, a permission/disk-full error) is one
``error:`` line (and a ``hint:``); anything else is a bug: one line naming the file its traceback
was saved in (``--debug`` prints it instead).
"""

from __future__ import annotations

import datetime
import errno
import importlib
import os
import platform
import re
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Any

import click

from . import logs
from .runtime.errors import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, EdgetlError,
                             MissingDependencyError, Terminated, missing_dependency)

ISSUES_URL = "https://github.com/edgetl/edgetl/issues"

# name -> "module:attribute" of a click command. Order = order in `edgetl --help`.
COMMANDS: dict[str, str] = {
    "data": "edgetl.commands.data:data",
    "train": "edgetl.commands.train:train",
    "eval": "edgetl.commands.train:eval_cmd",
    "predict": "edgetl.commands.train:predict",
    "adapt": "edgetl.commands.adapt:adapt",
    "quantize": "edgetl.commands.quantize:quantize",
    "check": "edgetl.commands.check:check",
    "run": "edgetl.commands.run:run",
    "targets": "edgetl.commands.targets:targets",
    "compile": "edgetl.commands.compile:compile_cmd",
    "build": "edgetl.commands.build:build",
    "bench": "edgetl.commands.bench:bench",
    "search": "edgetl.commands.search:search",
    "doctor": "edgetl.commands.doctor:doctor",
}


def unavailable_command(name: str, error: MissingDependencyError) -> click.Command:
    """A stand-in for a command whose module needs an extra that is not installed: listed in
    ``edgetl --help`` as unavailable, and running it (``--help`` included) prints ``error``."""
    install = f"pip install 'edgetl[{error.extra}]'" if error.extra else f"pip install {error.package}"

    def callback(args: tuple[str, ...]) -> None:
        raise error

    return click.Command(name, callback=callback, help=f"(unavailable: {install})",
                         short_help=f"(unavailable: {install})", add_help_option=False,
                         params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})


class LazyGroup(click.Group):
    """Imports a command's module when it is used. A module that needs an extra that is not installed
    becomes an :func:`unavailable_command`; any other import error is a bug and is raised (the CLI
    reports it as an internal error), never a command silently missing from ``--help``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            error = missing_dependency(exc.name, f"edgetl {name}")
            if error is None:
                raise
            return unavailable_command(name, error)
        return getattr(mod, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            try:
                cmd = self.get_command(ctx, name)
            except Exception as exc:  # a bug: listed (not hidden); running it reports the internal error
                why = f"(unavailable: internal error, {type(exc).__name__}; run `edgetl {name}` for a report)"
                rows.append((name, why))
                continue
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=70)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edgetl")
@click.option("--debug", is_flag=True,  # EDGETL_DEBUG is read by main(), which reports the errors
              help="On an internal error, print the full traceback (instead of saving it to a file). "
                   "Also EDGETL_DEBUG=1.")
@click.option("--verbose", is_flag=True,  # read by main(), which owns the capture (edgetl.logs)
              help="Show the output of NNCF, ONNX Runtime, OpenVINO, PyTorch and OpenCV live (by default it goes "
                   "to a log file, named at the end when it holds a warning). Also EDGETL_VERBOSE=1.")
def cli(debug: bool, verbose: bool) -> None:
    """edgetl: fine-tune, quantize, compile and run image classifiers and object detectors on edge devices.

    \b
    A typical session:
      edgetl data elpv data/elpv                          # or bring your own image folder
      edgetl train data/elpv --backbone efficientnet_lite0 --out runs/elpv
      edgetl compile runs/elpv --target x86-cpu-openvino --out artifacts/elpv-ov
      edgetl run artifacts/elpv-ov --source 0              # camera, video, rtsp://, csi://, gst:
    """


# ---- errors: bad input, the environment, bugs --------------------------------------------------

def report_error(exc: EdgetlError) -> int:
    """The one ``error:`` line (and ``hint:``) of a user-facing error; returns its exit code."""
    click.secho(f"error: {exc.message}", fg="red", err=True)
    if exc.hint:
        click.echo(f"  hint: {exc.hint}", err=True)
    return exc.exit_code


# Always the environment, whichever file: permissions, a read-only or full file system, the network.
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC),
                       errno.EFBIG, errno.EIO, errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH,
                       errno.ENETUNREACH, errno.ETIMEDOUT}
# The environment when the file is one the user named (or inside/beside it); else a bug.
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY, errno.ENAMETOOLONG,
                errno.ELOOP, errno.EXDEV}
_OS_HINTS = {
    errno.EACCES: "check the permissions of that path, or choose another one",
    errno.EPERM: "check the permissions of that path, or choose another one",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOSPC: "free some disk space, or write somewhere else",
    getattr(errno, "EDQUOT", errno.ENOSPC): "the disk quota is used up: free some space, or write somewhere else",
    errno.ENOENT: "check the path",
}


def _user_paths(args: list[str]) -> list[Path]:
    paths = []
    for a in args:
        value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
        if value and not value.startswith("-") and "://" not in value:
            try:
                paths.append(Path(os.path.abspath(value)))
            except (ValueError, OSError):
                pass
    return paths


def _names_user_path(filename: Any, args: list[str]) -> bool:
    """True when ``filename`` is a path the user gave, inside one, one of its parents, or the hidden
    temp sibling edgetl builds it in (``.NAME.partial-*``)."""
    try:
        target = Path(os.path.abspath(os.fsdecode(filename)))
    except (TypeError, ValueError, OSError):
        return False
    for p in _user_paths(args):
        if target == p or p in target.parents or (target in p.parents and target != Path(target.anchor)):
            return True
        if target.parent == p.parent and target.name.startswith(f".{p.name}."):
            return True
    return False


def environment_error(exc: OSError, args: list[str]) -> EdgetlError | None:
    """An OSError of the environment as a one-line EdgetlError (exit 2), or None when it is a bug."""
    code = exc.errno
    if code not in _ENVIRONMENT_ERRNOS and not (code in _PATH_ERRNOS and exc.filename is not None
                                                 and _names_user_path(exc.filename, args)):
        return None
    what = exc.strerror or os.strerror(code)
    name = errno.errorcode.get(code, str(code))
    if code in (errno.EEXIST, errno.ENOTDIR) and exc.filename is not None and exc.filename2 is None:
        try:
            is_file = os.path.exists(exc.filename) and not os.path.isdir(exc.filename)
        except (TypeError, ValueError, OSError):
            is_file = False
        if is_file:  # mkdir(parents=True) through a file: "File exists" says nothing useful
            return EdgetlError(f"{os.fsdecode(exc.filename)}: is a file, where a folder was needed ({name})",
                               hint="choose an output path whose parent folders are folders")
    where = ""
    if exc.filename is not None:
        where = f"{os.fsdecode(exc.filename)}: "
        if exc.filename2 is not None:
            where = f"{os.fsdecode(exc.filename)} -> {os.fsdecode(exc.filename2)}: "
    return EdgetlError(f"{where}{what} ({name})", hint=_OS_HINTS.get(code))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= 200 else line[:197] + "..."


def crash_dir() -> Path:
    """Where tracebacks of internal errors go: ``$EDGETL_CACHE/crash``, else ``~/.cache/edgetl/crash``."""
    if os.environ.get("EDGETL_CACHE"):
        return Path(os.environ["EDGETL_CACHE"]) / "crash"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetl" / "crash"


def _redact(arg: str) -> str:
    return re.sub(r"(://)[^/@\s]*@", r"\1***@", arg)  # credentials in a stream URI


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edgetl")
    except Exception:  # not installed as a distribution (a source checkout)
        from .runtime import __version__

        return __version__


def save_crash(exc: BaseException, args: list[str]) -> Path | None:
    """Write argv, versions, platform and the traceback to a new file; its path, or None if nowhere
    was writable. Created exclusively (never through an existing file or link)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = f"edgetl-crash-{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{os.getpid()}.txt"
    text = "".join([
        f"edgetl internal error, {now.isoformat()}\n",
        f"argv: {' '.join(_redact(a) for a in ['edgetl', *args])}\n",
        f"edgetl: {_version()}\n",
        f"python: {sys.version.splitlines()[0]} ({sys.executable})\n",
        f"platform: {platform.platform()} ({platform.machine()})\n\n",
        *traceback.format_exception(type(exc), exc, exc.__traceback__),
    ])
    folders = []
    try:
        folders.append(crash_dir())
    except (RuntimeError, OSError, KeyError):  # no home folder
        pass
    folders.append(Path(tempfile.gettempdir()))
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as fh:
                fh.write(text)
            return folder / name
        except OSError:
            continue
    return None


def internal_error(exc: BaseException, args: list[str], debug: bool) -> int:
    """A bug: one line (the exception, where its traceback was saved, where to report it); with
    ``--debug`` / EDGETL_DEBUG=1 the traceback itself. Exit 70."""
    what = f"internal error ({type(exc).__name__}: {_first_line(exc)})"
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        click.secho(f"error: {what}; please report it at {ISSUES_URL} with the traceback above", fg="red", err=True)
        return EXIT_INTERNAL
    path = save_crash(exc, args)
    saved = (f"the traceback is saved in {path}" if path is not None else
             "the traceback could not be saved (run again with --debug to see it)")
    click.secho(f"error: {what}; {saved}; please report it at {ISSUES_URL} with that file", fg="red", err=True)
    return EXIT_INTERNAL


def _debug_requested(args: list[str]) -> bool:
    if os.environ.get("EDGETL_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    for a in args:  # a group option: before the command name
        if a == "--debug":
            return True
        if a in COMMANDS or a == "--":
            return False
    return False


def _command_name(args: list[str]) -> str:
    return next((a for a in args if a in COMMANDS), "")


# ---- SIGTERM: unwind like Ctrl-C, so every `with`/`finally` cleans up ------------------------------

def _raise_terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, _ignore_repeat)  # the clean-up that follows is not interrupted again
    raise Terminated()


def _ignore_repeat(signum: int, frame: Any) -> None:
    pass


def _install_sigterm() -> Any:
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, OSError):  # pragma: no cover - not the main interpreter
        return None


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        try:
            signal.signal(signal.SIGTERM, previous)
        except (ValueError, OSError):  # pragma: no cover
            pass


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code of the contract (see the module docstring). Third-party
    output of the commands in ``logs.CAPTURED`` goes to a log file (``edgetl.logs``), named at the
    end when it holds a warning or the command failed."""
    args = logs.hoist_verbose(list(sys.argv[1:] if argv is None else argv))
    previous = _install_sigterm()
    command = _command_name(args)
    capture = command in logs.CAPTURED and not logs.verbose_requested(args)
    if command in logs.CAPTURED and not capture:
        logs.show_live()
    cap, rc = None, EXIT_INTERNAL
    try:
        with logs.captured(command, capture) as cap:
            try:
                rc = _main(args)
            except Terminated:
                click.echo("terminated (SIGTERM)", err=True)
                rc = EXIT_TERMINATED
        return rc
    finally:
        _restore_sigterm(previous)
        note = cap.summary(failed=rc != 0) if cap is not None else None
        if note:
            click.secho(f"note: {note}", err=True, dim=True)
        if argv is None:  # the process's own CLI (never an in-process call, e.g. the tests')
            _exit_past_blocked_capture(rc)


def _exit_past_blocked_capture(rc: int) -> None:
    """Leave with ``rc`` at once when a capture thread is still blocked in native code (an RTSP opening
    abandoned by the watchdog): the interpreter's shutdown could otherwise be aborted by it ("terminate
    called without an active exception", exit 134 in place of the documented code, seen on
    `edgetl run` of a stream that never delivered a frame). Output is flushed first; nothing else is
    pending by then (files are written and closed by the commands)."""
    sources = sys.modules.get("edgetl.runtime.sources")
    if sources is not None and sources.capture_threads_alive():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _main(args: list[str]) -> int:
    try:
        rv = cli.main(args=args, prog_name="edgetl", standalone_mode=False)
    except EdgetlError as exc:
        return report_error(exc)
    except click.exceptions.Abort as exc:  # click's wrapper of a KeyboardInterrupt (Terminated included)
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, Terminated):
            raise cause from None
        click.echo("interrupted (Ctrl-C)" if isinstance(cause, KeyboardInterrupt) else "aborted", err=True)
        return EXIT_INTERRUPTED
    except Terminated:
        raise
    except KeyboardInterrupt:
        click.echo("interrupted (Ctrl-C)", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except ModuleNotFoundError as exc:  # an extra imported inside a command (e.g. torch by `edgetl train`)
        name = _command_name(args)
        error = missing_dependency(exc.name, f"edgetl {name}" if name else "edgetl")
        return report_error(error) if error is not None else internal_error(exc, args, _debug_requested(args))
    except OSError as exc:
        error = environment_error(exc, args)
        return report_error(error) if error is not None else internal_error(exc, args, _debug_requested(args))
    except Exception as exc:
        return internal_error(exc, args, _debug_requested(args))
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
