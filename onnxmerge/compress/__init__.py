"""Depth compression (LayerMerge) for exported ONNX CNNs."""
