"""fold_constants: constant subgraphs (shape arithmetic over static dims included) become initializers."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxmerge
from conftest import GraphBuilder, apply, assert_same_outputs, op_types, reasons
from onnxmerge.passes import DEFAULT_PIPELINE
from onnxmerge.pipeline import run_pipeline


def _int64(g: GraphBuilder, values) -> str:
    return g.const(np.asarray(values, np.int64), "i")


def _same_padding_graph(batch="N"):
    """TF-"same" pads computed at run time as torch's legacy exporter writes them: Shape of the input,
    arithmetic, ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast, then a Pad before a stride-2 Conv."""
    g = GraphBuilder((batch, 3, 9, 9))
    shape = g.node("Shape", ["x"])
    spatial = g.node("Slice", [shape, _int64(g, [2]), _int64(g, [4]), _int64(g, [0])])
    # total pad per axis for k=3, s=2: max((ceil(i/2)-1)*2 + 3 - i, 0) = 2 for i = 9
    half = g.node("Div", [g.node("Add", [spatial, _int64(g, [1, 1])]), _int64(g, [2])])
    total = g.node("Max", [g.node("Sub", [g.node("Add", [g.node("Mul", [g.node("Sub", [half, _int64(g, [1, 1])]),
                                                                       _int64(g, [2, 2])]),
                                                        _int64(g, [3, 3])]), spatial]),
                           _int64(g, [0, 0])])
    begin = g.node("Div", [total, _int64(g, [2, 2])])
    end = g.node("Sub", [total, begin])
    # torch order [w_begin, w_end, h_begin, h_end] -> ONNX order via Concat/Reshape/Slice/Transpose
    pairs = g.node("Concat", [g.node("Unsqueeze", [begin, _int64(g, [1])]),
                              g.node("Unsqueeze", [end, _int64(g, [1])])], axis=1)        # [[hb, he], [wb, we]]
    zeros = g.node("ConstantOfShape", [_int64(g, [2, 2])],
                   value=helper.make_tensor("v", TensorProto.INT64, [1], [0]))
    full = g.node("Concat", [zeros, pairs], axis=0)                                      # N, C, H, W rows
    pads = g.node("Cast", [g.node("Reshape", [g.node("Transpose", [full], perm=[1, 0]), _int64(g, [-1])])],
                  to=TensorProto.INT64)
    padded = g.node("Pad", ["x", pads], mode="constant")
    out = g.conv(padded, 3, 4, strides=[2, 2])
    return g.build(out, shapes={out: [batch, 4, 4, 4]})


def test_same_padding_machinery_folds_into_conv_pads():
    model = _same_padding_graph()
    run = run_pipeline(model, DEFAULT_PIPELINE)
    assert op_types(run.model) == ["Conv"]
    conv = run.model.graph.node[0]
    assert [a.ints for a in conv.attribute if a.name == "pads"][0] == [1, 1, 1, 1]
    assert run.rewrites_per_pass()["fold_constants"] > 10
    for batch in (1, 3):  # the batch stayed dynamic: the pads never read it
        assert_same_outputs(model, run.model, (batch, 3, 9, 9))
    assert run.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_shape_of_dynamic_dim_is_not_folded_and_says_why():
    g = GraphBuilder(("N", 3, 4, 4))
    batch = g.node("Gather", [g.node("Shape", ["x"]), _int64(g, [0])], axis=0)
    target = g.node("Concat", [batch, _int64(g, [-1])], axis=0)
    model = g.build(g.node("Reshape", ["x", target]), shapes={})
    run = apply(model, "fold_constants")
    assert "Shape" in op_types(run.model) and "Gather" in op_types(run.model)
    assert "reads dynamic dims (N)" in reasons(run, "fold_constants")
    assert_same_outputs(model, run.model, (2, 3, 4, 4))


def test_static_dims_of_a_partly_dynamic_shape_fold():
    g = GraphBuilder(("N", 3, 4, 5))
    width = g.node("Gather", [g.node("Shape", ["x"]), _int64(g, [3])], axis=0)
    scale = g.node("Cast", [width], to=TensorProto.FLOAT)
    model = g.build(g.node("Mul", ["x", scale]), shapes={})
    run = apply(model, "fold_constants")
    assert op_types(run.model) == ["Mul"]
    for batch in (1, 2):
        assert_same_outputs(model, run.model, (batch, 3, 4, 5))


def test_overwrite_input_shapes_folds_batch_arithmetic_and_fixes_the_declared_dim():
    g = GraphBuilder(("N", 3, 4, 4))
    batch = g.node("Gather", [g.node("Shape", ["x"]), _int64(g, [0])], axis=0)
    target = g.node("Concat", [batch, _int64(g, [-1])], axis=0)
    model = g.build(g.node("Reshape", ["x", target]), shapes={})
    result = onnxmerge.fold(model, overwrite_input_shapes={"x": (2, 3, 4, 4)})
    assert op_types(result.proto) == ["Reshape"]
    assert result.proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert any("fixed to 2" in note for note in result.report["canonicalization"])
    # Without pinning, the batch stays dynamic: the shape computation is kept, or turned into a constant
    # target that copies the batch (0), never a number.
    kept = onnxmerge.fold(model, input_shapes={"x": (3, 3, 4, 4)})
    assert kept.proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert_same_outputs(model, kept.proto, (5, 3, 4, 4))


@pytest.mark.parametrize("limit,folded", [(1 << 20, False), (8 << 20, True)])
def test_size_cap_keeps_a_blow_up_unfolded(limit, folded):
    g = GraphBuilder((1000, 1000))
    big = g.node("Expand", [g.const(np.ones((1, 1), np.float32)), _int64(g, [1000, 1000])])  # 4 MB of ones
    model = g.build(g.node("Add", ["x", big]))
    run = apply(model, "fold_constants", fold_size_limit_bytes=limit)
    assert ("Expand" not in op_types(run.model)) == folded
    if not folded:
        assert "over the fold size limit" in reasons(run, "fold_constants")
        assert run.model.ByteSize() < 100_000
    assert_same_outputs(model, run.model, (1000, 1000))


def test_folded_weight_transform_is_stored_even_when_large():
    """A Transpose of a 4 MB weight read only there folds: storing the result frees the input."""
    g = GraphBuilder((2, 1000))
    weight = g.const((np.random.default_rng(0).standard_normal((1000, 1000)) / 32).astype(np.float32))
    model = g.build(g.node("MatMul", ["x", g.node("Transpose", [weight], perm=[1, 0])]))
    run = apply(model, "fold_constants", "cleanup")
    assert op_types(run.model) == ["MatMul"]
    assert len(run.model.graph.initializer) == 1
    assert_same_outputs(model, run.model, (2, 1000), atol=1e-4)  # float32 sums of 1000 terms, reordered


def test_nondeterministic_ops_are_never_folded():
    g = GraphBuilder((2, 3))
    noise = g.node("RandomNormal", [], shape=[2, 3], dtype=TensorProto.FLOAT)
    model = g.build(g.node("Add", ["x", g.node("Mul", [noise, g.const(np.zeros((2, 3), np.float32))])]))
    run = apply(model, "fold_constants")
    assert "RandomNormal" in op_types(run.model)


def test_constant_graph_output_keeps_its_name():
    g = GraphBuilder((2, 3))
    const_out = g.node("Add", [g.const(np.ones(3, np.float32)), g.const(np.ones(3, np.float32))])
    model = g.build([g.node("Relu", ["x"]), const_out])
    result = onnxmerge.fold(model)
    assert [o.name for o in result.proto.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, result.proto, (2, 3))


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 17, 21])
def test_opsets_fold_and_are_never_lowered(opset):
    g = GraphBuilder((1, 3, 6, 6), opset=opset)
    scale = g.node("Mul", [g.const(np.full((1, 4, 1, 1), 2.0, np.float32)),
                           g.const(np.full((1, 4, 1, 1), 0.5, np.float32))])
    model = g.build(g.node("Add", [g.conv("x", 3, 4, pads=[1, 1, 1, 1]), scale]))
    result = onnxmerge.fold(model)
    assert result.verified
    assert op_types(result.proto) == ["Conv"]
    assert result.proto.opset_import[0].version == opset
