"""analyse_chain(search_space=...): LayerMerge's own space stays exact; "extended" adds segments across strides
(kept convs after the stride all 1x1), grouped convs on the chain and dropping an identity-residual block.

Exactness is checked the way test_build.py does it: the merged model against the original network in the form
the segment trains in (convs not kept replaced by the identity, activations strictly inside removed, padding
moved onto the first kept conv), run in ONNX Runtime.
"""

import numpy as np
import onnx
import pytest
from conftest import GraphBuilder, op_types, run_model
from onnx import helper

from onnxmerge.errors import BadInputError
from onnxmerge.layermerge.build import SegmentChoice, apply_segments, merged_conv
from onnxmerge.layermerge.segments import analyse_chain
from onnxmerge.graph import import_graph

C, HW = 8, 8


def _segments(analysis):
    return {(s.start, s.end): s for s in analysis.segments}


def _option(analysis, start, end, kept):
    return next(o for o in _segments(analysis)[start, end].options if o.kept == kept)


# --- reference: the segment's training form, built on the ONNX graph ------------------------------------------


def _bypass(model, node):
    """Remove a one-input-that-matters node: its readers read its first input instead."""
    for other in model.graph.node:
        other.input[:] = [node.input[0] if name == node.output[0] else name for name in other.input]
    model.graph.node.remove(node)


def _training_form(model, analysis, start, end, kept, front_pads=None):
    """The original with convs (start, end] not in ``kept`` and the activations strictly inside removed.

    ``front_pads`` {conv index: pads} rewrites paddings (pad once at the front); without it the kept convs
    after the first must be unpadded already, so the original padding is the training form.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    by_name = {n.name: n for n in copy.graph.node}
    for index in range(start + 1, end + 1):
        conv = by_name[analysis.convs[index].node]
        if index not in kept:
            _bypass(copy, conv)
        elif front_pads and index in front_pads:
            conv.attribute.remove(next(a for a in conv.attribute if a.name == "pads"))
            conv.attribute.append(helper.make_attribute("pads", front_pads[index]))
    for position in range(start + 1, end):
        for name in analysis.positions[position].activation_nodes:
            _bypass(copy, by_name[name])
    return copy


def _assert_exact(model, analysis, start, end, kept, shape, front_pads=None):
    merged = apply_segments(model, analysis, [SegmentChoice(start, end, _option(analysis, start, end, kept))])
    reference = _training_form(model, analysis, start, end, kept, front_pads)
    feeds = {"x": np.random.default_rng(7).standard_normal(shape).astype(np.float32)}
    got, want = run_model(merged, feeds)[0], run_model(reference, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert op_types(merged).count("Conv") < op_types(model).count("Conv")
    return merged


# --- hand-built nets ------------------------------------------------------------------------------------------


def _conv(b, x, c_in=C, c_out=C, k=3, stride=1, groups=1):
    return b.conv(x, c_in, c_out, k, groups=groups, pads=[k // 2] * 4, strides=[stride] * 2)


def _relu(b, x):
    return b.node("Relu", [x])


def _small_resnet():
    """stem; identity block 0->2; downsampling block 2->4 (3x3 s2, 3x3, 1x1 s2 projection); identity 4->6."""
    b = GraphBuilder((1, 3, HW, HW), seed=11)
    x0 = _relu(b, _conv(b, "x", 3))
    x2 = _relu(b, b.node("Add", [_conv(b, _relu(b, _conv(b, x0))), x0]))
    branch = _conv(b, _relu(b, _conv(b, x2, C, 2 * C, stride=2)), 2 * C, 2 * C)
    x4 = _relu(b, b.node("Add", [_conv(b, x2, C, 2 * C, k=1, stride=2), branch]))
    x6 = _relu(b, b.node("Add", [_conv(b, _relu(b, _conv(b, x4, 2 * C, 2 * C)), 2 * C, 2 * C), x4]))
    return b.build(_conv(b, x6, 2 * C, 2 * C))


def _strided_bottleneck():
    """stem; 3x3; 3x3 s2 (C->2C); 1x1; 3x3; 1x1; 3x3 head: strides followed by 1x1 and 3x3 convs."""
    b = GraphBuilder((1, 3, HW, HW), seed=12)
    x = _relu(b, _conv(b, "x", 3))
    x = _relu(b, _conv(b, x))  # 1: 3x3, reducible
    x = _relu(b, _conv(b, x, C, 2 * C, stride=2))  # 2: 3x3 s2
    x = _relu(b, _conv(b, x, 2 * C, 2 * C, k=1))  # 3: 1x1, reducible
    x = _relu(b, _conv(b, x, 2 * C, 2 * C))  # 4: 3x3, reducible
    x = _relu(b, _conv(b, x, 2 * C, 2 * C, k=1))  # 5: 1x1, reducible
    return b.build(_conv(b, x, 2 * C, 2 * C))


def test_unknown_search_space_is_refused():
    with pytest.raises(BadInputError, match="unknown search space 'wide'.*layermerge, blocks, extended"):
        analyse_chain(_small_resnet(), search_space="wide")


def test_layermerge_space_is_the_default_and_unchanged(zoo):
    for name, counts in (("resnet34", (62, 150)), ("mobilenet_v2", (171, 391))):
        model, layermerge = zoo(name, "layermerge")
        default = analyse_chain(model)
        for analysis in (default, layermerge):
            assert (len(analysis.segments), analysis.entries) == counts
        assert sorted(default.breaks) == sorted(layermerge.breaks)


def test_extended_space_sizes(zoo):
    """Pinned so that a change of the extended space is seen (the lead picks the default from these)."""
    assert {name: (len(a.segments), a.entries) for name, a in
            (("resnet34", zoo("resnet34", "extended")[1]), ("mobilenet_v2", zoo("mobilenet_v2", "extended")[1]))} \
        == {"resnet34": (120, 431), "mobilenet_v2": (316, 829)}


def test_resnet34_downsampling_blocks_get_stride_crossing_options(zoo):
    spaces = {space: zoo("resnet34", space)[1] for space in ("layermerge", "extended")}
    old, new = _segments(spaces["layermerge"]), _segments(spaces["extended"])
    assert set(old) < set(new)
    assert sorted(spaces["extended"].breaks) == [0]  # only the max-pool: no stride breaks at 7, 15, 27
    for strided, (source, target) in ((7, (6, 8)), (15, (14, 16)), (27, (26, 28))):
        assert (source, target) not in old
        (option,) = new[source, target].options  # the block's 2nd 3x3 pruned, its projection absorbed
        assert (option.kept, option.kernel, option.stride) == ((strided,), (3, 3), (2, 2))
    # Kept convs after a stride are all 1x1 (ResNet-34 has none): every option keeps no conv after its stride.
    for segment in spaces["extended"].segments:
        for option in segment.options:
            strided = [i for i in option.kept if max(spaces["extended"].convs[i].params.strides) > 1]
            assert not strided or option.kept[-1] == strided[0]
    # Stage 1 merged with the downsampling conv: (0, 8] reaches K = 15 at stride 2, kept convs before it.
    kernels = [o.kernel[0] for o in new[0, 8].options]
    assert kernels == list(range(3, 16, 2)) and new[0, 8].options[-1].kept == (1, 2, 3, 4, 5, 6, 7)


def test_resnet34_downsampling_block_merges_exactly(zoo):
    model, analysis = zoo("resnet34", "extended")
    merged = apply_segments(model, analysis, [SegmentChoice(6, 8, _option(analysis, 6, 8, (7,)))])
    reference = _training_form(model, analysis, 6, 8, (7,))
    feeds = {model.graph.input[0].name: np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    got, want = run_model(merged, feeds)[0], run_model(reference, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    assert op_types(merged).count("Conv") == op_types(model).count("Conv") - 2  # conv 8 and the projection


def test_stride_crossing_only_where_later_k_gt_1_convs_are_pruned():
    model = _small_resnet()
    layermerge, extended = (analyse_chain(model, search_space=s) for s in ("layermerge", "extended"))
    assert (2, 4) not in _segments(layermerge) and 3 in layermerge.breaks
    segments = _segments(extended)
    assert extended.breaks == {}
    assert [o.kept for o in segments[2, 4].options] == [(3,)]
    # Stage 1 (convs 1, 2) with the downsampling conv 3; convs 4, 5, 6 come after the stride: pruned.
    assert [(o.kernel, o.stride, len(o.kept), o.kept[-1]) for o in segments[0, 6].options] == [
        ((3, 3), (2, 2), 1, 3), ((5, 5), (2, 2), 2, 3), ((7, 7), (2, 2), 3, 3)]
    # An irreducible 3x3 after the stride (channels change) cannot be pruned: no segment across it.
    b = GraphBuilder((1, 3, HW, HW))
    x = _relu(b, _conv(b, _relu(b, _conv(b, "x", 3)), stride=2))
    x = _relu(b, _conv(b, x, C, 2 * C))
    analysis = analyse_chain(b.build(_conv(b, x, 2 * C, 2 * C)), search_space="extended")
    assert (1, 2) in _segments(analysis) and (0, 2) not in _segments(analysis)


@pytest.mark.parametrize("start, end, kept", [(2, 4, (3,)), (2, 6, (3,)), (0, 6, (3,))])
def test_stride_crossing_merges_exactly_through_residual_blocks(start, end, kept):
    """Projection and identity shortcuts absorbed, pruned blocks x + x, no padding moved (one kept 3x3)."""
    model = _small_resnet()
    _assert_exact(model, analyse_chain(model, search_space="extended"), start, end, kept, (1, 3, HW, HW))


def test_stride_crossing_merges_exactly_with_kept_convs_on_both_sides():
    model = _strided_bottleneck()
    analysis = analyse_chain(model, search_space="extended")
    assert 2 not in analysis.breaks and 3 not in analysis.breaks
    options = {o.kernel: o.kept for o in _segments(analysis)[0, 5].options}
    assert options == {(3, 3): (2, 3, 5), (5, 5): (1, 2, 3, 5)}  # conv 4 (3x3 after the stride) always pruned
    # No padding to move: the strided 3x3 is the only kept conv with a kernel.
    _assert_exact(model, analysis, 0, 5, (2, 3, 5), (1, 3, HW, HW))
    # Pad at the front: conv 1 takes 1 + 1*1 of the strided conv's padding, which is then unpadded.
    _assert_exact(model, analysis, 0, 5, (1, 2, 3, 5), (1, 3, HW, HW), front_pads={1: [2] * 4, 2: [0] * 4})


# --- grouped convs --------------------------------------------------------------------------------------------


def _grouped_chain():
    """stem; 3x3 g2; 3x3 g2; 1x1 dense; 3x3 g4; head 3x3."""
    b = GraphBuilder((1, 3, HW, HW), seed=13)
    x = _relu(b, _conv(b, "x", 3))
    x = _relu(b, _conv(b, x, groups=2))  # 1
    x = _relu(b, _conv(b, x, groups=2))  # 2
    x = _relu(b, _conv(b, x, k=1))  # 3
    x = _relu(b, _conv(b, x, groups=4))  # 4
    return b.build(_conv(b, x))


def test_grouped_convs_join_the_chain_only_in_the_extended_space():
    model = _grouped_chain()
    layermerge = analyse_chain(model)
    grouped = [r for r in layermerge.excluded.values() if "grouped conv" in r]
    assert len(grouped) == 3 and len(layermerge.convs) < 6
    extended = analyse_chain(model, search_space="extended")
    assert len(extended.convs) == 6 and extended.excluded == {}
    segments = _segments(extended)
    # g2 with g2 stays g2; anything with the dense 1x1 (kept in every option of (1, 4]: it adds |W|) is dense.
    assert [(o.kernel[0], len(o.kept), o.groups) for o in segments[0, 2].options] == [(3, 1, 2), (5, 2, 2)]
    assert [(o.kernel[0], 3 in o.kept, o.groups) for o in segments[1, 4].options] == [
        (1, True, 1), (3, True, 1), (5, True, 1)]
    assert [(o.kept, o.groups) for o in segments[3, 4].options] == [((4,), 4)]
    assert not any(o.depthwise for s in extended.segments for o in s.options)


@pytest.mark.parametrize("start, end, kernel, groups", [(0, 2, 3, 2), (0, 2, 5, 2), (0, 4, 5, 1), (1, 4, 5, 1)])
def test_grouped_segments_merge_exactly(start, end, kernel, groups):
    model = _grouped_chain()
    analysis = analyse_chain(model, search_space="extended")
    option = next(o for o in _segments(analysis)[start, end].options if o.kernel == (kernel, kernel))
    assert option.groups == groups
    # Stride 1 throughout: the first kept conv takes all the padding (1 per kept 3x3), the others none.
    kernels = {i: analysis.convs[i].params.kernel_shape[0] for i in option.kept}
    total = sum(k // 2 for k in kernels.values())
    front_pads = {i: [total if i == option.kept[0] else 0] * 4 for i in option.kept}
    merged = _assert_exact(model, analysis, start, end, option.kept, (1, 3, HW, HW), front_pads)
    node = next(n for n in merged.graph.node if n.name.startswith("merged_"))
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "group")) == groups


# --- dropping an identity-residual block ----------------------------------------------------------------------


def test_identity_block_can_be_dropped_only_in_the_extended_space():
    model = _small_resnet()
    assert not any(not o.kept for s in analyse_chain(model).segments for o in s.options)
    analysis = analyse_chain(model, search_space="extended")
    drops = {(s.start, s.end) for s in analysis.segments for o in s.options if o.drops_block}
    assert drops == {(0, 2), (4, 6)}  # not the projection block 2->4, not segments around a block
    option = _option(analysis, 4, 6, ())
    assert (option.kernel, option.depthwise, option.groups) == ((1, 1), True, 2 * C)
    with pytest.raises(BadInputError, match="keeps no conv"):
        merged_conv(analysis, import_graph(model), 2, 4, ())


@pytest.mark.parametrize("start, end", [(0, 2), (4, 6)])
def test_dropped_block_is_exactly_the_identity(start, end):
    model = _small_resnet()
    analysis = analyse_chain(model, search_space="extended")
    merged = apply_segments(model, analysis, [SegmentChoice(start, end, _option(analysis, start, end, ()))])
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    add = next(n for n in reference.graph.node if n.name == next(
        s.add_node for s in analysis.skips if (s.source, s.target) == (start, end)))
    shortcut = analysis.positions[start].tensor
    for node in reference.graph.node:  # the block's output is its input: what read the Add reads the shortcut
        node.input[:] = [shortcut if name == add.output[0] else name for name in node.input]
    reference.graph.node.remove(add)
    feeds = {"x": np.random.default_rng(5).standard_normal((1, 3, HW, HW)).astype(np.float32)}
    np.testing.assert_allclose(run_model(merged, feeds)[0], run_model(reference, feeds)[0], rtol=1e-5, atol=1e-5)
    assert op_types(merged).count("Add") == 2 and op_types(merged).count("Conv") == op_types(model).count("Conv") - 1


@pytest.mark.parametrize("build", [_small_resnet, _strided_bottleneck, _grouped_chain])
def test_every_extended_option_is_the_conv_merged_conv_builds(build):
    """What the tables are built for (kernel, stride, groups, channels) is what apply_segments emits."""
    model = build()
    analysis = analyse_chain(model, search_space="extended")
    graph = import_graph(model)
    for segment in analysis.segments:
        for option in segment.options:
            conv = merged_conv(analysis, graph, segment.start, segment.end, option.kept)
            assert (conv.kernel_shape, conv.strides, conv.dilations, conv.groups, conv.in_channels,
                    conv.out_channels) == (option.kernel, option.stride, (1, 1), option.groups,
                                           option.in_channels, option.out_channels), (segment.start, segment.end)


def test_blocks_space_is_the_layermerge_space_plus_block_drops():
    model = _small_resnet()
    base, blocks = analyse_chain(model), analyse_chain(model, search_space="blocks")
    extra = {(s.start, s.end, o) for s in blocks.segments for o in s.options} - \
        {(s.start, s.end, o) for s in base.segments for o in s.options}
    assert {(start, end) for start, end, _ in extra} == {(0, 2), (4, 6)}
    assert all(option.drops_block for _, _, option in extra)  # nothing else is added
    assert [(s.start, s.end) for s in blocks.segments] == [(s.start, s.end) for s in base.segments]
