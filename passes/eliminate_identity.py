"""Remove ``Identity`` and inference-mode ``Dropout``: exporters route weights through them, hiding constants."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.graph import bypass, constant_value, is_graph_output
from onnxmerge.pass_framework import NodeRewritePass, PassContext, Refused, register_pass


@register_pass
class EliminateIdentity(NodeRewritePass):
    name = "eliminate_identity"
    description = "Remove Identity nodes and Dropout nodes that are not in training mode."
    preserves_shapes = True
    op_types = ("Identity", "Dropout")

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        if node.op == "Dropout":
            _check_inference_dropout(graph, node)
        bypass(graph, node, node.inputs[0], node.outputs[0])


def _check_inference_dropout(graph: gs.Graph, node: gs.Node) -> None:
    """Raise :class:`Refused` unless the Dropout provably passes its input through."""
    if len(node.outputs) > 1 and (node.outputs[1].outputs or is_graph_output(graph, node.outputs[1])):
        raise Refused("its mask output is used", [node.name])
    if len(node.inputs) > 2 and node.inputs[2].name:
        training = constant_value(node.inputs[2])
        if training is None:
            raise Refused("its training_mode input is not a constant", [node.name])
        if bool(np.any(training)):
            raise Refused("it is in training mode", [node.name])
