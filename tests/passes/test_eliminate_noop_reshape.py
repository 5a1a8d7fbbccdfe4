import numpy as np
import pytest

from conftest import GraphBuilder, apply, assert_same_outputs, op_types, reasons

PASS = "eliminate_noop_reshape"


def _reshape(g: GraphBuilder, x: str, shape, **attrs) -> str:
    return g.node("Reshape", [x, g.const(np.asarray(shape, np.int64), "shape")], **attrs)


def test_reshape_to_own_shape_is_removed():
    g = GraphBuilder((2, 3, 4))
    model = g.build(g.node("Relu", [_reshape(g, "x", [2, 3, 4])]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert_same_outputs(model, run.model, (2, 3, 4))


def test_noop_reshape_on_graph_output_keeps_the_output_name():
    g = GraphBuilder((2, 3, 4))
    out = _reshape(g, g.node("Relu", ["x"]), [0, 3, -1])
    model = g.build(out)
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert run.model.graph.output[0].name == out
    assert_same_outputs(model, run.model, (2, 3, 4))


def test_noop_reshape_from_input_to_output_is_kept():
    g = GraphBuilder((2, 3))
    model = g.build(_reshape(g, "x", [2, 3]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Reshape"]
    assert "preserve the output name" in reasons(run, PASS)


def test_dynamic_batch_with_copy_and_minus_one_is_removed():
    g = GraphBuilder(("N", 3, 4))
    model = g.build(g.node("Relu", [_reshape(g, "x", [-1, 3, 4])]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert_same_outputs(model, run.model, (5, 3, 4))


def test_dynamic_dims_not_provably_kept_are_refused():
    g = GraphBuilder(("N", "C", 4))
    model = g.build(g.node("Relu", [_reshape(g, "x", [0, -1, 4])]))
    run = apply(model, PASS)
    assert "Reshape" in op_types(run.model)
    assert "-1 entry" in reasons(run, PASS)


def test_real_reshape_is_refused_with_the_shapes():
    g = GraphBuilder((2, 3, 4))
    model = g.build(g.node("Relu", [_reshape(g, "x", [6, 4])]))
    run = apply(model, PASS)
    assert "Reshape" in op_types(run.model)
    assert "changes the shape (2, 3, 4) -> (6, 4)" in reasons(run, PASS)


def test_chain_collapses_to_one_reshape():
    g = GraphBuilder((2, 3, 4))
    model = g.build(g.node("Relu", [_reshape(g, _reshape(g, "x", [6, 4]), [4, -1])]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Reshape", "Relu"]
    assert_same_outputs(model, run.model, (2, 3, 4))


def test_chain_back_to_the_input_shape_disappears():
    g = GraphBuilder((2, 3, 4))
    model = g.build(g.node("Relu", [_reshape(g, _reshape(g, "x", [6, 4]), [2, 3, 4])]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert_same_outputs(model, run.model, (2, 3, 4))


def test_chain_zero_entry_is_resolved_against_the_inner_output():
    # 0 in the outer target copies dim 0 of the *inner* output (6), not of x (2).
    g = GraphBuilder((2, 3, 4))
    model = g.build(g.node("Relu", [_reshape(g, _reshape(g, "x", [6, 4]), [0, 2, 2])]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Reshape", "Relu"]
    assert_same_outputs(model, run.model, (2, 3, 4))


@pytest.mark.parametrize("inner_shape,outer_shape,left", [
    ([0, 12], [0, 3, 4], []),  # both copy axis 0 (the inner output's dim 0 is x's): back to x's shape
    ([-1, 4], [0, 2, 2], ["Reshape"]),  # the single unknown 0 becomes -1
])
def test_chain_zero_entry_on_a_dynamic_dim_is_resolved(inner_shape, outer_shape, left):
    g = GraphBuilder(("N", 3, 4))
    model = g.build(g.node("Relu", [_reshape(g, _reshape(g, "x", inner_shape), outer_shape)]))
    run = apply(model, PASS)
    assert op_types(run.model) == left + ["Relu"]
    assert_same_outputs(model, run.model, (3, 3, 4))


def test_chain_zero_entry_on_a_dynamic_dim_is_refused():
    g = GraphBuilder(("N", 3, 4))
    model = g.build(g.node("Relu", [_reshape(g, _reshape(g, "x", [-1, 4]), [0, -1])]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Reshape", "Reshape", "Relu"]
    assert "copies dimension 0 of the inner Reshape's output (0 entry), which is not static" in reasons(run, PASS)
    assert_same_outputs(model, run.model, (3, 3, 4))


def _runtime_target(g: GraphBuilder, shape) -> str:
    """A target shape computed at run time (Shape of a tensor), which no constant lookup can see."""
    return g.node("Shape", [g.const(np.zeros(shape, np.float32), "shaped")])


def test_opset14_allowzero_chain_merges_with_a_runtime_target():
    # With allowzero=1 a 0 in the outer target is a literal 0, so nothing depends on the inner output.
    g = GraphBuilder((2, 3, 4), opset=14)
    inner = _reshape(g, "x", [6, 4])
    model = g.build(g.node("Relu", [g.node("Reshape", [inner, _runtime_target(g, (4, 6))], allowzero=1)]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Shape", "Reshape", "Relu"]
    assert_same_outputs(model, run.model, (2, 3, 4))


def test_chain_with_shared_inner_reshape_is_refused():
    g = GraphBuilder((2, 3, 4))
    inner = _reshape(g, "x", [6, 4])
    model = g.build([g.node("Relu", [_reshape(g, inner, [4, 6])]), g.node("Neg", [inner])])
    run = apply(model, PASS)
    assert op_types(run.model).count("Reshape") == 2
    assert "has other consumers" in reasons(run, PASS)


def test_chain_with_runtime_target_is_refused_without_allowzero():
    g = GraphBuilder((2, 3, 4), opset=14)
    inner = _reshape(g, "x", [6, 4])
    model = g.build(g.node("Relu", [g.node("Reshape", [inner, _runtime_target(g, (4, 6))])]))
    run = apply(model, PASS)
    assert op_types(run.model).count("Reshape") == 2
    assert "target shape is not a constant" in reasons(run, PASS)
