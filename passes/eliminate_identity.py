"""Remove ``Identity`` and inference-mode ``Dropout``: exporters route weights through them, hiding constants."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.graph import constant_value, detach, is_graph_output, producer, replace_uses
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
        source, target = node.inputs[0], node.outputs[0]
        if not is_graph_output(graph, target):
            replace_uses(target, source)
            detach(node)
            return None
        # The output name is part of the model's contract: let the source's producer write it directly.
        source_producer = producer(source)
        if source_producer is None or source_producer.op == "Constant":
            return "it links a graph input or constant to a graph output; kept to preserve the output name"
        if is_graph_output(graph, source):
            return "both its input and output are graph outputs"
        detach(node)
        replace_uses(source, target)
        index = next(i for i, t in enumerate(source_producer.outputs) if t is source)
        source_producer.outputs[index] = target
        return None


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
