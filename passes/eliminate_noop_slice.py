"""Remove ``Slice`` nodes that keep every element: start 0, step 1, end at or past the end of each axis."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxmerge.graph import ints_param, known_dims, static_shape
from onnxmerge.pass_framework import NoopRemovalPass, Refused, register_pass

# An end this large slices to the end of an axis of any size an exporter can mean (they write INT_MAX or
# INT64_MAX for "to the end" when the size is dynamic).
_TO_THE_END = 2**31 - 1


@register_pass
class EliminateNoopSlice(NoopRemovalPass):
    name = "eliminate_noop_slice"
    description = "Remove Slices with step 1 that start at 0 and end at or past the end of every sliced axis."
    op_types = ("Slice",)

    def check_noop(self, node: gs.Node) -> None:
        check_noop(node)


def check_noop(node: gs.Node) -> None:
    """Raise :class:`Refused` (naming the node) unless the Slice copies its whole input."""
    def refuse(reason: str) -> Refused:
        return Refused(reason, [node.name])

    data = node.inputs[0]
    # Opset < 10: starts/ends/axes attributes and no steps; from 10 on: inputs 1-4.
    starts, ends, axes, steps = [ints_param(node, attr, index) for attr, index in
                                 (("starts", 1), ("ends", 2), ("axes", 3), ("steps", 4))]
    if starts is None or ends is None:
        raise refuse("its starts or ends are missing")
    steps = steps if steps is not None else [1] * len(starts)
    for step in steps:
        if step < 0:
            raise refuse(f"it has a negative step {step} (it reverses an axis)")
        if step != 1:
            raise refuse(f"it has step {step}, not 1")
    before, after = static_shape(data), static_shape(node.outputs[0])
    if before is not None and after is not None and before != after:
        raise refuse(f"it changes the shape {before} -> {after}")
    dims = known_dims(data)
    if dims is None:
        raise refuse("input rank unknown")
    axes = axes if axes is not None else list(range(len(starts)))
    if not len(axes) == len(starts) == len(ends) == len(steps):
        raise refuse("its starts, ends, axes and steps differ in length")
    for axis, start, end in zip(axes, starts, ends):
        if not -len(dims) <= axis < len(dims):
            raise refuse(f"axis {axis} is out of range")
        dim = dims[axis % len(dims)]
        if start != 0 and not (dim is not None and start <= -dim):
            raise refuse(f"it starts at {start} on axis {axis}, not 0")
        if dim is None and end < _TO_THE_END:
            raise refuse(f"it ends at {end} on axis {axis}, whose size is not static")
        if dim is not None and end < dim:
            raise refuse(f"it ends at {end} on axis {axis} of size {dim}")
