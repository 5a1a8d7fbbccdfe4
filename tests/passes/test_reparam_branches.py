from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import GraphBuilder, reasons, apply, assert_same_outputs, op_types


def _repvgg_block(g: GraphBuilder, x: str, channels: int, identity: bool = True) -> str:
    three = g.batchnorm(g.conv(x, channels, channels, k=3, bias=False, pads=[1, 1, 1, 1]), channels)
    one = g.batchnorm(g.conv(x, channels, channels, k=1, bias=False), channels)
    total = g.node("Add", [three, one])
    if identity:
        total = g.node("Add", [total, g.batchnorm(x, channels)])
    return g.node("Relu", [total])


def test_repvgg_block_becomes_one_conv():
    g = GraphBuilder((1, 4, 9, 9))
    model = g.build(_repvgg_block(g, _repvgg_block(g, "x", 4), 4))
    run = apply(model, "fold_batchnorm", "reparam_branches")
    assert op_types(run.model) == ["Conv", "Relu", "Conv", "Relu"]
    assert_same_outputs(model, run.model, (1, 4, 9, 9))


def test_conv_plus_identity_skip():
    g = GraphBuilder((1, 3, 7, 7))
    model = g.build(g.node("Add", [g.conv("x", 3, 3, pads=[1, 1, 1, 1]), "x"]))
    run = apply(model, "reparam_branches")
    assert op_types(run.model) == ["Conv"]
    assert_same_outputs(model, run.model, (1, 3, 7, 7))


def test_stride2_branches_without_identity():
    g = GraphBuilder((1, 3, 10, 10))
    a = g.conv("x", 3, 5, k=3, pads=[1, 1, 1, 1], strides=[2, 2])
    b = g.conv("x", 3, 5, k=1, strides=[2, 2])
    model = g.build(g.node("Add", [a, b]))
    run = apply(model, "reparam_branches")
    assert op_types(run.model) == ["Conv"]
    assert_same_outputs(model, run.model, (1, 3, 10, 10))


def test_sizes_equal_only_at_this_input_size_are_refused():
    """2x2/s2 and 1x1/s2 agree on 8x8 inputs but not on 9x9: not one conv for every input size."""
    g = GraphBuilder((1, 3, 8, 8))
    a = g.conv("x", 3, 3, k=2, strides=[2, 2])
    b = g.conv("x", 3, 3, k=1, strides=[2, 2])
    model = g.build(g.node("Add", [a, b]))
    run = apply(model, "reparam_branches")
    assert "Add" in op_types(run.model)
    assert run.refusals["reparam_branches"]


def test_branches_of_different_inputs_are_refused():
    g = GraphBuilder((1, 3, 6, 6))
    relu = g.node("Relu", ["x"])
    model = g.build(g.node("Add", [g.conv("x", 3, 3, k=1), g.conv(relu, 3, 3, k=1)]))
    run = apply(model, "reparam_branches")
    assert "same input" in reasons(run, "reparam_branches")


def test_branch_with_other_consumer_is_refused():
    g = GraphBuilder((1, 3, 6, 6))
    a = g.conv("x", 3, 3, k=1)
    model = g.build([g.node("Add", [a, g.conv("x", 3, 3, k=1)]), a])
    run = apply(model, "reparam_branches")
    assert "other consumers" in reasons(run, "reparam_branches")


_branch = st.fixed_dictionaries({
    "kind": st.sampled_from(["conv", "conv", "identity", "bn"]),
    "k": st.sampled_from([1, 3, 5]),
    "dilation": st.integers(1, 2),
    "groups": st.sampled_from([1, 2, 4]),
    "bias": st.booleans(),
    "shift": st.integers(-1, 1),
})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(branches=st.lists(_branch, min_size=1, max_size=3), stride=st.integers(1, 2), size=st.integers(7, 12),
       seed=st.integers(0, 2**16))
def test_every_accepted_branch_set_is_exact(branches, stride, size, seed):
    """A 3x3 conv plus random branches with 'same'-style padding, sometimes shifted off centre.

    Whatever the pass merges must be exact; whatever it leaves must come with a reason.
    """
    channels = 4
    g = GraphBuilder((1, channels, size, size), seed=seed)
    operands = [g.conv("x", channels, channels, k=3, pads=[1, 1, 1, 1], strides=[stride, stride])]
    for spec in branches:
        if spec["kind"] == "identity" and stride == 1:
            operands.append("x")
        elif spec["kind"] == "bn" and stride == 1:
            operands.append(g.batchnorm("x", channels))
        else:
            span = spec["dilation"] * (spec["k"] - 1)
            begin = min(max(span // 2 + spec["shift"], 0), span)
            pads = [begin, begin, span - begin, span - begin]
            operands.append(g.conv("x", channels, channels, k=spec["k"], bias=spec["bias"], groups=spec["groups"],
                                   pads=pads, strides=[stride, stride], dilations=[spec["dilation"]] * 2))
    total = operands[0]
    for operand in operands[1:]:
        total = g.node("Add", [total, operand])
    model = g.build(total)
    run = apply(model, "reparam_branches")
    merged = "Add" not in op_types(run.model)
    event("merged" if merged else "refused")
    assert_same_outputs(model, run.model, (1, channels, size, size), seed=seed, rtol=1e-4, atol=1e-4)
    if not merged:
        assert run.refusals["reparam_branches"]
