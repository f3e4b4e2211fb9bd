"""The stability part of the gate: does the quantized model keep agreeing with float when the input
moves a little, the way a real camera and a real preprocessing move it?

A gate measured on one exact rendering of the checkset overstates how stable a deployed INT8 model
is: an INT8 prediction can flip when the input changes by one float ulp (seen on ELPV: a second,
equivalent preprocessing implementation changed 3 of 393 INT8 predictions; FP32 changed none). So
the checkset is perturbed in small, realistic ways, float and quantized are both run on every
perturbed image, and the gate counts how often they still agree.

Every perturbation is computed from the checkset alone (its float tensors map back to the exact
uint8 pixels of the resized image, ``runtime.preprocess.to_model_input``), so ``edgetl check`` on
any machine builds the same perturbed set without the source images:

* ``rerender``: the same pixels normalised by an equivalent implementation,
  ``(x / 255 - mean / 255) / (std / 255)`` (torchvision's order) instead of ``(x - mean) * (1 / std)``:
  float rounding differs by about one ulp. A build that takes uint8 pixels (folded OpenVINO) cannot
  see this one: for it the perturbed input is the original.
* ``jpeg``: the resized image re-encoded as JPEG at ``jpeg_quality`` (a camera's or a recorder's
  compression) and decoded again.
* ``brighter`` / ``darker``: brightness scaled by ``1 +- brightness`` (rounded to uint8 pixels).

For each perturbation p and image i: ``f_p(i)``, ``q_p(i)`` the float and quantized predictions.
Reported per p: agreement ``q_p == f_p`` (Wilson CI), ``int8_flips`` (float keeps its prediction,
``f_p == f_0``, while INT8 changes it, ``q_p != q_0``: instability INT8 added) and ``float_flips``
(``f_p != f_0``: the image is unstable for float too). The gate takes the worst perturbation's
agreement against ``min_stability_agreement``, with its margin in images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

PERTURBATIONS = ("rerender", "jpeg", "brighter", "darker")
JPEG_QUALITY = 90
BRIGHTNESS = 0.02


@dataclass
class StabilityProbe:
    """The perturbed checkset (float tensors in the artifact's preprocessing) and the float model's
    predictions on each, computed once and shared by every model judged against it."""

    inputs: dict[str, np.ndarray]  # perturbation -> (N, ...) float32, the manifest's input form
    float_pred: dict[str, np.ndarray]  # perturbation -> (N,) float predictions
    float_base: np.ndarray  # (N,) float predictions on the stored checkset
    settings: dict[str, Any] = field(default_factory=dict)
    float_logits: dict[str, np.ndarray] = field(default_factory=dict)  # what the checkset stores


def pixels(inputs: np.ndarray, spec) -> np.ndarray:
    """The exact uint8 pixels (spec's layout and colour order) the float checkset was made from."""
    from dataclasses import replace

    from .runtime.preprocess import to_model_input

    return to_model_input(inputs, spec, replace(spec, dtype="uint8"))


def normalise_rerendered(px: np.ndarray, spec) -> np.ndarray:
    """uint8 pixels -> float32 by torchvision's order of operations (an equivalent rendering)."""
    shape = (1, 3, 1, 1) if spec.layout == "NCHW" else (1, 1, 1, 3)
    mean = (np.asarray(spec.mean, np.float32) / np.float32(255)).reshape(shape)
    std = (np.asarray(spec.std, np.float32) / np.float32(255)).reshape(shape)
    return ((px.astype(np.float32) / np.float32(255) - mean) / std).astype(np.float32)


def normalise(px: np.ndarray, spec) -> np.ndarray:
    """uint8 pixels -> float32 exactly as ``runtime.preprocess.preprocess`` does."""
    from dataclasses import replace

    from .runtime.preprocess import to_model_input

    return to_model_input(px, replace(spec, dtype="uint8"), spec)


def _to_bgr_hwc(img: np.ndarray, spec) -> np.ndarray:
    x = img.transpose(1, 2, 0) if spec.layout == "NCHW" else img
    return x[..., ::-1] if spec.color == "RGB" else x


def _from_bgr_hwc(img: np.ndarray, spec) -> np.ndarray:
    x = img[..., ::-1] if spec.color == "RGB" else img
    return np.ascontiguousarray(x.transpose(2, 0, 1) if spec.layout == "NCHW" else x)


def jpeg_roundtrip(px: np.ndarray, spec, quality: int = JPEG_QUALITY) -> np.ndarray:
    import cv2

    out = np.empty_like(px)
    for i, img in enumerate(px):
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(_to_bgr_hwc(img, spec)),
                               [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
        if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
            raise RuntimeError("JPEG encoding failed")
        out[i] = _from_bgr_hwc(cv2.imdecode(buf, cv2.IMREAD_COLOR), spec)
    return out


def scale_brightness(px: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(np.rint(px.astype(np.float32) * np.float32(factor)), 0, 255).astype(np.uint8)


def perturbed_inputs(inputs: np.ndarray, spec, jpeg_quality: int = JPEG_QUALITY,
                     brightness: float = BRIGHTNESS) -> dict[str, np.ndarray]:
    """Every perturbation of the checkset's float inputs, in the same float form."""
    px = pixels(inputs, spec)
    return {"rerender": normalise_rerendered(px, spec),
            "jpeg": normalise(jpeg_roundtrip(px, spec, jpeg_quality), spec),
            "brighter": normalise(scale_brightness(px, 1 + brightness), spec),
            "darker": normalise(scale_brightness(px, 1 - brightness), spec)}


def random_perturbation(inputs: np.ndarray, spec, rng: np.random.Generator, share: float,
                        jpeg_quality: int = JPEG_QUALITY, brightness: float = BRIGHTNESS) -> np.ndarray:
    """A training batch (float, the artifact's input form) with a random ``share`` of its images moved
    the way the stability check moves the checkset, over wider ranges so that training does not fit
    one setting: half a JPEG round trip at a quality drawn from [min(``jpeg_quality``, 80), 95], half a
    brightness scale by a factor drawn from [1 - 2 ``brightness``, 1 + 2 ``brightness``]. QAT distils on
    it (``QuantizeConfig.qat_perturb``): teacher and student see the same moved image, so the quantized
    model learns to agree with float around each image, not only on it."""
    pick = np.flatnonzero(rng.random(len(inputs)) < share)
    if not len(pick):
        return inputs
    px = pixels(inputs[pick], spec)
    out = inputs.copy()
    lo = min(int(jpeg_quality), 80)
    for j, i in enumerate(pick):
        if rng.random() < 0.5:
            moved = jpeg_roundtrip(px[j:j + 1], spec, int(rng.integers(lo, 96)))
        else:
            moved = scale_brightness(px[j:j + 1], 1 + float(rng.uniform(-2 * brightness, 2 * brightness)))
        out[i] = normalise(moved, spec)[0]
    return out


def make_probe(inputs: np.ndarray, spec, float_logits: np.ndarray,
               float_infer: Callable[[np.ndarray], np.ndarray] | None, jpeg_quality: int = JPEG_QUALITY,
               brightness: float = BRIGHTNESS, stored: Any = None) -> StabilityProbe:
    """The perturbed checkset and the float model's predictions on it (``float_infer``: the float
    model's logits for a float batch, e.g. ``model_fp32.onnx`` on ONNX Runtime). ``stored``: a
    checkset holding the float logits of these perturbations (made with the same settings), used
    instead of running the float model again."""
    settings = {"jpeg_quality": int(jpeg_quality), "brightness": float(brightness)}
    sets = perturbed_inputs(inputs, spec, jpeg_quality, brightness)
    have = getattr(stored, "stability_logits", None) or {}
    if set(have) == set(sets) and getattr(stored, "stability_settings", None) == settings:
        logits = {k: np.asarray(have[k]) for k in sets}
    elif float_infer is None:
        raise ValueError("no stored float logits for these perturbation settings and no float model to run")
    else:
        logits = {k: np.asarray(float_infer(v), np.float32) for k, v in sets.items()}
    return StabilityProbe(sets, {k: v.argmax(1) for k, v in logits.items()}, np.asarray(float_logits).argmax(1),
                          settings, logits)


def measure(probe: StabilityProbe, quant_infer: Callable[[np.ndarray], np.ndarray], quant_base: np.ndarray,
            threshold: float | None) -> dict[str, Any]:
    """Agreement of the quantized model with float on every perturbation (``quant_infer``: the
    quantized model's logits for a float batch, converted to the build's own input inside)."""
    from .check import wilson

    q0 = np.asarray(quant_base).argmax(1)
    f0 = probe.float_base
    rows: dict[str, Any] = {}
    for name, x in probe.inputs.items():
        qp = np.asarray(quant_infer(x)).argmax(1)
        fp = probe.float_pred[name]
        agree = int((qp == fp).sum())
        n = len(qp)
        rows[name] = {"n": n, "agree": agree, "agreement": agree / n, "agreement_ci": list(wilson(agree, n)),
                      "int8_flips": int(((fp == f0) & (qp != q0)).sum()),
                      "float_flips": int((fp != f0).sum()),
                      "both_flip": int(((fp != f0) & (qp != q0)).sum())}
    order = list(rows)
    worst = min(rows, key=lambda k: (rows[k]["agreement"], order.index(k)))  # ties: the first listed
    res: dict[str, Any] = {"perturbations": rows, "worst": worst, "min_agreement": rows[worst]["agreement"],
                           "int8_flips": sum(r["int8_flips"] for r in rows.values()),
                           "float_flips": sum(r["float_flips"] for r in rows.values()),
                           "pairs": sum(r["n"] for r in rows.values()), "settings": dict(probe.settings),
                           "threshold": threshold}
    if threshold is not None:
        w = rows[worst]
        res["margin_images"] = w["agree"] - images_needed(threshold, w["n"])
        res["passed"] = res["margin_images"] >= 0
    return res


def images_needed(fraction: float, n: int) -> int:
    """The fewest of ``n`` images that reach ``fraction`` (a fraction exactly on the line counts)."""
    return int(math.ceil(fraction * n - 1e-9))


def markdown(st: Mapping[str, Any]) -> list[str]:
    """report.md lines for a stability result."""
    s = st.get("settings") or {}
    lines = ["", f"Stability: float and quantized on perturbed copies of the checkset (JPEG quality "
                 f"{s.get('jpeg_quality', JPEG_QUALITY)}, brightness ±{100 * s.get('brightness', BRIGHTNESS):g} %, "
                 "an equivalent float rendering of the same pixels).", "",
             "| perturbation | agreement | 95% CI | INT8 flips (float kept) | float flips |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in st["perturbations"].items():
        lo, hi = r["agreement_ci"]
        lines.append(f"| {name} | {100 * r['agreement']:.2f}% ({r['agree']}/{r['n']}) | [{100 * lo:.2f}%, "
                     f"{100 * hi:.2f}%] | {r['int8_flips']} | {r['float_flips']} |")
    if st.get("threshold") is not None:
        lines += ["", f"Worst: {st['worst']} {100 * st['min_agreement']:.2f}% vs ≥ {100 * st['threshold']:.2f}% "
                      f"(margin {st['margin_images']:+d} images)."]
    return lines


__all__ = ["PERTURBATIONS", "StabilityProbe", "images_needed", "make_probe", "markdown", "measure",
           "perturbed_inputs", "random_perturbation"]
