"""CPU classes and the weight range they need, gate margins at the thresholds' boundaries, the
stability perturbations, and the two numerics (reference vs deployed) of one QDQ graph."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgetl.check import Checkset, Thresholds, gate_from_logits
from edgetl.runtime import cpu as cpumod
from edgetl.runtime.cpu import classify, parse_cpuinfo
from edgetl.runtime.preprocess import PreprocessSpec, preprocess
from edgetl.stability import images_needed, measure, normalise, perturbed_inputs, pixels, random_perturbation
from edgetl.targets import load_target, weight_range_for

AVX2 = "fpu sse4_1 avx2 fma f16c"
ZEN4 = AVX2 + " avx512f avx512bw avx512_vnni avx512_bf16"
SPR = ZEN4 + " amx_tile amx_int8 amx_bf16"


# ---- CPU classes ------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, cls, exact, fast", [
    (AVX2, "x86 AVX2 (no VNNI)", False, False),
    (AVX2 + " avx512f avx512bw", "x86 AVX-512 (no VNNI)", False, False),
    (AVX2 + " avx_vnni", "x86 AVX2 + AVX-VNNI", True, True),
    (ZEN4, "x86 AVX-512 VNNI + BF16", True, True),
    (SPR, "x86 AMX", True, True),
    ("fpu sse4_1", "x86 SSE (no AVX2)", False, False),
])
def test_x86_classes_decide_saturation_and_speed(flags, cls, exact, fast):
    c = classify("x86_64", flags.split())
    assert (c.isa_class, c.int8_exact, c.int8_fast) == (cls, exact, fast)
    assert c.weight_range == ("full" if exact else "reduced")


@pytest.mark.parametrize("flags, cls, fast", [
    ("fp asimd", "arm64 NEON (no dotprod)", False),
    ("fp asimd asimddp", "arm64 dotprod", True),
    ("fp asimd asimddp i8mm bf16", "arm64 i8mm + dotprod", True),
])
def test_arm_never_saturates(flags, cls, fast):
    c = classify("aarch64", flags.split())
    assert c.isa_class == cls and c.int8_exact and c.int8_fast == fast and c.weight_range == "full"


def test_cpuinfo_is_parsed_for_both_architectures():
    flags, model = parse_cpuinfo("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\n"
                                 "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n")
    assert flags == {"fpu", "avx2", "fma"} and model == "AMD EPYC 7B13"
    flags, _ = parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd evtstrm asimddp\nCPU part\t: 0xd42\n")
    assert "asimddp" in flags
    host = cpumod.host_cpu()
    assert host.isa_class and host.to_dict()["flags"] == list(host.flags)


def _host(monkeypatch, flags: str, arch: str = "x86_64") -> None:
    monkeypatch.setattr(cpumod, "host_cpu", lambda: classify(arch, flags.split(), "test CPU", 2))


def test_weight_range_follows_the_device_cpu(monkeypatch):
    ov, ort = load_target("x86-cpu-openvino"), load_target("x86-cpu-onnxruntime")
    _host(monkeypatch, AVX2)
    assert weight_range_for(ov)[0] == "reduced" and weight_range_for(ort)[0] == "reduced"
    assert "saturate" in weight_range_for(ov)[1]
    _host(monkeypatch, ZEN4)
    assert weight_range_for(ov)[0] == "full" and weight_range_for(ort)[0] == "full"
    # devices whose int8 never saturates, whatever compiles them
    _host(monkeypatch, AVX2)
    for name in ("jetson-orin-nano", "arm64-cpu-onnxruntime", "intel-igpu-openvino"):
        assert weight_range_for(load_target(name))[0] == "full", name
    # an x86 device compiled on an arm64 machine: 7-bit weights are exact on every x86 CPU
    _host(monkeypatch, "fp asimd asimddp", "aarch64")
    assert weight_range_for(ov)[0] == "reduced"
    pinned = ov.with_changes(quantization=replace(ov.quantization, weight_range="full"))
    _host(monkeypatch, AVX2)
    assert weight_range_for(pinned) == ("full", "pinned by the profile (quantization.weight_range = 'full')")


# ---- margins: decided in whole images, a value on the line passes --------------------------------

def _checkset(n: int, k: int = 2) -> Checkset:
    labels = np.arange(n) % k
    logits = np.full((n, k), -2.0, np.float32)
    logits[np.arange(n), labels] = 2.0  # float is right on every image
    return Checkset(np.zeros((n, 3, 4, 4), np.float32), labels.astype(np.int64), logits)


def _flip(cs: Checkset, m: int) -> np.ndarray:
    q = cs.float_logits.copy()
    q[:m] = q[:m, ::-1]  # m images now predicted wrong (and disagreeing with float)
    return q


@pytest.mark.parametrize("n, flips, passed, margin", [(100, 1, True, 0), (100, 2, False, -1), (100, 0, True, 1),
                                                     (393, 3, True, 0), (393, 4, False, -1)])
def test_drop_threshold_boundary_in_images(n, flips, passed, margin):
    """1 point of 393 images is 3.93 images: 3 lost images pass (0.76 points), 4 fail (1.02)."""
    cs = _checkset(n)
    g = gate_from_logits(_flip(cs, flips), cs, Thresholds(max_drop=1.0, min_agreement=0.0, speed_check=False))
    assert g.accuracy_passed is passed and g.margins["drop"] == margin
    assert any(f.startswith("accuracy") for f in g.failures) is not passed


@pytest.mark.parametrize("flips, passed, margin", [(2, True, 0), (3, False, -1), (1, True, 1)])
def test_agreement_threshold_boundary_in_images(flips, passed, margin):
    cs = _checkset(100)
    g = gate_from_logits(_flip(cs, flips), cs, Thresholds(max_drop=100.0, min_agreement=0.98, speed_check=False))
    assert g.passed is passed and g.margins["agreement"] == margin and g.agreement == (100 - flips) / 100
    if not passed:
        assert "1 image(s) short" in g.failures[0]


def test_only_the_drop_fails():
    """Agreement can pass while the drop fails: INT8 flips images to the wrong class only."""
    cs = _checkset(200)
    g = gate_from_logits(_flip(cs, 3), cs, Thresholds(max_drop=1.0, min_agreement=0.98, speed_check=False))
    assert g.margins == {"agreement": 1, "drop": -1}
    assert [f.split(":")[0] for f in g.failures] == ["accuracy"]


def test_images_needed_is_exact_on_the_line():
    assert images_needed(0.98, 100) == 98 and images_needed(0.98, 393) == 386 and images_needed(0.97, 393) == 382
    assert images_needed(1.0, 7) == 7 and images_needed(0.0, 7) == 0


# ---- stability ------------------------------------------------------------------------------------

SPEC = PreprocessSpec(input_size=(24, 24), resize="stretch", mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))


def _inputs(n: int = 6, spec: PreprocessSpec = SPEC) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([preprocess(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8), spec) for _ in range(n)])


def test_perturbations_are_small_realistic_and_reproducible():
    x = _inputs()
    sets = perturbed_inputs(x, SPEC)
    assert set(sets) == {"rerender", "jpeg", "brighter", "darker"}
    d = np.abs(sets["rerender"] - x)
    assert 0 < d.max() < 1e-5 and (d > 0).mean() > 0.01  # an equivalent rendering: ulps apart, not identical
    assert np.array_equal(pixels(sets["rerender"], SPEC), pixels(x, SPEC))  # the same pixels
    for name in ("jpeg", "brighter", "darker"):
        assert sets[name].shape == x.shape and sets[name].dtype == np.float32
        assert not np.array_equal(sets[name], x)
    px, bright = pixels(x, SPEC).astype(int), pixels(sets["brighter"], SPEC).astype(int)
    assert np.all(bright >= px) and np.abs(bright - np.minimum(np.rint(px * 1.02), 255)).max() == 0
    again = perturbed_inputs(x, SPEC)
    assert all(np.array_equal(again[k], sets[k]) for k in sets)
    nhwc = replace(SPEC, layout="NHWC", color="BGR")
    assert perturbed_inputs(_inputs(spec=nhwc), nhwc)["jpeg"].shape == (6, 24, 24, 3)


def test_qat_perturbation_moves_the_share_asked_reproducibly():
    x = _inputs(40)
    assert random_perturbation(x, SPEC, np.random.default_rng(0), 0.0) is x
    moved = random_perturbation(x, SPEC, np.random.default_rng(0), 0.5)
    changed = [not np.array_equal(m, o) for m, o in zip(moved, x)]
    assert 10 <= sum(changed) <= 30 and moved.dtype == np.float32 and moved.shape == x.shape
    assert np.array_equal(moved, random_perturbation(x, SPEC, np.random.default_rng(0), 0.5))  # seeded
    everything = random_perturbation(x, SPEC, np.random.default_rng(1), 1.0)
    # (a brightness factor drawn very near 1 may round back to the same pixels)
    assert sum(not np.array_equal(m, o) for m, o in zip(everything, x)) >= 36
    # still images of the same pixels' kind: a float rendering of uint8 pixels, near the original
    px, moved_px = pixels(x, SPEC).astype(int), pixels(everything, SPEC).astype(int)
    assert np.array_equal(normalise(moved_px.astype(np.uint8), SPEC), everything)
    assert np.median(np.abs(moved_px - px)) <= 16
    x0 = x.copy()
    random_perturbation(x, SPEC, np.random.default_rng(2), 1.0)
    assert np.array_equal(x, x0)  # the loaded batch is not modified in place


def test_stability_counts_int8_only_flips_apart_from_float_flips():
    n = 10
    x = np.zeros((n, 3, 24, 24), np.float32)
    base = np.tile([[1.0, 0.0]], (n, 1)).astype(np.float32)  # float and INT8: class 0 everywhere
    from edgetl.stability import StabilityProbe

    fp = {"jpeg": np.array([0] * 8 + [1, 1])}  # float itself flips the last two under JPEG
    probe = StabilityProbe({"jpeg": x}, fp, np.zeros(n, int), {"jpeg_quality": 90, "brightness": 0.02})
    q = np.zeros(n, int)
    q[[0, 1, 9]] = 1  # INT8 flips 0 and 1 (float kept them) and 9 (float flipped too)
    logits = np.eye(2, dtype=np.float32)[q]
    st = measure(probe, lambda b: logits, base, threshold=0.8)
    r = st["perturbations"]["jpeg"]
    assert (r["agree"], r["int8_flips"], r["float_flips"], r["both_flip"]) == (7, 2, 2, 1)
    assert st["margin_images"] == -1 and st["passed"] is False and st["worst"] == "jpeg"
    on_the_line = measure(probe, lambda b: logits, base, threshold=0.7)  # 7 of 10 needed, 7 agree
    assert on_the_line["margin_images"] == 0 and on_the_line["passed"] is True
    g = gate_from_logits(base, Checkset(x, np.zeros(n, np.int64), base), Thresholds(speed_check=False))
    assert g.passed and not g.add_stability(st).passed and g.failures[0].startswith("stability")
    assert not g.accuracy_passed and g.margins["stability"] == -1
    assert "2 INT8 flip(s)" in g.failures[0] and "float itself changed its prediction on 2" in g.failures[0]
    assert "--qat-perturb" in g.suggestions[0]  # the stability-specific repair comes first


def test_a_deployed_verdict_from_another_cpu_class_says_so(monkeypatch):
    from edgetl.check import cpu_note

    _host(monkeypatch, AVX2)
    here = cpumod.host_cpu().to_dict()
    assert cpu_note(here) == "" and cpu_note(None) == ""
    vnni = classify("x86_64", ZEN4.split(), "another CPU").to_dict()
    note = cpu_note(vnni)
    assert "x86 AVX-512 VNNI" in note and "x86 AVX2 (no VNNI)" in note and "--backend reference" in note


def test_recorded_cpuinfo_samples_classify(tmp_path):
    """Real /proc/cpuinfo records (tests/data/cpuinfo-*.txt, first processor block, saved on the machine
    named in the file name) give the class that machine has. Only classes a session ran on are recorded:
    x86 AVX2 without VNNI (AMD EPYC Zen 3, the 2-vCPU VM the demo records come from)."""
    expected = {"cpuinfo-x86-avx2-amd-epyc-zen3.txt": ("x86 AVX2 (no VNNI)", False, False, "reduced")}
    data = Path(__file__).parent / "data"
    assert sorted(p.name for p in data.glob("cpuinfo-*.txt")) == sorted(expected)
    for name, (cls, exact, fast, wr) in expected.items():
        flags, model = parse_cpuinfo((data / name).read_text())
        c = classify("x86_64", flags, model, 2)
        assert (c.isa_class, c.int8_exact, c.int8_fast, c.weight_range) == (cls, exact, fast, wr), name
        assert model == "AMD EPYC" and "avx2" in c.flags and "avx512_vnni" not in c.flags


def test_conversions_to_the_build_input_are_kept_per_array(monkeypatch):
    """Each fallback round feeds the same checkset arrays to a uint8-input build: converted once,
    and a different array (or spec) is never served another's conversion."""
    import importlib

    from edgetl import numerics as nm

    pp = importlib.import_module("edgetl.runtime.preprocess")

    spec = PreprocessSpec(input_size=(8, 8), mean=(127.5,) * 3, std=(127.5,) * 3)
    target = pp.build_input_spec(spec, {"dtype": "uint8", "layout": "NHWC"})
    calls = []
    real = pp.to_model_input
    monkeypatch.setattr(pp, "to_model_input", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(0)
    a = ((rng.integers(0, 256, (2, 3, 8, 8)).astype(np.float32) - 127.5) / 127.5)
    b = a.copy()
    b[0, 0, 0, 0] = (0 - 127.5) / 127.5 if a[0, 0, 0, 0] > 0 else (255 - 127.5) / 127.5
    ua = nm._converted(a, spec, target)
    assert nm._converted(a, spec, target) is ua and len(calls) == 1
    ub = nm._converted(b, spec, target)
    assert len(calls) == 2 and not np.array_equal(ua, ub) and ua.dtype == np.uint8 and ua.shape == (2, 8, 8, 3)
    assert nm._converted(a, spec, spec) is a and len(calls) == 2  # the same form: nothing to convert
    for _ in range(7):  # older entries are dropped
        nm._converted(a.copy(), spec, target)
    assert nm._converted(a, spec, target) is not ua and len(calls) == 10


def test_a_cpu_class_names_result_files():
    from edgetl.runtime.cpu import class_slug

    assert class_slug("x86 AVX2 (no VNNI)") == "x86-avx2-no-vnni"
    assert classify("x86_64", ZEN4.split()).slug == "x86-avx-512-vnni-bf16"
