"""Merge duplicate nodes: same op, same inputs (the same tensors, in order) and equal attributes."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.graph import constant_value, detach, is_graph_output, is_omitted, replace_uses
from onnxmerge.pass_framework import GraphPass, PassContext, PassResult, Refusal, Refused, register_pass

# Two draws of a random op differ, so they are never duplicates (Dropout: unless provably not training).
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                  "Multinomial", "Bernoulli"})
# Ops outside these domains may be stateful or random (com.microsoft has BiasDropout, for one).
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


@register_pass
class EliminateCommonSubexpressions(GraphPass):
    name = "eliminate_common_subexpressions"
    description = "Replace the outputs of a node that duplicates an earlier one (same op, inputs, attributes)."
    preserves_shapes = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        graph.toposort()
        canonical: dict[tuple, gs.Node] = {}
        refusals: list[Refusal] = []
        merged = 0
        for index, node in enumerate(list(graph.nodes)):
            if not node.outputs:
                continue
            inputs = tuple(("omitted",) if is_omitted(t) else id(t) for t in node.inputs)
            outputs = tuple(t.name == "" for t in node.outputs)  # omitted optional outputs
            loose = (node.op, node.domain or "", inputs, outputs)
            try:
                key, unmergeable = loose + (_attrs_key(node.attrs),), None
            except Refused as refused:
                key, unmergeable = loose, refused  # the loose key only tells whether a twin exists
            first = canonical.setdefault(key, node)
            if first is node:
                continue
            try:
                if unmergeable is not None:
                    raise unmergeable
                _check_mergeable(node)
                _merge(graph, first, node)
            except Refused as refused:
                twins = refused.within("", [node.name, first.name])  # same reason, naming both
                refusals.append(Refusal.of(self.name, node, twins, index))
                continue
            if node.outputs:  # the duplicate was kept (it writes graph outputs); the first one went
                canonical[key] = node
            merged += 1
        if merged:
            graph.cleanup(remove_unused_graph_inputs=False)
            graph.toposort()
        return PassResult(modified=merged > 0, rewrites=merged, refusals=refusals)


def _merge(graph: gs.Graph, first: gs.Node, duplicate: gs.Node) -> None:
    """Make readers of one of the two nodes read the other's outputs; keep the one writing graph outputs.
    Raises :class:`Refused` (naming both), changing nothing, when both write graph outputs."""
    first_writes = any(is_graph_output(graph, t) for t in first.outputs)
    duplicate_writes = any(is_graph_output(graph, t) for t in duplicate.outputs)
    if first_writes and duplicate_writes:
        raise Refused(f"it duplicates '{first.name}', but both write graph outputs (each output keeps its own "
                      "name)", [duplicate.name, first.name])
    kept, dropped = (duplicate, first) if duplicate_writes else (first, duplicate)
    for old, new in zip(dropped.outputs, kept.outputs):
        if old.name:
            replace_uses(old, new)
    detach(dropped)


def _check_mergeable(node: gs.Node) -> None:
    """Raise :class:`Refused` when two runs of ``node`` may differ (random, or of an unknown domain)."""
    if (node.domain or "") not in KNOWN_DOMAINS:
        raise Refused(f"op domain '{node.domain}' is not a standard one; its determinism is unknown")
    if node.op in NONDETERMINISTIC_OPS:
        raise Refused(f"{node.op} is nondeterministic")
    if node.op == "Dropout" and len(node.inputs) > 2 and not is_omitted(node.inputs[2]):
        training = constant_value(node.inputs[2])
        if training is None or bool(np.any(training)):
            raise Refused("Dropout may be in training mode (random)")


def _attrs_key(attrs: dict) -> tuple:
    """A hashable key of a node's attributes; raises :class:`Refused` for attributes that are not compared."""
    return tuple(sorted((name, _value_key(value, name)) for name, value in attrs.items()))


def _value_key(value, name: str):
    """A hashable key equal for equal attribute values (floats by bits, tensors by dtype, shape, bytes)."""
    if isinstance(value, gs.Graph):
        raise Refused(f"its attribute '{name}' is a subgraph (If/Loop/Scan bodies are not compared)")
    if isinstance(value, gs.Constant):
        value = np.asarray(value.values)
    if isinstance(value, np.ndarray):
        return ("tensor", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (bool, int, np.integer)):
        return ("int", int(value))
    if isinstance(value, (float, np.floating)):
        return ("float", np.float64(value).tobytes())
    if isinstance(value, (str, bytes)):
        return ("str", value)
    if isinstance(value, np.dtype):
        return ("dtype", value.str)
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_value_key(v, name) for v in value))
    raise Refused(f"its attribute '{name}' has a type ({type(value).__name__}) that is not compared")
