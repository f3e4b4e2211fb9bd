"""The dataset reader on odd inputs (issue 13, findings 10 and 12): file names that are not valid
UTF-8, symlink loops and dangling links, images that declare a huge size. Real files on disk."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import make_class_image, png_bomb, write_image_folder
from edgetl.data import fingerprint, load_data, load_eval_items
from edgetl.runtime.errors import EdgetlError

BAD_NAME = b"caf\xe9.png"  # Latin-1 "café": not valid UTF-8


def _bytes_name_file(folder: Path, name: bytes, img: np.ndarray) -> str:
    """Write an image under a raw byte name; skip when this filesystem refuses such names."""
    path = os.path.join(os.fsencode(folder), name)
    try:
        with open(path, "wb") as f:
            f.write(cv2.imencode(".png", img)[1].tobytes())
    except (OSError, UnicodeError) as exc:  # e.g. macOS APFS refuses names that are not UTF-8
        pytest.skip(f"this filesystem refuses non-UTF-8 file names ({exc})")
    return os.fsdecode(path)



# ---- finding 12: names that are not valid UTF-8 -------------------------------------------------------

def test_non_utf8_file_name_is_fingerprinted_not_a_crash(tmp_path):
    root = write_image_folder(tmp_path / "img", n_per_class=6)
    bad = _bytes_name_file(root / "disc", BAD_NAME, make_class_image(0, np.random.default_rng(1)))
    ds = load_data(root, seed=0)
    assert ds.report["usable"] == 13 and ds.report["skipped_count"] == 0
    rels = {it.rel for s in ds.splits.values() for it in s}
    assert os.fsdecode(b"disc/" + BAD_NAME) in rels
    # the fingerprint hashes the name's bytes on disk (os.fsencode), so it is reproducible
    items = sorted((it.rel, it.label, it.path) for s in ds.splits.values() for it in s)
    h = hashlib.sha256()
    for rel, label, path in items:
        h.update(os.fsencode(rel) + b"\t" + label.encode() + b"\t"
                 + hashlib.sha256(Path(path).read_bytes()).hexdigest().encode() + b"\n")
    assert ds.fingerprint == h.hexdigest()
    # the report and split.json serialise (the run folder writes them)
    json.loads(json.dumps(ds.report))
    back = json.loads(json.dumps(ds.split_json()))
    assert any(os.path.exists(Path(ds.root) / e["path"]) for s in back["splits"].values() for e in s
               if e["path"] == os.fsdecode(b"disc/" + BAD_NAME))
    assert Path(bad).exists()
    samples, report = load_eval_items(root, ["disc", "stripes"])
    assert len(samples) == 13 and report["fingerprint"] == ds.fingerprint


def test_utf8_names_fingerprint_as_before(tmp_path):
    """The surrogateescape encoding changes nothing for valid names (runs made before keep their fingerprint)."""
    root = write_image_folder(tmp_path / "img", n_per_class=3)
    (root / "disc" / "disc_000.png").rename(root / "disc" / "café_ü.png")
    ds = load_data(root, seed=0, val_fraction=0.3, test_fraction=0.0)
    items = [it for s in ds.splits.values() for it in s]
    hashes = {it.rel: hashlib.sha256(it.path.read_bytes()).hexdigest() for it in items}
    old = hashlib.sha256()
    for rel, label in sorted((it.rel, it.label) for it in items):
        old.update(f"{rel}\t{label}\t{hashes[rel]}\n".encode())
    assert fingerprint(items, hashes) == old.hexdigest() == ds.fingerprint


def test_non_utf8_class_folder_is_a_one_line_error(tmp_path):
    root = write_image_folder(tmp_path / "img", n_per_class=3)
    bad_dir = os.path.join(os.fsencode(root), b"cat\xe9gorie")
    try:
        os.mkdir(bad_dir)
    except (OSError, UnicodeError) as exc:
        pytest.skip(f"this filesystem refuses non-UTF-8 names ({exc})")
    with pytest.raises(EdgetlError) as exc:
        load_data(root)
    assert "not valid UTF-8" in exc.value.message and "\n" not in exc.value.message
    assert "rename" in exc.value.hint


def test_train_on_non_utf8_names_writes_its_run(tmp_path):
    """`edgetl train` with a usable and a truncated file named in Latin-1, printing to a strict UTF-8
    terminal: no UnicodeEncodeError (fingerprint, log lines, data_report.json)."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    root = write_image_folder(tmp_path / "img", n_per_class=6)
    _bytes_name_file(root / "stripes", BAD_NAME, make_class_image(1, np.random.default_rng(2)))
    truncated = _bytes_name_file(root / "disc", b"trunc\xe9.png", make_class_image(0, np.random.default_rng(3)))
    Path(truncated).write_bytes(Path(truncated).read_bytes()[:40])
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", "import sys\nfrom edgetl.cli import main\nsys.exit(main(sys.argv[1:]))",
                        "train", str(root), "--backbone", "tiny_cnn", "--pretrained", "none", "--mode",
                        "feature-extract", "--epochs", "1", "--num-workers", "0", "--out", str(out)],
                       capture_output=True, timeout=300,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"})
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert b"skipped disc/trunc\\xe9.png: truncated PNG" in r.stdout
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    assert report["usable"] == 13 and report["skipped"][0]["path"] == "disc/trunc\\xe9.png"
    split = json.loads((out / "split.json").read_text(encoding="utf-8"))
    paths = [e["path"] for s in split["splits"].values() for e in s]
    assert os.fsdecode(b"stripes/" + BAD_NAME) in paths  # the exact name: the file opens again from it
    assert all((root / p).is_file() for p in paths)


# ---- finding 12: symlink loops and dangling links -----------------------------------------------------

def test_symlink_loops_and_dangling_links_are_counted_and_listed(tmp_path):
    root = write_image_folder(tmp_path / "img", n_per_class=5)
    os.symlink("nowhere.png", root / "disc" / "dangling.png")
    os.symlink("loop.png", root / "stripes" / "loop.png")  # a link to itself
    os.symlink("b.png", root / "stripes" / "a.png")  # a loop of two
    os.symlink("a.png", root / "stripes" / "b.png")
    os.symlink(root / "disc", root / "stripes" / "again")  # a folder: not followed (no images counted twice)
    os.symlink(root, root / "disc" / "up")  # a folder loop
    os.symlink("gone", root / "toplevel")  # beside the class folders
    (root / "stripes" / "ok.png").symlink_to(root / "stripes" / "stripes_000.png")  # a link to a file: followed
    ds = load_data(root, seed=0)
    links = ds.report["links"]
    assert (links["count"], links["dangling"], links["loop"], links["folder"]) == (7, 2, 3, 2)
    listed = {e["path"]: e["kind"] for e in links["list"]}
    assert listed == {"disc/dangling.png": "dangling", "stripes/loop.png": "loop", "stripes/a.png": "loop",
                      "stripes/b.png": "loop", "stripes/again": "folder", "disc/up": "folder", "toplevel": "dangling"}
    assert all(e["reason"] and "target" in e for e in links["list"])
    assert ds.report["usable"] == 11  # 10 images + the followed file link, nothing counted twice
    json.dumps(ds.report)


def test_csv_rows_naming_broken_links_are_reported(tmp_path):
    root = write_image_folder(tmp_path / "img", n_per_class=4)
    os.symlink("loop.png", root / "loop.png")
    os.symlink("nothing.png", root / "dangling.png")
    rows = ["path,label"] + [f"{c}/{c}_{i:03d}.png,{c}" for c in ("disc", "stripes") for i in range(4)]
    rows += ["loop.png,disc", "dangling.png,stripes", "absent.png,disc"]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = load_data(root / "labels.csv", seed=0, val_fraction=0.25, test_fraction=0.0)
    reasons = {s["path"]: s["reason"] for s in ds.report["skipped"]}
    assert reasons["loop.png"].startswith("symlink loop") and reasons["dangling.png"].startswith("dangling")
    assert reasons["absent.png"].startswith("missing file")
    assert {e["path"]: e["kind"] for e in ds.report["links"]["list"]} == {"loop.png": "loop", "dangling.png": "dangling"}


# ---- finding 10: decoded image size -------------------------------------------------------------------

def test_an_image_declaring_a_huge_size_is_skipped_before_decoding(tmp_path):
    root = write_image_folder(tmp_path / "img", n_per_class=4)
    png_bomb(root / "disc" / "bomb.png")
    ds = load_data(root, seed=0, val_fraction=0.25, test_fraction=0.0)
    skipped = {s["path"]: s["reason"] for s in ds.report["skipped"]}
    assert skipped == {"disc/bomb.png": "40000x40000 pixels (1600 megapixels) is over the limit of 100 megapixels"}
