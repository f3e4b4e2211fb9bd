"""edgetl's on-device runtime: manifest, preprocessing, backend runners, sources, app loop.

Never imports torch (``tests/test_torch_free.py`` proves it): a device needs only numpy, OpenCV
and one inference backend.
"""

__version__ = "0.1.0"

from .errors import EdgetlError, ImageDecodeError, IntegrityError, ManifestError, MissingDependencyError  # noqa: E402
from .manifest import Manifest, read_manifest, verify_files, write_manifest  # noqa: E402
from .preprocess import PreprocessSpec, preprocess, preprocess_batch  # noqa: E402
from .model import Model, load  # noqa: E402

__all__ = [
    "EdgetlError", "ImageDecodeError", "IntegrityError", "ManifestError", "MissingDependencyError",
    "Manifest", "read_manifest", "verify_files", "write_manifest",
    "PreprocessSpec", "preprocess", "preprocess_batch",
    "Model", "load",
]
