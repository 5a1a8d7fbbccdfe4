"""Static facts about a model for reports: op counts, parameters, MACs, serialized size."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from onnxmerge.io import iter_tensors, tensor_bytes


_TENSOR_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                       "string_data")


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements of floating-point stored tensors (weights), the usual meaning of 'parameters'."""
    total = 0
    for tensor in iter_tensors(model.graph):
        if onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).kind == "f":
            total += int(np.prod(tensor.dims, dtype=np.int64))
    return total


def static_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Every tensor's shape with the inputs pinned to ``input_shapes`` (tensors still unknown are absent)."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        if value.name in input_shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, input_shapes[value.name]):
                dim.Clear()
                dim.dim_value = size
    del fixed.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError):
        inferred = fixed
    shapes = {}
    for value in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    for tensor in inferred.graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def node_costs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, dict]:
    """Per node (by name, or op type and index when unnamed): MACs (None if unknown) and parameters."""
    shapes = static_shapes(model, input_shapes)
    initializers = {t.name: t for t in model.graph.initializer}
    costs = {}
    for index, node in enumerate(model.graph.node):
        params = sum(int(np.prod(initializers[name].dims, dtype=np.int64)) for name in node.input
                     if name in initializers and
                     onnx.helper.tensor_dtype_to_np_dtype(initializers[name].data_type).kind == "f")
        costs[node.name or f"{node.op_type}_{index}"] = {"op_type": node.op_type, "macs": _node_macs(node, shapes),
                                                         "parameters": params}
    return costs


def macs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul at the given input shapes (None if unknown)."""
    per_node = [cost["macs"] for cost in node_costs(model, input_shapes).values()]
    return None if any(m is None for m in per_node) else int(sum(per_node))


def _node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int | None:
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return 0
    inputs = [shapes.get(name) for name in node.input[:2]]
    output = shapes.get(node.output[0])
    if output is None or any(shape is None for shape in inputs):
        return None
    data, weight = inputs
    if node.op_type == "Conv":
        return int(np.prod(output, dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))
    if node.op_type == "ConvTranspose":
        return int(np.prod(data, dtype=np.int64) * np.prod(weight[1:], dtype=np.int64))
    # Gemm / MatMul: every output element is a dot product over the reduced axis of the first input.
    trans_a = any(a.name == "transA" and a.i for a in node.attribute)
    reduced = data[-2] if trans_a else data[-1]
    return int(np.prod(output, dtype=np.int64) * reduced)


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes the model takes on disk (graph plus tensor data), without serializing a >2 GB message."""
    graph_only = onnx.ModelProto()
    graph_only.CopyFrom(model)
    for tensor in iter_tensors(graph_only.graph):
        for data_field in _TENSOR_DATA_FIELDS:
            tensor.ClearField(data_field)
    return graph_only.ByteSize() + tensor_bytes(model)


def model_stats(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict:
    return {
        "nodes": len(model.graph.node),
        "ops": op_counts(model),
        "parameters": parameter_count(model),
        "macs": macs(model, input_shapes),
        "size_bytes": serialized_size(model),
    }
