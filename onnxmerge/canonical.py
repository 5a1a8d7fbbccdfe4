"""Exporter quirks undone once, right after loading, so every later stage sees one canonical model.

Real exporters disagree on small things that each pass would otherwise have to know about:

* **Dynamic dims written as numbers.** paddle2onnx and some TF converters store a dynamic dim as
  ``dim_value: -1`` or ``0``. ORT reads ``-1`` as dynamic but ``0`` as a real size zero, and ONNX shape
  inference propagates both as if they were sizes. Canonical form: such a dim of a graph input or output
  becomes a symbol (``<input>_dim<axis>``); value_info entries with such dims are dropped (inference
  recomputes them).
* **Initializers also listed as graph inputs** (IR < 4 required it). ORT treats them as overridable
  inputs, so it folds nothing through them. Canonical form: they are initializers only (IR raised to 4
  where needed, never lowered); the user-visible signature (inputs that are not initializers) is unchanged.
* **Pinned input shapes** (``overwrite_input_shapes``, onnxsim's ``--overwrite-input-shape``): the user
  fixes dims of the declared inputs, so shape arithmetic that reads them can fold. Without it, dynamic dims
  stay dynamic and only what is constant for every value of them folds.

* **Unnamed or repeated node names** (common in hand-edited and converted graphs): every node gets a
  unique name, so reports, refusals and compress plans can key nodes by name.

Weights stored in ``Constant`` nodes and ``Identity`` chains are handled by the passes
``constant_to_initializer`` and ``eliminate_identity``; this module only touches declarations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from onnxmerge.errors import BadInputError

# IR version from which initializers need not be listed as graph inputs.
_IR_INITIALIZERS_NOT_INPUTS = 4


@dataclass
class Canonicalization:
    """The canonical model, a human-readable note for every change made to its declarations, and how many
    nodes were (re)named."""

    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)
    renamed_nodes: int = 0

    @property
    def changed(self) -> bool:
        """Whether ORT could see a difference (declarations); node names alone change nothing it computes."""
        return bool(self.notes)


def canonicalize(proto: onnx.ModelProto,
                 overwrite_input_shapes: Mapping[str | None, Sequence[int]] | None = None, *,
                 in_place: bool = False) -> Canonicalization:
    """A canonical copy of ``proto`` (the argument is not modified) and notes on what changed.

    ``in_place=True`` canonicalizes ``proto`` itself, for callers that own it (a model they loaded from a
    file): only declarations change, and copying would copy every weight held in memory.
    """
    if in_place:
        model = proto
    else:
        model = onnx.ModelProto()
        model.CopyFrom(proto)
    notes: list[str] = []
    notes += _drop_initializers_from_inputs(model)
    notes += _symbolic_numeric_dims(model)
    if overwrite_input_shapes:
        notes += _overwrite_input_shapes(model, overwrite_input_shapes)
    return Canonicalization(model, notes, renamed_nodes=_unique_node_names(model.graph))


def _unique_node_names(graph: onnx.GraphProto) -> int:
    """Give every node of the main graph a name, unique in the graph: unnamed nodes become ``<op>_<index>``
    and later duplicates get a ``_<k>`` suffix. Reports, refusals and plans key nodes by name, and exporters
    leave names empty or repeat them. Returns how many nodes were (re)named; named, unique nodes keep theirs."""
    taken = {node.name for node in graph.node if node.name}
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{index}"
        candidate, k = base, 0
        while candidate in taken or candidate in seen:
            k += 1
            candidate = f"{base}_{k}"
        node.name = candidate
        seen.add(candidate)
        taken.add(candidate)
        renamed += 1
    return renamed


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds (initializers listed as inputs by old exporters excluded)."""
    initializer_names = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializer_names]


def is_dynamic_dim(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """A dim no value is promised for: symbolic, absent, or written as -1 / 0 by an exporter."""
    return not dim.HasField("dim_value") or dim.dim_value <= 0


def _drop_initializers_from_inputs(model: onnx.ModelProto) -> list[str]:
    initializer_names = {t.name for t in model.graph.initializer}
    listed = [v.name for v in model.graph.input if v.name in initializer_names]
    if not listed:
        return []
    kept = [v for v in model.graph.input if v.name not in initializer_names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    notes = [f"{len(listed)} initializer(s) were also listed as graph inputs (old IR): made initializers only, "
             "so ORT can fold through them"]
    if model.ir_version < _IR_INITIALIZERS_NOT_INPUTS:
        notes.append(f"IR version raised from {model.ir_version} to {_IR_INITIALIZERS_NOT_INPUTS} "
                     "(initializers need not be inputs from IR 4 on)")
        model.ir_version = _IR_INITIALIZERS_NOT_INPUTS
    return notes


def _symbolic_numeric_dims(model: onnx.ModelProto) -> list[str]:
    notes = []
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            if not value.type.tensor_type.HasField("shape"):
                continue
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                if dim.HasField("dim_value") and dim.dim_value <= 0:
                    written = dim.dim_value
                    symbol = f"{value.name}_dim{axis}"
                    dim.Clear()
                    dim.dim_param = symbol
                    notes.append(f"{kind} '{value.name}' dim {axis} is written as {written}: treated as dynamic "
                                 f"(declared as '{symbol}')")
    stale = [v for v in model.graph.value_info if any(
        d.HasField("dim_value") and d.dim_value <= 0 for d in v.type.tensor_type.shape.dim)]
    for value in stale:
        model.graph.value_info.remove(value)
    return notes


def _overwrite_input_shapes(model: onnx.ModelProto, shapes: Mapping[str | None, Sequence[int]]) -> list[str]:
    inputs = graph_inputs(model)
    shapes = dict(shapes)
    if None in shapes:
        if len(inputs) != 1:
            raise BadInputError("an input shape without a name needs a single-input model; use name:dims")
        shapes[inputs[0].name] = shapes.pop(None)
    by_name = {v.name: v for v in inputs}
    unknown = sorted(set(shapes) - set(by_name))
    if unknown:
        raise BadInputError(f"overwrite_input_shapes names unknown input(s) {unknown}; "
                            f"model inputs: {sorted(by_name)}")
    notes = []
    for name, shape in shapes.items():
        dims = by_name[name].type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise BadInputError(f"overwrite_input_shapes for '{name}' has rank {len(shape)}, "
                                f"the model declares rank {len(dims)}")
        for axis, (dim, size) in enumerate(zip(dims, shape)):
            if int(size) <= 0:
                raise BadInputError(f"overwrite_input_shapes for '{name}': dims must be positive integers")
            if not is_dynamic_dim(dim):
                if dim.dim_value != size:
                    raise BadInputError(f"overwrite_input_shapes for '{name}' sets dim {axis} to {size}, "
                                        f"the model fixes it to {dim.dim_value}")
                continue
            was = dim.dim_param or "unnamed"
            dim.Clear()
            dim.dim_value = int(size)
            notes.append(f"input '{name}' dim {axis} ({was}) fixed to {size} by overwrite_input_shapes")
    # Shapes recorded for the old dims are stale now; inference recomputes them.
    del model.graph.value_info[:]
    return notes
