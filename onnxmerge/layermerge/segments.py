"""Where LayerMerge may act on an exported CNN: its conv chain, skips, breaks, segments and kernel options.

LayerMerge's own code hard-wires these per architecture (layermerge.md §1); here they are read off the
ONNX graph (§7.2) of a canonicalised model (BN/affine/Pad folded, no Identity/Constant). Where a generic
walk has to choose what the hand-written model classes fixed, the conventions are:

- the chain is the longest path of mergeable convs through the graph; convs off it are ``excluded``
  (1x1 projection shortcuts of residual Adds, parallel branches, unsupported convs);
- more than one chain: the longest path through the mergeable convs no earlier chain took is a further chain
  (an FPN's lateral and top-down convs, a detector's heads, the other branch of a two-branch net), kept when
  one of its segments merges two or more convs. Chains are numbered one after the other (``chain_starts``);
  no segment spans two, and the DP steps from one chain's last position to the next chain's first for free
  (``ChainAnalysis.links``), which is per-chain DPs combined over one budget (:func:`dp.solve`). Each chain
  is its own chain in every rule below: its first conv is its stem, its last pointwise conv may be its head;
- position 0 is after the stem (conv 0), which no segment contains;
- a final pointwise conv that no skip closes at (MobileNetV2's 320->1280 conv, a segmentation 1x1
  classifier) is the head conv and is kept aside like the stem, as LayerMerge keeps MobileNetV2's last
  conv out of its DP;
- a strided conv shares a segment at most with the one pointwise conv right after it (LayerMerge's
  ``str_pos``): no kernel grows by a stride factor.

``search_space="extended"`` widens LayerMerge's space (``"layermerge"``, the default, reproduces it exactly;
``"blocks"`` is LayerMerge's space plus only the last item below, dropping identity-residual blocks):

- a segment may run on past a strided conv as long as every later k>1 conv in it is pruned, so the kept
  convs after the stride are all 1x1 and no kernel grows by a stride factor. A k>1 conv after the stride
  that cannot be pruned (irreducible) leaves the segment without options, and it is not listed. (The code of
  LayerMerge asserts the same rule inside a segment; its ``str_pos`` breaks are just stricter.)
- grouped convs (1 < groups < C_in) are on the chain. Composition regroups to the gcd of the groups
  (conv_algebra.compose), so a segment is still one conv: grouped with grouped at the same grouping stays
  grouped, grouped with a dense conv becomes dense. ``KernelOption.groups`` is the merged conv's grouping.
- a segment that is exactly one identity-residual block (x + f(x), no projection) also has a "drop" option,
  ``kept=()``: the whole block becomes the identity (not x + x, which is what pruning all its convs gives).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial, reduce

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmerge import activations
from onnxmerge.activations import Activation
from onnxmerge.conv_algebra import ConvParams
from onnxmerge.errors import BadInputError
from onnxmerge.graph import constant_value, import_graph, is_graph_output, producer, read_conv_params, sole_consumer
from onnxmerge.refusal import Refused
from onnxmerge.runner import input_specs
from onnxmerge.stats import static_shapes

ACTIVATION_KINDS = activations.KINDS
# Kinds the table recognises that are not taken as activation slots: a Clip other than ReLU6 stays a break,
# as it always was here (tests/compress/test_segments.py::test_unknown_nonlinearity_is_a_break pins Clip(0, 4));
# every other consumer handles it, so removing it from this set is all it takes to merge across such Clips.
NOT_SLOTS = frozenset({"clip"})
SEARCH_SPACES = ("layermerge", "blocks", "extended")


@dataclass(frozen=True)
class ChainConv:
    index: int  # conv k ends position k; conv 0 is the first conv of the chain (stem)
    node: str
    output: str
    params: ConvParams
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    reducible: bool  # C_in == C_out, stride 1, same spatial size in and out: may become identity


@dataclass(frozen=True)
class Position:
    """After conv ``index``, its activation slot, a closing residual Add and an activation after that.

    ``tensor`` is what conv index+1 reads: the position's value, or, where a break op (a pooling, a
    Concat...) sits in between, that op's output. At the last position it is the chain's final value.
    """

    index: int
    tensor: str
    activation: str | None  # its kind (ACTIVATION_KINDS), None if linear
    activation_nodes: tuple[str, ...]  # deleted when the activation is removed
    activation_value: Activation | None = None  # the activation with its parameters (None if linear)


@dataclass(frozen=True)
class Skip:
    source: int  # position whose tensor feeds the shortcut
    target: int  # the residual Add closing the branch that ends with conv ``target``
    add_node: str
    projection: str | None  # 1x1 projection Conv on the shortcut, None for identity


@dataclass(frozen=True)
class KernelOption:
    kernel: tuple[int, ...]  # merged kernel per spatial axis, 1 + sum of d*(k-1)*(strides before)
    stride: tuple[int, ...]
    depthwise: bool  # every kept conv depthwise
    kept: tuple[int, ...]  # the max-sum-|W| subset realising this option; irreducible convs always in
    in_channels: int       # (empty: the "drop" option of an identity-residual block, extended space only)
    out_channels: int
    input_hw: tuple[int, ...]
    groups: int = 1  # of the merged conv: out_channels if depthwise, else gcd of the kept convs' (and projections')

    @property
    def drops_block(self) -> bool:
        """The segment is one identity-residual block and it becomes the identity."""
        return not self.kept


@dataclass(frozen=True)
class Segment:
    start: int  # (start, end]: convs start+1 .. end
    end: int
    options: tuple[KernelOption, ...]


@dataclass
class ChainAnalysis:
    convs: list[ChainConv]
    positions: list[Position]
    skips: list[Skip]
    breaks: dict[int, str]  # position -> why no segment may contain it strictly inside
    segments: list[Segment]
    excluded: dict[str, str]  # Conv node -> why it is not on the chain
    chain_starts: tuple[int, ...] = (0,)  # index of each chain's first conv (its stem), in increasing order

    @property
    def links(self) -> tuple[int, ...]:
        """Positions p where a chain ends and the next begins: the DP steps from p to p + 1 for free, keeping
        the next chain's stem (:func:`dp.solve`'s ``links``)."""
        return tuple(start - 1 for start in self.chain_starts[1:])

    @property
    def entries(self) -> int:
        """(segment, kernel option) pairs: the rows of the latency and importance tables."""
        return sum(len(segment.options) for segment in self.segments)


def analyse_chain(model: onnx.ModelProto, input_shapes: Mapping[str | None, Sequence[int]] | None = None, *,
                  search_space: str = "layermerge") -> ChainAnalysis:
    """The chain, skips, breaks and segments of a canonicalised model at static input shapes.

    ``input_shapes`` is ``{name: dims}`` (name None for a single input); it
    is required where a model input has a dynamic dimension, since kernel options depend on map sizes.
    ``search_space`` is ``"layermerge"`` (LayerMerge's own space, exactly) or ``"extended"`` (see the module
    docstring: segments across strides, grouped convs, dropping identity-residual blocks).
    """
    if search_space not in SEARCH_SPACES:
        raise BadInputError(f"unknown search space {search_space!r}: expected one of {', '.join(SEARCH_SPACES)}")
    extended = search_space == "extended"
    drop_blocks = search_space in ("blocks", "extended")
    shapes = _static_shapes(model, input_shapes)
    graph = import_graph(model)
    graph.toposort()
    flow = _DataFlow(list(graph.nodes))
    usable, unusable = {}, {}
    for node in graph.nodes:
        if node.op == "Conv":
            checked = _usable_conv(node, shapes, grouped=extended)
            (usable if isinstance(checked, ConvParams) else unusable)[id(node)] = checked
    residuals = _residual_candidates(graph, flow, usable)
    projections = {id(r.projection) for r in residuals.values() if r.projection is not None}
    excluded = {node.name: reason for node in graph.nodes if (reason := unusable.get(id(node)))}
    paths = _chain_paths(graph, flow, usable, projections, residuals, excluded)  # adds head convs to excluded

    def off_chain(chains: list[list[gs.Node]], skips: list[Skip]) -> dict[str, str]:
        on_chain = {node.name for path in chains for node in path}
        return excluded | {node.name: _off_chain_reason(node, skips) for node in graph.nodes
                           if id(node) in usable and node.name not in on_chain and node.name not in excluded}

    bases = [sum(map(len, paths[:index])) for index in range(len(paths))]
    build = partial(_chain_part, graph, usable=usable, residuals=residuals, shapes=shapes, extended=extended,
                    drop_blocks=drop_blocks,
                    excluded=off_chain(paths, [slot.skip for path, base in zip(paths, bases)
                                               for slot in _slots(graph, path, base, residuals) if slot.skip]))
    # The first chain is always kept; a further one only if some segment of it merges two or more convs. It is
    # numbered after the last kept chain, which a discarded candidate leaves where it was.
    parts, kept = [build(paths[0], 0)], [paths[0]]
    for path in paths[1:]:
        part = build(path, parts[-1].convs[-1].index + 1)
        if any(s.end - s.start > 1 for s in part.segments):
            parts.append(part)
            kept.append(path)
        else:
            excluded.update({node.name: "on a branch parallel to the chain: as a chain of its own it has nothing to "
                                        "merge (a break at every position)" for node in path})

    def joined(name: str) -> list:
        return [item for part in parts for item in getattr(part, name)]

    analysis = ChainAnalysis(joined("convs"), joined("positions"), joined("skips"),
                             {k: v for part in parts for k, v in part.breaks.items()}, joined("segments"),
                             off_chain(kept, joined("skips")), tuple(part.convs[0].index for part in parts))
    _check_names(graph, analysis)
    return analysis


def _chain_paths(graph: gs.Graph, flow: "_DataFlow", usable: dict, projections: set[int],
                 residuals: dict[str, "_Residual"], excluded: dict[str, str]) -> list[list[gs.Node]]:
    """The chains' conv paths, longest first: the longest path of mergeable convs, then again and again the
    longest path through the convs no earlier chain took, while it has at least two convs. A final pointwise
    conv that no skip closes at comes off each (the head conv, into ``excluded``)."""
    taken: set[int] = set()
    paths = []
    while True:
        path = flow.longest_path(lambda node: id(node) in usable and id(node) not in projections
                                 and id(node) not in taken)
        taken |= {id(node) for node in path}
        slots = _slots(graph, path, 0, residuals)
        if len(path) > 2 and slots[-1].skip is None and all(k == 1 for k in usable[id(path[-1])].kernel_shape):
            excluded[path.pop().name] = ("head conv: a final pointwise conv that no skip closes at, kept aside like "
                                         "the stem (LayerMerge keeps MobileNetV2's last 1x1 conv out of its DP)")
        if len(path) < 2:
            if not paths:
                raise BadInputError(f"the model has no chain of convolutions to compress: {len(path)} mergeable "
                                    "Conv node(s) on its longest conv path, at least 2 are needed")
            return paths
        paths.append(path)


@dataclass(frozen=True)
class _ChainPart:
    convs: list[ChainConv]
    positions: list[Position]
    skips: list[Skip]
    breaks: dict[int, str]
    segments: list[Segment]


def _chain_part(graph: gs.Graph, path: list[gs.Node], base: int, *, usable: dict, residuals: dict,
                shapes: dict, excluded: dict[str, str], extended: bool, drop_blocks: bool) -> _ChainPart:
    """One chain's convs, positions, skips, breaks and segments, its convs numbered from ``base``."""
    slots = _slots(graph, path, base, residuals)
    convs = [_chain_conv(base + index, node, usable[id(node)], shapes) for index, node in enumerate(path)]
    skips = [slot.skip for slot in slots if slot.skip is not None]
    breaks = _breaks(graph, path, slots, base, excluded)
    if not extended:
        _add_stride_breaks(convs, breaks)
    positions = [Position(base + index, _position_tensor(path, slots, index),
                          slot.activation.kind if slot.activation else None,
                          tuple(node.name for node in slot.activation_nodes), slot.activation)
                 for index, slot in enumerate(slots)]
    projection_groups = {(s.source, s.target): usable[id(node)].groups for node in graph.nodes
                         for s in skips if s.projection == node.name}
    segments = []
    for i, j in _valid_segments(base, base + len(convs) - 1, breaks, [(s.source, s.target) for s in skips]):
        nested = [g for (s, t), g in projection_groups.items() if i <= s and t <= j]
        members = convs[i + 1 - base:j + 1 - base]
        droppable = (drop_blocks and members[0].input_shape == members[-1].output_shape
                     and any((s.source, s.target) == (i, j) and s.projection is None for s in skips))
        options = _kernel_options(members, nested, droppable)
        if options:  # empty only where a k>1 conv after a stride cannot be pruned (extended space)
            segments.append(Segment(i, j, options))
    return _ChainPart(convs, positions, skips, breaks, segments)


def _valid_segments(first: int, last: int, breaks, skips: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Segments (i, j] of positions first..last: no break strictly inside, every skip nested, containing or apart.

    This plain rule gives exactly the lists of LayerMerge's stateful ``valid_blks`` scan (layermerge.md §1.1).
    """
    return [(i, j) for i in range(first, last) for j in range(i + 1, last + 1)
            if not any(i < b < j for b in breaks)
            and all((s <= i and j <= t) or (i <= s and t <= j) or j <= s or t <= i for s, t in skips)]


# --- shapes and convs -------------------------------------------------------------------------------------


def _static_shapes(model: onnx.ModelProto, input_shapes) -> dict[str, tuple[int, ...]]:
    overrides = dict(input_shapes or {})
    specs = input_specs(model, overrides)
    dynamic = [spec.name for spec in specs if spec.assumed]
    if dynamic:
        example = f"{{{dynamic[0]!r}: {tuple(specs[0].shape)}}}"
        raise BadInputError(f"model input(s) {dynamic} have dynamic dimensions; kernel options depend on map sizes, "
                            f"so pass input_shapes= (e.g. {example})")
    return static_shapes(model, {spec.name: spec.shape for spec in specs})


def _usable_conv(node: gs.Node, shapes: dict, grouped: bool = False) -> ConvParams | str:
    """The conv's parameters if it can be merged, else why not (``grouped``: grouped convs merge too)."""
    try:
        params = read_conv_params(node)
    except Refused as refused:
        return f"cannot read it: {refused.reason}"
    if not grouped and params.groups not in (1, params.in_channels):
        return f"grouped conv (groups={params.groups} of {params.in_channels} input channels): only dense and " \
               "depthwise convs merge in the layermerge search space (search_space='extended' takes grouped convs)"
    if node.inputs[0].name not in shapes or node.outputs[0].name not in shapes:
        return "its input or output shape could not be inferred"
    return params


def _chain_conv(index: int, node: gs.Node, params: ConvParams, shapes: dict) -> ChainConv:
    input_shape, output_shape = shapes[node.inputs[0].name], shapes[node.outputs[0].name]
    reducible = input_shape[1:] == output_shape[1:] and max(params.strides) == 1
    return ChainConv(index, node.name, node.outputs[0].name, params, input_shape, output_shape, reducible)


# --- data flow ----------------------------------------------------------------------------------------------

_ENTRY = -1  # stands for the graph inputs and constants


class _DataFlow:
    """Node-level data flow (toposorted), with immediate dominators: where every path to a node passes."""

    def __init__(self, nodes: list[gs.Node]):
        self.nodes = nodes
        self._index = index = {id(node): i for i, node in enumerate(nodes)}
        self.preds = []
        for node in nodes:
            variables = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
            preds = {index[id(t.inputs[0])] for t in variables if t.inputs}
            if not preds or any(not t.inputs for t in variables):
                preds.add(_ENTRY)  # reads a graph input (or only constants)
            self.preds.append(sorted(preds))
        self._idom, depth = {_ENTRY: _ENTRY}, {_ENTRY: 0}

        def meet(a: int, b: int) -> int:
            while a != b:
                if depth[a] >= depth[b]:
                    a = self._idom[a]
                else:
                    b = self._idom[b]
            return a

        for i, preds in enumerate(self.preds):
            self._idom[i] = reduce(meet, preds)
            depth[i] = depth[self._idom[i]] + 1

    def idom(self, node: gs.Node) -> gs.Node | None:
        """The node every path from the inputs to ``node`` passes (None: the graph inputs themselves)."""
        dominator = self._idom[self._index[id(node)]]
        return None if dominator == _ENTRY else self.nodes[dominator]

    def longest_path(self, counts) -> list[gs.Node]:
        """The nodes ``counts`` accepts along the path that passes most of them (earliest on ties)."""
        score, parent = {_ENTRY: 0}, {}
        for i, preds in enumerate(self.preds):
            parent[i] = max(preds, key=score.__getitem__)
            score[i] = score[parent[i]] + counts(self.nodes[i])
        if not self.nodes:
            return []
        i, path = max(range(len(self.nodes)), key=score.__getitem__), []
        while i != _ENTRY:
            if counts(self.nodes[i]):
                path.append(self.nodes[i])
            i = parent[i]
        return path[::-1]


@dataclass(frozen=True)
class _Residual:
    add: gs.Node
    fork: gs.Tensor  # the value both operands start from
    branch: gs.Tensor  # the operand carrying the chain
    projection: gs.Node | None


def _residual_candidates(graph: gs.Graph, flow: _DataFlow, usable: dict) -> dict[str, _Residual]:
    """Adds of a branch and its own fork value (identity) or a 1x1 conv of it (projection), by branch tensor.

    The fork is the Add's immediate dominator, so nothing enters between fork and Add; whether the branch
    really is a run of chain convs is settled once the chain is known.
    """
    found = {}
    for add in graph.nodes:
        if add.op != "Add" or len(add.inputs) != 2 or any(constant_value(t) is not None for t in add.inputs):
            continue
        fork = flow.idom(add)
        left, right = add.inputs
        for shortcut, branch in ((left, right), (right, left)):
            if shortcut is not branch and producer(shortcut) is fork:
                found[branch.name] = _Residual(add, shortcut, branch, None)
                break
        else:
            for shortcut, branch in ((left, right), (right, left)):
                projection = producer(shortcut)
                if (projection is not None and id(projection) in usable and sole_consumer(graph, shortcut) is add
                        and all(k == 1 for k in usable[id(projection)].kernel_shape)
                        and producer(projection.inputs[0]) is fork):
                    found[branch.name] = _Residual(add, projection.inputs[0], branch, projection)
                    break
    return found


# --- positions: activation slots and closing Adds -----------------------------------------------------------


@dataclass
class _Slot:
    activation: Activation | None
    activation_nodes: list[gs.Node]
    value: gs.Tensor  # the position's value: after the activation, a closing Add and an activation after it
    skip: Skip | None
    residual: _Residual | None
    reasons: list[str]  # breaks found on the way


def _slots(graph: gs.Graph, path: list[gs.Node], base: int, residuals: dict[str, _Residual]) -> list[_Slot]:
    """The slots of a chain whose convs are numbered from ``base``."""
    reader_index = {conv.inputs[0].name: base + index for index, conv in enumerate(path)}
    return [_slot(graph, conv, base + index, base, residuals, reader_index) for index, conv in enumerate(path)]


def _slot(graph: gs.Graph, conv: gs.Node, index: int, base: int, residuals: dict[str, _Residual],
          reader_index: dict[str, int]) -> _Slot:
    kind, nodes, value = _activation(graph, conv.outputs[0])
    residual = residuals.get(value.name)
    source = reader_index.get(residual.fork.name, base) - 1 if residual else base - 1
    if not base <= source < index:
        return _Slot(kind, nodes, value, None, None, [])
    reasons = []
    if len(_readers(value)) > 1 or is_graph_output(graph, value):
        reasons.append(f"the value before residual Add '{residual.add.name}' is also used elsewhere")
    skip = Skip(source, index, residual.add.name, residual.projection.name if residual.projection else None)
    value = residual.add.outputs[0]
    if kind is None:
        kind, nodes, value = _activation(graph, value)
    return _Slot(kind, nodes, value, skip, residual, reasons)


def _readers(tensor: gs.Tensor) -> list[gs.Node]:
    return list({id(node): node for node in tensor.outputs}.values())


def _activation(graph: gs.Graph, value: gs.Tensor) -> tuple[Activation | None, list[gs.Node], gs.Tensor]:
    """The activation slot reading ``value`` and nothing reading it but the slot: (activation, nodes, output)."""
    found = activations.match_after(graph, value)
    if found is None or found.activation.kind in NOT_SLOTS:
        return None, [], value
    return found.activation, found.nodes, found.output


def _position_tensor(path: list[gs.Node], slots: list[_Slot], index: int) -> str:
    return path[index + 1].inputs[0].name if index + 1 < len(path) else slots[index].value.name


# --- breaks -------------------------------------------------------------------------------------------------


def _breaks(graph: gs.Graph, path: list[gs.Node], slots: list[_Slot], base: int,
            excluded: dict[str, str]) -> dict[int, str]:
    """Positions that a merged conv cannot run through: anything but the next chain conv (and the
    shortcuts of recorded skips) reads them, or something other than them sits before the next conv.
    The chain's convs are numbered from ``base``."""
    shortcut_readers = {}
    for slot in slots:
        if slot.residual is not None:
            reader = slot.residual.projection or slot.residual.add
            shortcut_readers.setdefault(slot.residual.fork.name, set()).add(id(reader))

    def describe(node: gs.Node) -> str:
        reason = excluded.get(node.name) if node.op == "Conv" else None
        return f"{node.op} '{node.name}'" + (f" ({reason})" if reason else "")

    breaks = {}
    for local, slot in enumerate(slots[:-1]):
        reasons, index = list(slot.reasons), base + local
        value, following = slot.value, path[local + 1]
        if is_graph_output(graph, value):
            reasons.append("its value is a graph output")
        between = None
        if following.inputs[0] is not value:
            between = producer(following.inputs[0])
            reasons.append(f"{describe(between)} sits between conv {index} and conv {index + 1}" if between
                           else f"conv {index + 1} reads graph input '{following.inputs[0].name}'")
        legit = {id(following), id(between)} | shortcut_readers.get(value.name, set())
        reasons += [f"its value also feeds {describe(r)}" for r in _readers(value) if id(r) not in legit]
        if reasons:
            breaks[index] = "; ".join(reasons)
    return breaks


def _add_stride_breaks(convs: list[ChainConv], breaks: dict[int, str]) -> None:
    """A strided conv may merge only with the pointwise conv right after it (LayerMerge's ``str_pos``):
    a k>1 conv after a stride would need its kernel dilated by the stride inside the merged conv."""
    for conv, following in zip(convs, convs[1:]):
        stride = max(conv.params.strides)
        if stride == 1 or conv.index in breaks:
            continue
        if max(following.params.kernel_shape) > 1:
            breaks[conv.index] = (f"conv {conv.index} has stride {stride} and conv {following.index} a "
                                  f"{_dims(following.params.kernel_shape)} kernel")
        elif following is not convs[-1]:
            reason = f"conv {conv.index} has stride {stride}: only the pointwise conv {following.index} may join it"
            breaks[following.index] = "; ".join(filter(None, (breaks.get(following.index), reason)))


def _off_chain_reason(node: gs.Node, skips: list[Skip]) -> str:
    skip = next((s for s in skips if s.projection == node.name), None)
    if skip is not None:
        return f"projection shortcut of skip {skip.source}->{skip.target} (Add '{skip.add_node}')"
    return "on a branch parallel to the chain (the chain is the longest path of mergeable convs)"


# --- kernel options -----------------------------------------------------------------------------------------


def _kernel_options(members: list[ChainConv], projection_groups: Sequence[int] = (),
                    droppable: bool = False) -> tuple[KernelOption, ...]:
    """Every (kernel, depthwise) a segment can merge into, each with the kept subset of largest sum |W|.

    Convs of equal (reach, depthwise) are interchangeable for the kernel, so per such group only how many
    are kept matters (from its irreducible members to all of it), and the largest |W| sums come from
    keeping its heaviest reducible members (LayerMerge's find_max_importance_candidate).

    A k>1 conv after a strided one in the segment (possible only in the extended space) is always pruned;
    if it cannot be (irreducible), the segment has no option. Per axis the merged conv reads
    x at S*t + sum_i (prod_{j<i} s_j) * d_i * u_i (conv_algebra.compose, by induction), so with the kept convs
    after the strides all 1x1 the kernel is 1 + sum over the kept convs before them of d*(k-1), unscaled.
    ``projection_groups`` are the groups of the projection shortcuts nested in the segment (absorbed into the
    kernel, they bound its grouping); ``droppable`` adds the empty "drop the identity-residual block" option.
    """
    rank = members[0].params.rank
    strides_before, groups = (1,) * rank, {}
    for conv in members:
        p = conv.params
        reach = tuple(d * (k - 1) * s for d, k, s in zip(p.dilations, p.kernel_shape, strides_before))
        if any(reach) and max(strides_before) > 1:
            if not conv.reducible:
                return ()
            continue  # always pruned: reducible, so stride 1 too
        strides_before = tuple(a * b for a, b in zip(strides_before, p.strides))
        groups.setdefault((reach, p.is_depthwise), []).append(conv)
    l1 = {conv.index: float(np.abs(conv.params.weight).sum()) for conv in members}
    grouping = {conv.index: conv.params.groups for conv in members}
    choices = []
    for (reach, depthwise), group in groups.items():
        fixed = [c.index for c in group if not c.reducible]
        optional = sorted((c.index for c in group if c.reducible), key=lambda i: -l1[i])
        choices.append([(reach, depthwise, fixed + optional[:n]) for n in range(len(optional) + 1)])
    best = {}
    for combination in itertools.product(*choices):
        kept = sorted(i for _, _, indices in combination for i in indices)
        if not kept:
            continue
        kernel = tuple(1 + sum(len(indices) * reach[axis] for reach, _, indices in combination)
                       for axis in range(rank))
        depthwise = all(dw for _, dw, indices in combination if indices)
        total = sum(l1[i] for i in kept)
        if (kernel, depthwise) not in best or total > best[kernel, depthwise][0]:
            best[kernel, depthwise] = (total, tuple(kept))
    first, last = members[0], members[-1]

    def option(kernel, depthwise, kept) -> KernelOption:
        merged_groups = last.params.out_channels if depthwise else \
            math.gcd(*(grouping[i] for i in kept), *projection_groups)
        return KernelOption(kernel, strides_before, depthwise, kept, first.params.in_channels,
                            last.params.out_channels, first.input_shape[2:], merged_groups)

    identity = ((1,) * rank, True)
    if droppable and identity not in best:  # the identity as a 1x1 depthwise conv (conv_algebra.identity_conv)
        best[identity] = (0.0, ())
    return tuple(option(kernel, depthwise, kept)
                 for (kernel, depthwise), (_, kept) in sorted(best.items(), key=lambda item: (item[0][1], item[0][0])))


# --- reporting helpers ----------------------------------------------------------------------------------------


def _check_names(graph: gs.Graph, analysis: ChainAnalysis) -> None:
    """The analysis names nodes, so the names it uses must pick out one node each."""
    counts = Counter(node.name for node in graph.nodes)
    named = [c.node for c in analysis.convs] + list(analysis.excluded)
    named += [n for p in analysis.positions for n in p.activation_nodes]
    named += [n for s in analysis.skips for n in (s.add_node, s.projection) if n is not None]
    ambiguous = sorted({name for name in named if not name or counts[name] > 1})
    if ambiguous:
        raise BadInputError(f"nodes on the conv chain need unique, non-empty names; these are missing or shared: "
                            f"{ambiguous}")


def _dims(values) -> str:
    return "x".join(map(str, values))
