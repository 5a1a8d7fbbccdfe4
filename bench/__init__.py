"""Benchmarks that compare onnxmerge with other ONNX graph simplifiers on the model zoo (``python -m bench.fold``)."""
