"""Turn chosen segments into one Conv each: LayerMerge's merge step on the ONNX graph.

A segment (i, j] becomes one Conv reading the tensor at position i: its kept convs composed in the
"pad once at the front" form (conv_algebra.compose(pad_at_front=True)), residual blocks that lie inside it
absorbed into the kernel (identity or 1x1 projection at the padding offset), pruned reducible convs
replaced by identity, and the activations strictly inside removed. What follows conv j in the original
(an outer residual Add, the activation at j) is left as it is, parameters and all; an activation added at a
linear position is emitted by the activation table (onnxmerge.activations) with the network's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from collections import Counter

import onnx
import onnx_graphsurgeon as gs

from onnxmerge import activations
from onnxmerge.activations import Activation
from onnxmerge.layermerge.segments import ChainAnalysis, KernelOption, Skip
from onnxmerge.conv_algebra import ConvParams, add_parallel, compose, identity_conv
from onnxmerge.errors import BadInputError
from onnxmerge.graph import (export_graph, import_graph, producer, read_conv_params, set_conv_params, unique_name,
                             weight_dtype)
from onnxmerge.refusal import Refused
from onnxmerge.io import clamp_ir_version


@dataclass(frozen=True)
class SegmentChoice:
    """A segment (start, end] and the kernel option it is merged with."""

    start: int
    end: int
    option: KernelOption

    @property
    def is_trivial(self) -> bool:
        """One kept conv and nothing removed: the original network is left as it is."""
        return self.end - self.start == 1 and self.option.kept == (self.end,)


def merged_conv(analysis: ChainAnalysis, graph: gs.Graph, start: int, end: int, kept: tuple[int, ...]) -> ConvParams:
    """The single conv that segment (start, end] with ``kept`` convs computes, in pad-at-front form.

    Convs not kept are the identity, so a residual block all of whose convs are pruned is x + x (LayerMerge's
    pruning). Keeping nothing at all is the "drop" option of a segment that is exactly one identity-residual
    block (search_space="extended"): the block x + f(x) becomes x, the identity as a 1x1 depthwise conv.
    A strided conv may be followed by kept 1x1 convs only (segments.py); compose() is exact either way.
    """
    kept_set = set(kept)
    nodes = {node.name: node for node in graph.nodes}
    if not kept_set:
        block = next((s for s in analysis.skips if (s.source, s.target) == (start, end)), None)
        if block is None or block.projection is not None:
            raise BadInputError(f"segment ({start}, {end}] keeps no conv; only a segment that is exactly one "
                                "identity-residual block may (it is then dropped)")
        last = analysis.convs[end].params
        return identity_conv(last.out_channels, last.rank)

    def run(a: int, b: int, enclosing: Skip | None) -> ConvParams | None:
        result, position = None, a
        while position < b:
            inner = [s for s in analysis.skips if s.source == position and s.target <= b and s is not enclosing]
            if inner:
                skip = max(inner, key=lambda s: s.target)
                block = residual(skip)
                position = skip.target
            else:
                conv = analysis.convs[position + 1]
                block = conv.params if conv.index in kept_set else None
                position += 1
            result = _then(result, block)
        return result

    def residual(skip: Skip) -> ConvParams:
        body = run(skip.source, skip.target, skip)
        channels = analysis.convs[skip.target].params.out_channels
        rank = analysis.convs[skip.target].params.rank
        if body is None:
            body = identity_conv(channels, rank)
        if skip.projection is None:
            return add_parallel([body, identity_conv(channels, rank)])
        try:
            projection = read_conv_params(nodes[skip.projection])
        except Refused as refused:
            raise BadInputError(f"cannot read projection conv '{skip.projection}': {refused.reason}") from None
        return add_parallel([body, projection])

    merged = run(start, end, None)
    if merged is None:
        raise BadInputError(f"segment ({start}, {end}] keeps none of its convs ({sorted(kept_set)} are not in it)")
    return merged


def _then(first: ConvParams | None, second: ConvParams | None) -> ConvParams | None:
    if first is None or second is None:
        return first if second is None else second
    return compose(first, second, pad_at_front=True)


def dominant_activation(analysis: ChainAnalysis) -> Activation | None:
    """The network's own activation, parameters included: what a merged segment ending at a linear position is
    given. The most frequent one (the first on ties); PReLUs count together whatever their slopes, and the
    first one stands for them (:meth:`Activation.fitted` adapts its slope to where it is added)."""
    found = [p.activation_value for p in analysis.positions if p.activation_value is not None]
    counts = Counter((a.kind, a.params) for a in found)
    if not counts:
        return None
    key = counts.most_common(1)[0][0]
    return next(a for a in found if (a.kind, a.params) == key)


def apply_segments(model: onnx.ModelProto, analysis: ChainAnalysis, choices: list[SegmentChoice], *,
                   overrides: dict[tuple[int, int], ConvParams] | None = None,
                   activation_kind: str | Activation | None = None) -> onnx.ModelProto:
    """The model with every non-trivial choice merged; trivial choices leave the graph untouched.

    ``overrides`` gives the merged conv of a (start, end) directly (e.g. a refit), instead of composing.
    A segment of two or more convs that ends at a linear position gets the network's activation there
    (LayerMerge's rule: merged segments always end nonlinear); ``activation_kind`` overrides which one (an
    :class:`Activation` or its name, e.g. ``"leakyrelu(0.1)"``).
    """
    graph = import_graph(model)
    tensors = graph.tensors()
    nodes = {node.name: node for node in graph.nodes}
    if isinstance(activation_kind, str):
        try:
            activation_kind = activations.parse(activation_kind)
        except ValueError as exc:
            raise BadInputError(f"cannot add activation '{activation_kind}': {exc}") from None
    kind = activation_kind or dominant_activation(analysis)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    for choice in choices:
        if choice.is_trivial:
            continue
        params = (overrides or {}).get((choice.start, choice.end)) or \
            merged_conv(analysis, graph, choice.start, choice.end, choice.option.kept)
        last = nodes[analysis.convs[choice.end].node]
        absorbed_add = next((s for s in analysis.skips if s.target == choice.end and s.source >= choice.start), None)
        output = last.outputs[0]
        if absorbed_add is not None:
            output = nodes[absorbed_add.add_node].outputs[0]
        merged = gs.Node("Conv", name=unique_name(graph, f"merged_{choice.start}_{choice.end}"),
                         inputs=[tensors[analysis.positions[choice.start].tensor]], outputs=[])
        graph.nodes.append(merged)
        set_conv_params(graph, merged, params, weight_dtype(last))
        _take_over(output, merged)
        position = analysis.positions[choice.end]
        if position.activation is None and len(choice.option.kept) > 1 and kind is not None:
            _insert_activation(graph, tensors[position.tensor], kind.fitted(params.out_channels), opset,
                               weight_dtype(last))
    graph.cleanup(remove_unused_graph_inputs=False)
    result = export_graph(graph, model)
    clamp_ir_version(result)
    return result


def _take_over(tensor: gs.Variable, node: gs.Node) -> None:
    """Make ``node`` the producer of ``tensor`` (its old producer becomes dead and is cleaned up)."""
    old = producer(tensor)
    if old is not None:
        index = next(i for i, t in enumerate(old.outputs) if t is tensor)
        old.outputs[index] = gs.Variable(f"{tensor.name}__replaced", dtype=tensor.dtype)
    node.outputs.append(tensor)


def _insert_activation(graph: gs.Graph, tensor: gs.Variable, activation: Activation, opset: int, dtype) -> None:
    """Apply ``activation`` to ``tensor`` for every reader of it (graph outputs keep their name)."""
    if any(out is tensor for out in graph.outputs):
        raise BadInputError(f"cannot add an activation after graph output '{tensor.name}'")
    tag = activation.tag
    activated = gs.Variable(unique_name(graph, f"{tensor.name}_{tag}"), dtype=tensor.dtype, shape=tensor.shape)
    readers_before = list(tensor.outputs)
    nodes = activation.emit_gs(graph, tensor, activated, opset=opset, name=unique_name(graph, f"{tag}_added"),
                               dtype=dtype)
    for reader in readers_before:
        for index, value in enumerate(reader.inputs):
            if value is tensor:
                reader.inputs[index] = activated
    graph.nodes.extend(nodes)
