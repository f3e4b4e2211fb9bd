import cv2
import numpy as np
import pytest

from edgetl.runtime.errors import ImageDecodeError, ManifestError
from edgetl.runtime.imageio import read_image
from edgetl.runtime.preprocess import PreprocessSpec, preprocess


def test_shapes_layouts_and_values():
    img = np.full((480, 640, 3), (10, 20, 30), np.uint8)  # BGR
    spec = PreprocessSpec(input_size=(64, 96), mean=(0, 0, 0), std=(1, 1, 1))
    x = preprocess(img, spec)
    assert x.shape == (3, 64, 96) and x.dtype == np.float32
    assert x[0].mean() == pytest.approx(30) and x[2].mean() == pytest.approx(10)  # RGB order
    nhwc = preprocess(img, PreprocessSpec(input_size=(64, 96), layout="NHWC", dtype="uint8", color="BGR"))
    assert nhwc.shape == (64, 96, 3) and nhwc.dtype == np.uint8 and nhwc[0, 0, 0] == 10


def test_shorter_crop_takes_the_centre():
    img = np.zeros((100, 300, 3), np.uint8)
    img[:, 100:200] = 255  # the centre square is white, the sides black
    spec = PreprocessSpec(input_size=(32, 32), crop_fraction=1.0, mean=(0,) * 3, std=(1,) * 3)
    assert preprocess(img, spec).min() == 255
    stretched = preprocess(img, PreprocessSpec(input_size=(32, 32), resize="stretch", mean=(0,) * 3, std=(1,) * 3))
    assert stretched.min() == 0  # stretch keeps the black sides


def test_letterbox_pads():
    img = np.full((50, 200, 3), 255, np.uint8)
    x = preprocess(img, PreprocessSpec(input_size=(40, 40), resize="letterbox", mean=(0,) * 3, std=(1,) * 3))
    assert x[:, 0, :].max() == 0 and x[:, 20, :].min() == 255


@pytest.mark.parametrize("key,value", [("resize", "squash"), ("color", "HSV"), ("layout", "CHW"),
                                       ("input_size", (4, 4)), ("std", (1, 0, 1))])
def test_bad_spec_refused(key, value):
    with pytest.raises(ManifestError, match=key.split("_")[0]):
        PreprocessSpec(**{key: value})


def test_wrong_input_image_type():
    with pytest.raises(ValueError, match="BGR uint8"):
        preprocess(np.zeros((10, 10), np.uint8), PreprocessSpec())


def test_decode_odd_images(tmp_path):
    gray = np.tile(np.arange(64, dtype=np.uint8), (32, 1))
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    bgra = np.dstack([gray, gray, gray, np.full_like(gray, 128)])
    cv2.imwrite(str(tmp_path / "alpha.png"), bgra)
    cv2.imwrite(str(tmp_path / "deep.png"), gray.astype(np.uint16) * 257)
    for name in ("gray.png", "alpha.png", "deep.png"):
        img = read_image(tmp_path / name)
        assert img.shape == (32, 64, 3) and img.dtype == np.uint8, name
        assert np.array_equal(img[:, :, 0], gray), name


def test_decode_cmyk_jpeg(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200  # red
    PIL.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    img = read_image(tmp_path / "cmyk.jpg")
    assert img.shape == (16, 16, 3)
    b, g, r = img.reshape(-1, 3).mean(0)
    assert r > 150 and g < 60 and b < 60


def test_decode_bad_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.jpg: zero-byte"):
        read_image(tmp_path / "empty.jpg")
    ok, buf = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))
    (tmp_path / "cut.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(ImageDecodeError, match="cut.jpg: truncated JPEG"):
        read_image(tmp_path / "cut.jpg")
    (tmp_path / "text.png").write_bytes(b"hello, not an image")
    with pytest.raises(ImageDecodeError, match="text.png: not a decodable"):
        read_image(tmp_path / "text.png")


@pytest.mark.parametrize("spec", [PreprocessSpec(), PreprocessSpec(mean=(127.5,) * 3, std=(127.5,) * 3, color="BGR")])
def test_to_model_input_recovers_the_uint8_image_exactly(spec):
    """A checkset (float32, normalised) fed to a build that folds the normalisation into its model:
    the uint8 NHWC tensor is exactly what preprocess gives for the same images with that build's spec."""
    from edgetl.runtime.preprocess import build_input_spec, to_model_input

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(5)]
    folded = build_input_spec(spec, {"dtype": "uint8", "layout": "NHWC"})
    x = np.stack([preprocess(im, spec) for im in images])
    want = np.stack([preprocess(im, folded) for im in images])
    got = to_model_input(x, spec, folded)
    assert got.dtype == np.uint8 and got.shape == want.shape and np.array_equal(got, want)
    np.testing.assert_allclose(to_model_input(got, folded, spec), x, rtol=0, atol=1e-6)  # and back
    assert build_input_spec(spec, None) is spec and to_model_input(x, spec, spec) is x  # nothing to convert


def test_to_model_input_refuses_tensors_not_made_by_the_spec():
    from edgetl.runtime.preprocess import build_input_spec, to_model_input

    spec = PreprocessSpec()
    x = np.random.default_rng(0).normal(0, 1, (2, 3, 224, 224)).astype(np.float32)  # not from pixels
    with pytest.raises(ManifestError, match="not made by this preprocessing spec"):
        to_model_input(x, spec, build_input_spec(spec, {"dtype": "uint8", "layout": "NHWC"}))
    with pytest.raises(ManifestError, match="unknown key"):
        build_input_spec(spec, {"mean": [0, 0, 0]})
