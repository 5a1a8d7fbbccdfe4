"""The layered compatibility check: each incompatible pair is refused at its level, naming where."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge.merging import IncompatibleModelsError, check_compatible, soup

from conftest import GraphBuilder
from soup_helpers import initializer_arrays, small_cnn


def _refused(a, b) -> IncompatibleModelsError:
    with pytest.raises(IncompatibleModelsError) as caught:
        check_compatible([a, b])
    return caught.value


def test_compatible_models_pass_every_level():
    report = check_compatible([small_cnn(0), small_cnn(1), small_cnn(2)])
    assert report["levels_passed"] == ["quantization", "container", "signature", "topology", "initializers", "values"]
    assert report["tensors"] == 10 and report["roles"] == {"weight": 8, "bn_stats": 2}


def test_renamed_and_reordered_initializers_are_paired_by_structure():
    a, b = small_cnn(0), small_cnn(1)
    renames = {t.name: f"onnx::Weight_{900 - i}" for i, t in enumerate(b.graph.initializer)}
    for tensor in b.graph.initializer:
        tensor.name = renames[tensor.name]
    for node in b.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    shuffled = list(b.graph.initializer)[::-1]
    del b.graph.initializer[:]
    b.graph.initializer.extend(shuffled)
    onnx.checker.check_model(b)
    report = check_compatible([a, b])
    assert report["renamed_tensors"] == 10 and "paired by their position" in report["warnings"][0]
    merged = soup([a, b]).model
    original_b = initializer_arrays(small_cnn(1))
    for got, first, second in zip(initializer_arrays(merged), initializer_arrays(a), original_b):
        np.testing.assert_allclose(got, (first + second) / 2, rtol=1e-6, atol=1e-7)


def test_different_topology_names_the_node():
    b = small_cnn(1)
    next(n for n in b.graph.node if n.op_type == "Relu").op_type = "Sigmoid"
    error = _refused(small_cnn(0), b)
    assert error.level == "topology"
    assert "is Relu 'Relu" in str(error) and "but Sigmoid 'Relu" in str(error)


def test_an_extra_node_is_reported_with_the_node_counts():
    b = small_cnn(1)
    relu = next(n for n in b.graph.node if n.op_type == "Relu")
    b.graph.node.insert(list(b.graph.node).index(relu) + 1, helper.make_node("Identity", [relu.output[0]], ["extra"],
                                                                             name="extra_identity"))
    for node in b.graph.node:
        if node.op_type in ("Conv", "Add") and relu.output[0] in node.input:
            node.input[:] = ["extra" if name == relu.output[0] else name for name in node.input]
    onnx.checker.check_model(b)
    error = _refused(small_cnn(0), b)
    assert error.level == "topology"
    assert "has 9 nodes" in str(error) and "has 8" in str(error) and "Identity 'extra_identity'" in str(error)


def test_same_shapes_but_gemm_transB_differs():
    error = _refused(small_cnn(0, transB=1, channels=5), small_cnn(0, transB=0, channels=5))
    assert error.level == "topology"
    assert "Gemm" in str(error) and "attribute transB = 1" in str(error) and "but 0" in str(error)


def _grouped(group: int, width: int) -> onnx.ModelProto:
    """A 1x1 conv to ``width`` channels, then a 3x3 conv whose weight is (8, 4, 3, 3) for both groupings."""
    g = GraphBuilder((1, 8, 6, 6))
    return g.build(g.conv(g.conv("x", 8, width, k=1), width, 8, groups=group))


def test_same_weight_shape_but_conv_group_differs():
    error = _refused(_grouped(1, 4), _grouped(2, 8))
    assert error.level == "topology" and "attribute group = 1" in str(error) and "but 2" in str(error)


def test_different_dtypes_are_refused_at_signature_and_initializer_level():
    def gather(index_dtype, float_type=TensorProto.FLOAT):
        g = GraphBuilder((1, 4))
        g.input.type.tensor_type.elem_type = float_type
        np_float = helper.tensor_dtype_to_np_dtype(float_type)
        picked = g.node("Gather", [g.const(np.arange(12, dtype=np_float).reshape(6, 2)),
                                   g.const(np.array([0, 3], dtype=index_dtype))])
        return g.build(g.node("Add", ["x", g.node("Reshape", [picked, g.const(np.array([1, 4]))])]))

    error = _refused(gather(np.int64), gather(np.int64, TensorProto.FLOAT16))
    assert error.level == "signature" and "float32" in str(error) and "float16" in str(error)
    error = _refused(gather(np.int64), gather(np.int32))
    assert error.level == "initializers"
    assert "Gather" in str(error) and "input 1" in str(error) and "int64" in str(error) and "int32" in str(error)


def test_shape_mismatch_names_node_slot_and_both_shapes():
    error = _refused(small_cnn(0, channels=4), small_cnn(0, channels=6))
    assert error.level == "initializers"
    assert "Conv 'Conv" in str(error) and "input 1" in str(error)
    assert "(4, 3, 3, 3)" in str(error) and "(6, 3, 3, 3)" in str(error)


def test_integer_tensors_must_be_bit_identical():
    def reshaped(shape):
        g = GraphBuilder((1, 3, 2, 2))
        flat = g.node("Reshape", ["x", g.const(np.array(shape, dtype=np.int64))])
        return g.build(g.node("Gemm", [flat, g.const(np.ones((5, 12), np.float32))], transB=1))

    error = _refused(reshaped([1, 12]), reshaped([1, -1]))
    assert error.level == "values" and "Reshape" in str(error) and "[ 1,12]" in str(error) and "[ 1,-1]" in str(error)


def test_shared_versus_separate_weights_is_a_tying_difference():
    def two_convs(shared: bool):
        g = GraphBuilder((1, 4, 6, 6))
        weight = np.full((4, 4, 1, 1), 0.5, np.float32)
        first_weight = g.const(weight)
        first = g.node("Conv", ["x", first_weight])
        second = g.node("Conv", [first, first_weight if shared else g.const(weight)])
        return g.build(second)

    error = _refused(two_convs(True), two_convs(False))
    assert error.level == "initializers" and "tie" in str(error)


def test_quantized_models_are_refused():
    g = GraphBuilder((1, 4))
    weight = g.node("DequantizeLinear", [g.const(np.ones((4, 4), np.int8)), g.const(np.array(0.1, np.float32)),
                                         g.const(np.array(0, np.int8))])
    quantized = g.build(g.node("MatMul", ["x", weight]))
    error = _refused(quantized, quantized)
    assert error.level == "quantization" and "quantize the result" in str(error)


def test_container_differences_are_refused():
    a, b = small_cnn(0), small_cnn(1)
    b.opset_import[0].version = 16
    error = _refused(a, b)
    assert error.level == "container" and "ai.onnx: 17" in str(error) and "ai.onnx: 16" in str(error)
    c = small_cnn(1)
    c.ir_version = 9
    assert _refused(a, c).level == "container"


def test_constant_node_weights_are_paired_and_merged():
    def constant_weights(seed):
        g = GraphBuilder((1, 4), seed=seed)
        value = numpy_helper.from_array(g.rng.standard_normal((4, 3)).astype(np.float32), "w")
        weight = g.node("Constant", [], value=value)
        return g.build(g.node("MatMul", ["x", weight]))

    a, b = constant_weights(0), constant_weights(1)
    merged = soup([a, b]).model
    value = lambda m: numpy_helper.to_array(m.graph.node[0].attribute[0].t)  # noqa: E731
    np.testing.assert_allclose(value(merged), (value(a) + value(b)) / 2, rtol=1e-6)


def _with_if(seed: int, else_op: str = "Sub") -> onnx.ModelProto:
    """An If whose branches read a subgraph initializer and an outer one (a 0-d threshold, a vector)."""
    rng = np.random.default_rng(seed)
    then_weight = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "then_w")
    output = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])  # noqa: E731
    then_branch = helper.make_graph([helper.make_node("Add", ["x", "then_w"], ["then_y"])], "then", [],
                                    [output("then_y")], initializer=[then_weight])
    else_branch = helper.make_graph([helper.make_node(else_op, ["x", "outer_w"], ["else_y"])], "else", [],
                                    [output("else_y")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "threshold"], ["positive"]),
             helper.make_node("If", ["positive"], ["y"], then_branch=then_branch, else_branch=else_branch)]
    initializers = [numpy_helper.from_array(np.array(rng.standard_normal(), np.float32), "threshold"),
                    numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "outer_w")]
    graph = helper.make_graph(nodes, "if", [output("x")], [output("y")], initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_tensors_inside_subgraphs_are_paired_and_merged():
    a, b = _with_if(0), _with_if(1)
    merged = soup([a, b]).model
    then_weight = lambda m: numpy_helper.to_array(m.graph.node[2].attribute[1].g.initializer[0])  # noqa: E731
    np.testing.assert_allclose(then_weight(merged), (then_weight(a) + then_weight(b)) / 2, rtol=1e-6)
    threshold = lambda m: numpy_helper.to_array(m.graph.initializer[0])  # noqa: E731
    assert threshold(merged).shape == () and np.isclose(threshold(merged), (threshold(a) + threshold(b)) / 2)
    error = _refused(a, _with_if(1, else_op="Mul"))
    assert error.level == "topology" and "subgraph else_branch[0] of node 2 (If)" in str(error)
