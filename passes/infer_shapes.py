"""Annotate every tensor with ONNX shape inference (passes that need shapes get them automatically)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxmerge.pass_framework import GraphPass, PassContext, PassResult, register_pass, SHAPES


@register_pass
class InferShapes(GraphPass):
    name = "infer_shapes"
    description = "Run ONNX shape inference and record shapes and dtypes on every tensor (annotation only)."

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ctx.shapes_current = False
        ctx.ensure(graph, frozenset({SHAPES}))
        # Annotations do not change what the graph computes, so this never keeps the fixed point going.
        return PassResult(modified=False)
