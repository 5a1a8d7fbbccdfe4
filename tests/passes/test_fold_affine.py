import numpy as np
import pytest

from conftest import GraphBuilder, reasons, apply, assert_same_outputs, op_types


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (6, 1, 1), (1,), ()])
def test_per_channel_constant_folds(op, shape):
    g = GraphBuilder((1, 3, 8, 8))
    conv = g.conv("x", 3, 6, pads=[1, 1, 1, 1])
    constant = g.rng.uniform(0.5, 2.0, shape).astype(np.float32)
    model = g.build(g.node(op, [conv, g.const(constant)]))
    run = apply(model, "fold_affine")
    assert op_types(run.model) == ["Conv"]
    assert_same_outputs(model, run.model, (1, 3, 8, 8))


def test_constant_first_operand_of_mul():
    g = GraphBuilder((1, 3, 5, 5))
    conv = g.conv("x", 3, 4)
    model = g.build(g.node("Mul", [g.const(g.rng.standard_normal((1, 4, 1, 1)).astype(np.float32)), conv]))
    run = apply(model, "fold_affine")
    assert op_types(run.model) == ["Conv"]
    assert_same_outputs(model, run.model, (1, 3, 5, 5))


@pytest.mark.parametrize("shape,reason", [((1, 4, 5, 1), "not per-channel"), ((1, 1, 4, 1, 1), "higher rank")])
def test_non_per_channel_constants_are_refused(shape, reason):
    g = GraphBuilder((1, 3, 7, 7))
    conv = g.conv("x", 3, 4)
    model = g.build(g.node("Add", [conv, g.const(np.ones(shape, np.float32))]))
    run = apply(model, "fold_affine")
    assert "Add" in op_types(run.model)
    assert reason in reasons(run, "fold_affine")


def test_sub_with_conv_second_is_refused():
    g = GraphBuilder((1, 3, 5, 5))
    conv = g.conv("x", 3, 4)
    model = g.build(g.node("Sub", [g.const(np.ones((1, 4, 1, 1), np.float32)), conv]))
    run = apply(model, "fold_affine")
    assert "second operand" in reasons(run, "fold_affine")


def test_division_by_zero_channel_is_refused():
    g = GraphBuilder((1, 3, 5, 5))
    conv = g.conv("x", 3, 2)
    model = g.build(g.node("Div", [conv, g.const(np.array([1.0, 0.0], np.float32).reshape(1, 2, 1, 1))]))
    run = apply(model, "fold_affine")
    assert "divides by zero" in reasons(run, "fold_affine")


def test_multi_consumer_conv_output_is_refused():
    g = GraphBuilder((1, 3, 5, 5))
    conv = g.conv("x", 3, 2)
    model = g.build([g.node("Mul", [conv, g.const(np.float32(2.0))]), conv])
    run = apply(model, "fold_affine")
    assert op_types(run.model).count("Mul") == 1
    assert "other consumers" in reasons(run, "fold_affine")
