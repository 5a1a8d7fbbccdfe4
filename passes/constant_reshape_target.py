"""Give a ``Reshape`` whose target shape is computed at run time a constant target, when shapes prove it.

Exporters often build a Reshape's target from ``Shape`` of some tensor (``x.view(x.size(0), -1)``,
tf2onnx's ``Shape → Cast → Slice → Concat → Cast``). With a dynamic batch that arithmetic cannot fold, yet
the result is known: shape inference (with data propagation) says the output is ``[batch, 1280]`` where
``batch`` is the data input's own dim 0. ONNX lets a target say exactly that: ``0`` copies the input's dim
at the same position (when ``allowzero`` is 0) and one ``-1`` takes whatever is left. So the target
``[0, 1280]`` is equal for every batch, and the whole shape computation becomes dead code.

Per output dim ``i``: a static size stays; a symbolic dim equal to the data input's dim ``i`` becomes
``0``; at most one other symbolic dim becomes ``-1``. Refused when the output shape is unknown, when two
dims are neither static nor copied, or when a static 0 would be read as "copy" (``allowzero`` = 0).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.graph import add_constant, constant_value
from onnxmerge.pass_framework import SHAPES, NodeRewritePass, PassContext, Refused, register_pass


@register_pass
class ConstantReshapeTarget(NodeRewritePass):
    name = "constant_reshape_target"
    description = ("Replace a Reshape's run-time target shape by a constant (0 copies an input dim, one -1 "
                   "takes the rest) when shape inference proves the output shape.")
    preserves_shapes = True
    op_types = ("Reshape",)
    requires = frozenset({SHAPES})

    def matches(self, node: gs.Node) -> bool:
        return len(node.inputs) > 1 and constant_value(node.inputs[1]) is None

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        target = constant_target(node.inputs[0].shape, node.outputs[0].shape, int(node.attrs.get("allowzero", 0)))
        node.inputs[1] = add_constant(graph, f"{node.name or 'reshape'}.shape", np.asarray(target, np.int64))


def constant_target(data: list | None, output: list | None, allowzero: int) -> list[int]:
    """A constant Reshape target that gives ``output`` from ``data`` for every value of their symbolic dims;
    raises :class:`Refused` when there is none. Dims are ints (static) or strings (symbols; equal strings
    are equal dims)."""
    if output is None:
        raise Refused("its output shape is unknown")
    data = list(data) if data is not None else []
    target: list[int] = []
    free = []
    for axis, dim in enumerate(output):
        if isinstance(dim, (int, np.integer)) and dim >= 0:
            if dim == 0 and not allowzero:
                raise Refused(f"output dim {axis} is 0, which allowzero=0 would read as 'copy the input dim'")
            target.append(int(dim))
        elif (not allowzero and isinstance(dim, str) and dim and axis < len(data)
              and isinstance(data[axis], str) and data[axis] == dim):
            target.append(0)
        else:
            free.append(axis)
            target.append(-1)
    if len(free) > 1:
        raise Refused(f"output dims {free} are neither static nor copies of the input's dims at the same "
                      f"position (output shape {output}, input shape {data or 'unknown'})")
    return target
