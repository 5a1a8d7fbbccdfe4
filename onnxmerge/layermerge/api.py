"""``onnxmerge.compress``: LayerMerge depth compression of an exported CNN, measured in ORT.

load → canonicalise (exact fold) → analyse (chain, segments) → tables (latency in ORT, importance on
calibration data) → plan (exact DP under a budget, closed loop on measured latency) → merge → recover
(distillation in torch) → verify → save.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxmerge.activations import Activation
from onnxmerge.layermerge.build import SegmentChoice, apply_segments, dominant_activation
from onnxmerge.layermerge.dp import Plan, join_tables, minimum_latency, solve
from onnxmerge.layermerge.importance import ImportanceScorer, fidelity, option_key
from onnxmerge.layermerge.segments import ChainAnalysis, KernelOption, analyse_chain
from onnxmerge.errors import BadInputError, first_line
from onnxmerge.io import ModelLike, load_model, save_model
from onnxmerge.latency_table import ConvSignature, measure
from onnxmerge.profiler import compare, profile
from onnxmerge.report import write_json
from onnxmerge.results import CompressResult
from onnxmerge.stats import model_stats
from onnxmerge.dataset import Dataset, load_dataset, run_batched
from onnxmerge.runner import input_specs, make_session, parse_input_shapes

MAX_ROUNDS = 3
SPEEDUP_TOLERANCE = 0.98  # a measured speed-up within 2% of the target counts as reached


HELD_OUT_FRACTION = 0.25


@dataclass(frozen=True)
class Calibration:
    """Calibration data split into a part to fit/train on and a held-out part to score on (file order kept)."""

    fit: Dataset
    held_out: Dataset

    @property
    def labels(self) -> np.ndarray | None:
        """Labels of the held-out part (None when the file has none)."""
        return self.held_out.labels

    @property
    def size(self) -> int:
        return self.fit.size + self.held_out.size


def load_calibration(path: str | Path, model: onnx.ModelProto,
                     held_out_fraction: float = HELD_OUT_FRACTION) -> Calibration:
    """Read ``.npz`` calibration data (one N×... array per model input, optional ``labels``), check it against
    ``model`` and hold out its last rows (:mod:`onnxmerge.dataset` has the rules)."""
    fit, held_out = load_dataset(path, model, what="calibration").split(held_out_fraction)
    return Calibration(fit, held_out)


def _signature(option: KernelOption, activation: Activation | None, batch: int) -> ConvSignature:
    return ConvSignature(in_channels=option.in_channels, out_channels=option.out_channels, kernel=option.kernel,
                         input_hw=option.input_hw, stride=option.stride,
                         groups=option.out_channels if option.depthwise else 1, padding="same",
                         activation=activation, batch=batch)


def _end_activation(analysis: ChainAnalysis, end: int, option: KernelOption) -> Activation | None:
    """The activation after the segment's merged conv, with its parameters: the position's own, or the one
    apply_segments adds where a merged segment ends at a linear position."""
    activation = analysis.positions[end].activation_value
    if activation is not None or len(option.kept) < 2:
        return activation
    dominant = dominant_activation(analysis)
    return None if dominant is None else dominant.fitted(option.out_channels)


class _PhaseClock:
    """Wall time per pipeline phase, for the report."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now


@dataclass
class CompressionProblem:
    """Everything the DP needs for one model on one target: measured once, solved at any budget."""

    canonical: onnx.ModelProto
    analysis: ChainAnalysis
    shapes: dict[str, tuple[int, ...]]
    calibration: Calibration
    options: dict[tuple[int, int, str], KernelOption]
    scorer: ImportanceScorer
    original_ms: float
    provider: str
    threads: int
    runs: int
    latency: dict[tuple[int, int, str], float] = field(default_factory=dict)
    importance: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return max(s.end for s in self.analysis.segments)

    @property
    def table_original_ms(self) -> float:
        """The table's latency of the unchanged network (every segment a single kept conv)."""
        return sum(self.latency[key] for key, option in self.options.items()
                   if key[1] - key[0] == 1 and option.kept == (key[1],))

    def measure_tables(self, jobs: int = 1, clock: _PhaseClock | None = None) -> None:
        batch = next(iter(self.shapes.values()))[0]
        signatures = {key: _signature(option, _end_activation(self.analysis, key[1], option), batch)
                      for key, option in self.options.items()}
        table = measure(set(signatures.values()), provider=self.provider, threads=self.threads, runs=self.runs)
        self.latency = {key: table[signature].median_ms for key, signature in signatures.items()}
        if clock:
            clock("latency_table")
        self.importance = self.scorer.table([(s, e, self.options[(s, e, k)]) for (s, e, k) in self.options],
                                            jobs=jobs)
        if clock:
            clock("importance_table")

    def build(self, plan: Plan, refit: set[tuple[int, int]]) -> onnx.ModelProto:
        return _build(self.canonical, self.analysis, plan, self.options, refit, self.scorer)

    def solve_for(self, target_ms: float) -> tuple[Plan, set[tuple[int, int]], onnx.ModelProto, list[dict]]:
        """The DP under the budget for ``target_ms``, re-solved with a tighter budget while ORT says it missed."""
        choices = join_tables(self.latency, {key: entry.score for key, entry in self.importance.items()})
        refit = {(s, e) for (s, e, _), entry in self.importance.items() if entry.method == "refit"}
        budget = _table_budget(target_ms, self.original_ms, self.table_original_ms)
        fastest = minimum_latency(choices, self.length)
        if budget < fastest:
            reachable = self.original_ms * fastest / self.table_original_ms
            raise BadInputError(f"the latency target {target_ms:.3f} ms is below the fastest possible plan "
                                f"(about {reachable:.3f} ms end to end, a {self.original_ms / reachable:.2f}x "
                                "speed-up)")
        wanted = self.original_ms / target_ms
        rounds = []
        for _ in range(MAX_ROUNDS):
            plan = solve(choices, self.length, max(budget, fastest))
            chosen_refit = {(c.start, c.end) for c in plan.choices} & refit
            student = self.build(plan, chosen_refit)
            measured = self.compare(student)
            reached = measured["speedup"]["median"]
            rounds.append({"budget_ms": budget, "predicted_table_ms": plan.latency_ms,
                           "measured_ms": measured["latency_b"]["median_ms"], "speedup": reached})
            if reached >= wanted * SPEEDUP_TOLERANCE or budget <= fastest:
                break
            budget *= reached / wanted  # the table was optimistic: tighten by the shortfall and solve again
        return plan, chosen_refit, student, rounds

    def compare(self, student: onnx.ModelProto) -> dict:
        return compare(self.canonical, student, provider=self.provider, threads=self.threads, runs=self.runs,
                       input_shapes=self.shapes)


def prepare(model: ModelLike, calibration: str | Path, *, provider: str = "cpu", threads: int = 1,
            input_shapes: list[str] | dict | None = None, runs: int = 30,
            clock: _PhaseClock | None = None) -> tuple[CompressionProblem, Path | None]:
    """Load, canonicalise (the exact, verified fold) and analyse; measure the original end to end."""
    from onnxmerge.api import fold

    clock = clock or _PhaseClock()
    loaded = load_model(model)
    calib = load_calibration(calibration, loaded.proto)
    shapes = _static_shapes(loaded.proto, input_shapes)
    canonical = fold(loaded.proto, input_shapes=shapes).proto
    clock("canonicalize")
    analysis = analyse_chain(canonical, shapes)
    clock("analyse")
    original_ms = profile(canonical, provider=provider, threads=threads, runs=runs,
                          input_shapes=shapes)["latency"]["median_ms"]
    problem = CompressionProblem(
        canonical=canonical, analysis=analysis, shapes=shapes, calibration=calib,
        options={(s.start, s.end, option_key(o)): o for s in analysis.segments for o in s.options},
        scorer=ImportanceScorer(canonical, analysis, calib.fit, holdout=calib.held_out, labels=calib.labels,
                                threads=threads),
        original_ms=original_ms, provider=provider, threads=threads, runs=runs)
    return problem, loaded.path


def compress(model: ModelLike, output: str | Path | None = None, *, calibration: str | Path,
             speedup: float | None = None, latency_budget_ms: float | None = None, provider: str = "cpu",
             threads: int = 1, input_shapes: list[str] | dict | None = None, recover_steps: int = 300,
             recover: bool = True, lr: float = 1e-3, plan: str | Path | None = None, jobs: int = 1,
             runs: int = 30, seed: int = 0, force: bool = False, progress: bool = False) -> CompressResult:
    """Compress depth by merging convs across removed activations, under a latency target measured in ORT."""
    if speedup is not None and latency_budget_ms is not None:
        raise BadInputError("give one of speedup= and latency_budget_ms=, not both")
    if speedup is not None and speedup <= 1.0:
        raise BadInputError(f"speedup={speedup} must be > 1")
    plan_path = Path(plan) if plan is not None else None
    reuse = plan_path is not None and plan_path.is_file()
    if speedup is None and latency_budget_ms is None and not reuse:
        raise BadInputError("give speedup= or latency_budget_ms= (or plan= naming an existing plan file)")
    clock = _PhaseClock()
    loaded = load_model(model)  # once: prepare() takes the proto, the statistics read the original from it
    problem, _ = prepare(loaded.proto, calibration, provider=provider, threads=threads, input_shapes=input_shapes,
                         runs=runs, clock=clock)
    target_ms = problem.original_ms / speedup if speedup is not None else latency_budget_ms
    rounds: list[dict] = []
    if reuse:
        chosen, refit = read_plan(plan_path, problem.options)
        student = problem.build(chosen, refit)
    else:
        problem.measure_tables(jobs=jobs, clock=clock)
        chosen, refit, student, rounds = problem.solve_for(target_ms)
        if plan_path is not None:
            write_plan(plan_path, chosen, refit, problem.options)
    clock("plan_and_build")

    trained = None
    if recover:
        from onnxmerge.layermerge.recover import distill

        trained = distill(student, problem.canonical, problem.calibration.fit, steps=recover_steps, lr=lr,
                          seed=seed, progress=progress, threads=threads)
        student = trained.model
    clock("recover")

    result = _report(problem, chosen, student, target_ms, rounds, trained, clock)
    result.input = None if loaded.path is None else str(loaded.path)
    result.before = model_stats(loaded.proto, problem.shapes)
    result.after = model_stats(student, problem.shapes)
    written = save_model(student, output, input_path=loaded.path, force=force) if output is not None else None
    result.output = None if written is None else str(written)
    result.model, result.proto = written or student, student
    return result


def evaluate(problem: CompressionProblem, student: onnx.ModelProto) -> dict:
    """Fidelity of a compressed model to the original on the held-out calibration inputs."""
    calib = problem.calibration
    reference = run_batched(make_session(problem.canonical, threads=problem.threads), calib.held_out,
                            problem.canonical)
    outputs = run_batched(make_session(student, threads=problem.threads), calib.held_out, student)
    score, agreement = fidelity(reference, outputs)
    result = {"score": score, "top1_agreement": agreement,
              "max_abs_error": max(float(np.max(np.abs(a - b))) for a, b in zip(reference, outputs)),
              "mean_abs_error": float(np.mean([np.mean(np.abs(a - b)) for a, b in zip(reference, outputs)]))}
    if calib.labels is not None and reference[0].ndim == 2:
        result["accuracy_original"] = float(np.mean(reference[0].argmax(1) == calib.labels))
        result["accuracy"] = float(np.mean(outputs[0].argmax(1) == calib.labels))
    return result


def _report(problem: CompressionProblem, chosen: Plan, student: onnx.ModelProto, target_ms: float | None,
            rounds: list[dict], trained, clock: _PhaseClock) -> CompressResult:
    """The compress-specific fields, measured here (fidelity, the final interleaved timing); compress() adds
    the core's input/output and statistics. ``verification`` stays None (see CompressResult)."""
    fidelity_report = evaluate(problem, student)
    final = problem.compare(student)
    clock("verify")
    return CompressResult(
        plan=chosen,
        plan_segments=plan_details(chosen, problem.options),
        segments=len(problem.analysis.segments), entries=problem.analysis.entries,
        original_ms=problem.original_ms,
        table_original_ms=problem.table_original_ms if problem.latency else None,
        target_ms=target_ms,
        rounds=rounds,
        reached_target=None if target_ms is None else
        final["speedup"]["median"] >= problem.original_ms / target_ms * SPEEDUP_TOLERANCE,
        measured_speedup=final["speedup"],
        predicted_table_ms=chosen.latency_ms,
        measured_ms=final["latency_b"]["median_ms"],
        fidelity=fidelity_report,
        recovery=None if trained is None else trained.summary(),
        wall_s=clock.seconds,
        bench=final,
    )


def _static_shapes(model: onnx.ModelProto, input_shapes: list[str] | dict | None) -> dict[str, tuple[int, ...]]:
    """The shapes latency is measured at: ``input_shapes``, else the model's own dims with the batch at 1.

    The latency table is shape-specific, so dynamic dims other than the batch must be pinned by the user.
    """
    given = parse_input_shapes(input_shapes) if isinstance(input_shapes, list) else dict(input_shapes or {})
    specs = input_specs(model, given)
    for spec in specs:
        unpinned = [note for note in spec.assumed if not note.startswith(f"{spec.name}[0]")]
        if unpinned:
            raise BadInputError(f"input '{spec.name}' has dynamic dims ({'; '.join(unpinned)}); compression measures "
                                f"latency at static shapes: pass input_shapes= (e.g. {{{spec.name!r}: (1, ...)}})")
    return {spec.name: spec.shape for spec in specs}


def inspect(model: ModelLike, input_shapes: list[str] | dict | None = None):
    """The chain, its segments and kernel options, as tables (``compress --inspect``)."""
    from onnxmerge.api import fold
    from onnxmerge.layermerge.segments import inspect_tables

    proto = load_model(model).proto
    shapes = _static_shapes(proto, input_shapes)
    canonical = fold(proto, input_shapes=shapes).proto
    return inspect_tables(analyse_chain(canonical, shapes))


def _table_budget(target_ms: float, original_ms: float, table_original_ms: float) -> float:
    """Turn an end-to-end target into a budget for the table's part of the network.

    The table covers the chain's convs; adds, pooling and the head take the rest, measured as the gap
    between the end-to-end latency and the table's sum for the original plan. If the table over-counts
    (per-conv sessions pay layout conversions a real chain pays once), the budget is scaled instead.
    """
    uncovered = original_ms - table_original_ms
    if uncovered >= 0:
        return target_ms - uncovered
    return table_original_ms * target_ms / original_ms


def _build(model: onnx.ModelProto, analysis: ChainAnalysis, plan: Plan, options: dict,
           refit: set[tuple[int, int]], scorer: ImportanceScorer) -> onnx.ModelProto:
    choices = [SegmentChoice(c.start, c.end, options[(c.start, c.end, c.option)]) for c in plan.choices]
    overrides = {}
    for choice in choices:
        if (choice.start, choice.end) in refit:
            fitted = scorer.refit_params(choice)
            if fitted is not None:
                overrides[(choice.start, choice.end)] = fitted
    return apply_segments(model, analysis, choices, overrides=overrides)


def plan_details(plan: Plan, options: dict) -> list[dict]:
    """The plan in LayerMerge's terms: kept activations (segment ends) and the convs each segment keeps."""
    return [{"segment": [c.start, c.end], "option": c.option, "activation_kept_at": c.end,
             "kept_convs": list(options[(c.start, c.end, c.option)].kept),
             "kernel": list(options[(c.start, c.end, c.option)].kernel)} for c in plan.choices]


def write_plan(path: Path, plan: Plan, refit: set[tuple[int, int]], options: dict) -> None:
    write_json({"plan": plan.to_dict(), "refit": sorted(map(list, refit)), "segments": plan_details(plan, options)},
               path)


def read_plan(path: Path, options: dict) -> tuple[Plan, set[tuple[int, int]]]:
    """A saved plan, checked against this model's segments (a plan from another model is refused)."""
    try:
        data = json.loads(path.read_text())
        plan = Plan.from_dict(data["plan"])
        refit = {tuple(pair) for pair in data.get("refit", [])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"cannot read plan {path}: {first_line(exc)}") from None
    unknown = [(c.start, c.end, c.option) for c in plan.choices if (c.start, c.end, c.option) not in options]
    if unknown:
        raise BadInputError(f"plan {path} does not fit this model: no segment/option {unknown[0]}")
    return plan, refit
