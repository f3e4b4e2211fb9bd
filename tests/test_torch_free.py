"""The device side never imports torch: prove it with torch made unimportable in a subprocess."""

import subprocess
import sys
import textwrap

BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch.") or name in ("torchvision", "timm"):
                raise ImportError("torch is blocked in this test")
            return None
    sys.meta_path.insert(0, _Block())
""")


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_runtime_imports_without_torch():
    r = run_blocked("""
        import pkgutil, importlib
        import edgetl.runtime as rt
        for m in pkgutil.walk_packages(rt.__path__, "edgetl.runtime."):
            importlib.import_module(m.name)
        import edgetl.calibration
        assert "torch" not in sys.modules
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_cli_help_without_torch():
    r = run_blocked("""
        from edgetl.cli import main
        rc = main(["--help"])
        assert "torch" not in sys.modules
        sys.exit(rc)
    """)
    assert r.returncode == 0, r.stderr
    assert "Commands" in r.stdout
