"""Remove ``Unsqueeze`` → ``Squeeze`` and ``Squeeze`` → ``Unsqueeze`` pairs on the same axes."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxmerge.graph import bypass, check_bypass, detach, ints_param, known_dims, producer, sole_consumer
from onnxmerge.pass_framework import SHAPES, NodeRewritePass, PassContext, Refused, register_pass

_INVERSE = {"Squeeze": "Unsqueeze", "Unsqueeze": "Squeeze"}


@register_pass
class EliminateUnsqueezeSqueeze(NodeRewritePass):
    name = "eliminate_unsqueeze_squeeze"
    description = "Remove Unsqueeze->Squeeze and Squeeze->Unsqueeze pairs that insert and drop the same axes."
    preserves_shapes = True
    op_types = ("Squeeze", "Unsqueeze")
    requires = frozenset({SHAPES})  # ranks, for negative axes and Squeeze without axes

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        inner = producer(node.inputs[0])
        if inner is None or inner.op != _INVERSE[node.op]:
            raise Refused(f"its input is not produced by an {_INVERSE[node.op]}")
        source, middle, out = inner.inputs[0], inner.outputs[0], node.outputs[0]
        # Unsqueeze axes index its output and Squeeze axes its input: in either order both index the wider
        # tensor (``middle`` for Unsqueeze->Squeeze, ``source``, of the output's rank, for Squeeze->Unsqueeze).
        wide = middle if node.op == "Squeeze" else source
        found = {}
        for owner in (inner, node):
            try:
                found[owner.op] = _axes(owner, wide)
            except Refused as refused:
                raise refused.within(f"{owner.op} '{owner.name}'", [node.name, inner.name]) from None
        inserted, dropped = found["Unsqueeze"], found["Squeeze"]
        if inserted != dropped:
            raise Refused(f"Unsqueeze axes {sorted(inserted)} differ from Squeeze axes {sorted(dropped)}",
                          [node.name, inner.name])
        check_bypass(graph, source, out)
        if sole_consumer(graph, middle) is node:
            detach(inner)
        bypass(graph, node, source, out)


def _axes(node: gs.Node, shaped: gs.Tensor) -> frozenset[int]:
    """The node's axes as non-negative positions in ``shaped`` (the tensor whose rank they refer to); raises
    :class:`Refused` (naming the node) when they are not known."""
    def refuse(reason: str) -> Refused:
        return Refused(reason, [node.name])

    axes = ints_param(node, "axes", 1)  # attribute before opset 13, input from 13
    dims = known_dims(shaped)
    if axes is None:
        if node.op == "Unsqueeze":
            raise refuse("it has no axes")
        # Squeeze without axes drops every size-1 dim: which ones those are needs the static shape.
        if dims is None or any(d is None for d in dims):
            raise refuse("it has no axes and its input shape is not static")
        return frozenset(i for i, d in enumerate(dims) if d == 1)
    if any(a < 0 for a in axes):
        if dims is None:
            raise refuse(f"negative axes {axes} and the rank is unknown")
        axes = [a + len(dims) if a < 0 else a for a in axes]
    if len(set(axes)) != len(axes):
        raise refuse(f"repeated axes {axes}")
    return frozenset(axes)
