"""Remove ``Expand`` nodes whose output has their input's shape (nothing is broadcast)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.graph import constant_value, known_dims, static_shape
from onnxmerge.pass_framework import NoopRemovalPass, Refused, register_pass


@register_pass
class EliminateNoopExpand(NoopRemovalPass):
    name = "eliminate_noop_expand"
    description = "Remove Expands whose output shape equals their input shape."
    op_types = ("Expand",)

    def check_noop(self, node: gs.Node) -> None:
        check_noop(node)


def check_noop(node: gs.Node) -> None:
    """Raise :class:`Refused` (naming the node) unless the Expand provably broadcasts nothing."""
    def refuse(reason: str) -> Refused:
        return Refused(reason, [node.name])

    data = node.inputs[0]
    before, after = static_shape(data), static_shape(node.outputs[0])
    if before is not None and after is not None:
        if before != after:
            raise refuse(f"it broadcasts {before} to {after}")
        return
    # Dynamic dims: a constant target shape of 1s and the input's own static dims broadcasts nothing.
    spec = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    dims = known_dims(data)
    if spec is None:
        raise refuse("output shape unknown and its target shape is not a constant")
    if dims is None:
        raise refuse("input rank unknown")
    spec = [int(v) for v in np.asarray(spec).ravel()]
    if len(spec) > len(dims):
        raise refuse(f"it raises the rank {len(dims)} -> {len(spec)}")
    offset = len(dims) - len(spec)
    for index, wanted in enumerate(spec):
        dim = dims[offset + index]
        if wanted == 1 or wanted == dim:
            continue
        if dim is None:
            raise refuse(f"input dimension {offset + index} is not static and the target shape has {wanted} there")
        raise refuse(f"it broadcasts dimension {offset + index} from {dim} to {wanted}")
