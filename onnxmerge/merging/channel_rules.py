"""How channels flow through each op, for the permutation spec of :mod:`onnxmerge.merging.rebasin`.

One rule per op type, registered with :func:`channel_rule` (the registry style of the torch bridge). A rule is
called with the analysis (a :class:`ChannelContext`) and one node, in topological order, and says how the
node's channel spaces relate: which space each output carries (a new one, an input's, several side by side),
which stored tensors (slot, axis) each space reorders, which inputs' spaces must be one, and when nothing may
cross (``ctx.block(node, reason)`` pins every input space to the identity). An op with no rule, or from a
domain other than ONNX's, is blocked by the analysis with its name in the reason.

The vocabulary: a *space* is one permutation of hidden units (union-found by the analysis); :class:`Channels`
says where a tensor's channel axis sits and which spaces lie along it; a *member* (slot, axis, offset) is a
stored tensor's axis that a space reorders from that offset on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge import activations
from onnxmerge.graph import constant_value


@dataclass(frozen=True)
class Channels:
    """Where a tensor's channel axis sits (counted from the end, so broadcasting keeps it) and its spaces."""

    from_end: int
    rank: int | None
    segments: tuple[tuple[int, int], ...]  # (space, size) side by side along the axis

    @property
    def axis(self) -> int | None:
        return None if self.rank is None else self.rank - self.from_end

    @property
    def total(self) -> int:
        return sum(size for _, size in self.segments)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(size for _, size in self.segments)

    def placed(self) -> list[tuple[int, int]]:
        """(space, offset along the axis) of every segment."""
        offsets = np.cumsum((0,) + self.sizes[:-1])
        return [(space, int(offset)) for (space, _), offset in zip(self.segments, offsets)]

    def with_rank(self, rank: int | None) -> "Channels":
        """The same axis counted from the end (elementwise broadcasting aligns trailing axes)."""
        return Channels(self.from_end, rank, self.segments)

    def at_axis(self, axis: int, rank: int) -> "Channels":
        """The same axis counted from the start (Flatten/Squeeze drop trailing axes)."""
        return Channels(rank - axis, rank, self.segments)


class ChannelContext(Protocol):
    """What a rule may ask of and tell the analysis (``rebasin._ChannelAnalysis`` implements it)."""

    def channels(self, tensor: gs.Tensor) -> Channels | None:
        """The channels a computed tensor carries; None when it carries no permutable space."""

    def produce(self, tensor: gs.Tensor, channels: Channels) -> None:
        """Record that ``tensor`` carries ``channels``."""

    def stored(self, tensor: gs.Tensor) -> tuple[int, tuple[int, ...]] | None:
        """(slot, shape) of a stored tensor (initializer or Constant, through Identity); None if computed."""

    def new_space(self, size: int) -> int:
        """A fresh permutable space of ``size`` channels."""

    def union(self, space_a: int, space_b: int) -> None:
        """The two spaces must be permuted the same way."""

    def member(self, node: gs.Node, slot: int, axis: int, channels: Channels) -> None:
        """``channels``' spaces reorder axis ``axis`` of stored ``slot`` (``node`` reads it)."""

    def block(self, node: gs.Node, reason: str) -> None:
        """No permutation crosses ``node``: its inputs' spaces are pinned to the identity."""


ChannelRule = Callable[[ChannelContext, gs.Node], None]

_RULES: dict[str, ChannelRule] = {}
_DEFAULT_DOMAINS = ("", "ai.onnx")


def channel_rule(*ops: str):
    """Register the decorated function as the channel rule of ``ops`` (op types of the default domain)."""
    def register(fn: ChannelRule) -> ChannelRule:
        for op in ops:
            if op in _RULES:
                raise ValueError(f"{op} already has a channel rule ({_RULES[op].__name__})")
            _RULES[op] = fn
        return fn
    return register


def op_name(node: gs.Node) -> str:
    """The op as named in a refusal: ``Sin``, or ``com.example.Op`` outside the default domain."""
    domain = getattr(node, "domain", None) or ""
    return node.op if domain in _DEFAULT_DOMAINS else f"{domain}.{node.op}"


def rule_for(node: gs.Node) -> ChannelRule | None:
    """The node's rule; None for an op with no rule or from another domain (the analysis blocks it)."""
    return _RULES.get(node.op) if op_name(node) == node.op else None


def registered_ops() -> frozenset[str]:
    return frozenset(_RULES)


# -- helpers rules share -----------------------------------------------------------------------------------------

def _rank(tensor: gs.Tensor) -> int | None:
    return None if tensor.shape is None else len(tensor.shape)


def _carry(ctx: ChannelContext, node: gs.Node) -> None:
    """The output carries the first input's channels unchanged."""
    channels = ctx.channels(node.inputs[0])
    if channels is not None:
        ctx.produce(node.outputs[0], channels.with_rank(_rank(node.outputs[0]) or channels.rank))


def _channel_first(ctx: ChannelContext, tensor: gs.Tensor) -> Channels | None | bool:
    """The tensor's channels if they sit on axis 1, None if it has none, False if they sit elsewhere."""
    channels = ctx.channels(tensor)
    if channels is None:
        return None
    return channels if channels.axis == 1 else False


def _nchw_input(ctx: ChannelContext, node: gs.Node) -> Channels | None:
    """The data input's channels when they sit on axis 1; None when it has none or (after blocking) elsewhere."""
    incoming = _channel_first(ctx, node.inputs[0])
    if incoming is False:
        ctx.block(node, "input channels are not on axis 1")
        return None
    return incoming


def _optional_stored(ctx: ChannelContext, node: gs.Node, index: int):
    """(present, stored) for an optional input."""
    if len(node.inputs) <= index or not node.inputs[index].name:
        return False, None
    return True, ctx.stored(node.inputs[index])


def _unify(ctx: ChannelContext, node: gs.Node, channel_list: list[Channels | None]) -> Channels | None:
    """Tensors combined elementwise must share one permutation; None (unpermutable) pins the others."""
    first = channel_list[0]
    if first is None or any(c is None or c.from_end != first.from_end or c.sizes != first.sizes
                            for c in channel_list[1:]):
        ctx.block(node, "inputs without the same channel spaces")
        return None
    for channels in channel_list[1:]:
        for (space_a, _), (space_b, _) in zip(first.segments, channels.segments):
            ctx.union(space_a, space_b)
    return first


# -- rules ---------------------------------------------------------------------------------------------------------

@channel_rule("Constant", "Shape", "Size")
def _ignore(ctx: ChannelContext, node: gs.Node) -> None:
    """No channels: a constant, or a read of the shape alone (independent of the channel order)."""


# The activation table's elementwise activations with scalar parameters (Clip only with constant bounds, below),
# and other elementwise unary ops. Multi-node activations (x * Sigmoid(x), GELU's Erf form) are covered op by op.
CARRY_OPS = activations.PERMUTATION_INVARIANT_OPS | frozenset({
    "Celu", "Softplus", "Softsign", "Erf", "Mish", "ThresholdedRelu", "Identity", "Dropout", "Cast", "Neg", "Abs",
    "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
})


@channel_rule(*sorted(CARRY_OPS - {"Clip"}))
def _pass_through(ctx: ChannelContext, node: gs.Node) -> None:
    """Elementwise with scalar parameters: commutes with any permutation, the output carries the input's."""
    _carry(ctx, node)


@channel_rule("Clip")
def _clip(ctx: ChannelContext, node: gs.Node) -> None:
    if any(ctx.stored(t) is None for t in node.inputs[1:] if t.name):
        return ctx.block(node, "Clip bounds are computed")
    _carry(ctx, node)


@channel_rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _pool(ctx: ChannelContext, node: gs.Node) -> None:
    """Per channel over the spatial axes: carries the input's channels (on axis 1)."""
    if _nchw_input(ctx, node) is not None:
        _carry(ctx, node)


@channel_rule("Conv")
def _conv(ctx: ChannelContext, node: gs.Node) -> None:
    """Weight axis 1 follows the input's space, axis 0 (and the bias) a new output space; a depthwise conv is a
    per-channel op that carries the input's space on axis 0; other grouped convs block."""
    weight = ctx.stored(node.inputs[1])
    has_bias, bias = _optional_stored(ctx, node, 2)
    incoming = _channel_first(ctx, node.inputs[0])
    if weight is None or (has_bias and bias is None):
        return ctx.block(node, "weight or bias is computed")
    if incoming is False:
        return ctx.block(node, "input channels are not on axis 1")
    weight_slot, shape = weight
    groups = node.attrs.get("group", 1)
    if groups == 1:
        if incoming is not None:
            ctx.member(node, weight_slot, 1, incoming)
        outgoing = Channels(len(shape) - 1, len(shape), ((ctx.new_space(shape[0]), shape[0]),))
    elif incoming is not None and shape[1] == 1 and groups == shape[0] == incoming.total:
        outgoing = incoming.with_rank(len(shape))  # depthwise: a per-channel op
    else:
        return ctx.block(node, f"grouped Conv (group={groups})")
    ctx.member(node, weight_slot, 0, outgoing)
    if bias is not None:
        ctx.member(node, bias[0], 0, outgoing)
    ctx.produce(node.outputs[0], outgoing)


@channel_rule("Gemm")
def _gemm(ctx: ChannelContext, node: gs.Node) -> None:
    """B's input axis follows the input's space, its output axis (and a matching C) a new space."""
    weight = ctx.stored(node.inputs[1])
    has_bias, bias = _optional_stored(ctx, node, 2)
    incoming = ctx.channels(node.inputs[0])
    if weight is None or (has_bias and bias is None):
        return ctx.block(node, "B or C is computed")
    if node.attrs.get("transA", 0) or (incoming is not None and incoming.from_end != 1):
        return ctx.block(node, "input channels are not on the last axis")
    weight_slot, shape = weight
    in_axis, out_axis = (1, 0) if node.attrs.get("transB", 0) else (0, 1)
    if incoming is not None:
        ctx.member(node, weight_slot, in_axis, incoming)
    width = shape[out_axis]
    outgoing = Channels(1, 2, ((ctx.new_space(width), width),))
    ctx.member(node, weight_slot, out_axis, outgoing)
    if bias is not None and len(bias[1]) >= 1 and bias[1][-1] == width:
        ctx.member(node, bias[0], len(bias[1]) - 1, outgoing)
    ctx.produce(node.outputs[0], outgoing)


@channel_rule("MatMul")
def _matmul(ctx: ChannelContext, node: gs.Node) -> None:
    """A stored 2-D B: axis 0 follows the input's space (on the last axis), axis 1 a new space."""
    weight = ctx.stored(node.inputs[1])
    incoming = ctx.channels(node.inputs[0])
    if weight is None or len(weight[1]) != 2:
        return ctx.block(node, "B is not a stored matrix")
    if incoming is not None and incoming.from_end != 1:
        return ctx.block(node, "input channels are not on the last axis")
    weight_slot, shape = weight
    if incoming is not None:
        ctx.member(node, weight_slot, 0, incoming)
    outgoing = Channels(1, _rank(node.outputs[0]), ((ctx.new_space(shape[1]), shape[1]),))
    ctx.member(node, weight_slot, 1, outgoing)
    ctx.produce(node.outputs[0], outgoing)


# Binary elementwise ops: a constant operand indexed by the channel axis joins the space and is permuted with it.
# PRelu (activations.PER_CHANNEL_PARAM_OPS) is one: its per-channel slope is permuted like a per-channel Mul's
# constant, a scalar slope broadcasts and stays.
ELEMENTWISE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"}) | \
    activations.PER_CHANNEL_PARAM_OPS


@channel_rule(*sorted(ELEMENTWISE_OPS))
def _elementwise(ctx: ChannelContext, node: gs.Node) -> None:
    """Computed operands must share one space (a residual Add unifies its branches); a stored operand with
    the channel axis follows it, one broadcast along the channels is left as it is."""
    stored = [(t, ctx.stored(t)) for t in node.inputs]
    variables = [t for t, s in stored if s is None]
    if not variables:
        return
    channels = _unify(ctx, node, [ctx.channels(t) for t in variables])
    if channels is None:
        return
    for _, constant in stored:
        if constant is None:
            continue
        slot, shape = constant
        axis = len(shape) - channels.from_end
        if axis < 0 or shape[axis] == 1:
            continue  # broadcast along the channels: the same value for every channel
        if shape[axis] != channels.total:
            return ctx.block(node, "a constant operand does not match the channel axis")
        ctx.member(node, slot, axis, channels)
    ctx.produce(node.outputs[0], channels.with_rank(_rank(node.outputs[0])))


@channel_rule("Concat")
def _concat(ctx: ChannelContext, node: gs.Node) -> None:
    """Along the channel axis, the inputs' spaces lie side by side; along another axis they must be one."""
    incoming = [ctx.channels(t) for t in node.inputs]
    rank = _rank(node.outputs[0])
    axis = node.attrs.get("axis")
    if axis is None or rank is None or any(c is None for c in incoming):
        return ctx.block(node, "an input without channel spaces, or unknown rank")
    from_end = -axis if axis < 0 else rank - axis
    if all(c.from_end == from_end for c in incoming):
        ctx.produce(node.outputs[0], Channels(from_end, rank, tuple(s for c in incoming for s in c.segments)))
        return
    channels = _unify(ctx, node, incoming)
    if channels is not None:
        ctx.produce(node.outputs[0], channels.with_rank(rank))


@channel_rule("BatchNormalization", "InstanceNormalization")
def _batchnorm(ctx: ChannelContext, node: gs.Node) -> None:
    """Per-channel parameters (axis 0) follow the input's space, which the output carries."""
    incoming = _nchw_input(ctx, node)
    if incoming is None:
        return
    parameters = [ctx.stored(t) for t in node.inputs[1:]]
    if any(p is None for p in parameters) or len(node.outputs) != 1:
        return ctx.block(node, "computed parameters or training outputs")
    for slot, _ in parameters:
        ctx.member(node, slot, 0, incoming)
    ctx.produce(node.outputs[0], incoming)


@channel_rule("LayerNormalization")
def _layernorm(ctx: ChannelContext, node: gs.Node) -> None:
    """Normalising the channel axis alone: a permutation commutes with the statistics, 1-D scale/bias follow."""
    incoming = ctx.channels(node.inputs[0])
    if incoming is None:
        return
    axis = node.attrs.get("axis", -1)
    parameters = [ctx.stored(t) for t in node.inputs[1:] if t.name]
    normalizes_channels_only = incoming.from_end == 1 and (axis == -1 or axis == incoming.axis)
    if not normalizes_channels_only or any(p is None or len(p[1]) != 1 for p in parameters):
        return ctx.block(node, "normalises more than the channel axis, or computed parameters")
    for slot, _ in parameters:
        ctx.member(node, slot, 0, incoming)
    ctx.produce(node.outputs[0], incoming)


@channel_rule("Flatten", "Reshape")
def _flatten(ctx: ChannelContext, node: gs.Node) -> None:
    """The usual CNN head: (N, C, 1, 1) flattened to (N, C) keeps the channel order on axis 1; any other
    reshape mixes channels with other axes and blocks."""
    incoming = _nchw_input(ctx, node)
    if incoming is None:
        return
    shape = node.inputs[0].shape
    spatial_is_one = shape is not None and all(dim == 1 for dim in shape[2:])
    out_shape = node.outputs[0].shape
    keeps_axis = node.attrs.get("axis", 1) == 1 if node.op == "Flatten" else (
        out_shape is not None and len(out_shape) == 2 and out_shape[1] == incoming.total)
    if not spatial_is_one or not keeps_axis:
        return ctx.block(node, f"{node.op} mixes the channels with other axes")
    ctx.produce(node.outputs[0], incoming.at_axis(1, 2))


@channel_rule("Squeeze")
def _squeeze(ctx: ChannelContext, node: gs.Node) -> None:
    """Squeezing spatial axes keeps the channels on axis 1."""
    incoming = _nchw_input(ctx, node)
    if incoming is None:
        return
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1:
        axes = constant_value(node.inputs[1])
    if axes is None:
        return ctx.block(node, "Squeeze axes are unknown")
    axes = [int(a) % incoming.rank for a in np.atleast_1d(axes)]
    if min(axes) < 2:
        return ctx.block(node, "Squeeze of the batch or channel axis")
    ctx.produce(node.outputs[0], incoming.at_axis(1, incoming.rank - len(axes)))


@channel_rule("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
              "ReduceProd", "ReduceSumSquare")
def _reduce(ctx: ChannelContext, node: gs.Node) -> None:
    """Reducing other axes carries the channels (moved by the dropped axes); reducing the channel axis blocks."""
    incoming = ctx.channels(node.inputs[0])
    if incoming is None:
        return
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        axes = constant_value(node.inputs[1])
    if axes is None or incoming.rank is None or len(np.atleast_1d(axes)) == 0:
        return ctx.block(node, "reduce axes are unknown or all axes")
    axes = {int(a) % incoming.rank for a in np.atleast_1d(axes)}
    if incoming.axis in axes:
        return ctx.block(node, "reduces the channel axis")
    keepdims = node.attrs.get("keepdims", 1)
    from_end = incoming.from_end if keepdims else incoming.from_end - sum(a > incoming.axis for a in axes)
    rank = incoming.rank if keepdims else incoming.rank - len(axes)
    ctx.produce(node.outputs[0], Channels(from_end, rank, incoming.segments))


@channel_rule("Pad")
def _pad(ctx: ChannelContext, node: gs.Node) -> None:
    """Constant padding of the other axes carries the channels."""
    incoming = _nchw_input(ctx, node)
    if incoming is None:
        return
    pads = node.attrs.get("pads") if len(node.inputs) < 2 else constant_value(node.inputs[1])
    value_ok = len(node.inputs) < 3 or not node.inputs[2].name or ctx.stored(node.inputs[2]) is not None
    if (pads is None or node.attrs.get("mode", "constant") != "constant" or not value_ok
            or (len(node.inputs) > 3 and node.inputs[3].name)):
        return ctx.block(node, "Pad with unknown pads, a computed value, axes, or a non-constant mode")
    pads = np.asarray(pads)
    if pads[1] != 0 or pads[1 + incoming.rank] != 0:
        return ctx.block(node, "Pad of the channel axis")
    _carry(ctx, node)


@channel_rule("Resize")
def _resize(ctx: ChannelContext, node: gs.Node) -> None:
    """Resizing the spatial axes (channel scale 1) carries the channels."""
    incoming = _nchw_input(ctx, node)
    if incoming is None:
        return
    scales = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    sizes = constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    keeps = (scales is not None and scales.size == incoming.rank and scales[1] == 1) or (
        sizes is not None and sizes.size == incoming.rank and sizes[1] == incoming.total)
    if not keeps:
        return ctx.block(node, "Resize may change the channel axis")
    _carry(ctx, node)
