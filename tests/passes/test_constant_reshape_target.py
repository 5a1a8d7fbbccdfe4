"""constant_reshape_target: a run-time Reshape target becomes a constant with 0 / -1 where shapes prove it."""

import numpy as np
import pytest
from onnx import TensorProto

from conftest import GraphBuilder, apply, assert_same_outputs, op_types, reasons
from onnxmerge.pass_framework import Refused
from onnxmerge.passes.constant_reshape_target import constant_target


def _int64(g, values):
    return g.const(np.asarray(values, np.int64), "i")


def _flatten_by_batch(g: GraphBuilder, x: str) -> str:
    """``x.view(x.size(0), -1)`` as torch exports it with a dynamic batch."""
    batch = g.node("Unsqueeze", [g.node("Gather", [g.node("Shape", [x]), _int64(g, 0)], axis=0), _int64(g, [0])])
    return g.node("Reshape", [x, g.node("Concat", [batch, _int64(g, [-1])], axis=0)])


def test_flatten_by_dynamic_batch_gets_a_constant_target():
    g = GraphBuilder(("N", 3, 4, 4))
    out = _flatten_by_batch(g, g.node("Relu", ["x"]))
    model = g.build(g.node("Relu", [out]), shapes={})
    run = apply(model, "constant_reshape_target", "cleanup")
    assert op_types(run.model) == ["Relu", "Reshape", "Relu"]
    shape = next(t for t in run.model.graph.initializer if t.name.endswith(".shape"))
    assert list(np.frombuffer(shape.raw_data, np.int64)) in ([0, 48], [0, -1])  # the batch is copied, never a number
    for batch in (1, 5):
        assert_same_outputs(model, run.model, (batch, 3, 4, 4))


def test_reshape_back_to_another_tensors_shape():
    """tf2onnx: ``Reshape(y, Cast(Shape(x)))`` where y has x's element count: every dim is proven."""
    g = GraphBuilder(("N", 6, 5))
    y = g.node("Reshape", ["x", _int64(g, [0, 30])])
    target = g.node("Cast", [g.node("Cast", [g.node("Shape", ["x"])], to=TensorProto.INT32)], to=TensorProto.INT64)
    model = g.build(g.node("Relu", [g.node("Reshape", [g.node("Relu", [y]), target])]), shapes={})
    run = apply(model, "constant_reshape_target", "cleanup")
    assert "Shape" not in op_types(run.model)
    assert_same_outputs(model, run.model, (3, 6, 5))


def test_two_unknown_dims_are_refused():
    g = GraphBuilder(("N", "M", 4))
    target = g.node("Concat", [g.node("Shape", ["x"], end=2), _int64(g, [2, 2])], axis=0)
    target = g.node("Slice", [target, _int64(g, [1]), _int64(g, [4])])  # [M, 2, 2]: M is at the wrong place
    model = g.build(g.node("Reshape", [g.node("Relu", ["x"]), g.node("Concat", [_int64(g, [-1]), target], axis=0)]),
                    shapes={})
    run = apply(model, "constant_reshape_target")
    assert "Shape" in op_types(run.model)
    assert "neither static nor copies" in reasons(run, "constant_reshape_target")


def test_constant_targets_are_not_candidates():
    g = GraphBuilder((2, 3, 4))
    model = g.build(g.node("Reshape", ["x", _int64(g, [6, 4])]))
    run = apply(model, "constant_reshape_target")
    assert run.refusals == {}


@pytest.mark.parametrize("data,output,allowzero,want", [
    (["N", 3, 4], ["N", 12], 0, [0, 12]),
    (["N", 3, 4], [12, "N"], 0, [12, -1]),
    (["N", 3, 4], ["N", 12], 1, [-1, 12]),              # allowzero=1: 0 would mean size zero
    (["N", "M"], ["N", "M"], 0, [0, 0]),
    (None, [2, 6], 0, [2, 6]),
    (["N", 3], ["N", 0, 3], 0, "is 0"),                 # a real zero would be read as "copy"
    (["N", "M"], ["M", "N"], 0, "neither static"),
    (["N"], None, 0, "unknown"),
])
def test_constant_target_rule(data, output, allowzero, want):
    if isinstance(want, str):
        with pytest.raises(Refused) as refused:
            constant_target(data, output, allowzero)
        assert want in refused.value.reason
    else:
        assert constant_target(data, output, allowzero) == want
