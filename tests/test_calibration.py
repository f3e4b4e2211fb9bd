"""Calibration sets, calibrators, the ORT calibration cache, QDQ graph reading, sensitivity ranking."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import make_class_image, write_image_folder
from edgetl.calibration.cache import load_ranges, merge_ranges, save_ranges
from edgetl.calibration.calibrators import CALIBRATORS, calibrate, get_calibrator
from edgetl.calibration.qdq import (QDQ_FORMS, fake_quantize, is_qdq, op_counts, qdq_form, quantized_nodes,
                                    strip_qdq, weighted_nodes)
from edgetl.calibration.sensitivity import logit_error, rank_layers, to_csv
from edgetl.calibration.sets import (CalibrationError, CalibrationSet, assert_disjoint, from_folder, load_images,
                                     select_stratified)
from edgetl.runtime.errors import EdgetlError
from edgetl.runtime.preprocess import PreprocessSpec

SPEC = PreprocessSpec(input_size=(32, 32), resize="stretch", mean=(127.5,) * 3, std=(127.5,) * 3)


def samples(counts: dict[int, int]) -> list[tuple[Path, int]]:
    return [(Path(f"/data/c{c}/img{i:03d}.png"), c) for c, n in counts.items() for i in range(n)]


# ---- sets ---------------------------------------------------------------------------------

def test_stratified_selection_keeps_class_proportions_and_is_reproducible():
    s = samples({0: 700, 1: 250, 2: 50})
    a = select_stratified(s, size=100, seed=3, min_images=10)
    b = select_stratified(s, size=100, seed=3, min_images=10)
    c = select_stratified(s, size=100, seed=4, min_images=10)
    assert len(a) == 100 and a.paths == b.paths and a.paths != c.paths
    assert a.class_counts() == {0: 70, 1: 25, 2: 5}
    assert len(set(a.paths)) == 100
    assert a.sha256 == b.sha256 != c.sha256


def test_every_class_gets_at_least_one_image():
    cal = select_stratified(samples({0: 990, 1: 3, 2: 7}), size=20, min_images=5)
    counts = cal.class_counts()
    assert set(counts) == {0, 1, 2} and sum(counts.values()) == 20 and counts[1] >= 1 and counts[2] >= 1


def test_fewer_images_than_asked_uses_all_unless_exact():
    s = samples({0: 30, 1: 20})
    assert len(select_stratified(s, size=300, min_images=10)) == 50
    with pytest.raises(CalibrationError, match="exactly"):
        select_stratified(s, size=300, min_images=10, exact=True)
    with pytest.raises(CalibrationError, match="only 50 images; at least 64"):
        select_stratified(s, size=300, min_images=64)


def test_calibration_listing_is_relative_to_root(tmp_path: Path):
    root = write_image_folder(tmp_path / "imgs", n_per_class=4)
    files = sorted(root.rglob("*.png"))
    cal = select_stratified([(p, 0 if "disc" in p.name else 1) for p in files], size=4, min_images=1, root=root)
    lines = cal.listing().splitlines()
    assert len(lines) == 4 and all(not line.startswith("/") and (root / line).is_file() for line in lines)


def test_calib_dir_too_few_images_is_a_clear_error(tmp_path: Path):
    folder = write_image_folder(tmp_path / "few", n_per_class=3)
    with pytest.raises(CalibrationError) as exc:
        from_folder(folder, size=300, min_images=64)
    assert "only 6 images" in exc.value.message and str(folder) in exc.value.message
    with pytest.raises(CalibrationError, match="no such folder"):
        from_folder(tmp_path / "missing")


def test_calib_dir_subfolders_stratify(tmp_path: Path):
    folder = write_image_folder(tmp_path / "imgs", n_per_class=10, classes=("a", "b"))
    cal = from_folder(folder, size=6, min_images=2)
    assert cal.source == f"dir:{folder}" and cal.class_counts() == {0: 3, 1: 3}


def test_overlap_with_held_out_images_is_refused(tmp_path: Path):
    cal = CalibrationSet((tmp_path / "a.png", tmp_path / "b.png"), (0, 1), "train-split")
    assert_disjoint(cal, [tmp_path / "c.png"])
    with pytest.raises(CalibrationError, match="in the run's test split"):
        assert_disjoint(cal, [tmp_path / "b.png"], "test")


def test_load_images_names_undecodable_files(tmp_path: Path):
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), make_class_image(0, np.random.default_rng(0)))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    x = load_images([good], SPEC)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    with pytest.raises(CalibrationError, match="bad.png"):
        load_images([good, bad], SPEC)


# ---- calibrators, cache, QDQ forms --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A pre-processed tiny_cnn ONNX and realistic inputs (generated class images)."""
    import torch

    from edgetl.backbones import build_classifier
    from edgetl.export import export_onnx
    from edgetl.quantize import prepare_float

    d = tmp_path_factory.mktemp("calib")
    torch.manual_seed(0)
    model, _ = build_classifier("tiny_cnn", 3, pretrained="none", dropout=0.0)
    fp32 = export_onnx(model.eval(), SPEC, d / "fp32.onnx")
    rng = np.random.default_rng(0)
    from edgetl.runtime.preprocess import preprocess

    x = np.stack([preprocess(make_class_image(i % 3, rng), SPEC) for i in range(48)])
    return prepare_float(fp32, d / "prepared.onnx"), x


def test_calibrators_give_ranges_for_the_same_tensors(tiny_onnx):
    model, x = tiny_onnx
    got = {name: calibrate(model, x, name, symmetric=False) for name in ("minmax", "percentile", "entropy")}
    keys = set(got["minmax"])
    assert "input" in keys and len(keys) >= 5
    assert all(set(r) == keys for r in got.values())
    lo, hi = got["minmax"]["input"]
    assert lo == pytest.approx(float(x.min()), abs=1e-5) and hi == pytest.approx(float(x.max()), abs=1e-5)
    for name in ("percentile", "entropy"):  # clipping calibrators never widen the min-max range
        plo, phi = got[name]["input"]
        assert plo >= lo - 1e-5 and phi <= hi + 1e-5


def test_mse_calibrator_uses_nncf_histogram_ranges(tiny_onnx):
    model, x = tiny_onnx
    mm = calibrate(model, x, "minmax")
    mse = calibrate(model, x, "mse")
    assert set(mse) == set(mm)
    changed = [k for k in mm if not np.allclose(mm[k], mse[k], atol=1e-6)]
    assert changed, "NNCF's histogram estimator should move at least one range"


def test_unknown_calibrator_is_refused():
    assert set(CALIBRATORS) == {"minmax", "percentile", "entropy", "mse"}
    with pytest.raises(EdgetlError, match="unknown calibrator"):
        get_calibrator("magic")


def test_cache_roundtrip_in_ort_format(tmp_path: Path):
    ranges = {"a": (-1.5, 2.0), "b": (0.0, 6.0)}
    path = save_ranges(ranges, tmp_path / "cache.json")
    assert load_ranges(path) == ranges
    assert merge_ranges(ranges, {"b": (0.0, 3.0), "c": (1.0, 2.0)}) == {"a": (-1.5, 2.0), "b": (0.0, 3.0), "c": (1.0, 2.0)}


def _render(model: Path, x: np.ndarray, out: Path, form: str, cache: Path | None = None) -> Path:
    from edgetl.quantize import render_qdq

    f = QDQ_FORMS[form]
    if cache is None:
        cache = save_ranges(calibrate(model, x, "minmax", f.symmetric_activations), out.with_suffix(".json"))
    return render_qdq(model, cache, out, f)


def test_qdq_forms_zero_points(tiny_onnx, tmp_path: Path):
    import onnx
    from onnx import numpy_helper

    model, x = tiny_onnx
    for form, dtype in (("s8s8", np.int8), ("u8s8", np.uint8)):
        q = onnx.load(str(_render(model, x, tmp_path / f"{form}.onnx", form)))
        inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
        act_zp = [inits[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input"]
        assert act_zp and act_zp[0].dtype == dtype
        if form == "s8s8":  # TensorRT form: signed, symmetric (zero point 0), float biases
            assert all(not np.any(inits[n.input[2]]) for n in q.graph.node
                       if n.op_type == "QuantizeLinear" and len(n.input) > 2)
            assert not any(inits[n.input[0]].dtype == np.int32 for n in q.graph.node
                           if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    assert qdq_form("auto", "tensorrt").short == "s8s8" and qdq_form("auto", "onnxruntime").short == "u8s8"
    with pytest.raises(EdgetlError, match="--qdq-form"):
        qdq_form("s4s4")


def test_strip_qdq_recovers_graph_and_ranges_and_rerenders_identically(tiny_onnx, tmp_path: Path):
    """The re-rendering QAT relies on: QDQ -> (float graph, ranges) -> the same QDQ model again."""
    from edgetl.quantize import ort_logits, prepare_float

    model, x = tiny_onnx
    for form in ("u8s8", "s8s8"):
        q1 = _render(model, x, tmp_path / f"q1_{form}.onnx", form)
        assert is_qdq(q1) and quantized_nodes(q1) == [n for n, _ in weighted_nodes(model)]
        float_graph, ranges = strip_qdq(q1)
        counts = op_counts(float_graph)
        assert "QuantizeLinear" not in counts and "DequantizeLinear" not in counts
        assert "input" in ranges
        import onnx

        onnx.save(float_graph, str(tmp_path / f"f_{form}.onnx"))
        prep = prepare_float(tmp_path / f"f_{form}.onnx", tmp_path / f"p_{form}.onnx")
        base = calibrate(prep, x, "minmax", QDQ_FORMS[form].symmetric_activations)
        cache = save_ranges(merge_ranges(base, {k: v for k, v in ranges.items() if k in base}), tmp_path / f"c_{form}.json")
        q2 = _render(prep, x, tmp_path / f"q2_{form}.onnx", form, cache)
        a, b = ort_logits(q1, x), ort_logits(q2, x)
        step = np.abs(a).max() / 127
        assert np.abs(a - b).max() <= 2 * step, form
        assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95


def test_fake_quantize_matches_onnx_semantics():
    w = np.array([[-1.0, -0.26, 0.25, 0.74, 3.0]], np.float32)
    s = np.array([0.5], np.float32)
    # round half to even, saturate at the int8 range
    assert fake_quantize(w, s, np.zeros(1, np.int8), 0).tolist() == [[-1.0, -0.5, 0.0, 0.5, 3.0]]
    assert fake_quantize(w * 100, s, np.zeros(1, np.int8), 0).max() == pytest.approx(63.5)


# ---- sensitivity --------------------------------------------------------------------------

def test_rank_layers_by_what_keeping_them_in_float_gains():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 4)).astype(np.float32)
    quantized = ref + 0.3 * rng.normal(size=ref.shape)
    left = {"big": 0.01, "small": 0.2, "harmful": 0.6}  # error left when the layer is kept in float
    rows = rank_layers([(k, "Conv") for k in left], lambda n: ref + left[n] * rng.normal(size=ref.shape), ref,
                       quantized)
    assert [r.node for r in rows] == ["big", "small", "harmful"] and [r.rank for r in rows] == [1, 2, 3]
    assert rows[0].gain_db > rows[1].gain_db > 0 > rows[2].gain_db
    assert logit_error(ref, ref)[2] == 1.0
    csv_text = to_csv(rows)
    assert csv_text.splitlines()[0] == "rank,node,op_type,gain_db,sqnr_db,agreement" and "big" in csv_text.splitlines()[1]


def test_calibration_package_imports_without_torch():
    from test_torch_free import run_blocked

    r = run_blocked("""
        import pkgutil, importlib
        import edgetl.calibration as cal
        for m in pkgutil.walk_packages(cal.__path__, "edgetl.calibration."):
            importlib.import_module(m.name)
        import edgetl.check
        assert "torch" not in sys.modules
        print("ok")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")
