"""The importance table: how much each (segment, kernel option) alone hurts the network, on calibration data.

LayerMerge fine-tunes the network once per entry (GPU-days). Here each entry is scored in minutes: the
network with only that segment merged is run in ORT and compared with the original's outputs. The merged
conv is either plain composition or a closed-form ridge refit to the original segment's outputs on
calibration activations, whichever scores better. Only the part of the network after the segment's start
is re-run from the original's activations there (every tensor the rest of the graph reads, its frontier).

Score (the additive surrogate the DP sums; it should predict the result, so it is a loss, never a change in
accuracy, which is a coarse step function of the held-out size): for a classifier (an output of shape
[N, classes]) an entry's score is -mean KL(p_original || p_entry) in nats over the held-out rows, or, when the
calibration file has ``labels``, -(CE_entry - CE_original), the increase of the mean cross-entropy with the
labels, in nats; otherwise it is -||y_entry - y||^2 / ||y||^2 summed over outputs. An unchanged (trivial)
segment scores exactly 0.

Without labels every score is <= 0 (KL and squared errors are never negative), so an entry that costs at least
as much latency as the original convs of its span is never in an optimal plan (:func:`dominated_entries`):
such entries are not scored at all. A cross-entropy can fall, so with labels nothing is dominated.

Cost, one network pass of activations: starts are scored in increasing order, and the frontier at a start is
computed from the frontier at the previous one by running only the graph between them (:func:`span_model`),
then the previous one is dropped, so the activations cost one pass over the network and memory holds one
frontier (two while stepping). The refits' fit activations are walked the same way, on only as many fit
images as :data:`MAX_REFIT_ROWS` needs at that start (the first ones, in file order; more rows, when a later
start needs them, come from a pass of the prefix over just those rows). The ridge design matrix is never built
whole: it is gathered chunk by chunk from the float32 segment input, and its Gram (float64) is computed once
per start and merged-conv geometry and shared by every entry with that geometry.

Held-out size: scoring reads only the first ``held_out_rows`` held-out rows, as many as keep the relative
standard error of a typical entry's score near :data:`HELD_OUT_RSE` (:func:`rows_for_noise`, measured once on a
few pilot entries), so the noise, not the file, sets the cost of every entry.

Cache: a finished table is a function of the model, the calibration arrays and the constants here; it is kept
on disk (:class:`ImportanceScorer` ``cache_dir``), one JSON file per key, rewritten after every start, so a
rerun or an interrupted run does not score again what it already has.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmerge.layermerge.build import SegmentChoice, apply_segments, merged_conv
from onnxmerge.layermerge.segments import ChainAnalysis, KernelOption
from onnxmerge.conv_algebra import ConvParams
from onnxmerge.environment import default_cache_dir
from onnxmerge.graph import export_graph, import_graph, run_shape_inference
from onnxmerge.io import atomic_write_bytes, clamp_ir_version
from onnxmerge.dataset import Dataset, iter_batched, run_batched
from onnxmerge.runner import make_session

# Ridge refits are solved only when a group's unknowns stay small enough for a dense normal-equation solve.
MAX_REFIT_UNKNOWNS = 2304
MAX_REFIT_ROWS = 20000  # rows of the ridge problem: the first images of the fit set supply them (see refit)
# The sequential refit of a chosen segment (plans.py) reads only enough images for ROWS_PER_UNKNOWN rows per
# unknown of its own merged conv (at least MIN_REFIT_ROWS, at most what the table read): a 1x1 merge at a
# 7x7 map needs 84 images, not the table's 384, and each image is a pass of the partially compressed network.
# On EfficientNet-Lite0 plans, 8 and 16 rows per unknown (and the table's 103-384 images) gave the same
# held-out and unseen-photo fidelity, before and after recovery.
ROWS_PER_UNKNOWN = 8
MIN_REFIT_ROWS = 4096
RIDGE = 1e-3
_CHUNK_VALUES = 1 << 22  # float64 values per gathered design chunk (32 MiB)
_BLOCK_COLUMNS = 4096  # columns per chunk when many small groups (depthwise) are solved side by side
# Held-out rows scored: enough for a relative standard error of HELD_OUT_RSE on the pilot entries' mean loss
# (10%: rankings the DP relies on differ by much more than that between neighbouring options), never fewer than
# MIN_HELD_OUT_ROWS (a standard deviation from fewer rows is itself too noisy to trust), at most all.
HELD_OUT_RSE = 0.10
MIN_HELD_OUT_ROWS = 16
PILOT_ENTRIES = 3  # entries the held-out size is measured on, at evenly spaced starts
CACHE_FORMAT = 1  # bump when what a cached score means changes


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
        losses = row_losses(reference, candidate, labels)
        if labels is not None:
            return -float(np.mean(losses)), agreement  # identical logits: exactly 0
        kl = float(np.mean(losses))
        return (-kl if kl > 0 else 0.0), agreement  # KL >= 0: the epsilon can only make it a rounding below 0
    error = sum(float(np.sum((c.astype(np.float64) - r) ** 2) / max(np.sum(r.astype(np.float64) ** 2), 1e-12))
                for r, c in zip(reference, candidate))
    return -error, None


def row_losses(reference: list[np.ndarray], candidate: list[np.ndarray],
               labels: np.ndarray | None = None) -> np.ndarray:
    """The per-row losses whose mean is minus the score (:func:`fidelity`), float64: KL per row, CE_entry -
    CE_original per row with labels, or each row's share of the relative squared error (times N, so the mean is
    the sum). What the held-out size is chosen on (:func:`rows_for_noise`)."""
    if is_classifier(reference):
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            rows = np.arange(len(labels))
            return (_log_softmax(reference[0].astype(np.float64))[rows, labels]
                    - _log_softmax(candidate[0].astype(np.float64))[rows, labels])
        p = _softmax(reference[0].astype(np.float64))
        q = _softmax(candidate[0].astype(np.float64))
        return np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)
    total = 0.0
    for r, c in zip(reference, candidate):
        r64 = r.astype(np.float64)
        squared = ((c.astype(np.float64) - r64) ** 2).reshape(len(r), -1).sum(axis=1)
        total = total + squared * len(r) / max(float(np.sum(r64 ** 2)), 1e-12)
    return np.asarray(total, dtype=np.float64)


def rows_for_noise(losses: list[np.ndarray], available: int) -> tuple[int, str]:
    """(rows, why): the fewest held-out rows giving every pilot entry's mean loss a relative standard error
    of at most :data:`HELD_OUT_RSE` (std / (sqrt(n) |mean|), estimated on all rows), clipped to
    [:data:`MIN_HELD_OUT_ROWS`, ``available``]. A pilot whose mean is 0 (an entry that changes nothing) says
    nothing about the noise and is left out; with none left, every row is used."""
    floor = min(MIN_HELD_OUT_ROWS, available)
    needs = []
    for loss in losses:
        mean = abs(float(np.mean(loss)))
        if len(loss) < 2 or not mean > 0:
            continue
        spread = float(np.std(loss, ddof=1))
        needs.append(max(1, math.ceil((spread / (HELD_OUT_RSE * mean)) ** 2)))
    if not needs:
        return available, f"all {available}: no pilot entry changed the outputs"
    rows = min(available, max(floor, max(needs)))
    return rows, (f"{rows} of {available}: relative standard error <= {HELD_OUT_RSE:g} needs {max(needs)} rows "
                  f"(pilots {needs}), at least {floor}")


def is_classifier(outputs: list[np.ndarray]) -> bool:
    """Outputs scored by KL / cross-entropy (first output [N, classes]) rather than relative squared error."""
    return outputs[0].ndim == 2 and outputs[0].shape[1] > 1


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


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


def _fed_from(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> gs.Graph:
    """The model's graph with the given tensors cut from their producers and made its inputs (their dtype and
    a symbolic batch from the values): what both a suffix and a span start from."""
    graph = import_graph(model)
    tensors = graph.tensors()
    new_inputs = []
    for name, value in inputs.items():
        tensor = tensors[name]
        tensor.inputs.clear()
        tensor.dtype, tensor.shape = value.dtype, ["N", *value.shape[1:]]
        new_inputs.append(tensor)
    graph.inputs = new_inputs
    return graph


def suffix_model(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The part of ``model`` after the given tensors, which become its inputs."""
    graph = _fed_from(model, inputs)
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


def span_model(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], outputs: list[str],
               types: Mapping[str, onnx.ValueInfoProto] | None = None) -> onnx.ModelProto | None:
    """The part of ``model`` that computes ``outputs`` from the tensors ``inputs`` (which become its inputs, batch
    dim symbolic), or None when some output also needs a tensor computed before them. Output declarations come
    from ``types`` (shape inference of ``model``) where known, else float32 of unknown shape.

    What steps a frontier to the next start (and the prefix up to one start, with the graph's own inputs): the
    nodes run are exactly those of the original between the two, so the values match a full pass (ORT fuses
    across neither the inputs nor the outputs of either)."""
    graph = _fed_from(model, inputs)
    tensors = graph.tensors()
    graph.outputs = [tensors[name] for name in outputs]
    graph.cleanup(remove_unused_graph_inputs=False)
    fed = set(inputs)
    for node in graph.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Variable) and tensor.name and not tensor.inputs and tensor.name not in fed:
                return None
    if any(not tensors[name].inputs and name not in fed for name in outputs):
        return None
    span = export_graph(graph, model)
    del span.graph.input[:], span.graph.output[:]
    for name, value in inputs.items():
        span.graph.input.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), ["N", *value.shape[1:]]))
    for name in outputs:
        known = (types or {}).get(name)
        elem = known.type.tensor_type.elem_type if known is not None else onnx.TensorProto.FLOAT
        span.graph.output.append(onnx.helper.make_tensor_value_info(name, elem or onnx.TensorProto.FLOAT, None))
    clamp_ir_version(span)
    return span


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
    return _unknowns(params.in_channels, params.groups, params.kernel_shape)


def _unknowns(in_channels: int, groups: int, kernel: Sequence[int]) -> int:
    return in_channels // groups * int(np.prod(kernel)) + 1


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


class _Walk:
    """The original's frontier values (:func:`frontier`) at increasing starts on the first rows of one dataset,
    each computed from the previous start's by running only the graph between them (:func:`span_model`); the
    previous values are dropped once the next are computed. When a start needs more rows than the last one
    had, the extra rows come from the prefix alone; a start before the last one, or a span that is not
    computable from the last frontier, is computed from the graph inputs."""

    def __init__(self, scorer: "ImportanceScorer", data: Dataset):
        self.scorer, self.data = scorer, data
        self.start: int | None = None
        self.rows = 0
        self.values: dict[str, np.ndarray] = {}

    def at(self, start: int, rows: int) -> dict[str, np.ndarray]:
        names = frontier(self.scorer.model, self.scorer.analysis.positions[start].tensor)
        values = None
        if self.start is not None and start >= self.start and self.rows:
            keep = min(rows, self.rows)
            values = self.scorer._step(self.values, keep, names)
            if values is not None and rows > keep:
                extra = self.scorer._prefix(names, self.data.rows(slice(keep, rows)))
                values = {name: np.concatenate([values[name], extra[name]]) for name in names}
        if values is None:
            self.values = {}  # free the last frontier before the pass that replaces it
            values = self.scorer._prefix(names, self.data.rows(slice(0, rows)))
        self.start, self.rows, self.values = start, rows, values
        return values


class ImportanceScorer:
    """Scores entries against the original, walking the per-start activations once (:class:`_Walk`).

    ``holdout`` (default: the calibration itself) is scored on; ``labels`` are its labels (scores become
    cross-entropy changes). ``held_out_rows`` fixes how many of its first rows are scored (default: chosen once
    by :func:`rows_for_noise` on pilot entries, see :attr:`held_out_choice`). Finished scores are kept in
    ``cache_dir`` (default ``default_cache_dir() / "importance"``) unless ``use_cache`` is False;
    :attr:`cache_hits` / :attr:`cache_misses` count entries read from it / scored, :attr:`sessions` the ORT
    sessions made.
    """

    def __init__(self, model: onnx.ModelProto, analysis: ChainAnalysis, calibration: Dataset | dict[str, np.ndarray],
                 *, holdout: Dataset | dict[str, np.ndarray] | None = None, labels: np.ndarray | None = None,
                 threads: int = 1, held_out_rows: int | None = None, cache_dir: str | Path | None = None,
                 use_cache: bool = True):
        self.model, self.analysis, self.threads = model, analysis, threads
        self.labels = labels  # of the held-out inputs: score cross-entropy instead of KL
        self.fit_inputs = Dataset.of(calibration)
        self.eval_inputs = Dataset.of(holdout) if holdout is not None else self.fit_inputs
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "importance"
        self.use_cache = use_cache
        self.cache_hits = self.cache_misses = self.sessions = 0
        self._lock = threading.Lock()
        self._given_rows = held_out_rows
        self._held_out: dict | None = None
        self._key: str | None = None
        self._types: dict[str, onnx.ValueInfoProto] | None = None
        self.reference = self._run(model, self.eval_inputs)
        self._graph = import_graph(model)

    @property
    def scores_at_most_zero(self) -> bool:
        """Whether every entry's score is provably <= 0 (-KL or -relative error), which makes entries slower than
        their span's original convs useless (:func:`dominated_entries`). A cross-entropy with labels can fall
        (an entry may score > 0): then nothing is provably dominated."""
        return self.labels is None or not is_classifier(self.reference)

    # -- held-out size ------------------------------------------------------------------------------------

    @property
    def held_out_choice(self) -> dict:
        """{"rows": n scored, "of": held-out rows available, "reason": why}: given, read from the cache, or
        measured once on pilot entries (:meth:`_pilot`)."""
        if self._held_out is None:
            cached = self._read_cache().get("held_out")
            self._held_out = cached if cached is not None else self._pilot()
        return self._held_out

    @property
    def held_out_rows(self) -> int:
        return self.held_out_choice["rows"]

    def _pilot(self) -> dict:
        """The held-out size: per-row losses of up to :data:`PILOT_ENTRIES` composed entries on every held-out
        row (the first non-trivial option of the shortest segment, at starts evenly spaced over the chain), fed
        to :func:`rows_for_noise`. Deterministic: it depends on the model and the data alone."""
        available = self.eval_inputs.size
        if self._given_rows is not None:
            rows = min(available, max(1, int(self._given_rows)))
            return {"rows": rows, "of": available, "reason": f"{rows} of {available}: given"}
        if available <= MIN_HELD_OUT_ROWS:
            return {"rows": available, "of": available,
                    "reason": f"all {available}: no more than the minimum {MIN_HELD_OUT_ROWS}"}
        starts = sorted({s.start for s in self.analysis.segments})
        picks = []
        for index in range(min(PILOT_ENTRIES, len(starts))):
            start = starts[round(index * (len(starts) - 1) / max(1, PILOT_ENTRIES - 1))]
            choice = next((SegmentChoice(start, s.end, o)
                           for s in sorted((s for s in self.analysis.segments if s.start == start), key=lambda s: s.end)
                           for o in s.options if not SegmentChoice(start, s.end, o).is_trivial), None)
            if choice is not None and choice not in picks:
                picks.append(choice)
        losses = []
        for choice in picks:
            values = self._prefix(frontier(self.model, self.analysis.positions[choice.start].tensor),
                                  self.eval_inputs)
            params = merged_conv(self.analysis, self._graph, choice.start, choice.end, choice.option.kept)
            candidate = apply_segments(suffix_model(self.model, values), self.analysis, [choice],
                                       overrides={(choice.start, choice.end): params})
            losses.append(row_losses(self.reference, self._run(candidate, values), self.labels))
        rows, reason = rows_for_noise(losses, available)
        return {"rows": rows, "of": available, "reason": reason}

    def _scored_reference(self) -> tuple[list[np.ndarray], np.ndarray | None]:
        """The original's outputs and the labels on the scored (first :attr:`held_out_rows`) held-out rows."""
        rows, available = self.held_out_rows, self.eval_inputs.size
        reference = [r[:rows] if r.ndim and r.shape[0] == available else r for r in self.reference]
        return reference, None if self.labels is None else np.asarray(self.labels)[:rows]

    # -- activations --------------------------------------------------------------------------------------

    def target_tensor(self, start: int, end: int) -> str:
        """The tensor segment (start, end] must reproduce: the residual Add's output when the segment absorbs the
        skip ending at ``end``, else conv ``end``'s output. :func:`apply_segments` makes the merged conv produce
        this very name, so it names the same value in the original and in any student."""
        absorbed = next((s for s in self.analysis.skips if s.target == end and s.source >= start), None)
        if absorbed is not None:
            node = next(n for n in self.model.graph.node if n.name == absorbed.add_node)
            return node.output[0]
        return next(n for n in self.model.graph.node if n.name == self.analysis.convs[end].node).output[0]

    def fit_images(self, start: int) -> int:
        """Fit images the refits of segments starting at ``start`` read: enough for :data:`MAX_REFIT_ROWS` rows
        at the smallest output map of any segment starting there (so the same for every subset of ends, and
        the final build's refit sees the same activations as the table's), at least 1, at most all."""
        pixels = [int(np.prod(self.analysis.convs[s.end].output_shape[2:])) for s in self.analysis.segments
                  if s.start == start]
        need = max((math.ceil(MAX_REFIT_ROWS / max(1, p)) for p in pixels), default=1)
        return min(self.fit_inputs.size, max(1, need))

    def refit_images(self, start: int, end: int, option: KernelOption) -> int:
        """Fit images the sequential refit of one chosen segment reads: enough for :data:`ROWS_PER_UNKNOWN` rows
        per unknown of its merged conv (at least :data:`MIN_REFIT_ROWS`, at most :data:`MAX_REFIT_ROWS`) at its
        output map, and never more than :meth:`fit_images` (what the table's refit read)."""
        unknowns = _unknowns(option.in_channels, option.groups, option.kernel)  # those of its merged conv
        rows = min(MAX_REFIT_ROWS, max(MIN_REFIT_ROWS, ROWS_PER_UNKNOWN * unknowns))
        pixels = int(np.prod(self.analysis.convs[end].output_shape[2:]))
        return min(self.fit_images(start), max(1, math.ceil(rows / max(1, pixels))))

    def held_out_frontier(self, start: int) -> dict[str, np.ndarray]:
        """The original's values on the scored held-out rows of every tensor the network after ``start`` reads
        (from the graph inputs; :meth:`table` walks them instead)."""
        needed = frontier(self.model, self.analysis.positions[start].tensor)
        return self._prefix(needed, self.eval_inputs.rows(slice(0, self.held_out_rows)))

    def fit_activations(self, start: int, ends: list[int]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """(segment input, {end: segment target}) on the first :meth:`fit_images` fit inputs, from the graph
        inputs (what the final build's refit reads; :meth:`table` walks them instead)."""
        position = self.analysis.positions[start].tensor
        targets = {end: self.target_tensor(start, end) for end in ends}
        names = list(dict.fromkeys([position, *targets.values()]))
        values = self._prefix(names, self.fit_inputs.rows(slice(0, self.fit_images(start))))
        return values[position], {end: values[target] for end, target in targets.items()}

    def activations(self, start: int, ends: list[int]) -> tuple[dict, dict, dict]:
        """(frontier values on held-out inputs, segment input on fit inputs, segment targets on fit inputs)."""
        inputs, targets = self.fit_activations(start, ends)
        return self.held_out_frontier(start), {self.analysis.positions[start].tensor: inputs}, targets

    def _tensor_types(self) -> dict[str, onnx.ValueInfoProto]:
        if self._types is None:
            inferred = run_shape_inference(self.model)
            self._types = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.input)
                           + list(inferred.graph.output)}
        return self._types

    def _prefix(self, names: list[str], data: Dataset) -> dict[str, np.ndarray]:
        """``names`` on ``data`` from the graph inputs, running only the nodes they need."""
        model = span_model(self.model, dict(data.arrays), names, self._tensor_types())
        if model is None:  # not reachable from the graph inputs alone (cannot happen for a valid model)
            raise ValueError(f"tensors {names} are not computable from the graph inputs")
        return self._collect(model, data, names)

    def _step(self, values: dict[str, np.ndarray], rows: int, names: list[str]) -> dict[str, np.ndarray] | None:
        """``names`` on the first ``rows`` rows from ``values`` (the frontier of an earlier start), running only
        the graph between them; None when they are not computable from it."""
        inputs = {name: value[:rows] for name, value in values.items()}
        wanted = [name for name in names if name not in inputs]
        result = {}
        if wanted:
            model = span_model(self.model, inputs, wanted, self._tensor_types())
            if model is None:
                return None
            result = self._collect(model, Dataset.of(inputs), wanted)
        return {name: result[name] if name in result else inputs[name] for name in names}

    def score(self, choice: SegmentChoice, frontier_values: dict, params: ConvParams | None = None,
              suffix: onnx.ModelProto | None = None) -> tuple[float, float | None]:
        """Fidelity of the network with ``choice`` merged, run from ``frontier_values`` on. ``suffix`` is the
        original after ``choice.start`` (:func:`suffix_model` of the same frontier; cut here when not given):
        every entry of a start merges into that one cut instead of copying and cutting the whole network per
        entry — the segment's nodes, its input tensor and everything after it are all in the suffix, so the
        result is the same graph."""
        suffix = suffix if suffix is not None else suffix_model(self.model, frontier_values)
        overrides = {(choice.start, choice.end): params} if params is not None else None
        candidate = apply_segments(suffix, self.analysis, [choice], overrides=overrides)
        reference, labels = self._scored_reference()
        return fidelity(reference, self._run(candidate, frontier_values), labels)

    def _session(self, model: onnx.ModelProto):
        with self._lock:
            self.sessions += 1
        return make_session(model, threads=self.threads)

    def _run(self, model: onnx.ModelProto, feeds: Dataset | dict[str, np.ndarray]) -> list[np.ndarray]:
        # Suffix models declare a symbolic batch; the original's export batch rule applies to all of them.
        return run_batched(self._session(model), feeds, self.model)

    def _collect(self, model: onnx.ModelProto, data: Dataset, names: list[str]) -> dict[str, np.ndarray]:
        """``names`` over every row of ``data``, batch by batch into one preallocated array each (no list of
        batches concatenated at the end). A value without the batch as dim 0 (a shape) is the first batch's."""
        session = self._session(model)
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

    # -- the table ----------------------------------------------------------------------------------------

    def table(self, entries: list[tuple[int, int, KernelOption]], jobs: int = 1, use_refit: bool = True,
              progress: Callable[[int, int, int], object] | None = None) -> dict[tuple[int, int, str], ImportanceEntry]:
        """Score ``entries`` (callers leave out those :func:`dominated_entries` finds useless), one start at a
        time in increasing order (:meth:`_score_start`), ``jobs`` threads working on it.

        Entries found in the cache are not scored again; the cache file is rewritten after every start that
        scored something. ``progress(done, total, cached)`` is called once per entry as it is settled (read
        from the cache or scored): ``done`` entries of ``total`` in this call so far, ``cached`` of them read
        from the cache."""
        by_start: dict[int, list[tuple[int, KernelOption]]] = {}
        for start, end, option in entries:
            by_start.setdefault(start, []).append((end, option))
        mode = "refit" if use_refit else "composed"
        stored = self._cached_entries(mode)
        results: dict[tuple[int, int, str], ImportanceEntry] = {}
        total, done, cached = len(entries), 0, 0
        held_out = _Walk(self, self.eval_inputs.rows(slice(0, self.held_out_rows)))
        fit = _Walk(self, self.fit_inputs)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for start, group in sorted(by_start.items()):
                missing = [(end, option) for end, option in group if (start, end, option_key(option)) not in stored]
                for end, option in group:
                    key = (start, end, option_key(option))
                    if key in stored:
                        results[key] = stored[key]
                        self.cache_hits += 1
                        done, cached = done + 1, cached + 1
                        if progress is not None:
                            progress(done, total, cached)
                if not missing:
                    continue
                self.cache_misses += len(missing)
                for entry in self._score_start(start, missing, pool, use_refit, held_out, fit):
                    key = (entry.start, entry.end, entry.option)
                    results[key] = stored[key] = entry
                    done += 1
                    if progress is not None:
                        progress(done, total, cached)
                self._write_cache(mode, stored)
        return {(start, end, option_key(option)): results[(start, end, option_key(option))]
                for start, group in sorted(by_start.items()) for end, option in group}

    def _score_start(self, start: int, group: list[tuple[int, KernelOption]], pool: ThreadPoolExecutor,
                     use_refit: bool, held_out: _Walk | None = None, fit: _Walk | None = None
                     ) -> list[ImportanceEntry]:
        """The entries starting at ``start``, in ``group`` order: the held-out frontier once (stepped from the
        last start's by ``held_out``); each entry's merged conv composed once and scored; the refits of the
        entries small enough to refit solved together (fit activations once, one Gram per geometry); then the
        refits scored. What it holds is freed on return."""
        if all(SegmentChoice(start, end, option).is_trivial for end, option in group):
            return [ImportanceEntry(start, end, option_key(option), 0.0, 1.0, "original") for end, option in group]
        frontier_values = (held_out.at(start, held_out.data.size) if held_out is not None
                           else self.held_out_frontier(start))
        refittable: dict[tuple[int, str], ConvParams] = {}
        suffix = suffix_model(self.model, frontier_values)  # cut once per start, shared by its entries

        def composed(item: tuple[int, KernelOption]) -> ImportanceEntry:
            end, option = item
            choice = SegmentChoice(start, end, option)
            if choice.is_trivial:
                return ImportanceEntry(start, end, option_key(option), 0.0, 1.0, "original")
            params = merged_conv(self.analysis, self._graph, start, end, option.kept)
            if use_refit and params.rank == 2 and refit_unknowns(params) <= MAX_REFIT_UNKNOWNS:
                refittable[(end, option_key(option))] = params
            score, agreement = self.score(choice, frontier_values, params, suffix)
            return ImportanceEntry(start, end, option_key(option), score, agreement, "composed")

        scored = {(entry.end, entry.option): entry for entry in pool.map(composed, group)}
        fitted = self._refits(start, refittable, pool, fit)
        options = {(end, option_key(option)): option for end, option in group}

        def refitted(key: tuple[int, str]) -> ImportanceEntry:
            score, agreement = self.score(SegmentChoice(start, key[0], options[key]), frontier_values, fitted[key],
                                          suffix)
            if score > scored[key].score:
                return ImportanceEntry(start, key[0], key[1], score, agreement, "refit")
            return scored[key]

        for entry in pool.map(refitted, list(fitted)):
            scored[(entry.end, entry.option)] = entry
        return [scored[(end, option_key(option))] for end, option in group]

    def _walked_fit_activations(self, start: int, ends: list[int], fit: _Walk
                                ) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """:meth:`fit_activations` from the fit frontier walked to ``start``: only the segments' span is run."""
        values = fit.at(start, self.fit_images(start))
        position = self.analysis.positions[start].tensor
        targets = {end: self.target_tensor(start, end) for end in ends}
        names = list(dict.fromkeys([position, *targets.values()]))
        found = self._step(values, fit.rows, names)
        if found is None:
            return self.fit_activations(start, ends)
        return found[position], {end: found[target] for end, target in targets.items()}

    def _refits(self, start: int, composed: dict[tuple[int, str], ConvParams],
                pool: ThreadPoolExecutor, fit: _Walk | None = None) -> dict[tuple[int, str], ConvParams]:
        """Ridge refits of merged convs starting at ``start``, keyed (end, option key): the fit activations once,
        one Gram per geometry."""
        if not composed:
            return {}
        ends = sorted({end for end, _ in composed})
        inputs, targets = (self._walked_fit_activations(start, ends, fit) if fit is not None
                           else self.fit_activations(start, ends))
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

    # -- the on-disk cache --------------------------------------------------------------------------------

    @property
    def cache_key(self) -> str:
        """sha256 of everything a score depends on: the model (its canonical serialisation, weights included),
        the analysis' segments and options, the fit and held-out arrays and labels, the refit constants, the
        held-out rule (or the given size) and :data:`CACHE_FORMAT`. Whether refits are tried is kept apart
        inside the file."""
        if self._key is None:
            digest = hashlib.sha256()

            def add(*parts) -> None:
                for part in parts:
                    data = part if isinstance(part, (bytes, memoryview)) else repr(part).encode()
                    digest.update(len(data).to_bytes(8, "little"))
                    digest.update(data)

            add(CACHE_FORMAT, self.model.SerializeToString(deterministic=True))
            add([(s.start, s.end, s.options) for s in self.analysis.segments],
                [(p.index, p.tensor, p.activation) for p in self.analysis.positions])
            for name, data in (("fit", self.fit_inputs), ("held_out", self.eval_inputs)):
                for array_name in sorted(data.arrays):
                    array = np.ascontiguousarray(data.arrays[array_name])
                    add(name, array_name, array.dtype.str, array.shape, memoryview(array).cast("B"))
            labels = None if self.labels is None else np.ascontiguousarray(self.labels)
            add("labels", None if labels is None else (labels.dtype.str, labels.shape, labels.tobytes()))
            add(MAX_REFIT_ROWS, MAX_REFIT_UNKNOWNS, RIDGE, self._given_rows, HELD_OUT_RSE, MIN_HELD_OUT_ROWS,
                PILOT_ENTRIES)
            self._key = digest.hexdigest()
        return self._key

    @property
    def cache_path(self) -> Path:
        return self.cache_dir / f"{self.cache_key}.json"

    def _read_cache(self) -> dict:
        """The cache file's content, or {} when caching is off or the file is missing, unreadable or not of
        this format (a damaged file is recomputed and replaced, never an error)."""
        if not self.use_cache:
            return {}
        try:
            content = json.loads(self.cache_path.read_text())
            if not isinstance(content, dict) or content.get("format") != CACHE_FORMAT:
                return {}
            held_out = content.get("held_out")
            if not (isinstance(held_out, dict) and isinstance(held_out.get("rows"), int)
                    and 0 < held_out["rows"] <= self.eval_inputs.size and held_out.get("of") == self.eval_inputs.size
                    and isinstance(held_out.get("reason"), str)):
                return {}
            return content
        except (OSError, ValueError, TypeError):
            return {}

    def _cached_entries(self, mode: str) -> dict[tuple[int, int, str], ImportanceEntry]:
        content = self._read_cache()
        if content.get("held_out") != self.held_out_choice:
            return {}  # scored on other rows
        try:
            return {(entry.start, entry.end, entry.option): entry
                    for entry in (ImportanceEntry(int(start), int(end), str(option), float(score),
                                                  None if agreement is None else float(agreement), str(method))
                                  for start, end, option, score, agreement, method in content["tables"][mode])}
        except (KeyError, TypeError, ValueError):
            return {}

    def _write_cache(self, mode: str, entries: Mapping[tuple[int, int, str], ImportanceEntry]) -> None:
        """Rewrite the cache file atomically with ``entries`` for ``mode`` (the other mode's kept as read)."""
        if not self.use_cache:
            return
        content = self._read_cache()
        tables = content.get("tables") if isinstance(content.get("tables"), dict) else {}
        if content.get("held_out") != self.held_out_choice:
            tables = {}
        tables[mode] = [[e.start, e.end, e.option, e.score, e.agreement, e.method]
                        for _, e in sorted(entries.items())]
        document = {"format": CACHE_FORMAT, "held_out": self.held_out_choice, "tables": tables}
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.cache_path, json.dumps(document).encode())
        except OSError:
            pass  # a cache that cannot be written costs a rescore next time, not this run
