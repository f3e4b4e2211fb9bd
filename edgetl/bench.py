"""``edgetl bench``: every way to run one model, side by side in one process, on real held-out images.

Rows (each skipped with its reason when it cannot run here):

* PyTorch eager FP32, NCHW and channels_last (needs torch and the float run);
* ONNX Runtime FP32 (``model_fp32.onnx``) and INT8 (``model_int8.onnx``, QDQ);
* OpenVINO strict f32, OpenVINO default precision (bf16 on CPUs with AVX-512 BF16/AMX), and
  OpenVINO INT8 (the artifact's OpenVINO build, or its QDQ ONNX);
* TensorRT (the artifact's engine, on a device with TensorRT).

For each: batch-1 latency p50/p90 *from a decoded uint8 frame to a label* (the shared
preprocessing included, as on the device), the preprocessing share of it, batch-8 throughput,
top-1 accuracy and agreement with the float model on the artifact's checkset, model size on disk,
peak RSS while it ran, and the precision the backend reports it actually ran in.

A detection artifact (``manifest.task == "detection"``) gets the same rows; its latency is *from a
decoded uint8 frame to boxes in frame pixels*: the shared preprocessing, inference (every output) and
the device's post-processing (``runtime.detect.postprocess`` + ``to_frame``: decoding, score threshold,
NMS), with the p50 of each part; its quality columns are mAP@0.5, mAP@0.5:0.95 and the detection
agreement (F1 against the float model's stored raw outputs) on the detection checkset, computed by
the gate's own ``edgetl.detect.gate.evaluate_detection``. The task owns only what differs (``_Classify``,
``_Detect``: checkset, quality, one timed frame); loading, RSS, warm-up and the interleaved rounds are
shared.

Timing: fixed threads for every backend (recorded), warm-up, then rounds that interleave the
rows in blocks so machine drift hits all rows alike; medians over all reps.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .runtime.cpu import describe, host_cpu
from .runtime.errors import EdgetlError, MissingDependencyError, missing_dependency
from .runtime.imageio import read_image
from .runtime.manifest import Manifest, open_verified
from .runtime.preprocess import build_input_spec, preprocess, to_model_input
from .runtime.runners.base import Runner

ALL_ROWS = ("torch-nchw", "torch-channels-last", "ort-fp32", "ort-int8", "ov-f32", "ov-default", "ov-int8",
            "tensorrt")


@dataclass
class Candidate:
    name: str
    backend: str
    label: str  # human description
    size_bytes: int
    make: Callable[[], Any]  # -> object with .infer(np batch) -> logits, and .info
    runner: Any = None
    result: dict[str, Any] = field(default_factory=dict)
    spec: Any = None  # the PreprocessSpec this row's model takes (a build may fold preprocessing: uint8 NHWC)


class _TorchPredictor:
    """PyTorch eager wrapped in the runner interface (the baseline a user starts from)."""

    backend = "torch"

    def __init__(self, model, channels_last: bool, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        self.channels_last = channels_last
        self.model = model.eval()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.info = {"backend": "torch", "version": torch.__version__, "device": "cpu",
                     "precision": "fp32", "layout": "channels_last" if channels_last else "NCHW"}

    def infer_all(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output (a detector returns raw boxes and scores), float32, as a runner's."""
        x = self.torch.from_numpy(batch)
        if self.channels_last:
            x = x.contiguous(memory_format=self.torch.channels_last)
        with self.torch.inference_mode():
            out = self.model(x)
        return [o.float().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_all(batch)[0]

    fixed_batch = None  # the chunking of Runner (the same batches as every other row)
    infer_many = Runner.infer_many
    infer_many_all = Runner.infer_many_all


def _float_model(run_dir: Path, task: str):
    """The run's float PyTorch model (eval, CPU), read as the task's training wrote it."""
    if task == "detection":
        from .detect.train import load_detection_run
        return load_detection_run(run_dir)[1]
    from .runs import load_run
    return load_run(run_dir).model


# ------------------------------------------------------------------------------------------
# memory: peak RSS per row via /proc/self/clear_refs (Linux); None elsewhere
# ------------------------------------------------------------------------------------------

def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _size(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


# ------------------------------------------------------------------------------------------
# planning: which rows can run for this artifact on this machine
# ------------------------------------------------------------------------------------------

def _find_run(manifest: Manifest, artifact: Path, run: Path | None) -> Path | None:
    if run is not None:
        return run
    src = (manifest.training or {}).get("run") or (manifest.quantization or {}).get("source_run")
    if src:
        p = Path(src)
        p = p if p.is_absolute() else (artifact / p)
        return p if (p / "manifest.json").exists() else None
    return None


class _Planner:
    """The rows asked for, each a Candidate or a reason it was skipped."""

    def __init__(self, artifact: Path, manifest: Manifest, rows: tuple[str, ...]):
        self.artifact, self.manifest, self.rows = artifact, manifest, rows
        self.cands: list[Candidate] = []
        self.skipped: dict[str, str] = {}

    def want(self, name: str) -> bool:
        return name in self.rows

    def skip(self, names: tuple[str, ...], reason: str) -> None:
        self.skipped.update({n: reason for n in names if self.want(n)})

    def add_runner(self, name, backend, label, path: Path, opts: dict, size_paths: list[Path], build_input=None):
        from .runtime.runners import open_runner

        if not self.want(name):
            return
        if not path.exists():
            self.skipped[name] = f"{path.name} is not in the artifact"
            return
        self.cands.append(Candidate(name, backend, label, _size(*size_paths), lambda: open_runner(backend, path, opts),
                                    spec=build_input_spec(self.manifest.preprocess, build_input)))


def plan(artifact: Path, manifest: Manifest, run: Path | None, threads: int,
         rows: tuple[str, ...]) -> tuple[list[Candidate], dict[str, str]]:
    p = _Planner(artifact, manifest, rows)
    fp32, int8 = artifact / "model_fp32.onnx", artifact / "model_int8.onnx"
    _plan_eager(p, run, threads)
    ort_opts = {"intra_op_threads": threads, "inter_op_threads": 1}
    p.add_runner("ort-fp32", "onnxruntime", "ONNX Runtime FP32", fp32, ort_opts, [fp32])
    p.add_runner("ort-int8", "onnxruntime", "ONNX Runtime INT8 (QDQ)", int8, ort_opts, [int8])
    _plan_openvino(p, threads)
    _plan_tensorrt(p)
    return p.cands, p.skipped


def _plan_eager(p: _Planner, run: Path | None, threads: int) -> None:
    """PyTorch eager FP32 of the artifact's float run, NCHW and channels_last."""
    names = ("torch-nchw", "torch-channels-last")
    if not any(p.want(n) for n in names):
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        return p.skip(names, "torch is not installed (pip install 'edgetl[train]')")
    run_dir = _find_run(p.manifest, p.artifact, run)
    if run_dir is None:
        return p.skip(names, "the float run is not available here (pass --run RUN)")
    for name, cl in zip(names, (False, True)):
        if p.want(name):
            def make(cl=cl, run_dir=run_dir):
                return _TorchPredictor(_float_model(run_dir, p.manifest.task), cl, threads)
            p.cands.append(Candidate(name, "torch", f"PyTorch eager FP32 ({'channels_last' if cl else 'NCHW'})",
                                     _size(Path(run_dir) / "model.safetensors"), make, spec=p.manifest.preprocess))


def _plan_openvino(p: _Planner, threads: int) -> None:
    """OpenVINO strict f32 and default precision of the float ONNX; INT8: the artifact's own build
    (folded preprocessing included) when it has one, else the QDQ ONNX."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return p.skip(("ov-f32", "ov-default", "ov-int8"), "openvino is not installed (pip install 'edgetl[openvino]')")
    fp32, int8 = p.artifact / "model_fp32.onnx", p.artifact / "model_int8.onnx"
    ov_base = {"device": "CPU", "performance_hint": "LATENCY", "num_streams": 1, "threads": threads}
    p.add_runner("ov-f32", "openvino", "OpenVINO strict f32", fp32, {**ov_base, "inference_precision": "f32"}, [fp32])
    p.add_runner("ov-default", "openvino", "OpenVINO default precision", fp32,
                 {**ov_base, "inference_precision": "default"}, [fp32])
    ov_build = next((b for b in p.manifest.builds if b.get("backend") == "openvino"), None)
    if ov_build is None:
        return p.add_runner("ov-int8", "openvino", "OpenVINO INT8 (from the QDQ ONNX)", int8,
                            {**ov_base, "inference_precision": "f32"}, [int8])
    xml = p.artifact / ov_build["model"]
    opts = {**dict(ov_build.get("options") or {}), **ov_base}
    opts.setdefault("inference_precision", "f32")
    folded = " + folded preprocessing" if ov_build.get("input") else ""
    p.add_runner("ov-int8", "openvino", f"OpenVINO INT8 (artifact build{folded})", xml, opts,
                 [xml, xml.with_suffix(".bin")], build_input=ov_build.get("input"))


def _plan_tensorrt(p: _Planner) -> None:
    """The artifact's TensorRT engine, where TensorRT imports (an NVIDIA device)."""
    if not p.want("tensorrt"):
        return
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return p.skip(("tensorrt",), "tensorrt cannot be imported here (TensorRT runs on NVIDIA devices: run the bench "
                                     "there; on an x86 host with CUDA: pip install 'edgetl[tensorrt]')")
    trt_build = next((b for b in p.manifest.builds if b.get("backend") == "tensorrt"), None)
    if trt_build is None:
        return p.skip(("tensorrt",), "the artifact has no TensorRT build (run `edgetl build ARTIFACT` on the device)")
    engine = p.artifact / trt_build["model"]
    p.add_runner("tensorrt", "tensorrt", "TensorRT", engine, dict(trt_build.get("options") or {}), [engine])


# ------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------

def _frame_to_label(pred, frame: np.ndarray, spec) -> dict[str, float]:
    """One timed frame of a classifier: ms of the whole (``latency``) and of preprocessing."""
    t0 = time.perf_counter()
    x = preprocess(frame, spec)[None]
    t1 = time.perf_counter()
    int(np.argmax(pred.infer(x)[0]))
    t2 = time.perf_counter()
    return {"latency": (t2 - t0) * 1e3, "preprocess": (t1 - t0) * 1e3}


def _frame_to_boxes(pred, frame: np.ndarray, spec, post) -> dict[str, float]:
    """One timed frame of a detector, as the device runs it: preprocess, infer (every output),
    post-process (decode, score threshold, NMS) and map the boxes to the frame; ms of each part."""
    from .runtime.detect import postprocess, to_frame

    t0 = time.perf_counter()
    x = preprocess(frame, spec)[None]
    t1 = time.perf_counter()
    outs = pred.infer_all(x)
    t2 = time.perf_counter()
    to_frame(postprocess(outs[0][0], outs[1][0], post), spec, frame.shape[:2])
    t3 = time.perf_counter()
    return {"latency": (t3 - t0) * 1e3, "preprocess": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3,
            "post": (t3 - t2) * 1e3}


_WINDOW = re.compile(r"(.+)#(\d+),(\d+),(\d+),(\d+)")


def _read_held_out(root: Path, p: str, cache: dict) -> np.ndarray | None:
    """A held-out image, or the window of one (a detection tile is named ``path#x0,y0,x1,y1``);
    None when it is not reachable here."""
    f, m = root / p, _WINDOW.fullmatch(p)
    win = None
    if m and not f.is_file():
        f, win = root / m[1], tuple(int(v) for v in m.groups()[1:])
    if not f.is_file():
        return None
    if f not in cache:
        try:
            cache[f] = read_image(f)
        except EdgetlError:  # undecodable or too large to decode: not a frame to time
            cache[f] = None
    img = cache[f]
    return img if img is None or win is None else np.ascontiguousarray(img[win[1]:win[3], win[0]:win[2]])


def load_frames(paths: list[str], run_dir: Path | None, n: int, frame_size: tuple[int, int] | None
                ) -> tuple[list[np.ndarray], str]:
    """Decoded uint8 frames to time: the checkset's held-out test images when they are reachable here
    (its paths are relative to the run's data root), else generated frames (timing does not depend on
    content)."""
    root = Path(json.loads((run_dir / "split.json").read_text()).get("root", ".")) \
        if run_dir is not None and (run_dir / "split.json").exists() else Path(".")
    cache: dict = {}
    frames = [f for f in (_read_held_out(root, p, cache) for p in paths[:n] if p) if f is not None]
    source = f"{len(frames)} held-out test images of the checkset" if frames else ""
    if not frames:
        rng = np.random.default_rng(0)
        w, h = frame_size or (1280, 720)
        frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(4)]
        source = f"generated {w}x{h} frames (the test images are not reachable here)"
    elif frame_size:
        import cv2
        frames = [cv2.resize(f, frame_size, interpolation=cv2.INTER_LINEAR) for f in frames]
        source += f", resized to {frame_size[0]}x{frame_size[1]}"
    return frames, source


class _Classify:
    """Classification: top-1 and agreement with the float logits on the checkset, batch throughput;
    a timed frame ends at the label."""

    def __init__(self, artifact: Path, manifest: Manifest, reps: int, throughput_batch: int):
        from .check import load_checkset

        cs = load_checkset(artifact / "checkset.npz")
        self.inputs, self.labels, self.float_pred = cs.inputs, cs.labels, cs.float_logits.argmax(1)
        self.paths, self.spec = list(cs.paths or []), manifest.preprocess
        self.reps, self.batch = reps, throughput_batch

    def quality(self, c: Candidate) -> dict[str, Any]:
        c_inputs = to_model_input(self.inputs, self.spec, c.spec)
        pred = c.runner.infer_many(c_inputs, batch_size=32).argmax(1)
        b = min(self.batch, len(c_inputs))
        batch = np.ascontiguousarray(c_inputs[:b])
        for _ in range(3):
            c.runner.infer(batch)
        t_rep = []
        for _ in range(max(5, self.reps // 10)):
            t0 = time.perf_counter()
            c.runner.infer(batch)
            t_rep.append(time.perf_counter() - t0)
        return {"top1": float((pred == self.labels).mean()), "agreement": float((pred == self.float_pred).mean()),
                "n_checkset": int(len(self.labels)), f"throughput_b{b}_img_s": b / float(np.median(t_rep))}

    def timed(self, c: Candidate, frame: np.ndarray) -> dict[str, float]:
        return _frame_to_label(c.runner, frame, c.spec)

    def summary(self) -> dict[str, Any]:
        return {}


class _Detect:
    """Detection: mAP@0.5, mAP@0.5:0.95 and detection agreement of each row's raw outputs on the
    detection checkset, by the gate's ``evaluate_detection``; a timed frame ends at boxes in frame
    pixels. (The exported detector has a static batch of 1: no batch throughput.)"""

    def __init__(self, artifact: Path, manifest: Manifest):
        from .detect.gate import load_det_checkset
        from .runtime.model import _postprocess_spec

        self.cs = load_det_checkset(artifact)
        self.post = _postprocess_spec(artifact, manifest, verify=True)
        self.paths, self.spec, self.labels = list(self.cs.paths), manifest.preprocess, list(manifest.labels)
        self.float: dict[str, Any] = {}

    def _gate(self, raw: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        from .detect.gate import evaluate_detection

        g = evaluate_detection(raw, self.cs, self.post, labels=self.labels, n_boot=0)
        self.float = {"float_map50": g["float_map50"], "float_map": g["float_map"], "n": len(self.cs),
                      "n_gt": g["n_gt"], "score_threshold": g["score_threshold"],
                      "map_score_threshold": g["map_score_threshold"]}
        return g

    def quality(self, c: Candidate) -> dict[str, Any]:
        outs = c.runner.infer_many_all(to_model_input(self.cs.inputs, self.spec, c.spec))
        g = self._gate((outs[0], outs[1]))
        return {"map50": g["quant_map50"], "map": g["quant_map"], "agreement": g["agreement"],
                "map50_drop": g["drop"], "n_detections": g["n_det_quant"], "n_checkset": len(self.cs)}

    def timed(self, c: Candidate, frame: np.ndarray) -> dict[str, float]:
        return _frame_to_boxes(c.runner, frame, c.spec, self.post)

    def summary(self) -> dict[str, Any]:
        """The float model's mAP (from its stored outputs: the same for every row) and the thresholds."""
        if not self.float:  # no row ran
            self._gate((self.cs.float_boxes, self.cs.float_scores))
        return {"detection": self.float}


def _load_rows(cands: list[Candidate], skipped: dict[str, str], task: Any, warm: list[np.ndarray],
               progress: Callable[[str], None]) -> list[Candidate]:
    """Open each row, measure its quality on the checkset and warm it up, one row at a time (peak
    RSS per row); a row that cannot open joins ``skipped`` with the reason."""
    live: list[Candidate] = []
    for c in cands:
        progress(f"loading {c.label}")
        reset = _reset_peak_rss()
        try:
            c.runner = c.make()
        except MissingDependencyError as exc:  # the reason and the extra that installs it
            skipped[c.name] = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
            continue
        except EdgetlError as exc:
            skipped[c.name] = exc.message
            continue
        quality = task.quality(c)
        for f in warm:
            task.timed(c, f)
        c.result = {
            "label": c.label, "backend": c.backend, "precision": c.runner.info.get("precision"),
            "info": {k: v for k, v in c.runner.info.items() if k != "options"}, **quality,
            "input": f"{c.spec.dtype} {c.spec.layout}", "size_mb": c.size_bytes / 1e6,
            "peak_rss_mb": _peak_rss_mb() if reset else None,
        }
        live.append(c)
    return live


def _latency_rounds(live: list[Candidate], frames: list[np.ndarray], timed: Callable, reps: int, rounds: int,
                    block_warmup: int, progress: Callable[[str], None]) -> float | None:
    """Interleaved latency rounds: ``latency_p50_ms``/``_p90_ms`` of each row and the p50 of each
    part ``timed`` reports (``preprocess_p50_ms``, ...). Returns how many CPUs other processes kept
    busy meanwhile."""
    cpu0 = _cpu_sample()
    times: dict[str, list[dict[str, float]]] = {c.name: [] for c in live}
    per_block = max(1, reps // rounds)
    for r in range(rounds):
        progress(f"latency round {r + 1}/{rounds}")
        for c in live:
            for i in range(block_warmup):  # wake this backend's thread pool after the others ran
                timed(c, frames[i % len(frames)])
            times[c.name] += [timed(c, frames[(r * per_block + i) % len(frames)]) for i in range(per_block)]
    others = _other_busy_cpus(cpu0, _cpu_sample())
    for c in live:
        t = times[c.name]
        a = np.asarray([x["latency"] for x in t])
        c.result.update({"latency_p50_ms": float(np.percentile(a, 50)), "latency_p90_ms": float(np.percentile(a, 90))})
        c.result.update({f"{k}_p50_ms": float(np.median([x[k] for x in t])) for k in t[0] if k != "latency"})
        c.result["latency_reps"] = int(a.size)
    return others


def _facts() -> dict:
    from .doctor import machine_facts

    return machine_facts()


def run_bench(artifact: str | Path, run: str | Path | None = None, rows: tuple[str, ...] = ALL_ROWS,
              threads: int = 2, warmup: int = 10, reps: int = 100, rounds: int = 5, throughput_batch: int = 8,
              frame_size: tuple[int, int] | None = None, n_frames: int = 32, block_warmup: int = 5,
              progress: Callable[[str], None] = lambda s: None, chart: bool = True) -> dict[str, Any]:
    """Measure every row of ``rows`` that can run here. ``chart``: bench.png will be drawn, so its
    dependency (matplotlib) is checked first, before half a minute of measuring."""
    if chart:
        require_chart()
    artifact = Path(artifact)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    manifest = open_verified(artifact, "artifact",
                             hint="bench an artifact from `edgetl quantize`/`edgetl compile` (pass the run with --run)")
    task = _task(artifact, manifest, reps, throughput_batch)
    run_dir = _find_run(manifest, artifact, Path(run) if run else None)
    frames, frames_source = load_frames(task.paths, run_dir, n_frames, frame_size)
    cands, skipped = plan(artifact, manifest, run_dir, threads, rows)
    live = _load_rows(cands, skipped, task, frames[:warmup], progress)
    others = _latency_rounds(live, frames, task.timed, reps, rounds, block_warmup, progress)
    results = {c.name: c.result for c in live}
    summary = _speedups(results)
    verdict = mark_gates(results, manifest)
    return {
        "artifact": str(artifact), "task": manifest.task, "labels": list(manifest.labels), "deployable": verdict,
        **_conditions(load_start, others, threads, frames, frames_source),
        "input_size": list(manifest.preprocess.input_size),
        "reps": reps, "rounds": rounds, "rows": results, "skipped": skipped, "speedups": summary, **task.summary(),
    }


def _task(artifact: Path, manifest: Manifest, reps: int, throughput_batch: int):
    return _Detect(artifact, manifest) if manifest.task == "detection" else \
        _Classify(artifact, manifest, reps, throughput_batch)


def _conditions(load_start: float | None, others: float | None, threads: int, frames: list[np.ndarray],
                frames_source: str) -> dict[str, Any]:
    """What the timings were measured under: the machine, its load, the threads and the frames."""
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu": host_cpu().to_dict(), "cpu_class": host_cpu().isa_class,
                    "cpus": os.cpu_count(), "loadavg_start": load_start,
                    "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                    "other_processes_busy_cpus": others, "doctor": _facts()},
        "busy_warning": busy_warning(others, threads),
        "threads": threads, "frames": frames_source,
        "frame_sizes": sorted({f"{f.shape[1]}x{f.shape[0]}" for f in frames}),
    }


COMPARE_ROWS = ("ort-int8", "ov-int8", "tensorrt")


def _short_names(artifacts: list[Path]) -> list[str]:
    """Each artifact's folder name, or the path as given where two folders share a name."""
    names = [a.name or str(a) for a in artifacts]
    return [n if names.count(n) == 1 else str(a) for n, a in zip(names, artifacts)]


def run_compare(artifacts: list[str | Path], rows: tuple[str, ...] = COMPARE_ROWS, threads: int = 2,
                warmup: int = 10, reps: int = 100, rounds: int = 5, throughput_batch: int = 8,
                frame_size: tuple[int, int] | None = None, n_frames: int = 32, block_warmup: int = 5,
                progress: Callable[[str], None] = lambda s: None, chart: bool = True) -> dict[str, Any]:
    """Several artifacts (models) side by side: the same rows of each, opened in one process and timed
    in the same interleaved rounds on the same frames (``load_frames`` of the first artifact), so the
    ratios between models are measured under one machine state. Rows are named ``NAME ROW`` (NAME: the
    artifact's folder); each keeps its artifact's own quality and gate. ``relative``: each row's p50 over
    the first artifact's p50 of the same row."""
    if chart:
        require_chart()
    paths = [Path(a) for a in artifacts]
    if len(set(p.resolve() for p in paths)) < len(paths):
        raise EdgetlError("the same artifact is named twice", hint="name each artifact to compare once")
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    manifests = [open_verified(p, "artifact", hint="compare artifacts from `edgetl quantize`/`edgetl compile`")
                 for p in paths]
    if len({m.task for m in manifests}) > 1:
        raise EdgetlError(f"{', '.join(f'{p} ({m.task})' for p, m in zip(paths, manifests))}: "
                          "the artifacts are of different tasks", hint="compare classifiers with classifiers, "
                                                                       "detectors with detectors")
    names = _short_names(paths)
    tasks = [_task(p, m, reps, throughput_batch) for p, m in zip(paths, manifests)]
    runs = [_find_run(m, p, None) for p, m in zip(paths, manifests)]
    frames, frames_source = load_frames(tasks[0].paths, runs[0], n_frames, frame_size)
    frames_source += f"; the same frames for every artifact (those of {names[0]})"
    live, skipped, task_of = [], {}, {}
    for p, name, m, task, run_dir in zip(paths, names, manifests, tasks, runs):
        cands, own_skipped = plan(p, m, run_dir, threads, rows)
        got = _load_rows(cands, own_skipped, task, frames[:warmup], lambda s, name=name: progress(f"{name}: {s}"))
        skipped.update({f"{name} {k}": v for k, v in own_skipped.items()})
        verdict = mark_gates({c.name: c.result for c in got}, m)
        tag = f"{name} ({'deployable' if verdict else 'NOT deployable'})"  # its target's build decides the verdict
        for c in got:
            c.result.update(artifact=str(p), row=c.name, deployable=verdict, input_size=list(m.preprocess.input_size),
                            label=f"{tag}: {c.result['label']}")
            c.name = f"{name} {c.name}"
            task_of[c.name] = task
        live += got
    others = _latency_rounds(live, frames, lambda c, f: task_of[c.name].timed(c, f), reps, rounds, block_warmup,
                             progress)
    results = {c.name: c.result for c in live}
    return {
        "artifact": " vs ".join(names), "artifacts": [str(p) for p in paths], "task": manifests[0].task,
        **_conditions(load_start, others, threads, frames, frames_source),
        "reps": reps, "rounds": rounds, "rows": results, "skipped": skipped, "speedups": {},
        "relative": _relative(results),
    }


def _relative(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each row's p50 over the p50 of the same row of the first artifact that has it."""
    first: dict[str, float] = {}
    out = {}
    for name, r in rows.items():
        base = first.setdefault(r["row"], r["latency_p50_ms"])
        out[name] = r["latency_p50_ms"] / base
    return out


INT8_ROW_BACKEND = {"ort-int8": "onnxruntime", "ov-int8": "openvino", "tensorrt": "tensorrt"}


def mark_gates(rows: dict[str, dict[str, Any]], manifest: Manifest) -> bool:
    """Give each INT8 row the gate of its backend's build (``gate``: passed / FAILED / not gated)
    and return the artifact's verdict, so a table or chart never shows a build that failed its
    gate like a deployable one."""
    from .check import deployable

    builds = {b.get("backend"): b for b in manifest.builds}
    for name, backend in INT8_ROW_BACKEND.items():
        if name in rows:
            g = (builds.get(backend) or {}).get("gate")
            rows[name]["gate"] = ("passed" if g.get("passed") else "FAILED") if isinstance(g, dict) else "not gated"
    return deployable(manifest)


def _cpu_sample() -> tuple[float, float, float] | None:
    """(wall s, CPU-seconds busy on the whole machine incl. VM steal, CPU-seconds of this process)."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq steal
    except (OSError, ValueError, IndexError):
        return None
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def _other_busy_cpus(a: tuple | None, b: tuple | None) -> float | None:
    """Average number of CPUs other processes (and other VMs: steal) kept busy between two samples.

    Measured while the latency rounds ran, not before: a load average taken at the start would also
    count the pipeline step that just finished (e.g. ``make demo``'s compile) and cry wolf."""
    if a is None or b is None or b[0] - a[0] <= 0:
        return None
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / (b[0] - a[0]))


def busy_warning(others: float | None, threads: int) -> str | None:
    """Other work on the CPUs distorts every row, multi-threaded eager PyTorch most of all.

    ``others``: CPUs kept busy by other processes while the latency rounds ran (see ``_other_busy_cpus``)."""
    cpus = os.cpu_count() or 1
    if others is None or others <= max(0.3, cpus - threads):
        return None
    return (f"other processes kept {others:.1f} of {cpus} CPUs busy while the latencies were measured: they are "
            "inflated, PyTorch eager's OpenMP threads most of all; re-run on an idle machine")


def _speedups(rows: dict[str, dict]) -> dict[str, Any]:
    def p50(name):
        return rows[name]["latency_p50_ms"] if name in rows else None

    out: dict[str, Any] = {}
    eager = [n for n in ("torch-nchw", "torch-channels-last") if n in rows]
    int8 = [n for n in ("ort-int8", "ov-int8", "tensorrt") if n in rows]
    if not int8:
        return out
    best_int8 = min(int8, key=p50)
    out["best_int8"] = best_int8
    if eager:
        base = min(eager, key=p50)
        out["eager_baseline"] = base
        out["int8_vs_eager"] = p50(base) / p50(best_int8)
    strict = {"ort-int8": "ort-fp32", "ov-int8": "ov-f32"}.get(best_int8)
    if strict and strict in rows:
        out["int8_vs_same_backend_fp32"] = p50(strict) / p50(best_int8)
    if "ov-default" in rows and "ov-int8" in rows:
        out["ov_int8_vs_ov_default"] = p50("ov-default") / p50("ov-int8")
    return out


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------

def _ms(key: str) -> Callable[[dict], str]:
    return lambda r: "-" if r.get(key) is None else f"{r[key]:.2f}"


def _pct(key: str) -> Callable[[dict], str]:
    return lambda r: "-" if r.get(key) is None else f"{100 * r[key]:.2f}"


def _throughput(r: dict) -> str:
    thr = next((v for k, v in r.items() if k.startswith("throughput_")), None)
    return f"{thr:.0f}" if thr else "-"


def metric_columns(result: dict[str, Any]) -> list[tuple[str, str, Callable[[dict], str]]]:
    """The task's own columns between the latency and the size: (table header, report.md header, cell)."""
    if result.get("task") == "detection":
        return [("infer ms", "inference ms", _ms("infer_p50_ms")), ("post ms", "post-process ms", _ms("post_p50_ms")),
                ("mAP@.5", "mAP@0.5 %", _pct("map50")), ("mAP@.5:.95", "mAP@0.5:0.95 %", _pct("map")),
                ("agree F1", "agreement (F1) %", _pct("agreement"))]
    return [("b8 img/s", "batch-8 img/s", _throughput), ("top-1", "top-1 %", _pct("top1")),
            ("agree", "agreement %", _pct("agreement"))]


def quality_note(result: dict[str, Any], r: dict[str, Any]) -> tuple[str, str]:
    """What a chart bar is labelled with: the quality, and (a detector) a second line with where its
    time goes."""
    if result.get("task") == "detection":
        return (f"mAP@0.5 {100 * r['map50']:.1f}%, agreement {100 * r['agreement']:.1f}%",
                f"\n pre {r['preprocess_p50_ms']:.1f} + infer {r['infer_p50_ms']:.1f} + post {r['post_p50_ms']:.1f} ms")
    return f"top-1 {100 * r['top1']:.1f}%", ""


def render_table(result: dict[str, Any]):
    from rich.markup import escape
    from rich.table import Table

    cpu = (result.get("machine") or {}).get("cpu")
    det = result.get("detection") or {}
    ref = f"; float mAP@0.5 {100 * det['float_map50']:.2f}" if det.get("float_map50") is not None else ""
    t = Table(title=f"edgetl bench: {result['artifact']}  (threads={result['threads']}, "
                    f"frames: {result['frames']}" + (f"; CPU {describe(cpu)}" if cpu else "") + ref + ")",
              caption=escape("not run: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()))
              if result["skipped"] else None)  # escaped: "pip install 'edgetl[train]'" is not rich markup
    cols = metric_columns(result)
    for col in ("row", "precision (actual)", "p50 ms", "p90 ms", "pre ms", *(c[0] for c in cols), "MB",
                "peak RSS MB"):
        t.add_column(col, justify="right" if col != "row" else "left")
    for name, r in result["rows"].items():
        gate = {"FAILED": " [red]gate FAILED[/]", "passed": " gate passed"}.get(r.get("gate", ""), "")
        t.add_row(name, str(r["precision"]) + gate, f"{r['latency_p50_ms']:.2f}", f"{r['latency_p90_ms']:.2f}",
                  f"{r['preprocess_p50_ms']:.2f}", *(c[2](r) for c in cols), f"{r['size_mb']:.2f}",
                  f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-")
    return t


def require_chart() -> None:
    """bench.png needs matplotlib: refuse before measuring, naming what to install."""
    import importlib.util

    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        err = missing_dependency("matplotlib", "edgetl bench (its chart, bench.png)")
        err.hint = "install it with: pip install 'edgetl[train]' (on a device, matplotlib alone: pip install matplotlib)"
        raise err


def write_chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["rows"].values(), key=lambda r: r["latency_p50_ms"], reverse=True)
    if not rows:
        return
    det = result.get("detection") or {}
    names = [f"{r['label']}\n[{r['precision']}]" for r in rows]
    label_in = 0.085 * max(len(line) for n in names for line in n.split("\n"))  # long labels (several artifacts)
    fig, ax = plt.subplots(figsize=(max(11 if det else 9, label_in + 8), (0.62 if det else 0.5) * len(rows) + 1.8))
    vals = [r["latency_p50_ms"] for r in rows]
    worst = max(vals)
    # speed-ups against the baseline the targets use: the faster PyTorch eager row (else the slowest row)
    base_name = (result.get("speedups") or {}).get("eager_baseline")
    base_row = result["rows"].get(base_name) if base_name else None
    base = base_row["latency_p50_ms"] if base_row else worst
    base_label = "eager " + ("channels_last" if "channels-last" in base_name else "NCHW") if base_row else "slowest"
    failed = [r.get("gate") == "FAILED" for r in rows]  # an INT8 build that missed its gate: red, hatched, said
    bars = ax.barh(names, vals, color=["#c44" if f else "#2a7" if "INT8" in r["label"] or r["label"] == "TensorRT"
                                       else "#89a" for r, f in zip(rows, failed)],
                   hatch=["//" if f else "" for f in failed])
    for b, v, r, f in zip(bars, vals, rows, failed):
        quality, parts = quality_note(result, r)
        ax.text(v, b.get_y() + b.get_height() / 2, f" {v:.2f} ms  ({base / v:.1f}x)  {quality}"
                + ("  FAILED its gate: not deployable" if f else "") + parts, va="center", fontsize=8)
    ax.set_xlabel("batch-1 latency p50, decoded frame -> " + ("boxes (decoding + NMS included)" if det else "label")
                  + " (ms)")
    ax.set_xlim(0, worst * (2.0 if det else 2.2 if any(failed) else 1.75))
    verdict = {True: "deployable", False: "NOT deployable (see report.md)"}.get(result.get("deployable"), "")
    ref = f"; float mAP@0.5 {100 * det['float_map50']:.1f}% on {det['n']} held-out images" if det else ""
    title = result["artifact"] if "artifacts" in result else Path(result["artifact"]).name  # several: "A vs B"
    ax.set_title(f"{title}{': ' + verdict if verdict else ''}: threads={result['threads']}\n"
                 f"(Nx) = speed-up over {base_label}{ref}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
