"""``soup``, ``align`` and ``check_compatible``: load -> check -> (align) -> plan -> merge -> verify -> save.

Merging streams one stored tensor at a time: the output starts as the first model's graph without data, and
each slot receives the merge of that slot's tensors, read from disk only when the merge reaches it. A uniform
soup of N models therefore holds about one model plus a few tensors, never N models.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxmerge.errors import BadInputError, VerificationError, first_line
from onnxmerge.io import ModelLike, save_model
from onnxmerge.merging.bn_reset import reset_batchnorm
from onnxmerge.merging.compat import ModelStructure, TensorSlot, check_sources, model_structure
from onnxmerge.merging.data import DataLike, ModelScore, Scorer, load_dataset, make_scorer
from onnxmerge.merging.methods import LINEAR_METHODS, MergeSpec, compute_dtype, merge_tensors
from onnxmerge.merging.rebasin import DEFAULT_MAX_SWEEPS, align_model
from onnxmerge.merging.source import ModelSource, open_source, spill
from onnxmerge.results import AlignResult, SoupResult
from onnxmerge.version import __version__

PROVENANCE_PREFIX = "onnxmerge.soup."
DEFAULT_BATCH_SIZE = 64


def check_compatible(models: Sequence[ModelLike], *, base: ModelLike | None = None) -> dict:
    """Run the layered compatibility check alone; raises IncompatibleModelsError naming the failing level."""
    with ExitStack() as stack:
        sources = _open_inputs(models, base, stack)
        return check_sources(sources).to_dict()


def _open_inputs(models: Sequence[ModelLike], base: ModelLike | None, stack: ExitStack) -> list[ModelSource]:
    inputs = list(models) + ([base] if base is not None else [])
    if len(inputs) < 2:
        raise BadInputError("merging needs at least two models")
    return [open_source(model, stack, index) for index, model in enumerate(inputs)]


def _refuse_overwriting_inputs(output: str | os.PathLike, inputs: list, force: bool) -> None:
    target = Path(output).resolve()
    for model in inputs:
        if isinstance(model, (str, os.PathLike)) and Path(model).resolve() == target and not force:
            raise BadInputError(f"refusing to overwrite the input model {output}; pass --force (force=True) "
                                "to allow it")


def soup(
    models: Sequence[ModelLike],
    output: str | os.PathLike | None = None,
    *,
    method: str = "uniform",
    weights: Sequence[float] | None = None,
    base: ModelLike | None = None,
    scale: float = 1.0,
    density: float | None = None,
    seed: int = 0,
    eval_data: DataLike | None = None,
    metric: str | ModelScore = "accuracy",
    reset_bn: DataLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    align: bool = False,
    force: bool = False,
    external_data: bool | None = None,
) -> SoupResult:
    """Merge the weights of structurally identical models into one model of the same graph.

    ``eval_data``/``metric`` score every input and the result (greedy soup ranks and accepts candidates by
    it); a callable metric receives a candidate ModelProto and returns a score where higher is better.
    ``reset_bn`` recomputes BatchNormalization statistics from calibration data. ``align`` permutes every
    model onto the first before merging (for independently trained models). Nothing is written unless every
    check passes: BadInputError for unusable inputs, VerificationError for a result that fails its checks.
    """
    models = list(models)
    spec = MergeSpec.make(method, len(models), weights=weights, scale=scale, density=density, seed=seed,
                          has_base=base is not None)
    if batch_size < 1:
        raise BadInputError(f"batch size must be >= 1 (got {batch_size})")
    if align and base is not None:
        raise BadInputError("--align is for independently trained models; task-arithmetic/ties/dare merge "
                            "fine-tunes of one base, which share their units already")
    if output is not None:
        _refuse_overwriting_inputs(output, models + [base], force)
    with ExitStack() as stack:
        everything = _open_inputs(models, base, stack)
        compatibility = check_sources(everything)
        sources, base_source = everything[:len(models)], everything[len(models)] if base is not None else None
        structures = compatibility.structures
        result = SoupResult(method=spec.method, parameters=spec.parameters(), seed=spec.seed,
                            inputs=[s.provenance() for s in sources],
                            base=base_source.provenance() if base_source else None,
                            compatibility=compatibility.to_dict(), warnings=list(compatibility.warnings))
        if align:
            sources, result.alignment = _align_inputs(sources, stack, seed)
            structures = [model_structure(s.proto) for s in sources]
        template = sources[0].proto
        scorer = None
        if eval_data is not None or callable(metric) or spec.method == "greedy":
            scorer = make_scorer(metric, eval_data, template, batch_size)
        calibration = (load_dataset(reset_bn, template, what="--reset-bn", need_labels=False)
                       if reset_bn is not None else None)
        merger = _Merger(spec, sources, structures[:len(models)], base_source,
                         structures[len(models)] if base_source else None, calibration, batch_size)
        if scorer is not None:
            result.scores = {"metric": scorer.name, "higher_is_better": scorer.higher_is_better,
                             "models": [{"model": s.label, "score": _score(scorer, s.materialize())}
                                        for s in sources]}
        selected = list(range(len(sources)))
        if spec.method == "greedy":
            selected, result.greedy = _greedy(merger, scorer, [m["score"] for m in result.scores["models"]],
                                              [s.label for s in sources])
            result.scores["uniform_soup"] = _score(scorer, merger.build(list(range(len(sources))))[0])
        merged, tensor_counts, bn_report = merger.build(selected)
        result.tensors = tensor_counts
        if bn_report is not None:
            result.bn_reset = bn_report
            if "warning" in bn_report:
                result.warnings.append(bn_report["warning"])
        _check_bn_variance(merged)
        _write_provenance(merged, spec, everything[:len(models)], base_source, result, selected, align, calibration)
        if scorer is not None:
            result.scores["soup"] = _score(scorer, merged)
        if output is None:
            result.model = merged
            return result
        written = _save(merged, output, everything, external_data)
    result.model, result.output = written, str(written)
    return result


def _save(model: onnx.ModelProto, output, sources: list, external_data: bool | None):
    """Save like the inputs were stored: external data when any input used it (or when asked)."""
    if external_data is None:
        external_data = True if any(source.had_external_data for source in sources) else None
    return save_model(model, output, external_data=external_data)


def _score(scorer: Scorer, model: onnx.ModelProto) -> float:
    try:
        return float(scorer.score(model))
    except BadInputError:
        raise
    except Exception as exc:  # ORT and user metrics raise their own types
        raise BadInputError(f"scoring with metric '{scorer.name}' failed: {first_line(exc)}") from None


def _greedy(merger: "_Merger", scorer: Scorer, scores: list[float], labels: list[str]) -> tuple[list[int], dict]:
    """Greedy soup: best model first; each next candidate stays only if the uniform soup's score improves."""
    order = sorted(range(len(scores)), key=lambda i: scorer.ranking_key(scores[i]))
    selected, best = [order[0]], scores[order[0]]
    steps = [{"index": order[0], "model": labels[order[0]], "soup_score": best, "kept": True}]
    for candidate in order[1:]:
        value = _score(scorer, merger.build(selected + [candidate])[0])
        kept = scorer.better(value, best)
        if kept:
            selected.append(candidate)
            best = value
        steps.append({"index": candidate, "model": labels[candidate], "soup_score": value, "kept": kept})
    return sorted(selected), {"steps": steps, "kept": [labels[i] for i in sorted(selected)], "score": best}


class _Merger:
    """Builds the merged model of any subset of the inputs, slot by slot."""

    def __init__(self, spec: MergeSpec, sources: list[ModelSource], structures: list[ModelStructure],
                 base: ModelSource | None, base_structure: ModelStructure | None, calibration, batch_size: int):
        self.spec, self.sources, self.structures = spec, sources, structures
        self.base, self.base_structure = base, base_structure
        self.calibration, self.batch_size = calibration, batch_size

    def build(self, selected: list[int]) -> tuple[onnx.ModelProto, dict, dict | None]:
        """The merged model; every stored tensor is written once (protobuf keeps replaced bytes allocated)."""
        reference = self.sources[0]
        merged = onnx.ModelProto()
        merged.CopyFrom(reference.proto)
        out_structure = model_structure(merged)
        for target, tensor in zip(out_structure.unused, self.structures[0].unused):
            target.CopyFrom(numpy_helper.from_array(reference.read(tensor), target.name))
        counts = Counter()
        for index, slot in enumerate(self.structures[0].slots):
            target = out_structure.slots[index].tensor
            if slot.role in ("integer", "shape"):
                counts["copied"] += 1  # checked bit-identical in every input
                target.CopyFrom(numpy_helper.from_array(reference.read(slot.tensor), target.name))
                continue
            tracked = _Tracked(self.sources[i].read(self.structures[i].slots[index].tensor) for i in selected)
            base = self.base.read(self.base_structure.slots[index].tensor) if self.base else None
            dtype = onnx.helper.tensor_dtype_to_np_dtype(slot.tensor.data_type)
            work = compute_dtype(dtype)
            value = merge_tensors(self.spec, (t.astype(work, copy=False) for t in tracked),
                                  None if base is None else base.astype(work, copy=False), index, selected,
                                  statistics=slot.role == "bn_stats")
            if tracked.identical and (base is None or np.array_equal(tracked.first, base)):
                value = tracked.first  # copies of one tensor merge to it bit-exactly
                counts["identical"] += 1
            else:
                with np.errstate(over="ignore"):  # overflow is reported by _check_finite, with the tensor's name
                    value = value.astype(dtype)
                counts["merged"] += 1
            _check_finite(value, slot)
            target.CopyFrom(numpy_helper.from_array(value, target.name))
        bn_report = None
        if self.calibration is not None and len(selected) == 1 and self.spec.method in LINEAR_METHODS:
            bn_report = {"batchnorm_nodes": 0, "skipped": "a soup of one model is that model; its own statistics "
                                                          "match its weights"}
        elif self.calibration is not None:
            bn_report = reset_batchnorm(merged, self.calibration, self.batch_size)
        return merged, dict(counts), bn_report


class _Tracked:
    """Passes the inputs' tensors through while noting whether all equal the first."""

    def __init__(self, tensors: Iterator[np.ndarray]):
        self.tensors, self.first, self.identical = tensors, None, True

    def __iter__(self) -> Iterator[np.ndarray]:
        for tensor in self.tensors:
            if self.first is None:
                self.first = tensor
            elif self.identical:
                self.identical = np.array_equal(self.first, tensor)
            yield tensor


def _check_finite(value: np.ndarray, slot: TensorSlot) -> None:
    bad = np.size(value) - np.count_nonzero(np.isfinite(value))
    if bad:
        raise VerificationError(f"the merged tensor {slot.describe()} has {bad} NaN/Inf value(s) in "
                                f"{value.dtype} (an input holds them, or the result overflows); nothing was written")


def _check_bn_variance(model: onnx.ModelProto) -> None:
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and node.input[4] in initializers:
            variance = numpy_helper.to_array(initializers[node.input[4]])
            if variance.min(initial=0) < 0:
                raise VerificationError(f"BatchNormalization '{node.name}' has a negative running variance after "
                                        "merging; pass --reset-bn with calibration data or use a smaller --scale")


def _align_inputs(sources: list[ModelSource], stack: ExitStack, seed: int) -> tuple[list[ModelSource], list[dict]]:
    """Permute every input onto the first; the aligned graphs are spilled so that merging still streams."""
    reference = sources[0].materialize()
    reference_structure = model_structure(reference)
    aligned_sources, reports = [sources[0]], []
    for source in sources[1:]:
        full = source.materialize()
        aligned, info = align_model(reference_structure, reference, model_structure(full), full, seed=seed)
        del full
        data_dir, aligned = spill(aligned, stack)
        aligned_sources.append(ModelSource(proto=aligned, label=source.label, path=source.path, data_dir=data_dir,
                                           had_external_data=source.had_external_data, hashes=source.hashes))
        reports.append({"model": source.label, **info})
    return aligned_sources, reports


def _write_provenance(model: onnx.ModelProto, spec: MergeSpec, sources: list[ModelSource], base: ModelSource | None,
                      result: SoupResult, selected: list[int], aligned: bool, calibration) -> None:
    parameters = dict(spec.parameters())
    if spec.method == "greedy":
        parameters["metric"] = result.scores["metric"]
        parameters["selected"] = [sources[i].label for i in selected]
    if aligned:
        parameters["aligned_to"] = sources[0].label
    if calibration is not None:
        parameters["reset_bn"] = {"data": calibration.origin, "samples": len(calibration)}
    entries = {"onnxmerge.version": __version__, f"{PROVENANCE_PREFIX}method": spec.method,
               f"{PROVENANCE_PREFIX}parameters": json.dumps(parameters),
               f"{PROVENANCE_PREFIX}seed": str(spec.seed),
               f"{PROVENANCE_PREFIX}inputs": json.dumps([s.provenance() for s in sources])}
    if base is not None:
        entries[f"{PROVENANCE_PREFIX}base"] = json.dumps(base.provenance())
    _set_metadata(model, entries)


def _set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in entries
            and not p.key.startswith(PROVENANCE_PREFIX)]
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, dict(kept) | entries)


def align(
    reference: ModelLike,
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    max_sweeps: int = DEFAULT_MAX_SWEEPS,
    check_n: int = 3,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    force: bool = False,
    external_data: bool | None = None,
) -> AlignResult:
    """Permute ``model``'s hidden units to match ``reference`` (Git Re-Basin weight matching).

    The result computes exactly what ``model`` computes (checked in ORT on ``check_n`` seeded inputs;
    VerificationError otherwise, nothing written); only the order of its hidden units changes, so that
    averaging it with ``reference`` averages matching units.
    """
    if output is not None:
        _refuse_overwriting_inputs(output, [reference, model], force)
    with ExitStack() as stack:
        sources = _open_inputs([reference, model], None, stack)
        compatibility = check_sources(sources)
        reference_full, model_full = sources[0].materialize(), sources[1].materialize()
        aligned, alignment = align_model(model_structure(reference_full), reference_full,
                                         model_structure(model_full), model_full, seed=seed, max_sweeps=max_sweeps,
                                         check_n=check_n, input_shapes=input_shapes)
        result = AlignResult.from_alignment(
            alignment, input=None if sources[1].path is None else str(sources[1].path),
            reference=sources[0].provenance(), model_info=sources[1].provenance(), seed=seed,
            compatibility=compatibility.to_dict())
        _set_metadata(aligned, {"onnxmerge.version": __version__,
                                "onnxmerge.align": json.dumps({"reference": sources[0].provenance(),
                                                               "model": sources[1].provenance(), "seed": seed})})
        if output is None:
            result.model = aligned
            return result
        written = _save(aligned, output, sources, external_data)
    result.model, result.output = written, str(written)
    return result
