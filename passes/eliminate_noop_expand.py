"""Remove ``Expand`` nodes whose output has their input's shape (nothing is broadcast)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.graph import bypass, constant_value, known_dims, static_shape
from onnxmerge.pass_framework import SHAPES, NodeRewritePass, PassContext, register_pass


@register_pass
class EliminateNoopExpand(NodeRewritePass):
    name = "eliminate_noop_expand"
    description = "Remove Expands whose output shape equals their input shape."
    preserves_shapes = True
    op_types = ("Expand",)
    requires = frozenset({SHAPES})

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> str | None:
        reason = noop_refusal(node)
        if reason is not None:
            return reason
        return bypass(graph, node, node.inputs[0], node.outputs[0])


def noop_refusal(node: gs.Node) -> str | None:
    data = node.inputs[0]
    before, after = static_shape(data), static_shape(node.outputs[0])
    if before is not None and after is not None:
        return None if before == after else f"it broadcasts {before} to {after}"
    # Dynamic dims: a constant target shape of 1s and the input's own static dims broadcasts nothing.
    spec = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    dims = known_dims(data)
    if spec is None:
        return "output shape unknown and its target shape is not a constant"
    if dims is None:
        return "input rank unknown"
    spec = [int(v) for v in np.asarray(spec).ravel()]
    if len(spec) > len(dims):
        return f"it raises the rank {len(dims)} -> {len(spec)}"
    offset = len(dims) - len(spec)
    for index, wanted in enumerate(spec):
        dim = dims[offset + index]
        if wanted == 1 or wanted == dim:
            continue
        if dim is None:
            return f"input dimension {offset + index} is not static and the target shape has {wanted} there"
        return f"it broadcasts dimension {offset + index} from {dim} to {wanted}"
    return None
