"""The run folder: what ``edgetl train`` writes and every later stage reads.

``runs/NAME/``::

    manifest.json      kind "run": labels, preprocess, backbone {name, pretrained, weights source,
                       sha256, dropout}, training {config, data fingerprint, split seed, metrics}
    model.safetensors  the classifier's state dict (never a pickled model)
    split.json         {"root", "seed", "splits": {"train"|"val"|"test": [{"path", "label"}]}}
    config.toml        the resolved training config
    metrics.json, confusion.png, curves.png, data_report.json

``load_run`` verifies every file's sha256 against the manifest, rebuilds the architecture from
the registry (no download: the trained weights replace the pretrained ones) and loads the weights.
A backbone named ``torchvision:NAME``/``timm:NAME`` is a whole library classifier trained outside
edgetl (``edgetl compile weights.pth --arch ...`` materialises such a run temporarily).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runtime.errors import EdgetlError
from .runtime.manifest import Manifest, open_verified

WEIGHTS_FILE = "model.safetensors"
SPLIT_FILE = "split.json"
CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.json"
DATA_REPORT_FILE = "data_report.json"
CONFUSION_PNG = "confusion.png"
CURVES_PNG = "curves.png"
CHECKPOINT_FILE = "checkpoint.pt"  # only inside the resumable ``NAME.partial`` folder


def partial_dir(out: str | Path) -> Path:
    """Where an interrupted ``edgetl train --out OUT`` keeps its resumable state: ``OUT.partial``.

    It never holds a manifest, so it can never be mistaken for a finished run."""
    out = Path(out)
    return out.parent / f"{out.name}.partial"


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class LoadedRun:
    path: Path
    manifest: Manifest
    model: Any  # torch.nn.Module in eval mode
    split: dict[str, Any]

    def samples(self, split: str) -> list[Sample]:
        """The (absolute path, label index) list of ``train``, ``val`` or ``test``."""
        return split_samples(self.split, split, self.manifest.labels, self.path)


def split_samples(split: dict[str, Any], name: str, labels: tuple[str, ...], where: Path) -> list[Sample]:
    if name not in split.get("splits", {}):
        raise EdgetlError(f"{where / SPLIT_FILE}: has no {name!r} split")
    root = Path(split.get("root", "."))
    index = {lab: i for i, lab in enumerate(labels)}
    out = []
    for item in split["splits"][name]:
        p = Path(item["path"])
        out.append(Sample(p if p.is_absolute() else root / p, index[item["label"]]))
    return out


def save_weights(model, folder: Path) -> Path:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(folder) / WEIGHTS_FILE
    save_file(state, str(path))
    return path


def build_from_manifest(manifest: Manifest):
    """The classifier architecture of a run, with random weights (load the run's weights next).

    ``backbone.name`` is a registry backbone (``EdgeClassifier``: backbone -> dropout -> head), or
    ``torchvision:NAME`` / ``timm:NAME`` for a model trained outside edgetl (the whole library model)."""
    from .backbones import build_classifier, build_external, is_external

    bb = manifest.backbone
    if "name" not in bb:
        raise EdgetlError("manifest key 'backbone.name' is missing: cannot rebuild the model")
    if is_external(bb["name"]):
        return build_external(bb["name"], manifest.num_classes, where="manifest key 'backbone.name'")
    model, _ = build_classifier(bb["name"], manifest.num_classes, pretrained="none",
                                dropout=float(bb.get("dropout", 0.2)))
    return model


def load_run(path: str | Path) -> LoadedRun:
    """Load a finished run folder: verified manifest, the model (eval mode) and its split."""
    path = Path(path)
    manifest = open_verified(path, "run", hint="pass the --out folder of `edgetl train`")
    from safetensors.torch import load_file

    model = build_from_manifest(manifest)
    state = load_file(str(path / WEIGHTS_FILE))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise EdgetlError(f"{path / WEIGHTS_FILE}: weights do not fit backbone "
                          f"{manifest.backbone.get('name')!r}: {str(exc).splitlines()[0]}") from None
    model.eval()
    split = json.loads((path / SPLIT_FILE).read_text()) if (path / SPLIT_FILE).exists() else {"splits": {}}
    return LoadedRun(path, manifest, model, split)
