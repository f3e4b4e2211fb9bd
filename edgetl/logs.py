"""Third-party output goes to a log file; edgetl's own lines stay on the terminal (issue #18).

NNCF, ONNX Runtime, OpenVINO, PyTorch and OpenCV/GStreamer talk at three levels, and each needs its
own route:

* C/C++ writes to file descriptors 1 and 2 (PyTorch's ``W1130 ...`` lines, ONNX Runtime's
  ``Error in cpuinfo``, OpenVINO, GStreamer's warnings): the descriptors are pointed at the log
  (``dup2``) for the command's duration, and Python's ``sys.stdout``/``sys.stderr`` are replaced by
  streams on duplicates of the terminal's descriptors, so every edgetl line (click, rich, print)
  still reaches the user.
* Python ``logging`` and ``warnings``: a handler on the root logger writes records to the log, and
  ``logging.captureWarnings`` routes warnings there. Libraries also give their loggers their own
  handlers on ``sys.stdout``/``sys.stderr`` (NNCF's ``INFO:nncf:...``; PyTorch's ``W1130 ...``, whose
  handler follows whatever ``sys.stderr`` is): the terminal streams route what is written while a
  logging handler runs (:class:`_Routed`) to the log. edgetl itself prints through rich and click,
  never through ``logging``.
* rich's global console (NNCF's progress bars): pointed at the log.

The log lives in ``$EDGETL_LOG_DIR`` (default ``~/.cache/edgetl/logs``, beside the crash reports),
not in the output folder: an output folder is sealed and verified as a whole before the command
ends (``edgetl.artifact``), a log keeps growing until the last line, and a failed command has no
output folder at all, which is when the log matters most. One line at the end names the file when
the log holds a warning or an error, or when the command failed; ``--verbose`` (or
``EDGETL_VERBOSE=1``) turns the capture off and shows everything live.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

# Commands whose third-party output is captured. `train` is not: its torchrun workers must write to
# the terminal (they inherit the descriptors), and PyTorch alone is quiet while training.
CAPTURED = ("compile", "quantize", "check", "build", "bench", "run", "doctor")
_FORMAT = "%(levelname)s:%(name)s:%(message)s"
KEEP_LOGS = 30  # the newest logs kept in the folder
_WARNING = re.compile(r"(?i)^(warning|error|critical):|\b(warn(ing)?|error|fail(ed|ure)?|exception)\b|^[WEF]\d{4} ")


def log_dir() -> Path:
    if os.environ.get("EDGETL_LOG_DIR"):
        return Path(os.environ["EDGETL_LOG_DIR"])
    if os.environ.get("EDGETL_CACHE"):
        return Path(os.environ["EDGETL_CACHE"]) / "logs"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgetl" / "logs"


def verbose_requested(args: list[str]) -> bool:
    """``--verbose`` anywhere before a ``--`` (see :func:`hoist_verbose`), or EDGETL_VERBOSE=1."""
    if os.environ.get("EDGETL_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return "--verbose" in _options_part(args)


def hoist_verbose(args: list[str]) -> list[str]:
    """``edgetl compile ... --verbose`` is what people type: the group's flag moves before the command."""
    head = _options_part(args)
    if "--verbose" not in head:
        return args
    return ["--verbose", *[a for a in head if a != "--verbose"], *args[len(head):]]


def show_live() -> None:
    """``--verbose``: the records the log would hold (INFO and up, every library) on stderr, live."""
    logging.basicConfig(level=logging.INFO, format=_FORMAT, stream=sys.stderr)


def _options_part(args: list[str]) -> list[str]:
    return args[:args.index("--")] if "--" in args else args


@dataclass
class Capture:
    path: Path
    stream: IO[str]

    def summary(self, failed: bool) -> str | None:
        """One line naming the log and where its warnings came from, or None when nothing in it
        matters (no warning or error, and the command succeeded). An empty log is deleted."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines:
            with contextlib.suppress(OSError):
                self.path.unlink()
            return None
        sources: dict[str, int] = {}
        for ln in lines:
            if _WARNING.search(ln):
                sources[_source(ln)] = sources.get(_source(ln), 0) + 1
        if not sources and not failed:
            return None
        n = sum(sources.values())
        what = (f"{n} warning/error line{'s' if n != 1 else ''} ("
                + ", ".join(f"{k} {v}" for k, v in sorted(sources.items(), key=lambda kv: -kv[1])) + ")"
                if n else "no warning")
        return (f"third-party output: {what}, {len(lines)} line{'s' if len(lines) != 1 else ''} in all, in "
                f"{self.path} (`edgetl --verbose ...` shows it live)")


_LOGGING_LINE = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL):([A-Za-z_][\w]*)")
_GLOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ ([A-Za-z_]\w*)/")


def _source(line: str) -> str:
    """The library a log line came from: a logging record's top-level logger, PyTorch's glog-style
    lines, else "other" (C/C++ output)."""
    m = _LOGGING_LINE.match(line) or _GLOG_LINE.match(line)
    return m.group(1) if m else "other"


_active: Capture | None = None


def active() -> Capture | None:
    return _active


def _real_fd(stream: Any) -> bool:
    try:
        return stream is not None and stream.fileno() >= 0
    except (AttributeError, OSError, ValueError):  # click's test runner, a StringIO, a closed stream
        return False


def _open_log(command: str) -> tuple[Path, int]:
    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    old = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)
    for p in old[:max(0, len(old) - KEEP_LOGS + 1)]:
        with contextlib.suppress(OSError):
            p.unlink()
    now = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = folder / f"{command or 'edgetl'}-{now}-{os.getpid()}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    return path, fd


def _terminal(fd: int, like: Any) -> IO[str]:
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(like, "encoding", None) or "utf-8",
                     errors=getattr(like, "errors", None) or "replace")


_in_logging = threading.local()


class _Routed:
    """``sys.stdout``/``sys.stderr`` during a capture: the terminal, except for what a logging
    handler writes (it goes to the log). Everything else (isatty, fileno, encoding) is the terminal's."""

    def __init__(self, terminal: IO[str], log: IO[str]):
        self._terminal, self._log = terminal, log

    def write(self, text: str) -> int:
        return (self._log if getattr(_in_logging, "depth", 0) else self._terminal).write(text)

    def flush(self) -> None:
        for s in (self._terminal, self._log):
            with contextlib.suppress(Exception):
                s.flush()

    def retarget(self, stream: IO[str]) -> None:
        """After the capture: a handler a library bound to this object writes to ``stream``."""
        self._terminal = self._log = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._terminal, name)


@contextlib.contextmanager
def captured(command: str, enabled: bool = True) -> Iterator[Capture | None]:
    """Route third-party output to a new log file for the duration (see the module docstring).
    Does nothing (yields None) when disabled, when stdout/stderr are not real descriptors (click's
    test runner), or when no log folder is writable."""
    global _active
    if not enabled or _active is not None or not (_real_fd(sys.stdout) and _real_fd(sys.stderr)):
        yield None
        return
    try:
        path, fd = _open_log(command)
    except OSError:
        yield None
        return
    sys.stdout.flush()
    sys.stderr.flush()
    term_out, term_err = _terminal(1, sys.stdout), _terminal(2, sys.stderr)
    saved = (os.dup(1), os.dup(2))
    stream = os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="replace")
    old = (sys.stdout, sys.stderr)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    routed = (_Routed(term_out, stream), _Routed(term_err, stream))
    sys.stdout, sys.stderr = routed
    cap = _active = Capture(path, stream)
    with _python_side(cap):
        try:
            yield cap
        finally:
            _active = None
            for s in (term_out, term_err, *old, stream):
                with contextlib.suppress(Exception):
                    s.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for f in saved:
                os.close(f)
            sys.stdout, sys.stderr = old
            routed[0].retarget(old[0])
            routed[1].retarget(old[1])
            for s in (term_out, term_err):
                with contextlib.suppress(Exception):
                    s.close()


@contextlib.contextmanager
def _python_side(cap: Capture) -> Iterator[None]:
    """logging, warnings and rich's global console into the log, and back afterwards."""
    root = logging.getLogger()
    handle = logging.Handler.handle

    def routed_handle(self: logging.Handler, record: logging.LogRecord) -> Any:
        _in_logging.depth = getattr(_in_logging, "depth", 0) + 1
        try:
            return handle(self, record)
        finally:
            _in_logging.depth -= 1

    logging.Handler.handle = routed_handle  # type: ignore[method-assign]
    handler = logging.StreamHandler(cap.stream)
    handler.setFormatter(logging.Formatter(_FORMAT))
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    logging.captureWarnings(True)
    rich_console = _swap_rich_console(cap.stream)
    try:
        yield
    finally:
        logging.Handler.handle = handle  # type: ignore[method-assign]
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(level)
        _swap_rich_console(rich_console, restore=True)
        with contextlib.suppress(Exception):
            cap.stream.close()


def _swap_rich_console(target: Any, restore: bool = False) -> Any:
    try:
        import rich
        from rich.console import Console
    except ImportError:  # pragma: no cover - rich is a core dependency
        return None
    previous = getattr(rich, "_console", None)
    rich._console = target if restore else Console(file=target, force_terminal=False, width=120)
    return previous


__all__ = ["CAPTURED", "Capture", "active", "captured", "hoist_verbose", "log_dir", "show_live", "verbose_requested"]
