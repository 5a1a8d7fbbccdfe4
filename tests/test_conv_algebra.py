"""conv_algebra against real convolutions: torch float64 is the reference for every rewrite."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxmerge.conv_algebra import (
    ConvParams,
    MergeRefused,
    add_parallel,
    affine_conv,
    bn_scale_shift,
    compose,
    composition_refusal,
    conv_macs,
    expand_groups,
    identity_conv,
    output_size,
    parallel_refusal,
    regroup,
    scale_shift_output,
    scale_shift_transposed,
)

TOL = 1e-9


def run(conv, x):
    """ONNX Conv semantics in torch: explicit (possibly asymmetric) zero padding, then an unpadded conv."""
    pad = []
    for begin, end in reversed(list(zip(conv.pads_begin, conv.pads_end))):
        pad += [begin, end]
    conv_nd = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[conv.rank]
    return conv_nd(
        F.pad(x, pad),
        torch.from_numpy(conv.weight.copy()),
        torch.from_numpy(conv.bias.copy()),
        stride=conv.strides,
        dilation=conv.dilations,
        groups=conv.groups,
    )


def run_chain(convs, x):
    for conv in convs:
        x = run(conv, x)
    return x


def random_input(rng, channels, size, batch=2):
    return torch.from_numpy(rng.standard_normal((batch, channels) + tuple(size)))


def max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def random_conv(rng, in_channels, out_channels, kernel, groups=1, bias=True, **attrs):
    weight = rng.standard_normal((out_channels, in_channels // groups) + tuple(kernel))
    return ConvParams.make(weight, rng.standard_normal(out_channels) if bias else None, groups=groups, **attrs)


def is_valid(convs, size):
    try:
        for conv in convs:
            size = output_size(conv, size)
    except ValueError:
        return False
    return True


def smallest_valid(convs, rank):
    return next(h for h in range(1, 1000) if is_valid(convs, (h,) * rank))


def assert_composes(first, second, sizes, rng=None):
    """compose() must equal the sequential pair on the whole output, for every given input size."""
    rng = rng or np.random.default_rng(0)
    merged = compose(first, second)
    assert composition_refusal(first, second) is None
    for size in sizes:
        assert output_size(merged, size) == output_size(second, output_size(first, size))
        x = random_input(rng, first.in_channels, size)
        assert max_err(run(merged, x), run_chain([first, second], x)) < TOL, size
    return merged


def assert_adds(branches, sizes, rng=None):
    rng = rng or np.random.default_rng(0)
    merged = add_parallel(branches)
    assert parallel_refusal(branches) is None
    for size in sizes:
        x = random_input(rng, branches[0].in_channels, size)
        assert max_err(run(merged, x), sum(run(b, x) for b in branches)) < TOL, size
    return merged


def assert_refused(fn, refusal, args, *words):
    with pytest.raises(MergeRefused) as info:
        fn(*args)
    reason = str(info.value)
    assert refusal(*args) == reason
    for word in words:
        assert word in reason, reason
    return reason


SIZES_2D = [(9, 9), (10, 13), (11, 8), (16, 17), (7, 12)]

# --- ConvParams, output_size, conv_macs ---------------------------------------------------


def test_make_fills_onnx_defaults_and_freezes():
    weight = np.ones((4, 3, 3, 5), dtype=np.float32)
    conv = ConvParams.make(weight)
    assert conv.weight.dtype == np.float64 and conv.bias.dtype == np.float64
    assert np.array_equal(conv.bias, np.zeros(4))
    assert conv.strides == (1, 1) and conv.dilations == (1, 1) and conv.pads == (0, 0, 0, 0) and conv.groups == 1
    assert (conv.rank, conv.out_channels, conv.in_channels, conv.kernel_shape) == (2, 4, 3, (3, 5))
    assert not conv.weight.flags.writeable and not conv.bias.flags.writeable
    weight[0, 0, 0, 0] = 7.0
    assert conv.weight[0, 0, 0, 0] == 1.0  # a copy, not a view of the caller's array


def test_properties_grouped_and_asymmetric_pads():
    conv = ConvParams.make(np.ones((8, 1, 3)), pads=[1, 2], strides=[np.int64(2)], groups=8)
    assert conv.pads_begin == (1,) and conv.pads_end == (2,) and conv.strides == (2,)
    assert conv.in_channels == 8 and conv.is_depthwise
    assert not ConvParams.make(np.ones((1, 1, 3))).is_depthwise
    assert not ConvParams.make(np.ones((8, 2, 3)), groups=4).is_depthwise


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weight=np.ones((4, 3))), "weight must be"),
        (dict(weight=np.ones((4, 3, 0))), "weight must be"),
        (dict(weight=np.ones((4, 3, 3)), bias=np.ones(3)), "bias must have shape"),
        (dict(weight=np.ones((4, 3, 3, 3)), strides=(1,)), "strides must be 2 integers"),
        (dict(weight=np.ones((4, 3, 3, 3)), strides=(0, 1)), "strides must be"),
        (dict(weight=np.ones((4, 3, 3, 3)), dilations=(1, 1, 1)), "dilations must be"),
        (dict(weight=np.ones((4, 3, 3, 3)), pads=(1, 1)), "pads must be 4 integers"),
        (dict(weight=np.ones((4, 3, 3, 3)), pads=(0, -1, 0, 0)), "pads must be"),
        (dict(weight=np.ones((4, 3, 3)), groups=3), "groups=3"),
        (dict(weight=np.ones((4, 3, 3)), groups=0), "groups=0"),
    ],
)
def test_make_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvParams.make(**kwargs)


def test_output_size_matches_torch_and_onnx_floor():
    rng = np.random.default_rng(1)
    conv = random_conv(rng, 2, 3, (3, 4), strides=(2, 3), dilations=(2, 1), pads=(1, 0, 2, 1))
    for size in [(5, 4), (6, 7), (11, 10), (12, 13)]:
        assert output_size(conv, size) == tuple(run(conv, random_input(rng, 2, size)).shape[2:])
    assert output_size(conv, (5, 4)) == ((5 + 1 + 2 - 4 - 1) // 2 + 1, (4 + 0 + 1 - 3 - 1) // 3 + 1)
    with pytest.raises(ValueError, match="too small"):
        output_size(conv, (1, 4))
    with pytest.raises(ValueError):
        output_size(conv, (5,))


def test_conv_macs_resnet_stem():
    stem = ConvParams.make(np.zeros((64, 3, 7, 7)), strides=(2, 2), pads=(3, 3, 3, 3))
    out = output_size(stem, (224, 224))
    assert out == (112, 112)
    assert conv_macs(stem, out) == 118_013_952
    depthwise = ConvParams.make(np.zeros((32, 1, 3, 3)), groups=32)
    assert conv_macs(depthwise, (10, 10)) == 100 * 32 * 9


# --- groups -------------------------------------------------------------------------------


def test_expand_groups_is_block_diagonal():
    weight = np.arange(4 * 3 * 2, dtype=float).reshape(4, 3, 2) + 1  # M=4, C/g=3, g=2 -> C=6
    dense = expand_groups(weight, 2)
    assert dense.shape == (4, 6, 2)
    assert np.array_equal(dense[:2, :3], weight[:2]) and np.array_equal(dense[2:, 3:], weight[2:])
    assert not dense[:2, 3:].any() and not dense[2:, :3].any()
    assert np.array_equal(expand_groups(weight, 1), weight)
    with pytest.raises(ValueError):
        expand_groups(weight, 3)


@pytest.mark.parametrize(
    "channels, out_mult, groups, target",
    [(8, 1, 8, 1), (8, 2, 8, 4), (8, 1, 8, 2), (6, 1, 6, 3), (12, 1, 4, 2), (6, 2, 3, 1)],
)
def test_regroup_is_exact_and_round_trips(channels, out_mult, groups, target):
    rng = np.random.default_rng(2)
    conv = random_conv(rng, channels, channels * out_mult, (3, 2), groups=groups, pads=(1, 0, 1, 1))
    coarse = regroup(conv, target)
    assert coarse.groups == target and coarse.in_channels == channels
    assert np.array_equal(regroup(coarse, 1).weight, expand_groups(conv.weight, groups))
    assert np.array_equal(regroup(conv, groups).weight, conv.weight)
    x = random_input(rng, channels, (7, 6))
    assert max_err(run(coarse, x), run(conv, x)) < TOL
    with pytest.raises(ValueError):
        regroup(conv, 5)


# --- affine folds -------------------------------------------------------------------------


def random_bn(rng, channels):
    gamma, beta, mean = rng.standard_normal((3, channels))
    return gamma, beta, mean, rng.uniform(0.1, 2.0, channels)


def torch_bn(y, gamma, beta, mean, var, epsilon):
    as_t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    return F.batch_norm(y, as_t(mean), as_t(var), as_t(gamma), as_t(beta), training=False, eps=epsilon)


def test_bn_scale_shift_values():
    scale, shift = bn_scale_shift([2.0], [1.0], [3.0], [3.0], 1.0)
    assert np.allclose(scale, [1.0]) and np.allclose(shift, [-2.0])


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_bn_after_conv_folds(groups):
    rng = np.random.default_rng(3)
    conv = random_conv(rng, 6, 6, (3, 3), groups=groups, bias=groups != 2, strides=(2, 1), pads=(1, 0, 1, 2))
    bn = random_bn(rng, 6)
    folded = scale_shift_output(conv, *bn_scale_shift(*bn, 1e-3))
    for size in [(9, 9), (8, 11)]:
        x = random_input(rng, 6, size)
        assert max_err(run(folded, x), torch_bn(run(conv, x), *bn, 1e-3)) < TOL


def test_scale_shift_output_broadcasts_scalars():
    rng = np.random.default_rng(4)
    conv = random_conv(rng, 3, 4, (3,))
    scaled = scale_shift_output(conv, 2.0, [1.0, 2.0, 3.0, 4.0])
    assert np.allclose(scaled.weight, 2 * conv.weight) and np.allclose(scaled.bias, 2 * conv.bias + [1, 2, 3, 4])
    with pytest.raises(ValueError, match="shift"):
        scale_shift_output(conv, 1.0, [1.0, 2.0])


@pytest.mark.parametrize("groups, c_in, group_out", [(1, 3, 4), (2, 4, 3), (4, 4, 1), (3, 6, 2)])
def test_bn_after_conv_transpose_folds(groups, c_in, group_out):
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((c_in, group_out, 3, 2))
    bias = rng.standard_normal(group_out * groups)
    bn = random_bn(rng, group_out * groups)
    new_weight, new_bias = scale_shift_transposed(weight, bias, groups, *bn_scale_shift(*bn, 1e-5))
    x = random_input(rng, c_in, (5, 6))
    t = torch.from_numpy
    kwargs = dict(stride=(2, 1), padding=(1, 0), output_padding=(1, 0), groups=groups, dilation=(1, 2))
    expected = torch_bn(F.conv_transpose2d(x, t(weight), t(bias), **kwargs), *bn, 1e-5)
    assert max_err(F.conv_transpose2d(x, t(new_weight), t(new_bias), **kwargs), expected) < TOL
    no_bias = scale_shift_transposed(weight, None, groups, 1.0, 0.5)[1]
    assert np.array_equal(no_bias, np.full(group_out * groups, 0.5))


def test_identity_and_affine_convs():
    rng = np.random.default_rng(6)
    for rank in (1, 2, 3):
        x = random_input(rng, 5, (4, 5, 3)[:rank])
        identity = identity_conv(5, rank)
        assert identity.is_depthwise and identity.kernel_shape == (1,) * rank
        assert max_err(run(identity, x), x) == 0.0
        scale, shift = rng.standard_normal(5), rng.standard_normal(5)
        per_channel = (1, 5) + (1,) * rank
        expected = x * torch.from_numpy(scale).reshape(per_channel) + torch.from_numpy(shift).reshape(per_channel)
        assert max_err(run(affine_conv(scale, shift, rank), x), expected) < TOL
    assert np.array_equal(affine_conv([1.0, 2.0], 3.0, 2).bias, [3.0, 3.0])


# --- compose: hand cases ------------------------------------------------------------------


def test_compose_3x3_then_1x1():
    rng = np.random.default_rng(10)
    first = random_conv(rng, 3, 5, (3, 3), pads=(1, 1, 1, 1))
    merged = assert_composes(first, random_conv(rng, 5, 4, (1, 1)), SIZES_2D)
    assert merged.kernel_shape == (3, 3) and merged.pads == (1, 1, 1, 1) and merged.groups == 1


def test_compose_1x1_without_bias_then_padded_3x3():
    rng = np.random.default_rng(11)
    first = random_conv(rng, 3, 5, (1, 1), bias=False)
    second = random_conv(rng, 5, 4, (3, 3), strides=(2, 1), pads=(1, 0, 1, 2))
    merged = assert_composes(first, second, SIZES_2D)
    assert merged.kernel_shape == (3, 3) and merged.strides == (2, 1) and merged.pads == (1, 0, 1, 2)


def test_compose_1x1_keeps_second_dilation():
    rng = np.random.default_rng(12)
    first = random_conv(rng, 3, 4, (1, 1), bias=False, dilations=(3, 3))
    second = random_conv(rng, 4, 2, (3, 3), dilations=(2, 3), pads=(2, 3, 2, 3))
    merged = assert_composes(first, second, SIZES_2D)
    assert merged.kernel_shape == (3, 3) and merged.dilations == (2, 3) and merged.pads == second.pads


def test_compose_strided_3x3_then_unpadded_3x3_is_7x7():
    rng = np.random.default_rng(13)
    first = random_conv(rng, 2, 3, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1))
    merged = assert_composes(first, random_conv(rng, 3, 4, (3, 3)), SIZES_2D + [(12, 12), (13, 14)])
    assert merged.kernel_shape == (7, 7) and merged.strides == (2, 2) and merged.dilations == (1, 1)
    assert merged.pads == (1, 1, 1, 1)
    merged = assert_composes(first, random_conv(rng, 3, 4, (3, 3), strides=(2, 3)), SIZES_2D + [(15, 16), (17, 18)])
    assert merged.kernel_shape == (7, 7) and merged.strides == (4, 6)


def test_compose_dilated_chain_keeps_common_dilation():
    rng = np.random.default_rng(14)
    first = random_conv(rng, 2, 3, (3, 3), dilations=(2, 2), pads=(2, 2, 2, 2))
    second = random_conv(rng, 3, 2, (3, 2), dilations=(2, 1))
    merged = assert_composes(first, second, SIZES_2D)
    # taps 2u + 2v on axis 0 (5 taps at dilation 2), 2u + v on axis 1 (6 dense taps)
    assert merged.kernel_shape == (5, 6) and merged.dilations == (2, 1)


def test_compose_strided_1x1_then_3x3_becomes_dilated():
    rng = np.random.default_rng(15)
    first = random_conv(rng, 3, 4, (1, 1), strides=(2, 2))
    merged = assert_composes(first, random_conv(rng, 4, 2, (3, 3)), SIZES_2D)
    assert merged.kernel_shape == (3, 3) and merged.dilations == (2, 2) and merged.strides == (2, 2)


def test_compose_depthwise_chain_stays_depthwise():
    rng = np.random.default_rng(16)
    first = random_conv(rng, 6, 6, (3, 3), groups=6, pads=(1, 1, 1, 1))
    second = random_conv(rng, 6, 12, (3, 1), groups=6, strides=(2, 1))
    merged = assert_composes(first, second, SIZES_2D)
    assert merged.groups == 6 and merged.is_depthwise and merged.out_channels == 12


@pytest.mark.parametrize("g1, g2, expected", [(6, 2, 2), (2, 3, 1), (4, 6, 2), (1, 6, 1), (6, 1, 1), (3, 3, 3)])
def test_compose_grouped_uses_gcd_of_groups(g1, g2, expected):
    rng = np.random.default_rng(17)
    first = random_conv(rng, 12, 12, (2, 3), groups=g1, pads=(0, 1, 1, 1))
    second = random_conv(rng, 12, 6, (2, 2), groups=g2, strides=(1, 2))
    merged = assert_composes(first, second, SIZES_2D)
    assert merged.groups == expected


def test_compose_propagates_bias_through_unpadded_second():
    rng = np.random.default_rng(18)
    first = random_conv(rng, 2, 3, (3, 3), pads=(1, 1, 1, 1))
    second = random_conv(rng, 3, 4, (3, 3), strides=(2, 2))
    merged = assert_composes(first, second, SIZES_2D)
    assert np.allclose(merged.bias, second.bias + np.einsum("abhw,b->a", second.weight, first.bias))


@pytest.mark.parametrize("rank", [1, 3])
def test_compose_other_ranks(rank):
    rng = np.random.default_rng(19)
    pads = (1, 0, 0)[:rank] + (1, 1, 0)[:rank]
    first = random_conv(rng, 2, 4, (3, 2, 1)[:rank], strides=(2, 1, 1)[:rank], pads=pads)
    second = random_conv(rng, 4, 3, (2, 3, 2)[:rank], dilations=(2, 1, 1)[:rank])
    sizes = [(11, 7, 6)[:rank], (12, 8, 5)[:rank]]
    assert assert_composes(first, second, sizes).rank == rank


def test_compose_exact_beyond_1x1_when_first_padding_covers_the_border():
    """A 'full' conv (pad = reach) without bias outputs zeros just outside its own output, like padding."""
    rng = np.random.default_rng(20)
    first = random_conv(rng, 2, 3, (3, 3), bias=False, pads=(2, 2, 2, 2))
    second = random_conv(rng, 3, 2, (3, 3), pads=(1, 1, 1, 1))
    assert assert_composes(first, second, SIZES_2D).pads == (3, 3, 3, 3)
    strided = random_conv(rng, 2, 3, (3, 3), bias=False, strides=(2, 2), pads=(1, 1, 2, 2))  # begin: 2 < 1 + 2*1
    assert_composes(strided, second, SIZES_2D)
    # A strided 1x1 second conv with begin pad 2 only ever reads the padding 2 before the data, which a
    # 2-tap first conv (reach 1) cannot see into; with begin pad 1 it reads the row right before it.
    two_tap = random_conv(rng, 2, 3, (2, 2), bias=False)
    skipping = random_conv(rng, 3, 2, (1, 1), strides=(2, 2), pads=(2, 2, 0, 0))
    assert_composes(two_tap, skipping, SIZES_2D)
    adjacent = replace(skipping, pads=(1, 2, 0, 0))
    assert_refused(compose, composition_refusal, (two_tap, adjacent), "start of spatial axis 0", "border")


def test_compose_refuses_padded_second_after_spatial_first():
    rng = np.random.default_rng(21)
    first = random_conv(rng, 2, 3, (3, 3), bias=False, pads=(1, 1, 1, 1))
    second = random_conv(rng, 3, 2, (3, 3), pads=(1, 1, 1, 1))
    assert_refused(compose, composition_refusal, (first, second), "second conv pads", "border")
    strided_1x1 = random_conv(rng, 2, 3, (1, 1), strides=(2, 2), bias=False)
    assert_composes(strided_1x1, second, SIZES_2D)  # pointwise first: its border is exact zeros


def test_compose_refuses_bias_before_padding():
    rng = np.random.default_rng(22)
    first = random_conv(rng, 2, 3, (1, 1))
    second = random_conv(rng, 3, 2, (3, 3), pads=(1, 1, 1, 1))
    reason = assert_refused(compose, composition_refusal, (first, second), "bias", "pads")
    assert reason == "first conv has a bias and second conv pads: the padded border would see the bias"


def test_compose_refuses_mismatches():
    rng = np.random.default_rng(23)
    first = random_conv(rng, 2, 3, (3, 3))
    assert_refused(compose, composition_refusal, (first, random_conv(rng, 4, 2, (1, 1))), "channel mismatch")
    assert_refused(compose, composition_refusal, (first, random_conv(rng, 3, 2, (1,))), "rank mismatch")


# --- compose: property test ---------------------------------------------------------------


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def draw_conv(draw, rng, in_channels, rank=2):
    groups = draw(st.sampled_from(divisors(in_channels)))
    out_channels = groups * draw(st.integers(1, max(1, 6 // groups)))
    kernel = draw(st.one_of(st.just((1,) * rank), st.tuples(*[st.integers(1, 5)] * rank)))
    pads = draw(st.one_of(st.just((0,) * 2 * rank), st.tuples(*[st.integers(0, 2)] * (2 * rank))))
    return random_conv(
        rng,
        in_channels,
        out_channels,
        kernel,
        groups=groups,
        bias=draw(st.booleans()),
        strides=draw(st.tuples(*[st.integers(1, 3)] * rank)),
        dilations=draw(st.tuples(*[st.integers(1, 2)] * rank)),
        pads=pads,
    )


@st.composite
def conv_chains(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    first = draw_conv(draw, rng, draw(st.integers(1, 6)))
    second = draw_conv(draw, rng, first.out_channels)
    extra = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=2, max_size=2))
    return first, second, extra, rng


def naive_merge(first, second):
    """What compose() would build if it ignored borders: the unpadded composition, padded like the pair."""
    core = compose(first, replace(second, pads=(0,) * len(second.pads)))
    strides = first.strides + first.strides
    return replace(core, pads=tuple(p1 + s * p2 for p1, s, p2 in zip(first.pads, strides, second.pads)))


def check_chain(first, second, extra, rng):
    h = smallest_valid([first, second], 2)
    reason = composition_refusal(first, second)
    if reason is None:
        assert_composes(first, second, [(h, h)] + [(h + a, h + b) for a, b in extra], rng)
        return
    assert_refused(compose, composition_refusal, (first, second), "border")
    # Every refusal is necessary: the border-blind merge really differs on some input. One axis's
    # counterexample needs its size in the right residue class mod s1*s2 and large enough for the
    # second conv to read the offending padding; a diagonal sweep reaches every such size.
    naive = naive_merge(first, second)
    for size in range(h, h + 40):
        x = random_input(rng, first.in_channels, (size, size), batch=1)
        if max_err(run(naive, x), run_chain([first, second], x)) > 1e-6:
            return
    raise AssertionError(f"refusal not justified: {reason}")


@settings(max_examples=200, deadline=None)
@given(conv_chains())
def test_compose_property(chain):
    check_chain(*chain)


# --- add_parallel -------------------------------------------------------------------------


def test_add_parallel_repvgg_block():
    rng = np.random.default_rng(30)
    conv3 = random_conv(rng, 4, 4, (3, 3), pads=(1, 1, 1, 1))
    conv1 = random_conv(rng, 4, 4, (1, 1))
    merged = assert_adds([conv3, conv1, identity_conv(4, 2)], SIZES_2D)
    assert merged.kernel_shape == (3, 3) and merged.pads == (1, 1, 1, 1) and merged.groups == 1
    expected_centre = conv3.weight[:, :, 1, 1] + conv1.weight[:, :, 0, 0] + np.eye(4)
    assert np.allclose(merged.weight[:, :, 1, 1], expected_centre)
    assert np.allclose(merged.bias, conv3.bias + conv1.bias)
    bn_branch = affine_conv(*bn_scale_shift(*random_bn(rng, 4), 1e-5), 2)
    merged = assert_adds([conv3, conv1, bn_branch], SIZES_2D)
    assert np.allclose(merged.bias, conv3.bias + conv1.bias + bn_branch.bias)


def test_add_parallel_depthwise_branches_stay_depthwise():
    rng = np.random.default_rng(31)
    branches = [random_conv(rng, 6, 6, (3, 3), groups=6, pads=(1, 1, 1, 1)), identity_conv(6, 2)]
    assert assert_adds(branches, SIZES_2D).is_depthwise
    assert assert_adds(branches + [random_conv(rng, 6, 6, (1, 1), groups=3)], SIZES_2D).groups == 3


def test_add_parallel_strided():
    rng = np.random.default_rng(32)
    conv3 = random_conv(rng, 3, 5, (3, 3), strides=(2, 2), pads=(1, 1, 1, 1))
    conv1 = random_conv(rng, 3, 5, (1, 1), strides=(2, 2))
    merged = assert_adds([conv3, conv1], SIZES_2D + [(12, 12), (13, 13)])
    assert merged.strides == (2, 2) and merged.kernel_shape == (3, 3)


def test_add_parallel_asymmetric_pads_and_even_kernels():
    rng = np.random.default_rng(33)
    same_upper = random_conv(rng, 3, 2, (2, 4), pads=(0, 1, 1, 2))  # TF 'SAME' style
    shifted = random_conv(rng, 3, 2, (3, 3), pads=(0, 0, 2, 2))
    merged = assert_adds([same_upper, shifted, random_conv(rng, 3, 2, (1, 1))], SIZES_2D)
    assert merged.pads == (0, 1, 2, 2) and merged.kernel_shape == (3, 4)


def test_add_parallel_dilated_branches_keep_dilation():
    rng = np.random.default_rng(34)
    dilated = random_conv(rng, 3, 3, (3, 3), dilations=(2, 2), pads=(2, 2, 2, 2))
    merged = assert_adds([dilated, identity_conv(3, 2)], SIZES_2D)
    assert merged.kernel_shape == (3, 3) and merged.dilations == (2, 2)
    mixed = assert_adds([dilated, random_conv(rng, 3, 3, (3, 3), pads=(1, 1, 1, 1))], SIZES_2D)
    assert mixed.kernel_shape == (5, 5) and mixed.dilations == (1, 1)


def test_add_parallel_single_branch_and_1d():
    rng = np.random.default_rng(35)
    branches = [random_conv(rng, 2, 3, (5,), pads=(2, 2)), random_conv(rng, 2, 3, (3,), dilations=(2,), pads=(1, 3))]
    assert_adds(branches, [(9,), (10,), (1,)])
    assert_adds(branches[:1], [(9,)])


def test_add_parallel_refusals():
    rng = np.random.default_rng(36)
    conv3 = random_conv(rng, 4, 4, (3, 3))
    conv1 = random_conv(rng, 4, 4, (1, 1))
    assert_refused(add_parallel, parallel_refusal, ([conv3, conv1],), "different output sizes")
    assert_refused(add_parallel, parallel_refusal, ([],), "no branches")
    strided = random_conv(rng, 4, 4, (1, 1), strides=(2, 2))
    assert_refused(add_parallel, parallel_refusal, ([conv1, strided],), "strides")
    assert_refused(add_parallel, parallel_refusal, ([conv1, random_conv(rng, 3, 4, (1, 1))],), "input channels")
    assert_refused(add_parallel, parallel_refusal, ([conv1, random_conv(rng, 4, 2, (1, 1))],), "output channels")
    assert_refused(add_parallel, parallel_refusal, ([conv1, random_conv(rng, 4, 4, (1,))],), "rank")


@st.composite
def branch_sets(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c_in = draw(st.integers(1, 6))
    c_out = draw(st.sampled_from([c_in, draw(st.integers(1, 6))]))
    strides = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    pair = st.tuples(st.integers(1, 5), st.integers(1, 5)), st.tuples(st.integers(1, 2), st.integers(1, 2))
    shapes = [draw(st.tuples(*pair)) for _ in range(draw(st.integers(1, 4)))]
    reaches = [[d * (k - 1) for k, d in zip(kernel, dilations)] for kernel, dilations in shapes]
    consistent = draw(st.booleans())
    offsets = [draw(st.integers(-min(r[axis] for r in reaches), 2)) for axis in range(2)]
    branches = []
    for (kernel, dilations), reach in zip(shapes, reaches):
        if consistent:
            begins = [draw(st.integers(0, c + r)) for c, r in zip(offsets, reach)]
            pads = begins + [c + r - b for c, r, b in zip(offsets, reach, begins)]
        else:
            pads = draw(st.lists(st.integers(0, 2), min_size=4, max_size=4))
        groups = draw(st.sampled_from(divisors(np.gcd(c_in, c_out))))
        if c_in == c_out and kernel == (1, 1) and draw(st.booleans()):
            scale, shift = rng.standard_normal((2, c_in))
            branch = replace(affine_conv(scale, shift, 2), dilations=dilations)
        else:
            bias = draw(st.booleans())
            branch = random_conv(rng, c_in, c_out, kernel, groups=groups, bias=bias, dilations=dilations)
        branches.append(replace(branch, strides=strides, pads=tuple(pads)))
    extra = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=2, max_size=2))
    return branches, extra, rng


@settings(max_examples=200, deadline=None)
@given(branch_sets())
def test_add_parallel_property(branch_set):
    branches, extra, rng = branch_set
    size_offsets = {
        tuple(b.pads[i] + b.pads[i + 2] - b.dilations[i] * (b.kernel_shape[i] - 1) for i in range(2)) for b in branches
    }
    if len(size_offsets) > 1:
        assert_refused(add_parallel, parallel_refusal, (branches,), "different output sizes")
        return
    h = smallest_valid(branches[:1], 2)
    merged = assert_adds(branches, [(h, h)] + [(h + a, h + b) for a, b in extra], rng)
    assert merged.groups == np.gcd.reduce([b.groups for b in branches])


def test_pad_at_front_composition_equals_the_pad_at_front_pair():
    """LayerMerge's training form: all padding on the first conv, the second unpadded; compose() must match it."""
    rng = np.random.default_rng(7)
    first = ConvParams.make(rng.standard_normal((6, 4, 3, 3)), rng.standard_normal(6), pads=[1, 1, 1, 1])
    second = ConvParams.make(rng.standard_normal((5, 6, 3, 3)), rng.standard_normal(5), pads=[1, 1, 1, 1])
    with pytest.raises(MergeRefused):
        compose(first, second)
    merged = compose(first, second, pad_at_front=True)
    front = ConvParams.make(first.weight, first.bias, pads=[2, 2, 2, 2])
    unpadded = ConvParams.make(second.weight, second.bias)
    x = random_input(rng, 4, (9, 9))
    assert max_err(run(merged, x), run_chain([front, unpadded], x)) < 1e-9
    with pytest.raises(MergeRefused, match="channel"):
        compose(first, ConvParams.make(rng.standard_normal((5, 3, 1, 1))), pad_at_front=True)
