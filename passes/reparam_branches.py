"""Re-parameterise parallel branches summed by ``Add`` (RepVGG form) into one Conv.

The branches read the same tensor and are each a Conv, a BatchNormalization alone (a per-channel affine)
or the tensor itself (an identity skip). Their sum is one conv when the output geometry agrees.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxmerge.conv_algebra import (ConvParams, MergeRefused, add_parallel, affine_conv, bn_scale_shift,
                                    identity_conv)
from onnxmerge.graph import (constant_value, conv_params, detach, producer, set_conv_params, sole_consumer,
                             weight_dtype)
from onnxmerge.pass_framework import NodeRewritePass, PassContext, register_pass


@register_pass
class ReparamBranches(NodeRewritePass):
    name = "reparam_branches"
    description = "Merge an Add of convs, BatchNorm-only and identity branches of one input into one Conv."
    op_types = ("Add", "Sum")

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> str | None:
        operands = list(node.inputs)
        if len(operands) < 2:
            return "it has a single operand"
        convs = [producer(t) for t in operands if producer(t) is not None and producer(t).op == "Conv"]
        if not convs:
            return "no operand comes from a Conv"
        source = convs[0].inputs[0]
        template = conv_params(convs[0])
        if isinstance(template, str):
            return f"cannot read Conv '{convs[0].name}': {template}"
        branches: list[ConvParams] = []
        absorbed: list[gs.Node] = []
        for operand in operands:
            branch = _branch(graph, node, operand, source, template)
            if isinstance(branch, str):
                return branch
            params, branch_node = branch
            branches.append(params)
            if branch_node is not None:
                absorbed.append(branch_node)
        try:
            merged = add_parallel(branches)
        except MergeRefused as refused:
            return f"branches cannot be summed into one conv: {refused}"
        host = convs[0]
        set_conv_params(graph, host, merged, weight_dtype(host))
        output = node.outputs[0]
        detach(node)
        for branch_node in absorbed:
            if branch_node is not host:
                detach(branch_node)
        host.outputs[0] = output
        return None


def _branch(graph: gs.Graph, add: gs.Node, operand: gs.Tensor, source: gs.Tensor,
            template: ConvParams) -> tuple[ConvParams, gs.Node | None] | str:
    """The operand as a conv reading ``source`` (and the node to remove), or why it is not one."""
    if operand is source:
        return identity_conv(template.in_channels, template.rank), None
    node = producer(operand)
    if node is None or node.op not in ("Conv", "BatchNormalization"):
        return f"operand '{operand.name}' is neither a Conv, a BatchNormalization nor the shared input"
    if node.inputs[0] is not source:
        return f"operand '{operand.name}' does not read the same input as the other branches"
    if sole_consumer(graph, operand) is not add:
        return f"the output of {node.op} '{node.name}' has other consumers"
    if node.op == "Conv":
        params = conv_params(node)
        return (params, node) if not isinstance(params, str) else f"cannot read Conv '{node.name}': {params}"
    if node.attrs.get("training_mode", 0) or len([o for o in node.outputs if o.outputs]) > 1:
        return f"BatchNormalization '{node.name}' is in training mode"
    stats = [constant_value(t) for t in node.inputs[1:5]]
    if any(s is None for s in stats):
        return f"the statistics of BatchNormalization '{node.name}' are not constants"
    scale, shift = bn_scale_shift(*stats, node.attrs.get("epsilon", 1e-5))
    return affine_conv(scale, shift, template.rank), node
