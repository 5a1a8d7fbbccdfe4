"""Fold a constant zero ``Pad`` into the pads of the Conv that reads it."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.graph import constant_value, detach, sole_consumer
from onnxmerge.pass_framework import NodeRewritePass, PassContext, Refused, register_pass


@register_pass
class FoldPad(NodeRewritePass):
    name = "fold_pad"
    description = "Fold a zero-valued constant-mode Pad on spatial axes into the following Conv's pads."
    op_types = ("Pad",)

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        conv = sole_consumer(graph, node.outputs[0])
        if conv is None or conv.op != "Conv" or conv.inputs[0] is not node.outputs[0]:
            raise Refused("its output is not read by exactly one Conv (as data input)")
        if conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise Refused(f"Conv '{conv.name}' uses auto_pad={conv.attrs['auto_pad']}", [conv.name])
        if node.attrs.get("mode", "constant") != "constant":
            raise Refused(f"mode={node.attrs['mode']} is not zero padding")
        pads = _pad_amounts(node)
        weight = constant_value(conv.inputs[1])
        if weight is None:
            raise Refused(f"the weight of Conv '{conv.name}' is not a constant", [conv.name])
        rank = weight.ndim
        if pads.size != 2 * rank:
            raise Refused(f"it pads {pads.size // 2} axes, the Conv input has {rank}", [conv.name])
        begins, ends = pads[:rank], pads[rank:]
        if np.any(begins[:2]) or np.any(ends[:2]):
            raise Refused("it pads the batch or channel axis")
        if np.any(pads < 0):
            raise Refused("it crops (negative pads)")
        old = conv.attrs.get("pads") if conv.attrs.get("auto_pad", "NOTSET") == "NOTSET" else None
        old = list(old) if old is not None else [0] * (2 * (rank - 2))
        spatial = rank - 2
        conv.attrs.pop("auto_pad", None)
        conv.attrs["pads"] = [int(old[i] + begins[2 + i]) for i in range(spatial)] + \
                             [int(old[spatial + i] + ends[2 + i]) for i in range(spatial)]
        conv.inputs[0] = node.inputs[0]
        detach(node)


def _pad_amounts(node: gs.Node) -> np.ndarray:
    """Pads in ONNX order over all axes; raises :class:`Refused` (naming the Pad) when they are not a
    constant zero padding."""
    def refuse(reason: str) -> Refused:
        return Refused(reason, [node.name])

    if "pads" in node.attrs:  # opset < 11
        if node.attrs.get("value", 0.0) != 0.0:
            raise refuse("its padding value is not zero")
        return np.asarray(node.attrs["pads"], dtype=np.int64)
    pads = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None:
        raise refuse("its pads are not a constant")
    if len(node.inputs) > 2 and node.inputs[2].name:
        value = constant_value(node.inputs[2])
        if value is None or np.any(value != 0):
            raise refuse("its padding value is not a constant zero")
    if len(node.inputs) > 3 and node.inputs[3].name:
        raise refuse("it pads selected axes only (axes input); not folded")
    return np.asarray(pads, dtype=np.int64)
