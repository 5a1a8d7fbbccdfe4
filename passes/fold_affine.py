"""Fold a per-channel constant ``Mul``/``Add`` (or ``Sub``/``Div``) after a Conv into its weight and bias."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.conv_algebra import scale_shift_output
from onnxmerge.graph import (constant_value, conv_params, detach, producer, set_conv_params, sole_consumer,
                             weight_dtype)
from onnxmerge.pass_framework import NodeRewritePass, PassContext, register_pass


@register_pass
class FoldAffine(NodeRewritePass):
    name = "fold_affine"
    description = "Fold a per-channel constant Mul/Add/Sub/Div applied to a Conv output into the Conv."
    op_types = ("Mul", "Add", "Sub", "Div")

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> str | None:
        conv_side = [i for i, t in enumerate(node.inputs[:2]) if producer(t) is not None and producer(t).op == "Conv"]
        if not conv_side:
            return "no input comes from a Conv"
        conv_index = conv_side[0]
        if node.op in ("Sub", "Div") and conv_index != 0:
            return f"the Conv output is the second operand of {node.op}"
        constant = constant_value(node.inputs[1 - conv_index])
        if constant is None:
            return "its other operand is not a constant"
        conv_output = node.inputs[conv_index]
        conv = producer(conv_output)
        if sole_consumer(graph, conv_output) is not node:
            return f"the output of Conv '{conv.name}' has other consumers"
        params = conv_params(conv)
        if isinstance(params, str):
            return f"cannot read Conv '{conv.name}': {params}"
        per_channel = _per_channel(constant, params.out_channels, params.rank + 2)
        if isinstance(per_channel, str):
            return per_channel
        if node.op == "Div" and np.any(per_channel == 0):
            return "it divides by zero in some channel"
        ones, zeros = np.ones(params.out_channels), np.zeros(params.out_channels)
        scale, shift = {"Mul": (per_channel, zeros), "Add": (ones, per_channel),
                        "Sub": (ones, -per_channel), "Div": (1.0 / per_channel, zeros)}[node.op]
        set_conv_params(graph, conv, scale_shift_output(params, scale, shift), weight_dtype(conv))
        output = node.outputs[0]
        detach(node)
        conv.outputs[0] = output
        return None


def _per_channel(constant: np.ndarray, channels: int, output_rank: int) -> np.ndarray | str:
    """The constant as one value per output channel, if broadcasting it cannot change the output's shape."""
    if constant.ndim > output_rank:
        return f"its constant has rank {constant.ndim}, which would broadcast the Conv output to a higher rank"
    shape = (1,) * (output_rank - constant.ndim) + constant.shape
    if any(size != 1 for axis, size in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return f"its constant of shape {list(constant.shape)} is not per-channel"
    return np.broadcast_to(constant.astype(np.float64).reshape(-1), (channels,)).copy()
