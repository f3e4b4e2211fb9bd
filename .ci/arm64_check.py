#!/usr/bin/env python3
"""The ARM check without an ARM board: a Debian arm64 root run under qemu-user emulation.

``make arm64-check`` (bookworm: the ARM gate) and ``make jetson-userland-check`` (bullseye: glibc 2.31
and Python 3.9, the oldest userland of the JetPacks the profiles offer) call this script. As root on
Debian/Ubuntu it:

1. installs the host packages it needs (``apt-get update``, then qemu-user-static, binfmt-support,
   mmdebstrap, arch-test) and registers qemu-aarch64 with binfmt_misc;
2. builds a Debian arm64 root with mmdebstrap (python3, python3-venv, ca-certificates), cached under
   ``--cache`` (default ``$HOME/.cache/edgetl/arm64-root/<suite>``) and reused by the next run;
3. copies this checkout (git's tracked and untracked-not-ignored files) into the root and installs its
   core (``pip install .``: numpy, OpenCV, ONNX Runtime; no torch) into a venv inside the root, also cached;
4. runs the runtime's torch-free tests there (``CORE_TESTS``);
5. compiles, on the host, artifacts for ``arm64-cpu-onnxruntime`` (a tiny run; with ``--demo`` the demo's
   run) and runs ``edgetl check ART --backend onnxruntime`` on them inside the root, so the ARM target's
   gate is judged on ARM kernels, next to the figures the host's x86 kernels gave at compile time;
6. runs ``edgetl run`` on a video and on an image folder inside the root;
7. writes every phase's time and the figures to ``--json`` (benchmarks/results/arm64_check_<suite>.json).

The emulated CPU is ``--cpu`` (qemu's model; default cortex-a76, the Raspberry Pi 5's core: NEON +
dot-product, no i8mm; cortex-a72 is the Pi 4's, NEON only; max adds i8mm). ONNX Runtime picks its INT8
kernels from the CPU features the kernel reports (getauxval(AT_HWCAP/AT_HWCAP2)), which qemu sets for
that model. /proc and /dev are mounted into the root only while a command runs in it, with a
/proc/cpuinfo that lists the same features (so `edgetl check` records the emulated CPU's class, not
the x86 host's flags), and unmounted in reverse order afterwards, also on failure or SIGTERM; mounts
left by a killed earlier run are swept at start. The host's /sys is NOT mounted: with it, ONNX
Runtime's cpuinfo (1.32) reads the host's x86 topology next to an x86 /proc/cpuinfo and crashes under
qemu-user (SIGSEGV at import); without any /sys it fails to initialise and warns. The root's /sys is
a plain folder holding only the CPU lists (devices/system/cpu/possible, present, online), with which
cpuinfo initialises from the emulated /proc/cpuinfo and getauxval, as on a board.
Emulated speed is meaningless (about 1 frame/s for a 224 px model) and is not gated; the arithmetic is ARM's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
SUITES = {"bookworm": "ARM gate (Debian 12: glibc 2.36, Python 3.11)",
          "bullseye": "Jetson userland (Debian 11: glibc 2.31 as on JetPack 5, Python 3.9)"}
# arch-test: mmdebstrap >= 1.3 refuses a foreign --arch without it ("install arch-test for foreign architecture
# support") and only Recommends it, which --no-install-recommends leaves out.
HOST_PACKAGES = ("qemu-user-static", "binfmt-support", "mmdebstrap", "arch-test")
HOST_TOOLS = {"qemu-user-static": "qemu-aarch64-static", "binfmt-support": "update-binfmts", "mmdebstrap": "mmdebstrap",
              "arch-test": "arch-test"}
ROOT_PACKAGES = ("python3", "python3-venv", "ca-certificates")
ROOT_STAMP = ".edgetl-arm64-root"  # written last: a root without it is incomplete and rebuilt
SRC, VENV, WORK = "/opt/edgetl/src", "/opt/edgetl/venv", "/opt/edgetl/work"
TESTRUN = "/opt/edgetl/testrun"
CPUINFO = "/opt/edgetl/cpuinfo"  # bind-mounted over the root's /proc/cpuinfo
# qemu CPU model -> (ARM "CPU part" as /proc/cpuinfo spells it, the board it stands for)
QEMU_CPUS = {"cortex-a72": ("0xd08", "Raspberry Pi 4 (NEON, no dot-product)"),
             "cortex-a76": ("0xd0b", "Raspberry Pi 5 (NEON + dot-product)"),
             "neoverse-n1": ("0xd0c", "Arm server cores, Graviton2 (NEON + dot-product)"),
             "max": ("0x000", "every feature qemu emulates (dot-product, i8mm, bf16, SVE)")}
# Linux arm64 hwcap bits (arch/arm64/include/uapi/asm/hwcap.h) -> the names /proc/cpuinfo prints
HWCAP_NAMES = ("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp",
               "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512",
               "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg")
HWCAP2_NAMES = ("dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint",
                "svei8mm", "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte")
ARM_TARGET = "arm64-cpu-onnxruntime"
# The runtime's tests that need only the core install (no torch, no onnx package): run inside the root.
CORE_TESTS = ("tests/test_torch_free.py", "tests/test_manifest.py", "tests/test_preprocess.py",
              "tests/test_targets.py", "tests/test_sources.py", "tests/test_run_cli.py")
# Wall-clock assertions mean nothing under emulation on a loaded host: each failed once in the bullseye
# root at load 5-7 on 2 cores (pacing off by 1 ms; 6 frames, not more, before a stream was lost) and
# passed in the bookworm root
EMULATION_DESELECT = ("tests/test_sources.py::test_realtime_paces_a_file_at_its_fps",
                      "tests/test_run_cli.py::test_lost_http_stream_is_retried_then_fails_with_exit_3")
SMOKE_TESTS = ("tests/test_torch_free.py", "tests/test_manifest.py")
CORE_PIP = ("pytest>=8", "pytest-timeout>=2.2", "onnx>=1.16")  # onnx: the tests' tiny models (not the runtime)
# The environment commands see inside the root: nothing of the host's but the registry settings.
PASS_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_DEFAULT_TIMEOUT", "PIP_TRUSTED_HOST",
            "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
ROOT_CA = "/etc/ssl/certs/edgetl-host-ca.crt"

Runner = Callable[..., "subprocess.CompletedProcess[str]"]
EMULATED_CPU = "cortex-a76"  # --cpu sets it for the run


def log(msg: str) -> None:
    print(f"[arm64-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class CheckError(RuntimeError):
    pass


class Unsupported(CheckError):
    """This machine cannot run arm64 binaries (no binfmt_misc registration possible, e.g. an unprivileged container)."""


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------

def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgetl" / "arm64-root"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="arm64_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default="bookworm",
                   help="Debian release of the root: bookworm (the ARM gate) or bullseye (the Jetson userland).")
    p.add_argument("--cache", type=Path, default=None,
                   help="Where roots are cached (one folder per suite). [default: $HOME/.cache/edgetl/arm64-root]")
    p.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror for mmdebstrap.")
    p.add_argument("--cpu", choices=sorted(QEMU_CPUS), default="cortex-a76",
                   help="The emulated CPU (qemu's -cpu): its features choose ONNX Runtime's INT8 kernels.")
    p.add_argument("--rebuild", action="store_true", help="Build the root and its venv again, ignoring the cache.")
    p.add_argument("--tests", choices=("core", "smoke", "none"), default="core",
                   help="Which torch-free tests run inside the root: core (CORE_TESTS), smoke, none.")
    p.add_argument("--demo", nargs="?", const=str(REPO / "demo" / "runs" / "elpv-lite0"), default=None,
                   metavar="RUN", help="Also compile and ARM-check the demo's run (default demo/runs/elpv-lite0).")
    p.add_argument("--artifact", action="append", type=Path, default=[],
                   help="An artifact already compiled for arm64-cpu-onnxruntime to ARM-check (repeatable).")
    p.add_argument("--no-tiny", action="store_true", help="Skip the tiny generated run's artifact.")
    p.add_argument("--no-check", action="store_true", help="Skip `edgetl check` inside the root.")
    p.add_argument("--no-run", action="store_true", help="Skip `edgetl run` inside the root.")
    p.add_argument("--host-python", default=sys.executable,
                   help="The host Python with the train extra that compiles the artifacts. [default: this one]")
    p.add_argument("--json", type=Path, default=None,
                   help="Write the phases and figures here. [default: benchmarks/results/arm64_check_<suite>.json]")
    p.add_argument("--no-apt", action="store_true", help="Do not install host packages (they must be there).")
    p.add_argument("--skip-unsupported", action="store_true",
                   help="Exit 0, saying so, where arm64 binaries cannot run here (CI in an unprivileged container).")
    p.add_argument("--cleanup-only", action="store_true", help="Unmount what a killed run left in the root and exit.")
    a = p.parse_args(argv)
    a.cache = (a.cache or default_cache()).expanduser()
    a.root = a.cache / a.suite
    if a.json is None:
        a.json = REPO / "benchmarks" / "results" / f"arm64_check_{a.suite}.json"
    if a.demo and not Path(a.demo).is_dir():
        p.error(f"--demo {a.demo}: no such run folder")
    for art in a.artifact:
        if not (art / "manifest.json").is_file():
            p.error(f"--artifact {art}: not an artifact folder (no manifest.json)")
    return a


# --------------------------------------------------------------------------------------------
# Mounts: /proc, /sys, /dev in the root while a command runs, always unmounted afterwards
# --------------------------------------------------------------------------------------------

def mount_plan(root: Path) -> List[Tuple[List[str], Path]]:
    """(mount arguments, mount point) in mounting order: /proc with the emulated CPU's cpuinfo over
    /proc/cpuinfo (when written), /dev. Not /sys: see the module's docstring."""
    plan = [(["-t", "proc", "proc"], root / "proc")]
    if (root / CPUINFO.lstrip("/")).is_file():
        plan.append((["--bind", str(root / CPUINFO.lstrip("/"))], root / "proc" / "cpuinfo"))
    return plan + [(["--bind", "/dev"], root / "dev"), (["-t", "tmpfs", "tmpfs"], root / "dev" / "shm")]


def hwcap_features(hwcap: int, hwcap2: int) -> List[str]:
    """The /proc/cpuinfo ``Features`` names of AT_HWCAP and AT_HWCAP2."""
    return ([n for i, n in enumerate(HWCAP_NAMES) if hwcap >> i & 1] +
            [n for i, n in enumerate(HWCAP2_NAMES) if hwcap2 >> i & 1])


def emulated_cpuinfo(cpu: str, features: Sequence[str], cores: int) -> str:
    """A /proc/cpuinfo as an arm64 Linux kernel prints it, for ``cores`` cores of ``cpu``."""
    part = QEMU_CPUS.get(cpu, ("0x000", ""))[0]
    block = (f"BogoMIPS\t: 50.00\nFeatures\t: {' '.join(features)}\nCPU implementer\t: 0x41\n"
             f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 0\n")
    head = f"model name\t: {cpu} (qemu-user emulation)\n"
    return "\n".join(f"processor\t: {i}\n{head}{block}" for i in range(max(1, cores)))


def write_emulated_cpuinfo(root: Path, cpu: str) -> List[str]:
    """Read AT_HWCAP/AT_HWCAP2 of the emulated CPU inside the root; write the cpuinfo mount_plan binds."""
    code = ("import ctypes; f = ctypes.CDLL(None).getauxval; f.restype = ctypes.c_ulong; "
            "f.argtypes = [ctypes.c_ulong]; print(f(16), f(26))")
    r = subprocess.run(["chroot", str(root), "/usr/bin/python3", "-c", code], env=chroot_env(cpu), text=True,
                       stdout=subprocess.PIPE, check=True)
    hwcap, hwcap2 = (int(x) for x in r.stdout.split())
    features = hwcap_features(hwcap, hwcap2)
    path = root / CPUINFO.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    path.write_text(emulated_cpuinfo(cpu, features, cores))
    # the CPU lists ONNX Runtime's cpuinfo reads first (the root's /sys is a plain folder: nothing mounted)
    cpus = root / "sys" / "devices" / "system" / "cpu"
    cpus.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (cpus / name).write_text(f"0-{cores - 1}\n" if cores > 1 else "0\n")
    return features


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal (\\040 ...)."""
    for code, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, ch)
    return field


def mounts_under(root: Path, proc_mounts: Optional[str] = None) -> List[Path]:
    """Mount points at or below ``root``, deepest first (the order to unmount them in)."""
    if proc_mounts is None:
        try:
            proc_mounts = Path("/proc/mounts").read_text()
        except OSError:
            return []
    root = Path(os.path.abspath(root))
    found = []
    for line in proc_mounts.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        point = Path(_unescape(parts[1]))
        if point == root or root in point.parents:
            found.append(point)
    return sorted(set(found), key=lambda p: (len(p.parts), str(p)), reverse=True)


def sweep_mounts(root: Path, run: Runner = subprocess.run, proc_mounts: Optional[str] = None) -> List[Path]:
    """Unmount whatever is mounted below ``root`` (a killed run's leftovers); lazily if busy."""
    left = mounts_under(root, proc_mounts)
    for point in left:
        if run(["umount", str(point)], check=False).returncode != 0:
            run(["umount", "-l", str(point)], check=False)
    return left


@contextmanager
def mounted(root: Path, run: Runner = subprocess.run) -> Iterator[List[Path]]:
    """Mount ``mount_plan(root)``; on exit (normal, exception, SIGTERM via SystemExit) unmount, in
    reverse order, exactly what was mounted. A failed mount unmounts the earlier ones and raises."""
    done: List[Path] = []
    try:
        for args, point in mount_plan(root):
            if not point.exists():
                point.mkdir(parents=True)
            r = run(["mount", *args, str(point)], check=False)
            if r.returncode != 0:
                raise CheckError(f"mount {' '.join(args)} {point} failed (exit {r.returncode})")
            done.append(point)
        yield list(done)
    finally:
        for point in reversed(done):
            if run(["umount", str(point)], check=False).returncode != 0:
                run(["umount", "-l", str(point)], check=False)


def _sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise SystemExit(128 + signum)  # unwinds through mounted()'s finally


# --------------------------------------------------------------------------------------------
# Host set-up, the root, commands inside it
# --------------------------------------------------------------------------------------------

def missing_host_packages(which: Callable[[str], Optional[str]] = shutil.which) -> List[str]:
    return [pkg for pkg in HOST_PACKAGES if which(HOST_TOOLS[pkg]) is None]


def ensure_host(no_apt: bool) -> None:
    missing = missing_host_packages()
    if missing:
        if no_apt or os.geteuid() != 0 or not shutil.which("apt-get"):
            raise CheckError(f"missing host packages: {' '.join(missing)} "
                             "(run as root on Debian/Ubuntu, or install them: apt-get install " + " ".join(missing) + ")")
        log("apt-get update && apt-get install " + " ".join(missing))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env)
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], check=False)
    if not (binfmt / "qemu-aarch64").exists():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=False)
    if not (binfmt / "qemu-aarch64").exists():
        raise Unsupported("qemu-aarch64 is not registered with binfmt_misc (update-binfmts --enable qemu-aarch64 "
                          "failed): a container needs --privileged or the host's registration")


def root_is_ready(root: Path, suite: str) -> bool:
    stamp = root / ROOT_STAMP
    if not stamp.is_file():
        return False
    try:
        info = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return info.get("suite") == suite and info.get("packages") == list(ROOT_PACKAGES)


def remove_root(path: Path) -> None:
    """rm -rf of a root, never through a mount (a bound /dev would take the host's device nodes with it)."""
    sweep_mounts(path)
    left = mounts_under(path)
    if left:
        raise CheckError(f"{left[0]} is still mounted: not removing {path} (umount it, then run again)")
    shutil.rmtree(path, ignore_errors=True)


def build_root(root: Path, suite: str, mirror: str) -> None:
    """mmdebstrap into ``root``.tmp, then rename: an interrupted build never looks complete."""
    tmp = root.with_name(root.name + ".tmp")
    remove_root(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["mmdebstrap", "--arch=arm64", "--variant=apt", "--include=" + ",".join(ROOT_PACKAGES),
           suite, str(tmp), mirror]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True)
    (tmp / ROOT_STAMP).write_text(json.dumps({"suite": suite, "packages": list(ROOT_PACKAGES),
                                              "mirror": mirror, "built": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    remove_root(root)
    tmp.rename(root)


def chroot_env(cpu: Optional[str] = None) -> Dict[str, str]:
    env = {"QEMU_CPU": cpu or EMULATED_CPU, "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "0", "OMP_NUM_THREADS": "2"}
    for k in PASS_ENV:
        if os.environ.get(k):
            env[k] = os.environ[k]
    if Path(HOST_CA).is_file():
        env["PIP_CERT"] = ROOT_CA
    return env


def prepare_root(root: Path) -> None:
    """DNS and the host's CA bundle (the registry may sit behind a TLS proxy with its own CA)."""
    etc = root / "etc"
    resolv = etc / "resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    shutil.copyfile("/etc/resolv.conf", resolv)
    if Path(HOST_CA).is_file():
        (root / ROOT_CA.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(HOST_CA, root / ROOT_CA.lstrip("/"))


def in_root(root: Path, script: str, capture: bool = False, timeout: Optional[float] = None,
            check: bool = True) -> "subprocess.CompletedProcess[str]":
    """Run a shell script inside the root (with /proc, /sys, /dev mounted for its duration)."""
    with mounted(root):
        r = subprocess.run(["chroot", str(root), "/bin/sh", "-ec", script], env=chroot_env(), text=True,
                           stdout=subprocess.PIPE if capture else None,
                           stderr=subprocess.STDOUT if capture else None, timeout=timeout, check=False)
    if check and r.returncode != 0:
        tail = (r.stdout or "")[-3000:]
        raise CheckError(f"inside the {root.name} root, exit {r.returncode}: {script.splitlines()[0]} ...\n{tail}")
    return r


def source_files(repo: Path = REPO) -> List[str]:
    """This checkout as a fresh clone would have it, plus untracked files git does not ignore."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, stdout=subprocess.PIPE).stdout.decode()
    return sorted(f for f in out.split("\0") if f and (repo / f).is_file())


def copy_source(root: Path) -> int:
    dest = root / SRC.lstrip("/")
    shutil.rmtree(dest, ignore_errors=True)
    files = source_files()
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    return len(files)


# --------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------

class Phases:
    def __init__(self) -> None:
        self.rows: List[dict] = []

    @contextmanager
    def phase(self, name: str, **detail) -> Iterator[dict]:
        log(f"--- {name}")
        row = {"phase": name, **detail}
        t0 = time.perf_counter()
        try:
            yield row
            row.setdefault("status", "ok")
        except BaseException as exc:
            row["status"] = f"failed: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"
            raise
        finally:
            row["seconds"] = round(time.perf_counter() - t0, 1)
            self.rows.append(row)
            log(f"--- {name}: {row['status']} in {row['seconds']} s")


def install_core(root: Path) -> dict:
    n = copy_source(root)
    script = f"""
test -x {VENV}/bin/python || python3 -m venv {VENV}
{VENV}/bin/python -m pip install -q --upgrade pip
{VENV}/bin/python -m pip install -q {SRC} {' '.join(repr(x) for x in CORE_PIP)}
{VENV}/bin/python -c "import edgetl.runtime, cv2, numpy, onnxruntime, sys, platform; print(sys.version.split()[0], platform.machine(), 'glibc', platform.libc_ver()[1], 'numpy', numpy.__version__, 'opencv', cv2.__version__, 'onnxruntime', onnxruntime.__version__)"
"""
    r = in_root(root, script, capture=True)
    versions = r.stdout.strip().splitlines()[-1].split()
    return {"files_copied": n, "python": versions[0], "machine": versions[1], "glibc": versions[3],
            "numpy": versions[5], "opencv": versions[7], "onnxruntime": versions[9]}


def run_tests(root: Path, which: str) -> dict:
    files = CORE_TESTS if which == "core" else SMOKE_TESTS
    # run from a folder holding only tests/ and pyproject.toml (pytest's settings): the source tree's
    # edgetl/ would shadow the installed package (runtime/ installs as edgetl.runtime)
    r = in_root(root, f"rm -rf {TESTRUN} && mkdir -p {TESTRUN} && cp -r {SRC}/tests {SRC}/pyproject.toml {TESTRUN}/ && "
                      f"cd {TESTRUN} && {VENV}/bin/python -m pytest -q -p no:cacheprovider --timeout 1800 "
                      + " ".join(f"--deselect {t}" for t in EMULATION_DESELECT) + " " + " ".join(files),
                capture=True, check=False)
    last = [ln for ln in (r.stdout or "").splitlines() if ln.strip()]
    summary = last[-1].strip("= ") if last else ""
    print((r.stdout or "")[-4000:])
    if r.returncode != 0:
        raise CheckError(f"tests failed inside the root: {summary}")
    return {"files": list(files), "deselected": list(EMULATION_DESELECT), "summary": summary}


def host_edgetl(host_python: str, *args: str) -> "subprocess.CompletedProcess[str]":
    cmd = [host_python, "-m", "edgetl.cli", *args]
    log("host: edgetl " + " ".join(args))
    r = subprocess.run(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    print(r.stdout[-3000:])
    return r


def make_tiny_run(host_python: str, work: Path) -> Path:
    """tests/_tinyrun.py's tiny run (host: needs torch)."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, 'tests'); from _tinyrun import make_tiny_run; "
            f"print(make_tiny_run(Path({str(work)!r})))")
    subprocess.run([host_python, "-c", code], cwd=REPO, check=True)
    return work / "run"


def compile_for_arm(host_python: str, run: Path, out: Path, *extra: str) -> dict:
    args = ["compile", str(run), "--target", ARM_TARGET, "--method", "ptq", "--out", str(out), "--overwrite", *extra]
    r = host_edgetl(host_python, *args)
    if not (out / "manifest.json").is_file():
        raise CheckError(f"edgetl compile {run} --target {ARM_TARGET} wrote no artifact (exit {r.returncode})")
    return {"exit": r.returncode, "notes": [ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith("note:")]}


def build_gate(artifact: Path, backend: str = "onnxruntime") -> Optional[dict]:
    m = json.loads((artifact / "manifest.json").read_text())
    for b in m.get("builds") or []:
        if b.get("backend") == backend and isinstance(b.get("gate"), dict):
            return b["gate"]
    return None


FIGURES = ("float_top1", "quant_top1", "drop", "agreement", "passed", "max_logit_error")


def figures(gate: Optional[dict]) -> Optional[dict]:
    if not gate:
        return None
    out = {k: gate.get(k) for k in FIGURES if k in gate}
    st = gate.get("stability") or {}
    if isinstance(st, dict) and st.get("perturbations"):
        out["stability_worst"] = min(v.get("agreement", 1.0) for v in st["perturbations"].values())
    cpu = gate.get("cpu")
    if cpu:
        out["cpu"] = cpu
    if "numerics" in gate:
        out["numerics"] = gate["numerics"]
    return out


def compare(x86: Optional[dict], arm: Optional[dict]) -> Optional[dict]:
    if not x86 or not arm:
        return None
    d = {}
    for k in ("quant_top1", "agreement", "drop"):
        if isinstance(x86.get(k), (int, float)) and isinstance(arm.get(k), (int, float)):
            d[k] = round(arm[k] - x86[k], 6)
    return d


def arm_check(root: Path, artifact: Path, name: str) -> dict:
    """Copy ``artifact`` into the root and gate its onnxruntime build there (on ARM kernels)."""
    dest = root / WORK.lstrip("/") / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(artifact, dest)
    t0 = time.perf_counter()
    # --no-speed-check: emulated speed says nothing about the board's; accuracy, agreement and stability
    # are gated as the artifact's thresholds say
    r = in_root(root, f"cd {WORK} && {VENV}/bin/edgetl check {WORK}/{name} --backend onnxruntime --no-speed-check",
                capture=True, check=False)
    seconds = round(time.perf_counter() - t0, 1)
    print(r.stdout[-3000:])
    lines = [ln for ln in r.stdout.splitlines() if "numerics" in ln or "gate" in ln.lower()]
    return {"exit": r.returncode, "seconds": seconds, "gate": figures(build_gate(dest)), "output": lines[-6:]}


def make_media(host_python: str, work: Path, artifact: Path) -> Tuple[Path, Path]:
    """A short video and an image folder at the artifact's input size, from its checkset (host side)."""
    code = f"""
import json, cv2, numpy as np
from pathlib import Path
art, work = Path({str(artifact)!r}), Path({str(work)!r})
m = json.loads((art / "manifest.json").read_text())
pp = m["preprocess"]
ck = np.load(art / "checkset.npz")
x = ck["inputs"][:24].astype(np.float32)
mean = np.array(pp.get("mean", [0, 0, 0]), np.float32).reshape(1, 3, 1, 1)
std = np.array(pp.get("std", [1, 1, 1]), np.float32).reshape(1, 3, 1, 1)
imgs = np.clip(x * std + mean, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
if pp.get("color", "rgb").lower() == "rgb":
    imgs = imgs[..., ::-1]
folder = work / "images"; folder.mkdir(parents=True, exist_ok=True)
for i, im in enumerate(imgs[:8]):
    cv2.imwrite(str(folder / f"img_{{i:02d}}.png"), np.ascontiguousarray(im))
h, w = imgs.shape[1:3]
vw = cv2.VideoWriter(str(work / "video.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
for im in imgs:
    vw.write(np.ascontiguousarray(im))
vw.release()
"""
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([host_python, "-c", code], check=True)
    return work / "video.avi", work / "images"


def arm_run(root: Path, name: str, media: Tuple[Path, Path]) -> dict:
    """`edgetl run` of the copied artifact on a video and an image folder inside the root."""
    dest = root / WORK.lstrip("/") / name
    out = {}
    for kind, src in zip(("video", "images"), media):
        target = dest.parent / f"{name}-{src.name}"
        shutil.rmtree(target, ignore_errors=True)
        if src.is_dir():
            shutil.copytree(src, target)
        else:
            shutil.copy2(src, target)
        rel = f"{WORK}/{target.name}"
        t0 = time.perf_counter()
        r = in_root(root, f"cd {WORK} && {VENV}/bin/edgetl run {WORK}/{name} --source {rel} --headless "
                          f"--summary-json {WORK}/{name}-{kind}-summary.json >{WORK}/{name}-{kind}.jsonl",
                    capture=True, check=False)
        lines = (dest.parent / f"{name}-{kind}.jsonl").read_text().splitlines() \
            if (dest.parent / f"{name}-{kind}.jsonl").is_file() else []
        summary_file = dest.parent / f"{name}-{kind}-summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
        out[kind] = {"exit": r.returncode, "seconds": round(time.perf_counter() - t0, 1), "results": len(lines),
                     "first": json.loads(lines[0]) if lines else None,
                     "summary": {k: summary[k] for k in ("frames", "fps", "latency_ms") if k in summary}
                     if isinstance(summary, dict) else None,
                     "stderr_tail": (r.stdout or "")[-600:] if r.returncode else ""}
        if r.returncode != 0:
            raise CheckError(f"edgetl run {name} --source {src.name} failed inside the root: {r.stdout[-1500:]}")
    return out


DEVICE_COMMANDS = ("edgetl targets", "edgetl doctor", "edgetl build {art} --no-speed-check")


def device_commands(root: Path, name: str) -> dict:
    """The other commands a device runs (profiles, doctor, the build + gate on the board) inside the root."""
    out = {}
    for cmd in DEVICE_COMMANDS:
        line = cmd.format(art=f"{WORK}/{name}")
        t0 = time.perf_counter()
        r = in_root(root, f"cd {WORK} && {VENV}/bin/{line}", capture=True, check=False)
        out[cmd.split(" {")[0]] = {"exit": r.returncode, "seconds": round(time.perf_counter() - t0, 1),
                                   "tail": (r.stdout or "").strip().splitlines()[-3:]}
        print(f"$ {line}\n{(r.stdout or '')[-1500:]}")
        if r.returncode != 0:
            raise CheckError(f"`{line}` failed inside the root (exit {r.returncode}): {(r.stdout or '')[-1500:]}")
    return out


def host_cpu(host_python: str) -> Optional[dict]:
    r = subprocess.run([host_python, "-c", "import json; from edgetl.runtime.cpu import host_cpu; "
                                           "print(json.dumps(host_cpu().to_dict()))"],
                       cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def root_cpu(root: Path) -> Optional[dict]:
    r = in_root(root, f"{VENV}/bin/python -c \"import json; from edgetl.runtime.cpu import host_cpu; "
                      "print(json.dumps(host_cpu().to_dict()))\"", capture=True, check=False)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-aarch64-static", "--version"], text=True, stdout=subprocess.PIPE).stdout
        return out.splitlines()[0].strip()
    except (OSError, IndexError):
        return ""


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    if a.cleanup_only:
        left = sweep_mounts(a.root)
        log(f"unmounted {len(left)} mount(s) under {a.root}")
        return 0
    if os.geteuid() != 0:
        raise CheckError("the arm64 check needs root (mmdebstrap, chroot, mount): run it as root or with sudo")
    global EMULATED_CPU
    EMULATED_CPU = a.cpu
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)
    phases = Phases()
    result = {"suite": a.suite, "purpose": SUITES[a.suite], "root": str(a.root), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "host": {"machine": platform.machine(), "qemu": "", "cpu": None}, "phases": phases.rows, "checks": [],
              "runs": {}}
    t_all = time.perf_counter()
    work = a.cache / "work" / a.suite
    ok = False
    failures: List[str] = []

    @contextmanager
    def keep_going(name: str, **detail) -> Iterator[dict]:
        """A phase whose failure is recorded and the next phases still run."""
        try:
            with phases.phase(name, **detail) as row:
                yield row
        except (CheckError, subprocess.CalledProcessError) as exc:
            failures.append(f"{name}: {exc}")
    try:
        sweep_mounts(a.root)
        with phases.phase("host packages"):
            ensure_host(a.no_apt)
        result["host"]["qemu"] = qemu_version()
        result["host"]["cpu"] = host_cpu(a.host_python)
        with phases.phase("root (mmdebstrap)") as row:
            row["cached"] = root_is_ready(a.root, a.suite) and not a.rebuild
            if not row["cached"]:
                build_root(a.root, a.suite, a.mirror)
            prepare_root(a.root)
            result["emulated_cpu"] = {"qemu_cpu": a.cpu, "stands_for": QEMU_CPUS[a.cpu][1],
                                      "features": write_emulated_cpuinfo(a.root, a.cpu)}
        with phases.phase("core install (pip install .)") as row:
            if a.rebuild:
                shutil.rmtree(a.root / VENV.lstrip("/"), ignore_errors=True)
            row["venv_cached"] = (a.root / VENV.lstrip("/") / "bin" / "python").exists()
            result["root_versions"] = install_core(a.root)
            row.update(result["root_versions"])
        result["root_cpu"] = root_cpu(a.root)
        if a.tests != "none":
            with keep_going(f"torch-free tests ({a.tests})") as row:
                row.update(run_tests(a.root, a.tests))
        artifacts: List[Tuple[str, Path, dict]] = []
        if not a.no_tiny:
            with keep_going("host: tiny run + compile for " + ARM_TARGET) as row:
                shutil.rmtree(work / "tiny", ignore_errors=True)
                run = make_tiny_run(a.host_python, work / "tiny")
                # 48 training images (the tests' tiny run): --calib-min 32 accepts them
                info = compile_for_arm(a.host_python, run, work / "tiny-arm64", "--no-speed-check", "--calib-min", "32")
                row.update(info)
                artifacts.append(("tiny-arm64", work / "tiny-arm64", info))
        if a.demo:
            with keep_going("host: compile the demo's run for " + ARM_TARGET) as row:
                info = compile_for_arm(a.host_python, Path(a.demo), work / "demo-arm64")
                row.update(info)
                artifacts.append(("demo-arm64", work / "demo-arm64", info))
        for art in a.artifact:
            artifacts.append((art.name, art, {}))
        for name, art, info in artifacts:
            entry = {"artifact": name, "source": str(art), "x86": figures(build_gate(art)), "compile": info}
            result["checks"].append(entry)
            if not a.no_check:
                with keep_going(f"edgetl check {name} (ARM kernels, emulated)") as row:
                    arm = arm_check(a.root, art, name)
                    entry["arm"] = arm["gate"]
                    entry["arm_exit"] = arm["exit"]
                    entry["arm_output"] = arm["output"]
                    entry["arm_minus_x86"] = compare(entry["x86"], entry["arm"])
                    row["exit"] = arm["exit"]
                    if arm["exit"] not in (0, 1) or entry["arm"] is None:
                        raise CheckError(f"edgetl check {name} did not run inside the root (exit {arm['exit']})")
                    if arm["exit"] == 1 and (entry["x86"] or {}).get("passed"):
                        raise CheckError(f"{name}: the gate passed on x86 kernels and FAILED on ARM kernels")
            if not a.no_run and (name == "tiny-arm64" or len(artifacts) == 1):
                with keep_going(f"edgetl run {name} (video + image folder)"):
                    if (a.root / WORK.lstrip("/") / name).is_dir() is False:
                        shutil.copytree(art, a.root / WORK.lstrip("/") / name)
                    media = make_media(a.host_python, work / f"{name}-media", art)
                    result["runs"][name] = arm_run(a.root, name, media)
                with keep_going(f"device commands (targets, doctor, build {name})"):
                    result["device_commands"] = device_commands(a.root, name)
        ok = not failures
        if failures:
            result["error"] = "; ".join(f[:600] for f in failures)
    except Unsupported as exc:
        result["error"] = str(exc)[:2000]
        if a.skip_unsupported:
            log(f"SKIPPED: {exc}")
            result["skipped"] = True
            ok = True
        else:
            log(f"FAILED: {exc}")
    except (CheckError, subprocess.CalledProcessError) as exc:
        log(f"FAILED: {exc}")
        result["error"] = str(exc)[:2000]
    finally:
        sweep_mounts(a.root)
        result["seconds_total"] = round(time.perf_counter() - t_all, 1)
        result["passed"] = ok
        write_json(a.json, result)
        log(f"wrote {a.json} ({'passed' if ok else 'FAILED'}, {result['seconds_total']} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CheckError as exc:
        log(f"error: {exc}")
        sys.exit(2)
