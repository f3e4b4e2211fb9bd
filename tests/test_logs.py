"""Third-party output goes to a log file, edgetl's own lines stay on the terminal (edgetl.logs, issue #18).

The capture works on real file descriptors, so each case runs in a child process whose stdout and
stderr are pipes, as a user's terminal would be."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _tinyrun import TINY, session_tiny_run
from edgetl.logs import Capture, _source, hoist_verbose, verbose_requested

CHILD = textwrap.dedent("""
    import logging, os, sys, warnings
    from edgetl import logs

    class FollowsStderr(logging.Handler):  # like torch._logging's handler: whatever sys.stderr is now
        def emit(self, record):
            sys.stderr.write("W1130 12:00:00.000 1 torch/x.py:1] " + record.getMessage() + "\\n")

    with logs.captured("test", True) as cap:
        print("own stdout line")
        sys.stderr.write("own stderr line\\n")
        sys.stdout.flush(); sys.stderr.flush()
        os.write(1, b"native fd1 line\\n")
        os.write(2, b"native fd2 error line\\n")
        logging.getLogger("somelib.sub").warning("a library warning")
        lib = logging.getLogger("nncf")  # its own handler on the terminal stream, made during the command
        lib.propagate = False
        lib.addHandler(logging.StreamHandler(sys.stdout))
        lib.setLevel(logging.INFO)
        lib.info("INFO:nncf:progress of a library")
        torchy = logging.getLogger("torchy")
        torchy.propagate = False
        torchy.addHandler(FollowsStderr())
        torchy.warning("deprecated enum")
        warnings.warn("a python warning", DeprecationWarning)
        import rich.progress
        for _ in rich.progress.track(range(3), description="library bar"):
            pass
        print("own stdout line 2")
    lib.info("after the capture")  # the library's handler still works, on the real stdout
    print("LOG=" + str(cap.path))
    print("SUMMARY=" + str(cap.summary(failed=False)))
""")


def _child(tmp_path: Path, code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "EDGETL_LOG_DIR": str(tmp_path / "logs"), **(env or {})}
    e.pop("EDGETL_VERBOSE", None)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=e, timeout=300)


def test_third_party_output_goes_to_the_log_and_own_lines_stay(tmp_path):
    p = _child(tmp_path, CHILD)
    assert p.returncode == 0, p.stderr
    out, err = p.stdout, p.stderr
    assert "own stdout line" in out and "own stdout line 2" in out and "own stderr line" in err
    log = Path(next(ln[4:] for ln in out.splitlines() if ln.startswith("LOG=")))
    text = log.read_text()
    for line in ("native fd1 line", "native fd2 error line", "a library warning", "progress of a library",
                 "deprecated enum", "a python warning", "library bar"):
        assert line in text, line
        assert line not in out and line not in err, line
    assert "own stdout line" not in text and "own stderr line" not in text
    assert "after the capture" in out  # the handler bound during the capture writes to the real stream after it
    summary = next(ln for ln in out.splitlines() if ln.startswith("SUMMARY="))
    assert str(log) in summary and "--verbose" in summary
    assert "torch 1" in summary and "somelib 1" in summary  # where the warnings came from


def test_summary_only_when_it_matters(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("INFO:nncf:Compiling and loading torch extension\nStatistics collection 100%\n")
    assert Capture(log, None).summary(failed=False) is None  # info only, the command succeeded
    assert "no warning" in Capture(log, None).summary(failed=True)  # a failed command names its log
    log.write_text("")
    assert Capture(log, None).summary(failed=True) is None and not log.exists()  # empty: deleted
    assert _source("WARNING:py.warnings:x") == "py"
    assert _source("W1130 17:33:39.045000 9399 torch/utils/cpp_extension.py:183] x") == "torch"
    assert _source("Error in cpuinfo: failed to parse") == "other"


def test_verbose_flag_and_environment(monkeypatch):
    monkeypatch.delenv("EDGETL_VERBOSE", raising=False)
    assert verbose_requested(["--verbose", "compile", "run"])
    assert verbose_requested(["compile", "run", "--verbose"])  # after the command too
    assert hoist_verbose(["compile", "run", "--verbose", "--out", "a"]) == ["--verbose", "compile", "run", "--out", "a"]
    assert not verbose_requested(["compile", "run"])
    assert not verbose_requested(["run", "--", "--verbose"])  # an argument, not the flag
    assert hoist_verbose(["run", "--", "--verbose"]) == ["run", "--", "--verbose"]
    monkeypatch.setenv("EDGETL_VERBOSE", "1")
    assert verbose_requested(["compile"])


def test_no_capture_without_real_descriptors(tmp_path, monkeypatch, capsys):
    """click's test runner and pytest's capsys have no descriptors: nothing is captured, nothing breaks."""
    from edgetl import logs

    monkeypatch.setenv("EDGETL_LOG_DIR", str(tmp_path / "logs"))
    with logs.captured("x", True) as cap:
        print("hello")
    assert cap is None and "hello" in capsys.readouterr().out and not (tmp_path / "logs").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return session_tiny_run(tmp_path_factory)


CLI = "import sys; from edgetl.cli import main; sys.exit(main(sys.argv[1:]))"


def test_compile_output_is_quiet_and_verbose_shows_it(tiny_run, tmp_path):
    """A real compile: ONNX Runtime's quantizer logs (INFO:onnxruntime...) go to the log; --verbose shows
    them live and writes no log."""
    args = ["compile", str(tiny_run), "--target", "x86-cpu-onnxruntime", "--method", "ptq", *TINY]
    p = _child(tmp_path, CLI, *args, "--out", str(tmp_path / "a"))
    assert p.returncode == 0, p.stderr
    assert "deployable" in p.stdout  # edgetl's own summary
    assert "INFO:onnxruntime" not in p.stdout + p.stderr
    logs = list((tmp_path / "logs").glob("compile-*.log"))
    assert len(logs) == 1 and "INFO:onnxruntime" in logs[0].read_text()
    v = _child(tmp_path / "v", CLI, *args, "--out", str(tmp_path / "b"), "--verbose")
    assert v.returncode == 0, v.stderr
    assert "INFO:onnxruntime" in v.stdout + v.stderr and not (tmp_path / "v" / "logs").exists()
