"""The importance table: how much each (segment, kernel option) alone hurts the network, on calibration data.

LayerMerge fine-tunes the network once per entry (GPU-days). Here each entry is scored in minutes: the
network with only that segment merged is run in ORT and compared with the original's outputs. The merged
conv is either plain composition or a closed-form ridge refit to the original segment's outputs on
calibration activations, whichever scores better. Only the part of the network after the segment's start
is re-run: the original's activations up to there (every tensor the rest of the graph reads) are computed
once per start position and reused by every entry starting there.

Normalisation (the additive surrogate the DP sums): for a classifier (an output of shape [N, classes]) an
entry's score is -mean KL(p_original || p_entry) in nats over the held-out calibration inputs, or, when the
calibration file has ``labels``, the change in held-out accuracy; otherwise it is -||y_entry - y||^2 / ||y||^2
summed over outputs. An unchanged (trivial) segment scores exactly 0.

Without labels every score is <= 0 (KL and squared errors are never negative), so an entry that costs at least
as much latency as the original convs of its span is never in an optimal plan (:func:`dominated_entries`):
such entries are not scored at all.

Cost: the refit's fit activations are computed on only as many fit images as :data:`MAX_REFIT_ROWS` needs (the
first ones, in file order), whatever the calibration size; held-out values are collected batch by batch into
one array each. The ridge design matrix is never built whole: it is gathered chunk by chunk from the float32
segment input, and its Gram (float64) is computed once per start and merged-conv geometry and shared by every
entry with that geometry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import onnx

from onnxmerge.layermerge.build import SegmentChoice, apply_segments, merged_conv
from onnxmerge.layermerge.segments import ChainAnalysis, KernelOption
from onnxmerge.conv_algebra import ConvParams
from onnxmerge.graph import export_graph, import_graph, run_shape_inference
from onnxmerge.io import clamp_ir_version
from onnxmerge.dataset import Dataset, iter_batched, run_batched
from onnxmerge.runner import make_session

# Ridge refits are solved only when a group's unknowns stay small enough for a dense normal-equation solve.
MAX_REFIT_UNKNOWNS = 2304
MAX_REFIT_ROWS = 20000  # rows of the ridge problem: the first images of the fit set supply them (see refit)
RIDGE = 1e-3
_CHUNK_VALUES = 1 << 22  # float64 values per gathered design chunk (32 MiB)
_BLOCK_COLUMNS = 4096  # columns per chunk when many small groups (depthwise) are solved side by side


def option_key(option: KernelOption) -> str:
    """The join key of an option in both tables (the DP joins on keys, never on row order)."""
    kernel = "x".join(map(str, option.kernel))
    stride = "x".join(map(str, option.stride))
    return f"k{kernel}_s{stride}_{'dw' if option.depthwise else 'dense'}"


def is_original(key: tuple[int, int, str], option: KernelOption) -> bool:
    """The entry that leaves the network as it is: one position, its own conv kept."""
    return key[1] - key[0] == 1 and option.kept == (key[1],)


def dominated_entries(latency: Mapping[tuple[int, int, str], float],
                      options: Mapping[tuple[int, int, str], KernelOption]) -> set[tuple[int, int, str]]:
    """Entries whose latency is at least that of the original convs over the same span.

    When every score is <= 0 and the original entries score 0, such an entry costs no less and scores no
    more than the original span (the original entries (k-1, k) for k in start+1..end), so swapping it for
    them never makes a plan slower or less important: no optimal plan needs it. The comparison is exact
    (rational sums), like the DP's budget test. Spans lacking an original entry are never dominated.
    """
    original = {key[1]: latency[key] for key, option in options.items() if is_original(key, option)}
    dominated = set()
    for key, option in options.items():
        start, end, _ = key
        if is_original(key, option) or any(k not in original for k in range(start + 1, end + 1)):
            continue
        if Fraction(latency[key]) >= sum(Fraction(original[k]) for k in range(start + 1, end + 1)):
            dominated.add(key)
    return dominated


@dataclass
class ImportanceEntry:
    start: int
    end: int
    option: str
    score: float
    agreement: float | None  # top-1 agreement with the original (classifiers)
    method: str  # "composed" or "refit"


def fidelity(reference: list[np.ndarray], candidate: list[np.ndarray],
             labels: np.ndarray | None = None) -> tuple[float, float | None]:
    """(score, top-1 agreement) of candidate outputs against the original's, as described above."""
    first = reference[0]
    if is_classifier(reference):
        agreement = float(np.mean(first.argmax(1) == candidate[0].argmax(1)))
        if labels is not None:
            return float(np.mean(candidate[0].argmax(1) == labels) - np.mean(first.argmax(1) == labels)), agreement
        p = _softmax(first.astype(np.float64))
        q = _softmax(candidate[0].astype(np.float64))
        kl = float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))
        return (-kl if kl > 0 else 0.0), agreement  # KL >= 0: the epsilon can only make it a rounding below 0
    error = sum(float(np.sum((c.astype(np.float64) - r) ** 2) / max(np.sum(r.astype(np.float64) ** 2), 1e-12))
                for r, c in zip(reference, candidate))
    return -error, None


def is_classifier(outputs: list[np.ndarray]) -> bool:
    """Outputs scored by KL / accuracy (first output [N, classes]) rather than relative squared error."""
    return outputs[0].ndim == 2 and outputs[0].shape[1] > 1


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def frontier(model: onnx.ModelProto, tensor: str) -> list[str]:
    """Tensors computed up to ``tensor`` that anything after it reads: what the rest of the net needs."""
    producers = {out: node for node in model.graph.node for out in node.output}
    ancestors, stack = set(), [tensor]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in ancestors:
            continue
        ancestors.add(id(node))
        stack.extend(node.input)
    computed = {out for node in model.graph.node if id(node) in ancestors for out in node.output}
    computed |= {value.name for value in model.graph.input}
    needed = {name for node in model.graph.node if id(node) not in ancestors for name in node.input}
    needed |= {value.name for value in model.graph.output}
    return sorted((computed & needed) | {tensor})


def suffix_model(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The part of ``model`` after the given tensors, which become its inputs."""
    graph = import_graph(model)
    tensors = graph.tensors()
    new_inputs = []
    for name, value in inputs.items():
        tensor = tensors[name]
        tensor.inputs.clear()
        tensor.dtype, tensor.shape = value.dtype, ["N", *value.shape[1:]]
        new_inputs.append(tensor)
    graph.inputs = new_inputs
    graph.cleanup(remove_unused_graph_inputs=False)
    suffix = export_graph(graph, model)
    del suffix.graph.input[:]
    for name, value in inputs.items():
        suffix.graph.input.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), ["N", *value.shape[1:]]))
    clamp_ir_version(suffix)
    return suffix


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model that also returns the given intermediate tensors (dtype from shape inference)."""
    inferred = run_shape_inference(model)
    types = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.input)
             + list(inferred.graph.output)}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    existing = {o.name for o in copy.graph.output}
    for name in names:
        if name not in existing:
            copy.graph.output.append(types[name] if name in types else
                                     onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def refit(params: ConvParams, inputs: np.ndarray, targets: np.ndarray) -> ConvParams | None:
    """Least-squares (ridge) weights for the merged conv's geometry mapping segment inputs to outputs.

    The rows are at most :data:`MAX_REFIT_ROWS` output pixels, drawn (seeded) from the first
    ``ceil(MAX_REFIT_ROWS / (H_out * W_out))`` images only (all when there are fewer), so the result does
    not change when more images are passed. Returns None when the problem is too large to solve densely or
    the geometry does not match.
    """
    return refit_shared([params], inputs, [targets])[0]


def refit_geometry(params: ConvParams) -> tuple:
    """What the ridge design depends on besides the segment input: merged convs that agree on it share
    one Gram matrix (:func:`refit_shared`)."""
    return (params.rank, params.in_channels, params.groups, tuple(params.kernel_shape), params.strides,
            params.dilations, params.pads)


def refit_unknowns(params: ConvParams) -> int:
    """Unknowns per group of the ridge problem (weights of one group's output plus its bias)."""
    return params.in_channels // params.groups * int(np.prod(params.kernel_shape)) + 1


def refit_shared(params: list[ConvParams], inputs: np.ndarray, targets: list[np.ndarray]) -> list[ConvParams | None]:
    """:func:`refit` for merged convs of one geometry (:func:`refit_geometry`) on one segment input, each with
    its own targets: the design matrix is gathered and its Gram computed once for all of them.

    The design is never materialised whole: row chunks of at most ``_CHUNK_VALUES`` values are gathered from
    the (float32) segment input and cast to float64, where the Gram and right-hand sides are accumulated
    (products stay in float64: the ridge system's condition number, up to ~1e3 x unknowns, would amplify
    float32 rounding). Row for row, it solves the same system as a dense float64 im2col.
    """
    results: list[ConvParams | None] = [None] * len(params)
    if not params:
        return results
    first = params[0]
    if any(refit_geometry(p) != refit_geometry(first) for p in params):
        raise ValueError("refit_shared needs merged convs of one geometry")
    if refit_unknowns(first) > MAX_REFIT_UNKNOWNS or first.rank != 2 or inputs.ndim != 4:
        return results
    (kh, kw), (sh, sw), (dh, dw) = first.kernel_shape, first.strides, first.dilations
    (top, left), (bottom, right) = first.pads_begin, first.pads_end
    out_h = (inputs.shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (inputs.shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1
    if out_h < 1 or out_w < 1 or inputs.shape[1] != first.in_channels:
        return results
    usable = [i for i, (p, t) in enumerate(zip(params, targets))
              if t.ndim == 4 and t.shape[1:] == (p.out_channels, out_h, out_w) and len(t) == len(inputs)]
    if not usable:
        return results
    per_image = out_h * out_w
    images = min(len(inputs), max(1, math.ceil(MAX_REFIT_ROWS / per_image)))
    total = images * per_image
    rows = np.sort(np.random.default_rng(0).permutation(total)[:MAX_REFIT_ROWS])
    image, pixel = np.divmod(rows, per_image)
    out_y, out_x = np.divmod(pixel, out_w)
    float_type = np.result_type(inputs.dtype, np.float32)
    padded = np.pad(inputs[:images].astype(float_type, copy=False), ((0, 0), (0, 0), (top, bottom), (left, right)))

    groups = first.groups
    per_group_in = first.in_channels // groups
    taps = kh * kw
    unknowns = per_group_in * taps + 1
    block = max(1, min(groups, _BLOCK_COLUMNS // unknowns))
    chunk = max(1, _CHUNK_VALUES // (block * unknowns))
    weights = [np.zeros_like(params[i].weight) for i in usable]
    biases = [np.zeros(params[i].out_channels) for i in usable]
    for g0 in range(0, groups, block):
        g1 = min(groups, g0 + block)
        count = g1 - g0
        channels = slice(g0 * per_group_in, g1 * per_group_in)
        gram = np.zeros((count, unknowns, unknowns))
        rhs = [np.zeros((count, unknowns, params[i].out_channels // groups)) for i in usable]
        for r0 in range(0, len(rows), chunk):
            r1 = min(len(rows), r0 + chunk)
            at, oy, ox = image[r0:r1], out_y[r0:r1], out_x[r0:r1]
            y, x = oy * sh, ox * sw
            design = np.empty((count, r1 - r0, unknowns))  # per group: [rows, channel-major taps + bias]
            for t, (a, b) in enumerate((a, b) for a in range(kh) for b in range(kw)):
                tap = padded[at, channels, y + a * dh, x + b * dw]  # [rows, count * per_group_in]
                design[:, :, t:per_group_in * taps:taps] = tap.reshape(r1 - r0, count, per_group_in).transpose(1, 0, 2)
            design[:, :, -1] = 1.0
            transposed = design.transpose(0, 2, 1)
            gram += transposed @ design
            for target, out in zip((targets[i] for i in usable), rhs):
                per_group_out = out.shape[2]
                values = target[at, g0 * per_group_out:g1 * per_group_out, oy, ox]  # [rows, outputs]
                out += transposed @ values.reshape(r1 - r0, count, per_group_out).transpose(1, 0, 2).astype(np.float64)
        diagonal = np.trace(gram, axis1=1, axis2=2) / unknowns
        gram += RIDGE * diagonal[:, None, None] * np.eye(unknowns)
        for weight, bias, out in zip(weights, biases, rhs):
            solution = np.linalg.solve(gram, out)  # [count, unknowns, per_group_out]
            per_group_out = out.shape[2]
            for g in range(count):
                outputs = slice((g0 + g) * per_group_out, (g0 + g + 1) * per_group_out)
                weight[outputs] = solution[g, :-1].T.reshape(weight[outputs].shape)
                bias[outputs] = solution[g, -1]
    for i, weight, bias in zip(usable, weights, biases):
        results[i] = ConvParams.make(weight, bias, strides=first.strides, dilations=first.dilations,
                                     pads=first.pads, groups=groups)
    return results


class ImportanceScorer:
    """Scores entries against the original, reusing per-start activations (computed once per start)."""

    def __init__(self, model: onnx.ModelProto, analysis: ChainAnalysis, calibration: Dataset | dict[str, np.ndarray],
                 *, holdout: Dataset | dict[str, np.ndarray] | None = None, labels: np.ndarray | None = None,
                 threads: int = 1):
        self.model, self.analysis, self.threads = model, analysis, threads
        self.labels = labels  # of the held-out inputs: score accuracy instead of KL
        self.fit_inputs = Dataset.of(calibration)
        self.eval_inputs = Dataset.of(holdout) if holdout is not None else self.fit_inputs
        self.reference = self._run(model, self.eval_inputs)
        self._graph = import_graph(model)

    @property
    def scores_at_most_zero(self) -> bool:
        """Whether every entry's score is provably <= 0 (-KL or -relative error), which makes entries slower than
        their span's original convs useless (:func:`dominated_entries`). A change in accuracy (labels on a
        classifier) can be positive: then nothing is provably dominated."""
        return self.labels is None or not is_classifier(self.reference)

    def _target_tensor(self, start: int, end: int) -> str:
        absorbed = next((s for s in self.analysis.skips if s.target == end and s.source >= start), None)
        if absorbed is not None:
            node = next(n for n in self.model.graph.node if n.name == absorbed.add_node)
            return node.output[0]
        return next(n for n in self.model.graph.node if n.name == self.analysis.convs[end].node).output[0]

    def fit_images(self, start: int) -> int:
        """Fit images the refits of segments starting at ``start`` read: enough for :data:`MAX_REFIT_ROWS` rows
        at the smallest output map of any segment starting there (so the same for every subset of ends, and
        the final build's refit sees the very activations the table's did), at least 1, at most all."""
        pixels = [int(np.prod(self.analysis.convs[s.end].output_shape[2:])) for s in self.analysis.segments
                  if s.start == start]
        need = max((math.ceil(MAX_REFIT_ROWS / max(1, p)) for p in pixels), default=1)
        return min(self.fit_inputs.size, max(1, need))

    def held_out_frontier(self, start: int) -> dict[str, np.ndarray]:
        """The original's values on the held-out inputs of every tensor the network after ``start`` reads."""
        needed = frontier(self.model, self.analysis.positions[start].tensor)
        return self._collect(with_outputs(self.model, needed), self.eval_inputs, needed)

    def fit_activations(self, start: int, ends: list[int]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """(segment input, {end: segment target}) on the first :meth:`fit_images` fit inputs."""
        position = self.analysis.positions[start].tensor
        targets = {end: self._target_tensor(start, end) for end in ends}
        names = list(dict.fromkeys([position, *targets.values()]))
        values = self._collect(with_outputs(self.model, names),
                               self.fit_inputs.rows(slice(0, self.fit_images(start))), names)
        return values[position], {end: values[target] for end, target in targets.items()}

    def activations(self, start: int, ends: list[int]) -> tuple[dict, dict, dict]:
        """(frontier values on held-out inputs, segment input on fit inputs, segment targets on fit inputs)."""
        inputs, targets = self.fit_activations(start, ends)
        return self.held_out_frontier(start), {self.analysis.positions[start].tensor: inputs}, targets

    def score(self, choice: SegmentChoice, frontier_values: dict, params: ConvParams | None = None
              ) -> tuple[float, float | None]:
        candidate = apply_segments(self.model, self.analysis, [choice], overrides={(choice.start, choice.end): params}
                                   if params is not None else None)
        return fidelity(self.reference, self._run(suffix_model(candidate, frontier_values), frontier_values),
                        self.labels)

    def _run(self, model: onnx.ModelProto, feeds: Dataset | dict[str, np.ndarray]) -> list[np.ndarray]:
        # Suffix models declare a symbolic batch; the original's export batch rule applies to all of them.
        return run_batched(make_session(model, threads=self.threads), feeds, self.model)

    def _collect(self, model: onnx.ModelProto, data: Dataset, names: list[str]) -> dict[str, np.ndarray]:
        """``names`` over every row of ``data``, batch by batch into one preallocated array each (no list of
        batches concatenated at the end). A value without the batch as dim 0 (a shape) is the first batch's."""
        session = make_session(model, threads=self.threads)
        step = data.batch_rows(model=self.model)
        values: dict[str, np.ndarray] = {}
        for index, part in enumerate(iter_batched(session, data, self.model, outputs=names)):
            offset = index * step
            rows = min(step, data.size - offset)
            for name, value in zip(names, part):
                if value.ndim == 0 or value.shape[0] != rows:
                    values.setdefault(name, value)
                    continue
                if name not in values:
                    values[name] = np.empty((data.size, *value.shape[1:]), value.dtype)
                values[name][offset:offset + rows] = value
        return values

    def table(self, entries: list[tuple[int, int, KernelOption]], jobs: int = 1, use_refit: bool = True,
              progress=None) -> dict[tuple[int, int, str], ImportanceEntry]:
        """Score ``entries`` (callers leave out those :func:`dominated_entries` finds useless), one start at a
        time (:meth:`_score_start`), ``jobs`` threads working on it."""
        by_start: dict[int, list[tuple[int, KernelOption]]] = {}
        for start, end, option in entries:
            by_start.setdefault(start, []).append((end, option))
        results: dict[tuple[int, int, str], ImportanceEntry] = {}
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for start, group in sorted(by_start.items()):
                for entry in self._score_start(start, group, pool, use_refit):
                    results[(entry.start, entry.end, entry.option)] = entry
                    if progress is not None:
                        progress()
        return results

    def _score_start(self, start: int, group: list[tuple[int, KernelOption]], pool: ThreadPoolExecutor,
                     use_refit: bool) -> list[ImportanceEntry]:
        """The entries starting at ``start``, in ``group`` order: the held-out frontier once; each entry's merged
        conv composed once and scored; the refits of the entries small enough to refit solved together (fit
        activations once, one Gram per geometry); then the refits scored. What it holds is freed on return."""
        frontier_values = self.held_out_frontier(start)
        refittable: dict[tuple[int, str], ConvParams] = {}

        def composed(item: tuple[int, KernelOption]) -> ImportanceEntry:
            end, option = item
            choice = SegmentChoice(start, end, option)
            if choice.is_trivial:
                return ImportanceEntry(start, end, option_key(option), 0.0, 1.0, "original")
            params = merged_conv(self.analysis, self._graph, start, end, option.kept)
            if use_refit and params.rank == 2 and refit_unknowns(params) <= MAX_REFIT_UNKNOWNS:
                refittable[(end, option_key(option))] = params
            score, agreement = self.score(choice, frontier_values, params)
            return ImportanceEntry(start, end, option_key(option), score, agreement, "composed")

        scored = {(entry.end, entry.option): entry for entry in pool.map(composed, group)}
        fitted = self._refits(start, refittable, pool)
        options = {(end, option_key(option)): option for end, option in group}

        def refitted(key: tuple[int, str]) -> ImportanceEntry:
            score, agreement = self.score(SegmentChoice(start, key[0], options[key]), frontier_values, fitted[key])
            if score > scored[key].score:
                return ImportanceEntry(start, key[0], key[1], score, agreement, "refit")
            return scored[key]

        for entry in pool.map(refitted, list(fitted)):
            scored[(entry.end, entry.option)] = entry
        return [scored[(end, option_key(option))] for end, option in group]

    def _refits(self, start: int, composed: dict[tuple[int, str], ConvParams],
                pool: ThreadPoolExecutor) -> dict[tuple[int, str], ConvParams]:
        """Ridge refits of merged convs starting at ``start``, keyed (end, option key): the fit activations once,
        one Gram per geometry."""
        if not composed:
            return {}
        inputs, targets = self.fit_activations(start, sorted({end for end, _ in composed}))
        by_geometry: dict[tuple, list[tuple[int, str]]] = {}
        for key, params in sorted(composed.items()):
            by_geometry.setdefault(refit_geometry(params), []).append(key)

        def solve(keys: list[tuple[int, str]]) -> list[tuple[tuple[int, str], ConvParams | None]]:
            fits = refit_shared([composed[key] for key in keys], inputs, [targets[end] for end, _ in keys])
            return list(zip(keys, fits))

        return {key: fit for pairs in pool.map(solve, list(by_geometry.values())) for key, fit in pairs
                if fit is not None}

    def refit_params(self, choice: SegmentChoice) -> ConvParams | None:
        """The refit conv of one chosen entry (recomputed for the final build rather than kept for all)."""
        inputs, targets = self.fit_activations(choice.start, [choice.end])
        return refit(merged_conv(self.analysis, self._graph, choice.start, choice.end, choice.option.kept),
                     inputs, targets[choice.end])
