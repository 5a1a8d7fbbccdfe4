import numpy as np
import pytest

from conftest import GraphBuilder, apply, assert_same_outputs, op_types, reasons

PASS = "eliminate_noop_expand"


def _expand(g: GraphBuilder, x: str, shape) -> str:
    return g.node("Expand", [x, g.const(np.asarray(shape, np.int64), "shape")])


@pytest.mark.parametrize("shape", [[2, 3, 4], [1, 1], [3, 1], [1]])
def test_expand_to_own_shape_is_removed(shape):
    g = GraphBuilder((2, 3, 4))
    model = g.build(g.node("Relu", [_expand(g, "x", shape)]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert_same_outputs(model, run.model, (2, 3, 4))


def test_dynamic_batch_expand_of_ones_is_removed():
    g = GraphBuilder(("N", 3, 4))
    model = g.build(g.node("Relu", [_expand(g, "x", [1, 3, 1])]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert_same_outputs(model, run.model, (5, 3, 4))


@pytest.mark.parametrize("input_shape,shape,reason", [
    ((2, 1, 4), [2, 3, 4], "broadcasts (2, 1, 4) to (2, 3, 4)"),
    ((3, 4), [2, 3, 4], "broadcasts (3, 4) to (2, 3, 4)"),
    (("N", 4), [5, 4], "input dimension 0 is not static"),
    (("N", 4), [2, 1, 4], "raises the rank 2 -> 3"),
])
def test_refusals(input_shape, shape, reason):
    g = GraphBuilder(input_shape)
    model = g.build(g.node("Relu", [_expand(g, "x", shape)]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Expand", "Relu"]
    assert reason in reasons(run, PASS)


def test_graph_output_keeps_its_name_and_input_to_output_is_kept():
    g = GraphBuilder((2, 3))
    out = _expand(g, g.node("Relu", ["x"]), [1, 3])
    kept = _expand(g, "x", [2, 3])
    model = g.build([out, kept])
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu", "Expand"]
    assert [o.name for o in run.model.graph.output] == [out, kept]
    assert "preserve the output name" in reasons(run, PASS)
    assert_same_outputs(model, run.model, (2, 3))
