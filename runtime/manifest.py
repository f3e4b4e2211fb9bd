"""``manifest.json``: the single description of a run or an artifact (schema version 1.1).

Everything the next stage or the device needs is here: labels, task, the input tensor, the
preprocessing spec, where the backbone's weights came from, the training and quantization
summaries, the accuracy gate, the target and builds, ``files: {name: sha256}`` and ``digest``: the
sha256 of the manifest itself (canonical JSON without ``digest``), which covers every file's hash,
so one digest names the whole folder.

An artifact is a folder that travels, so it is read as untrusted input:

- the manifest is type-checked key by key (a wrong type is an error naming the key, never a
  traceback) and its digest must match (schema 1.1; 1.0 folders carry none and are still read);
- every name in it is confined to the folder (relative, no ``..``, no absolute path, no backslash);
- :func:`verify_files` checks the folder as a whole: no symlinks, devices or other special files
  anywhere, no file that the manifest does not list, every listed file present and matching;
- :func:`read_verified` opens a file once (never following a symlink at any level), checks its
  bytes and returns them, so what is loaded is what was hashed.

Readers refuse an unknown major schema version or a missing key with an error that names it.
This module runs on the device: Python 3.8, no torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Dict, Iterator, Mapping, Tuple

from .errors import IntegrityError, ManifestError
from .preprocess import PreprocessSpec

SCHEMA_VERSION = "1.1"  # classification (kept at 1.x: device runtimes of 1.x keep running new classification artifacts)
# The schema a manifest is written in follows its task: a task an older runtime cannot run bumps the
# MAJOR version, so that runtime refuses the folder with a clear error instead of misreading it.
SCHEMA_BY_TASK = {"classification": "1.1", "detection": "2.1"}  # 2.1: postprocess.object_threshold
TASKS = tuple(SCHEMA_BY_TASK)
READ_MAJORS = ("1", "2")
MANIFEST_NAME = "manifest.json"
KINDS = ("run", "artifact")
REQUIRED_KEYS = ("schema_version", "kind", "task", "labels", "input", "preprocess", "files")
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few kB; refuse to parse a huge one
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def check_name(name: Any, where: str = "manifest") -> str:
    """``name`` as a safe relative path inside a folder, or a ManifestError naming it.

    Refused: non-strings, empty names, absolute paths, ``.``/``..``/empty components, backslashes,
    NUL and the manifest itself."""
    bad = None
    if not isinstance(name, str) or not name:
        bad = "is not a non-empty string"
    elif "\x00" in name or "\\" in name:
        bad = "contains a NUL or a backslash"
    elif name.startswith("/"):
        bad = "is an absolute path"
    elif any(part in ("", ".", "..") for part in name.split("/")):
        bad = "has an empty, '.' or '..' component"
    elif name == MANIFEST_NAME:
        bad = "names the manifest itself"
    if bad:
        raise ManifestError(f"{where}: file name {name!r} {bad}",
                            hint="every name in a manifest is a path inside its folder; this folder was not "
                                 "written by edgetl or was altered: rebuild it with edgetl")
    return name


def canonical_digest(data: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its ``digest`` key."""
    body = {k: v for k, v in data.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _mapping(data: Mapping[str, Any], key: str, source: str, optional: bool = False) -> Any:
    value = data.get(key)
    if value is None and (optional or key not in data):
        return None
    if not isinstance(value, Mapping):
        raise ManifestError(f"{source}: key {key!r} must be a JSON object"
                            f"{' or null' if optional else ''}, not {type(value).__name__}",
                            hint="the manifest was not written by edgetl or was altered: rebuild the folder")
    return value


def _check_types(data: Mapping[str, Any], source: str) -> None:
    """Every key of a manifest has the JSON type edgetl writes; names are confined (see check_name)."""
    bad = "the manifest was not written by edgetl or was altered: rebuild the folder with edgetl"
    for key in ("kind", "task", "created", "edgetl_version"):
        if key in data and not isinstance(data[key], str):
            raise ManifestError(f"{source}: key {key!r} must be a string", hint=bad)
    labels = data["labels"]
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ManifestError(f"{source}: key 'labels' must be a list of strings", hint=bad)
    for key in ("input", "preprocess", "files"):
        _mapping(data, key, source)
    for key in ("backbone", "training"):
        _mapping(data, key, source, optional=True)
    for key in ("quantization", "gate", "target", "postprocess"):
        _mapping(data, key, source, optional=True)
    for name, digest in data["files"].items():
        check_name(name, f"{source} key 'files'")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ManifestError(f"{source}: files[{name!r}] is not a sha256 (64 lowercase hex digits)", hint=bad)
    builds = data.get("builds", [])
    if not isinstance(builds, list):
        raise ManifestError(f"{source}: key 'builds' must be a list of objects", hint=bad)
    for i, b in enumerate(builds):
        if not isinstance(b, Mapping) or not isinstance(b.get("backend"), str):
            raise ManifestError(f"{source}: builds[{i}] must be an object with a string 'backend'", hint=bad)
        if "model" in b:
            check_name(b["model"], f"{source} builds[{i}].model")
        if "options" in b and not isinstance(b["options"] or {}, Mapping):
            raise ManifestError(f"{source}: builds[{i}].options must be an object", hint=bad)


@dataclass(frozen=True)
class Manifest:
    """A run's or an artifact's manifest. Free-form sections are plain JSON dicts."""

    kind: str
    labels: Tuple[str, ...]
    preprocess: PreprocessSpec
    task: str = "classification"
    input: Mapping[str, Any] = field(default_factory=dict)  # {name, shape, layout, dtype}
    backbone: Mapping[str, Any] = field(default_factory=dict)  # {name, source, weights_sha256, ...}
    training: Mapping[str, Any] = field(default_factory=dict)  # {data_fingerprint, split_seed, metrics, ...}
    quantization: Mapping[str, Any] | None = None  # {method, calibrator, calibration_hash, float_layers, ...}
    gate: Mapping[str, Any] | None = None  # {passed, float_top1, quant_top1, drop, agreement, ...}
    target: Mapping[str, Any] | None = None  # the resolved target profile
    builds: Tuple[Mapping[str, Any], ...] = ()  # [{backend, file, precision, version, device, ...}]
    # detection: how raw outputs become boxes on the device ({"kind": "ssd", "anchors": file, ...});
    # see edgetl.runtime.detect. None for classification.
    postprocess: Mapping[str, Any] | None = None
    files: Mapping[str, str] = field(default_factory=dict)  # {relative path: sha256}
    created: str = ""
    edgetl_version: str = ""
    schema_version: str = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ManifestError(f"manifest key 'kind' = {self.kind!r} is not valid", hint=f"use one of {KINDS}")
        if self.task not in SCHEMA_BY_TASK:
            raise ManifestError(f"manifest key 'task' = {self.task!r} is not a task this edgetl knows",
                                hint=f"tasks: {', '.join(TASKS)}; a newer edgetl may have written it")
        if self.task == "detection" and not self.postprocess:
            raise ManifestError("manifest key 'postprocess' is missing: a detection model needs it",
                                hint="the folder is damaged or was not written by edgetl: rebuild it")
        labels = tuple(str(x) for x in self.labels)
        least = 1 if self.task == "detection" else 2  # a detector of one class (tree crowns) still says where
        if len(labels) < least or len(set(labels)) != len(labels):
            raise ManifestError(f"manifest key 'labels' needs at least {least} distinct label"
                                + ("s" if least > 1 else ""))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "builds", tuple(self.builds))
        for name in self.files:
            check_name(name, "manifest key 'files'")
        if not self.input:
            object.__setattr__(self, "input", default_input(self.preprocess))
        if not self.created:
            object.__setattr__(self, "created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        if not self.edgetl_version:
            from . import __version__
            object.__setattr__(self, "edgetl_version", __version__)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def digest(self) -> str:
        """sha256 over the manifest (canonical JSON), hence over every file's sha256: the folder's id."""
        return canonical_digest(self.to_dict())

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        data: Dict[str, Any] = {
            "schema_version": SCHEMA_BY_TASK[self.task],
            "kind": self.kind,
            "task": self.task,
            "labels": list(self.labels),
            "input": dict(self.input),
            "preprocess": self.preprocess.to_dict(),
            "backbone": dict(self.backbone),
            "training": dict(self.training),
            "quantization": None if self.quantization is None else dict(self.quantization),
            "gate": None if self.gate is None else dict(self.gate),
            "target": None if self.target is None else dict(self.target),
            "builds": [dict(b) for b in self.builds],
            "files": dict(sorted(self.files.items())),
            "created": self.created,
            "edgetl_version": self.edgetl_version,
        }
        if self.postprocess is not None:  # absent for classification: its manifests stay as 1.x wrote them
            data["postprocess"] = dict(self.postprocess)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "manifest") -> "Manifest":
        if not isinstance(data, Mapping):
            raise ManifestError(f"{source}: top level must be a JSON object")
        version = data.get("schema_version", "")
        if not version or not isinstance(version, str):
            raise ManifestError(f"{source}: missing key 'schema_version'",
                                hint="this file was not written by edgetl, or is damaged")
        major = version.split(".")[0]
        if major not in READ_MAJORS:
            raise ManifestError(
                f"{source}: schema_version {version!r} is not supported (this edgetl reads "
                f"{', '.join(m + '.x' for m in READ_MAJORS)})",
                hint="use the edgetl version that wrote it, or re-create the run/artifact with this one")
        task = data.get("task")
        if isinstance(task, str) and task in SCHEMA_BY_TASK and SCHEMA_BY_TASK[task].split(".")[0] != major:
            raise ManifestError(f"{source}: task {task!r} is written in schema {SCHEMA_BY_TASK[task]}, "
                                f"not {version!r}", hint="the manifest was altered: rebuild the folder with edgetl")
        for key in REQUIRED_KEYS:
            if key not in data:
                raise ManifestError(f"{source}: missing key {key!r}")
        _check_types(data, source)
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}  # minor versions may add keys: ignored
        for key in ("backbone", "training"):
            if kwargs.get(key) is None:
                kwargs.pop(key, None)
        kwargs["schema_version"] = SCHEMA_BY_TASK.get(str(data.get("task")), SCHEMA_VERSION)  # written back in this version's form
        try:
            kwargs["preprocess"] = PreprocessSpec.from_dict(data["preprocess"])
        except ManifestError as exc:
            raise ManifestError(f"{source}: {exc.message}", hint=exc.hint) from None
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"{source}: key 'preprocess' is malformed ({exc})") from None
        try:
            return cls(**kwargs)
        except ManifestError as exc:
            raise ManifestError(f"{source}: {exc.message}", hint=exc.hint) from None
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"{source}: malformed ({exc})",
                                hint="the manifest was not written by edgetl or was altered: rebuild the folder") from None


def default_input(spec: PreprocessSpec, batch: int | str = 1) -> Dict[str, Any]:
    return {"name": "input", "shape": list(spec.tensor_shape(1))[1:], "batch": batch,
            "layout": spec.layout, "dtype": spec.dtype}


def manifest_path(path: str | Path) -> Path:
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest of a run/artifact folder (or a manifest file): JSON types,
    confined names and (schema 1.1) the manifest's own digest."""
    p = manifest_path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        what = "folder" if Path(path).is_dir() else "path"
        raise ManifestError(f"{p}: no manifest found",
                            hint=f"the {what} {path} is not an edgetl run or artifact (no {MANIFEST_NAME})") from None
    except OSError as exc:
        raise ManifestError(f"{p}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise IntegrityError(f"{p}: is a symlink or not a regular file",
                             hint="an edgetl manifest is a plain file: copy the folder again from its source")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{p}: {st.st_size} bytes is too large for a manifest")
    try:
        fd = os.open(p, _FILE_FLAGS)
        with os.fdopen(fd, "rb") as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ManifestError(f"{p}: not valid JSON ({exc})") from None
    manifest = Manifest.from_dict(data, source=str(p))
    recorded = data.get("digest")
    if recorded is None and str(data.get("schema_version")) != "1.0":
        raise IntegrityError(f"{p}: the manifest has no 'digest'",
                             hint="it was edited by hand or damaged: copy the folder again, or rebuild it")
    if recorded is not None and recorded != canonical_digest(data):
        raise IntegrityError(f"{p}: the manifest does not match its digest (it was edited or damaged)",
                             hint="copy the folder again from its source, or rebuild it with edgetl")
    return manifest


def _open_private(folder: Path, name: str):
    """A new file in ``folder`` that did not exist (O_EXCL, random name): never follows a planted link."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    return os.fdopen(fd, "wb"), Path(tmp)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a fresh temp file (O_EXCL) renamed over it: readers see the
    old or the new file, and a symlink at ``path`` is replaced, never followed."""
    path = Path(path)
    fh, tmp = _open_private(path.parent, path.name)
    try:
        with fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_manifest(manifest: Manifest, folder: str | Path) -> Path:
    """Write ``manifest.json`` (with its digest) into ``folder`` atomically."""
    data = manifest.to_dict()
    data["digest"] = canonical_digest(data)
    return atomic_write(Path(folder) / MANIFEST_NAME, json.dumps(data, indent=2) + "\n")


def scan_tree(folder: str | Path) -> Dict[str, os.stat_result]:
    """``{relative name: lstat}`` of every regular file under ``folder`` except the manifest.

    Symlinks (to anything), devices, FIFOs and sockets inside are refused with their name: an
    artifact holds plain files and folders only. (``folder`` itself is the user's path and may be a
    link to the folder.)"""
    root = Path(folder)
    st = os.stat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise IntegrityError(f"{root}: not a folder", hint="pass the run/artifact folder")
    found: Dict[str, os.stat_result] = {}

    def walk(d: Path, prefix: str) -> None:
        with os.scandir(d) as it:
            for e in sorted(it, key=lambda e: e.name):
                name = prefix + e.name
                est = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(est.st_mode):
                    walk(Path(e.path), name + "/")
                elif stat.S_ISREG(est.st_mode):
                    if name != MANIFEST_NAME:
                        found[name] = est
                else:
                    what = "a symlink" if stat.S_ISLNK(est.st_mode) else "not a regular file"
                    raise IntegrityError(f"{root / name}: {what} inside {root}",
                                         hint="an edgetl folder holds plain files only: remove it, or copy "
                                              "the folder again from its source")

    walk(root, "")
    return found


def hash_files(folder: str | Path, names: list[str] | None = None) -> Dict[str, str]:
    """sha256 of ``names`` (relative paths) or of every file under ``folder`` except the manifest
    (refusing symlinks and special files, see :func:`scan_tree`)."""
    folder = Path(folder)
    if names is None:
        names = sorted(scan_tree(folder))
    return {check_name(n, str(folder)): _sha256_confined(folder, n) for n in names}


def _open_confined(folder: Path, name: str) -> int:
    """An fd of the regular file ``folder/name``, opened one component at a time without following
    any symlink (so the file is inside the folder whatever happens to the tree meanwhile)."""
    check_name(name, str(folder))
    parts = PurePosixPath(name).parts
    dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))  # the user's path: may be a link
    try:
        for part in parts[:-1]:
            nfd = os.open(part, _DIR_FLAGS, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
        fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dfd)
    finally:
        os.close(dfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IntegrityError(f"{folder / name}: not a regular file")
    return fd


def _chunks(fd: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    while True:
        block = os.read(fd, chunk)
        if not block:
            return
        yield block


def _open_or_refuse(folder: Path, name: str) -> int:
    try:
        return _open_confined(folder, name)
    except OSError as exc:
        raise IntegrityError(f"{folder / name}: cannot be opened inside the folder ({exc.strerror})",
                             hint="it is missing, a symlink, or unreadable: copy the folder again") from None


def _sha256_confined(folder: Path, name: str) -> str:
    fd = _open_or_refuse(folder, name)
    try:
        h = hashlib.sha256()
        for block in _chunks(fd):
            h.update(block)
        return h.hexdigest()
    finally:
        os.close(fd)


def _mismatch(folder: Path, name: str, actual: str, digest: str) -> IntegrityError:
    return IntegrityError(f"{folder / name}: sha256 {actual[:12]}… does not match the manifest's {digest[:12]}…",
                          hint="the file was modified or damaged after it was written: copy it again, "
                               "or rebuild it with edgetl")


def verify_files(folder: str | Path, manifest: Manifest | None = None) -> Manifest:
    """Verify the folder as a whole: the manifest (types, names, digest), no symlinks or special
    files, no unlisted files, every listed file present with its sha256."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    found = scan_tree(folder)
    where = folder / MANIFEST_NAME
    unlisted = sorted(set(found) - set(manifest.files))
    if unlisted:
        more = f" (and {len(unlisted) - 3} more)" if len(unlisted) > 3 else ""
        raise IntegrityError(f"{folder / unlisted[0]}: not listed in {where}{more}: "
                             f"{', '.join(unlisted[:3])}",
                             hint="something was added to the folder after edgetl wrote it: remove it, or copy "
                                  "the folder again from its source")
    for name, digest in manifest.files.items():
        if name not in found:
            raise IntegrityError(f"{folder / name}: listed in {where} but missing",
                                 hint="the folder is incomplete: copy it again from its source")
        actual = _sha256_confined(folder, name)
        if actual != digest:
            raise _mismatch(folder, name, actual, digest)
    return manifest


def read_verified(folder: str | Path, name: str, manifest: Manifest) -> bytes:
    """The bytes of ``folder/name`` read through one confined descriptor and checked against the
    manifest: what the caller loads is exactly what was hashed (no time-of-check/time-of-use gap)."""
    folder = Path(folder)
    digest = manifest.files.get(name)
    if digest is None:
        raise IntegrityError(f"{folder / name}: not listed in {folder / MANIFEST_NAME}",
                             hint="only files the manifest lists are loaded: rebuild the artifact with edgetl")
    fd = _open_or_refuse(folder, name)
    try:
        data = b"".join(_chunks(fd))
    finally:
        os.close(fd)
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise _mismatch(folder, name, actual, digest)
    return data


def seal(folder: str | Path, manifest: Manifest) -> Manifest:
    """Hash every file under ``folder`` into ``manifest.files`` and write the manifest: the one way a
    writer finishes a run/artifact folder (used inside a private temp folder, see ``edgetl.artifact``)."""
    manifest = manifest.replace(files=hash_files(folder))
    write_manifest(manifest, folder)
    return manifest


def open_verified(folder: str | Path, kind: str, hint: str) -> Manifest:
    """The manifest of a run/artifact folder verified as a whole (:func:`verify_files`), refusing a
    missing folder or the wrong kind with ``hint`` (what to pass instead)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such {kind} folder", hint=hint)
    manifest = read_manifest(folder)
    if manifest.kind != kind:
        raise ManifestError(f"{folder} is an edgetl {manifest.kind}, not {'an' if kind[0] in 'aeiou' else 'a'} {kind}",
                            hint=hint)
    return verify_files(folder, manifest)
