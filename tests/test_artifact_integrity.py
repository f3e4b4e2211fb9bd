"""Crafted and damaged artifacts: every one is refused with one line naming the file or key, by the
device runtime (``edgetl.runtime.load``) and by ``edgetl check``, which writes nothing anywhere.

Plus property-based tests of the manifest reader (hypothesis): whatever JSON it is given, it returns
a manifest or raises a ManifestError/IntegrityError, and no name it accepts leaves the folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _tinyqdq import make_qdq_artifact
from edgetl.cli import main
from edgetl.runtime import load
from edgetl.runtime.errors import EdgetlError, IntegrityError, ManifestError
from edgetl.runtime.manifest import (Manifest, canonical_digest, check_name, read_manifest, read_verified,
                                     verify_files, write_manifest)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_qdq_artifact(tmp_path_factory.mktemp("integrity") / "art")


def _manifest_data(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _rewrite(folder: Path, data: dict, digest: bool = True) -> None:
    """Write manifest JSON as a crafter would: with a matching digest unless ``digest`` is False."""
    data = dict(data)
    data.pop("digest", None)
    if digest:
        data["digest"] = canonical_digest(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _listed(folder: Path, name: str, content: bytes) -> None:
    """List ``name`` with the sha256 of ``content`` (a crafter who knows what is there)."""
    data = _manifest_data(folder)
    data["files"][name] = _sha(content)
    _rewrite(folder, data)


# ---- the corpus: name -> crafts the artifact in `art` (with `outside`, a folder beside it) -------------------

def symlink_manifest(art: Path, outside: Path) -> None:
    shutil.move(art / "manifest.json", outside / "manifest.json")
    (art / "manifest.json").symlink_to(outside / "manifest.json")


def symlink_model_same_bytes(art: Path, outside: Path) -> None:
    shutil.move(art / "model_int8.onnx", outside / "model_int8.onnx")  # the same bytes, hash matches
    (art / "model_int8.onnx").symlink_to(outside / "model_int8.onnx")


def symlinked_subfolder(art: Path, outside: Path) -> None:
    (outside / "b").mkdir()
    (outside / "b" / "x.bin").write_bytes(b"x")
    (art / "builds").symlink_to(outside / "b")
    _listed(art, "builds/x.bin", b"x")


def planted_temp_link(art: Path, outside: Path) -> None:  # finding 1: report.md.tmp -> ~/.bashrc
    for name in ("report.md.tmp", "report.json.tmp", "manifest.json.tmp", "bench.json", "report.md"):
        (art / name).symlink_to(outside / "victim.txt")


def dangling_link(art: Path, outside: Path) -> None:
    (art / "nothing.onnx").symlink_to(outside / "does-not-exist")


def dotdot_name(art: Path, outside: Path) -> None:
    _listed(art, "../victim.txt", (outside / "victim.txt").read_bytes())


def absolute_name(art: Path, outside: Path) -> None:
    _listed(art, str(outside / "victim.txt"), (outside / "victim.txt").read_bytes())


def nested_dotdot_name(art: Path, outside: Path) -> None:
    _listed(art, "builds/../../victim.txt", (outside / "victim.txt").read_bytes())


def backslash_name(art: Path, outside: Path) -> None:
    _listed(art, "..\\victim.txt", b"")


def build_model_outside(art: Path, outside: Path) -> None:  # finding 13: a build whose model is outside
    shutil.copy(art / "model_int8.onnx", outside / "evil.onnx")
    data = _manifest_data(art)
    data["builds"] = [{"backend": "onnxruntime", "model": "../outside/evil.onnx", "precision": "int8"}]
    _rewrite(art, data)


def build_model_unlisted(art: Path, outside: Path) -> None:  # finding 2: the model that loads need not be listed
    shutil.copy(art / "model_int8.onnx", art / "other.onnx")
    data = _manifest_data(art)
    data["builds"] = [{"backend": "onnxruntime", "model": "other.onnx", "precision": "int8"}]
    _rewrite(art, data)


def unlisted_file(art: Path, outside: Path) -> None:
    (art / "extra.bin").write_bytes(b"not listed")


def unlisted_in_subfolder(art: Path, outside: Path) -> None:
    (art / "builds" / "openvino").mkdir(parents=True)
    (art / "builds" / "openvino" / "model.xml").write_bytes(b"<xml/>")


def empty_files_map(art: Path, outside: Path) -> None:  # finding 2: files: {} passed
    data = _manifest_data(art)
    data["files"] = {}
    _rewrite(art, data)


def swapped_model(art: Path, outside: Path) -> None:
    shutil.copy(art / "model_fp32.onnx", art / "model_int8.onnx")


def swapped_model_rehashed_no_digest(art: Path, outside: Path) -> None:
    shutil.copy(art / "model_fp32.onnx", art / "model_int8.onnx")
    data = _manifest_data(art)
    data["files"]["model_int8.onnx"] = _sha((art / "model_int8.onnx").read_bytes())
    _rewrite(art, data, digest=False)
    (art / "manifest.json").write_text(json.dumps({**data, "digest": _manifest_data(art).get("digest", "0" * 64)}))


def manifest_edited(art: Path, outside: Path) -> None:
    data = _manifest_data(art)
    data["labels"] = ["x", "y", "z"]
    (art / "manifest.json").write_text(json.dumps(data))  # the digest is the old one


def digest_removed(art: Path, outside: Path) -> None:
    data = _manifest_data(art)
    del data["digest"]
    (art / "manifest.json").write_text(json.dumps(data))


def truncated_manifest(art: Path, outside: Path) -> None:
    text = (art / "manifest.json").read_bytes()
    (art / "manifest.json").write_bytes(text[: len(text) // 2])


def truncated_model(art: Path, outside: Path) -> None:
    data = (art / "model_int8.onnx").read_bytes()
    (art / "model_int8.onnx").write_bytes(data[: len(data) // 3])


def truncated_checkset(art: Path, outside: Path) -> None:
    data = (art / "checkset.npz").read_bytes()
    (art / "checkset.npz").write_bytes(data[:100])


def missing_model(art: Path, outside: Path) -> None:
    (art / "model_int8.onnx").unlink()


def future_schema(art: Path, outside: Path) -> None:
    data = _manifest_data(art)
    data["schema_version"] = "2.0"
    _rewrite(art, data)


def fifo_inside(art: Path, outside: Path) -> None:
    os.mkfifo(art / "pipe")


def _typed(key: str, value):
    def craft(art: Path, outside: Path) -> None:
        data = _manifest_data(art)
        data[key] = value
        _rewrite(art, data)
    craft.__name__ = f"wrong_type_{key}_{type(value).__name__}"
    return craft


WRONG_TYPES = [_typed("files", []), _typed("files", {"model_int8.onnx": 5}), _typed("files", {"a": "not-hex"}),
               _typed("builds", [1]), _typed("builds", {"backend": "onnxruntime"}), _typed("builds", [{"model": "x"}]),
               _typed("preprocess", "oops"), _typed("preprocess", {"resize": 3}), _typed("labels", "ab"),
               _typed("labels", [1, 2]), _typed("gate", 3), _typed("quantization", []), _typed("target", "x"),
               _typed("input", None), _typed("kind", ["artifact"]), _typed("schema_version", 1.1),
               _typed("builds", [{"backend": "onnxruntime", "model": "m.onnx", "options": [1]}])]

CORPUS = [symlink_manifest, symlink_model_same_bytes, symlinked_subfolder, planted_temp_link, dangling_link,
          dotdot_name, absolute_name, nested_dotdot_name, backslash_name, build_model_outside, build_model_unlisted,
          unlisted_file, unlisted_in_subfolder, empty_files_map, swapped_model, swapped_model_rehashed_no_digest,
          manifest_edited, digest_removed, truncated_manifest, truncated_model, truncated_checkset, missing_model,
          future_schema, fifo_inside, *WRONG_TYPES]


def _snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (links as their target, files as bytes)."""
    snap: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                snap[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                snap[rel] = p.read_bytes()
            elif not p.is_dir():
                snap[rel] = "special"
    return snap


@pytest.fixture
def crafted(pristine, tmp_path):
    def make(craft) -> tuple[Path, Path]:
        art = tmp_path / "art"
        shutil.copytree(pristine, art)
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "victim.txt").write_text("the user's file\n")
        craft(art, outside)
        return art, outside
    return make


def test_the_pristine_artifact_verifies_and_loads(pristine):
    verify_files(pristine)
    with load(pristine) as model:
        assert model.build["model"] == "model_int8.onnx"


@pytest.mark.parametrize("craft", CORPUS, ids=lambda c: c.__name__)
def test_crafted_artifact_is_refused_and_nothing_is_written(crafted, craft, tmp_path, capsys):
    art, outside = crafted(craft)
    before = _snapshot(tmp_path)
    with pytest.raises(EdgetlError) as exc:
        load(art).close()
    assert isinstance(exc.value, (ManifestError, IntegrityError)) or "manifest" in exc.value.message
    assert "\n" not in exc.value.message
    capsys.readouterr()
    assert main(["check", str(art), "--backend", "reference"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: ")
    assert _snapshot(tmp_path) == before, "a refused artifact must leave every file (and every link target) as it was"


def test_the_corpus_is_counted():
    """docs/reliability.md ("What the tests try") quotes this count."""
    assert len(CORPUS) == 41


# ---- the manifest reader, property-based ----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_is_a_manifest_or_a_manifest_error(value):
    try:
        Manifest.from_dict(value)
    except ManifestError:
        pass


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(["schema_version", "kind", "task", "labels", "input", "preprocess", "files", "builds",
                            "gate", "quantization", "target", "backbone", "training", "created", "digest"]),
       value=json_values)
def test_one_key_replaced_by_anything_is_read_or_refused(pristine_dict, tmp_path_factory, key, value):
    data = dict(pristine_dict)
    data[key] = value
    try:
        m = Manifest.from_dict(data)
    except ManifestError:
        return
    for name in m.files:  # whatever was accepted is confined
        check_name(name)
    for b in m.builds:
        assert isinstance(b.get("backend"), str)


@pytest.fixture(scope="module")
def pristine_dict(pristine) -> dict:
    return _manifest_data(pristine)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=40), st.text(alphabet="./\\a\x00", max_size=12)))
def test_an_accepted_name_never_leaves_the_folder(name):
    root = Path("/srv/artifact")
    try:
        check_name(name)
    except ManifestError:
        return
    resolved = os.path.normpath(os.path.join(str(root), name))
    assert resolved.startswith(str(root) + "/")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_as_a_manifest_file_are_refused_cleanly(tmp_path_factory, blob):
    d = tmp_path_factory.mktemp("blob")
    (d / "manifest.json").write_bytes(blob)
    try:
        read_manifest(d)
    except (ManifestError, IntegrityError):
        pass


def test_what_loads_is_what_was_hashed(pristine, tmp_path):
    """read_verified returns checked bytes; changing the file after verification is caught on read."""
    art = tmp_path / "art"
    shutil.copytree(pristine, art)
    m = verify_files(art)
    good = read_verified(art, "model_int8.onnx", m)
    assert _sha(good) == m.files["model_int8.onnx"]
    (art / "model_int8.onnx").write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # swapped after the check
    with pytest.raises(IntegrityError, match="model_int8.onnx: sha256"):
        read_verified(art, "model_int8.onnx", m)
    with pytest.raises(IntegrityError, match="not listed"):
        read_verified(art, "other.onnx", m)


def test_a_failed_build_is_never_the_default(pristine, tmp_path):
    """Finding 5: select_build prefers a build that passed (or was not gated) over one that failed."""
    art = tmp_path / "art"
    shutil.copytree(pristine, art)
    m = read_manifest(art)
    failed = {"backend": "openvino", "model": "model_int8.onnx", "precision": "int8", "gate": {"passed": False}}
    passed = {"backend": "onnxruntime", "model": "model_int8.onnx", "precision": "int8", "gate": {"passed": True}}
    write_manifest(m.replace(builds=(failed, passed)), art)
    from edgetl.runtime.model import select_build

    assert select_build(read_manifest(art), art)["backend"] == "onnxruntime"
    assert select_build(read_manifest(art), art, "openvino")["backend"] == "openvino"


def test_a_link_to_the_artifact_folder_is_the_users_choice(pristine, tmp_path):
    link = tmp_path / "latest"
    link.symlink_to(pristine)
    verify_files(link)
    load(link).close()
