"""Tiny artifact folders and videos for the runtime tests (no torch needed, built in milliseconds).

``make_tiny_artifact`` writes an artifact folder by the contract of docs/ARCHITECTURE.md: a model
ONNX, ``manifest.json`` (kind "artifact") with a ``builds`` entry for onnxruntime, and every file
hashed. The default model is a real ONNX graph built with ``onnx.helper`` that classifies a frame
as ``dark`` or ``bright`` from its mean intensity (GlobalAveragePool -> Flatten -> Gemm), so the
labels of generated videos are known in advance; ``torch_model=True`` exports the ``tiny_cnn``
backbone instead (the test process may import torch; the runtime never does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from edgetl.runtime.manifest import Manifest, hash_files, write_manifest
from edgetl.runtime.preprocess import PreprocessSpec

LABELS = ("dark", "bright")
SPEC = PreprocessSpec(input_size=(32, 32), resize="stretch", mean=(127.5,) * 3, std=(127.5,) * 3)


def brightness_onnx(path: Path, gain: float = 4.0) -> Path:
    """(N,3,32,32) float -> logits (N,2): [dark, bright] = [-g, +g] * mean normalised intensity."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.array([[-gain, gain]] * 3, dtype=np.float32) / 3.0  # (3, 2)
    b = np.zeros(2, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "W", "B"], ["logits"])],
        "brightness",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tiny_cnn_onnx(path: Path, num_classes: int = 2, seed: int = 0) -> Path:
    import torch

    from edgetl.backbones import build_classifier

    torch.manual_seed(seed)
    model, _ = build_classifier("tiny_cnn", num_classes, pretrained="none", dropout=0.0)
    model.eval()
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    return path


def make_tiny_artifact(folder: Path, *, torch_model: bool = False, builds: Sequence[dict] | None = None,
                       gate_passed: bool | None = True) -> Path:
    """Write an artifact folder at ``folder`` (model_fp32.onnx + manifest) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (tiny_cnn_onnx if torch_model else brightness_onnx)(folder / "model_fp32.onnx")
    if builds is None:
        builds = [{"backend": "onnxruntime", "model": "model_fp32.onnx", "precision": "fp32",
                   "options": {"intra_op_threads": 1}}]
    manifest = Manifest(kind="artifact", labels=LABELS, preprocess=SPEC,
                        backbone={"name": "tiny_cnn" if torch_model else "brightness"},
                        gate=None if gate_passed is None else {"passed": gate_passed},
                        builds=tuple(builds), files=hash_files(folder))
    write_manifest(manifest, folder)
    return folder


# ---- generated sources --------------------------------------------------------------------------

def frame_at(i: int, size: tuple[int, int] = (64, 48), period: int = 10, seed: int = 0) -> np.ndarray:
    """Frame ``i`` of the test video: blocks of ``period`` frames alternate dark / bright, with a
    moving square and noise so consecutive frames differ."""
    w, h = size
    rng = np.random.default_rng(seed + i)
    base = 50 if (i // period) % 2 == 0 else 205
    img = np.clip(rng.normal(base, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
    x = (i * 3) % max(1, w - 10)
    cv2.rectangle(img, (x, h // 3), (x + 9, h // 3 + 9), (0, 0, 255), -1)
    return img


def write_video(path: Path, n: int = 40, size: tuple[int, int] = (64, 48), fps: float = 30.0,
                fourcc: str | None = None, frames: Iterable[np.ndarray] | None = None) -> Path:
    fourcc = fourcc or ("mp4v" if Path(path).suffix.lower() == ".mp4" else "MJPG")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened(), f"cannot write {path}"
    for img in frames if frames is not None else (frame_at(i, size) for i in range(n)):
        writer.write(img)
    writer.release()
    return Path(path)


def decode_video(path: Path) -> list[np.ndarray]:
    """Every frame of a video, decoded here independently of the runtime."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    return frames


class MjpegServer:
    """A bounded, self-stopping local MJPEG-over-HTTP server on 127.0.0.1 (a network camera).

    ``plan`` lists how many frames each successive client connection gets; after the last one the
    listening socket closes, so further connections are refused (the "camera" is gone).
    """

    def __init__(self, plan: Sequence[int] = (10,), interval: float = 0.02, size: tuple[int, int] = (64, 48),
                 deadline: float = 60.0):
        import socket
        import threading

        self.plan = list(plan)
        self.interval = interval
        self.size = size
        self.deadline = deadline
        self.sent: list[int] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "MjpegServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.deadline = 0
        self.thread.join(timeout=10)
        self.sock.close()

    def _serve(self) -> None:
        import socket
        import time

        t_end = time.monotonic() + self.deadline
        k = 0  # global frame counter, so every frame of every connection differs
        for count in self.plan:
            conn = None
            while conn is None and time.monotonic() < t_end and self.deadline:
                try:
                    conn, _ = self.sock.accept()
                except socket.timeout:
                    continue
            if conn is None:
                break
            sent = 0
            with conn:
                try:
                    conn.settimeout(2)
                    conn.recv(4096)  # the request
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n")
                    for _ in range(count):
                        ok, jpg = cv2.imencode(".jpg", frame_at(k, self.size))
                        data = jpg.tobytes()
                        conn.sendall(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data)
                                     + data + b"\r\n")
                        k += 1
                        sent += 1
                        time.sleep(self.interval)
                except OSError:
                    pass
            self.sent.append(sent)
        self.sock.close()  # the camera is gone: new connections are refused
