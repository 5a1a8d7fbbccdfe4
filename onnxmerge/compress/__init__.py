"""Depth compression (LayerMerge) for exported ONNX CNNs."""

from onnxmerge.compress.api import CompressResult, compress, inspect

__all__ = ["compress", "inspect", "CompressResult"]
