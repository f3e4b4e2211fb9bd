"""OpenVINO build: the artifact's QDQ (or FP32) ONNX converted to IR, compiled once to fail early.

``ov.convert_model`` turns each Q/DQ pair into a FakeQuantize; ``ov.save_model(...,
compress_to_fp16=False)`` keeps the weights exact (the default would store them as f16). The IR is
then compiled for the profile's device with the profile's hints, and the inference precision the
compiled model *really* uses is recorded (``INFERENCE_PRECISION_HINT`` read back: on an AVX-512 BF16
or AMX CPU, "default" means bf16), together with how many layers run in int8.
"""

from __future__ import annotations

from . import BuildContext, BuildOutcome, commit_build_dir, fresh_build_dir

MODEL = "model.xml"


def build(ctx: BuildContext) -> BuildOutcome:
    from ..runtime.runners.openvino import OpenVINORunner, import_openvino

    ov = import_openvino()
    source = ctx.source
    options = ctx.options
    if options.get("device", "CPU") != "CPU" and isinstance(ctx.profile.batch, int):
        options["batch"] = ctx.profile.batch  # GPU/NPU plugins compile static shapes best
    tmp = fresh_build_dir(ctx)
    try:
        ctx.progress(f"openvino: convert {source} -> builds/openvino/{MODEL}")
        model = ov.convert_model(str(ctx.folder / source))
        ov.save_model(model, str(tmp / MODEL), compress_to_fp16=False)
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
    return BuildOutcome(entry, notes)
