import numpy as np

from conftest import GraphBuilder, apply, assert_same_outputs, op_types


def test_dead_nodes_unused_and_duplicate_initializers_removed():
    g = GraphBuilder((1, 3))
    a = g.const(np.arange(3, dtype=np.float32))
    b = g.const(np.arange(3, dtype=np.float32))
    g.const(np.ones(7, np.float32))  # unused
    g.node("Neg", ["x"])  # dead
    out = g.node("Add", [g.node("Mul", ["x", a]), b])
    model = g.build(out)
    run = apply(model, "cleanup")
    assert op_types(run.model) == ["Mul", "Add"]
    assert len(run.model.graph.initializer) == 1
    assert_same_outputs(model, run.model, (1, 3))


def test_same_bytes_different_dtype_are_not_merged():
    g = GraphBuilder((1, 2))
    a = g.const(np.zeros(2, np.float32))
    b = g.const(np.zeros(2, np.int32))
    out = g.node("Add", ["x", a])
    model = g.build([out, g.node("Cast", [b], to=1)])
    run = apply(model, "cleanup")
    assert len(run.model.graph.initializer) == 2
