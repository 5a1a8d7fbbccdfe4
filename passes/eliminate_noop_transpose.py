"""Remove identity ``Transpose`` nodes and compose Transpose-of-Transpose chains into one (or none)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxmerge.graph import bypass, bypass_refusal, detach, known_dims, producer, sole_consumer
from onnxmerge.pass_framework import SHAPES, NodeRewritePass, PassContext, register_pass


@register_pass
class EliminateNoopTranspose(NodeRewritePass):
    name = "eliminate_noop_transpose"
    description = "Remove identity-permutation Transposes; compose Transpose(Transpose(x)) into one Transpose."
    preserves_shapes = True
    op_types = ("Transpose",)
    requires = frozenset({SHAPES})  # only for the rank, when a Transpose omits perm

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> str | None:
        perm = permutation(node)
        if isinstance(perm, str):
            return perm
        if _is_identity(perm):
            return bypass(graph, node, node.inputs[0], node.outputs[0])
        not_identity = f"permutation {perm} is not the identity"
        inner = producer(node.inputs[0])
        if inner is None or inner.op != "Transpose":
            return f"{not_identity} and its input is not produced by a Transpose"
        inner_perm = permutation(inner)
        if isinstance(inner_perm, str):
            return f"{not_identity}; inner Transpose '{inner.name}': {inner_perm}"
        if len(inner_perm) != len(perm):
            return f"{not_identity}; inner Transpose '{inner.name}' has a different rank"
        # y = transpose(x, p1) has y.shape[i] = x.shape[p1[i]], so transpose(y, p2) = transpose(x, p1[p2]).
        composed = tuple(inner_perm[axis] for axis in perm)
        source, out = inner.inputs[0], node.outputs[0]
        sole = sole_consumer(graph, inner.outputs[0]) is node
        if _is_identity(composed) and bypass_refusal(graph, source, out) is None:
            if sole:
                detach(inner)
            return bypass(graph, node, source, out)
        if not sole:
            return (f"{not_identity}; composing with Transpose '{inner.name}' gives {composed}, but that "
                    "Transpose has other consumers or is a graph output")
        node.inputs[0] = source
        node.attrs["perm"] = list(composed)
        detach(inner)
        return None


def permutation(node: gs.Node) -> tuple[int, ...] | str:
    """The Transpose's permutation (default: reverse the axes), or why it is unknown."""
    perm = node.attrs.get("perm")
    if perm is not None:
        return tuple(int(p) for p in perm)
    dims = known_dims(node.inputs[0])
    if dims is None:
        return "it has no perm attribute (reverse the axes) and its input rank is unknown"
    return tuple(reversed(range(len(dims))))


def _is_identity(perm: tuple[int, ...]) -> bool:
    return perm == tuple(range(len(perm)))
