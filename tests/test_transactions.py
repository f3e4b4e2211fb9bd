"""Fault injection: ``check``, ``build``, ``bench`` (in-place updates) and ``quantize`` (a new
folder, like ``compile``) are killed with SIGKILL or SIGTERM at every step of their transaction
(``EDGETL_FAULT``, see ``edgetl.artifact.FAULT_POINTS``) and at spread-out times; afterwards the
artifact is the old one or the new one, verified as a whole, and once the next command has run
(``recover``) no temp folder or lock is left beside it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _tinyqdq import make_qdq_artifact
from _tinyrun import session_tiny_run
from edgetl.artifact import FAULT_POINTS, folder_lock, recover
from edgetl.runtime.manifest import read_manifest, verify_files

UPDATE_POINTS = [p for p in FAULT_POINTS if p.startswith("update:")]
COMMITTED = {"update:ready", "update:moved-old", "update:swapped"}  # past the commit point: the new one
COMMANDS = {
    "check": ["check", "{art}", "--backend", "reference"],
    "build": ["build", "{art}", "--target", "x86-cpu-onnxruntime", "--no-gate"],
    "bench": ["bench", "{art}", "--backends", "ort-int8", "--reps", "2", "--rounds", "1"],
}
KILLED = (-signal.SIGKILL, 143)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_qdq_artifact(tmp_path_factory.mktemp("txn") / "art")


def edgetl(args: list[str], fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGETL_FAULT": fault or ""}
    return subprocess.run([sys.executable, "-m", "edgetl.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def settle(folder: Path) -> None:
    """What the next command on the folder does first."""
    with folder_lock(folder):
        recover(folder)


def is_new(folder: Path, command: str) -> bool:
    m = read_manifest(folder)
    return {"check": m.gate is not None, "build": bool(m.builds),
            "bench": "bench.json" in m.files}[command]


def fresh(pristine: Path, tmp_path: Path) -> tuple[Path, str]:
    art = tmp_path / "art"
    shutil.copytree(pristine, art)
    return art, read_manifest(art).digest


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("point", UPDATE_POINTS)
def test_sigkill_at_every_step_of_an_update(pristine, tmp_path, command, point):
    art, digest = fresh(pristine, tmp_path)
    r = edgetl([a.format(art=art) for a in COMMANDS[command]], fault=point)
    assert r.returncode == -signal.SIGKILL, r.stderr
    if point not in COMMITTED:  # before the commit the folder was never touched
        assert read_manifest(art).digest == digest
        verify_files(art)
    settle(art)
    verify_files(art)
    assert is_new(art, command) == (point in COMMITTED)
    if point not in COMMITTED:
        assert read_manifest(art).digest == digest
    assert leftovers(art) == []


@pytest.mark.parametrize("point", UPDATE_POINTS)
def test_sigterm_at_every_step_of_an_update_cleans_up_itself(pristine, tmp_path, point):
    art, digest = fresh(pristine, tmp_path)
    r = edgetl([a.format(art=art) for a in COMMANDS["check"]], fault=point + "@TERM")
    assert r.returncode == 143, r.stderr
    assert "terminated" in r.stderr and "Traceback" not in r.stderr
    verify_files(art)
    assert leftovers(art) == []  # no recovery needed: the handler unwound, the commit finished or never began
    assert is_new(art, "check") == (point in COMMITTED)


def test_sigkill_at_spread_out_times_of_check(pristine, tmp_path):
    """Timed kills land wherever the command happens to be (imports, gate, hashing, renames)."""
    outcomes = []
    for i, delay in enumerate((0.3, 0.8, 1.3, 1.8, 2.4, 3.0, 3.8, 4.8)):
        art, digest = fresh(pristine, tmp_path / str(i))
        proc = subprocess.Popen([sys.executable, "-m", "edgetl.cli", *COMMANDS["check"][:1], str(art),
                                 *COMMANDS["check"][2:]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        settle(art)
        verify_files(art)
        assert leftovers(art) == []
        new = is_new(art, "check")
        assert new or read_manifest(art).digest == digest
        outcomes.append(new)
    assert outcomes[0] is False  # the first kill lands before any work


def test_two_commands_on_one_artifact_the_second_is_refused(pristine, tmp_path):
    art, _ = fresh(pristine, tmp_path)
    with folder_lock(art):
        r = edgetl([a.format(art=art) for a in COMMANDS["check"]])
    assert r.returncode == 2 and "another edgetl command is working on it" in r.stderr
    assert edgetl([a.format(art=art) for a in COMMANDS["check"]]).returncode in (0, 1)
    assert leftovers(art) == []


@pytest.mark.parametrize("point,sig", [("new:work", "KILL"), ("new:sealed", "KILL"), ("new:moved-old", "KILL"),
                                       ("new:moved-old", "TERM"), ("new:work", "TERM")])
def test_a_killed_quantize_leaves_the_old_folder_or_the_new(tmp_path_factory, tmp_path, point, sig):
    """``quantize``/``compile``/``train`` write a new folder: killed at each step of the rename over an
    existing --out, the next command finds the old folder or the new one, and no partial folder."""
    run = session_tiny_run(tmp_path_factory)
    out = tmp_path / "art"
    args = ["quantize", str(run), "--out", str(out), "--calib-min", "8", "--no-speed-check", "--overwrite"]
    assert edgetl(args).returncode == 0
    digest = read_manifest(out).digest
    r = edgetl(args, fault=f"{point}@{sig}")
    assert r.returncode in KILLED, r.stderr
    if sig == "TERM":
        assert leftovers(out) == []
    settle(out)
    verify_files(out)
    assert leftovers(out) == []
    changed = read_manifest(out).digest != digest
    assert changed == (sig == "TERM" and point == "new:moved-old")  # a held signal lets the rename finish


def test_overwrite_only_replaces_a_folder_edgetl_wrote(tmp_path_factory, tmp_path):
    """Finding 8: ``--out runs --overwrite`` must not wipe a folder of runs."""
    run = session_tiny_run(tmp_path_factory)
    mine = tmp_path / "runs"
    (mine / "keep").mkdir(parents=True)
    (mine / "keep" / "notes.txt").write_text("mine")
    r = edgetl(["quantize", str(run), "--out", str(mine), "--overwrite", "--calib-min", "8"])
    assert r.returncode == 2 and "not an edgetl run or artifact" in r.stderr
    assert (mine / "keep" / "notes.txt").read_text() == "mine"
    assert leftovers(mine) == []


def test_stale_partial_folders_are_removed_by_the_next_command(tmp_path_factory, tmp_path):
    """Finding 14: partial folders of killed commands do not pile up."""
    run = session_tiny_run(tmp_path_factory)
    out = tmp_path / "art"
    args = ["quantize", str(run), "--out", str(out), "--calib-min", "8", "--no-speed-check"]
    for _ in range(2):  # the second removes what the first left, then leaves its own
        assert edgetl(args, fault="new:work").returncode == -signal.SIGKILL
        assert len([n for n in leftovers(out) if ".partial-" in n]) == 1
    assert edgetl(args).returncode == 0
    assert leftovers(out) == []
    verify_files(out)


@pytest.mark.parametrize("point", ["new:sealed", "new:moved-old"])
def test_a_killed_compile_over_an_existing_artifact(tmp_path_factory, tmp_path, point):
    """``compile --overwrite`` SIGKILLed before and in the middle of replacing the artifact."""
    run = session_tiny_run(tmp_path_factory)
    out = tmp_path / "art"
    args = ["compile", str(run), "--target", "x86-cpu-onnxruntime", "--out", str(out), "--overwrite",
            "--method", "ptq", "--calib-min", "8", "--no-speed-check"]
    assert edgetl(args).returncode in (0, 1)
    digest = read_manifest(out).digest
    assert edgetl(args, fault=point).returncode == -signal.SIGKILL
    settle(out)
    verify_files(out)
    assert read_manifest(out).digest == digest and leftovers(out) == []
