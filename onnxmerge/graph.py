"""Thin helpers over onnx-graphsurgeon shared by every pass: constants, consumers, conv parameters.

Passes never read a weight directly: exporters feed weights through ``Identity`` and ``Constant`` nodes,
and a weight may be shared by several nodes, so every read goes through :func:`constant_value` and every
write creates a new tensor through :func:`add_constant`.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxmerge.conv_algebra import ConvParams
from onnxmerge.io import (EXTERNAL_DATA_THRESHOLD_BYTES, temporary_model_file, EXTERNAL_TENSOR_MIN_BYTES, STRIPPED_LOCATION,
                          array_bytes, iter_tensor_chunks, light_copy, read_tensor, tensor_bytes)
from onnxmerge.refusal import Refused

_PASS_THROUGH_OPS = ("Identity",)

# Folder the external data of the model being worked on is read from (None: weights are in memory).
_EXTERNAL_DATA_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("onnxmerge_external_data_dir",
                                                                                 default=None)


@contextlib.contextmanager
def external_data_dir(folder: str | os.PathLike | None) -> Iterator[None]:
    """Within this block, graphs imported read weights kept in external data from ``folder`` (the model's
    folder), on demand; fold sets it so that a model's weights never have to be loaded all at once."""
    token = _EXTERNAL_DATA_DIR.set(Path(folder) if folder is not None else None)
    try:
        yield
    finally:
        _EXTERNAL_DATA_DIR.reset(token)


def current_external_data_dir() -> Path | None:
    return _EXTERNAL_DATA_DIR.get()


class _StoredValues(LazyValues):
    """graphsurgeon's lazy values of an imported tensor, resolving external data against the model's folder."""

    base_dir: Path | None = None

    def load(self) -> np.ndarray:
        return read_tensor(self.tensor, self.base_dir)


class _StoredConstant(gs.Constant):
    """An imported constant whose values are read from its TensorProto (or external data file) on every
    access and never cached on the object: graphsurgeon's ``Constant.values`` keeps the loaded array, which
    would hold a copy of every weight any pass (or graphsurgeon itself) ever looked at."""

    @property
    def values(self):
        if isinstance(self._values, LazyValues):
            return self._values.load()
        return self._values

    @values.setter
    def values(self, values):
        self._values = values


def import_graph(proto: onnx.ModelProto) -> gs.Graph:
    """Import without reading any weight: constants read their values when asked, from memory or, for
    tensors in external data, from the folder set by :func:`external_data_dir`."""
    graph = gs.import_onnx(proto)
    _make_stored(graph, _EXTERNAL_DATA_DIR.get())
    return graph


def _make_stored(graph: gs.Graph, base_dir: Path | None) -> None:
    def visit(value) -> None:
        if isinstance(value, gs.Constant) and type(value) is gs.Constant:
            value.__class__ = _StoredConstant
            if type(value._values) is LazyValues:
                value._values.__class__ = _StoredValues
                value._values.base_dir = base_dir
        elif isinstance(value, gs.Graph):
            _make_stored(value, base_dir)

    for tensor in graph.tensors().values():
        visit(tensor)
    for node in graph.nodes:
        for value in node.attrs.values():
            visit(value)


def tensor_values(tensor: gs.Constant) -> np.ndarray:
    """A constant's values, read without caching them on the tensor (see :class:`_StoredConstant`)."""
    values = tensor._values
    return values.load() if isinstance(values, LazyValues) else values


def constant_digest(tensor: gs.Constant, limit: int | None = None) -> str:
    """SHA-256 of a constant's stored bytes (the first ``limit`` of them when given), streamed from its data
    file when it is in external data, so digesting weights never loads them."""
    digest = hashlib.sha256()
    values = tensor._values
    if isinstance(values, LazyValues) and not isinstance(values, SparseValues):
        for chunk in iter_tensor_chunks(values.tensor, getattr(values, "base_dir", None), limit):
            digest.update(chunk)
    else:
        data = array_bytes(tensor_values(tensor))
        digest.update(data if limit is None else data[:limit])
    return digest.hexdigest()


def export_graph(graph: gs.Graph, template: onnx.ModelProto, *, light: bool = False) -> onnx.ModelProto:
    """Export, keeping everything of the original model that the graph does not own.

    Opset imports, IR version, metadata and the exact graph input/output declarations (names, dtypes,
    dynamic dim symbols) are copied from ``template`` so that a rewrite never changes the I/O contract.

    ``light=True`` is for readers of types and shapes (shape inference): constants of
    ``EXTERNAL_TENSOR_MIN_BYTES`` or more held in memory are exported as payload-less stand-ins (see
    :func:`onnxmerge.io.light_copy`) and tensors in external data stay references, so the export costs
    kilobytes, not a copy of every weight. Such a model must not be written or run.
    """
    graph.toposort()
    with _stand_ins(graph) if light else contextlib.nullcontext():
        model = gs.export_onnx(graph, do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    model.ir_version = template.ir_version
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(template, field))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    declared = {v.name: v for v in list(template.graph.input) + list(template.graph.output)}
    for values in (model.graph.input, model.graph.output):
        for value in values:
            if value.name in declared:
                value.CopyFrom(declared[value.name])
    return model


@contextlib.contextmanager
def _stand_ins(graph: gs.Graph) -> Iterator[None]:
    """Temporarily give large in-memory constants payload-less values (restored on exit)."""
    swapped = []
    try:
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and not isinstance(tensor._values, SparseValues):
                stand_in = _stand_in(tensor)
                if stand_in is not None:
                    swapped.append((tensor, tensor._values))
                    tensor._values = stand_in
        yield
    finally:
        for tensor, values in swapped:
            tensor._values = values


def _stand_in(tensor: gs.Constant) -> LazyValues | None:
    values = tensor._values
    if isinstance(values, LazyValues):
        proto = values.tensor
        if proto.data_location == onnx.TensorProto.EXTERNAL or not proto.HasField("raw_data"):
            return None  # a reference already, or small typed data
        elem_type, dims, nbytes = proto.data_type, list(proto.dims), values.nbytes
    else:
        array = np.asarray(values)
        try:
            elem_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.export_dtype))
        except (KeyError, TypeError, ValueError):
            return None
        dims, nbytes = list(array.shape), array.nbytes
    if nbytes < EXTERNAL_TENSOR_MIN_BYTES:
        return None
    stub = onnx.TensorProto(name=tensor.name, data_type=elem_type, dims=dims,
                            data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", STRIPPED_LOCATION), ("offset", "0"), ("length", str(nbytes))):
        stub.external_data.add(key=key, value=value)
    return LazyValues(stub)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(inp is tensor for inp in graph.inputs)


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The only node reading ``tensor``, or None if it has several readers or is a graph output."""
    if len(tensor.outputs) != 1 or is_graph_output(graph, tensor):
        return None
    return tensor.outputs[0]


def constant_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a tensor known at export time, looking through Identity and Constant nodes."""
    while tensor is not None:
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor_values(tensor))
        node = producer(tensor)
        if node is None:
            return None
        if node.op == "Constant":
            return _constant_node_value(node)
        if node.op not in _PASS_THROUGH_OPS:
            return None
        tensor = node.inputs[0] if node.inputs else None
    return None


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        return np.asarray(tensor_values(attrs["value"]))
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    return None


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The tensor's shape if every dimension is a known integer."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    shape = tensor.shape
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    return tuple(shape)


def unique_name(graph: gs.Graph, hint: str) -> str:
    names = graph.__dict__.setdefault("_onnxmerge_names", set(graph.tensors().keys()))
    candidate, index = hint, 0
    while candidate in names:
        index += 1
        candidate = f"{hint}_{index}"
    names.add(candidate)
    return candidate


def add_constant(graph: gs.Graph, hint: str, values: np.ndarray) -> gs.Constant:
    """A new, unshared constant tensor (weights are never modified in place: they may be shared)."""
    return gs.Constant(unique_name(graph, hint), np.ascontiguousarray(values))


def read_conv_params(node: gs.Node) -> ConvParams:
    """A Conv node's parameters as plain arrays; raises :class:`Refused` (naming the node) when they cannot
    be read."""
    def refuse(reason: str) -> Refused:
        return Refused(reason, [node.name])

    if node.op != "Conv":
        raise refuse(f"{node.op} is not a Conv")
    weight = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        raise refuse("its weight is not a constant")
    bias = None
    if len(node.inputs) > 2 and not _is_omitted(node.inputs[2]):
        bias = constant_value(node.inputs[2])
        if bias is None:
            raise refuse("its bias is not a constant")
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        raise refuse(f"auto_pad={auto_pad} (explicit_pads turns it into pads when shapes are known)")
    rank = weight.ndim - 2
    pads = node.attrs.get("pads") if auto_pad == "NOTSET" else None
    try:
        return ConvParams.make(
            weight, bias,
            strides=node.attrs.get("strides"),
            dilations=node.attrs.get("dilations"),
            pads=pads if pads is not None else [0] * (2 * rank),
            groups=node.attrs.get("group", 1),
        )
    except ValueError as exc:
        raise refuse(str(exc)) from exc


def _is_omitted(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Variable) and tensor.name == "" and not tensor.inputs


def set_conv_params(graph: gs.Graph, node: gs.Node, params: ConvParams, dtype: np.dtype) -> None:
    """Point a Conv node at new weight/bias tensors and attributes (old tensors are left to cleanup)."""
    name = node.name or "conv"
    weight = add_constant(graph, f"{name}.weight", params.weight.astype(dtype))
    bias = add_constant(graph, f"{name}.bias", params.bias.astype(dtype))
    set_inputs_from(node, 1, [weight, bias])
    node.attrs.pop("auto_pad", None)
    node.attrs.pop("kernel_shape", None)
    node.attrs["strides"] = list(params.strides)
    node.attrs["dilations"] = list(params.dilations)
    node.attrs["pads"] = list(params.pads)
    node.attrs["group"] = params.groups
    node.attrs["kernel_shape"] = list(params.kernel_shape)


def set_inputs_from(node: gs.Node, start: int, tensors: list[gs.Tensor]) -> None:
    """Replace ``node.inputs[start:]`` (graphsurgeon's synchronized lists do not support slice assignment)."""
    while len(node.inputs) > start:
        node.inputs.pop()
    node.inputs.extend(tensors)


def weight_dtype(node: gs.Node) -> np.dtype:
    return constant_value(node.inputs[1]).dtype


def replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads ``old`` read ``new`` instead."""
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new


def detach(node: gs.Node) -> None:
    """Disconnect a node so graph cleanup removes it."""
    node.inputs.clear()
    node.outputs.clear()


def infer_shapes(graph: gs.Graph, template: onnx.ModelProto) -> int:
    """Run ONNX shape inference and copy the result onto the graph's tensors; returns tensors newly typed."""
    model = export_graph(graph, template, light=True)
    del model.graph.value_info[:]
    try:
        inferred = run_shape_inference(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return 0
    tensors = graph.tensors()
    newly_typed = 0
    for value in inferred.graph.value_info:
        tensor = tensors.get(value.name)
        if not isinstance(tensor, gs.Variable):
            continue
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) if tensor_type.elem_type else None
        if tensor.shape != shape or (dtype is not None and tensor.dtype != dtype):
            newly_typed += 1
            tensor.shape = shape
            if dtype is not None:
                tensor.dtype = dtype
    return newly_typed


def run_shape_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference of a proto, never of its weights' bytes; ``model`` is not modified.

    The one place that decides how inference runs (shared with :mod:`onnxmerge.stats`). Inference needs the
    types and dims of large tensors, not their data, so it runs on a light copy (large payloads left out,
    small tensors such as Reshape targets kept, see :func:`onnxmerge.io.light_copy`): the copy is kilobytes
    and goes through a temporary file only if it still is too large to serialise (>2 GB of small tensors or
    Constant nodes). The result's large initializers are stand-ins: read shapes from it, not values. It
    raises whatever ONNX raises; callers decide what a failure means.
    """
    skeleton = light_copy(model, EXTERNAL_TENSOR_MIN_BYTES)
    if tensor_bytes(skeleton) < EXTERNAL_DATA_THRESHOLD_BYTES:
        return onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    return _infer_shapes_via_file(skeleton)


def _infer_shapes_via_file(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inference through a temporary file (``model`` is a light copy: its large tensors are stand-ins)."""
    with temporary_model_file(model) as path:
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
        return onnx.load(str(path), load_external_data=False)


def known_dims(tensor: gs.Tensor) -> list[int | None] | None:
    """The tensor's dimensions, None for each one not known as an integer; None when even the rank is unknown."""
    shape = tuple(tensor.shape) if isinstance(tensor, gs.Constant) else tensor.shape
    if shape is None:
        return None
    return [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]


def ints_param(node: gs.Node, attr: str, index: int) -> list[int] | None:
    """An int-list parameter that moved from an attribute (older opsets) to input ``index`` (newer ones).

    Returns the values, or None when the node omits the parameter; raises :class:`Refused` (naming the node)
    when it cannot be read (an input that is not a constant) -- e.g. Squeeze/Unsqueeze ``axes`` (input from
    opset 13), Slice ``starts`` (10).
    """
    if attr in node.attrs:
        return [int(v) for v in np.asarray(node.attrs[attr]).ravel()]
    if len(node.inputs) <= index or _is_omitted(node.inputs[index]):
        return None
    value = constant_value(node.inputs[index])
    if value is None:
        raise Refused(f"its {attr} input is not a constant", [node.name])
    return [int(v) for v in np.asarray(value).ravel()]


def check_bypass(graph: gs.Graph, source: gs.Tensor, target: gs.Tensor) -> None:
    """Raise :class:`Refused` when a node whose output ``target`` always equals ``source`` cannot be removed.

    Removing such a node is a rename of ``target`` to ``source``, except when ``target`` is a graph output:
    its name is part of the model's contract, so the producer of ``source`` must write ``target`` instead,
    which needs a producing node that is not a Constant and a ``source`` that is not a graph output itself.
    The refusal names the producer of ``source`` when there is one.
    """
    if not is_graph_output(graph, target):
        return
    source_producer = producer(source)
    if source_producer is None or source_producer.op == "Constant":
        raise Refused("it links a graph input or constant to a graph output; kept to preserve the output name",
                      [source_producer.name] if source_producer is not None else [])
    if is_graph_output(graph, source):
        raise Refused("both its input and output are graph outputs", [source_producer.name])


def bypass(graph: gs.Graph, node: gs.Node, source: gs.Tensor, target: gs.Tensor) -> None:
    """Remove ``node``, whose output ``target`` always equals ``source`` (same values, dtype and shape).

    ``source`` need not be an input of ``node`` (e.g. the input of an inverse pair's first node). Readers of
    ``target`` read ``source``; when ``target`` is a graph output, the producer of ``source`` writes
    ``target`` instead, so the output keeps its name. Raises :func:`check_bypass`'s :class:`Refused` (with
    ``node`` named first), changing nothing, when neither is possible.
    """
    try:
        check_bypass(graph, source, target)
    except Refused as refused:
        raise Refused(refused.reason, [node.name, *refused.nodes]) from None
    if not is_graph_output(graph, target):
        replace_uses(target, source)
        detach(node)
        return
    source_producer = producer(source)
    detach(node)
    replace_uses(source, target)
    index = next(i for i, t in enumerate(source_producer.outputs) if t is source)
    source_producer.outputs[index] = target


def is_omitted(tensor: gs.Tensor) -> bool:
    """Whether ``tensor`` stands for an omitted optional input (ONNX writes an empty name)."""
    return _is_omitted(tensor)
