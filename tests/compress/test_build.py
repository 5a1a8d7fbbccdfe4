"""The merged segment is exactly the pad-at-front form of the original segment (activations removed)."""

import numpy as np
import onnx
from onnx import helper

from onnxmerge.layermerge.build import SegmentChoice, apply_segments
from onnxmerge.layermerge.segments import analyse_chain

from conftest import GraphBuilder, op_types, run_model

SHAPE = (1, 3, 12, 12)


def _chain():
    """stem conv -> relu -> conv1 -> relu -> conv2 -> relu, all 3x3 'same'."""
    g = GraphBuilder(SHAPE, seed=3)
    stem = g.node("Relu", [g.conv("x", 3, 4, pads=[1, 1, 1, 1])])
    first = g.node("Relu", [g.conv(stem, 4, 4, pads=[1, 1, 1, 1])])
    return g.build(g.node("Relu", [g.conv(first, 4, 4, pads=[1, 1, 1, 1])]))


def _node(model, op, index):
    return [n for n in model.graph.node if n.op_type == op][index]


def _option(analysis, start, end, kept):
    segment = next(s for s in analysis.segments if (s.start, s.end) == (start, end))
    return next(o for o in segment.options if o.kept == kept)


def test_two_convs_merge_into_their_pad_at_front_form():
    model = _chain()
    analysis = analyse_chain(model)
    merged = apply_segments(model, analysis, [SegmentChoice(0, 2, _option(analysis, 0, 2, (1, 2)))])
    assert op_types(merged) == ["Conv", "Relu", "Conv", "Relu"]
    # The training form: the middle ReLU removed, all padding on the first conv of the segment.
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    middle_relu = _node(reference, "Relu", 1)
    second_conv = _node(reference, "Conv", 2)
    second_conv.input[0] = middle_relu.input[0]
    reference.graph.node.remove(middle_relu)
    for conv, pads in ((_node(reference, "Conv", 1), [2, 2, 2, 2]), (second_conv, [0, 0, 0, 0])):
        conv.attribute.remove(next(a for a in conv.attribute if a.name == "pads"))
        conv.attribute.append(helper.make_attribute("pads", pads))
    feeds = {"x": np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)}
    np.testing.assert_allclose(run_model(merged, feeds)[0], run_model(reference, feeds)[0], rtol=1e-4, atol=1e-5)


def test_trivial_choices_leave_the_model_unchanged():
    model = _chain()
    analysis = analyse_chain(model)
    trivial = [SegmentChoice(p - 1, p, _option(analysis, p - 1, p, (p,))) for p in (1, 2)]
    assert all(choice.is_trivial for choice in trivial)
    assert op_types(apply_segments(model, analysis, trivial)) == op_types(model)


def _inverted_residual():
    """MobileNetV2-style block with an identity skip: expand 1x1, depthwise 3x3, project 1x1, + x."""
    g = GraphBuilder((1, 3, 10, 10), seed=5)
    stem = g.node("Relu", [g.conv("x", 3, 8, pads=[1, 1, 1, 1])])
    expand = g.node("Relu", [g.conv(stem, 8, 16, k=1)])
    depthwise = g.node("Relu", [g.conv(expand, 16, 16, groups=16, pads=[1, 1, 1, 1])])
    block = g.node("Add", [g.conv(depthwise, 16, 8, k=1), stem])
    out = g.node("Relu", [g.conv(block, 8, 8, pads=[1, 1, 1, 1])])
    return g.build(out)


def _layermerge_reference(model, keep_first: int, keep_last: int):
    """The original with the ReLUs strictly inside the block removed and a ReLU after the block's Add.

    LayerMerge's rule: a merged segment of several convs always ends nonlinear, even where the original
    position was linear (the end of a linear bottleneck), with the network's own activation.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    relus = [n for n in copy.graph.node if n.op_type == "Relu"][keep_first:keep_last]
    for relu in relus:
        for node in copy.graph.node:
            node.input[:] = [relu.input[0] if name == relu.output[0] else name for name in node.input]
        copy.graph.node.remove(relu)
    add = next(n for n in copy.graph.node if n.op_type == "Add")
    for node in copy.graph.node:
        node.input[:] = ["block_relu" if name == add.output[0] else name for name in node.input]
    copy.graph.node.insert(list(copy.graph.node).index(add) + 1,
                           helper.make_node("Relu", [add.output[0]], ["block_relu"]))
    return copy


def test_residual_block_is_absorbed_exactly_away_from_borders():
    model = _inverted_residual()
    analysis = analyse_chain(model)
    assert any(skip.projection is None for skip in analysis.skips)
    segment = next(s for s in analysis.segments if (s.start, s.end) == (0, 3))
    option = next(o for o in segment.options if len(o.kept) == 3)
    merged = apply_segments(model, analysis, [SegmentChoice(0, 3, option)])
    assert "Add" not in op_types(merged)
    assert op_types(merged).count("Conv") == 3  # stem, the merged block, the last conv
    assert op_types(merged).count("Relu") == 3  # stem's, the one the rule adds after the block, the last
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 3, 10, 10)).astype(np.float32)}
    reference = _layermerge_reference(model, 1, 3)
    got, want = run_model(merged, feeds)[0], run_model(reference, feeds)[0]
    # Padding moved to the front changes only a border as wide as the block's inner padding (1) plus the
    # last conv's reach (1); inside, the merged network is the original without its inner activations.
    np.testing.assert_allclose(got[..., 2:-2, 2:-2], want[..., 2:-2, 2:-2], rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, run_model(model, feeds)[0], atol=1e-3)  # the activations really were removed


def test_pruned_depthwise_conv_becomes_identity():
    model = _inverted_residual()
    analysis = analyse_chain(model)
    segment = next(s for s in analysis.segments if (s.start, s.end) == (0, 3))
    option = next(o for o in segment.options if o.kept == (1, 3))
    assert option.kernel == (1, 1)
    merged = apply_segments(model, analysis, [SegmentChoice(0, 3, option)])
    weights = {t.name: t for t in merged.graph.initializer}
    merged_conv = next(n for n in merged.graph.node if n.name.startswith("merged_"))
    assert list(weights[merged_conv.input[1]].dims[2:]) == [1, 1]
