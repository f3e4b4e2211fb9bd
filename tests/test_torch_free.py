"""The device side never imports torch: prove it with torch made unimportable in a subprocess."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_edgetl_run_end_to_end_without_torch(tmp_path):
    """`edgetl run` on a tiny artifact and a real video, with torch unimportable."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _tinyartifact import make_tiny_artifact, write_video

    art = make_tiny_artifact(tmp_path / "art")
    video = write_video(tmp_path / "clip.avi", n=12)
    r = run_blocked(f"""
        from edgetl.cli import main
        rc = main(["run", {str(art)!r}, "--source", {str(video)!r}, "--headless", "--save",
                   {str(tmp_path / "out.avi")!r}, "--summary-json", {str(tmp_path / "s.json")!r}])
        assert "torch" not in sys.modules, "edgetl run imported torch"
        sys.exit(rc)
    """)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["frame"] for o in out] == list(range(12))
    assert json.loads((tmp_path / "s.json").read_text())["frames"] == 12
    assert (tmp_path / "out.avi").stat().st_size > 0
