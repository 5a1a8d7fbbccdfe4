"""Remove ``Unsqueeze`` → ``Squeeze`` and ``Squeeze`` → ``Unsqueeze`` pairs on the same axes."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxmerge.graph import bypass, bypass_refusal, detach, ints_param, known_dims, producer, sole_consumer
from onnxmerge.pass_framework import SHAPES, NodeRewritePass, PassContext, register_pass

_INVERSE = {"Squeeze": "Unsqueeze", "Unsqueeze": "Squeeze"}


@register_pass
class EliminateUnsqueezeSqueeze(NodeRewritePass):
    name = "eliminate_unsqueeze_squeeze"
    description = "Remove Unsqueeze->Squeeze and Squeeze->Unsqueeze pairs that insert and drop the same axes."
    preserves_shapes = True
    op_types = ("Squeeze", "Unsqueeze")
    requires = frozenset({SHAPES})  # ranks, for negative axes and Squeeze without axes

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> str | None:
        inner = producer(node.inputs[0])
        if inner is None or inner.op != _INVERSE[node.op]:
            return f"its input is not produced by an {_INVERSE[node.op]}"
        source, middle, out = inner.inputs[0], inner.outputs[0], node.outputs[0]
        # Unsqueeze axes index its output and Squeeze axes its input: in either order both index the wider
        # tensor (``middle`` for Unsqueeze->Squeeze, ``source``, of the output's rank, for Squeeze->Unsqueeze).
        wide = middle if node.op == "Squeeze" else source
        found = {}
        for owner in (inner, node):
            axes = _axes(owner, wide)
            if isinstance(axes, str):
                return f"{owner.op} '{owner.name}': {axes}"
            found[owner.op] = axes
        inserted, dropped = found["Unsqueeze"], found["Squeeze"]
        if inserted != dropped:
            return f"Unsqueeze axes {sorted(inserted)} differ from Squeeze axes {sorted(dropped)}"
        reason = bypass_refusal(graph, source, out)
        if reason is not None:
            return reason
        if sole_consumer(graph, middle) is node:
            detach(inner)
        return bypass(graph, node, source, out)


def _axes(node: gs.Node, shaped: gs.Tensor) -> frozenset[int] | str:
    """The node's axes as non-negative positions in ``shaped`` (the tensor whose rank they refer to)."""
    axes = ints_param(node, "axes", 1)  # attribute before opset 13, input from 13
    if isinstance(axes, str):
        return axes
    dims = known_dims(shaped)
    if axes is None:
        if node.op == "Unsqueeze":
            return "it has no axes"
        # Squeeze without axes drops every size-1 dim: which ones those are needs the static shape.
        if dims is None or any(d is None for d in dims):
            return "it has no axes and its input shape is not static"
        return frozenset(i for i, d in enumerate(dims) if d == 1)
    if any(a < 0 for a in axes):
        if dims is None:
            return f"negative axes {axes} and the rank is unknown"
        axes = [a + len(dims) if a < 0 else a for a in axes]
    if len(set(axes)) != len(axes):
        return f"repeated axes {axes}"
    return frozenset(axes)
