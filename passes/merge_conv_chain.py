"""Merge Conv → Conv with nothing between into one Conv, where the result is exact at the borders too."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxmerge.conv_algebra import ConvParams, compose, composition_refusal, conv_macs
from onnxmerge.graph import (conv_params, detach, producer, set_conv_params, sole_consumer, static_shape,
                             weight_dtype)
from onnxmerge.pass_framework import SHAPES, NodeRewritePass, PassContext, register_pass


@register_pass
class MergeConvChain(NodeRewritePass):
    name = "merge_conv_chain"
    description = "Compose a Conv that feeds only another Conv into one Conv when exact and not costlier."
    op_types = ("Conv",)
    requires = frozenset({SHAPES})

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> str | None:
        middle = node.inputs[0]
        first = producer(middle)
        if first is None or first.op != "Conv":
            return "its input does not come from a Conv"
        if sole_consumer(graph, middle) is not node:
            return f"the output of Conv '{first.name}' has other consumers"
        first_params, second_params = conv_params(first), conv_params(node)
        for owner, params in ((first, first_params), (node, second_params)):
            if isinstance(params, str):
                return f"cannot read Conv '{owner.name}': {params}"
        refusal = composition_refusal(first_params, second_params)
        if refusal:
            return f"not merged with Conv '{first.name}': {refusal}"
        merged = compose(first_params, second_params)
        pair_cost, merged_cost = _costs(first_params, second_params, merged, middle, node.outputs[0])
        if merged_cost > pair_cost and not ctx.options.allow_costlier_merges:
            return (f"merging with Conv '{first.name}' would cost {merged_cost:,} MACs vs {pair_cost:,} for the "
                    "pair (allow_costlier_merges / --allow-costlier-merges overrides)")
        set_conv_params(graph, node, merged, weight_dtype(node))
        node.inputs[0] = first.inputs[0]
        detach(first)
        return None


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
