"""OpenVINO build: the artifact's QDQ (or FP32) ONNX converted to IR, compiled once to fail early.

``ov.convert_model`` turns each Q/DQ pair into a FakeQuantize; ``ov.save_model(...,
compress_to_fp16=False)`` keeps the weights exact (the default would store them as f16). The IR is
then compiled for the profile's device with the profile's hints, and the inference precision the
compiled model *really* uses is recorded (``INFERENCE_PRECISION_HINT`` read back: on an AVX-512 BF16
or AMX CPU, "default" means bf16), together with how many layers run in int8.

``fold_preprocessing = true`` (profile option) folds the value part of the artifact's preprocessing
into the IR with OpenVINO's ``PrePostProcessor``: the model takes the resized uint8 image in NHWC
and does the float conversion, ``(x - mean) / std`` and the layout change itself, fused into its
first layers. The device then only resizes (and reorders colour) in OpenCV; the build entry records
``"input": {"dtype": "uint8", "layout": "NHWC"}``, which the runtime, the gate and the benchmark
read through ``build_input_spec``, so all three feed the build exactly what it takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..runtime.errors import EdgetlError
from . import BuildContext, BuildOutcome, commit_build_dir, fresh_build_dir

MODEL = "model.xml"


def build(ctx: BuildContext) -> BuildOutcome:
    from ..runtime.runners.openvino import OpenVINORunner

    source = ctx.source
    options = ctx.options
    if options.get("device", "CPU") != "CPU" and isinstance(ctx.profile.batch, int):
        options["batch"] = ctx.profile.batch  # GPU/NPU plugins compile static shapes best
    tmp = fresh_build_dir(ctx)
    try:
        ctx.progress(f"openvino: convert {source} -> builds/openvino/{MODEL}")
        if options.get("fold_preprocessing"):
            ctx.progress("openvino: fold preprocessing into the IR (uint8 NHWC input; convert, normalise, "
                         "transpose inside the model)")
        convert_ir(ctx.folder / source, tmp / MODEL, options, ctx.manifest.preprocess)
        ctx.progress(f"openvino: compile for {options.get('device', 'CPU')} "
                     f"(inference_precision {options.get('inference_precision', 'default')})")
        runner = OpenVINORunner(tmp / MODEL, options)
        info = runner.info
        runner.close()
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_build_dir(ctx, tmp)
    notes = []
    requested = options.get("inference_precision", "default")
    if requested == "default":
        notes.append(f"openvino: inference_precision 'default' resolved to {info['inference_precision']} on this "
                     f"device; pin it in the profile for reproducible accuracy")
    if ctx.profile.precision == "int8" and not info["int8_layers"]:
        notes.append("openvino: the compiled model runs no layer in int8 (the device has no int8 kernels for it)")
    entry = {"backend": "openvino", "model": f"builds/openvino/{MODEL}", "precision": info["precision"],
             "inference_precision": info["inference_precision"], "requested_inference_precision": requested,
             "int8_layers": info["int8_layers"], "options": options, "version": info["version"],
             "device": info["device"]}
    if build_input(options):
        entry["input"] = build_input(options)
    return BuildOutcome(entry, notes)


FOLDED_INPUT = {"dtype": "uint8", "layout": "NHWC"}


def convert_ir(onnx_path: Path, xml: Path, options: Mapping[str, Any], spec) -> Path:
    """The IR the build ships, from an ONNX model: ``ov.convert_model`` (Q/DQ -> FakeQuantize), the
    preprocessing folded in when ``options["fold_preprocessing"]``, weights kept exact (no f16
    compression). The build and the compile's repair loop (``edgetl.numerics``) both convert through
    here, so every fallback round is judged on the IR that will ship."""
    from ..runtime.runners.openvino import import_openvino

    ov = import_openvino()
    model = ov.convert_model(str(onnx_path))
    if options.get("fold_preprocessing"):
        model = fold_preprocessing(ov, model, spec)
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


def build_input(options: Mapping[str, Any]) -> dict[str, str] | None:
    """What the built model takes when it is not the artifact's preprocessed tensor (``builds[].input``)."""
    return dict(FOLDED_INPUT) if options.get("fold_preprocessing") else None


def fold_preprocessing(ov, model, spec):
    """``model`` (float input in ``spec.layout``) -> a model taking the uint8 NHWC image that
    ``preprocess`` produces with ``FOLDED_INPUT``; mean/std (in the spec's colour order) applied inside."""
    from openvino.preprocess import PrePostProcessor

    if spec.dtype != "float32":
        raise EdgetlError("openvino.fold_preprocessing: the model already takes uint8 input",
                          hint="set fold_preprocessing = false for this model")
    ppp = PrePostProcessor(model)
    inp = ppp.input()
    inp.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout(FOLDED_INPUT["layout"]))
    inp.model().set_layout(ov.Layout(spec.layout))
    inp.preprocess().convert_element_type(ov.Type.f32).mean(list(spec.mean)).scale(list(spec.std))
    return ppp.build()
