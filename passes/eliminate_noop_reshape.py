"""Remove ``Reshape`` nodes that keep their input's shape, and merge Reshape-of-Reshape chains into one."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.graph import (add_constant, bypass, constant_value, detach, known_dims, producer, sole_consumer,
                             static_shape)
from onnxmerge.pass_framework import SHAPES, NodeRewritePass, PassContext, Refused, register_pass


@register_pass
class EliminateNoopReshape(NodeRewritePass):
    name = "eliminate_noop_reshape"
    description = "Remove Reshapes that keep their input's shape; merge Reshape(Reshape(x)) into one Reshape."
    preserves_shapes = True
    op_types = ("Reshape",)
    requires = frozenset({SHAPES})

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        data, out = node.inputs[0], node.outputs[0]
        try:
            check_noop(node)
        except Refused as noop:
            try:
                _merge_chain(graph, node)
            except Refused as chain:
                raise Refused(f"{noop.reason}; {chain.reason}", [*noop.nodes, *chain.nodes]) from None
            # The merged Reshape may now read a tensor of its own output shape.
            _bypass_if_noop(graph, node)
            return
        bypass(graph, node, data, out)


def _bypass_if_noop(graph: gs.Graph, node: gs.Node) -> None:
    """After a merge (which stands either way): remove the Reshape too if it now keeps its input's shape."""
    try:
        check_noop(node)
        bypass(graph, node, node.inputs[0], node.outputs[0])
    except Refused:
        pass


def check_noop(node: gs.Node) -> None:
    """Raise :class:`Refused` (naming the node) unless the Reshape's output always has its input's shape."""
    def refuse(reason: str) -> Refused:
        return Refused(reason, [node.name])

    data, out = node.inputs[0], node.outputs[0]
    before, after = static_shape(data), static_shape(out)
    if before is not None and after is not None:
        if before != after:
            raise refuse(f"it changes the shape {before} -> {after}")
        return
    # Dynamic dims (a symbolic batch): the target shape may still provably copy every dim.
    spec = _target_shape(node)
    dims = known_dims(data)
    if spec is None:
        raise refuse("output shape unknown and its target shape is not a constant")
    if dims is None:
        raise refuse("input rank unknown")
    if len(spec) != len(dims):
        raise refuse(f"it changes the rank {len(dims)} -> {len(spec)}")
    copies_zero = not node.attrs.get("allowzero", 0)
    inferred_axis = None
    for axis, (wanted, dim) in enumerate(zip(spec, dims)):
        if wanted == 0 and copies_zero:
            continue
        if wanted == -1:
            inferred_axis = axis
        elif dim is None:
            raise refuse(f"input dimension {axis} is not static and the target shape sets it to {wanted}")
        elif wanted != dim:
            raise refuse(f"it changes dimension {axis} from {dim} to {wanted}")
    if inferred_axis is not None:
        others = [d for axis, d in enumerate(dims) if axis != inferred_axis]
        if any(d is None or d == 0 for d in others):
            raise refuse(f"its -1 entry (axis {inferred_axis}) is not provably the input's dimension: other dims "
                         "not static")


def _target_shape(node: gs.Node) -> list[int] | None:
    if "shape" in node.attrs:  # opset < 5
        return [int(v) for v in node.attrs["shape"]]
    value = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if value is None else [int(v) for v in np.asarray(value).ravel()]


def _merge_chain(graph: gs.Graph, node: gs.Node) -> None:
    """Make ``node`` reshape the inner Reshape's input directly, or raise :class:`Refused` saying why not."""
    inner = producer(node.inputs[0])
    if inner is None or inner.op != "Reshape":
        raise Refused("its input is not produced by a Reshape")
    chained = [node.name, inner.name]
    if sole_consumer(graph, inner.outputs[0]) is not node:
        raise Refused(f"the inner Reshape '{inner.name}' has other consumers or is a graph output", chained)
    if len(node.inputs) < 2 or len(inner.inputs) < 2:
        raise Refused("Reshape chains with a shape attribute (opset < 5) are not merged", chained)
    shape_tensor = node.inputs[1]
    if not node.attrs.get("allowzero", 0):
        spec = constant_value(shape_tensor)
        if spec is None:
            raise Refused("its target shape is not a constant, so its 0 entries (which copy dims of the inner "
                          "Reshape's output) cannot be resolved", chained)
        spec = np.asarray(spec, dtype=np.int64).ravel()
        resolved = _resolve_copies(inner, spec)
        if not np.array_equal(resolved, spec):
            shape_tensor = add_constant(graph, f"{node.name or 'reshape'}.shape", resolved)
    node.inputs[0] = inner.inputs[0]
    node.inputs[1] = shape_tensor
    detach(inner)


def _resolve_copies(inner: gs.Node, spec: np.ndarray) -> np.ndarray:
    """The outer target with its 0 entries (copies of the inner output's dims) valid against the inner input.

    A 0 at axis i becomes the inner output's dim i when that is static; stays 0 when the inner target also
    copies axis i (then the inner output's dim i is the inner input's dim i); or, for a single 0 left in a
    target without -1 whose other entries are known and positive, becomes -1 (the one size that fits).
    Raises :class:`Refused` (naming the inner Reshape) when a 0 entry cannot be resolved.
    """
    inner_dims = known_dims(inner.outputs[0])
    inner_spec = None if inner.attrs.get("allowzero", 0) else _target_shape(inner)
    source_dims = known_dims(inner.inputs[0])
    resolved, unresolved = spec.copy(), []
    for axis in np.flatnonzero(spec == 0):
        dim = inner_dims[axis] if inner_dims is not None and axis < len(inner_dims) else None
        if dim == 0:
            raise Refused(f"its target shape copies a zero-sized dimension {axis} of the inner Reshape's output",
                          [inner.name])
        if dim is not None:
            resolved[axis] = dim
        elif not (inner_spec is not None and axis < len(inner_spec) and inner_spec[axis] == 0
                  and source_dims is not None and axis < len(source_dims)):
            unresolved.append(int(axis))
    if not unresolved:
        return resolved
    others = np.delete(resolved, unresolved[0])
    if len(unresolved) == 1 and np.all(others > 0):
        resolved[unresolved[0]] = -1
        return resolved
    raise Refused(f"its target shape copies dimension {unresolved[0]} of the inner Reshape's output (0 entry), "
                  "which is not static", [inner.name])
