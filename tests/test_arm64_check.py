"""The pieces of .ci/arm64_check.py (``make arm64-check``) that work without qemu or root: its
arguments, the mounts it makes in the arm64 root and their cleanup on failure, the sweep of a killed
run's mounts, the test list it runs there (torch-free), and the compile note of an ARM target."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / ".ci" / "arm64_check.py"


@pytest.fixture(scope="module")
def ac():
    spec = importlib.util.spec_from_file_location("arm64_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeRun:
    """Records commands; ``fail`` maps a mount point (str) to the exit code of its mount/umount."""

    def __init__(self, fail_mount=(), fail_umount=()):
        self.calls, self.fail_mount, self.fail_umount = [], set(fail_mount), set(fail_umount)

    def __call__(self, cmd, check=False, **kw):
        self.calls.append(list(cmd))
        point = cmd[-1]
        bad = (cmd[0] == "mount" and point in self.fail_mount) or \
              (cmd[:2] == ["umount", point] and point in self.fail_umount)
        return subprocess.CompletedProcess(cmd, 32 if bad else 0)


def test_arguments_and_defaults(ac, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a = ac.parse_args([])
    assert a.suite == "bookworm" and a.tests == "core" and a.demo is None
    assert a.root == tmp_path / "edgetl" / "arm64-root" / "bookworm"
    assert a.json == REPO / "benchmarks" / "results" / "arm64_check_bookworm.json"
    assert a.cpu == "cortex-a76"
    b = ac.parse_args(["--suite", "bullseye", "--cache", str(tmp_path / "c"), "--tests", "smoke", "--no-check",
                       "--cpu", "cortex-a72"])
    assert b.cpu == "cortex-a72"
    assert b.root == tmp_path / "c" / "bullseye" and b.tests == "smoke" and b.no_check
    assert b.json.name == "arm64_check_bullseye.json"


@pytest.mark.parametrize("argv", [["--suite", "buster"], ["--tests", "all"], ["--cpu", "pentium"], ["--demo", "/nonexistent/run"],
                                  ["--artifact", "/nonexistent/art"]])
def test_bad_arguments_are_refused(ac, argv, capsys):
    with pytest.raises(SystemExit) as e:
        ac.parse_args(argv)
    assert e.value.code == 2


def test_demo_flag_defaults_to_the_demo_run(ac, monkeypatch, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert ac.parse_args(["--demo", str(run)]).demo == str(run)
    monkeypatch.setattr(ac, "REPO", tmp_path)  # the const is fixed at import; a missing default run is refused
    if not (REPO / "demo" / "runs" / "elpv-lite0").is_dir():
        with pytest.raises(SystemExit):
            ac.parse_args(["--demo"])


def test_mounts_are_undone_in_reverse_order(ac, tmp_path):
    run = FakeRun()
    with ac.mounted(tmp_path, run=run) as points:
        assert points == [p for _, p in ac.mount_plan(tmp_path)]
    mounts = [c[-1] for c in run.calls if c[0] == "mount"]
    umounts = [c[-1] for c in run.calls if c[0] == "umount"]
    assert umounts == list(reversed(mounts))
    assert mounts[0].endswith("/proc") and not any(m.endswith("/sys") for m in mounts)  # see the script's docstring


def test_the_emulated_cpuinfo_is_bound_over_proc_cpuinfo(ac, tmp_path):
    assert not any(str(p).endswith("cpuinfo") for _, p in ac.mount_plan(tmp_path))
    (tmp_path / ac.CPUINFO.lstrip("/")).parent.mkdir(parents=True)
    (tmp_path / ac.CPUINFO.lstrip("/")).write_text("x")
    plan = ac.mount_plan(tmp_path)
    assert [p for _, p in plan][:2] == [tmp_path / "proc", tmp_path / "proc" / "cpuinfo"]  # after /proc


@pytest.mark.parametrize("hwcap, hwcap2, cls", [
    (0b11, 0, "arm64 NEON (no dotprod)"),                 # cortex-a72: fp asimd
    ((1 << 20) | 0b11, 0, "arm64 dotprod"),               # cortex-a76: + asimddp
    ((1 << 20) | 0b11, (1 << 13) | (1 << 14), "arm64 i8mm + dotprod"),  # max: + i8mm, bf16
])
def test_emulated_cpuinfo_gives_the_runtime_the_emulated_class(ac, hwcap, hwcap2, cls):
    from edgetl.runtime.cpu import classify, parse_cpuinfo

    text = ac.emulated_cpuinfo("cortex-a76", ac.hwcap_features(hwcap, hwcap2), 2)
    flags, model = parse_cpuinfo(text)
    assert text.count("processor\t:") == 2 and "qemu-user emulation" in model
    assert classify("aarch64", flags, model, 2).isa_class == cls


def test_mounts_are_undone_when_the_command_fails(ac, tmp_path):
    run = FakeRun()
    with pytest.raises(RuntimeError):
        with ac.mounted(tmp_path, run=run):
            raise RuntimeError("the command inside failed")
    assert sorted(c[-1] for c in run.calls if c[0] == "umount") == sorted(c[-1] for c in run.calls if c[0] == "mount")


def test_mounts_are_undone_on_sigterm(ac, tmp_path):
    run = FakeRun()
    with pytest.raises(SystemExit):
        with ac.mounted(tmp_path, run=run):
            ac._sigterm(15, None)
    assert len([c for c in run.calls if c[0] == "umount"]) == len(ac.mount_plan(tmp_path))


def test_a_failed_mount_unmounts_only_the_earlier_ones(ac, tmp_path):
    third = str(ac.mount_plan(tmp_path)[2][1])
    run = FakeRun(fail_mount=[third])
    with pytest.raises(ac.CheckError, match="mount"):
        with ac.mounted(tmp_path, run=run):
            pytest.fail("the body must not run")
    umounts = [c[-1] for c in run.calls if c[0] == "umount"]
    assert umounts == [str(p) for _, p in reversed(ac.mount_plan(tmp_path)[:2])]


def test_a_busy_mount_is_detached_lazily(ac, tmp_path):
    dev_point = str(tmp_path / "dev")
    run = FakeRun(fail_umount=[dev_point])
    with ac.mounted(tmp_path, run=run):
        pass
    assert ["umount", "-l", dev_point] in run.calls


def test_sweep_finds_leftovers_deepest_first(ac, tmp_path):
    root = tmp_path / "my root"
    esc = str(root).replace(" ", "\\040")
    proc = "\n".join([f"proc {esc}/proc proc rw 0 0", f"sysfs {esc}/sys sysfs rw 0 0",
                      f"udev {esc}/dev devtmpfs rw 0 0", f"tmpfs {esc}/dev/shm tmpfs rw 0 0",
                      f"proc {esc}-other/proc proc rw 0 0", "proc /proc proc rw 0 0"])
    found = ac.mounts_under(root, proc)
    assert found[0] == root / "dev" / "shm" and set(found) == {root / "proc", root / "sys", root / "dev",
                                                               root / "dev" / "shm"}
    run = FakeRun()
    assert ac.sweep_mounts(root, run=run, proc_mounts=proc) == found
    assert [c[-1] for c in run.calls] == [str(p) for p in found]
    assert ac.mounts_under(root, "") == []


def test_root_stamp(ac, tmp_path):
    import json

    assert not ac.root_is_ready(tmp_path, "bookworm")
    (tmp_path / ac.ROOT_STAMP).write_text(json.dumps({"suite": "bookworm", "packages": list(ac.ROOT_PACKAGES)}))
    assert ac.root_is_ready(tmp_path, "bookworm") and not ac.root_is_ready(tmp_path, "bullseye")
    (tmp_path / ac.ROOT_STAMP).write_text("{broken")
    assert not ac.root_is_ready(tmp_path, "bookworm")


def test_missing_host_packages(ac):
    assert ac.missing_host_packages(lambda tool: "/usr/bin/" + tool) == []
    assert ac.missing_host_packages(lambda tool: None) == list(ac.HOST_PACKAGES)


def test_chroot_env_passes_no_host_paths(ac, monkeypatch):
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/wheels")  # a host folder the root does not have
    monkeypatch.setenv("PIP_INDEX_URL", "https://example.invalid/simple")
    env = ac.chroot_env()
    assert "PIP_FIND_LINKS" not in env and env["PIP_INDEX_URL"] == "https://example.invalid/simple"
    assert env["QEMU_CPU"] == ac.EMULATED_CPU and ac.chroot_env("max")["QEMU_CPU"] == "max"
    assert env["PATH"].startswith(ac.VENV + "/bin:")


def test_figures_and_comparison(ac):
    x86 = {"float_top1": 0.85, "quant_top1": 0.8448, "drop": 0.52, "agreement": 0.9822, "passed": True,
           "cpu": {"arch": "x86_64"}, "stability": {"perturbations": {"jpeg": {"agreement": 0.975},
                                                                       "bright": {"agreement": 0.971}}}}
    arm = dict(x86, quant_top1=0.8473, agreement=0.9847, drop=0.27, cpu={"arch": "aarch64"}, stability=None)
    fx, fa = ac.figures(x86), ac.figures(arm)
    assert fx["stability_worst"] == 0.971 and "stability_worst" not in fa
    d = ac.compare(fx, fa)
    assert d == {"quant_top1": pytest.approx(0.0025), "agreement": pytest.approx(0.0025), "drop": pytest.approx(-0.25)}
    assert ac.compare(None, fa) is None and ac.figures(None) is None


def _imports(path: Path) -> set:
    """The modules ``path`` imports at module level (what importing it needs)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_tests_run_in_the_root_need_only_the_core(ac):
    """CORE_TESTS run where only the core install (+ CORE_PIP: pytest, onnx for the tests' tiny models)
    exists: none imports torch or a host-only helper at module level."""
    host_only = {"torch", "torchvision", "timm", "nncf", "_tinyrun", "_tinyqdq", "openvino"}
    for rel in ac.CORE_TESTS + ac.SMOKE_TESTS:
        path = REPO / rel
        assert path.is_file(), rel
        bad = _imports(path) & host_only
        assert not bad, f"{rel} imports {bad}: it cannot run in the arm64 root's core install"
    assert not _imports(REPO / "tests" / "_tinyartifact.py") & host_only
    assert any(x.startswith("onnx") for x in ac.CORE_PIP)


def test_the_script_runs_on_python_38_syntax(ac):
    """The host side may be any Python 3.8+: no 3.9+ syntax evaluated at import (the annotations are strings)."""
    ast.parse(SCRIPT.read_text(encoding="utf-8"), str(SCRIPT), feature_version=(3, 8))


def test_cleanup_only_needs_no_root(ac, tmp_path, capsys):
    assert ac.main(["--cache", str(tmp_path), "--cleanup-only"]) == 0
    assert "unmounted 0" in capsys.readouterr().out


def test_help_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--suite" in out and "bullseye" in out


# ---- the compile's note: the gate of an ARM target ran on this machine's kernels -----------------

def test_arm_target_compiled_on_x86_says_its_gate_ran_on_x86(monkeypatch):
    from edgetl import compile as comp
    from edgetl.runtime import cpu
    from edgetl.targets import load_target

    monkeypatch.setattr(cpu, "host_cpu", lambda: cpu.classify("x86_64", ["avx2", "fma"], "AMD EPYC", 2))
    note = comp.foreign_kernels_note(load_target("arm64-cpu-onnxruntime"))
    assert note and "x86_64 kernels" in note and "aarch64" in note
    assert "make arm64-check" in note and "edgetl check ARTIFACT --backend onnxruntime" in note
    assert comp.foreign_kernels_note(load_target("x86-cpu-onnxruntime")) is None
    assert comp.foreign_kernels_note(load_target("jetson-orin-nano")) is None  # TensorRT: the reference gate
    monkeypatch.setattr(cpu, "host_cpu", lambda: cpu.classify("aarch64", ["asimd", "asimddp"], "", 4))
    assert comp.foreign_kernels_note(load_target("arm64-cpu-onnxruntime")) is None


def test_the_note_goes_into_report_files_and_stays_sealed(tmp_path):
    from _tinyartifact import make_tiny_artifact
    from edgetl import compile as comp
    from edgetl.check import REPORT_JSON, REPORT_MD
    from edgetl.runtime.manifest import read_manifest, verify_files

    art = make_tiny_artifact(tmp_path / "art")
    (art / REPORT_JSON).write_text("{}")
    (art / REPORT_MD).write_text("# report\n")
    comp.seal(art, read_manifest(art))
    comp._add_report_notes(art, ["gate ran on x86_64 kernels"])
    comp._add_report_notes(art, ["gate ran on x86_64 kernels"])  # recorded once
    import json

    assert json.loads((art / REPORT_JSON).read_text())["notes"] == ["gate ran on x86_64 kernels"]
    md = (art / REPORT_MD).read_text()
    assert md.count("## Notes") == 1 and "- gate ran on x86_64 kernels" in md
    verify_files(art, read_manifest(art))


# ---- found by the bullseye root (Python 3.9): target profiles load on the device's older Pythons -------

def test_profile_field_types_without_pep604(monkeypatch):
    """On Python < 3.10 typing.get_type_hints cannot evaluate ``int | None``: edgetl.targets.dataclass_hints
    evaluates each part itself and must give the same types (the bullseye root's `edgetl targets`)."""
    import dataclasses
    import typing

    from edgetl import targets

    classes = [targets.TargetProfile] + list(targets.SECTION_TYPES.values())
    real = {c: typing.get_type_hints(c) for c in classes}

    def old_python(cls, *a, **k):
        raise TypeError("unsupported operand type(s) for |: 'type' and 'type'")

    monkeypatch.setattr(typing, "get_type_hints", old_python)
    for c in classes:
        got = targets.dataclass_hints(c)
        assert set(got) == {f.name for f in dataclasses.fields(c)}
        for name, tp in got.items():
            want = real[c][name]
            assert typing.get_origin(tp) in (typing.get_origin(want), typing.Union) or tp == want, (c, name, tp, want)
            assert set(typing.get_args(tp)) == set(typing.get_args(want)), (c, name)
    names = [p.name for p in targets.list_targets()]  # validation runs through dataclass_hints
    assert "arm64-cpu-onnxruntime" in names and "jetson-xavier-nx" in names
    with pytest.raises(targets.TargetError, match="must be"):
        targets.apply_overrides(targets.load_target("jetson-agx-orin"), sets=["tensorrt.dla_core=x"])


def test_deselected_tests_exist(ac):
    for node in ac.EMULATION_DESELECT:
        rel, _, func = node.partition("::")
        assert f"def {func}(" in (REPO / rel).read_text(encoding="utf-8"), node
        assert rel in ac.CORE_TESTS


@pytest.mark.parametrize("skip", [True, False])
def test_a_machine_without_binfmt_skips_only_when_asked(ac, tmp_path, monkeypatch, skip):
    import json

    def no_binfmt(no_apt):
        raise ac.Unsupported("qemu-aarch64 is not registered with binfmt_misc")

    monkeypatch.setattr(ac, "ensure_host", no_binfmt)
    monkeypatch.setattr(ac.os, "geteuid", lambda: 0)
    monkeypatch.setattr(ac.signal, "signal", lambda *a: None)
    out = tmp_path / "r.json"
    argv = ["--cache", str(tmp_path / "c"), "--json", str(out)] + (["--skip-unsupported"] if skip else [])
    assert ac.main(argv) == (0 if skip else 1)
    rec = json.loads(out.read_text())
    assert rec["passed"] is skip and rec.get("skipped", False) is skip and "binfmt" in rec["error"]
    assert rec["phases"][0]["phase"] == "host packages" and rec["phases"][0]["status"].startswith("failed")


def test_a_failed_root_build_is_a_recorded_failure_not_a_traceback(ac, tmp_path, monkeypatch, capsys):
    """CI's fresh machine: mmdebstrap exits 25 ("install arch-test for foreign architecture support")."""
    import json
    import subprocess

    def mmdebstrap_fails(root, suite, mirror):
        raise subprocess.CalledProcessError(25, ["mmdebstrap", "--arch=arm64", suite, str(root)])

    monkeypatch.setattr(ac, "ensure_host", lambda no_apt: None)
    monkeypatch.setattr(ac, "host_cpu", lambda python: None)
    monkeypatch.setattr(ac, "build_root", mmdebstrap_fails)
    monkeypatch.setattr(ac.os, "geteuid", lambda: 0)
    monkeypatch.setattr(ac.signal, "signal", lambda *a: None)
    out = tmp_path / "r.json"
    assert ac.main(["--cache", str(tmp_path / "c"), "--json", str(out), "--skip-unsupported"]) == 1
    rec = json.loads(out.read_text())
    assert rec["passed"] is False and "mmdebstrap" in rec["error"] and "25" in rec["error"]
    assert [p["phase"] for p in rec["phases"]] == ["host packages", "root (mmdebstrap)"]
    assert "FAILED" in capsys.readouterr().out
    assert "arch-test" in ac.HOST_PACKAGES  # what mmdebstrap needed on that machine


def test_a_root_is_never_removed_through_a_mount(ac, tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    monkeypatch.setattr(ac, "sweep_mounts", lambda path: [])  # the umount "failed"
    monkeypatch.setattr(ac, "mounts_under", lambda path: [root / "dev"])
    with pytest.raises(ac.CheckError, match="still mounted"):
        ac.remove_root(root)
    assert (root / "dev").is_dir()
    monkeypatch.setattr(ac, "mounts_under", lambda path: [])
    ac.remove_root(root)
    assert not root.exists()
