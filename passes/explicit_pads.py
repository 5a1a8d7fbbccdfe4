"""Turn Conv ``auto_pad`` into explicit ``pads`` so every later pass reasons about one padding form."""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from onnxmerge.graph import constant_value, static_shape
from onnxmerge.pass_framework import SHAPES, NodeRewritePass, PassContext, Refused, register_pass


@register_pass
class ExplicitPads(NodeRewritePass):
    name = "explicit_pads"
    description = "Replace Conv auto_pad (SAME_UPPER, SAME_LOWER, VALID) by the equivalent explicit pads."
    op_types = ("Conv",)
    requires = frozenset({SHAPES})

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        mode = node.attrs.get("auto_pad", "NOTSET")
        if mode == "NOTSET":
            raise Refused("it already has explicit pads")
        weight = constant_value(node.inputs[1])
        if weight is None:
            raise Refused("its weight is not a constant, so the kernel size is unknown")
        rank = weight.ndim - 2
        kernel = node.attrs.get("kernel_shape") or list(weight.shape[2:])
        strides = node.attrs.get("strides") or [1] * rank
        dilations = node.attrs.get("dilations") or [1] * rank
        if mode == "VALID":
            pads = [0] * (2 * rank)
        else:
            shape = static_shape(node.inputs[0])
            if shape is None and any(s != 1 for s in strides):
                raise Refused(f"auto_pad={mode} with stride > 1 needs the input's spatial size, which is not "
                              "static")
            begins, ends = [], []
            for axis in range(rank):
                size = shape[2 + axis] if shape else 0
                span = dilations[axis] * (kernel[axis] - 1) + 1
                total = span - 1 if strides[axis] == 1 else max(
                    (math.ceil(size / strides[axis]) - 1) * strides[axis] + span - size, 0)
                small, large = total // 2, total - total // 2
                begins.append(small if mode == "SAME_UPPER" else large)
                ends.append(large if mode == "SAME_UPPER" else small)
            pads = begins + ends
        del node.attrs["auto_pad"]
        node.attrs["pads"] = pads
