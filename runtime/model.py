"""Load an artifact and classify frames: the device-side Python API.

    >>> import edgetl.runtime as rt
    >>> model = rt.load("artifacts/elpv-ov")               # verifies the manifest and every sha256
    >>> model.predict(frame_bgr, top_k=2)                  # [("defective", 0.93), ("ok", 0.07)]
    >>> for r in model.stream("rtsp://cam/stream", top_k=1, smooth=5):
    ...     print(r.frame_index, r.label, r.score, r.latency_ms)

``load`` picks the build to run from ``manifest.builds`` (the first one, or the one for
``backend``); an artifact's ``model_int8.onnx`` / ``model_fp32.onnx`` can always run on ONNX
Runtime, so ``backend="onnxruntime"`` works even when no onnxruntime build is listed. The input
tensor comes from the manifest's preprocessing spec through the one ``preprocess``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from .errors import EdgetlError, IntegrityError, MissingDependencyError
from .manifest import MANIFEST_NAME, Manifest, read_manifest, read_verified, verify_files
from .preprocess import build_input_spec, preprocess
from .runners import RUNNERS, Runner, open_runner

# An artifact's ONNX files run on ONNX Runtime without a backend build (best first).
IMPLICIT_ONNX = (("model_int8.onnx", "int8"), ("model_fp32.onnx", "fp32"))

Roi = Tuple[int, int, int, int]  # typing.Tuple: evaluated at import, and the runtime runs on Python 3.8


def candidate_builds(manifest: Manifest, folder: Path) -> list[dict[str, Any]]:
    """The builds listed in the manifest, then an implicit onnxruntime build of the artifact's ONNX."""
    builds = [dict(b) for b in manifest.builds]
    if not any(b.get("backend") == "onnxruntime" for b in builds):
        for name, precision in IMPLICIT_ONNX:
            if name in manifest.files:  # only a file the manifest lists (and verify_files checked) loads
                builds.append({"backend": "onnxruntime", "model": name, "precision": precision, "options": {},
                               "implicit": True})
                break
    return builds


def _own_gate(build: Mapping[str, Any]) -> bool | None:
    gate = build.get("gate")
    return bool(gate.get("passed")) if isinstance(gate, Mapping) and "passed" in gate else None


def select_build(manifest: Manifest, folder: Path, backend: str | None = None) -> dict[str, Any]:
    """The build to run: the one for ``backend``, else the best listed (a build that failed its own
    gate is never preferred over one that passed or was not gated)."""
    builds = candidate_builds(manifest, folder)
    where = folder / MANIFEST_NAME
    if not builds:
        raise EdgetlError(f"{where}: the artifact lists no builds and has no model_int8.onnx or model_fp32.onnx",
                          hint="create it with `edgetl quantize` / `edgetl compile --target ...`")
    for b in builds:
        if "backend" not in b or "model" not in b:
            raise EdgetlError(f"{where}: a builds entry lacks 'backend' or 'model': {b}",
                              hint="the manifest is damaged: rebuild the artifact with edgetl")
    if backend is None:  # a build whose own gate passed first, then one not gated, a failed one last
        rank = {True: 0, None: 1, False: 2}
        return min(builds, key=lambda b: rank[_own_gate(b)])
    for b in builds:
        if b["backend"] == backend:
            return b
    have = ", ".join(sorted({b["backend"] for b in builds}))
    raise EdgetlError(f"{where}: no build for backend {backend!r} (this artifact has: {have})",
                      hint=f"choose one of them with --backend, or build it with `edgetl build {folder} "
                           f"--target <a {backend} target>`")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float32)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def parse_roi(text: str | Sequence[int] | None) -> Roi | None:
    """``"x,y,w,h"`` (pixels) -> a tuple; None stays None."""
    if text is None or text == "":
        return None
    try:
        vals = tuple(int(v) for v in (text.split(",") if isinstance(text, str) else text))
    except ValueError:
        vals = ()
    if len(vals) != 4 or vals[0] < 0 or vals[1] < 0 or vals[2] < 1 or vals[3] < 1:
        raise EdgetlError(f"--roi {text!r} is not valid", hint="give x,y,w,h in pixels, e.g. --roi 320,180,640,360")
    return vals  # type: ignore[return-value]


def crop_roi(frame: np.ndarray, roi: Roi | None) -> np.ndarray:
    """A view of ``frame`` inside ``roi`` (no copy); refuses an ROI outside the frame."""
    if roi is None:
        return frame
    x, y, w, h = roi
    fh, fw = frame.shape[:2]
    if x >= fw or y >= fh:
        raise EdgetlError(f"--roi {x},{y},{w},{h} starts outside the {fw}x{fh} frame",
                          hint="give x,y,w,h inside the frame (x < width, y < height)")
    return frame[y:min(y + h, fh), x:min(x + w, fw)]


class Model:
    """A loaded artifact: manifest, preprocessing spec, and the runner of one build."""

    def __init__(self, folder: Path, manifest: Manifest, build: Mapping[str, Any], runner: Runner,
                 postprocess: Any = None):
        self.folder = folder
        self.postprocess = postprocess  # detection: edgetl.runtime.detect.PostprocessSpec
        self.manifest = manifest
        self.build = dict(build)
        self.runner = runner
        self.spec = build_input_spec(manifest.preprocess, build.get("input"))  # what this build's model takes
        self.labels = manifest.labels
        self.warnings: list[str] = []
        gate = manifest.gate or {}
        verdict = gate.get("deployable", gate.get("passed"))  # the verdict (older artifacts: passed)
        if gate and verdict is False:
            self.warnings.append(f"{folder}: this artifact did NOT pass its accuracy gate "
                                 f"(see {folder / 'report.md'}); its predictions may be off")
        own = build.get("gate")
        if isinstance(own, Mapping) and own.get("passed") is False and verdict is not False:
            self.warnings.append(f"{folder}: its {build.get('backend')} build did NOT pass its own gate "
                                 f"(see {folder / 'report.md'}); its predictions may be off")
        if build.get("implicit"):
            self.warnings.append(f"{folder}: no onnxruntime build listed; running {build['model']} on ONNX Runtime")
        self._batched = runner.fixed_batch not in (None, 1)

    @property
    def info(self) -> dict[str, Any]:
        return {"artifact": str(self.folder), "model": self.build["model"], **self.runner.info}

    def input_tensor(self, frame_bgr: np.ndarray, roi: Roi | None = None) -> np.ndarray:
        """The batch-1 model input for a BGR uint8 frame (through the one ``preprocess``)."""
        return preprocess(crop_roi(frame_bgr, roi), self.spec)[None]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits ``(N, K)`` for a preprocessed batch."""
        if self._batched:
            return self.runner.infer_many(batch)
        return self.runner.infer(batch)

    def outputs(self, batch: np.ndarray) -> List[np.ndarray]:
        """Every raw output for a preprocessed batch (a detector: box regressions, class scores)."""
        if self._batched:
            return self.runner.infer_many_all(batch)
        return self.runner.infer_all(batch)

    def detect(self, frame_bgr: np.ndarray, roi: Roi | None = None, score_threshold: float | None = None):
        """A detection artifact's boxes on one BGR uint8 frame, in the frame's pixels:
        :class:`edgetl.runtime.detect.Detections` (boxes xyxy, scores, 0-based classes)."""
        from .detect import postprocess, to_frame
        if self.postprocess is None:
            raise EdgetlError(f"{self.folder}: a {self.manifest.task} artifact has no boxes",
                              hint="use predict() for a classification artifact")
        boxes, scores = self.outputs(self.input_tensor(frame_bgr, roi))[:2]
        dets = postprocess(boxes[0], scores[0], self.postprocess, score_threshold=score_threshold)
        crop = crop_roi(frame_bgr, roi)
        return to_frame(dets, self.spec, crop.shape[:2], (roi[0], roi[1]) if roi else (0, 0))

    def probabilities(self, frame_bgr: np.ndarray, roi: Roi | None = None) -> np.ndarray:
        """Class probabilities ``(K,)`` (softmax of the logits) for one frame."""
        return softmax(self.logits(self.input_tensor(frame_bgr, roi))[0])

    def top_k(self, probs: np.ndarray, k: int = 1) -> list[tuple[str, float]]:
        k = max(1, min(int(k), len(self.labels)))
        order = np.argsort(-probs, kind="stable")[:k]
        return [(self.labels[i], float(probs[i])) for i in order]

    def predict(self, frame_bgr: np.ndarray, top_k: int = 1, roi: Roi | None = None) -> list[tuple[str, float]]:
        """``[(label, score), ...]`` best first for one BGR uint8 frame (H, W, 3)."""
        return self.top_k(self.probabilities(frame_bgr, roi), top_k)

    def stream(self, source: Any, **options: Any):
        """Iterate results over a source URI (see ``edgetl.runtime.sources``); options as in
        :class:`edgetl.runtime.app.StreamOptions`. Returns a :class:`~edgetl.runtime.app.Stream`."""
        from .app import Stream, StreamOptions
        return Stream(self, source, StreamOptions(**options))

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _verified_blobs(folder: Path, manifest: Manifest, model: str) -> Dict[str, bytes]:
    """The model (and an IR's weights) read once through a confined descriptor and checked against
    the manifest: the runner loads these bytes, not the file again (no time-of-check/time-of-use)."""
    names = [model]
    if model.endswith(".xml"):
        names.append(model[:-4] + ".bin")
    return {str(folder / n): read_verified(folder, n, manifest) for n in names if n in manifest.files or n == model}


def load(artifact: str | Path, backend: str | None = None, options: Mapping[str, Any] | None = None,
         verify: bool = True) -> Model:
    """Load an artifact folder: check its manifest and files, open the runner of the chosen build.

    ``backend`` picks a build when the artifact holds several; ``options`` override the build's
    backend options (e.g. ``{"intra_op_threads": 2}`` for onnxruntime).
    """
    folder = Path(artifact)
    if not folder.exists() and folder.parent.is_dir() and any(
            p.name.startswith((f".{folder.name}.old-", f".{folder.name}.ready-")) for p in folder.parent.iterdir()):
        raise IntegrityError(f"{folder}: an edgetl update of this artifact was interrupted",
                             hint=f"run `edgetl check {folder}` on the host to finish or undo it")
    manifest = read_manifest(folder)
    if folder.is_file():
        folder = folder.parent
    if manifest.kind != "artifact":
        raise EdgetlError(f"{folder} is a training run, not an artifact",
                          hint=f"quantize/compile it first, e.g. `edgetl compile {folder} --target <target> "
                               f"--out artifacts/NAME`, then run the artifact")
    if verify:
        verify_files(folder, manifest)
    post = _postprocess_spec(folder, manifest, verify)
    build = select_build(manifest, folder, backend)
    name = build["backend"]
    blobs = _verified_blobs(folder, manifest, build["model"]) if verify else None
    opts = {**dict(build.get("options") or {}), **dict(options or {})}
    others = sorted({b["backend"] for b in candidate_builds(manifest, folder)} - {name})
    also = f"; or run another build of this artifact with --backend {' / '.join(others)}" if others else ""
    try:
        runner = open_runner(name, folder / build["model"], opts, blobs)
    except MissingDependencyError as exc:
        exc.hint = (exc.hint or "") + also
        raise
    except ImportError as exc:  # a runner module whose backend package is absent at import time
        extra = RUNNERS.get(name, ("", "", None))[2]
        err = MissingDependencyError(exc.name or name, extra, f"the {name} build of {folder}")
        err.hint = (err.hint or "") + also
        raise err from None
    return Model(folder, manifest, build, runner, post)


def _postprocess_spec(folder: Path, manifest: Manifest, verify: bool) -> Any:
    """A detection artifact's post-processing (anchors read through the verified path), else None."""
    if manifest.task != "detection":
        return None
    from .detect import PostprocessSpec, load_anchors
    section = dict(manifest.postprocess or {})
    name = section.get("anchors")
    if not isinstance(name, str) or name not in manifest.files:
        raise EdgetlError(f"{folder / MANIFEST_NAME}: postprocess.anchors names no file of the artifact",
                          hint="the artifact is damaged or was not made by edgetl: rebuild it")
    data = read_verified(folder, name, manifest) if verify else (folder / name).read_bytes()
    # image_size: boxes are clipped to the model input before NMS (as torchvision's SSD does)
    return PostprocessSpec.from_manifest(section, load_anchors(data, str(folder / name)),
                                         image_size=manifest.preprocess.input_size)
