"""report.md is rendered from report.json, notes included, by every command that rewrites it (issue #17:
the compile's note on an ARM artifact's x86 gate vanished from report.md after `edgetl check`)."""

from __future__ import annotations

import json

import pytest

from _tinyrun import TINY
from edgetl.check import REPORT_JSON, REPORT_MD, render_report_md
from edgetl.cli import main
from edgetl.runtime.manifest import verify_files


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from _tinyrun import session_tiny_run

    return session_tiny_run(tmp_path_factory)


def test_arm_note_survives_edgetl_check(tiny_run, tmp_path, monkeypatch):
    from edgetl.runtime import cpu

    # the compile runs on x86 kernels (as on this project's machines; forced so an ARM host tests the same)
    monkeypatch.setattr(cpu, "host_cpu", lambda: cpu.classify("x86_64", ["avx2", "fma"], "AMD EPYC", 2))
    out = tmp_path / "arm"
    assert main(["compile", str(tiny_run), "--target", "arm64-cpu-onnxruntime", "--method", "ptq",
                 "--out", str(out), *TINY]) == 0
    notes = json.loads((out / REPORT_JSON).read_text())["notes"]
    assert len(notes) == 1 and "x86_64 kernels" in notes[0]
    assert notes[0] in (out / REPORT_MD).read_text()

    assert main(["check", str(out), "--no-speed-check"]) == 0  # rewrites report.json and report.md
    report = json.loads((out / REPORT_JSON).read_text())
    md = (out / REPORT_MD).read_text()
    assert report["notes"] == notes  # report.json always kept them
    assert md.count("## Notes") == 1 and f"- {notes[0]}" in md  # report.md lost them before the fix
    assert md == render_report_md(report)  # one renderer: report.md is what report.json holds
    verify_files(out)


def test_both_renderers_show_the_notes():
    from edgetl.detect.compile import render_report

    report = {"name": "a", "deployable": True, "notes": ["first note", "second note"]}
    for md in (render_report_md(report), render_report({**report, "task": "detection"})):
        assert "## Notes\n\n- first note\n- second note\n" in md
    assert "## Notes" not in render_report_md({"name": "a"})


def test_detection_artifact_for_arm_carries_the_note_through_check(tmp_path, monkeypatch):
    """The same for a detection run (its own report renderer): the compile's note is in report.json and
    report.md, and `edgetl check` keeps it in both."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    pytest.importorskip("pycocotools")
    from test_detect_train import write_rectangles

    from edgetl.detect.train import DetTrainConfig, train_detector
    from edgetl.runtime import cpu

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on a busy 2-core machine: one thread is ~20x faster
    try:
        cfg = DetTrainConfig(backbone="tiny_cnn", pretrained="none", input_size=96, epochs=2, batch_size=8, lr=1e-2,
                             backbone_lr_mult=0.1, patience=0, num_workers=0, device="cpu", warmup_epochs=0.5,
                             val_fraction=0.2, test_fraction=0.2)
        run = train_detector(write_rectangles(tmp_path / "data", n=40), tmp_path / "run", cfg, progress=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(cpu, "host_cpu", lambda: cpu.classify("x86_64", ["avx2", "fma"], "AMD EPYC", 2))
    out = tmp_path / "det-arm"
    assert main(["compile", str(run), "--target", "arm64-cpu-onnxruntime", "--out", str(out)]) in (0, 1)  # a poor
    notes = json.loads((out / REPORT_JSON).read_text())["notes"]  # detector: its gate may fail, the note is there
    assert len(notes) == 1 and "x86_64 kernels" in notes[0] and f"- {notes[0]}" in (out / REPORT_MD).read_text()
    assert main(["check", str(out), "--no-speed-check"]) in (0, 1)
    assert json.loads((out / REPORT_JSON).read_text())["notes"] == notes
    assert f"- {notes[0]}" in (out / REPORT_MD).read_text()
    verify_files(out)
