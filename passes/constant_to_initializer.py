"""Turn ``Constant`` nodes into initializers so every later pass sees weights the same way."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxmerge.graph import constant_value, detach, is_graph_output, replace_uses, unique_name
from onnxmerge.pass_framework import NodeRewritePass, PassContext, Refused, register_pass


@register_pass
class ConstantToInitializer(NodeRewritePass):
    name = "constant_to_initializer"
    description = "Replace Constant nodes by initializers (some exporters store every weight in Constant nodes)."
    preserves_shapes = True
    op_types = ("Constant",)

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        output = node.outputs[0]
        if is_graph_output(graph, output):
            raise Refused("its output is a graph output")
        value = constant_value(output)
        if value is None:
            raise Refused("it holds a sparse or string value")
        replacement = gs.Constant(unique_name(graph, output.name), value)
        replace_uses(output, replacement)
        detach(node)
