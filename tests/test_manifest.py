import json

import pytest

from edgetl.runtime.errors import IntegrityError, ManifestError
from edgetl.runtime.manifest import Manifest, hash_files, read_manifest, verify_files, write_manifest
from edgetl.runtime.preprocess import PreprocessSpec


def _manifest(**kw):
    base = dict(kind="run", labels=("ok", "defect"), preprocess=PreprocessSpec(input_size=(64, 64)),
                backbone={"name": "tiny_cnn"}, training={"split_seed": 3})
    base.update(kw)
    return Manifest(**base)


def test_round_trip(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"abc")
    m = _manifest(files=hash_files(tmp_path))
    write_manifest(m, tmp_path)
    back = read_manifest(tmp_path)
    assert back == m
    assert back.preprocess.input_size == (64, 64)
    assert back.input["shape"] == [3, 64, 64]
    assert verify_files(tmp_path) == m


def test_unknown_major_version_refused(tmp_path):
    write_manifest(_manifest(), tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["schema_version"] = "3.0"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema_version '3.0' is not supported"):
        read_manifest(tmp_path)


def test_task_and_schema_major_must_agree(tmp_path):
    """A classification manifest claiming 2.0 (or a detection one claiming 1.x) was altered."""
    write_manifest(_manifest(), tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["schema_version"] = "2.0"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="task 'classification' is written in schema 1.1"):
        read_manifest(tmp_path)


def test_detection_manifest_is_schema_2_and_needs_postprocess(tmp_path):
    m = _manifest().replace(task="detection", postprocess={"kind": "ssd", "anchors": "anchors.npy"})
    write_manifest(m, tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["schema_version"] == "2.1" and data["postprocess"]["kind"] == "ssd"
    assert read_manifest(tmp_path).postprocess["anchors"] == "anchors.npy"
    old = Manifest.from_dict({**data, "schema_version": "2.0"})  # before postprocess.object_threshold: still read
    assert old.task == "detection" and old.to_dict()["schema_version"] == "2.1"
    classification = _manifest().to_dict()
    assert classification["schema_version"] == "1.1" and "postprocess" not in classification
    with pytest.raises(ManifestError, match="'postprocess' is missing"):
        _manifest().replace(task="detection")
    with pytest.raises(ManifestError, match="'segmentation' is not a task"):
        _manifest().replace(task="segmentation")


@pytest.mark.parametrize("key", ["labels", "preprocess", "files", "kind", "schema_version"])
def test_missing_key_named(tmp_path, key):
    write_manifest(_manifest(), tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    del data[key]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=repr(key)):
        read_manifest(tmp_path)


def test_bad_preprocess_value_named(tmp_path):
    write_manifest(_manifest(), tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["preprocess"]["resize"] = "squash"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="preprocess.resize"):
        read_manifest(tmp_path)


def test_not_json_and_missing(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_tampered_file_refused(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"weights")
    write_manifest(_manifest(files=hash_files(tmp_path)), tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"weightz")
    with pytest.raises(IntegrityError, match="model.onnx: sha256"):
        verify_files(tmp_path)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        verify_files(tmp_path)
