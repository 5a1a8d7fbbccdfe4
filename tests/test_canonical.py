"""Exporter quirks: numeric dynamic dims, initializers listed as inputs, weights in Constant nodes,
Identity chains, overwritten input shapes. Each on a small hand-made graph, through the public fold."""

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxmerge
from conftest import GraphBuilder, assert_same_outputs, op_types
from onnxmerge.canonical import canonicalize, is_dynamic_dim
from onnxmerge.errors import BadInputError


def _conv_bn(batch_dim, ir_version=8, opset=17):
    g = GraphBuilder((1, 3, 8, 8), opset=opset)
    model = g.build(g.batchnorm(g.conv("x", 3, 4, pads=[1, 1, 1, 1]), 4), ir_version=ir_version)
    for value in list(model.graph.input) + list(model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = batch_dim
    return model


@pytest.mark.parametrize("written", [-1, 0])
def test_numeric_dynamic_dims_are_dynamic(written):
    model = _conv_bn(written)
    result = onnxmerge.fold(model, input_shapes={"x": (2, 3, 8, 8)})  # used to be refused: "the model fixes it to -1"
    assert result.verified and result.report["verification"]["input_shapes"] == {"x": [2, 3, 8, 8]}
    assert op_types(result.proto) == ["Conv"]
    dim = result.proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "x_dim0"
    assert any(f"written as {written}" in note for note in result.report["canonicalization"])
    assert_same_outputs(canonicalize(model).model, result.proto, (3, 3, 8, 8))


def test_numeric_dynamic_dims_are_not_unknown_dims_for_stats():
    assert is_dynamic_dim(helper.make_tensor_value_info("a", 1, [-1]).type.tensor_type.shape.dim[0])
    assert not is_dynamic_dim(helper.make_tensor_value_info("a", 1, [3]).type.tensor_type.shape.dim[0])


def test_initializers_listed_as_graph_inputs_old_ir():
    model = _conv_bn(1, opset=8)
    for tensor in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    model.ir_version = 3  # IR 3 required every initializer to be listed as an input
    onnx.checker.check_model(model)
    result = onnxmerge.fold(model)
    assert result.verified
    assert [v.name for v in result.proto.graph.input] == ["x"]
    assert result.proto.ir_version >= 4 and result.proto.opset_import[0].version == 8
    assert op_types(result.proto) == ["Conv"]
    assert_same_outputs(model, result.proto, (1, 3, 8, 8))


def test_weights_in_constant_nodes_fold():
    """paddle2onnx style: no initializers at all, every weight a Constant node."""
    model = _conv_bn(1)
    for tensor in list(model.graph.initializer):
        model.graph.node.insert(0, helper.make_node("Constant", [], [tensor.name], value=tensor))
    del model.graph.initializer[:]
    result = onnxmerge.fold(model)
    assert op_types(result.proto) == ["Conv"]
    assert_same_outputs(model, result.proto, (1, 3, 8, 8))


def test_identity_chains_on_weights_and_activations():
    g = GraphBuilder((1, 3, 8, 8))
    weight = g.const(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32))
    for _ in range(3):
        weight = g.node("Identity", [weight])
    x = "x"
    for _ in range(3):
        x = g.node("Identity", [x])
    out = g.node("Identity", [g.node("Identity", [g.node("Conv", [x, weight])])])
    model = g.build(out, shapes={out: [1, 4, 6, 6]})
    result = onnxmerge.fold(model)
    assert op_types(result.proto) == ["Conv"]
    assert [o.name for o in result.proto.graph.output] == [out]
    assert_same_outputs(model, result.proto, (1, 3, 8, 8))


def test_canonicalize_never_modifies_its_argument():
    model = _conv_bn(-1)
    before = model.SerializeToString()
    canonical = canonicalize(model, {"x": (2, 3, 8, 8)})
    assert model.SerializeToString() == before
    assert canonical.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


@pytest.mark.parametrize("shapes,match", [
    ({"y": (1, 3, 8, 8)}, "unknown input"),
    ({"x": (1, 3, 8)}, "rank"),
    ({"x": (1, 4, 8, 8)}, "fixes it to 3"),
])
def test_overwrite_input_shapes_bad_input(shapes, match):
    with pytest.raises(BadInputError, match=match):
        onnxmerge.fold(_conv_bn(-1), overwrite_input_shapes=shapes)
