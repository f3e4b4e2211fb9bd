"""edgetl: from a folder of labelled images to a fast, quantized, verified model on an edge device.

Host side (data, backbones, fine-tuning, quantization, export, builds, checks, CLI). Heavy
packages (torch, openvino, tensorrt) are imported inside the functions that need them.
"""

from .runtime import __version__  # noqa: F401
from .runtime.errors import EdgetlError  # noqa: F401
