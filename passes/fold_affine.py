"""Fold a per-channel constant ``Mul``/``Add`` (or ``Sub``/``Div``) after a Conv into its weight and bias."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.conv_algebra import scale_shift_output
from onnxmerge.graph import (constant_value, detach, producer, read_conv_params, set_conv_params, sole_consumer,
                             weight_dtype)
from onnxmerge.pass_framework import NodeRewritePass, PassContext, Refused, register_pass


@register_pass
class FoldAffine(NodeRewritePass):
    name = "fold_affine"
    description = "Fold a per-channel constant Mul/Add/Sub/Div applied to a Conv output into the Conv."
    op_types = ("Mul", "Add", "Sub", "Div")

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        conv_side = [i for i, t in enumerate(node.inputs[:2]) if producer(t) is not None and producer(t).op == "Conv"]
        if not conv_side:
            raise Refused("no input comes from a Conv")
        conv_index = conv_side[0]
        conv_output = node.inputs[conv_index]
        conv = producer(conv_output)
        if node.op in ("Sub", "Div") and conv_index != 0:
            raise Refused(f"the Conv output is the second operand of {node.op}", [conv.name])
        constant = constant_value(node.inputs[1 - conv_index])
        if constant is None:
            raise Refused("its other operand is not a constant")
        if sole_consumer(graph, conv_output) is not node:
            raise Refused(f"the output of Conv '{conv.name}' has other consumers", [conv.name])
        try:
            params = read_conv_params(conv)
        except Refused as refused:
            raise refused.within(f"cannot read Conv '{conv.name}'") from None
        per_channel = _per_channel(constant, params.out_channels, params.rank + 2)
        if node.op == "Div" and np.any(per_channel == 0):
            raise Refused("it divides by zero in some channel")
        ones, zeros = np.ones(params.out_channels), np.zeros(params.out_channels)
        scale, shift = {"Mul": (per_channel, zeros), "Add": (ones, per_channel),
                        "Sub": (ones, -per_channel), "Div": (1.0 / per_channel, zeros)}[node.op]
        set_conv_params(graph, conv, scale_shift_output(params, scale, shift), weight_dtype(conv))
        output = node.outputs[0]
        detach(node)
        conv.outputs[0] = output


def _per_channel(constant: np.ndarray, channels: int, output_rank: int) -> np.ndarray:
    """The constant as one value per output channel; raises :class:`Refused` if broadcasting it could change
    the output's shape."""
    if constant.ndim > output_rank:
        raise Refused(f"its constant has rank {constant.ndim}, which would broadcast the Conv output to a "
                      "higher rank")
    shape = (1,) * (output_rank - constant.ndim) + constant.shape
    if any(size != 1 for axis, size in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        raise Refused(f"its constant of shape {list(constant.shape)} is not per-channel")
    return np.broadcast_to(constant.astype(np.float64).reshape(-1), (channels,)).copy()
