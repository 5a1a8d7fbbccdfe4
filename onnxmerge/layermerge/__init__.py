"""LayerMerge depth compression for exported ONNX CNNs; the entry point is onnxmerge.compress()."""
