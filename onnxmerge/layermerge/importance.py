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
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx

from onnxmerge.layermerge.build import SegmentChoice, apply_segments, merged_conv
from onnxmerge.layermerge.segments import ChainAnalysis, KernelOption
from onnxmerge.conv_algebra import ConvParams
from onnxmerge.graph import export_graph, import_graph, run_shape_inference
from onnxmerge.io import clamp_ir_version
from onnxmerge.dataset import Dataset, run_batched
from onnxmerge.runner import make_session

# Ridge refits are solved only when a group's unknowns stay small enough for a dense normal-equation solve.
MAX_REFIT_UNKNOWNS = 2304
MAX_REFIT_ROWS = 20000
RIDGE = 1e-3


def option_key(option: KernelOption) -> str:
    """The join key of an option in both tables (the DP joins on keys, never on row order)."""
    kernel = "x".join(map(str, option.kernel))
    stride = "x".join(map(str, option.stride))
    return f"k{kernel}_s{stride}_{'dw' if option.depthwise else 'dense'}"


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
    if first.ndim == 2 and first.shape[1] > 1:
        agreement = float(np.mean(first.argmax(1) == candidate[0].argmax(1)))
        if labels is not None:
            return float(np.mean(candidate[0].argmax(1) == labels) - np.mean(first.argmax(1) == labels)), agreement
        p = _softmax(first.astype(np.float64))
        q = _softmax(candidate[0].astype(np.float64))
        kl = float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))
        return -kl, agreement
    error = sum(float(np.sum((c.astype(np.float64) - r) ** 2) / max(np.sum(r.astype(np.float64) ** 2), 1e-12))
                for r, c in zip(reference, candidate))
    return -error, None


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

    Returns None when the problem is too large to solve densely or the geometry does not match.
    """
    groups = params.groups
    per_group_in = params.in_channels // groups
    unknowns = per_group_in * int(np.prod(params.kernel_shape)) + 1
    if unknowns > MAX_REFIT_UNKNOWNS or params.rank != 2:
        return None
    patches = _patches(inputs, params)  # [rows, C_in, kh*kw]
    if patches is None or patches.shape[0] != targets.shape[0] * targets.shape[2] * targets.shape[3]:
        return None
    flat_targets = targets.transpose(0, 2, 3, 1).reshape(-1, params.out_channels).astype(np.float64)
    rows = np.random.default_rng(0).permutation(patches.shape[0])[:MAX_REFIT_ROWS]
    patches, flat_targets = patches[rows], flat_targets[rows]
    out_per_group = params.out_channels // groups
    weight = np.zeros_like(params.weight)
    bias = np.zeros(params.out_channels)
    for g in range(groups):
        design = patches[:, g * per_group_in:(g + 1) * per_group_in].reshape(len(rows), -1)
        design = np.concatenate([design, np.ones((len(rows), 1))], axis=1)
        gram = design.T @ design
        gram += RIDGE * np.trace(gram) / gram.shape[0] * np.eye(gram.shape[0])
        outputs = slice(g * out_per_group, (g + 1) * out_per_group)
        solution = np.linalg.solve(gram, design.T @ flat_targets[:, outputs])
        weight[outputs] = solution[:-1].T.reshape(weight[outputs].shape)
        bias[outputs] = solution[-1]
    return ConvParams.make(weight, bias, strides=params.strides, dilations=params.dilations, pads=params.pads,
                           groups=groups)


def _patches(inputs: np.ndarray, params: ConvParams) -> np.ndarray | None:
    """im2col for a 2-D conv: [N*H_out*W_out, C_in, kh*kw] in the conv's own padding and geometry."""
    (top, left), (bottom, right) = params.pads_begin, params.pads_end
    padded = np.pad(inputs.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (sh, sw), (dh, dw) = params.kernel_shape, params.strides, params.dilations
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    if out_h < 1 or out_w < 1:
        return None
    taps = [padded[:, :, a * dh:a * dh + sh * (out_h - 1) + 1:sh, b * dw:b * dw + sw * (out_w - 1) + 1:sw]
            for a in range(kh) for b in range(kw)]
    stacked = np.stack(taps, axis=-1)  # N, C, out_h, out_w, taps
    return stacked.transpose(0, 2, 3, 1, 4).reshape(-1, inputs.shape[1], kh * kw)


class ImportanceScorer:
    """Scores entries against the original, reusing per-start activations (computed once per start)."""

    def __init__(self, model: onnx.ModelProto, analysis: ChainAnalysis, calibration: Dataset | dict[str, np.ndarray],
                 *, holdout: Dataset | dict[str, np.ndarray] | None = None, labels: np.ndarray | None = None,
                 threads: int = 1):
        self.model, self.analysis, self.threads = model, analysis, threads
        self.labels = labels  # of the held-out inputs: score accuracy instead of KL
        self.fit_inputs = calibration
        self.eval_inputs = holdout if holdout is not None else calibration
        self.reference = self._run(model, self.eval_inputs)
        self._graph = import_graph(model)

    def _target_tensor(self, start: int, end: int) -> str:
        absorbed = next((s for s in self.analysis.skips if s.target == end and s.source >= start), None)
        if absorbed is not None:
            node = next(n for n in self.model.graph.node if n.name == absorbed.add_node)
            return node.output[0]
        return next(n for n in self.model.graph.node if n.name == self.analysis.convs[end].node).output[0]

    def activations(self, start: int, ends: list[int]) -> tuple[dict, dict, dict]:
        """(frontier values on held-out inputs, segment input on fit inputs, segment targets on fit inputs)."""
        position = self.analysis.positions[start].tensor
        needed = frontier(self.model, position)
        with_needed = with_outputs(self.model, needed)
        held_out = dict(zip([o.name for o in with_needed.graph.output], self._run(with_needed, self.eval_inputs)))
        targets = [self._target_tensor(start, end) for end in ends]
        with_targets = with_outputs(self.model, [position, *targets])
        fit_values = dict(zip([o.name for o in with_targets.graph.output], self._run(with_targets, self.fit_inputs)))
        return ({name: held_out[name] for name in needed}, {position: fit_values[position]},
                {end: fit_values[target] for end, target in zip(ends, targets)})

    def score(self, choice: SegmentChoice, frontier_values: dict, params: ConvParams | None = None
              ) -> tuple[float, float | None]:
        candidate = apply_segments(self.model, self.analysis, [choice], overrides={(choice.start, choice.end): params}
                                   if params is not None else None)
        return fidelity(self.reference, self._run(suffix_model(candidate, frontier_values), frontier_values),
                        self.labels)

    def _run(self, model: onnx.ModelProto, feeds: Dataset | dict[str, np.ndarray]) -> list[np.ndarray]:
        # Suffix models declare a symbolic batch; the original's export batch rule applies to all of them.
        return run_batched(make_session(model, threads=self.threads), feeds, self.model)

    def table(self, entries: list[tuple[int, int, KernelOption]], jobs: int = 1, use_refit: bool = True,
              progress=None) -> dict[tuple[int, int, str], ImportanceEntry]:
        by_start: dict[int, list[tuple[int, KernelOption]]] = {}
        for start, end, option in entries:
            by_start.setdefault(start, []).append((end, option))
        results: dict[tuple[int, int, str], ImportanceEntry] = {}
        for start, group in sorted(by_start.items()):
            frontier_values, segment_input, targets = self.activations(start, sorted({end for end, _ in group}))
            inputs = next(iter(segment_input.values()))

            def evaluate(item: tuple[int, KernelOption]) -> ImportanceEntry:
                end, option = item
                choice = SegmentChoice(start, end, option)
                if choice.is_trivial:
                    return ImportanceEntry(start, end, option_key(option), 0.0, 1.0, "original")
                score, agreement = self.score(choice, frontier_values)
                method = "composed"
                if use_refit:
                    fitted = refit(merged_conv(self.analysis, self._graph, start, end, option.kept), inputs,
                                   targets[end])
                    if fitted is not None:
                        refit_score, refit_agreement = self.score(choice, frontier_values, fitted)
                        if refit_score > score:
                            score, agreement, method = refit_score, refit_agreement, "refit"
                return ImportanceEntry(start, end, option_key(option), score, agreement, method)

            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                for entry in pool.map(evaluate, group):
                    results[(entry.start, entry.end, entry.option)] = entry
                    if progress is not None:
                        progress()
        return results

    def refit_params(self, choice: SegmentChoice) -> ConvParams | None:
        """The refit conv of one chosen entry (recomputed for the final build rather than kept for all)."""
        _, segment_input, targets = self.activations(choice.start, [choice.end])
        return refit(merged_conv(self.analysis, self._graph, choice.start, choice.end, choice.option.kept),
                     next(iter(segment_input.values())), targets[choice.end])
