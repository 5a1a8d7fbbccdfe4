"""Can these graphs be merged weight by weight, and which stored tensor of one pairs with which of another?

Exporters rename weights (constant folding, deduplication), so tensors are paired by where they sit in the
graph, never by name. Each graph is walked in a canonical order (post-order from the graph outputs, inputs
in slot order), which is the same for two exports of one architecture whatever their node-list order or
names. A stored tensor (initializer, Constant value, tensor attribute, also inside subgraphs) becomes slot k
when the walk first reads it; tensors with equal slot numbers are merged together.

The check is layered and stops at the first level that fails, saying exactly where:
quantization, container, signature, topology, initializers (tying, dtype, shape), values (integer and
shape tensors must be bit-identical).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto

from onnxmerge.errors import BadInputError
from onnxmerge.io import io_signature, is_quantized
from onnxmerge.merging.source import ModelSource

LEVELS = ("quantization", "container", "signature", "topology", "initializers", "values")
# Float inputs that describe shapes, not learned values: merging them would change the graph's geometry.
FLOAT_SHAPE_USES = frozenset({("Resize", 1), ("Resize", 2), ("Upsample", 1)})
BN_STATS_USES = frozenset({("BatchNormalization", 3), ("BatchNormalization", 4)})
_DEFAULT_DOMAINS = ("", "ai.onnx")
# Types that are averaged; every other type (integers, bool, strings, float8) must be bit-identical.
FLOAT_TYPES = frozenset({TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE})

Source = tuple  # ("input", i) | ("node", k, j) | ("tensor", slot) | ("none",) | ("outer", Source)


class IncompatibleModelsError(BadInputError):
    """Two inputs cannot be merged; ``level`` is the first check that failed."""

    def __init__(self, level: str, message: str):
        super().__init__(f"not mergeable ({level} level): {message}")
        self.level = level


@dataclass
class TensorSlot:
    """One stored tensor of one model, at a structural position shared by every compatible model."""

    index: int
    tensor: TensorProto
    where: str  # first reader, for messages: "Conv 'conv1' input 1"
    uses: set = field(default_factory=set)  # (op_type, input index or "attr:name"), through Identity

    @property
    def role(self) -> str:
        """weight (merged), bn_stats (merged, or recomputed by --reset-bn), integer or shape (must match)."""
        if not _is_float(self.tensor.data_type):
            return "integer"
        if self.uses & FLOAT_SHAPE_USES:
            return "shape"
        if self.uses & BN_STATS_USES:
            return "bn_stats"
        return "weight"

    def describe(self) -> str:
        name = f" ('{self.tensor.name}')" if self.tensor.name else ""
        return f"{self.where}{name}"


@dataclass
class NodeRecord:
    op: tuple  # (domain, op_type, number of outputs)
    attributes: tuple  # (name, value) sorted; tensors as ("tensor", slot), graphs as GraphStructure
    inputs: tuple  # Sources
    label: str


@dataclass
class GraphStructure:
    nodes: list[NodeRecord]
    outputs: tuple  # Sources


@dataclass
class ModelStructure:
    """A model's canonical form: what is compared, and the slot list that pairs tensors."""

    graph: GraphStructure
    slots: list[TensorSlot]
    unused: list[TensorProto]  # initializers no node reads; the output keeps the first model's


def _is_float(data_type: int) -> bool:
    return data_type in FLOAT_TYPES


def model_structure(proto: onnx.ModelProto) -> ModelStructure:
    if len(proto.graph.sparse_initializer):
        raise BadInputError("sparse initializers are not supported; densify the model first")
    builder = _StructureBuilder()
    graph = builder.graph(proto.graph, lambda name: None)
    used = {id(slot.tensor) for slot in builder.slots}
    unused = [t for t in _all_initializers(proto.graph) if id(t) not in used]
    return ModelStructure(graph=graph, slots=builder.slots, unused=unused)


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _all_initializers(subgraph)


class _StructureBuilder:
    def __init__(self):
        self.slots: list[TensorSlot] = []
        self._slot_of: dict[int, int] = {}  # id(TensorProto) -> slot index

    def _slot(self, tensor: TensorProto, where: str) -> int:
        index = self._slot_of.get(id(tensor))
        if index is None:
            index = self._slot_of[id(tensor)] = len(self.slots)
            self.slots.append(TensorSlot(index, tensor, where))
        return index

    def graph(self, graph: onnx.GraphProto, outer: Callable[[str], Source | None]) -> GraphStructure:
        initializers = {t.name: t for t in graph.initializer}
        local: dict[str, Source] = {}
        for position, value in enumerate(v for v in graph.input if v.name not in initializers):
            local[value.name] = ("input", position)
        aliases: dict[str, int] = {}  # Identity outputs that are a stored tensor under another name

        def lookup(name: str, where: str = "") -> Source | None:
            if not name:
                return ("none",)
            if name in local:
                return local[name]
            if name in initializers:
                return ("tensor", self._slot(initializers[name], where))
            found = outer(name)
            return None if found is None else ("outer", found)

        records = []
        for position, node in enumerate(_canonical_order(graph)):
            label = _node_label(node)
            inputs = []
            for slot_index, name in enumerate(node.input):
                source = lookup(name, f"{label} input {slot_index}")
                if source is None:
                    raise BadInputError(f"{label} reads '{name}', which nothing in the graph defines")
                inputs.append(source)
                tensor_slot = source[1] if source[0] == "tensor" else aliases.get(name)
                if tensor_slot is not None:
                    self.slots[tensor_slot].uses.add((node.op_type, slot_index))
                    if node.op_type == "Identity":
                        aliases[node.output[0]] = tensor_slot
            attributes = tuple(sorted((a.name, self._attribute(a, node, label, lookup)) for a in node.attribute))
            records.append(NodeRecord((node.domain or "", node.op_type, len(node.output)), attributes,
                                      tuple(inputs), label))
            for output_index, name in enumerate(node.output):
                if name:
                    local[name] = ("node", position, output_index)
        outputs = tuple(lookup(value.name, f"graph output '{value.name}'") for value in graph.output)
        return GraphStructure(records, outputs)

    def _attribute(self, attribute: AttributeProto, node: onnx.NodeProto, label: str, lookup):
        kind = attribute.type
        if kind in (AttributeProto.SPARSE_TENSOR, AttributeProto.SPARSE_TENSORS):
            raise BadInputError(f"{label} has a sparse tensor attribute, which merging does not support")
        if kind == AttributeProto.TENSOR:
            return ("tensor", self._attribute_slot(attribute.t, node, label, attribute.name))
        if kind == AttributeProto.TENSORS:
            return tuple(("tensor", self._attribute_slot(t, node, label, attribute.name)) for t in attribute.tensors)
        if kind == AttributeProto.GRAPH:
            return self.graph(attribute.g, lookup)
        if kind == AttributeProto.GRAPHS:
            return tuple(self.graph(g, lookup) for g in attribute.graphs)
        value = onnx.helper.get_attribute_value(attribute)
        return tuple(value) if isinstance(value, list) else value

    def _attribute_slot(self, tensor: TensorProto, node: onnx.NodeProto, label: str, name: str) -> int:
        index = self._slot(tensor, f"{label} attribute '{name}'")
        self.slots[index].uses.add((node.op_type, f"attr:{name}"))
        return index


def _node_label(node: onnx.NodeProto) -> str:
    op = node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"
    return f"{op} '{node.name}'" if node.name else op


def _subgraphs(node: onnx.NodeProto):
    for attribute in node.attribute:
        if attribute.HasField("g"):
            yield attribute.g
        yield from attribute.graphs


def _outer_names(graph: onnx.GraphProto) -> list[str]:
    """Names a subgraph reads from enclosing scopes, in reading order (implicit inputs of its node)."""
    defined = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    names: list[str] = []
    for node in graph.node:
        reads = list(node.input) + [n for sub in _subgraphs(node) for n in _outer_names(sub)]
        names += [n for n in reads if n and n not in defined and n not in names]
        defined.update(node.output)
    return names


def _canonical_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Post-order DFS from the graph outputs, inputs in slot order; unreachable nodes follow in list order."""
    producer = {name: node for node in graph.node for name in node.output if name}

    def dependencies(node: onnx.NodeProto):
        implicit = [n for sub in _subgraphs(node) for n in _outer_names(sub)]
        return [producer[n] for n in list(node.input) + implicit if n in producer]

    order, seen = [], set()
    roots = [producer[v.name] for v in graph.output if v.name in producer] + list(graph.node)
    for root in roots:
        if id(root) in seen:
            continue
        seen.add(id(root))
        stack = [(root, iter(dependencies(root)))]
        while stack:
            node, pending = stack[-1]
            for dependency in pending:
                if id(dependency) not in seen:
                    seen.add(id(dependency))
                    stack.append((dependency, iter(dependencies(dependency))))
                    break
            else:
                stack.pop()
                order.append(node)
    return order


# ---------------------------------------------------------------------------------------------- comparison

@dataclass
class Compatibility:
    """What the check established: every input's structure, pairing notes and warnings."""

    structures: list[ModelStructure]
    labels: list[str]
    warnings: list[str] = field(default_factory=list)
    renamed: int = 0

    def to_dict(self) -> dict:
        reference = self.structures[0]
        return {"models": self.labels, "compatible": True, "levels_passed": list(LEVELS),
                "nodes": _count_nodes(reference.graph), "tensors": len(reference.slots),
                "roles": dict(Counter(slot.role for slot in reference.slots)),
                "unused_initializers": len(reference.unused), "renamed_tensors": self.renamed,
                "warnings": self.warnings}


def _count_nodes(graph: GraphStructure) -> int:
    total = len(graph.nodes)
    for record in graph.nodes:
        for _, value in record.attributes:
            for sub in (value if isinstance(value, tuple) else (value,)):
                if isinstance(sub, GraphStructure):
                    total += _count_nodes(sub)
    return total


def check_sources(sources: list[ModelSource]) -> Compatibility:
    """Compare every input with the first; raise IncompatibleModelsError at the first level that fails."""
    for source in sources:
        if is_quantized(source.proto):
            raise IncompatibleModelsError(
                "quantization", f"{source.label} is quantized (QuantizeLinear/DequantizeLinear or QLinear*/"
                "*Integer ops); averaging quantized weights and scales is not supported: merge the float models "
                "and quantize the result")
    reference = sources[0]
    result = Compatibility(structures=[], labels=[s.label for s in sources])
    for source in sources[1:]:
        _check_container(reference, source, result.warnings)
        _check_signature(reference, source, result.warnings)
    structures = [model_structure(source.proto) for source in sources]
    result.structures = structures
    for source, structure in zip(sources[1:], structures[1:]):
        difference = _topology_difference(structures[0].graph, structure.graph, reference.label, source.label)
        if difference:
            raise IncompatibleModelsError("topology", difference)
    for source, structure in zip(sources[1:], structures[1:]):
        _check_initializers(structures[0], structure, reference.label, source.label)
    for source, structure in zip(sources[1:], structures[1:]):
        _check_values(reference, structures[0], source, structure)
        result.renamed += sum(a.tensor.name != b.tensor.name for a, b in zip(structures[0].slots, structure.slots))
    if result.renamed:
        result.warnings.append(f"{result.renamed} paired tensor(s) have different names; they were paired by "
                               "their position in the graph")
    return result


def _opsets(proto: onnx.ModelProto) -> dict[str, int]:
    return {("" if o.domain in _DEFAULT_DOMAINS else o.domain): o.version for o in proto.opset_import}


def _check_container(a: ModelSource, b: ModelSource, warnings: list[str]) -> None:
    if a.proto.ir_version != b.proto.ir_version:
        raise IncompatibleModelsError("container", f"IR version {a.proto.ir_version} in {a.label} but "
                                                   f"{b.proto.ir_version} in {b.label}")
    opsets_a, opsets_b = _opsets(a.proto), _opsets(b.proto)
    if opsets_a != opsets_b:
        raise IncompatibleModelsError("container", f"opset imports {_format_opsets(opsets_a)} in {a.label} but "
                                                   f"{_format_opsets(opsets_b)} in {b.label}")
    producer_a = (a.proto.producer_name, a.proto.producer_version)
    producer_b = (b.proto.producer_name, b.proto.producer_version)
    if producer_a != producer_b:
        warnings.append(f"{b.label} was produced by {' '.join(producer_b)}, {a.label} by {' '.join(producer_a)}")


def _format_opsets(opsets: dict[str, int]) -> str:
    return "{" + ", ".join(f"{domain or 'ai.onnx'}: {version}" for domain, version in sorted(opsets.items())) + "}"


def _check_signature(a: ModelSource, b: ModelSource, warnings: list[str]) -> None:
    signature_a, signature_b = io_signature(a.proto), io_signature(b.proto)
    for kind in ("inputs", "outputs"):
        values_a, values_b = signature_a[kind], signature_b[kind]
        if len(values_a) != len(values_b):
            raise IncompatibleModelsError("signature", f"{len(values_a)} graph {kind} in {a.label} but "
                                                       f"{len(values_b)} in {b.label}")
        for position, ((name_a, type_a, dims_a), (name_b, type_b, dims_b)) in enumerate(zip(values_a, values_b)):
            if type_a != type_b or _fixed_dims(dims_a) != _fixed_dims(dims_b):
                raise IncompatibleModelsError(
                    "signature", f"graph {kind[:-1]} {position}: {_format_value(name_a, type_a, dims_a)} in "
                                 f"{a.label} but {_format_value(name_b, type_b, dims_b)} in {b.label}")
            if name_a != name_b:
                warnings.append(f"graph {kind[:-1]} {position} is '{name_a}' in {a.label}, '{name_b}' in {b.label}; "
                                "the output keeps the first model's names")


def _fixed_dims(dims):
    return None if dims is None else tuple(d if isinstance(d, int) and d > 0 else "?" for d in dims)


def _format_value(name: str, elem_type: int, dims) -> str:
    type_name = onnx.helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else "?"
    shape = "" if dims is None else "[" + ",".join(str(d) if d is not None else "?" for d in dims) + "]"
    return f"'{name}' {type_name}{shape}"


def _masked(source: Source) -> Source:
    """A source with tensor identities hidden: tying is checked at the initializers level, after topology."""
    if source[0] == "tensor":
        return ("tensor",)
    if source[0] == "outer":
        return ("outer", _masked(source[1]))
    return source


def _masked_value(value):
    if isinstance(value, GraphStructure):
        return "<graph>"  # compared node by node by the caller
    if isinstance(value, tuple) and value and value[0] == "tensor":
        return ("tensor",)
    if isinstance(value, tuple):
        return tuple(_masked_value(v) for v in value)
    return value


def _describe_source(source: Source, graph: GraphStructure) -> str:
    kind = source[0]
    if kind == "input":
        return f"graph input {source[1]}"
    if kind == "node":
        return f"output {source[2]} of node {source[1]} ({graph.nodes[source[1]].label})"
    if kind == "tensor":
        return "a stored tensor"
    if kind == "none":
        return "nothing (input omitted)"
    return "an enclosing graph"


def _topology_difference(a: GraphStructure, b: GraphStructure, label_a: str, label_b: str,
                         context: str = "") -> str | None:
    prefix = f"{context}: " if context else ""
    counts = "" if len(a.nodes) == len(b.nodes) else (
        f"{label_b} has {len(b.nodes)} nodes, {label_a} has {len(a.nodes)}; ")
    for position, (node_a, node_b) in enumerate(zip(a.nodes, b.nodes)):
        where = f"{prefix}{counts}node {position}"
        if node_a.op[:2] != node_b.op[:2]:
            return f"{where} is {node_a.label} in {label_a} but {node_b.label} in {label_b}"
        if node_a.op != node_b.op:
            return (f"{where} ({node_a.label}) has {node_a.op[2]} output(s) in {label_a} but {node_b.op[2]} in "
                    f"{label_b}")
        names_a = [name for name, _ in node_a.attributes]
        names_b = [name for name, _ in node_b.attributes]
        if names_a != names_b:
            return (f"{where} ({node_a.label}) has attributes {names_a} in {label_a} but {names_b} in {label_b}")
        for (name, value_a), (_, value_b) in zip(node_a.attributes, node_b.attributes):
            if _masked_value(value_a) != _masked_value(value_b):
                return (f"{where} ({node_a.label}): attribute {name} = {_show(value_a)} in {label_a} but "
                        f"{_show(value_b)} in {label_b}")
            graphs_a, graphs_b = _graphs_in(value_a), _graphs_in(value_b)
            for index, (sub_a, sub_b) in enumerate(zip(graphs_a, graphs_b)):
                inner = _topology_difference(sub_a, sub_b, label_a, label_b,
                                             f"{prefix}subgraph {name}[{index}] of node {position} ({node_a.label})")
                if inner:
                    return inner
        if len(node_a.inputs) != len(node_b.inputs):
            return (f"{where} ({node_a.label}) has {len(node_a.inputs)} inputs in {label_a} but "
                    f"{len(node_b.inputs)} in {label_b}")
        for slot, (source_a, source_b) in enumerate(zip(node_a.inputs, node_b.inputs)):
            if _masked(source_a) != _masked(source_b):
                return (f"{where} ({node_a.label}) input {slot} reads {_describe_source(source_a, a)} in {label_a} "
                        f"but {_describe_source(source_b, b)} in {label_b}")
    if counts:
        extra, longer, label = (b, b.nodes[len(a.nodes)], label_b) if len(b.nodes) > len(a.nodes) else (
            a, a.nodes[len(b.nodes)], label_a)
        return f"{prefix}{counts}the extra node is {longer.label} in {label}"
    outputs_a, outputs_b = tuple(map(_masked, a.outputs)), tuple(map(_masked, b.outputs))
    if outputs_a != outputs_b:
        return f"{prefix}graph outputs come from different places in {label_a} and {label_b}"
    return None


def _graphs_in(value) -> list[GraphStructure]:
    if isinstance(value, GraphStructure):
        return [value]
    if isinstance(value, tuple):
        return [v for v in value if isinstance(v, GraphStructure)]
    return []


def _show(value) -> str:
    masked = _masked_value(value)
    return masked.decode(errors="replace") if isinstance(masked, bytes) else repr(masked)


def _check_initializers(a: ModelStructure, b: ModelStructure, label_a: str, label_b: str) -> None:
    tying = _tying_difference(a.graph, b.graph, a, b, label_a, label_b)
    if tying:
        raise IncompatibleModelsError("initializers", tying)
    for slot_a, slot_b in zip(a.slots, b.slots):
        tensor_a, tensor_b = slot_a.tensor, slot_b.tensor
        if tensor_a.data_type != tensor_b.data_type:
            raise IncompatibleModelsError(
                "initializers", f"{slot_a.describe()} is {_dtype_name(tensor_a)} in {label_a} but "
                                f"{_dtype_name(tensor_b)} in {label_b}{_renamed(slot_b, slot_a)}")
        if list(tensor_a.dims) != list(tensor_b.dims):
            raise IncompatibleModelsError(
                "initializers", f"{slot_a.describe()} has shape {tuple(tensor_a.dims)} in {label_a} but "
                                f"{tuple(tensor_b.dims)} in {label_b}{_renamed(slot_b, slot_a)}")


def _renamed(slot: TensorSlot, reference: TensorSlot) -> str:
    return f" (named '{slot.tensor.name}' there)" if slot.tensor.name != reference.tensor.name else ""


def _dtype_name(tensor: TensorProto) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name


def _tying_difference(a: GraphStructure, b: GraphStructure, model_a: ModelStructure, model_b: ModelStructure,
                      label_a: str, label_b: str) -> str | None:
    """Where one model reads a shared tensor and the other a separate one (or the reverse)."""
    for position, (node_a, node_b) in enumerate(zip(a.nodes, b.nodes)):
        for slot, (source_a, source_b) in enumerate(zip(node_a.inputs, node_b.inputs)):
            while source_a[0] == "outer":
                source_a, source_b = source_a[1], source_b[1]
            if source_a[0] == "tensor" and source_a != source_b:
                first_a, first_b = model_a.slots[source_a[1]], model_b.slots[source_b[1]]
                return (f"node {position} ({node_a.label}) input {slot} reads the tensor first read by "
                        f"{first_a.describe()} in {label_a}, but the one first read by {first_b.describe()} in "
                        f"{label_b}: the models tie (share) their tensors differently")
        for (_, value_a), (_, value_b) in zip(node_a.attributes, node_b.attributes):
            for sub_a, sub_b in zip(_graphs_in(value_a), _graphs_in(value_b)):
                inner = _tying_difference(sub_a, sub_b, model_a, model_b, label_a, label_b)
                if inner:
                    return inner
    return None


def _check_values(a: ModelSource, structure_a: ModelStructure, b: ModelSource, structure_b: ModelStructure) -> None:
    for slot_a, slot_b in zip(structure_a.slots, structure_b.slots):
        if slot_a.role not in ("integer", "shape"):
            continue
        value_a, value_b = a.read(slot_a.tensor), b.read(slot_b.tensor)
        if value_a.tobytes() != value_b.tobytes():
            raise IncompatibleModelsError(
                "values", f"{slot_a.describe()} holds {slot_a.role} data and must be identical, but it is "
                          f"{_preview(value_a)} in {a.label} and {_preview(value_b)} in {b.label}"
                          f"{_renamed(slot_b, slot_a)}")


def _preview(value: np.ndarray) -> str:
    flat = value.ravel()
    text = np.array2string(flat[:8], separator=",")
    return text[:-1] + ",...]" if flat.size > 8 else text
