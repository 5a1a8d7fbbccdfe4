"""Merge Conv → Conv with nothing between into one Conv, where the result is exact at the borders too."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxmerge.conv_algebra import ConvParams, MergeRefused, compose, conv_macs
from onnxmerge.graph import (detach, producer, read_conv_params, set_conv_params, sole_consumer, static_shape,
                             weight_dtype)
from onnxmerge.pass_framework import SHAPES, NodeRewritePass, PassContext, Refused, register_pass


@register_pass
class MergeConvChain(NodeRewritePass):
    name = "merge_conv_chain"
    description = "Compose a Conv that feeds only another Conv into one Conv when exact and not costlier."
    op_types = ("Conv",)
    requires = frozenset({SHAPES})

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        middle = node.inputs[0]
        first = producer(middle)
        if first is None or first.op != "Conv":
            raise Refused("its input does not come from a Conv")
        pair = [first.name, node.name]
        if sole_consumer(graph, middle) is not node:
            raise Refused(f"the output of Conv '{first.name}' has other consumers", pair)
        first_params, second_params = (_read(owner, pair) for owner in (first, node))
        try:
            merged = compose(first_params, second_params)
        except MergeRefused as refused:
            raise Refused(f"not merged with Conv '{first.name}': {refused}", pair) from None
        pair_cost, merged_cost = _costs(first_params, second_params, merged, middle, node.outputs[0])
        if merged_cost > pair_cost and not ctx.options.allow_costlier_merges:
            raise Refused(f"merging with Conv '{first.name}' would cost {merged_cost:,} MACs vs {pair_cost:,} for "
                          "the pair (allow_costlier_merges / --allow-costlier-merges overrides)", pair)
        set_conv_params(graph, node, merged, weight_dtype(node))
        node.inputs[0] = first.inputs[0]
        detach(first)


def _read(conv: gs.Node, pair: list[str]) -> ConvParams:
    try:
        return read_conv_params(conv)
    except Refused as refused:
        raise refused.within(f"cannot read Conv '{conv.name}'", pair) from None


def _costs(first: ConvParams, second: ConvParams, merged: ConvParams, middle: gs.Tensor,
           output: gs.Tensor) -> tuple[int, int]:
    """MACs of the pair and of the merged conv, at the real shapes when known.

    Without static shapes, the cost per output pixel is compared instead: the first conv runs on about
    ``second.strides`` times as many pixels per axis as the second.
    """
    middle_shape, output_shape = static_shape(middle), static_shape(output)
    if middle_shape and output_shape:
        middle_pixels, output_pixels = middle_shape[2:], output_shape[2:]
    else:
        output_pixels = (1,) * second.rank
        middle_pixels = tuple(second.strides)
    pair = conv_macs(first, middle_pixels) + conv_macs(second, output_pixels)
    return pair, conv_macs(merged, output_pixels)
