import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import GraphBuilder, apply, assert_same_outputs, op_types, reasons

PASS = "eliminate_common_subexpressions"


def test_duplicate_chains_collapse():
    g = GraphBuilder((2, 3))
    left = g.node("Sigmoid", [g.node("Relu", ["x"])])
    right = g.node("Sigmoid", [g.node("Relu", ["x"])])
    model = g.build(g.node("Add", [left, right]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu", "Sigmoid", "Add"]
    assert_same_outputs(model, run.model, (2, 3))


def test_attributes_are_compared_by_value():
    g = GraphBuilder((2, 3, 4))
    same = [g.node("LeakyRelu", ["x"], alpha=0.2) for _ in range(2)]
    other = g.node("LeakyRelu", ["x"], alpha=0.3)
    perms = [g.node("Transpose", ["x"], perm=[1, 0, 2]), g.node("Transpose", ["x"], perm=[0, 2, 1])]
    model = g.build([g.node("Add", same), other, *perms])
    run = apply(model, PASS)
    assert op_types(run.model).count("LeakyRelu") == 2
    assert op_types(run.model).count("Transpose") == 2
    assert_same_outputs(model, run.model, (2, 3, 4))


def test_input_order_matters():
    g = GraphBuilder((2, 3))
    relu = g.node("Relu", ["x"])
    model = g.build(g.node("Add", [g.node("Sub", ["x", relu]), g.node("Sub", [relu, "x"])]))
    run = apply(model, PASS)
    assert op_types(run.model).count("Sub") == 2


def test_twin_constants_merge_after_cleanup_shares_them():
    g = GraphBuilder((2, 3))
    a = g.node("Mul", ["x", g.const(np.arange(3, dtype=np.float32))])
    b = g.node("Mul", ["x", g.const(np.arange(3, dtype=np.float32))])
    model = g.build(g.node("Add", [a, b]))
    assert op_types(apply(model, PASS).model).count("Mul") == 2  # different tensors: not (yet) duplicates
    run = apply(model, PASS, "cleanup")
    assert op_types(run.model) == ["Mul", "Add"]
    assert_same_outputs(model, run.model, (2, 3))


def test_duplicate_writing_a_graph_output_is_the_one_kept():
    g = GraphBuilder((2, 3))
    first = g.node("Relu", ["x"])
    second = g.node("Relu", ["x"])
    model = g.build([g.node("Neg", [first]), second])
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu", "Neg"]
    assert [o.name for o in run.model.graph.output] == [model.graph.output[0].name, second]
    assert_same_outputs(model, run.model, (2, 3))


def test_duplicates_both_writing_graph_outputs_are_refused():
    g = GraphBuilder((2, 3))
    model = g.build([g.node("Relu", ["x"]), g.node("Relu", ["x"])])
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu", "Relu"]
    assert "both write graph outputs" in reasons(run, PASS)


def test_random_ops_are_never_merged():
    g = GraphBuilder((2, 3))
    model = g.build(g.node("Add", [g.node("RandomNormalLike", ["x"], seed=1.0),
                                   g.node("RandomNormalLike", ["x"], seed=1.0)]))
    run = apply(model, PASS)
    assert op_types(run.model).count("RandomNormalLike") == 2
    assert "RandomNormalLike is nondeterministic" in reasons(run, PASS)


@pytest.mark.parametrize("training,merged", [(True, False), (False, True)])
def test_dropout_is_merged_only_out_of_training_mode(training, merged):
    g = GraphBuilder((2, 3), opset=13)
    ratio, mode = g.const(np.float32(0.5)), g.const(np.array(training))
    drops = [g.node("Dropout", ["x", ratio, mode]) for _ in range(2)]
    model = g.build(g.node("Add", drops))
    run = apply(model, PASS)
    assert op_types(run.model).count("Dropout") == (1 if merged else 2)
    if not merged:
        assert "training mode" in reasons(run, PASS)


def _branch(name: str, value: float):
    out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1])
    node = helper.make_node("Constant", [], [f"{name}_out"], value=helper.make_tensor("v", TensorProto.FLOAT, [1],
                                                                                      [value]))
    return helper.make_graph([node], name, [], [out])


def test_nodes_with_subgraphs_are_not_merged():
    g = GraphBuilder((2, 3), opset=13)
    cond = g.node("Greater", [g.node("ReduceSum", ["x"], keepdims=0), g.const(np.float32(0))])
    ifs = [g.node("If", [cond], then_branch=_branch(f"then{i}", 1.0), else_branch=_branch(f"else{i}", 2.0))
           for i in range(2)]
    model = g.build(g.node("Add", ifs))
    run = apply(model, PASS)
    assert op_types(run.model).count("If") == 2
    assert "subgraph" in reasons(run, PASS)
    assert_same_outputs(model, run.model, (2, 3))


def test_custom_domain_ops_are_not_merged():
    g = GraphBuilder((2, 3))
    model = g.build(g.node("Relu", ["x"]))
    relu = model.graph.node[0].output[0]
    for i in range(2):
        model.graph.node.append(helper.make_node("Noise", [relu], [f"n{i}"], name=f"noise{i}", domain="com.example"))
    model.graph.node.append(helper.make_node("Add", ["n0", "n1"], ["sum"], name="sum"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, [2, 3]))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    run = apply(model, PASS)
    assert op_types(run.model).count("Noise") == 2
    assert "determinism is unknown" in reasons(run, PASS)
