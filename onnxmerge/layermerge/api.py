"""``onnxmerge.compress``: LayerMerge depth compression of an exported CNN, measured in ORT.

load → canonicalise (exact fold) → analyse (chain, segments) → tables (latency in ORT, importance on
calibration data) → plan (exact DP under a budget, closed loop on measured latency) → merge → recover
(distillation in torch) → verify → save.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from onnxmerge.activations import Activation
from onnxmerge.layermerge.build import dominant_activation
from onnxmerge.layermerge.dp import Plan, minimum_latency, solve
from onnxmerge.layermerge.importance import (ImportanceScorer, dominated_entries, fidelity, is_classifier,
                                             option_key)
from onnxmerge.layermerge.segments import SEARCH_SPACES, ChainAnalysis, KernelOption, analyse_chain
from onnxmerge.errors import BadInputError, OnnxMergeError, first_line
from onnxmerge.io import ModelLike, load_model, save_model
from onnxmerge.latency_table import ConvSignature, measure
from onnxmerge.memory import PeakRssSampler, current_rss_bytes
from onnxmerge.progress import DISABLED, Reporter
from onnxmerge.profiler import compare, profile
from onnxmerge.report import write_json
from onnxmerge.results import CompressResult
from onnxmerge.stats import model_stats
from onnxmerge.dataset import Dataset, load_dataset, run_batched
from onnxmerge.prepared import InputShapes, PreparedModel, preflight_output
from onnxmerge.prepared import prepare as prepare_model
from onnxmerge.runner import RuntimeSettings, input_specs, make_session, random_inputs
from onnxmerge.trace import NodeBreakdown, profile_nodes
from onnxmerge.layermerge.context import LatencyModel, latency_model
from onnxmerge.layermerge.search import Candidate, SearchResult, search_budget
from onnxmerge.layermerge import plans
from onnxmerge.layermerge.plans import RerankResult

MAX_ROUNDS = 5  # plans built and measured by the budget search (each distinct plan once)
SPEEDUP_TOLERANCE = 0.98  # a measured speed-up within 2% of the target counts as reached
OVERSHOOT_TOLERANCE = 1.05  # one more than 5% past the target spends fidelity for nothing: loosen the budget
UNREACHABLE_MARGIN = 1.10  # refuse up front when the fastest plan is predicted this much slower than the target


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
                         groups=option.groups, padding="same",
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
    """Wall time and peak RSS per pipeline phase, for the report (RSS sampled every 20 ms in a thread; the
    sampler stops with the process or :meth:`close`)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak_rss_mib: dict[str, float] = {}
        self._last = time.perf_counter()
        self._sampler = PeakRssSampler(interval_s=0.02).__enter__()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self.peak_rss_mib[name] = round(max(self._sampler.peak, current_rss_bytes()) / 2**20, 1)
        self._sampler.peak = current_rss_bytes()
        self._last = now

    def close(self) -> None:
        self._sampler.__exit__(None, None, None)


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
    settings: RuntimeSettings
    breakdown: NodeBreakdown | None = None  # per-node profile of the original (the latency model's context)
    latency: dict[tuple[int, int, str], float] = field(default_factory=dict)  # the DP's rows (keys of importance)
    latency_model: LatencyModel | None = None  # how table sums become end-to-end latency (context.py)
    search: SearchResult | None = None  # the last budget search (solve_for)
    cache_dir: Path | None = None  # latency/ and importance/ caches (None: the user cache folder)
    pass_threads: int = 1  # threads of untimed work (refit and scoring passes in ORT, recovery in torch): jobs x threads
    importance: dict = field(default_factory=dict)
    # Entries left out of both tables, with their measured latency: each costs at least the original convs of
    # its span while scoring no more (importance.dominated_entries), so no optimal plan contains it.
    skipped_entries: dict[tuple[int, int, str], float] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return max(s.end for s in self.analysis.segments)

    @property
    def table_original_ms(self) -> float:
        """The table's latency of the unchanged network (every segment a single kept conv)."""
        return sum(self.latency[key] for key, option in self.options.items()
                   if key[1] - key[0] == 1 and option.kept == (key[1],))

    def measure_tables(self, jobs: int = 1, clock: _PhaseClock | None = None,
                       latency: dict[tuple[int, int, str], float] | None = None,
                       reporter: Reporter = DISABLED) -> None:
        """The latency table (measured in ORT, or ``latency`` when given: one value per key of ``options``),
        then the importance table of the entries the DP could ever choose.

        When every score is provably <= 0 (no labels, or not a classifier), entries at least as slow as the
        original convs of their span are dominated: they are not scored and are moved out of both tables into
        ``skipped_entries``. With accuracy scores (labels) nothing is skipped.
        """
        if latency is None:
            batch = next(iter(self.shapes.values()))[0]
            signatures = {key: _signature(option, _end_activation(self.analysis, key[1], option), batch)
                          for key, option in self.options.items()}
            distinct = set(signatures.values())
            with reporter.phase("latency table", total=len(distinct)) as advance:
                table = measure(distinct, self.settings, cache_dir=_subfolder(self.cache_dir, "latency"),
                                progress=advance)
            latency = {key: table.kernel_ms(signature) for key, signature in signatures.items()}
        else:
            missing = sorted(set(self.options) - set(latency))
            if missing:
                raise BadInputError(f"the latency table has no entry for {missing[0]!r} ({len(missing)} missing)")
            latency = {key: float(latency[key]) for key in self.options}
        if clock:
            clock("latency_table")
        skipped = dominated_entries(latency, self.options) if self.scorer.scores_at_most_zero else set()
        self.skipped_entries = {key: latency[key] for key in sorted(skipped)}
        self.latency = {key: value for key, value in latency.items() if key not in skipped}
        self.latency_model = latency_model(self.original_ms, self.table_original_ms, self.breakdown, self.canonical,
                                           [conv.node for conv in self.analysis.convs
                                            if conv.index not in self.analysis.chain_starts])
        entries = [(s, e, self.options[(s, e, k)]) for (s, e, k) in self.options if (s, e, k) not in skipped]
        with reporter.phase("importance table", total=len(entries)) as advance:
            settled = [0]

            def on_entry(done: int, total: int, cached: int) -> None:
                advance(done - settled[0], note=f"{cached} from the cache" if cached else None)
                settled[0] = done

            self.importance = self.scorer.table(entries, jobs=jobs, progress=on_entry)
        if clock:
            clock("importance_table")

    def solve_for(self, target_ms: float) -> tuple[Plan, onnx.ModelProto, list[dict]]:
        """The best measured plan for ``target_ms``: the DP's budget from the latency model, then a search in both
        directions on measured latency (:mod:`onnxmerge.layermerge.search`), which keeps the best plan that
        meets the target, or reports honestly that none did (``self.search``).

        Skipped (dominated) entries are in neither table, so the DP never sees them; the fastest plan and the
        best importance within the budget are unchanged, since the original span each stands for is at least as
        fast and as important (up to the DP's rounding of each latency up to whole units: a span of k originals
        may round to up to k - 1 units more than the entry it replaces).

        Returns (plan, its student with composed convs — latency does not depend on weight values, and
        :meth:`refine` fits the weights —, the measured attempts as dicts).
        """
        choices = plans.problem_choices(self)
        model = self.latency_model
        # The exact minimum is a rational sum; its float can round below it, which the DP would refuse.
        fastest = math.nextafter(minimum_latency(choices, self.length, links=self.analysis.links), math.inf)
        budget = model.budget(target_ms)
        if budget < fastest and model.predict(fastest) > target_ms * UNREACHABLE_MARGIN:
            reachable = model.predict(fastest)
            raise BadInputError(f"the latency target {target_ms:.3f} ms is below the fastest possible plan "
                                f"(about {reachable:.3f} ms end to end, a {self.original_ms / reachable:.2f}x "
                                "speed-up)")
        built: dict = {}

        def solve_at(units: float) -> Candidate:
            plan = solve(choices, self.length, units, links=self.analysis.links)
            key = tuple((c.start, c.end, c.option) for c in plan.choices)
            return Candidate(key, plan.importance, plan.latency_ms, plan)

        def measure_plan(candidate: Candidate) -> tuple[float, float]:
            # Latency does not depend on weight values: the search times composed convs and refits nothing.
            plan = candidate.payload
            student = plans.build(self, plan)
            built[candidate.plan_key] = (plan, student)
            measured = self.compare(student)
            return measured["latency_b"]["median_ms"], measured["speedup"]["median"]

        self.search = search_budget(
            solve_at, measure_plan, wanted=self.original_ms / target_ms, original_ms=self.original_ms,
            start_budget=max(budget, fastest), min_budget=fastest, max_budget=max(self.table_original_ms, fastest),
            initial_slope=model.scale, low=SPEEDUP_TOLERANCE, high=OVERSHOOT_TOLERANCE, max_rounds=MAX_ROUNDS)
        plan, student = built[self.search.best.plan_key]
        return plan, student, [attempt.to_dict() for attempt in self.search.attempts]

    def importance_summary(self) -> dict:
        """What the importance scores mean, how many held-out rows they used and why, and the cache's use."""
        scorer = self.scorer
        if not is_classifier(scorer.reference):
            score = "-relative squared error of the outputs"
        elif scorer.labels is not None:
            score = "cross-entropy decrease against the labels (original minus entry, nats)"
        else:
            score = "-KL(original || entry) of the softmax, nats"
        return {"score": score, "entries_scored": len(self.importance), "entries_skipped": len(self.skipped_entries),
                "held_out": scorer.held_out_choice,
                "cache": {"hits": scorer.cache_hits, "misses": scorer.cache_misses,
                          "file": str(scorer.cache_path) if scorer.use_cache else None}}

    def refine(self, plan: Plan, count: int = 1) -> tuple[Plan, onnx.ModelProto, RerankResult]:
        """Weights and, with ``count > 1``, the plan itself, decided on the network actually built: ``plan`` and
        up to ``count - 1`` near-optimal alternatives at its budget, each refitted segment by segment in chain
        order on its own inputs (:func:`plans.sequential_refit`), scored jointly on the held-out inputs; the best
        is kept (:func:`plans.rerank`). An alternative replaces a plan that met the target only if it still
        does when timed (alternatives fit the same table budget but were never measured)."""
        result = plans.rerank(self, plan.budget_ms, plan, count=max(1, count))
        student = plans.build(self, result.plan, result.overrides)
        if result.chosen != 0 and self.search is not None and self.search.reached:
            speedup = self.compare(student)["speedup"]["median"]
            result.timed_speedup = speedup
            if speedup < self.search.wanted * SPEEDUP_TOLERANCE:
                result.fallback = (f"the re-ranked plan ran at {speedup:.3f}x, below the target: kept the DP's "
                                   "plan")
                overrides = plans.refit_overrides(self, plan, result.mode)
                result.plan, result.overrides, result.chosen = plan, overrides, 0
                student = plans.build(self, plan, overrides)
        return result.plan, student, result

    def recover(self, student: onnx.ModelProto, plan: Plan, options: CompressOptions,
                data: Dataset | None = None, *, progress: bool | Reporter = False):
        """Distil the original into ``student`` (:func:`recover.distill`): logits KD plus feature maps matched at
        the kept positions (every segment end of ``plan``: the tensors both networks still compute), an online
        teacher on augmented batches, the best checkpoint by held-out agreement. It trains on ``data`` (a larger
        unlabeled set, ``recover_data=``) or the calibration's fit part, with cross-entropy when that part has
        labels, and scores on the calibration's held-out part."""
        from onnxmerge.layermerge.recover import distill

        train = data if data is not None else self.calibration.fit
        produced = {out for node in student.graph.node for out in node.output}
        produced &= {out for node in self.canonical.graph.node for out in node.output}
        outputs = {value.name for value in self.canonical.graph.output}
        match = list(dict.fromkeys(self.analysis.positions[c.end].tensor for c in plan.choices
                                   if self.analysis.positions[c.end].tensor in produced - outputs))
        return distill(student, self.canonical, train, held_out=self.calibration.held_out, match=match,
                       labels=train.labels, steps=options.recover_steps, lr=options.lr, seed=options.seed,
                       progress=progress, threads=self.pass_threads)

    def compare(self, student: onnx.ModelProto) -> dict:
        return compare(self.canonical, student, self.settings, input_shapes=self.shapes)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else all): the default
    ``jobs``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class CompressOptions:
    """What compress does (how ORT runs is :class:`~onnxmerge.runner.RuntimeSettings`): one frozen value."""

    speedup: float | None = None
    latency_budget_ms: float | None = None
    recover: bool = True
    recover_steps: int = 300
    lr: float = 1e-3
    # importance entries scored in parallel; compress runs at most cores // threads of them (no oversubscription)
    jobs: int = field(default_factory=available_cores)
    seed: int = 0
    alternatives: int = 4  # plans re-ranked by one joint held-out pass each (1: the DP's plan only)
    # "layermerge": the paper's search space exactly; "extended" adds stride crossing, grouped convs and
    # dropping identity-residual blocks (about twice the table entries: see segments.SEARCH_SPACES)
    search_space: str = "layermerge"
    recover_data: str | Path | None = None  # a larger unlabeled .npz to distil on (default: the calibration)

    def __post_init__(self) -> None:
        if self.speedup is not None and self.latency_budget_ms is not None:
            raise BadInputError("give one of speedup= and latency_budget_ms=, not both")
        if self.speedup is not None and self.speedup <= 1.0:
            raise BadInputError(f"speedup={self.speedup} must be > 1")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            raise BadInputError(f"latency_budget_ms={self.latency_budget_ms} must be > 0")
        if self.search_space not in SEARCH_SPACES:
            raise BadInputError(f"search_space={self.search_space!r} must be one of {', '.join(SEARCH_SPACES)}")
        if self.recover_steps < 0 or self.jobs < 1 or self.alternatives < 1:
            raise BadInputError(f"need recover_steps= >= 0, jobs= >= 1 and alternatives= >= 1 (got "
                                f"{self.recover_steps}, {self.jobs}, {self.alternatives})")


# Latency in compression is timed with 30 runs per measurement unless the caller says otherwise.
COMPRESS_SETTINGS = RuntimeSettings(runs=30)


def prepare(model: ModelLike | PreparedModel, calibration: str | Path, settings: RuntimeSettings = COMPRESS_SETTINGS,
            *, input_shapes: InputShapes | None = None,
            clock: _PhaseClock | None = None, cache_dir: str | Path | None = None,
            search_space: str = "layermerge") -> CompressionProblem:
    """Canonicalise (the exact, verified fold) and analyse a prepared model; measure the original end to end."""
    from onnxmerge.api import fold

    clock = clock or (lambda phase: None)
    prepared = model if isinstance(model, PreparedModel) else prepare_model(model)
    calib = load_calibration(calibration, prepared.proto)
    shapes = _static_shapes(prepared.proto, input_shapes)
    canonical = fold(prepared.proto, input_shapes=shapes).proto
    clock("canonicalize")
    analysis = analyse_chain(canonical, shapes, search_space=search_space)
    clock("analyse")
    original_ms = profile(canonical, settings, input_shapes=shapes)["latency"]["median_ms"]
    breakdown = _context_profile(canonical, shapes, settings)
    return CompressionProblem(
        canonical=canonical, analysis=analysis, shapes=shapes, calibration=calib,
        options={(s.start, s.end, option_key(o)): o for s in analysis.segments for o in s.options},
        scorer=ImportanceScorer(canonical, analysis, calib.fit, holdout=calib.held_out, labels=calib.labels,
                                threads=settings.threads, cache_dir=_subfolder(cache_dir, "importance")),
        original_ms=original_ms, settings=settings, breakdown=breakdown,
        cache_dir=None if cache_dir is None else Path(cache_dir))


def _subfolder(folder: str | Path | None, name: str) -> Path | None:
    return None if folder is None else Path(folder) / name


def _context_profile(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                     settings: RuntimeSettings) -> NodeBreakdown | None:
    """ORT's per-node profile of the original at the compression shapes, or None where it cannot be read
    (the latency model then falls back and says so: optional, it never stops compress)."""
    try:
        feeds = random_inputs(input_specs(model, shapes), 0)
        return profile_nodes(model, feeds, provider=settings.provider, threads=settings.threads,
                             opt_level=settings.opt_level, runs=max(5, min(settings.runs, 20)))
    except OnnxMergeError:
        return None


def compress(model: ModelLike, output: str | Path | None = None, *, calibration: str | Path,
             options: CompressOptions | None = None, settings: RuntimeSettings | None = None,
             input_shapes: InputShapes | None = None, plan: str | Path | None = None, force: bool = False,
             progress: bool = False, cache_dir: str | Path | None = None, **overrides) -> CompressResult:
    """Compress depth by merging convs across removed activations, under a latency target measured in ORT.

    ``options`` (:class:`CompressOptions`: target, recovery, jobs, seed) says what to do and ``settings``
    (:class:`~onnxmerge.runner.RuntimeSettings`, default 30 timed runs) how ORT runs; keyword ``overrides``
    set single fields of either (``compress(path, out, calibration=c, speedup=1.5, threads=2)``). The output
    path is checked before any work. ``progress`` shows each phase with an ETA (a bar on a terminal, periodic
    lines otherwise). ``cache_dir`` holds the latency and importance caches (default: the user cache folder;
    a later target on the same model and calibration reuses both tables).
    """
    options, settings = _split_overrides(options or CompressOptions(), settings or COMPRESS_SETTINGS, overrides)
    plan_path = Path(plan) if plan is not None else None
    reuse = plan_path is not None and plan_path.is_file()
    if options.speedup is None and options.latency_budget_ms is None and not reuse:
        raise BadInputError("give speedup= or latency_budget_ms= (or plan= naming an existing plan file)")
    clock, reporter = _PhaseClock(), Reporter(enabled=progress)
    try:
        prepared = prepare_model(model)  # once: the problem, the statistics and the output check all read it
        if output is not None:  # before minutes of tables: a bad output path fails now
            output = preflight_output(output, prepared, force=force)
        problem = prepare(prepared, calibration, settings, input_shapes=input_shapes, clock=clock,
                          cache_dir=cache_dir, search_space=options.search_space)
        recover_data = None
        if options.recover:  # a student torch cannot train is refused now, not after the tables
            from onnxmerge.layermerge.recover import check_trainable

            check_trainable(problem.canonical, problem.calibration.fit, threads=settings.threads)
            if options.recover_data is not None:
                recover_data = load_dataset(options.recover_data, problem.canonical, what="recover data")
        target_ms = (problem.original_ms / options.speedup if options.speedup is not None
                     else options.latency_budget_ms)
        rounds: list[dict] = []
        # Each job runs ORT sessions of ``threads`` threads: more than cores // threads jobs only contend.
        jobs = max(1, min(options.jobs, available_cores() // settings.threads))
        problem.pass_threads = jobs * settings.threads
        if reuse:
            chosen = read_plan(plan_path, problem.options)
            chosen, student, reranking = problem.refine(chosen, count=1)
        else:
            problem.measure_tables(jobs=jobs, clock=clock, reporter=reporter)
            chosen, student, rounds = problem.solve_for(target_ms)
            clock("search")
            with reporter.phase("re-rank plans", total=None):
                chosen, student, reranking = problem.refine(chosen, count=options.alternatives)
            if plan_path is not None:
                write_plan(plan_path, chosen, set(reranking.overrides), problem.options)
        clock("plan_and_build")

        trained = None
        if options.recover:
            trained = problem.recover(student, chosen, options, recover_data, progress=reporter)
            student = trained.model
        clock("recover")

        result = _report(problem, chosen, student, target_ms, rounds, trained, clock)
        result.reranking = reranking.to_dict()
        result.importance = problem.importance_summary()
    finally:
        clock.close()
    result.input = None if prepared.path is None else str(prepared.path)
    result.before = model_stats(prepared.proto, problem.shapes)
    result.after = model_stats(student, problem.shapes)
    written = save_model(student, output, input_path=prepared.path, force=force) if output is not None else None
    result.output = None if written is None else str(written)
    result.model, result.proto = written or student, student
    return result


def _split_overrides(options: CompressOptions, settings: RuntimeSettings,
                     overrides: dict) -> tuple[CompressOptions, RuntimeSettings]:
    """Route keyword overrides to the value that has the field; an unknown name is refused, listing both."""
    option_fields, setting_fields = set(CompressOptions.__dataclass_fields__), set(RuntimeSettings.__dataclass_fields__)
    unknown = sorted(set(overrides) - option_fields - setting_fields)
    if unknown:
        raise BadInputError(f"unknown compress parameter(s) {unknown}; options: {sorted(option_fields)}, "
                            f"runtime settings: {sorted(setting_fields)}")
    picked = {k: v for k, v in overrides.items() if k in option_fields}
    return (replace(options, **picked) if picked else options,
            settings.with_overrides(**{k: v for k, v in overrides.items() if k in setting_fields}))


def evaluate(problem: CompressionProblem, student: onnx.ModelProto) -> dict:
    """Fidelity of a compressed model to the original on the held-out calibration inputs."""
    calib = problem.calibration
    reference = run_batched(make_session(problem.canonical, threads=problem.settings.threads), calib.held_out,
                            problem.canonical)
    outputs = run_batched(make_session(student, threads=problem.settings.threads), calib.held_out, student)
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
        peak_rss_mib=clock.peak_rss_mib,
        latency_model=problem.latency_model.to_dict() if problem.latency_model else None,
        search=problem.search.to_dict() if problem.search else None,
        bench=final,
    )


def _static_shapes(model: onnx.ModelProto, input_shapes: InputShapes | None) -> dict[str, tuple[int, ...]]:
    """The shapes latency is measured at: ``input_shapes``, else the model's own dims with the batch at 1.

    The latency table is shape-specific, so dynamic dims other than the batch must be pinned by the user.
    """
    given = dict(input_shapes or {})
    specs = input_specs(model, given)
    for spec in specs:
        unpinned = [note for note in spec.assumed if not note.startswith(f"{spec.name}[0]")]
        if unpinned:
            raise BadInputError(f"input '{spec.name}' has dynamic dims ({'; '.join(unpinned)}); compression measures "
                                f"latency at static shapes: pass input_shapes= (e.g. {{{spec.name!r}: (1, ...)}})")
    return {spec.name: spec.shape for spec in specs}


def inspect(model: ModelLike, input_shapes: list[str] | dict | None = None, search_space: str = "layermerge"):
    """The chain, its segments and kernel options, as tables (``compress --inspect``)."""
    from onnxmerge.api import fold
    from onnxmerge.layermerge.report import chain_tables

    proto = load_model(model).proto
    shapes = _static_shapes(proto, input_shapes)
    canonical = fold(proto, input_shapes=shapes).proto
    return chain_tables(analyse_chain(canonical, shapes, search_space=search_space))


def plan_details(plan: Plan, options: dict) -> list[dict]:
    """The plan in LayerMerge's terms: kept activations (segment ends) and the convs each segment keeps."""
    return [{"segment": [c.start, c.end], "option": c.option, "activation_kept_at": c.end,
             "kept_convs": list(options[(c.start, c.end, c.option)].kept),
             "kernel": list(options[(c.start, c.end, c.option)].kernel)} for c in plan.choices]


def write_plan(path: Path, plan: Plan, refit: set[tuple[int, int]], options: dict) -> None:
    write_json({"plan": plan.to_dict(), "refit": sorted(map(list, refit)), "segments": plan_details(plan, options)},
               path)


def read_plan(path: Path, options: dict) -> Plan:
    """A saved plan, checked against this model's segments (a plan from another model is refused). Its
    ``refit`` list is a record for the reader: the weights are refitted again (:meth:`refine`)."""
    try:
        data = json.loads(path.read_text())
        plan = Plan.from_dict(data["plan"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"cannot read plan {path}: {first_line(exc)}") from None
    unknown = [(c.start, c.end, c.option) for c in plan.choices if (c.start, c.end, c.option) not in options]
    if unknown:
        raise BadInputError(f"plan {path} does not fit this model: no segment/option {unknown[0]}")
    return plan
