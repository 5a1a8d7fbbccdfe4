"""Static facts about a model for reports: op counts, parameters, MACs, serialized size.

Statistics never fail a command: a MAC count is exact where the shapes allow it and otherwise *unknown with
a reason* (per node, and summarised per model), never an exception. Shape inference errors, symbolic or
dynamic dims (``dim_param``, and ``dim_value`` -1 or 0 as some exporters write them) and malformed nodes all
degrade to "unknown".
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxmerge.canonical import is_dynamic_dim
from onnxmerge.errors import first_line
from onnxmerge.io import EXTERNAL_TENSOR_MIN_BYTES, external_bytes, iter_tensors, light_copy


# At most this many unknown-MAC nodes are listed in model_stats (the count is always complete).
MACS_UNKNOWN_LIST_LIMIT = 20

_DEFAULT_DOMAINS = ("", "ai.onnx")
_MS_DOMAIN = "com.microsoft"

# op type -> (index of the data / A input, index of the weight / B input)
_CONV_INPUTS = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
_MATMUL_INPUTS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}
_MAC_OPS = frozenset({*_CONV_INPUTS, *_MATMUL_INPUTS, "ConvTranspose", "Gemm", "Einsum"})
# Contrib ops (ORT-optimised models) that multiply-accumulate and that we can count like their ONNX op.
_MS_COUNTED = {"FusedConv": "Conv", "FusedGemm": "Gemm", "NhwcConv": None}
# Contrib ops that certainly multiply-accumulate but whose cost is not modelled here.
_MS_NOT_COUNTED = frozenset({"FusedMatMul", "Attention", "MultiHeadAttention", "GroupQueryAttention",
                             "QAttention", "MatMulNBits", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                             "QLinearConv", "QLinearMatMul", "MatMulBnb4", "MatMulFpQ4", "QOrderedMatMul",
                             "DecoderAttention", "PackedAttention", "PackedMultiHeadAttention",
                             "SparseAttention", "GatedRelativePositionBias", "LongformerAttention"})


class _Unknown(Exception):
    """A node whose MACs cannot be known; the message is the reason (without the node prefix)."""


@dataclass
class ShapeFacts:
    """What shape inference told us: fully static shapes, the partial ones (for reasons), and its failure."""

    static: dict[str, tuple[int, ...]] = field(default_factory=dict)
    partial: dict[str, tuple] = field(default_factory=dict)  # dims: int, or a str (symbol) / None when dynamic
    inference_error: str | None = None


# --- shapes -----------------------------------------------------------------------------------------------


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def _is_float_tensor(tensor: onnx.TensorProto) -> bool:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).kind == "f"
    except Exception:  # an undefined or exotic data type is not a float weight we can count
        return False


def _elements(dims) -> int:
    return int(np.prod([int(d) for d in dims], dtype=np.int64)) if len(dims) else 1


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements of floating-point stored tensors (weights), the usual meaning of 'parameters'."""
    total = 0
    for tensor in iter_tensors(model.graph):
        if _is_float_tensor(tensor):
            total += _elements(tensor.dims)
    return total


def _pin_inputs(fixed: onnx.ModelProto, input_shapes: dict) -> None:
    """Set the given inputs' dims; make -1/0 dims of graph inputs and outputs truly dynamic (no dim_value)."""
    for is_input, values in ((True, fixed.graph.input), (False, fixed.graph.output)):
        for value in values:
            if not value.type.HasField("tensor_type"):
                continue
            tensor_type = value.type.tensor_type
            pinned = input_shapes.get(value.name) if is_input else None
            if pinned is None:
                for dim in tensor_type.shape.dim:
                    if dim.HasField("dim_value") and is_dynamic_dim(dim):
                        dim.Clear()
                continue
            pinned = tuple(pinned)
            if not tensor_type.HasField("shape") and not pinned:
                continue  # rank unknown: () is what input_specs makes of it, not a real scalar
            if not tensor_type.HasField("shape") or len(tensor_type.shape.dim) != len(pinned):
                tensor_type.shape.Clear()
                for _ in pinned:
                    tensor_type.shape.dim.add()
            for dim, size in zip(tensor_type.shape.dim, pinned):
                dim.Clear()
                if isinstance(size, (int, np.integer)) and size > 0:
                    dim.dim_value = int(size)


def shape_facts(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None) -> ShapeFacts:
    """Every tensor's shape with the inputs pinned to ``input_shapes``; never raises.

    If shape inference fails (of any exception type, including the >2 GB path through a file), only the
    declared shapes and the initializers are known and ``inference_error`` says why, once.
    """
    facts = ShapeFacts()
    try:
        fixed = light_copy(model)  # the weights' types and dims, not their bytes: kilobytes for any model
        _pin_inputs(fixed, dict(input_shapes or {}))
        del fixed.graph.value_info[:]
    except Exception as exc:
        facts.inference_error = f"could not prepare the model for shape inference: {first_line(exc)}"
        fixed = model
    inferred = fixed
    if facts.inference_error is None:
        try:
            from onnxmerge.graph import run_shape_inference  # the one >2 GB policy, shared with the passes

            inferred = run_shape_inference(fixed)
        except Exception as exc:  # onnx raises InferenceError, ValidationError, RuntimeError, ValueError...
            facts.inference_error = f"shape inference failed: {type(exc).__name__}: {first_line(exc)}"
    try:
        values = list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output)
        for value in values:
            if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
                continue  # unknown rank (or not a tensor): nothing is known, not "a scalar"
            dims = value.type.tensor_type.shape.dim
            if any(is_dynamic_dim(d) for d in dims):
                if value.name not in facts.static:  # a fully known entry for the same tensor wins
                    facts.partial[value.name] = tuple((d.dim_param or None) if is_dynamic_dim(d) else int(d.dim_value)
                                                      for d in dims)
            else:
                facts.static[value.name] = tuple(int(d.dim_value) for d in dims)
                facts.partial.pop(value.name, None)
        for tensor in inferred.graph.initializer:
            facts.static[tensor.name] = tuple(int(d) for d in tensor.dims)
            facts.partial.pop(tensor.name, None)
        _add_constant_node_shapes(inferred.graph, facts)
    except Exception as exc:
        facts.inference_error = facts.inference_error or f"could not read inferred shapes: {first_line(exc)}"
    return facts


def _add_constant_node_shapes(graph: onnx.GraphProto, facts: ShapeFacts) -> None:
    """Constant nodes' outputs have known shapes even when inference failed."""
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output and \
                node.output[0] not in facts.static:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    facts.static[node.output[0]] = tuple(int(d) for d in attribute.t.dims)
                    facts.partial.pop(node.output[0], None)


def static_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Every tensor's shape with the inputs pinned to ``input_shapes`` (tensors still unknown are absent).

    Never raises: where shape inference fails, only declared shapes and initializers are returned.
    """
    return shape_facts(model, input_shapes).static


# --- per-node MACs ----------------------------------------------------------------------------------------


def node_label(node: onnx.NodeProto, index: int) -> str:
    """How reports name a node: its name, or op type and index when unnamed."""
    return node.name or f"{node.op_type}_{index}"


def _node_entries(model: onnx.ModelProto, input_shapes: dict) -> tuple[list[tuple[str, dict]], ShapeFacts]:
    """(label, cost) for every node in graph order (labels may repeat), and the shape facts used."""
    facts = shape_facts(model, input_shapes)
    try:
        initializers = {t.name: t for t in model.graph.initializer}
    except Exception:
        initializers = {}
    entries = []
    for index, node in enumerate(model.graph.node):
        label = node_label(node, index)
        try:
            params = sum(_elements(initializers[name].dims) for name in node.input
                         if name in initializers and _is_float_tensor(initializers[name]))
        except Exception:
            params = None
        value, reason = node_macs(node, facts, label)
        entries.append((label, {"op_type": node.op_type, "macs": value, "macs_reason": reason,
                                "parameters": params}))
    return entries, facts


def node_costs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, dict]:
    """Per node (by name, or op type and index when unnamed): MACs, the reason when unknown, and parameters.

    ``macs`` is None when unknown, and ``macs_reason`` then says why (it is None when ``macs`` is known).
    Never raises.
    """
    return dict(_node_entries(model, input_shapes)[0])


def macs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> int | None:
    """Multiply-accumulates of the MAC ops at the given input shapes (None if any node's MACs are unknown)."""
    return _macs_summary(_node_entries(model, input_shapes))["macs"]


def _macs_summary(entries_and_facts) -> dict:
    entries, facts = entries_and_facts
    known, unknown = 0, []
    for label, cost in entries:
        if cost["macs"] is None:
            unknown.append({"node": label, "op_type": cost["op_type"], "reason": cost["macs_reason"]})
        else:
            known += cost["macs"]
    return {
        "macs": None if unknown else int(known),
        "macs_known": int(known),
        "macs_unknown": unknown[:MACS_UNKNOWN_LIST_LIMIT],
        "macs_unknown_count": len(unknown),
        "shape_inference_error": facts.inference_error,
    }


def node_macs(node: onnx.NodeProto, facts: ShapeFacts | dict, label: str | None = None) -> tuple[int | None, str | None]:
    """(MACs, None) when known, (None, reason) when not; never raises.

    ``facts`` is a :class:`ShapeFacts` or a plain ``{tensor: static shape}`` dict.
    """
    if isinstance(facts, dict):
        facts = ShapeFacts(static=facts)
    prefix = f"{node.op_type} '{label or node.name or node.op_type}'"
    try:
        value = _node_macs(node, facts)
    except _Unknown as unknown:
        return None, f"{prefix}: {unknown}"
    except Exception as exc:  # a malformed node must not end the command
        return None, f"{prefix}: {type(exc).__name__}: {first_line(exc)}"
    if value is None:
        return None, f"{prefix}: MACs unknown"
    return int(value), None


def _node_macs(node: onnx.NodeProto, facts: ShapeFacts) -> int:
    op, domain = node.op_type, node.domain
    if domain == _MS_DOMAIN:
        if op in _MS_COUNTED and _MS_COUNTED[op] is not None:
            op = _MS_COUNTED[op]
        elif op in _MS_COUNTED or op in _MS_NOT_COUNTED:
            raise _Unknown(f"MACs of the {domain} contrib op {op} are not modelled")
        else:
            return _subgraph_macs(node)
    elif domain not in _DEFAULT_DOMAINS:
        return _subgraph_macs(node)
    if op in _CONV_INPUTS:
        data_index, weight_index = _CONV_INPUTS[op]
        weight = _input_shape(node, weight_index, facts, "weight")
        output = _output_shape(node, facts)
        if len(weight) < 3 or len(output) != len(weight):
            raise _Unknown(f"weight shape {weight} and output shape {output} do not fit a convolution")
        return _elements(output) * _elements(weight[1:])
    if op == "ConvTranspose":
        data = _input_shape(node, 0, facts, "data")
        weight = _input_shape(node, 1, facts, "weight")
        if len(weight) < 3 or len(data) != len(weight):
            raise _Unknown(f"input shape {data} and weight shape {weight} do not fit a transposed convolution")
        # Every input element is scattered over (out channels / group) x kernel outputs; grouped weights are
        # (C_in, C_out / group, k...), so this holds for any group.
        return _elements(data) * _elements(weight[1:])
    if op == "Gemm":
        return _gemm_macs(node, facts)
    if op in _MATMUL_INPUTS:
        a_index, b_index = _MATMUL_INPUTS[op]
        return matmul_macs(_input_shape(node, a_index, facts, "A"), _input_shape(node, b_index, facts, "B"))
    if op == "Einsum":
        equation = _attribute(node, "equation")
        if equation is None:
            raise _Unknown("no equation attribute")
        equation = equation.decode() if isinstance(equation, bytes) else equation
        shapes = [_input_shape(node, i, facts, f"operand {i}") for i in range(len(node.input))]
        return einsum_macs(equation, shapes)
    return _subgraph_macs(node)


def _subgraph_macs(node: onnx.NodeProto) -> int:
    """0 for an op without MACs; unknown for control flow whose subgraphs hold MAC ops (trip counts, branches)."""
    for attribute in node.attribute:
        graphs = ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs)
        if any(_holds_mac_ops(graph) for graph in graphs):
            raise _Unknown(f"MACs inside its subgraph '{attribute.name}' are not counted "
                           "(trip counts and branches are not known statically)")
    return 0


def _holds_mac_ops(graph: onnx.GraphProto) -> bool:
    for node in graph.node:
        if node.op_type in _MAC_OPS or (node.domain == _MS_DOMAIN and (node.op_type in _MS_COUNTED or
                                                                       node.op_type in _MS_NOT_COUNTED)):
            return True
        for attribute in node.attribute:
            if attribute.HasField("g") and _holds_mac_ops(attribute.g):
                return True
            if any(_holds_mac_ops(g) for g in attribute.graphs):
                return True
    return False


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _describe(partial: tuple) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in partial) + ("," if len(partial) == 1 else "") + ")"


def _tensor_shape(name: str, facts: ShapeFacts, what: str) -> tuple[int, ...]:
    if name in facts.static:
        return facts.static[name]
    if name in facts.partial:
        raise _Unknown(f"shape of {what} '{name}' is not static: {_describe(facts.partial[name])}")
    cause = f" ({facts.inference_error})" if facts.inference_error else ""
    raise _Unknown(f"shape of {what} '{name}' unknown{cause}")


def _input_shape(node: onnx.NodeProto, index: int, facts: ShapeFacts, role: str) -> tuple[int, ...]:
    if index >= len(node.input) or not node.input[index]:
        raise _Unknown(f"input {index} ({role}) is missing")
    return _tensor_shape(node.input[index], facts, "input")


def _output_shape(node: onnx.NodeProto, facts: ShapeFacts) -> tuple[int, ...]:
    if not node.output or not node.output[0]:
        raise _Unknown("output 0 is missing")
    return _tensor_shape(node.output[0], facts, "output")


def _gemm_macs(node: onnx.NodeProto, facts: ShapeFacts) -> int:
    a = _input_shape(node, 0, facts, "A")
    b = _input_shape(node, 1, facts, "B")
    if len(a) != 2 or len(b) != 2:
        raise _Unknown(f"Gemm needs 2-D operands, got A {a} and B {b}")
    trans_a, trans_b = bool(_attribute(node, "transA", 0)), bool(_attribute(node, "transB", 0))
    m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
    k_b, n = (b[1], b[0]) if trans_b else (b[0], b[1])
    if k != k_b:
        raise _Unknown(f"contracted dims differ: A {a} (transA={int(trans_a)}), B {b} (transB={int(trans_b)})")
    return m * n * k


def matmul_macs(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """MACs of ``numpy.matmul`` of shapes ``a`` and ``b``: prod(output shape) x K (1-D operands promoted)."""
    a, b = tuple(a), tuple(b)
    if not a or not b:
        raise _Unknown(f"MatMul of a scalar operand: A {a}, B {b}")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    k = a2[-1]
    if b2[-2] != k:
        raise _Unknown(f"contracted dims differ: A {a}, B {b}")
    try:
        batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    except ValueError:
        raise _Unknown(f"batch dims do not broadcast: A {a}, B {b}") from None
    return _elements(batch) * a2[-2] * b2[-1] * k


_EINSUM_LETTERS = frozenset(string.ascii_letters)


def einsum_macs(equation: str, shapes: list[tuple[int, ...]]) -> int:
    """MACs of a 2-operand einsum: the product of the sizes of every distinct letter (and broadcast ``...``).

    One operand costs no multiplications (0); three or more depend on the contraction order (unknown).
    """
    equation = equation.replace(" ", "")
    lhs = equation.split("->")[0]
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise _Unknown(f"equation '{equation}' has {len(terms)} operand(s), the node has {len(shapes)} input(s)")
    if len(terms) == 1:
        return 0
    if len(terms) > 2:
        raise _Unknown(f"Einsum with {len(terms)} operands: MACs depend on the contraction order")
    sizes: dict[str, int] = {}
    ellipses = []
    for term, shape in zip(terms, shapes):
        letters = term.replace("...", "")
        if not set(letters) <= _EINSUM_LETTERS or term.count("...") > 1:
            raise _Unknown(f"cannot parse equation '{equation}'")
        if "..." in term:
            rank = len(shape) - len(letters)
            if rank < 0:
                raise _Unknown(f"operand '{term}' has rank {len(shape)}")
            before = term.index("...")
            ellipses.append(shape[before:before + rank])
            dims = shape[:before] + shape[before + rank:]
        else:
            if len(letters) != len(shape):
                raise _Unknown(f"operand '{term}' does not match its shape {shape}")
            dims = shape
        for letter, size in zip(letters, dims):
            known = sizes.get(letter)
            if known is not None and known != size and 1 not in (known, size):
                raise _Unknown(f"letter '{letter}' has sizes {known} and {size}")
            sizes[letter] = size if known is None else max(known, size)
    try:
        broadcast = np.broadcast_shapes(*ellipses) if ellipses else ()
    except ValueError:
        raise _Unknown(f"'...' dims do not broadcast: {ellipses}") from None
    return _elements(tuple(sizes.values())) * _elements(broadcast)


# --- model level ------------------------------------------------------------------------------------------


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes the model takes on disk (graph plus tensor data, external data files included), without
    serializing a >2 GB message or copying its weights: the large tensors are counted by their length."""
    skeleton = light_copy(model, EXTERNAL_TENSOR_MIN_BYTES)
    return skeleton.ByteSize() + external_bytes(skeleton)


def _never_raise(function, *args):
    try:
        return function(*args)
    except Exception:
        return None


def model_stats(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict:
    """Model-level statistics; never raises (a fact that cannot be computed is None).

    ``macs`` is the total, or None when any node's MACs are unknown; ``macs_known`` then is the sum over the
    nodes whose MACs are known (a lower bound), ``macs_unknown`` lists the first
    :data:`MACS_UNKNOWN_LIST_LIMIT` unknown nodes with their reasons and ``macs_unknown_count`` counts them all.
    ``shape_inference_error`` is why ONNX shape inference failed, or None.
    """
    stats = {
        "nodes": len(model.graph.node),
        "ops": op_counts(model),
        "parameters": _never_raise(parameter_count, model),
    }
    summary = _never_raise(lambda: _macs_summary(_node_entries(model, input_shapes)))
    if summary is None:  # not expected: _node_entries guards every node
        summary = {"macs": None, "macs_known": 0, "macs_unknown_count": len(model.graph.node),
                   "macs_unknown": [{"node": None, "op_type": None, "reason": "MAC counting failed"}],
                   "shape_inference_error": None}
    stats.update(summary)
    stats["size_bytes"] = _never_raise(serialized_size, model)
    return stats
