"""The per-op channel rules of re-basin alignment: the registry, and each non-trivial rule on a tiny graph whose
aligned model computes exactly what the original does in ORT."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

from onnxmerge import activations
from onnxmerge.io import save_model
from onnxmerge.merging import align
from onnxmerge.merging import channel_rules
from onnxmerge.merging.compat import model_structure
from onnxmerge.merging.rebasin import channel_spec

from conftest import GraphBuilder, run_model

SHAPE = (1, 3, 6, 6)


def spec(model: onnx.ModelProto):
    """(groups as sets of (initializer name, axis, offset), pins as (op, reason))."""
    structure = model_structure(model)
    result = channel_spec(model, structure)
    groups = [{(structure.slots[slot].tensor.name, axis, offset) for slot, axis, offset in group.members}
              for group in result.groups]
    return groups, [(pin.op, pin.reason) for pin in result.pins]


def names(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer]


def assert_aligned_identical(tmp_path, build) -> dict:
    """Align build(1) to build(0); the aligned model's outputs equal build(1)'s in ORT. Returns the report."""
    a, b = save_model(build(0), tmp_path / "a.onnx"), save_model(build(1), tmp_path / "b.onnx")
    result = align(a, b, tmp_path / "aligned.onnx")
    assert result.report["verification"]["passed"]
    feeds = {"x": np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)}
    original, aligned = onnx.load(b), onnx.load(result.model)
    for want, got in zip(run_model(original, feeds), run_model(aligned, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return result.report


# -- the registry ----------------------------------------------------------------------------------------------

def test_every_op_the_analysis_handles_has_a_registered_rule():
    handled = {"Conv", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization", "LayerNormalization",
               "PRelu", "Add", "Sub", "Mul", "Div", "Concat", "Flatten", "Reshape", "Squeeze", "Pad", "Resize",
               "MaxPool", "GlobalAveragePool", "ReduceMean", "Identity", "Constant", "Shape"}
    handled |= set(activations.SINGLE_OPS)  # every activation of the table, from onnxmerge.activations
    assert handled <= channel_rules.registered_ops()
    for op in channel_rules.registered_ops():
        assert channel_rules.rule_for(gs.Node(op)) is not None, op
    # activations: a scalar-parameter activation passes its input's space through, PRelu joins its slope to it
    assert {channel_rules.rule_for(gs.Node(op)) for op in activations.PERMUTATION_INVARIANT_OPS - {"Clip"}} == {
        channel_rules.rule_for(gs.Node("Relu"))}
    assert channel_rules.rule_for(gs.Node("PRelu")) is channel_rules.rule_for(gs.Node("Mul"))


def test_an_op_is_registered_once():
    with pytest.raises(ValueError, match="Relu already has a channel rule"):
        channel_rules.channel_rule("Relu")(lambda ctx, node: None)
    assert channel_rules.rule_for(gs.Node("Relu")).__name__ == "_pass_through"


def _conv_op_conv(op: str, domain: str = "", seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder(SHAPE, seed=seed)
    hidden = g.node(op, [g.conv("x", 3, 4, pads=[1, 1, 1, 1])])
    model = g.build(g.conv(hidden, 4, 2, k=1))
    if domain:
        node = next(n for n in model.graph.node if n.op_type == op)
        node.domain = domain
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return model


@pytest.mark.parametrize("op, domain, named", [("Sin", "", "Sin"), ("Relu", "com.example", "com.example.Relu")])
def test_an_op_without_a_rule_blocks_with_its_name_in_the_reason(op, domain, named):
    assert channel_rules.rule_for(gs.Node(op, domain=domain)) is None
    groups, pins = spec(_conv_op_conv(op, domain))
    assert groups == [] and pins == [(named, f"no channel rule for {named}")]
    # the same graph with a plain Relu: conv1's output space is free
    assert len(spec(_conv_op_conv("Relu"))[0]) == 1


# -- one tiny graph per rule -----------------------------------------------------------------------------------

def test_conv_bn_relu_conv_bn_parameters_follow_the_conv_output_space(tmp_path):
    def build(seed):
        g = GraphBuilder(SHAPE, seed=seed)
        hidden = g.node("Relu", [g.batchnorm(g.conv("x", 3, 4, pads=[1, 1, 1, 1]), 4)])
        return g.build(g.conv(hidden, 4, 2, k=1))

    model = build(0)
    conv1_w, conv1_b, *bn, conv2_w, _ = names(model)
    groups, pins = spec(model)
    assert groups == [{(conv1_w, 0, 0), (conv1_b, 0, 0), *((p, 0, 0) for p in bn), (conv2_w, 1, 0)}]
    assert pins == []
    assert assert_aligned_identical(tmp_path, build)["moved_channels"] > 0


@pytest.mark.parametrize("per_channel", [True, False])
def test_prelu_per_channel_slope_follows_the_space_and_a_scalar_slope_stays(tmp_path, per_channel):
    def build(seed):
        g = GraphBuilder(SHAPE, seed=seed)
        shape = (4, 1, 1) if per_channel else (1,)
        slope = g.const(g.rng.uniform(0.05, 0.5, shape).astype(np.float32), "slope")
        hidden = g.node("PRelu", [g.conv("x", 3, 4, pads=[1, 1, 1, 1]), slope])
        return g.build(g.conv(hidden, 4, 2, k=1))

    model = build(0)
    slope, conv1_w, conv1_b, conv2_w, _ = names(model)  # the slope is made before the conv
    groups, _ = spec(model)
    expected = {(conv1_w, 0, 0), (conv1_b, 0, 0), (conv2_w, 1, 0)} | ({(slope, 0, 0)} if per_channel else set())
    assert groups == [expected]
    report = assert_aligned_identical(tmp_path, build)
    assert report["moved_channels"] > 0
    if not per_channel:
        aligned_slope = next(t for t in onnx.load(tmp_path / "aligned.onnx").graph.initializer if t.name == slope)
        assert aligned_slope.SerializeToString() == next(
            t for t in onnx.load(tmp_path / "b.onnx").graph.initializer if t.name == slope).SerializeToString()


def test_add_of_two_branches_unifies_their_spaces(tmp_path):
    def build(seed):
        g = GraphBuilder(SHAPE, seed=seed)
        left = g.node("Relu", [g.conv("x", 3, 4, pads=[1, 1, 1, 1])])
        right = g.node("Sigmoid", [g.conv("x", 3, 4, k=1)])
        return g.build(g.conv(g.node("Add", [left, right]), 4, 2, k=1))

    model = build(0)
    left_w, left_b, right_w, right_b, last_w, _ = names(model)
    groups, pins = spec(model)
    assert groups == [{(left_w, 0, 0), (left_b, 0, 0), (right_w, 0, 0), (right_b, 0, 0), (last_w, 1, 0)}]
    assert pins == []
    assert assert_aligned_identical(tmp_path, build)["moved_channels"] > 0


def test_reshape_mixing_channels_blocks_and_the_space_before_it_stays_free(tmp_path):
    def build(seed):
        g = GraphBuilder(SHAPE, seed=seed)
        hidden = g.node("Relu", [g.conv("x", 3, 4, pads=[1, 1, 1, 1])])
        mixed = g.node("Reshape", [g.conv(hidden, 4, 4, k=1), g.const(np.array([1, -1], np.int64), "shape")])
        head = g.node("Gemm", [mixed, g.const(g.rng.standard_normal((5, 4 * 36)).astype(np.float32))], transB=1)
        return g.build(head)

    model = build(0)
    conv1_w, conv1_b, conv2_w, *_ = names(model)
    groups, pins = spec(model)
    assert groups == [{(conv1_w, 0, 0), (conv1_b, 0, 0), (conv2_w, 1, 0)}]  # conv2's output is pinned
    assert pins == [("Reshape", "Reshape mixes the channels with other axes")]
    assert assert_aligned_identical(tmp_path, build)["moved_channels"] > 0


def test_concat_with_an_input_that_has_no_space_blocks(tmp_path):
    def build(seed):
        g = GraphBuilder(SHAPE, seed=seed)
        hidden = g.node("Relu", [g.conv("x", 3, 4, pads=[1, 1, 1, 1])])
        joined = g.node("Concat", [g.conv(hidden, 4, 4, k=1), "x"], axis=1)  # x's channels are fixed
        return g.build(g.conv(joined, 7, 2, k=1))

    model = build(0)
    conv1_w, conv1_b, conv2_w, *_ = names(model)
    groups, pins = spec(model)
    assert groups == [{(conv1_w, 0, 0), (conv1_b, 0, 0), (conv2_w, 1, 0)}]
    assert pins == [("Concat", "an input without channel spaces, or unknown rank")]
    assert assert_aligned_identical(tmp_path, build)["moved_channels"] > 0
