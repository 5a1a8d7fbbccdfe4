"""onnxmerge: exact and depth-compressing rewrites of exported ONNX models, verified in ONNX Runtime."""

from onnxmerge.ort import ort as _ort  # noqa: F401  (fails early, with a clear message, without a usable ORT)
from onnxmerge.api import FoldResult, InferenceSession, fold
from onnxmerge.errors import BadInputError, OnnxMergeError, VerificationError
from onnxmerge.profiler import compare, profile
from onnxmerge.layermerge.api import CompressOptions, compress
from onnxmerge.prepared import PreparedModel, prepare
from onnxmerge.runner import RuntimeSettings
from onnxmerge.merging import align, soup
from onnxmerge.version import __version__

__all__ = ["fold", "FoldResult", "InferenceSession", "profile", "compare", "compress", "CompressOptions", "soup", "align",
           "prepare", "PreparedModel", "RuntimeSettings", "OnnxMergeError", "BadInputError", "VerificationError",
           "__version__"]
