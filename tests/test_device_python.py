"""The device side runs on Python 3.8 (JetPack 5; issue 13 finding 11, issue 17).

A device installs the core (no torch) and imports ``edgetl.runtime`` plus a few other ``edgetl``
modules: the CLI and the commands a device runs (run, check, build, targets, doctor) with what they
import. ``DEVICE_MODULES`` lists them; a test derives the set from the commands themselves (torch
made unimportable, as on a device) and fails when a command imports a module not on the list, or
the list names one no command imports. vermin and an AST check then hold the runtime and that list
to Python 3.8, and where a Python 3.8 with the core packages exists (``EDGETL_PY38``, or python3.8 on
PATH) the device commands run on it."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "runtime"  # edgetl.runtime: every module of it is device side, checked as a whole

# edgetl modules outside edgetl.runtime that a device imports. Derived by
# test_device_commands_import_exactly_the_listed_modules; keep it in step with it.
DEVICE_MODULES = (
    "edgetl", "edgetl.cli", "edgetl.logs", "edgetl.commands",
    "edgetl.commands.run", "edgetl.commands.check", "edgetl.commands.build", "edgetl.commands.targets",
    "edgetl.commands.doctor",
    "edgetl.artifact", "edgetl.check", "edgetl.numerics", "edgetl.stability", "edgetl.report", "edgetl.plots",
    "edgetl.targets", "edgetl.target_profiles", "edgetl.doctor", "edgetl.calibration", "edgetl.calibration.qdq",
    "edgetl.backends", "edgetl.backends.onnxruntime", "edgetl.backends.openvino", "edgetl.backends.tensorrt",
    "edgetl.backends.trt_conformance",
)
# Device side by reasoning, not derived here (a detection run takes a minute to train): `edgetl check` and
# `edgetl build` of a detection artifact (the device-only `detect` extra), and `python -m edgetl`.
DEVICE_MODULES_NOT_DERIVED = ("edgetl.__main__", "edgetl.detect", "edgetl.detect.compile", "edgetl.detect.gate",
                              "edgetl.detect.metrics")

BLOCK_HOST_PACKAGES = textwrap.dedent("""
    import atexit, json, sys
    class _Block:  # a device's core install: no torch (nor what needs it)
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm", "nncf"):
                raise ImportError(name + " is not installed on a device")
            return None
    sys.meta_path.insert(0, _Block())
    atexit.register(lambda: print("EDGETL_MODULES " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("edgetl", "torch")))))
    from edgetl.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def device_commands(art: Path, video: Path) -> list[list[str]]:
    """What a device runs (docs/targets.md, .ci/arm64_check.py): the build is the last that changes ``art``."""
    a = str(art)
    return [*[[c, "--help"] for c in ("run", "check", "build", "targets", "doctor")],
            ["targets"], ["targets", "show", "jetson-orin-nano"], ["doctor"],
            ["build", a, "--target", "x86-cpu-openvino", "--no-speed-check"],
            ["build", a, "--target", "jetson-orin-nano"],  # no TensorRT here: the build config
            ["build", a, "--target", "arm64-cpu-onnxruntime", "--no-speed-check"],
            ["check", a, "--no-speed-check"], ["check", a, "--backend", "reference", "--no-speed-check"],
            ["run", a, "--source", str(video), "--headless", "--backend", "onnxruntime"]]


@pytest.fixture(scope="module")
def device_inputs(tmp_path_factory) -> tuple[Path, Path]:
    from _tinyartifact import write_video
    from _tinyqdq import make_qdq_artifact

    tmp = tmp_path_factory.mktemp("device")
    return make_qdq_artifact(tmp / "art"), write_video(tmp / "clip.avi", n=6)


def module_file(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin, name
    return Path(spec.origin)


def device_files() -> list[Path]:
    return sorted(RUNTIME.rglob("*.py")) + [module_file(m) for m in DEVICE_MODULES + DEVICE_MODULES_NOT_DERIVED]


def test_device_commands_import_exactly_the_listed_modules(device_inputs, tmp_path):
    art, video = Path(shutil.copytree(device_inputs[0], tmp_path / "art")), device_inputs[1]
    seen: set[str] = set()
    for args in device_commands(art, video):
        r = subprocess.run([sys.executable, "-c", BLOCK_HOST_PACKAGES, *args], capture_output=True, text=True,
                           timeout=300, cwd=art.parent)
        assert r.returncode == 0, (args, r.stderr[-2000:])
        mods = json.loads(r.stdout.rsplit("EDGETL_MODULES ", 1)[1])
        assert not [m for m in mods if m.split(".")[0] == "torch"], args
        seen |= {m for m in mods if m != "edgetl.runtime" and not m.startswith("edgetl.runtime.")}
    assert not seen - set(DEVICE_MODULES), f"device commands import modules not on DEVICE_MODULES: {seen - set(DEVICE_MODULES)}"
    assert not set(DEVICE_MODULES) - seen, f"DEVICE_MODULES lists modules no device command imports: {set(DEVICE_MODULES) - seen}"
    for m in DEVICE_MODULES_NOT_DERIVED:
        assert module_file(m).is_file()


def test_vermin_finds_the_device_side_runs_on_python_3_8():
    vermin = shutil.which("vermin") or shutil.which("vermin", path=str(Path(sys.executable).parent))
    if vermin is None:
        pytest.skip("vermin is not installed (pip install 'edgetl[dev]'): the static minimum-Python check needs it")
    # vermin's default (not --eval-annotations) does not count annotations: right for modules with
    # `from __future__ import annotations`; test_no_python_3_9_construct_is_evaluated_on_the_device covers the rest
    r = subprocess.run([vermin, "--no-config-file", "--no-tips", "--violations", "--target=3.8-",
                        *map(str, device_files())], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    found = re.search(r"Minimum required versions:\s*(\d+)\.(\d+)", r.stdout)
    assert found, r.stdout
    assert (int(found.group(1)), int(found.group(2))) <= (3, 8), r.stdout


# ---- what vermin misses: 3.9/3.10 typing evaluated at run time ------------------------------------------
#
# Python 3.8 evaluates an annotation when its module lacks `from __future__ import annotations` (function
# annotations at `def`, class and module annotations, dataclass fields included, at class creation), and
# typing.get_type_hints evaluates even the string ones: PEP 604 `X | None` (3.10) and PEP 585 `list[int]`
# (3.9) then raise TypeError. The past bug: edgetl.targets called get_type_hints on dataclasses annotated
# `int | None`, and every profile failed to load on Python 3.8/3.9. vermin reads none of this.

_GENERIC_BUILTINS = {"tuple", "list", "dict", "set", "frozenset", "type"}
_GENERIC_ATTRS = {"deque", "OrderedDict", "defaultdict", "Counter", "Callable", "Iterable", "Sequence", "Mapping"}
_TYPE_NAMES = {"int", "str", "float", "bool", "bytes", "list", "dict", "tuple", "set", "type", "object"}


def _annotations(tree: ast.Module) -> list[ast.expr]:
    anns: list[ast.expr | None] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            anns += [x.annotation for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg] if x is not None]
            anns.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            anns.append(node.annotation)
    return [a for a in anns if a is not None]


def _generic_subscript(node: ast.AST) -> bool:
    if not isinstance(node, ast.Subscript):
        return False
    v = node.value
    return (isinstance(v, ast.Name) and v.id in _GENERIC_BUILTINS) or \
        (isinstance(v, ast.Attribute) and v.attr in _GENERIC_ATTRS and isinstance(v.value, ast.Name)
         and v.value.id in ("collections", "abc"))


def _guarded_by_typeerror(tree: ast.Module, call: ast.Call) -> bool:
    """``call`` sits in the body of a ``try`` that catches TypeError (the fallback edgetl.targets._hints has)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(call in ast.walk(s) for s in node.body):
            for h in node.handlers:
                names = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
                if h.type is None or any(isinstance(n, ast.Name) and n.id in ("TypeError", "Exception") for n in names):
                    return True
    return False


def py39_evaluated(tree: ast.Module) -> list[tuple[int, str]]:
    """3.9+ typing that Python 3.8 would evaluate: builtin/abc generics and ``X | Y`` unions outside
    annotations, any in annotations of a module without the __future__ import, and unguarded
    ``get_type_hints`` calls (they evaluate the string annotations too)."""
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                 any(a.name == "annotations" for a in n.names) for n in tree.body)
    in_ann = {id(n) for ann in _annotations(tree) for n in ast.walk(ann)}
    bad = []
    for node in ast.walk(tree):
        if id(node) in in_ann:
            if not future and (_generic_subscript(node) or (isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr))):
                bad.append((node.lineno, ast.unparse(node)))
            continue
        if _generic_subscript(node):
            bad.append((node.lineno, ast.unparse(node)))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and any(
                (isinstance(s, ast.Name) and s.id in _TYPE_NAMES) or (isinstance(s, ast.Constant) and s.value is None)
                for s in (node.left, node.right)):
            bad.append((node.lineno, ast.unparse(node)))
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name == "get_type_hints" and not _guarded_by_typeerror(tree, node):
                bad.append((node.lineno, ast.unparse(node)))
        if isinstance(node, ast.Attribute) and node.attr in ("removeprefix", "removesuffix", "UnionType"):
            bad.append((node.lineno, ast.unparse(node)))
    return bad


def test_no_python_3_9_construct_is_evaluated_on_the_device():
    found = {}
    for path in device_files():
        bad = py39_evaluated(ast.parse(path.read_text(encoding="utf-8")))
        if bad:
            found[str(path.relative_to(REPO))] = bad
    assert not found, f"Python 3.8 (JetPack 5) would fail on: {found}"


@pytest.mark.parametrize("source,flagged", [
    ("Roi = tuple[int, int]", True),
    ("x = isinstance(1, int | None)", True),
    ("from __future__ import annotations\ndef f(a: list[int]) -> int | None: ...", False),
    ("def f(a: list[int]) -> None: ...", True),  # no __future__ import: evaluated at `def`
    ("import dataclasses\n@dataclasses.dataclass\nclass P:\n    dla: Foo | Bar = None", True),
    # the past bug of edgetl.targets: string annotations, evaluated by get_type_hints
    ("from __future__ import annotations\nimport typing\n@dataclass\nclass P:\n    dla: int | None = None\n"
     "H = typing.get_type_hints(P)", True),
    ("from __future__ import annotations\nfrom typing import get_type_hints\ndef f(c):\n    return get_type_hints(c)",
     True),
    ("import typing\ndef hints(c):\n    try:\n        return typing.get_type_hints(c)\n    except TypeError:\n"
     "        return {}", False),  # edgetl.targets._hints: the fallback evaluates part by part
    ("x = 3 | 4\ny = a | b", False),
])
def test_the_checker_catches_what_it_is_for(source, flagged):
    assert bool(py39_evaluated(ast.parse(source))) is flagged


# ---- on a real Python 3.8 --------------------------------------------------------------------------------

# `edgetl --help` on 3.8 listed train, eval, predict and adapt as "unavailable: internal error" (edgetl/train.py
# evaluated 3.10 typing at import); those need torch (3.10+), but the listing must name the extra, not fail.
KNOWN_PY38_HELP_FAILURES: set = set()


def python38() -> str:
    for exe in (os.environ.get("EDGETL_PY38", ""), shutil.which("python3.8") or ""):
        if exe and os.path.exists(exe):
            r = subprocess.run([exe, "-c", "import numpy, cv2, onnxruntime, click, rich"], capture_output=True)
            if r.returncode == 0:
                return exe
    pytest.skip("no Python 3.8 with numpy, opencv, onnxruntime, click and rich (set EDGETL_PY38 to one): the "
                "static checks above still hold")


def installed_layout(site: Path) -> dict[str, str]:
    """``site/edgetl`` as `pip install` lays it out (pyproject.toml's package-dir); the environment to use it."""
    pkg = site / "edgetl"
    pkg.mkdir(parents=True)
    for entry in (REPO / "edgetl").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in (("runtime", "runtime"), ("calibration", "calibration"), ("target_profiles", "targets")):
        (pkg / name).symlink_to(REPO / folder)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(site.parent)}
    env.pop("VIRTUAL_ENV", None)
    return env


def test_device_commands_run_on_python_3_8(tmp_path, device_inputs):
    exe = python38()
    art = Path(shutil.copytree(device_inputs[0], tmp_path / "art"))
    env = installed_layout(tmp_path / "site")
    cli = "import sys\nfrom edgetl.cli import main\nsys.exit(main(sys.argv[1:]))"
    r = subprocess.run([exe, "-c", "import sys, edgetl.runtime, edgetl.runtime.app, edgetl.runtime.runners.openvino, "
                                   "edgetl.runtime.runners.tensorrt; print(sys.version_info[:2])"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "(3, 8)" in r.stdout, r.stderr
    for args in device_commands(art, device_inputs[1]):
        r = subprocess.run([exe, "-c", cli, *args], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
        if "x86-cpu-openvino" in args and r.returncode == 2 and "pip install 'edgetl[openvino]'" in r.stderr:
            continue  # this Python 3.8 has no OpenVINO: edgetl.backends.openvino imported and said so
        assert r.returncode == 0, (args, r.stderr[-2000:])
        if args[0] == "run" and "--help" not in args:
            assert len([x for x in r.stdout.splitlines() if x.startswith("{")]) == 6, (r.stdout[-1500:], r.stderr[-1500:])
    r = subprocess.run([exe, "-c", cli, "--help"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    broken = set(re.findall(r"^\s+(\w+)\s+\(unavailable: internal error", r.stdout, re.MULTILINE))
    assert broken == KNOWN_PY38_HELP_FAILURES, r.stdout
