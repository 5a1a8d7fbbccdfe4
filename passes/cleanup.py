"""Remove what no output depends on and share identical initializers."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.graph import constant_digest, is_graph_input, is_graph_output, replace_uses
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
        """Point readers of a duplicate constant at its first twin (inputs and outputs are left alone).

        Contents are compared by digest of their stored bytes, and only between constants of the same dtype and
        shape whose first :data:`_PREFIX_BYTES` already agree: weights are streamed from their data file, never
        loaded, and most are told apart by their first bytes (types and dims come from the header).
        """
        candidates: dict[tuple, list[gs.Constant]] = {}
        for tensor in list(graph.tensors().values()):
            if not isinstance(tensor, gs.Constant) or is_graph_input(graph, tensor) or is_graph_output(graph, tensor):
                continue
            candidates.setdefault((_dtype_key(tensor.dtype), tuple(tensor.shape)), []).append(tensor)
        merged = 0
        for group in candidates.values():
            if len(group) < 2:
                continue
            by_prefix: dict[str, list[gs.Constant]] = {}
            for tensor in group:
                by_prefix.setdefault(constant_digest(tensor, _PREFIX_BYTES), []).append(tensor)
            for same_prefix in by_prefix.values():
                if len(same_prefix) < 2:
                    continue
                first_seen: dict[str, gs.Constant] = {}
                for tensor in same_prefix:
                    twin = first_seen.setdefault(constant_digest(tensor), tensor)
                    if twin is not tensor:
                        replace_uses(tensor, twin)
                        merged += 1
        return merged


_PREFIX_BYTES = 1 << 16


def _dtype_key(dtype) -> str:
    try:
        return np.dtype(dtype).str
    except TypeError:  # graphsurgeon keeps ONNX type ids for types numpy lacks
        return f"onnx:{dtype}"
