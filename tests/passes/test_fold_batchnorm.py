import numpy as np
import pytest
from onnx import helper

from conftest import GraphBuilder, reasons, apply, assert_same_outputs, op_types


@pytest.mark.parametrize("epsilon", [1e-5, 1e-3, 0.1])
def test_conv_bn_folds_and_uses_epsilon(epsilon):
    g = GraphBuilder((1, 3, 9, 9))
    out = g.batchnorm(g.conv("x", 3, 6, pads=[1, 1, 1, 1]), 6, epsilon=epsilon)
    model = g.build(out)
    run = apply(model, "fold_batchnorm")
    assert op_types(run.model) == ["Conv"]
    assert run.model.graph.output[0].name == out
    assert_same_outputs(model, run.model, (1, 3, 9, 9))


def test_conv_without_bias_gets_one():
    g = GraphBuilder((2, 4, 7, 7))
    model = g.build(g.batchnorm(g.conv("x", 4, 5, bias=False), 5))
    run = apply(model, "fold_batchnorm")
    assert op_types(run.model) == ["Conv"]
    assert len(run.model.graph.node[0].input) == 3
    assert_same_outputs(model, run.model, (2, 4, 7, 7))


@pytest.mark.parametrize("groups", [1, 2])
def test_conv_transpose_bn(groups):
    g = GraphBuilder((1, 4, 5, 5))
    weight = g.const(g.rng.standard_normal((4, 6 // groups, 3, 3)).astype(np.float32))
    deconv = g.node("ConvTranspose", ["x", weight], strides=[2, 2], group=groups)
    model = g.build(g.batchnorm(deconv, 6))
    run = apply(model, "fold_batchnorm")
    assert op_types(run.model) == ["ConvTranspose"]
    assert_same_outputs(model, run.model, (1, 4, 5, 5))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn(trans_b):
    g = GraphBuilder((3, 8))
    shape = (5, 8) if trans_b else (8, 5)
    weight = g.const(g.rng.standard_normal(shape).astype(np.float32))
    bias = g.const(g.rng.standard_normal(5).astype(np.float32))
    gemm = g.node("Gemm", ["x", weight, bias], transB=trans_b, beta=0.5, alpha=1.5)
    model = g.build(g.batchnorm(gemm, 5))
    run = apply(model, "fold_batchnorm")
    assert op_types(run.model) == ["Gemm"]
    assert_same_outputs(model, run.model, (3, 8))


def test_refuses_when_conv_output_has_another_consumer():
    g = GraphBuilder((1, 3, 6, 6))
    conv = g.conv("x", 3, 4)
    bn = g.batchnorm(conv, 4)
    model = g.build([bn, g.node("Relu", [conv])])
    run = apply(model, "fold_batchnorm")
    assert "BatchNormalization" in op_types(run.model)
    assert "other consumers" in reasons(run, "fold_batchnorm")


def test_refuses_bn_after_relu():
    g = GraphBuilder((1, 3, 6, 6))
    model = g.build(g.batchnorm(g.node("Relu", ["x"]), 3))
    run = apply(model, "fold_batchnorm")
    assert op_types(run.model) == ["Relu", "BatchNormalization"]
    assert "Relu" in reasons(run, "fold_batchnorm")


def test_shared_weight_is_not_modified_in_place():
    """Two convs share one weight; folding BN into one must leave the other's weight untouched."""
    g = GraphBuilder((1, 3, 6, 6))
    weight = g.const(g.rng.standard_normal((3, 3, 3, 3)).astype(np.float32))
    first = g.node("Conv", ["x", weight], pads=[1, 1, 1, 1])
    second = g.node("Conv", ["x", weight], pads=[1, 1, 1, 1])
    model = g.build([g.batchnorm(first, 3), second])
    run = apply(model, "fold_batchnorm")
    assert op_types(run.model) == ["Conv", "Conv"]
    assert_same_outputs(model, run.model, (1, 3, 6, 6))


def test_weight_through_identity_is_found():
    g = GraphBuilder((1, 3, 6, 6))
    weight = g.node("Identity", [g.const(g.rng.standard_normal((4, 3, 1, 1)).astype(np.float32))])
    model = g.build(g.batchnorm(g.node("Conv", ["x", weight]), 4))
    run = apply(model, "fold_batchnorm")
    assert "BatchNormalization" not in op_types(run.model)
    assert_same_outputs(model, run.model, (1, 3, 6, 6))


def test_training_mode_bn_is_refused():
    g = GraphBuilder((1, 3, 6, 6), opset=15)
    conv = g.conv("x", 3, 3)
    stats = [g.const(np.ones(3, np.float32)) for _ in range(4)]
    g.nodes.append(helper.make_node("BatchNormalization", [conv, *stats], ["y"], name="bn", training_mode=1))
    model = g.build("y", shapes={"y": [1, 3, 4, 4]})
    run = apply(model, "fold_batchnorm")
    assert "training mode" in reasons(run, "fold_batchnorm", "bn")
