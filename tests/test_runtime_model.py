"""edgetl.runtime.load / Model.predict / Model.stream on tiny artifacts (real ONNX Runtime)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from _tinyartifact import LABELS, SPEC, brightness_onnx, frame_at, make_tiny_artifact
from edgetl import runtime as rt
from edgetl.runtime.errors import EdgetlError, IntegrityError
from edgetl.runtime.manifest import read_manifest, write_manifest
from edgetl.runtime.model import select_build, softmax
from edgetl.runtime.preprocess import preprocess
from edgetl.runtime.runners import RUNNERS


@pytest.fixture
def artifact(tmp_path):
    return make_tiny_artifact(tmp_path / "art")


def reference_probs(model_path, img):
    """The same computation written out by hand: preprocess, a separate ORT session, softmax."""
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: preprocess(img, SPEC)[None]})[0][0].astype(np.float64)
    e = np.exp(logits - logits.max())
    return e / e.sum()


def test_predict_matches_a_hand_written_reference(artifact):
    model = rt.load(artifact)
    assert model.labels == LABELS and model.build["backend"] == "onnxruntime" and model.warnings == []
    assert model.info["backend"] == "onnxruntime" and model.info["model"] == "model_fp32.onnx"
    for i in (0, 10, 23):
        img = frame_at(i, size=(160, 120))
        pred = model.predict(img, top_k=2)
        ref = reference_probs(artifact / "model_fp32.onnx", img)
        assert [lab for lab, _ in pred] == [LABELS[j] for j in np.argsort(-ref)]
        assert np.allclose([s for _, s in pred], np.sort(ref)[::-1], atol=1e-6)
        assert abs(sum(s for _, s in pred) - 1.0) < 1e-5
    assert model.predict(frame_at(0), top_k=1)[0][0] == "dark"
    assert model.predict(frame_at(10), top_k=1)[0][0] == "bright"
    assert len(model.predict(frame_at(0), top_k=99)) == len(LABELS)


def test_torch_exported_cnn_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from edgetl.backbones import build_classifier

    art = make_tiny_artifact(tmp_path / "cnn", torch_model=True)
    model = rt.load(art)
    torch.manual_seed(0)
    net, _ = build_classifier("tiny_cnn", 2, pretrained="none", dropout=0.0)
    net.eval()
    img = frame_at(5, size=(96, 64))
    with torch.no_grad():
        want = torch.softmax(net(torch.from_numpy(preprocess(img, SPEC)[None])), dim=1)[0].numpy()
    assert np.allclose(model.probabilities(img), want, atol=1e-5)


def test_roi_classifies_only_the_region(artifact):
    model = rt.load(artifact)
    img = np.full((120, 160, 3), 20, np.uint8)
    img[:, 80:] = 200  # right half bright, the whole frame dark on average
    assert model.predict(img)[0][0] == "dark"
    assert model.predict(img, roi=(80, 0, 80, 120))[0][0] == "bright"
    assert model.predict(img, roi=(100, 10, 500, 500))[0][0] == "bright"  # clipped to the frame
    with pytest.raises(EdgetlError, match="outside"):
        model.predict(img, roi=(200, 0, 10, 10))
    with pytest.raises(EdgetlError, match="x,y,w,h"):
        rt.model.parse_roi("1,2,3")


def test_tampered_or_wrong_folders_are_refused(artifact, tmp_path):
    brightness_onnx(artifact / "model_fp32.onnx", gain=8.0)  # a valid model, but not the one hashed
    with pytest.raises(IntegrityError, match="model_fp32.onnx"):
        rt.load(artifact)
    assert rt.load(artifact, verify=False).predict(frame_at(0))  # --no-verify skips the hash check
    run = make_tiny_artifact(tmp_path / "run")
    write_manifest(read_manifest(run).replace(kind="run"), run)
    with pytest.raises(EdgetlError, match="training run, not an artifact") as exc:
        rt.load(run)
    assert "edgetl compile" in exc.value.hint
    with pytest.raises(EdgetlError, match="no manifest"):
        rt.load(tmp_path)


def test_build_selection(tmp_path):
    art = make_tiny_artifact(tmp_path / "multi", builds=[
        {"backend": "openvino", "model": "model_fp32.onnx", "precision": "fp32", "options": {}},
        {"backend": "onnxruntime", "model": "model_fp32.onnx", "precision": "fp32", "options": {"intra_op_threads": 1}},
    ])
    m = read_manifest(art)
    assert select_build(m, art)["backend"] == "openvino"  # the first listed build by default
    assert select_build(m, art, "onnxruntime")["options"] == {"intra_op_threads": 1}
    with pytest.raises(EdgetlError, match="no build for backend 'tensorrt'") as exc:
        select_build(m, art, "tensorrt")
    assert "openvino" in exc.value.message and "onnxruntime" in exc.value.message
    model = rt.load(art, backend="onnxruntime", options={"intra_op_threads": 2})
    assert model.runner.options["intra_op_threads"] == 2


def test_artifact_without_builds_runs_its_onnx_on_onnxruntime(tmp_path):
    art = make_tiny_artifact(tmp_path / "nobuilds", builds=[], gate_passed=False)
    model = rt.load(art)
    assert model.build["backend"] == "onnxruntime" and model.build["model"] == "model_fp32.onnx"
    assert any("no onnxruntime build" in w for w in model.warnings)
    assert any("did NOT pass its accuracy gate" in w for w in model.warnings)


BLOCK = textwrap.dedent("""
    import sys
    BLOCKED = {blocked!r}
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, _Block())
    import edgetl.runtime as rt
    try:
        rt.load(sys.argv[1], backend=sys.argv[2] if len(sys.argv) > 2 else None)
    except rt.EdgetlError as exc:
        print(exc.message); print(exc.hint); sys.exit(2)
""")


def test_missing_backend_package_names_what_to_install(tmp_path):
    art = make_tiny_artifact(tmp_path / "art", builds=[
        {"backend": "onnxruntime", "model": "model_fp32.onnx", "precision": "fp32", "options": {}},
        {"backend": "openvino", "model": "model_fp32.onnx", "precision": "fp32", "options": {}},
    ])
    r = subprocess.run([sys.executable, "-c", BLOCK.format(blocked=["onnxruntime"]), str(art)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "needs the Python package 'onnxruntime'" in r.stdout and "pip install onnxruntime" in r.stdout
    assert "--backend openvino" in r.stdout  # the other build of this artifact is offered
    if "openvino" not in RUNNERS:
        pytest.skip("no openvino runner registered yet")
    r = subprocess.run([sys.executable, "-c", BLOCK.format(blocked=["openvino"]), str(art), "openvino"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "pip install 'edgetl[openvino]'" in r.stdout and "--backend onnxruntime" in r.stdout


def test_stream_api_over_an_image_folder(artifact, tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    imgs = [frame_at(i, size=(80, 60)) for i in (0, 10, 3, 15)]
    for i, img in enumerate(imgs):
        cv2.imwrite(str(folder / f"{i:02d}.png"), img)
    model = rt.load(artifact)
    stream = model.stream(str(folder), top_k=2)
    results = [(r.frame_index, r.label, r.top_k, dict(r.timings_ms), r.latency_ms) for r in stream]
    assert [r[0] for r in results] == [0, 1, 2, 3]
    assert [r[1] for r in results] == ["dark", "bright", "dark", "bright"]
    for (_, _, top, timings, latency), img in zip(results, imgs):
        assert top == model.predict(img, top_k=2)  # PNG is lossless: the very same frames
        assert set(timings) == {"wait", "preprocess", "infer", "post"} and min(timings.values()) >= 0
        assert latency >= timings["preprocess"] + timings["infer"]
    s = stream.summary()
    assert (s["frames"], s["frames_read"], s["dropped"], s["stop_reason"]) == (4, 4, 0, "end of source")
    json.dumps(s)  # the summary is plain JSON


def test_softmax_is_stable():
    p = softmax(np.array([1000.0, 0.0, -1000.0], np.float32))
    assert np.isfinite(p).all() and abs(p.sum() - 1) < 1e-6 and p[0] > 0.999
