"""Weight merging of compatible ONNX graphs: model soups, task arithmetic, TIES, DARE, permutation alignment."""

from onnxmerge.soup.compat import IncompatibleModelsError
from onnxmerge.soup.merge import AlignResult, SoupResult, align, check_compatible, soup
from onnxmerge.soup.methods import METHODS

__all__ = ["soup", "align", "check_compatible", "SoupResult", "AlignResult", "IncompatibleModelsError", "METHODS"]
