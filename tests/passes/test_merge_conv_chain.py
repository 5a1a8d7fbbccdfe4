import numpy as np
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from onnxmerge.conv_algebra import ConvParams, output_size

from conftest import GraphBuilder, reasons, apply, assert_same_outputs, op_types


def _chain(first: dict, second: dict, size=(1, 4, 11, 11), c1=6, c2=5, seed=0):
    g = GraphBuilder(size, seed=seed)
    middle = g.conv("x", size[1], c1, **first)
    model = g.build(g.conv(middle, c1, c2, **second))
    return model


def test_3x3_then_unpadded_3x3_merges_to_5x5():
    model = _chain({"k": 3, "pads": [1, 1, 1, 1]}, {"k": 3}, c1=16)
    run = apply(model, "merge_conv_chain")
    assert op_types(run.model) == ["Conv"]
    weight = next(t for t in run.model.graph.initializer if len(t.dims) == 4)
    assert list(weight.dims) == [5, 4, 5, 5]
    assert_same_outputs(model, run.model, (1, 4, 11, 11))


def test_1x1_without_bias_then_padded_3x3_merges():
    model = _chain({"k": 1, "bias": False}, {"k": 3, "pads": [1, 1, 1, 1]}, c1=8, c2=3)
    run = apply(model, "merge_conv_chain")
    assert op_types(run.model) == ["Conv"]
    assert_same_outputs(model, run.model, (1, 4, 11, 11))


def test_border_inexact_pair_is_refused_with_reason():
    model = _chain({"k": 3, "pads": [1, 1, 1, 1]}, {"k": 3, "pads": [1, 1, 1, 1]})
    run = apply(model, "merge_conv_chain", allow_costlier_merges=True)
    assert op_types(run.model) == ["Conv", "Conv"]
    assert "pad" in reasons(run, "merge_conv_chain")


def test_first_bias_with_padded_second_is_refused():
    model = _chain({"k": 1, "bias": True}, {"k": 3, "pads": [1, 1, 1, 1]})
    run = apply(model, "merge_conv_chain", allow_costlier_merges=True)
    assert op_types(run.model) == ["Conv", "Conv"]
    assert "bias" in reasons(run, "merge_conv_chain")


def test_bottleneck_48_12_96_stays_two_convs_unless_forced():
    model = _chain({"k": 1, "bias": False}, {"k": 3, "pads": [1, 1, 1, 1]}, size=(1, 48, 8, 8), c1=12, c2=96)
    run = apply(model, "merge_conv_chain")
    assert op_types(run.model) == ["Conv", "Conv"]
    assert "MACs" in reasons(run, "merge_conv_chain")
    forced = apply(model, "merge_conv_chain", allow_costlier_merges=True)
    assert op_types(forced.model) == ["Conv"]
    assert_same_outputs(model, forced.model, (1, 48, 8, 8))


def test_multi_consumer_intermediate_is_refused():
    g = GraphBuilder((1, 3, 8, 8))
    middle = g.conv("x", 3, 3, k=1)
    model = g.build([g.conv(middle, 3, 3, k=1), middle])
    run = apply(model, "merge_conv_chain", allow_costlier_merges=True)
    assert op_types(run.model) == ["Conv", "Conv"]
    assert "other consumers" in reasons(run, "merge_conv_chain")


def test_depthwise_pair_stays_depthwise():
    model = _chain({"k": 3, "groups": 4, "pads": [1, 1, 1, 1]}, {"k": 3, "groups": 4}, c1=4, c2=4)
    run = apply(model, "merge_conv_chain", allow_costlier_merges=True)
    assert op_types(run.model) == ["Conv"]
    group = next(a.i for a in run.model.graph.node[0].attribute if a.name == "group")
    assert group == 4
    assert_same_outputs(model, run.model, (1, 4, 11, 11))


def test_three_conv_chain_reaches_one_conv():
    g = GraphBuilder((1, 4, 12, 12))
    a = g.conv("x", 4, 4, k=1, bias=False)
    b = g.conv(a, 4, 4, k=1, bias=False)
    model = g.build(g.conv(b, 4, 4, k=1))
    run = apply(model, "merge_conv_chain")
    assert op_types(run.model) == ["Conv"]
    assert_same_outputs(model, run.model, (1, 4, 12, 12))


_conv = st.fixed_dictionaries({
    "k": st.integers(1, 4),
    "stride": st.integers(1, 3),
    "dilation": st.integers(1, 2),
    "pads": st.lists(st.integers(0, 2), min_size=4, max_size=4),
    "bias": st.booleans(),
    "groups": st.sampled_from(["dense", "depthwise", "two"]),
})


def _attrs(spec: dict, channels: int) -> dict:
    groups = {"dense": 1, "depthwise": channels, "two": 2}[spec["groups"]]
    return {"k": spec["k"], "strides": [spec["stride"]] * 2, "dilations": [spec["dilation"]] * 2,
            "pads": spec["pads"], "bias": spec["bias"], "groups": groups}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=_conv, second=_conv, size=st.integers(9, 16), seed=st.integers(0, 2**16))
def test_every_merge_is_exact_and_every_other_pair_is_refused(first, second, size, seed):
    channels = 4
    sizes = (size, size)
    for spec in (first, second):  # only geometrically valid chains
        params = ConvParams.make(np.zeros((1, 1, spec["k"], spec["k"])), strides=[spec["stride"]] * 2,
                                 dilations=[spec["dilation"]] * 2, pads=spec["pads"])
        try:
            sizes = output_size(params, sizes)
        except ValueError:
            assume(False)
    model = _chain(_attrs(first, channels), _attrs(second, channels), size=(1, channels, size, size),
                   c1=channels, c2=channels, seed=seed)
    run = apply(model, "merge_conv_chain", allow_costlier_merges=True)
    ops = op_types(run.model)
    event("merged" if ops == ["Conv"] else "refused")
    if ops == ["Conv"]:
        assert_same_outputs(model, run.model, (1, channels, size, size), seed=seed, rtol=1e-4, atol=1e-4)
    else:
        assert ops == ["Conv", "Conv"]
        assert run.refusals["merge_conv_chain"], "a pair left unmerged must say why"
