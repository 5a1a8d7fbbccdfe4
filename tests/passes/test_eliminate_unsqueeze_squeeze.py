import numpy as np
import pytest

from conftest import GraphBuilder, apply, assert_same_outputs, op_types, reasons

PASS = "eliminate_unsqueeze_squeeze"


def _op(g: GraphBuilder, op: str, x: str, axes, opset: int) -> str:
    """Squeeze/Unsqueeze with axes as an attribute (opset < 13) or an input (opset >= 13)."""
    if axes is None:
        return g.node(op, [x])
    if opset < 13:
        return g.node(op, [x], axes=list(axes))
    return g.node(op, [x, g.const(np.asarray(axes, np.int64), "axes")])


def _known_rank(g: GraphBuilder, x: str) -> str:
    """Reshape to a rank-2 shape, so the graph output is typed even where shape inference gives up."""
    return g.node("Reshape", [x, g.const(np.array([-1, 3], np.int64), "shape")])


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("unsqueeze_axes,squeeze_axes", [
    ([0], [0]),
    ([1, 3], [3, 1]),
    ([-1], [3]),  # -1 of the rank-4 Unsqueeze output
    ([0, 4], [-5, -1]),
    ([1], None),  # Squeeze without axes drops exactly the inserted size-1 dim (x has none)
])
def test_unsqueeze_then_squeeze_is_removed(opset, unsqueeze_axes, squeeze_axes):
    g = GraphBuilder((2, 3, 4), opset=opset)
    pair = _op(g, "Squeeze", _op(g, "Unsqueeze", "x", unsqueeze_axes, opset), squeeze_axes, opset)
    model = g.build(g.node("Relu", [pair]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert_same_outputs(model, run.model, (2, 3, 4))


@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("squeeze_axes,unsqueeze_axes", [
    ([1], [1]),
    ([-3], [1]),
    (None, [3, 1]),
])
def test_squeeze_then_unsqueeze_is_removed(opset, squeeze_axes, unsqueeze_axes):
    g = GraphBuilder((2, 1, 4, 1), opset=opset)
    pair = _op(g, "Unsqueeze", _op(g, "Squeeze", "x", squeeze_axes, opset), unsqueeze_axes, opset)
    model = g.build(g.node("Relu", [pair]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert_same_outputs(model, run.model, (2, 1, 4, 1))


@pytest.mark.parametrize("opset", [11, 13])
def test_different_axes_are_refused(opset):
    g = GraphBuilder((2, 1, 4), opset=opset)
    pair = _op(g, "Squeeze", _op(g, "Unsqueeze", "x", [0], opset), [2], opset)
    model = g.build(g.node("Relu", [pair]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Unsqueeze", "Squeeze", "Relu"]
    assert "Unsqueeze axes [0] differ from Squeeze axes [2]" in reasons(run, PASS)
    assert "its input is not produced by an Squeeze" in reasons(run, PASS)


def test_squeeze_without_axes_on_a_dynamic_shape_is_refused():
    g = GraphBuilder(("N", 3), opset=13)
    pair = _op(g, "Squeeze", _op(g, "Unsqueeze", "x", [1], 13), None, 13)
    model = g.build(_known_rank(g, pair))
    run = apply(model, PASS)
    assert "Squeeze" in op_types(run.model)
    assert "no axes and its input shape is not static" in reasons(run, PASS)


def test_squeeze_without_axes_that_also_drops_an_input_dim_is_refused():
    g = GraphBuilder((2, 1, 4), opset=13)
    pair = _op(g, "Squeeze", _op(g, "Unsqueeze", "x", [0], 13), None, 13)
    model = g.build(g.node("Relu", [pair]))
    run = apply(model, PASS)
    assert "Squeeze" in op_types(run.model)
    assert "Unsqueeze axes [0] differ from Squeeze axes [0, 2]" in reasons(run, PASS)


def test_runtime_axes_are_refused():
    g = GraphBuilder((2, 3), opset=13)
    axes = g.node("Shape", [g.const(np.zeros((0,), np.float32))])  # not a constant to the pass
    unsqueezed = g.node("Unsqueeze", ["x", g.const(np.array([0], np.int64))])
    model = g.build(_known_rank(g, g.node("Squeeze", [unsqueezed, axes])))
    run = apply(model, PASS)
    assert "Squeeze" in op_types(run.model)
    assert "axes input is not a constant" in reasons(run, PASS)


def test_pair_on_graph_output_keeps_the_name_and_shared_inner_stays():
    g = GraphBuilder((2, 3), opset=13)
    unsqueezed = _op(g, "Unsqueeze", g.node("Relu", ["x"]), [0], 13)
    out = _op(g, "Squeeze", unsqueezed, [0], 13)
    model = g.build([out, g.node("Neg", [unsqueezed])])
    run = apply(model, PASS)
    assert sorted(op_types(run.model)) == ["Neg", "Relu", "Unsqueeze"]
    assert run.model.graph.output[0].name == out
    assert_same_outputs(model, run.model, (2, 3))


def test_pair_from_input_to_output_is_kept():
    g = GraphBuilder((2, 3), opset=13)
    model = g.build(_op(g, "Squeeze", _op(g, "Unsqueeze", "x", [0], 13), [0], 13))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Unsqueeze", "Squeeze"]
    assert "preserve the output name" in reasons(run, PASS)
