"""Merge duplicate nodes: same op, same inputs (the same tensors, in order) and equal attributes."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.graph import constant_value, detach, is_graph_output, is_omitted, replace_uses
from onnxmerge.pass_framework import GraphPass, PassContext, PassResult, register_pass

# Two draws of a random op differ, so they are never duplicates (Dropout: unless provably not training).
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                  "Multinomial", "Bernoulli"})
# Ops outside these domains may be stateful or random (com.microsoft has BiasDropout, for one).
KNOWN_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


class _NotComparable(Exception):
    pass


@register_pass
class EliminateCommonSubexpressions(GraphPass):
    name = "eliminate_common_subexpressions"
    description = "Replace the outputs of a node that duplicates an earlier one (same op, inputs, attributes)."
    preserves_shapes = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        graph.toposort()
        canonical: dict[tuple, gs.Node] = {}
        refusals: dict[str, str] = {}
        merged = 0
        for node in list(graph.nodes):
            if not node.outputs:
                continue
            inputs = tuple(("omitted",) if is_omitted(t) else id(t) for t in node.inputs)
            outputs = tuple(t.name == "" for t in node.outputs)  # omitted optional outputs
            loose = (node.op, node.domain or "", inputs, outputs)
            try:
                key = loose + (_attrs_key(node.attrs),)
            except _NotComparable as exc:
                key, why = loose, str(exc)  # only to tell whether a twin exists
            else:
                why = _unmergeable(node)
            first = canonical.setdefault(key, node)
            if first is node:
                continue
            label = node.name or f"<unnamed {node.op}>"
            if why is not None:
                refusals[label] = why
                continue
            reason = _merge(graph, first, node)
            if reason is not None:
                refusals[label] = f"it duplicates '{first.name}', but {reason}"
                continue
            if node.outputs:  # the duplicate was kept (it writes graph outputs); the first one went
                canonical[key] = node
            merged += 1
        if merged:
            graph.cleanup(remove_unused_graph_inputs=False)
            graph.toposort()
        return PassResult(modified=merged > 0, rewrites=merged, refusals=refusals)


def _merge(graph: gs.Graph, first: gs.Node, duplicate: gs.Node) -> str | None:
    """Make readers of one of the two nodes read the other's outputs; keep the one writing graph outputs."""
    first_writes = any(is_graph_output(graph, t) for t in first.outputs)
    duplicate_writes = any(is_graph_output(graph, t) for t in duplicate.outputs)
    if first_writes and duplicate_writes:
        return "both write graph outputs (each output keeps its own name)"
    kept, dropped = (duplicate, first) if duplicate_writes else (first, duplicate)
    for old, new in zip(dropped.outputs, kept.outputs):
        if old.name:
            replace_uses(old, new)
    detach(dropped)
    return None


def _unmergeable(node: gs.Node) -> str | None:
    if (node.domain or "") not in KNOWN_DOMAINS:
        return f"op domain '{node.domain}' is not a standard one; its determinism is unknown"
    if node.op in NONDETERMINISTIC_OPS:
        return f"{node.op} is nondeterministic"
    if node.op == "Dropout" and len(node.inputs) > 2 and not is_omitted(node.inputs[2]):
        training = constant_value(node.inputs[2])
        if training is None or bool(np.any(training)):
            return "Dropout may be in training mode (random)"
    return None


def _attrs_key(attrs: dict) -> tuple:
    return tuple(sorted((name, _value_key(value, name)) for name, value in attrs.items()))


def _value_key(value, name: str):
    """A hashable key equal for equal attribute values (floats by bits, tensors by dtype, shape, bytes)."""
    if isinstance(value, gs.Graph):
        raise _NotComparable(f"its attribute '{name}' is a subgraph (If/Loop/Scan bodies are not compared)")
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
    raise _NotComparable(f"its attribute '{name}' has a type ({type(value).__name__}) that is not compared")
