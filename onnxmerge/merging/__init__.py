"""Weight merging of compatible ONNX graphs: model soups, task arithmetic, TIES, DARE, permutation alignment."""

from onnxmerge.merging.compat import IncompatibleModelsError
from onnxmerge.merging.merge import AlignResult, SoupResult, align, check_compatible, soup
from onnxmerge.merging.methods import METHODS

__all__ = ["soup", "align", "check_compatible", "SoupResult", "AlignResult", "IncompatibleModelsError", "METHODS"]
