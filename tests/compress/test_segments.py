"""Segment discovery: the reference enumeration on torch exports, and each rule on hand-built graphs."""

import itertools
import math

import numpy as np
import pytest
from conftest import GraphBuilder
from onnx import numpy_helper
from rich.console import Console

from onnxmerge.layermerge.report import chain_tables
from onnxmerge.layermerge.segments import ACTIVATION_KINDS, analyse_chain
from onnxmerge.errors import BadInputError

C, HW = 8, 8  # channels and map size of the hand-built chains


def _kernels(segment, depthwise=False):
    return [o.kernel[0] for o in segment.options if o.depthwise == depthwise]


def _segment(analysis, start, end):
    return next(s for s in analysis.segments if (s.start, s.end) == (start, end))


# --- the reference's tables (layermerge.md §1.2) ------------------------------------------------------------


def test_mobilenet_v2_matches_layermerge_enumeration(zoo):
    _, analysis = zoo("mobilenet_v2")
    assert len(analysis.convs) == 51  # stem .. conv 50; the last 1x1 conv (51) is the head conv, kept aside
    assert "head conv" in next(iter(analysis.excluded.values())) and len(analysis.excluded) == 1
    assert [(s.source, s.target) for s in analysis.skips] == [
        (5, 8), (11, 14), (14, 17), (20, 23), (23, 26), (26, 29), (32, 35), (35, 38), (41, 44), (44, 47)]
    assert all(s.projection is None for s in analysis.skips)
    assert sorted(analysis.breaks) == [0, 5, 11, 20, 41]
    assert (len(analysis.segments), analysis.entries) == (171, 391)
    linear = [p.index for p in analysis.positions if p.activation is None]
    assert linear == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 44, 47, 50]
    assert {p.activation for p in analysis.positions} == {"relu6", None}
    assert _kernels(_segment(analysis, 5, 8)) == [1, 3]
    block = _segment(analysis, 20, 41)
    assert _kernels(block) == list(range(3, 16, 2)) and block.options[-1].input_hw == (14, 14)
    assert block.options[0].stride == (2, 2)
    reducible = [c.index for c in analysis.convs if c.reducible]
    assert all(analysis.convs[i].params.is_depthwise for i in reducible)


def test_resnet34_matches_layermerge_enumeration(zoo):
    model, analysis = zoo("resnet34")
    assert len(analysis.convs) == 33
    assert [(s.source, s.target) for s in analysis.skips] == [(i, i + 2) for i in range(0, 31, 2)]
    projected = [(s.source, s.target) for s in analysis.skips if s.projection]
    assert projected == [(6, 8), (14, 16), (26, 28)]
    assert all("projection shortcut" in reason for reason in analysis.excluded.values())
    assert sorted(analysis.breaks) == [0, 7, 15, 27] and "MaxPool" in analysis.breaks[0]
    assert (len(analysis.segments), analysis.entries) == (62, 150)
    assert _kernels(_segment(analysis, 0, 6)) == list(range(3, 14, 2))
    assert max(o.kernel[0] for s in analysis.segments for o in s.options) == 21
    assert _kernels(_segment(analysis, 16, 26))[-1] == 21
    # Unlike LayerMerge's trace, shapes come from the real graph: stage 1 runs after the max-pool, at 56x56.
    assert analysis.convs[1].input_shape == (1, 64, 56, 56)
    assert all(p.activation == "relu" for p in analysis.positions)
    # Position 0 is what conv 1 reads, the max-pool's output, which is also the source of skip 0->2.
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    assert analysis.positions[0].tensor == pool.output[0]
    stem_relu = next(n for n in model.graph.node if n.output[0] == pool.input[0])
    assert analysis.positions[0].activation_nodes == (stem_relu.name,)


def test_inspect_tables_show_chain_and_counts(zoo):
    console = Console(record=True, width=250)
    for table in chain_tables(zoo("mobilenet_v2")[1]):
        console.print(table)
    text = console.export_text()
    assert "171 segments, 391 (segment, kernel) entries" in text
    assert "5->8 (identity)" in text and "head conv" in text


# --- hand-built chains ----------------------------------------------------------------------------------------


def _conv(b, x, c_in=C, c_out=C, k=3, stride=1, groups=1):
    return b.conv(x, c_in, c_out, k, groups=groups, pads=[k // 2] * 4, strides=[stride] * 2)


def _relu(b, x):
    return b.node("Relu", [x])


def _scalar(b, value):
    return b.const(np.array(value, dtype=np.float32), "c")


def _added_nodes(b, build, x):
    """Apply ``build`` to ``x``; return its output and the names of the nodes it added."""
    before = len(b.nodes)
    y = build(b, x)
    return y, tuple(node.name for node in b.nodes[before:])


def _erf_gelu(b, x):
    erf = b.node("Erf", [b.node("Div", [x, _scalar(b, math.sqrt(2))])])
    return b.node("Mul", [b.node("Mul", [x, b.node("Add", [erf, _scalar(b, 1.0)])]), _scalar(b, 0.5)])


ACTIVATIONS = {
    "Relu": (17, "relu", _relu),
    "Clip(0, 6) inputs": (17, "relu6", lambda b, x: b.node("Clip", [x, _scalar(b, 0), _scalar(b, 6)])),
    "Clip(0, 6) attributes": (10, "relu6", lambda b, x: b.node("Clip", [x], min=0.0, max=6.0)),
    "HardSwish": (17, "hardswish", lambda b, x: b.node("HardSwish", [x])),
    "x*HardSigmoid(x)": (17, "hardswish",
                         lambda b, x: b.node("Mul", [x, b.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])),
    "Sigmoid(x)*x": (17, "silu", lambda b, x: b.node("Mul", [b.node("Sigmoid", [x]), x])),
    "LeakyRelu": (17, "leaky_relu", lambda b, x: b.node("LeakyRelu", [x], alpha=0.1)),
    "Gelu": (20, "gelu", lambda b, x: b.node("Gelu", [x])),
    "GELU Erf form": (17, "gelu", _erf_gelu),
    "Sigmoid": (17, "sigmoid", lambda b, x: b.node("Sigmoid", [x])),
    "Tanh": (17, "tanh", lambda b, x: b.node("Tanh", [x])),
}


def _chain_with_slot(build, opset=17):
    """conv0 -> relu -> conv1 -> [build] -> conv2 -> relu -> conv3: the slot under test is position 1."""
    b = GraphBuilder((1, 3, HW, HW), opset=opset)
    x = _relu(b, _conv(b, "x", 3))
    y, nodes = _added_nodes(b, build, _conv(b, x))
    return b.build(_conv(b, _relu(b, _conv(b, y)))), nodes


@pytest.mark.parametrize("form", ACTIVATIONS)
def test_activation_slot_is_recognised(form):
    opset, kind, build = ACTIVATIONS[form]
    model, nodes = _chain_with_slot(build, opset)
    analysis = analyse_chain(model)
    position = analysis.positions[1]
    assert (position.activation, position.activation_nodes) == (kind, nodes)
    assert kind in ACTIVATION_KINDS
    assert position.tensor == next(n.output[0] for n in model.graph.node if n.name == nodes[-1])
    assert 1 not in analysis.breaks and (0, 3) in [(s.start, s.end) for s in analysis.segments]


@pytest.mark.parametrize("build", [
    lambda b, x: b.node("Clip", [x, _scalar(b, 0), _scalar(b, 4)]),
    lambda b, x: b.node("Mul", [x, b.node("HardSigmoid", [x])]),  # default alpha 0.2 is not HardSwish
    lambda b, x: b.node("Mul", [x, b.node("Tanh", [b.node("Softplus", [x])])]),  # Mish: not a known kind
], ids=["Clip(0, 4)", "x*HardSigmoid(x) alpha 0.2", "Mish"])
def test_unknown_nonlinearity_is_a_break(build):
    analysis = analyse_chain(_chain_with_slot(build)[0])
    assert analysis.positions[1].activation is None and 1 in analysis.breaks


def test_identity_skip_closes_at_its_add_with_the_relu_after_it():
    b = GraphBuilder((1, 3, HW, HW))
    x0 = _relu(b, _conv(b, "x", 3))
    branch = _conv(b, _relu(b, _conv(b, x0)))
    add_count = len(b.nodes)
    out = _relu(b, b.node("Add", [branch, x0]))
    model = b.build(_conv(b, out))
    analysis = analyse_chain(model)
    (skip,) = analysis.skips
    assert (skip.source, skip.target, skip.projection) == (0, 2, None)
    assert skip.add_node == b.nodes[add_count].name
    position = analysis.positions[2]
    assert (position.tensor, position.activation, position.activation_nodes) == (out, "relu", (b.nodes[-2].name,))
    segments = [(s.start, s.end) for s in analysis.segments]
    assert (0, 2) in segments and (1, 3) not in segments and (0, 3) in segments
    assert analysis.breaks == {} and analysis.excluded == {}


def test_projection_skip_keeps_its_1x1_conv_off_the_chain():
    b = GraphBuilder((1, 3, HW, HW))
    x0 = _relu(b, _conv(b, "x", 3))
    branch = _conv(b, _relu(b, _conv(b, x0, C, 2 * C, stride=2)), 2 * C, 2 * C)
    shortcut = _conv(b, x0, C, 2 * C, k=1, stride=2)
    projection = b.nodes[-1].name
    model = b.build(_conv(b, _relu(b, b.node("Add", [shortcut, branch])), 2 * C, 2 * C))
    analysis = analyse_chain(model)
    (skip,) = analysis.skips
    assert (skip.source, skip.target, skip.projection) == (0, 2, projection)
    assert "projection shortcut of skip 0->2" in analysis.excluded[projection]
    assert projection not in [c.node for c in analysis.convs]
    assert list(analysis.breaks) == [1] and "stride 2" in analysis.breaks[1]


def _pool(op):
    return lambda b, x: (b.node(op, [x], kernel_shape=[3, 3], pads=[1] * 4), C)


def _gated(b, x):
    return b.node("Mul", [x, b.node("Sigmoid", [b.node("GlobalAveragePool", [x])])]), C


def _instance_norm(b, x):
    return b.node("InstanceNormalization", [x, _scalar(b, np.ones(C)), _scalar(b, np.zeros(C))]), C


def _conv_transpose(b, x):
    weight = b.const(np.random.default_rng(0).standard_normal((C, C, 3, 3)).astype(np.float32))
    return b.node("ConvTranspose", [x, weight], pads=[1] * 4), C


def _slice(b, x):
    ints = [b.const(np.array([v], dtype=np.int64), "i") for v in (0, C // 2, 1)]
    return b.node("Slice", [x, *ints]), C // 2


def _flatten(b, x):
    shape = b.const(np.array([1, C, HW, HW], dtype=np.int64), "i")
    return b.node("Reshape", [b.node("Flatten", [x]), shape]), C


# name -> (what the break reason must mention, build(b, x) -> (tensor for the next conv, its channels))
BREAKS = {
    "max pooling": ("MaxPool", _pool("MaxPool")),
    "average pooling": ("AveragePool", _pool("AveragePool")),
    "global pooling": ("GlobalAveragePool", lambda b, x: (b.node("GlobalAveragePool", [x]), C)),
    "Resize": ("Resize", lambda b, x: (b.node("Resize", [x, "", _scalar(b, [1, 1, 2, 2])]), C)),
    "Concat": ("Concat", lambda b, x: (b.node("Concat", [x, x], axis=1), 2 * C)),
    "Split": ("Split", lambda b, x: (b.node("Split", [x, b.const(np.array([4, 4]), "i")], 2, axis=1)[0], C // 2)),
    "Slice": ("Slice", _slice),
    "Reshape": ("Reshape", lambda b, x: (b.node("Reshape", [x, b.const(np.array([1, C, HW, HW]), "i")]), C)),
    "Flatten": ("Flatten", _flatten),
    "Transpose": ("Transpose", lambda b, x: (b.node("Transpose", [x], perm=[0, 1, 3, 2]), C)),
    "InstanceNormalization": ("InstanceNormalization", _instance_norm),
    "gating Mul": ("Mul", _gated),
    "grouped conv": ("grouped conv", lambda b, x: (_conv(b, x, groups=2), C)),
    "ConvTranspose": ("ConvTranspose", _conv_transpose),
}


def _chain_with_break(build, extra_outputs=()):
    b = GraphBuilder((1, 3, HW, HW))
    x1 = _relu(b, _conv(b, _relu(b, _conv(b, "x", 3))))
    y, channels = build(b, x1)
    final = _conv(b, _relu(b, _conv(b, y, channels)))
    return b.build([final, *(extra(b, x1) for extra in extra_outputs)])


@pytest.mark.parametrize("kind", BREAKS)
def test_op_between_convs_is_a_break(kind):
    mention, build = BREAKS[kind]
    analysis = analyse_chain(_chain_with_break(build))
    assert list(analysis.breaks) == [1] and mention in analysis.breaks[1]
    segments = [(s.start, s.end) for s in analysis.segments]
    assert (0, 2) not in segments and (1, 3) in segments and (0, 1) in segments
    if kind == "grouped conv":
        assert "groups=2" in next(iter(analysis.excluded.values()))


@pytest.mark.parametrize("extra, mention", [
    (lambda b, x: b.node("ReduceMean", [x], keepdims=0), "also feeds ReduceMean"),
    (lambda b, x: x, "graph output"),
], ids=["extra consumer", "graph output"])
def test_value_used_outside_the_chain_is_a_break(extra, mention):
    analysis = analyse_chain(_chain_with_break(lambda b, x: (x, C), extra_outputs=[extra]))
    assert list(analysis.breaks) == [1] and mention in analysis.breaks[1]


@pytest.mark.parametrize("kernel, broken", [(3, 1), (1, 2)])
def test_stride_merges_only_into_the_pointwise_conv_after_it(kernel, broken):
    b = GraphBuilder((1, 3, HW, HW))
    x = _relu(b, _conv(b, _relu(b, _conv(b, "x", 3)), stride=2))  # conv 1 has stride 2
    x = _relu(b, _conv(b, _relu(b, _conv(b, x, k=kernel))))
    analysis = analyse_chain(b.build(_conv(b, x)))
    assert list(analysis.breaks) == [broken] and "stride 2" in analysis.breaks[broken]
    segments = {(s.start, s.end): s for s in analysis.segments}
    assert ((0, 2) in segments) == (kernel == 1)
    assert (broken - 1, broken + 1) not in segments and (broken, broken + 2) in segments
    if kernel == 1:
        assert [(o.kernel, o.stride) for o in segments[0, 2].options] == [((3, 3), (2, 2))]


def test_nesting_rule_matches_brute_force():
    """Skips (0,2), (2,4), (4,8) around (5,7), and a max-pool after conv 9, on an 11-conv chain."""
    b = GraphBuilder((1, 3, HW, HW))

    def block(x, convs):
        for _ in range(convs - 1):
            x = _relu(b, _conv(b, x))
        return _conv(b, x)

    x0 = _relu(b, _conv(b, "x", 3))
    x2 = _relu(b, b.node("Add", [block(x0, 2), x0]))
    x4 = _relu(b, b.node("Add", [block(x2, 2), x2]))
    x5 = _relu(b, _conv(b, x4))
    x7 = _relu(b, b.node("Add", [block(x5, 2), x5]))
    x8 = _relu(b, b.node("Add", [_conv(b, x7), x4]))
    x9 = b.node("MaxPool", [_relu(b, _conv(b, x8))], kernel_shape=[2, 2], strides=[2, 2])
    analysis = analyse_chain(b.build(_conv(b, x9)))
    skips = [(s.source, s.target) for s in analysis.skips]
    assert sorted(skips) == [(0, 2), (2, 4), (4, 8), (5, 7)] and list(analysis.breaks) == [9]
    expected = []
    for i, j in itertools.combinations(range(11), 2):
        merged = set(range(i + 1, j + 1))
        blocks = [set(range(s + 1, t + 1)) for s, t in skips]
        if not i < 9 < j and all(merged <= k or k <= merged or not merged & k for k in blocks):
            expected.append((i, j))
    assert [(s.start, s.end) for s in analysis.segments] == expected


def _l1(model, conv_node):
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == conv_node)
    return float(np.abs(weights[node.input[1]]).sum())


def test_kernel_options_keep_the_heaviest_subset_per_kernel():
    b = GraphBuilder((1, 3, HW, HW))
    x = _relu(b, _conv(b, "x", 3))
    x = _relu(b, _conv(b, x))  # 1: 3x3, reducible
    x = _relu(b, _conv(b, x, C, 2 * C, k=1))  # 2: 1x1, irreducible (channels change)
    x = _relu(b, _conv(b, x, 2 * C, 2 * C, k=5))  # 3: 5x5, reducible
    x = _relu(b, _conv(b, x, 2 * C, 2 * C))  # 4: 3x3, reducible
    model = b.build(_conv(b, x, 2 * C, 2 * C))
    analysis = analyse_chain(model)
    assert [c.reducible for c in analysis.convs] == [False, True, False, True, True, True]
    segment = _segment(analysis, 0, 4)
    l1 = {c.index: _l1(model, c.node) for c in analysis.convs}
    reach = {1: 2, 2: 0, 3: 4, 4: 2}
    best = {}
    for n in range(4):
        for pruned in itertools.combinations([1, 3, 4], n):
            kept = tuple(i for i in range(1, 5) if i not in pruned)
            kernel = 1 + sum(reach[i] for i in kept)
            if kernel not in best or sum(l1[i] for i in kept) > sum(l1[i] for i in best[kernel]):
                best[kernel] = kept
    assert sorted(best) == [1, 3, 5, 7, 9]
    assert {o.kernel: o.kept for o in segment.options} == {(k, k): kept for k, kept in best.items()}
    option = segment.options[0]
    assert (option.in_channels, option.out_channels, option.input_hw, option.depthwise) == (C, 2 * C, (HW, HW), False)


def test_all_depthwise_segment_stays_depthwise_and_keeps_a_conv():
    b = GraphBuilder((1, 3, HW, HW))
    x = _relu(b, _conv(b, "x", 3))
    x = _relu(b, _conv(b, _relu(b, _conv(b, x, groups=C)), groups=C))
    analysis = analyse_chain(b.build(_conv(b, x)))
    options = _segment(analysis, 0, 2).options
    assert [(o.kernel[0], o.depthwise, len(o.kept)) for o in options] == [(3, True, 1), (5, True, 2)]


def test_one_dimensional_chain():
    b = GraphBuilder((1, 3, 16))
    x = "x"
    for c_in in (3, C, C):
        weight = b.const(np.random.default_rng(c_in).standard_normal((C, c_in, 3)).astype(np.float32))
        x = _relu(b, b.node("Conv", [x, weight], pads=[1, 1]))
    analysis = analyse_chain(b.build(x))
    assert [o.kernel for o in _segment(analysis, 0, 2).options] == [(3,), (5,)]
    assert analysis.convs[1].input_shape == (1, C, 16)


def test_final_pointwise_conv_is_the_head_unless_a_skip_closes_at_it():
    b = GraphBuilder((1, 3, HW, HW))
    x = _relu(b, _conv(b, _relu(b, _conv(b, "x", 3))))
    head = _conv(b, _relu(b, _conv(b, x)), C, 4 * C, k=1)
    analysis = analyse_chain(b.build(b.node("GlobalAveragePool", [_relu(b, head)])))
    assert len(analysis.convs) == 3 and "head conv" in analysis.excluded[b.nodes[-3].name]

    b = GraphBuilder((1, 3, HW, HW))
    x = _relu(b, _conv(b, _relu(b, _conv(b, "x", 3))))
    analysis = analyse_chain(b.build(_relu(b, b.node("Add", [_conv(b, x, k=1), x]))))
    assert len(analysis.convs) == 3 and analysis.excluded == {}


def test_parallel_branch_is_excluded():
    b = GraphBuilder((1, 3, HW, HW))
    x = _relu(b, _conv(b, "x", 3))
    long_branch = _conv(b, _relu(b, _conv(b, x)))
    short_branch = _conv(b, x)
    side = b.nodes[-1].name
    analysis = analyse_chain(b.build(_conv(b, b.node("Concat", [long_branch, short_branch], axis=1), 2 * C)))
    assert len(analysis.convs) == 4 and "parallel" in analysis.excluded[side]
    assert "Concat" in analysis.breaks[2]


def test_dynamic_input_needs_input_shapes():
    b = GraphBuilder(("N", 3, HW, HW))
    model = b.build(_conv(b, _relu(b, _conv(b, "x", 3))))
    with pytest.raises(BadInputError, match="input_shapes="):
        analyse_chain(model)
    for shapes in ({"x": (2, 3, HW, HW)}, {None: (2, 3, HW, HW)}):  # name:dims strings are parsed by the CLI
        assert analyse_chain(model, shapes).convs[1].input_shape == (2, C, HW, HW)


@pytest.mark.parametrize("convs", [0, 1])
def test_no_conv_chain_is_refused(convs):
    b = GraphBuilder((1, 3, HW, HW))
    x = _relu(b, "x")
    for _ in range(convs):
        x = _conv(b, x, 3)
    with pytest.raises(BadInputError, match="has no chain of convolutions to compress"):
        analyse_chain(b.build(x))


def test_unnamed_chain_nodes_are_refused():
    b = GraphBuilder((1, 3, HW, HW))
    model = b.build(_conv(b, _relu(b, _conv(b, "x", 3))))
    model.graph.node[0].name = ""
    with pytest.raises(BadInputError, match="unique, non-empty names"):
        analyse_chain(model)
