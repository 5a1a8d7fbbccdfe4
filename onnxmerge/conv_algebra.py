"""Exact algebra on ONNX convolution parameters (numpy, float64, no graph).

Graph passes decide where a rewrite could apply; this module decides whether it is exact
and computes it. One fact is used throughout, per spatial axis (axes are independent):
a conv with kernel k, stride s, dilation d and pads (pb, pe) computes output t from the
input positions ``s*t - pb + d*u`` (taps u = 0..k-1), reading 0 outside the input, and
its output length is ``floor((H + pb + pe - d*(k-1) - 1) / s) + 1``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np


class MergeRefused(ValueError):
    """Raised when a requested combination cannot be expressed exactly; str(e) is a human-readable reason."""


@dataclass(frozen=True, eq=False)
class ConvParams:
    """One ONNX Conv node's parameters, validated once so the algebra below can trust them.

    Arrays are float64 copies marked read-only, so a shared ConvParams cannot change under
    a caller. Equality is identity (element-wise array equality has no single truth value).
    """

    weight: np.ndarray  # [M, C/groups, k1, ..., kn]
    bias: np.ndarray  # [M]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # (x1_begin, ..., xn_begin, x1_end, ..., xn_end)
    groups: int

    def __post_init__(self):
        weight = np.array(self.weight, dtype=np.float64)
        if weight.ndim < 3 or 0 in weight.shape:
            raise ValueError(
                f"weight must be [M, C/groups, k1, ..., kn] with n >= 1 and no empty axis, got shape {weight.shape}"
            )
        rank = weight.ndim - 2
        groups = operator.index(self.groups)
        if groups < 1 or weight.shape[0] % groups:
            raise ValueError(f"groups={groups} must be >= 1 and divide the {weight.shape[0]} output channels")
        bias = np.array(self.bias, dtype=np.float64)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape {weight.shape[:1]}, got {bias.shape}")
        weight.flags.writeable = False
        bias.flags.writeable = False
        for name, value in (
            ("weight", weight),
            ("bias", bias),
            ("strides", _int_tuple("strides", self.strides, rank, minimum=1)),
            ("dilations", _int_tuple("dilations", self.dilations, rank, minimum=1)),
            ("pads", _int_tuple("pads", self.pads, 2 * rank, minimum=0)),
            ("groups", groups),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def make(cls, weight, bias=None, strides=None, dilations=None, pads=None, groups=1) -> ConvParams:
        """Build from ONNX attributes, filling in the defaults a node may omit."""
        weight = np.asarray(weight, dtype=np.float64)
        rank = weight.ndim - 2
        return cls(
            weight=weight,
            bias=np.zeros(weight.shape[:1]) if bias is None else bias,
            strides=(1,) * rank if strides is None else strides,
            dilations=(1,) * rank if dilations is None else dilations,
            pads=(0,) * (2 * rank) if pads is None else pads,
            groups=groups,
        )

    @property
    def rank(self) -> int:
        return self.weight.ndim - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return self.weight.shape[2:]

    @property
    def pads_begin(self) -> tuple[int, ...]:
        return self.pads[: self.rank]

    @property
    def pads_end(self) -> tuple[int, ...]:
        return self.pads[self.rank :]

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels and self.groups > 1


def _int_tuple(name: str, values, length: int, minimum: int) -> tuple[int, ...]:
    values = tuple(operator.index(v) for v in values)
    if len(values) != length or any(v < minimum for v in values):
        raise ValueError(f"{name} must be {length} integers >= {minimum}, got {values}")
    return values


def _reach(conv: ConvParams) -> tuple[int, ...]:
    """Per axis, how far past its first tap the kernel reads: d*(k-1)."""
    return tuple(d * (k - 1) for d, k in zip(conv.dilations, conv.kernel_shape))


def _size_offset(conv: ConvParams) -> tuple[int, ...]:
    """Per axis, the c in output length floor((H + c - 1)/s) + 1: pads_begin + pads_end - d*(k-1)."""
    return tuple(pb + pe - r for pb, pe, r in zip(conv.pads_begin, conv.pads_end, _reach(conv)))


def output_size(conv: ConvParams, in_size: Sequence[int]) -> tuple[int, ...]:
    """ONNX's floor formula per axis; raises ValueError when the input is too small for the kernel."""
    in_size = tuple(operator.index(h) for h in in_size)
    if len(in_size) != conv.rank or min(in_size) < 1:
        raise ValueError(f"input size must be {conv.rank} positive integers, got {in_size}")
    out = tuple((h + c - 1) // s + 1 for h, c, s in zip(in_size, _size_offset(conv), conv.strides))
    if min(out) < 1:
        raise ValueError(f"input size {in_size} is too small for this conv (output would be {out})")
    return out


def conv_macs(conv: ConvParams, out_size: Sequence[int]) -> int:
    """Multiply-accumulates for one image: each output element reads C/groups channels times the kernel."""
    if len(out_size) != conv.rank:
        raise ValueError(f"output size must have {conv.rank} entries, got {tuple(out_size)}")
    return math.prod(map(int, out_size)) * conv.out_channels * conv.weight.shape[1] * math.prod(conv.kernel_shape)


def expand_groups(weight: np.ndarray, groups: int) -> np.ndarray:
    """Dense block-diagonal form of a grouped weight, [M, C/g, k..] -> [M, C, k..]."""
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim < 3 or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide the output channels of weight shape {weight.shape}")
    out_channels, group_in, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    dense = np.zeros((out_channels, group_in * groups) + kernel)
    blocks = dense.reshape((groups, out_channels // groups, groups, group_in) + kernel)  # a view of dense
    diagonal = np.arange(groups)
    blocks[diagonal, :, diagonal] = weight.reshape((groups, out_channels // groups, group_in) + kernel)
    return dense


def regroup(conv: ConvParams, groups: int) -> ConvParams:
    """The same conv at a coarser grouping, so convs of different groupings can be added or composed.

    Each new group holds conv.groups/groups old groups as a block diagonal, which is exact.
    """
    if groups < 1 or conv.groups % groups:
        raise ValueError(f"can only regroup to a divisor of groups={conv.groups}, got {groups}")
    blocks = np.split(conv.weight, groups)
    weight = np.concatenate([expand_groups(b, conv.groups // groups) for b in blocks])
    return replace(conv, weight=weight, groups=groups)


def bn_scale_shift(gamma, beta, mean, var, epsilon) -> tuple[np.ndarray, np.ndarray]:
    """Inference-mode BatchNormalization as the per-channel affine map y = scale*x + shift."""
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + float(epsilon))
    return scale, beta - mean * scale


def _per_channel(values, count: int, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim > 1 or values.size not in (1, count):
        raise ValueError(f"{name} must be a scalar or have {count} entries, got shape {values.shape}")
    return np.broadcast_to(values.reshape(-1), (count,))


def scale_shift_output(conv: ConvParams, scale, shift) -> ConvParams:
    """Fold a following per-output-channel affine map (BatchNorm, Mul/Add by constants) into the conv."""
    channels = conv.out_channels
    scale = _per_channel(scale, channels, "scale")
    shift = _per_channel(shift, channels, "shift")
    weight = conv.weight * scale.reshape((channels,) + (1,) * (conv.weight.ndim - 1))
    return replace(conv, weight=weight, bias=conv.bias * scale + shift)


def scale_shift_transposed(weight, bias, groups, scale, shift) -> tuple[np.ndarray, np.ndarray]:
    """The same fold for ConvTranspose, whose weight is [C_in, M/groups, k..].

    Output channel g*(M/groups) + j is weight[c, j] for the input channels c of group g, so
    the scale has to be laid out per group rather than along axis 0.
    """
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim < 3 or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide the input channels of weight shape {weight.shape}")
    group_out, kernel = weight.shape[1], weight.shape[2:]
    channels = group_out * groups
    bias = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64)
    if bias.shape != (channels,):
        raise ValueError(f"bias must have shape ({channels},), got {bias.shape}")
    scale = _per_channel(scale, channels, "scale")
    shift = _per_channel(shift, channels, "shift")
    per_group = weight.reshape((groups, -1, group_out) + kernel)
    per_group = per_group * scale.reshape((groups, 1, group_out) + (1,) * len(kernel))
    return per_group.reshape(weight.shape), bias * scale + shift


def affine_conv(scale, shift, rank: int) -> ConvParams:
    """A per-channel affine map (e.g. a BatchNorm-only RepVGG branch) as a 1x1 depthwise conv, so it can be merged."""
    scale = np.asarray(scale, dtype=np.float64)
    if scale.ndim != 1:
        raise ValueError(f"scale must be 1-D [channels], got shape {scale.shape}")
    channels = scale.size
    weight = scale.reshape((channels, 1) + (1,) * rank)
    return ConvParams.make(weight, _per_channel(shift, channels, "shift"), groups=channels)


def identity_conv(channels: int, rank: int) -> ConvParams:
    """The identity (a RepVGG skip branch) as a conv, so it can be merged."""
    return affine_conv(np.ones(channels), 0.0, rank)


def _assemble(placements) -> tuple[np.ndarray, tuple[int, ...]]:
    """Sum kernels, each placed at (offsets, steps) in undilated tap units, into one kernel.

    The result uses, per axis, the coarsest dilation that still hits every placed tap, so
    merging never inflates a dilated kernel with zero taps. Tap 0 must be among the placed ones.
    """
    first_block = placements[0][0]
    dilations, sizes = [], []
    for axis in range(first_block.ndim - 2):
        taps = {o[axis] + s[axis] * u for block, o, s in placements for u in range(block.shape[2 + axis])}
        dilation = math.gcd(*taps) or 1
        dilations.append(dilation)
        sizes.append(max(taps) // dilation + 1)
    weight = np.zeros(first_block.shape[:2] + tuple(sizes))
    for block, offsets, steps in placements:
        window = [slice(None), slice(None)]
        for o, s, k, dilation in zip(offsets, steps, block.shape[2:], dilations):
            step = s // dilation if k > 1 else 1
            window.append(slice(o // dilation, o // dilation + step * (k - 1) + 1, step))
        weight[tuple(window)] += block
    return weight, tuple(dilations)


def _nearest_padded_read(pad: int, kernel: int, stride: int, dilation: int) -> int:
    """Distance from the data start back to the closest begin-padding position a conv ever reads (pad > 0).

    The conv reads padded positions stride*t + dilation*v, of which the first `pad` are padding;
    dilation and stride can skip the padding right next to the data.
    """
    taps = [dilation * v for v in range(kernel) if dilation * v < pad]
    return pad - max(tap + (pad - 1 - tap) // stride * stride for tap in taps)


def composition_refusal(first: ConvParams, second: ConvParams) -> str | None:
    """None if compose() is exact for every input size, else the reason.

    The merged conv reads x exactly where the pair does, with the same zero padding of x. The
    two can only differ where the second conv reads its own padding: the pair sees zeros there,
    the merged conv sees the first conv continued past its output, b1 + W1 * (window of x).
    That is zero exactly when b1 == 0 and each such window lies entirely in x's padding, which
    the per-axis checks below decide; for generic weights every refusal has a counterexample.
    An unpadded second conv is therefore always exact, and so is a padded one after a bias-free
    1x1 conv (whose window has reach 0).
    """
    if first.rank != second.rank:
        return f"rank mismatch: first conv is {first.rank}-D, second conv is {second.rank}-D"
    if second.in_channels != first.out_channels:
        return (
            f"channel mismatch: first conv outputs {first.out_channels} channels, "
            f"second conv reads {second.in_channels}"
        )
    if not any(second.pads):
        return None
    for axis, reach in enumerate(_reach(first)):
        if second.pads_end[axis] and reach > first.pads_end[axis]:
            return (
                f"second conv pads the end of spatial axis {axis}, where first conv's window (reach {reach}) "
                f"extends past its own end padding ({first.pads_end[axis]}): "
                "border values of the merged conv would differ"
            )
        if second.pads_begin[axis]:
            gap = _nearest_padded_read(
                second.pads_begin[axis], second.kernel_shape[axis], second.strides[axis], second.dilations[axis]
            )
            if reach >= first.pads_begin[axis] + first.strides[axis] * gap:
                return (
                    f"second conv pads the start of spatial axis {axis}, where first conv's window (reach {reach}, "
                    f"stride {first.strides[axis]}, begin pad {first.pads_begin[axis]}) would still see the input: "
                    "border values of the merged conv would differ"
                )
    if np.any(first.bias):
        return "first conv has a bias and second conv pads: the padded border would see the bias"
    return None


def compose(first: ConvParams, second: ConvParams, *, pad_at_front: bool = False) -> ConvParams:
    """conv2(conv1(x)) as one conv, exactly, borders included; raises MergeRefused(reason) otherwise.

    Per axis, output r of the pair reads x at s1*(s2*r - P2b + d2*v) - P1b + d1*u: a conv with
    stride s1*s2, begin pad P1b + s1*P2b and taps d1*u + s1*d2*v. End pad P1e + s1*P2e gives the
    pair's output length for every input, since floor((floor(a/s1) - m)/s2) == floor((a - s1*m)/(s1*s2))
    for integers. Groups become gcd(g1, g2): block structure survives at that granularity.

    ``pad_at_front=True`` skips the border check: the result is then exactly the pair in LayerMerge's
    "pad once at the front" form (all padding moved onto the first conv, the second unpadded), which is
    what depth compression trains and merges.
    """
    reason = composition_refusal(first, second)
    if pad_at_front and reason and first.rank == second.rank and second.in_channels == first.out_channels:
        reason = None
    if reason:
        raise MergeRefused(reason)
    s1 = first.strides
    groups = math.gcd(first.groups, second.groups)
    w1 = _per_group(regroup(first, groups).weight, groups)  # [G, C1/G, C0/G, k1..]
    w2 = _per_group(regroup(second, groups).weight, groups)  # [G, C2/G, C1/G, k2..]
    w1_flat = w1.reshape(w1.shape[:2] + (-1,))
    placements = []
    for v in np.ndindex(*second.kernel_shape):
        block = (w2[(Ellipsis,) + v] @ w1_flat).reshape((second.out_channels, -1) + first.kernel_shape)
        offsets = tuple(s * d2 * vi for s, d2, vi in zip(s1, second.dilations, v))
        placements.append((block, offsets, first.dilations))
    weight, dilations = _assemble(placements)
    w2_sums = w2.sum(axis=tuple(range(3, w2.ndim)))
    bias = second.bias + np.einsum("gab,gb->ga", w2_sums, first.bias.reshape(groups, -1)).reshape(-1)
    return ConvParams(
        weight=weight,
        bias=bias,
        strides=tuple(a * b for a, b in zip(s1, second.strides)),
        dilations=dilations,
        pads=tuple(p1 + s * p2 for p1, s, p2 in zip(first.pads, s1 + s1, second.pads)),
        groups=groups,
    )


def _per_group(weight: np.ndarray, groups: int) -> np.ndarray:
    """[M, C/G, k..] -> [G, M/G, C/G, k..]: output channels of one group are contiguous."""
    return weight.reshape((groups, -1) + weight.shape[1:])


def parallel_refusal(branches: Sequence[ConvParams]) -> str | None:
    """None if add_parallel() is exact for every input size, else the reason."""
    if not branches:
        return "no branches to add"
    for what, key in (
        ("rank", lambda c: c.rank),
        ("input channels", lambda c: c.in_channels),
        ("output channels", lambda c: c.out_channels),
        ("strides", lambda c: c.strides),
    ):
        values = [key(b) for b in branches]
        if len(set(values)) > 1:
            return f"branches differ in {what}: {values}"
    offsets = [_size_offset(b) for b in branches]
    if len(set(offsets)) > 1:
        return (
            "branches produce different output sizes: pads_begin + pads_end - dilation*(kernel-1) "
            f"per axis must agree, got {offsets}"
        )
    return None


def add_parallel(branches: Sequence[ConvParams]) -> ConvParams:
    """The sum of convs reading the same input (RepVGG branches) as one conv, exactly, borders included.

    Per axis, branch i reads x at s*t - Pb_i + d_i*u. With Pb = max Pb_i its taps sit at
    Pb - Pb_i + d_i*u of the merged kernel; the extra padding only meets zero taps. Equal
    output sizes for every input need equal pads_begin + pads_end - d_i*(k_i-1) = c, and then
    the merged end pad (K-1) + c - Pb is simply max Pe_i.
    """
    reason = parallel_refusal(branches)
    if reason:
        raise MergeRefused(reason)
    groups = math.gcd(*(b.groups for b in branches))
    pads_begin = tuple(max(axis) for axis in zip(*(b.pads_begin for b in branches)))
    pads_end = tuple(max(axis) for axis in zip(*(b.pads_end for b in branches)))
    placements = [
        (regroup(b, groups).weight, tuple(p - q for p, q in zip(pads_begin, b.pads_begin)), b.dilations)
        for b in branches
    ]
    weight, dilations = _assemble(placements)
    return ConvParams(
        weight=weight,
        bias=np.sum([b.bias for b in branches], axis=0),
        strides=branches[0].strides,
        dilations=dilations,
        pads=pads_begin + pads_end,
        groups=groups,
    )
