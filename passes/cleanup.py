"""Remove what no output depends on and share identical initializers."""

from __future__ import annotations

import hashlib

import onnx_graphsurgeon as gs

from onnxmerge.graph import is_graph_input, is_graph_output, replace_uses
from onnxmerge.pass_framework import GraphPass, PassContext, PassResult, register_pass


@register_pass
class Cleanup(GraphPass):
    name = "cleanup"
    description = "Remove dead nodes and unused initializers; merge initializers with identical contents."
    preserves_shapes = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes_before = len(graph.nodes)
        graph.cleanup(remove_unused_graph_inputs=False)
        rewrites = nodes_before - len(graph.nodes)
        rewrites += self._merge_duplicate_constants(graph)
        if rewrites:
            graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(modified=rewrites > 0, rewrites=rewrites)

    @staticmethod
    def _merge_duplicate_constants(graph: gs.Graph) -> int:
        """Point readers of a duplicate constant at its first twin (inputs and outputs are left alone)."""
        first_seen: dict[tuple, gs.Constant] = {}
        merged = 0
        for tensor in list(graph.tensors().values()):
            if not isinstance(tensor, gs.Constant) or is_graph_input(graph, tensor) or is_graph_output(graph, tensor):
                continue
            values = tensor.values
            key = (values.dtype.str, values.shape, hashlib.sha256(values.tobytes()).hexdigest())
            twin = first_seen.setdefault(key, tensor)
            if twin is not tensor:
                replace_uses(tensor, twin)
                merged += 1
        return merged
