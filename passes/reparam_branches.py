"""Re-parameterise parallel branches summed by ``Add`` (RepVGG form) into one Conv.

The branches read the same tensor and are each a Conv, a BatchNormalization alone (a per-channel affine)
or the tensor itself (an identity skip). Their sum is one conv when the output geometry agrees.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxmerge.conv_algebra import (ConvParams, MergeRefused, add_parallel, affine_conv, bn_scale_shift,
                                    identity_conv)
from onnxmerge.graph import (constant_value, detach, producer, read_conv_params, set_conv_params, sole_consumer,
                             weight_dtype)
from onnxmerge.pass_framework import NodeRewritePass, PassContext, Refused, register_pass


@register_pass
class ReparamBranches(NodeRewritePass):
    name = "reparam_branches"
    description = "Merge an Add of convs, BatchNorm-only and identity branches of one input into one Conv."
    op_types = ("Add", "Sum")

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        operands = list(node.inputs)
        if len(operands) < 2:
            raise Refused("it has a single operand")
        convs = [producer(t) for t in operands if producer(t) is not None and producer(t).op == "Conv"]
        if not convs:
            raise Refused("no operand comes from a Conv")
        source = convs[0].inputs[0]
        template = _read_conv(convs[0])
        branches: list[ConvParams] = []
        absorbed: list[gs.Node] = []
        for operand in operands:
            params, branch_node = _branch(graph, node, operand, source, template)
            branches.append(params)
            if branch_node is not None:
                absorbed.append(branch_node)
        try:
            merged = add_parallel(branches)
        except MergeRefused as refused:
            raise Refused(f"branches cannot be summed into one conv: {refused}", [n.name for n in absorbed]) from None
        host = convs[0]
        set_conv_params(graph, host, merged, weight_dtype(host))
        output = node.outputs[0]
        detach(node)
        for branch_node in absorbed:
            if branch_node is not host:
                detach(branch_node)
        host.outputs[0] = output


def _read_conv(conv: gs.Node) -> ConvParams:
    try:
        return read_conv_params(conv)
    except Refused as refused:
        raise refused.within(f"cannot read Conv '{conv.name}'") from None


def _branch(graph: gs.Graph, add: gs.Node, operand: gs.Tensor, source: gs.Tensor,
            template: ConvParams) -> tuple[ConvParams, gs.Node | None]:
    """The operand as a conv reading ``source`` (and the node to remove); raises :class:`Refused` when it is
    not one."""
    if operand is source:
        return identity_conv(template.in_channels, template.rank), None
    node = producer(operand)
    if node is None or node.op not in ("Conv", "BatchNormalization"):
        raise Refused(f"operand '{operand.name}' is neither a Conv, a BatchNormalization nor the shared input",
                      [node.name] if node is not None else [])
    if node.inputs[0] is not source:
        raise Refused(f"operand '{operand.name}' does not read the same input as the other branches", [node.name])
    if sole_consumer(graph, operand) is not add:
        raise Refused(f"the output of {node.op} '{node.name}' has other consumers", [node.name])
    if node.op == "Conv":
        return _read_conv(node), node
    if node.attrs.get("training_mode", 0) or len([o for o in node.outputs if o.outputs]) > 1:
        raise Refused(f"BatchNormalization '{node.name}' is in training mode", [node.name])
    stats = [constant_value(t) for t in node.inputs[1:5]]
    if any(s is None for s in stats):
        raise Refused(f"the statistics of BatchNormalization '{node.name}' are not constants", [node.name])
    scale, shift = bn_scale_shift(*stats, node.attrs.get("epsilon", 1e-5))
    return affine_conv(scale, shift, template.rank), node
