import numpy as np
import pytest
from onnx import TensorProto as T

from conftest import GraphBuilder, apply, assert_same_outputs, op_types, reasons

PASS = "eliminate_noop_cast"


def test_cast_to_own_dtype_is_removed():
    g = GraphBuilder((2, 3))
    model = g.build(g.node("Relu", [g.node("Cast", ["x"], to=T.FLOAT)]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert_same_outputs(model, run.model, (2, 3))


def test_cast_of_constant_to_own_dtype_is_removed():
    g = GraphBuilder((2, 3))
    shift = g.node("Cast", [g.const(np.arange(3, dtype=np.float32))], to=T.FLOAT)
    model = g.build(g.node("Add", ["x", shift]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Add"]
    assert_same_outputs(model, run.model, (2, 3))


def test_noop_cast_on_graph_output_keeps_the_output_name():
    g = GraphBuilder((2, 3))
    out = g.node("Cast", [g.node("Relu", ["x"])], to=T.FLOAT)
    model = g.build(out)
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert run.model.graph.output[0].name == out
    assert_same_outputs(model, run.model, (2, 3))


def test_noop_cast_from_input_to_output_is_kept():
    g = GraphBuilder((2, 3))
    model = g.build(g.node("Cast", ["x"], to=T.FLOAT))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Cast"]
    assert "preserve the output name" in reasons(run, PASS)


def test_float32_float64_float32_round_trip_is_removed():
    g = GraphBuilder((2, 3))
    wide = g.node("Cast", ["x"], to=T.DOUBLE)
    model = g.build(g.node("Relu", [g.node("Cast", [wide], to=T.FLOAT)]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert_same_outputs(model, run.model, (2, 3), rtol=0, atol=0)


def test_exact_widening_chain_collapses_to_one_cast():
    g = GraphBuilder((2, 3))
    half = g.node("Cast", ["x"], to=T.FLOAT16)  # lossy, but it is the chain's input
    wide = g.node("Cast", [half], to=T.FLOAT)  # float16 -> float32 is exact
    model = g.build(g.node("Cast", [wide], to=T.DOUBLE))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Cast", "Cast"]
    assert_same_outputs(model, run.model, (2, 3), rtol=0, atol=0)


@pytest.mark.parametrize("middle,last,reason", [
    (T.FLOAT16, T.FLOAT, "float->float16 may round"),  # float32 -> float16 -> float32 loses bits
    (T.INT32, T.FLOAT, "float->int32 may round"),  # truncates
])
def test_inexact_round_trips_are_refused(middle, last, reason):
    g = GraphBuilder((2, 3))
    model = g.build(g.node("Relu", [g.node("Cast", [g.node("Cast", ["x"], to=middle)], to=last)]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Cast", "Cast", "Relu"]
    assert reason in reasons(run, PASS)


def test_mixed_family_chain_is_refused():
    g = GraphBuilder((2, 3))
    small = g.node("Cast", ["x"], to=T.INT8)
    wide = g.node("Cast", [small], to=T.INT32)  # exact
    model = g.build(g.node("Cast", [wide], to=T.FLOAT))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Cast", "Cast", "Cast"]
    assert "not proven exact" in reasons(run, PASS)


def test_integer_round_trip_through_float_is_removed():
    g = GraphBuilder((2, 3))
    small = g.node("Cast", ["x"], to=T.INT8)
    back = g.node("Cast", [g.node("Cast", [small], to=T.FLOAT)], to=T.INT8)  # int8 fits float exactly
    model = g.build(g.node("Cast", [back], to=T.INT32))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Cast", "Cast"]
    assert_same_outputs(model, run.model, (2, 3), rtol=0, atol=0)


def test_round_trip_with_shared_inner_cast_removes_the_outer_one():
    g = GraphBuilder((2, 3))
    wide = g.node("Cast", ["x"], to=T.DOUBLE)
    model = g.build([g.node("Relu", [g.node("Cast", [wide], to=T.FLOAT)]), g.node("Neg", [wide])])
    run = apply(model, PASS)
    assert sorted(op_types(run.model)) == ["Cast", "Neg", "Relu"]
    assert_same_outputs(model, run.model, (2, 3))


def test_opset6_real_conversion_is_refused_with_the_types():
    g = GraphBuilder((2, 3), opset=6)
    model = g.build(g.node("Cast", [g.node("Relu", ["x"])], to=T.DOUBLE))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu", "Cast"]
    assert "converts float to double" in reasons(run, PASS)
