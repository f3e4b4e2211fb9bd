"""``manifest.json``: the single description of a run or an artifact (schema version 1).

Everything the next stage or the device needs is here: labels, task, the input tensor, the
preprocessing spec, where the backbone's weights came from, the training and quantization
summaries, the accuracy gate, the target and builds, and ``files: {name: sha256}`` so a copied
artifact can prove it is intact. Readers refuse an unknown major schema version or a missing key
with an error that names it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import IntegrityError, ManifestError
from .preprocess import PreprocessSpec

SCHEMA_VERSION = "1.0"
MANIFEST_NAME = "manifest.json"
KINDS = ("run", "artifact")
REQUIRED_KEYS = ("schema_version", "kind", "task", "labels", "input", "preprocess", "files")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A run's or an artifact's manifest. Free-form sections are plain JSON dicts."""

    kind: str
    labels: tuple[str, ...]
    preprocess: PreprocessSpec
    task: str = "classification"
    input: Mapping[str, Any] = field(default_factory=dict)  # {name, shape, layout, dtype}
    backbone: Mapping[str, Any] = field(default_factory=dict)  # {name, source, weights_sha256, ...}
    training: Mapping[str, Any] = field(default_factory=dict)  # {data_fingerprint, split_seed, metrics, ...}
    quantization: Mapping[str, Any] | None = None  # {method, calibrator, calibration_hash, float_layers, ...}
    gate: Mapping[str, Any] | None = None  # {passed, float_top1, quant_top1, drop, agreement, ...}
    target: Mapping[str, Any] | None = None  # the resolved target profile
    builds: tuple[Mapping[str, Any], ...] = ()  # [{backend, file, precision, version, device, ...}]
    files: Mapping[str, str] = field(default_factory=dict)  # {relative path: sha256}
    created: str = ""
    edgetl_version: str = ""
    schema_version: str = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ManifestError(f"manifest key 'kind' = {self.kind!r} is not valid", hint=f"use one of {KINDS}")
        labels = tuple(str(x) for x in self.labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ManifestError("manifest key 'labels' needs at least two distinct labels")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "builds", tuple(self.builds))
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

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "manifest") -> "Manifest":
        if not isinstance(data, Mapping):
            raise ManifestError(f"{source}: top level must be a JSON object")
        version = str(data.get("schema_version", ""))
        if not version:
            raise ManifestError(f"{source}: missing key 'schema_version'",
                                hint="this file was not written by edgetl, or is damaged")
        major = version.split(".")[0]
        if major != SCHEMA_VERSION.split(".")[0]:
            raise ManifestError(
                f"{source}: schema_version {version!r} is not supported (this edgetl reads {SCHEMA_VERSION})",
                hint="use the edgetl version that wrote it, or re-create the run/artifact with this one")
        for key in REQUIRED_KEYS:
            if key not in data:
                raise ManifestError(f"{source}: missing key {key!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in data.items() if k not in known}
        if extra:  # minor versions may add keys; older readers ignore them
            pass
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            kwargs["preprocess"] = PreprocessSpec.from_dict(data["preprocess"])
        except ManifestError as exc:
            raise ManifestError(f"{source}: {exc.message}", hint=exc.hint) from None
        except TypeError as exc:
            raise ManifestError(f"{source}: key 'preprocess' is malformed ({exc})") from None
        try:
            return cls(**kwargs)
        except ManifestError as exc:
            raise ManifestError(f"{source}: {exc.message}", hint=exc.hint) from None


def default_input(spec: PreprocessSpec, batch: int | str = 1) -> dict[str, Any]:
    return {"name": "input", "shape": list(spec.tensor_shape(1))[1:], "batch": batch,
            "layout": spec.layout, "dtype": spec.dtype}


def manifest_path(path: str | Path) -> Path:
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest of a run/artifact folder (or a manifest file)."""
    p = manifest_path(path)
    if not p.exists():
        what = "folder" if Path(path).is_dir() else "path"
        raise ManifestError(f"{p}: no manifest found",
                            hint=f"the {what} {path} is not an edgetl run or artifact (no {MANIFEST_NAME})")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{p}: not valid JSON ({exc})") from None
    return Manifest.from_dict(data, source=str(p))


def write_manifest(manifest: Manifest, folder: str | Path) -> Path:
    """Write ``manifest.json`` into ``folder`` (atomically: temp file + rename)."""
    folder = Path(folder)
    target = folder / MANIFEST_NAME
    tmp = folder / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def hash_files(folder: str | Path, names: list[str] | None = None) -> dict[str, str]:
    """sha256 of ``names`` (relative paths) or of every file under ``folder`` except the manifest."""
    folder = Path(folder)
    if names is None:
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                       if p.is_file() and p.name != MANIFEST_NAME and not p.name.endswith(".tmp"))
    return {n: sha256_file(folder / n) for n in names}


def verify_files(folder: str | Path, manifest: Manifest | None = None) -> Manifest:
    """Check every file listed in the manifest exists and matches its sha256."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    for name, digest in manifest.files.items():
        p = folder / name
        if not p.is_file():
            raise IntegrityError(f"{p}: listed in {folder / MANIFEST_NAME} but missing",
                                 hint="the folder is incomplete: copy it again from its source")
        actual = sha256_file(p)
        if actual != digest:
            raise IntegrityError(f"{p}: sha256 {actual[:12]}… does not match the manifest's {digest[:12]}…",
                                 hint="the file was modified or damaged after it was written: copy it again, "
                                      "or rebuild it with edgetl")
    return manifest


def open_verified(folder: str | Path, kind: str, hint: str) -> Manifest:
    """The manifest of a run/artifact folder whose files all match their sha256, refusing a missing
    folder or the wrong kind with ``hint`` (what to pass instead)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such {kind} folder", hint=hint)
    manifest = verify_files(folder, read_manifest(folder))
    if manifest.kind != kind:
        raise ManifestError(f"{folder} is an edgetl {manifest.kind}, not {'an' if kind[0] in 'aeiou' else 'a'} {kind}",
                            hint=hint)
    return manifest

