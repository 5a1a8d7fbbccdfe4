"""Permutation alignment (Git Re-Basin weight matching) with the permutation spec derived from the graph.

Hidden units of a layer can be reordered without changing the function, as long as every tensor that
indexes those units is reordered the same way. Which tensors those are follows from the graph: each
Conv/Gemm/MatMul output axis opens a channel space; per-channel ops (BN, activations, pooling, a per-channel
constant) carry it; a residual Add of two tensors merges their spaces; Concat lays spaces side by side;
anything that mixes channels (Reshape, Transpose, Softmax, grouped Conv, graph outputs) pins them to the
identity. B is then permuted to match A space by space with linear assignment, sweeping until no space
improves, and must stay output-identical to B in ORT before anything uses it.

The per-op rules (which ops open, carry, join or pin spaces) live in :mod:`onnxmerge.merging.channel_rules`,
one registered rule per op type; this module walks the graph with them and does the matching.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxmerge.errors import BadInputError, VerificationError
from onnxmerge.graph import constant_value, import_graph, infer_shapes, producer
from onnxmerge.merging import channel_rules
from onnxmerge.merging.channel_rules import Channels
from onnxmerge.merging.compat import ModelStructure, model_structure
from onnxmerge.verify import EquivalenceChecker

FIXED = 0
DEFAULT_MAX_SWEEPS = 100


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


@dataclass(frozen=True)
class Pin:
    """A node no permutation may cross, and why (its inputs' channel spaces were pinned to the identity)."""

    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class ChannelSpec:
    """The permutation spec of a model and the nodes that pinned channel spaces."""

    groups: list[PermutationGroup]
    pins: list[Pin]


class _ChannelAnalysis:
    """Walks the graph once in topological order, dispatching each node to its rule in
    :mod:`onnxmerge.merging.channel_rules` (the :class:`~onnxmerge.merging.channel_rules.ChannelContext` the
    rules see), then pins what no rule accounted for and collects the free spaces into groups."""

    def __init__(self, graph: gs.Graph, slot_of: dict[str, int]):
        self.graph, self.slot_of = graph, slot_of
        self.spaces = _Spaces()
        self.carried: dict[str, Channels] = {}  # tensor name -> its channels
        self.members: dict[tuple[int, int, int], int] = {}  # (slot, axis, offset) -> space
        self.registered: dict[int, set[int]] = defaultdict(set)  # slot -> ids of nodes that placed it
        self.readers: dict[int, set[int]] = defaultdict(set)  # slot -> ids of nodes that read it
        self.pins: list[Pin] = []

    def groups(self) -> list[PermutationGroup]:
        for node in self.graph.nodes:
            if node.op == "Identity" and self.stored(node.inputs[0]) is not None:
                continue  # a stored tensor under another name: its readers are the ones that count
            for tensor in node.inputs:
                stored = self.stored(tensor)
                if stored is not None:
                    self.readers[stored[0]].add(id(node))
            rule = channel_rules.rule_for(node)
            if rule is None:
                self.block(node, f"no channel rule for {channel_rules.op_name(node)}")
            else:
                rule(self, node)
        for tensor in self.graph.outputs:
            self._fix(self.carried.get(tensor.name))
        self._pin_unaccounted_slots()
        self._pin_overlapping_members()
        grouped: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for member, space in sorted(self.members.items()):
            root = self.spaces.find(space)
            if root != FIXED and self.spaces.size[root] > 1:
                grouped[root].append(member)
        return [PermutationGroup(self.spaces.size[root], members) for root, members in sorted(grouped.items())]

    # -- what the rules see (channel_rules.ChannelContext) ---------------------------------------------------------

    def channels(self, tensor: gs.Tensor) -> Channels | None:
        return self.carried.get(tensor.name)

    def produce(self, tensor: gs.Tensor, channels: Channels) -> None:
        self.carried[tensor.name] = channels

    def stored(self, tensor: gs.Tensor) -> tuple[int, tuple[int, ...]] | None:
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

    def new_space(self, size: int) -> int:
        return self.spaces.new(size)

    def union(self, space_a: int, space_b: int) -> None:
        self.spaces.union(space_a, space_b)

    def member(self, node: gs.Node, slot: int, axis: int, channels: Channels) -> None:
        for space, offset in channels.placed():
            key = (slot, axis, offset)
            if key in self.members:
                self.spaces.union(self.members[key], space)
            else:
                self.members[key] = space
        self.registered[slot].add(id(node))

    def block(self, node: gs.Node, reason: str) -> None:
        incoming = [self.carried.get(tensor.name) for tensor in node.inputs]
        if any(incoming):
            self.pins.append(Pin(node.name, channel_rules.op_name(node), reason))
        for channels in incoming:
            self._fix(channels)

    # -- pinning -------------------------------------------------------------------------------------------------

    def _fix(self, channels: Channels | None) -> None:
        for space, _ in channels.segments if channels else ():
            self.spaces.fix(space)

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


def permutation_groups(proto: onnx.ModelProto, structure: ModelStructure) -> list[PermutationGroup]:
    """The permutation spec of a model, derived from its graph (``structure`` gives the slot numbers)."""
    return channel_spec(proto, structure).groups


def channel_spec(proto: onnx.ModelProto, structure: ModelStructure) -> ChannelSpec:
    """The permutation groups of :func:`permutation_groups` and the nodes that pinned spaces, with reasons."""
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
    analysis = _ChannelAnalysis(graph, slot_of)
    groups = analysis.groups()
    return ChannelSpec(groups, analysis.pins)


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

