"""Remove ``Identity`` and inference-mode ``Dropout``: exporters route weights through them, hiding constants."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.graph import bypass, constant_value, is_graph_output
from onnxmerge.pass_framework import NodeRewritePass, PassContext, register_pass


@register_pass
class EliminateIdentity(NodeRewritePass):
    name = "eliminate_identity"
    description = "Remove Identity nodes and Dropout nodes that are not in training mode."
    preserves_shapes = True
    op_types = ("Identity", "Dropout")

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> str | None:
        if node.op == "Dropout":
            reason = _dropout_refusal(graph, node)
            if reason:
                return reason
        return bypass(graph, node, node.inputs[0], node.outputs[0])


def _dropout_refusal(graph: gs.Graph, node: gs.Node) -> str | None:
    if len(node.outputs) > 1 and (node.outputs[1].outputs or is_graph_output(graph, node.outputs[1])):
        return "its mask output is used"
    if len(node.inputs) > 2 and node.inputs[2].name:
        training = constant_value(node.inputs[2])
        if training is None:
            return "its training_mode input is not a constant"
        if bool(np.any(training)):
            return "it is in training mode"
    return None
