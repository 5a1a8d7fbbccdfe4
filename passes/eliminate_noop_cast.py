"""Remove ``Cast`` nodes to the dtype their input already has, and Cast chains that are provably exact."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto as T

from onnxmerge.graph import bypass, check_bypass, detach, producer, sole_consumer
from onnxmerge.pass_framework import SHAPES, NodeRewritePass, PassContext, Refused, register_pass

# Every value of the key type is exactly representable in each listed type (NaN, infinities and -0.0
# included for floats), so a Cast from the key to a listed type and back returns the input bit for bit.
_INTS = {T.INT8, T.INT16, T.INT32, T.INT64, T.UINT8, T.UINT16, T.UINT32, T.UINT64}
_FLOATS = {T.FLOAT16, T.BFLOAT16, T.FLOAT, T.DOUBLE}
EXACT_WIDENINGS: dict[int, frozenset[int]] = {
    T.BOOL: frozenset(_INTS | _FLOATS),
    T.INT8: frozenset({T.INT16, T.INT32, T.INT64, T.FLOAT16, T.BFLOAT16, T.FLOAT, T.DOUBLE}),
    T.UINT8: frozenset({T.INT16, T.INT32, T.INT64, T.UINT16, T.UINT32, T.UINT64, T.FLOAT16, T.BFLOAT16,
                        T.FLOAT, T.DOUBLE}),
    T.INT16: frozenset({T.INT32, T.INT64, T.FLOAT, T.DOUBLE}),
    T.UINT16: frozenset({T.INT32, T.INT64, T.UINT32, T.UINT64, T.FLOAT, T.DOUBLE}),
    T.INT32: frozenset({T.INT64, T.DOUBLE}),
    T.UINT32: frozenset({T.INT64, T.UINT64, T.DOUBLE}),
    T.FLOAT16: frozenset({T.FLOAT, T.DOUBLE}),
    T.BFLOAT16: frozenset({T.FLOAT, T.DOUBLE}),
    T.FLOAT: frozenset({T.DOUBLE}),
}


@register_pass
class EliminateNoopCast(NodeRewritePass):
    name = "eliminate_noop_cast"
    description = "Remove Casts to their input's own dtype and exact Cast chains (e.g. float32->float64->float32)."
    preserves_shapes = True
    op_types = ("Cast",)
    requires = frozenset({SHAPES})  # dtypes come with the shapes

    def rewrite(self, graph: gs.Graph, node: gs.Node, ctx: PassContext) -> None:
        target = node.attrs.get("to")
        if not isinstance(target, (int, np.integer)):
            raise Refused("its 'to' attribute is not an ONNX type id (opset < 6)")
        target = int(target)
        source, out = node.inputs[0], node.outputs[0]
        source_type = elem_type(source)
        if source_type is None:
            raise Refused("its input's dtype is unknown")
        if source_type == target:
            bypass(graph, node, source, out)
            return
        converts = f"it converts {_name(source_type)} to {_name(target)}"
        inner = producer(source)
        if inner is None or inner.op != "Cast":
            raise Refused(converts)
        chained = [node.name, inner.name]
        first = inner.inputs[0]
        first_type = elem_type(first)
        if first_type is None:
            raise Refused(f"{converts}; the input dtype of Cast '{inner.name}' is unknown", chained)
        chain = f"{_name(first_type)}->{_name(source_type)}->{_name(target)}"
        if source_type not in EXACT_WIDENINGS.get(first_type, ()):
            raise Refused(f"{converts}; the chain {chain} is not exact ({_name(first_type)}->{_name(source_type)} "
                          "may round)", chained)
        sole = sole_consumer(graph, source) is node
        if target == first_type:  # a lossless round trip: both Casts go
            try:
                check_bypass(graph, first, out)
            except Refused as refused:
                raise Refused(f"the chain {chain} is a round trip, but {refused.reason}",
                              [*chained, *refused.nodes]) from None
            if sole:
                detach(inner)
            bypass(graph, node, first, out)
            return
        # One conversion from the same exact value; only within one family, where Cast is value-based.
        if not ({first_type, source_type, target} <= _INTS or {first_type, source_type, target} <= _FLOATS):
            raise Refused(f"{converts}; the chain {chain} mixes integer, float or bool types and is not proven exact",
                          chained)
        if not sole:
            raise Refused(f"{converts}; Cast '{inner.name}' has other consumers or is a graph output", chained)
        node.inputs[0] = first
        detach(inner)


def elem_type(tensor: gs.Tensor) -> int | None:
    """The ONNX element type of a tensor, from its values or the dtype shape inference recorded."""
    dtype = tensor.dtype  # a Constant knows its dtype without reading its values (they may be on disk)
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)):  # graphsurgeon keeps ONNX ids for types numpy lacks
        return int(dtype)
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (KeyError, TypeError, ValueError):
        return None


def _name(elem: int) -> str:
    return onnx.TensorProto.DataType.Name(elem).lower() if elem in onnx.TensorProto.DataType.values() else str(elem)
