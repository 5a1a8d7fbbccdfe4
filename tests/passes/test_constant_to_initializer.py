import numpy as np
from onnx import helper, numpy_helper

from conftest import GraphBuilder, apply, assert_same_outputs, op_types, reasons


def test_constant_nodes_become_initializers():
    g = GraphBuilder((1, 3, 5, 5))
    weight = np.random.default_rng(0).standard_normal((2, 3, 3, 3)).astype(np.float32)
    g.nodes.append(helper.make_node("Constant", [], ["w"], name="c0", value=numpy_helper.from_array(weight)))
    g.nodes.append(helper.make_node("Constant", [], ["s"], name="c1", value_float=2.0))
    conv = g.node("Conv", ["x", "w"])
    model = g.build(g.node("Mul", [conv, "s"]))
    run = apply(model, "constant_to_initializer")
    assert op_types(run.model) == ["Conv", "Mul"]
    assert len(run.model.graph.initializer) == 2
    assert_same_outputs(model, run.model, (1, 3, 5, 5))


def test_constant_that_is_a_graph_output_stays():
    g = GraphBuilder((1,))
    g.nodes.append(helper.make_node("Constant", [], ["k"], name="c", value_float=1.0))
    model = g.build(["k", g.node("Relu", ["x"])])
    run = apply(model, "constant_to_initializer")
    assert "Constant" in op_types(run.model)
    assert "graph output" in reasons(run, "constant_to_initializer", "c")
