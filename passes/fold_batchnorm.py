"""Fold an inference ``BatchNormalization`` into the Conv, ConvTranspose or Gemm that feeds it."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.conv_algebra import bn_scale_shift, scale_shift_output, scale_shift_transposed
from onnxmerge.graph import (add_constant, constant_value, detach, is_graph_output, producer, read_conv_params,
                             set_conv_params, set_inputs_from, sole_consumer, weight_dtype)
from onnxmerge.pass_framework import NodeRewritePass, PassContext, Refused, register_pass

FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


@register_pass
class FoldBatchNorm(NodeRewritePass):
    name = "fold_batchnorm"
    description = "Fold BatchNormalization into the preceding Conv, ConvTranspose or Gemm (uses its epsilon)."
    op_types = ("BatchNormalization",)

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        if node.attrs.get("training_mode", 0):
            raise Refused("it is in training mode")
        if any(out.outputs or is_graph_output(graph, out) for out in node.outputs[1:]):
            raise Refused("its running-statistics outputs are used")
        source = node.inputs[0]
        upstream = producer(source)
        if upstream is None or upstream.op not in FOLDABLE_PRODUCERS:
            raise Refused(f"its input comes from {upstream.op if upstream else 'a graph input'}, not "
                          f"{'/'.join(FOLDABLE_PRODUCERS)}", [upstream.name] if upstream else [])
        if sole_consumer(graph, source) is not node:
            raise Refused(f"the output of {upstream.op} '{upstream.name}' has other consumers", [upstream.name])
        stats = [constant_value(t) for t in node.inputs[1:5]]
        if any(s is None for s in stats):
            raise Refused("its scale, bias, mean or variance is not a constant")
        scale, shift = bn_scale_shift(*stats, node.attrs.get("epsilon", 1e-5))
        _fold(graph, upstream, scale, shift)
        output = node.outputs[0]
        detach(node)
        upstream.outputs[0] = output


def _fold(graph: gs.Graph, upstream: gs.Node, scale: np.ndarray, shift: np.ndarray) -> None:
    """Fold the per-channel ``scale``/``shift`` into ``upstream``, or raise :class:`Refused` (changing nothing)."""
    if upstream.op == "Conv":
        try:
            params = read_conv_params(upstream)
        except Refused as refused:
            raise refused.within(f"cannot read Conv '{upstream.name}'") from None
        set_conv_params(graph, upstream, scale_shift_output(params, scale, shift), weight_dtype(upstream))
    elif upstream.op == "ConvTranspose":
        _fold_conv_transpose(graph, upstream, scale, shift)
    else:
        _fold_gemm(graph, upstream, scale, shift)


def _fold_conv_transpose(graph: gs.Graph, node: gs.Node, scale: np.ndarray, shift: np.ndarray) -> None:
    weight = constant_value(node.inputs[1])
    if weight is None:
        raise Refused(f"the weight of ConvTranspose '{node.name}' is not a constant", [node.name])
    groups = node.attrs.get("group", 1)
    out_channels = weight.shape[1] * groups
    bias = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(out_channels)
    if bias is None:
        raise Refused(f"the bias of ConvTranspose '{node.name}' is not a constant", [node.name])
    new_weight, new_bias = scale_shift_transposed(weight, bias, groups, scale, shift)
    name = node.name or "conv_transpose"
    set_inputs_from(node, 1, [add_constant(graph, f"{name}.weight", new_weight.astype(weight.dtype)),
                       add_constant(graph, f"{name}.bias", new_bias.astype(weight.dtype))])


def _fold_gemm(graph: gs.Graph, node: gs.Node, scale: np.ndarray, shift: np.ndarray) -> None:
    """Y = alpha·A·B' + beta·C, then per-column BN: scale B's output columns, rebuild C with beta = 1."""
    def refuse(reason: str) -> Refused:
        return Refused(reason, [node.name])

    weight = constant_value(node.inputs[1])
    if weight is None or weight.ndim != 2:
        raise refuse(f"the B input of Gemm '{node.name}' is not a constant matrix")
    trans_b = node.attrs.get("transB", 0)
    columns = weight.shape[0] if trans_b else weight.shape[1]
    if scale.shape[0] != columns:
        raise refuse(f"BatchNormalization has {scale.shape[0]} channels, Gemm '{node.name}' has {columns} columns")
    beta = node.attrs.get("beta", 1.0)
    bias = np.zeros(columns)
    if len(node.inputs) > 2 and node.inputs[2].name:
        c_value = constant_value(node.inputs[2])
        if c_value is None:
            raise refuse(f"the C input of Gemm '{node.name}' is not a constant")
        if c_value.size not in (1, columns) or (c_value.ndim == 2 and c_value.shape[0] != 1):
            raise refuse(f"the C input of Gemm '{node.name}' is not a per-column bias (shape "
                         f"{list(c_value.shape)})")
        bias = beta * np.broadcast_to(c_value.astype(np.float64).reshape(-1), (columns,))
    new_weight = weight.astype(np.float64) * (scale[:, None] if trans_b else scale[None, :])
    new_bias = scale * bias + shift
    name = node.name or "gemm"
    set_inputs_from(node, 1, [add_constant(graph, f"{name}.weight", new_weight.astype(weight.dtype)),
                       add_constant(graph, f"{name}.bias", new_bias.astype(weight.dtype))])
    node.attrs["beta"] = 1.0
