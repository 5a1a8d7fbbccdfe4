"""Remove identity ``Transpose`` nodes and compose Transpose-of-Transpose chains into one (or none)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxmerge.graph import bypass, check_bypass, detach, known_dims, producer, sole_consumer
from onnxmerge.pass_framework import SHAPES, NodeRewritePass, PassContext, Refused, register_pass


@register_pass
class EliminateNoopTranspose(NodeRewritePass):
    name = "eliminate_noop_transpose"
    description = "Remove identity-permutation Transposes; compose Transpose(Transpose(x)) into one Transpose."
    preserves_shapes = True
    op_types = ("Transpose",)
    requires = frozenset({SHAPES})  # only for the rank, when a Transpose omits perm

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        perm = permutation(node)
        if _is_identity(perm):
            bypass(graph, node, node.inputs[0], node.outputs[0])
            return
        not_identity = f"permutation {perm} is not the identity"
        inner = producer(node.inputs[0])
        if inner is None or inner.op != "Transpose":
            raise Refused(f"{not_identity} and its input is not produced by a Transpose")
        try:
            inner_perm = permutation(inner)
        except Refused as refused:
            raise refused.within(f"{not_identity}; inner Transpose '{inner.name}'", [node.name]) from None
        chained = [node.name, inner.name]
        if len(inner_perm) != len(perm):
            raise Refused(f"{not_identity}; inner Transpose '{inner.name}' has a different rank", chained)
        # y = transpose(x, p1) has y.shape[i] = x.shape[p1[i]], so transpose(y, p2) = transpose(x, p1[p2]).
        composed = tuple(inner_perm[axis] for axis in perm)
        source, out = inner.inputs[0], node.outputs[0]
        sole = sole_consumer(graph, inner.outputs[0]) is node
        if _is_identity(composed) and _can_bypass(graph, source, out):
            if sole:
                detach(inner)
            bypass(graph, node, source, out)
            return
        if not sole:
            raise Refused(f"{not_identity}; composing with Transpose '{inner.name}' gives {composed}, but that "
                          "Transpose has other consumers or is a graph output", chained)
        node.inputs[0] = source
        node.attrs["perm"] = list(composed)
        detach(inner)


def permutation(node: gs.Node) -> tuple[int, ...]:
    """The Transpose's permutation (default: reverse the axes); raises :class:`Refused` (naming the node)
    when it is unknown."""
    perm = node.attrs.get("perm")
    if perm is not None:
        return tuple(int(p) for p in perm)
    dims = known_dims(node.inputs[0])
    if dims is None:
        raise Refused("it has no perm attribute (reverse the axes) and its input rank is unknown", [node.name])
    return tuple(reversed(range(len(dims))))


def _can_bypass(graph: gs.Graph, source: gs.Tensor, target: gs.Tensor) -> bool:
    try:
        check_bypass(graph, source, target)
    except Refused:
        return False
    return True


def _is_identity(perm: tuple[int, ...]) -> bool:
    return perm == tuple(range(len(perm)))
