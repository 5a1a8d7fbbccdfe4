"""Permutation alignment (Git Re-Basin weight matching) with the permutation spec derived from the graph.

Hidden units of a layer can be reordered without changing the function, as long as every tensor that
indexes those units is reordered the same way. Which tensors those are follows from the graph: each
Conv/Gemm/MatMul output axis opens a channel space; per-channel ops (BN, activations, pooling, a per-channel
constant) carry it; a residual Add of two tensors merges their spaces; Concat lays spaces side by side;
anything that mixes channels (Reshape, Transpose, Softmax, grouped Conv, graph outputs) pins them to the
identity. B is then permuted to match A space by space with linear assignment, sweeping until no space
improves, and must stay output-identical to B in ORT before anything uses it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxmerge import activations
from onnxmerge.errors import BadInputError, VerificationError
from onnxmerge.graph import constant_value, import_graph, infer_shapes, producer
from onnxmerge.merging.compat import ModelStructure, model_structure
from onnxmerge.verify import EquivalenceChecker

FIXED = 0
DEFAULT_MAX_SWEEPS = 100
# Ops that carry a channel space unchanged: the activation table's elementwise activations with scalar
# parameters (onnxmerge.activations.PERMUTATION_INVARIANT_OPS; Clip only with constant bounds, see _visit), and
# other elementwise unary ops. Multi-node activations (x * Sigmoid(x), GELU's Erf form) are covered op by op.
_CARRY_OPS = activations.PERMUTATION_INVARIANT_OPS | frozenset({
    "Celu", "Softplus", "Softsign", "Erf", "Mish", "ThresholdedRelu", "Identity", "Dropout", "Cast", "Neg", "Abs",
    "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign",
})
_POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
# Binary elementwise ops: a constant operand indexed by the channel axis joins the space and is permuted with it.
# PRelu (activations.PER_CHANNEL_PARAM_OPS) is one: its per-channel slope is permuted like a per-channel Mul's
# constant, a scalar slope broadcasts and stays.
_ELEMENTWISE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"}) | \
    activations.PER_CHANNEL_PARAM_OPS
_REDUCE_OPS = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
                         "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare"})
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})  # read a tensor without depending on its channel order


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


class _Spaces:
    """Union-find over channel spaces; FIXED is the identity permutation that pinned spaces join."""

    def __init__(self):
        self.parent, self.size = [FIXED], [0]

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a == root_b:
            return
        if FIXED in (root_a, root_b) or self.size[root_a] != self.size[root_b]:
            self.parent[root_a] = self.parent[root_b] = FIXED
        else:
            self.parent[root_b] = root_a

    def fix(self, space: int) -> None:
        self.union(space, FIXED)


@dataclass
class PermutationGroup:
    """One free permutation and every (slot, axis, offset) it reorders."""

    size: int
    members: list[tuple[int, int, int]]


class _ChannelAnalysis:
    """Walks the graph once in topological order, assigning channel spaces and recording their members."""

    def __init__(self, graph: gs.Graph, slot_of: dict[str, int]):
        self.graph, self.slot_of = graph, slot_of
        self.spaces = _Spaces()
        self.channels: dict[str, Channels] = {}
        self.members: dict[tuple[int, int, int], int] = {}  # (slot, axis, offset) -> space
        self.registered: dict[int, set[int]] = defaultdict(set)  # slot -> ids of nodes that placed it
        self.readers: dict[int, set[int]] = defaultdict(set)  # slot -> ids of nodes that read it

    def groups(self) -> list[PermutationGroup]:
        for node in self.graph.nodes:
            if node.op == "Identity" and self._stored(node.inputs[0]) is not None:
                continue  # a stored tensor under another name: its readers are the ones that count
            for tensor in node.inputs:
                stored = self._stored(tensor)
                if stored is not None:
                    self.readers[stored[0]].add(id(node))
            self._visit(node)
        for tensor in self.graph.outputs:
            self._fix(self.channels.get(tensor.name))
        self._pin_unaccounted_slots()
        self._pin_overlapping_members()
        grouped: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for member, space in sorted(self.members.items()):
            root = self.spaces.find(space)
            if root != FIXED and self.spaces.size[root] > 1:
                grouped[root].append(member)
        return [PermutationGroup(self.spaces.size[root], members) for root, members in sorted(grouped.items())]

    # -- bookkeeping -------------------------------------------------------------------------------------------

    def _stored(self, tensor: gs.Tensor) -> tuple[int, tuple[int, ...]] | None:
        """(slot, shape) of a stored tensor, looking through Identity; None for computed tensors."""
        while isinstance(tensor, gs.Variable) and producer(tensor) is not None and producer(tensor).op == "Identity":
            tensor = producer(tensor).inputs[0]
        if isinstance(tensor, gs.Constant):
            shape = tuple(tensor.shape)
        elif producer(tensor) is not None and producer(tensor).op == "Constant":
            value = constant_value(tensor)
            if value is None:
                return None
            shape = value.shape
        else:
            return None
        slot = self.slot_of.get(tensor.name)
        return None if slot is None else (slot, shape)

    def _member(self, node: gs.Node, slot: int, axis: int, channels: Channels) -> None:
        for space, offset in channels.placed():
            key = (slot, axis, offset)
            if key in self.members:
                self.spaces.union(self.members[key], space)
            else:
                self.members[key] = space
        self.registered[slot].add(id(node))

    def _fix(self, channels: Channels | None) -> None:
        for space, _ in channels.segments if channels else ():
            self.spaces.fix(space)

    def _block(self, node: gs.Node) -> None:
        for tensor in node.inputs:
            self._fix(self.channels.get(tensor.name))

    def _pin_unaccounted_slots(self) -> None:
        """A stored tensor also read by a node that did not place it must keep its order everywhere."""
        for (slot, _, _), space in list(self.members.items()):
            if self.readers[slot] != self.registered[slot]:
                self.spaces.fix(space)

    def _pin_overlapping_members(self) -> None:
        by_axis: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for (slot, axis, offset), space in self.members.items():
            by_axis[(slot, axis)].append((offset, space))
        for entries in by_axis.values():
            spans = sorted((offset, offset + self.spaces.size[self.spaces.find(space)], space)
                           for offset, space in entries)
            for (_, end, space), (start, _, other) in zip(spans, spans[1:]):
                if start < end:
                    self.spaces.fix(space)
                    self.spaces.fix(other)

    def _rank(self, tensor: gs.Tensor) -> int | None:
        return None if tensor.shape is None else len(tensor.shape)

    def _carry(self, source: gs.Tensor, target: gs.Tensor) -> None:
        channels = self.channels.get(source.name)
        if channels is not None:
            self.channels[target.name] = channels.with_rank(self._rank(target) or channels.rank)

    # -- per-op rules ------------------------------------------------------------------------------------------

    def _visit(self, node: gs.Node) -> None:
        op = node.op
        if op in _SHAPE_ONLY_OPS or op == "Constant":
            return
        if op in _CARRY_OPS:
            if op == "Clip" and any(self._stored(t) is None for t in node.inputs[1:] if t.name):
                return self._block(node)
            return self._carry(node.inputs[0], node.outputs[0])
        handler = {"Conv": self._conv, "Gemm": self._gemm, "MatMul": self._matmul, "Concat": self._concat,
                   "BatchNormalization": self._batchnorm, "InstanceNormalization": self._batchnorm,
                   "LayerNormalization": self._layernorm, "Flatten": self._flatten, "Reshape": self._flatten,
                   "Squeeze": self._squeeze, "Pad": self._pad, "Resize": self._resize}.get(op)
        if handler is not None:
            return handler(node)
        if op in _POOL_OPS:
            return self._channel_first_carry(node)
        if op in _ELEMENTWISE_OPS:
            return self._elementwise(node)
        if op in _REDUCE_OPS:
            return self._reduce(node)
        self._block(node)

    def _channel_first(self, tensor: gs.Tensor) -> Channels | None | bool:
        """The tensor's channels if they sit on axis 1, None if it has none, False if they sit elsewhere."""
        channels = self.channels.get(tensor.name)
        if channels is None:
            return None
        return channels if channels.axis == 1 else False

    def _channel_first_carry(self, node: gs.Node) -> None:
        channels = self._channel_first(node.inputs[0])
        if channels is False:
            return self._block(node)
        self._carry(node.inputs[0], node.outputs[0])

    def _optional_stored(self, node: gs.Node, index: int):
        """(present, stored) for an optional input."""
        if len(node.inputs) <= index or not node.inputs[index].name:
            return False, None
        return True, self._stored(node.inputs[index])

    def _conv(self, node: gs.Node) -> None:
        weight = self._stored(node.inputs[1])
        has_bias, bias = self._optional_stored(node, 2)
        incoming = self._channel_first(node.inputs[0])
        if weight is None or (has_bias and bias is None) or incoming is False:
            return self._block(node)
        weight_slot, shape = weight
        groups = node.attrs.get("group", 1)
        if groups == 1:
            if incoming is not None:
                self._member(node, weight_slot, 1, incoming)
            outgoing = Channels(len(shape) - 1, len(shape), ((self.spaces.new(shape[0]), shape[0]),))
        elif incoming is not None and shape[1] == 1 and groups == shape[0] == incoming.total:
            outgoing = incoming.with_rank(len(shape))  # depthwise: a per-channel op
        else:
            return self._block(node)
        self._member(node, weight_slot, 0, outgoing)
        if bias is not None:
            self._member(node, bias[0], 0, outgoing)
        self.channels[node.outputs[0].name] = outgoing

    def _gemm(self, node: gs.Node) -> None:
        weight = self._stored(node.inputs[1])
        has_bias, bias = self._optional_stored(node, 2)
        incoming = self.channels.get(node.inputs[0].name)
        if weight is None or (has_bias and bias is None) or node.attrs.get("transA", 0) or (
                incoming is not None and incoming.from_end != 1):
            return self._block(node)
        weight_slot, shape = weight
        in_axis, out_axis = (1, 0) if node.attrs.get("transB", 0) else (0, 1)
        if incoming is not None:
            self._member(node, weight_slot, in_axis, incoming)
        width = shape[out_axis]
        outgoing = Channels(1, 2, ((self.spaces.new(width), width),))
        self._member(node, weight_slot, out_axis, outgoing)
        if bias is not None and len(bias[1]) >= 1 and bias[1][-1] == width:
            self._member(node, bias[0], len(bias[1]) - 1, outgoing)
        self.channels[node.outputs[0].name] = outgoing

    def _matmul(self, node: gs.Node) -> None:
        weight = self._stored(node.inputs[1])
        incoming = self.channels.get(node.inputs[0].name)
        if weight is None or len(weight[1]) != 2 or (incoming is not None and incoming.from_end != 1):
            return self._block(node)
        weight_slot, shape = weight
        if incoming is not None:
            self._member(node, weight_slot, 0, incoming)
        outgoing = Channels(1, self._rank(node.outputs[0]), ((self.spaces.new(shape[1]), shape[1]),))
        self._member(node, weight_slot, 1, outgoing)
        self.channels[node.outputs[0].name] = outgoing

    def _unify(self, channel_list: list[Channels | None]) -> Channels | None:
        """Tensors combined elementwise must share one permutation; None (unpermutable) pins the others."""
        first = channel_list[0]
        if first is None or any(c is None or c.from_end != first.from_end or c.sizes != first.sizes
                                for c in channel_list[1:]):
            for channels in channel_list:
                self._fix(channels)
            return None
        for channels in channel_list[1:]:
            for (space_a, _), (space_b, _) in zip(first.segments, channels.segments):
                self.spaces.union(space_a, space_b)
        return first

    def _elementwise(self, node: gs.Node) -> None:
        stored = [(t, self._stored(t)) for t in node.inputs]
        variables = [t for t, s in stored if s is None]
        if not variables:
            return
        channels = self._unify([self.channels.get(t.name) for t in variables])
        if channels is None:
            return
        for tensor, constant in stored:
            if constant is None:
                continue
            slot, shape = constant
            axis = len(shape) - channels.from_end
            if axis < 0 or shape[axis] == 1:
                continue  # broadcast along the channels: the same value for every channel
            if shape[axis] != channels.total:
                return self._block(node)
            self._member(node, slot, axis, channels)
        self.channels[node.outputs[0].name] = channels.with_rank(self._rank(node.outputs[0]))

    def _concat(self, node: gs.Node) -> None:
        incoming = [self.channels.get(t.name) for t in node.inputs]
        rank = self._rank(node.outputs[0])
        axis = node.attrs.get("axis")
        if axis is None or rank is None or any(c is None for c in incoming):
            return self._block(node)
        from_end = -axis if axis < 0 else rank - axis
        if all(c.from_end == from_end for c in incoming):
            segments = tuple(segment for c in incoming for segment in c.segments)
            self.channels[node.outputs[0].name] = Channels(from_end, rank, segments)
            return
        channels = self._unify(incoming)
        if channels is not None:
            self.channels[node.outputs[0].name] = channels.with_rank(rank)

    def _batchnorm(self, node: gs.Node) -> None:
        incoming = self._channel_first(node.inputs[0])
        if not incoming:
            return None if incoming is None else self._block(node)
        parameters = [self._stored(t) for t in node.inputs[1:]]
        if any(p is None for p in parameters) or len(node.outputs) != 1:
            return self._block(node)
        for slot, _ in parameters:
            self._member(node, slot, 0, incoming)
        self.channels[node.outputs[0].name] = incoming

    def _layernorm(self, node: gs.Node) -> None:
        incoming = self.channels.get(node.inputs[0].name)
        if incoming is None:
            return
        axis = node.attrs.get("axis", -1)
        parameters = [self._stored(t) for t in node.inputs[1:] if t.name]
        normalizes_channels_only = incoming.from_end == 1 and (axis == -1 or axis == incoming.axis)
        if not normalizes_channels_only or any(p is None or len(p[1]) != 1 for p in parameters):
            return self._block(node)
        for slot, _ in parameters:
            self._member(node, slot, 0, incoming)
        self.channels[node.outputs[0].name] = incoming

    def _flatten(self, node: gs.Node) -> None:
        """The usual CNN head: (N, C, 1, 1) flattened to (N, C) keeps the channel order on axis 1."""
        incoming = self._channel_first(node.inputs[0])
        if not incoming:
            return None if incoming is None else self._block(node)
        shape = node.inputs[0].shape
        spatial_is_one = shape is not None and all(dim == 1 for dim in shape[2:])
        out_shape = node.outputs[0].shape
        keeps_axis = node.attrs.get("axis", 1) == 1 if node.op == "Flatten" else (
            out_shape is not None and len(out_shape) == 2 and out_shape[1] == incoming.total)
        if not spatial_is_one or not keeps_axis:
            return self._block(node)
        self.channels[node.outputs[0].name] = incoming.at_axis(1, 2)

    def _squeeze(self, node: gs.Node) -> None:
        incoming = self._channel_first(node.inputs[0])
        if not incoming:
            return None if incoming is None else self._block(node)
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            axes = constant_value(node.inputs[1])
        if axes is None:
            return self._block(node)
        axes = [int(a) % incoming.rank for a in np.atleast_1d(axes)]
        if min(axes) < 2:
            return self._block(node)
        self.channels[node.outputs[0].name] = incoming.at_axis(1, incoming.rank - len(axes))

    def _reduce(self, node: gs.Node) -> None:
        incoming = self.channels.get(node.inputs[0].name)
        if incoming is None:
            return
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
            axes = constant_value(node.inputs[1])
        if axes is None or incoming.rank is None or len(np.atleast_1d(axes)) == 0:
            return self._block(node)
        axes = {int(a) % incoming.rank for a in np.atleast_1d(axes)}
        if incoming.axis in axes:
            return self._block(node)
        keepdims = node.attrs.get("keepdims", 1)
        from_end = incoming.from_end if keepdims else incoming.from_end - sum(a > incoming.axis for a in axes)
        rank = incoming.rank if keepdims else incoming.rank - len(axes)
        self.channels[node.outputs[0].name] = Channels(from_end, rank, incoming.segments)

    def _pad(self, node: gs.Node) -> None:
        incoming = self._channel_first(node.inputs[0])
        if not incoming:
            return None if incoming is None else self._block(node)
        pads = node.attrs.get("pads") if len(node.inputs) < 2 else constant_value(node.inputs[1])
        value_ok = len(node.inputs) < 3 or not node.inputs[2].name or self._stored(node.inputs[2]) is not None
        if (pads is None or node.attrs.get("mode", "constant") != "constant" or not value_ok
                or (len(node.inputs) > 3 and node.inputs[3].name)):
            return self._block(node)
        pads = np.asarray(pads)
        if pads[1] != 0 or pads[1 + incoming.rank] != 0:
            return self._block(node)
        self._carry(node.inputs[0], node.outputs[0])

    def _resize(self, node: gs.Node) -> None:
        incoming = self._channel_first(node.inputs[0])
        if not incoming:
            return None if incoming is None else self._block(node)
        scales = constant_value(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        sizes = constant_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
        keeps = (scales is not None and scales.size == incoming.rank and scales[1] == 1) or (
            sizes is not None and sizes.size == incoming.rank and sizes[1] == incoming.total)
        if not keeps:
            return self._block(node)
        self._carry(node.inputs[0], node.outputs[0])


def permutation_groups(proto: onnx.ModelProto, structure: ModelStructure) -> list[PermutationGroup]:
    """The permutation spec of a model, derived from its graph (``structure`` gives the slot numbers)."""
    if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in proto.graph.node for attribute in node.attribute):
        raise BadInputError("alignment does not support models with If/Loop/Scan subgraphs")
    slot_by_id = {id(slot.tensor): slot.index for slot in structure.slots}
    slot_of = {t.name: slot_by_id[id(t)] for t in proto.graph.initializer if id(t) in slot_by_id}
    for node in proto.graph.node:
        for attribute in node.attribute:
            if node.op_type == "Constant" and attribute.name == "value" and id(attribute.t) in slot_by_id:
                slot_of[node.output[0]] = slot_by_id[id(attribute.t)]
    graph = import_graph(proto)
    infer_shapes(graph, proto)
    return _ChannelAnalysis(graph, slot_of).groups()


# ------------------------------------------------------------------------------------------------ matching

def _slot_members(groups: list[PermutationGroup]) -> dict[int, list[tuple[int, int, int]]]:
    members: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for group_index, group in enumerate(groups):
        for slot, axis, offset in group.members:
            members[slot].append((axis, offset, group_index))
    return members


def _apply(array: np.ndarray, placements: list[tuple[int, int, int]], perms: list[np.ndarray],
           skip: tuple[int, int, int] | None = None) -> np.ndarray:
    for placement in placements:
        axis, offset, group = placement
        if placement == skip:
            continue
        index = np.arange(array.shape[axis])
        index[offset:offset + len(perms[group])] = offset + perms[group]
        array = np.take(array, index, axis=axis)
    return array


def _rows(array: np.ndarray, axis: int, offset: int, size: int) -> np.ndarray:
    return np.moveaxis(array, axis, 0)[offset:offset + size].reshape(size, -1)


def weight_matching(groups: list[PermutationGroup], a_values: dict[int, np.ndarray], b_values: dict[int, np.ndarray],
                    *, seed: int = 0, max_sweeps: int = DEFAULT_MAX_SWEEPS) -> tuple[list[np.ndarray], int]:
    """Coordinate ascent on sum <A, P(B)>: one linear assignment per group, in random order, sweep after sweep.

    A group that indexes two axes of one tensor (a conv inside a residual stream that an identity branch
    joins) makes its step inexact, so progress is judged on the whole objective after each sweep, and the
    best permutations seen are kept.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise BadInputError("alignment needs scipy (pip install scipy)") from None

    placements = _slot_members(groups)
    perms = [np.arange(group.size) for group in groups]
    best_perms, best = list(perms), _objective(a_values, b_values, placements, perms)
    rng = np.random.default_rng(seed)
    for sweep in range(1, max_sweeps + 1):
        for group_index in rng.permutation(len(groups)):
            size = groups[group_index].size
            cost = np.zeros((size, size))
            for slot, axis, offset in groups[group_index].members:
                others = _apply(b_values[slot], placements[slot], perms, skip=(axis, offset, group_index))
                cost += _rows(a_values[slot], axis, offset, size) @ _rows(others, axis, offset, size).T
            perms[group_index] = linear_sum_assignment(cost, maximize=True)[1]
        current = _objective(a_values, b_values, placements, perms)
        if current <= best + 1e-9 * abs(best):
            return best_perms, sweep
        best_perms, best = list(perms), current
    return best_perms, max_sweeps


def _objective(a_values, b_values, placements, perms) -> float:
    return sum(float(np.vdot(a_values[slot], _apply(b_values[slot], placements[slot], perms))) for slot in a_values)


def _cosine(a_values: dict[int, np.ndarray], b_values: dict[int, np.ndarray]) -> float:
    dot = sum(float(np.vdot(a_values[s], b_values[s])) for s in a_values)
    norm = np.sqrt(sum(float(np.vdot(v, v)) for v in a_values.values()) *
                   sum(float(np.vdot(v, v)) for v in b_values.values()))
    return float(dot / norm) if norm else 0.0


def align_model(a_structure: ModelStructure, a_proto: onnx.ModelProto, b_structure: ModelStructure,
                b_proto: onnx.ModelProto, *, seed: int = 0, max_sweeps: int = DEFAULT_MAX_SWEEPS,
                check_n: int = 3, input_shapes: dict | None = None) -> tuple[onnx.ModelProto, dict]:
    """B with its hidden units permuted to match A, verified output-identical to B (VerificationError if not).

    Both protos must hold their tensor data; ``b_proto`` is not modified.
    """
    groups = permutation_groups(a_proto, a_structure)
    slots = sorted({slot for group in groups for slot, _, _ in group.members})
    a_values = {s: numpy_helper.to_array(a_structure.slots[s].tensor).astype(np.float64) for s in slots}
    b_values = {s: numpy_helper.to_array(b_structure.slots[s].tensor).astype(np.float64) for s in slots}
    perms, sweeps = weight_matching(groups, a_values, b_values, seed=seed, max_sweeps=max_sweeps)
    aligned = onnx.ModelProto()
    aligned.CopyFrom(b_proto)
    aligned_slots = model_structure(aligned).slots
    placements = _slot_members(groups)
    permuted = {}
    for slot in slots:
        tensor = aligned_slots[slot].tensor
        original = numpy_helper.to_array(tensor)
        permuted[slot] = _apply(b_values[slot], placements[slot], perms)
        tensor.CopyFrom(numpy_helper.from_array(_apply(original, placements[slot], perms), tensor.name))
    report = {"groups": len(groups), "channels": int(sum(g.size for g in groups)),
              "moved_channels": int(sum(np.count_nonzero(p != np.arange(len(p))) for p in perms)),
              "sweeps": sweeps, "cosine_before": _cosine(a_values, b_values),
              "cosine_after": _cosine(a_values, permuted)}
    verification = EquivalenceChecker(b_proto, check_n=check_n, input_shapes=input_shapes, seed=seed).check(aligned)
    report["verification"] = verification.to_dict()
    if not verification.passed:
        raise VerificationError(f"the permuted model is not output-identical to the original "
                                f"({verification.failure}); nothing was written", report)
    return aligned, report

