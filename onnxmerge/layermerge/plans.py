"""Plans that survive composition: re-rank near-optimal DP plans by the network they actually build.

The DP maximises a sum of per-entry importances, each measured with that entry alone merged into the original
network. Merges are not independent: a merged conv is fitted (or composed) for the original's activations at
its input, but in a plan every later segment reads the output of earlier merged segments, so errors compound
(on a digits net a plan summing to -0.38 had a joint KL of 2.78). Two remedies, both measured on the network
that is finally built:

* :func:`sequential_refit` refits the chosen segments in chain order, each on the activations the partially
  compressed network itself feeds it (earlier segments already replaced), with the original's segment outputs as
  targets, so each merged conv corrects what the segments before it got wrong.
* :func:`rerank` draws a handful of near-optimal plans from the DP (:func:`alternative_plans`: leave-one-out
  re-solves), refits each, scores each jointly with one held-out forward pass (:func:`joint_score`) and keeps
  the best.

Cost (see :class:`RefitReport`): a sequential refit of a plan with k merged segments runs passes of the
original for the segments' targets (one per distinct fit-image count), then per segment one pass of the partially compressed network's
prefix up to the segment's input on only the fit images its refit reads (:meth:`ImportanceScorer.refit_images`)
and one ridge solve, the same solve the independent refit pays. On the digits MobileNet the ridge solves are
~93% of it (0.7 s each); building, cutting and running the prefixes ~0.02 s per segment.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Hashable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxmerge.conv_algebra import ConvParams
from onnxmerge.dataset import run_batched
from onnxmerge.errors import BadInputError
from onnxmerge.graph import import_graph
from onnxmerge.layermerge.build import SegmentChoice, apply_segments, merged_conv
from onnxmerge.layermerge.dp import Choice, Plan, join_tables, solve
from onnxmerge.layermerge.importance import (MAX_REFIT_UNKNOWNS, fidelity, is_original, option_key, refit,
                                             refit_unknowns, span_model)
from onnxmerge.runner import make_session

Key = tuple[int, int, Hashable]
Overrides = dict[tuple[int, int], ConvParams]

REFIT_MODES = ("sequential", "independent", "composed")


def _key(choice: Choice) -> Key:
    return choice.start, choice.end, choice.option


def plan_keys(plan: Plan) -> tuple[Key, ...]:
    """The plan's (start, end, option) entries in chain order: what makes two plans the same plan."""
    return tuple(_key(c) for c in plan.choices)


def _dp_order(plan: Plan):
    # Higher DP objective first; equal objectives: the faster plan, then a fixed order independent of search order.
    return -plan.importance, plan.latency_ms, repr(plan_keys(plan))


def alternative_plans(choices: list[Choice], length: int, budget_ms: float, best: Plan, count: int, *,
                      fixed: Collection[Key] = frozenset(), depth: int = 1,
                      resolution_ms: float | None = None, links: Collection[int] = ()) -> list[Plan]:
    """``best`` followed by distinct near-optimal plans, in DP-objective order, at most ``count`` in all.

    The alternatives are leave-one-out re-solves: for each entry of ``best`` not in ``fixed`` (pass the original,
    unmerged entries: removing one forces an extra merge rather than offering a different one), the DP is solved
    again without that entry. ``depth=2`` also re-solves each alternative without each of its own entries
    (removals accumulate), which finds plans differing from ``best`` in two places at about k^2 solves for k
    merged segments. Each re-solve is :func:`dp.solve` at ``budget_ms`` and ``resolution_ms`` (pass the
    budget ``best`` was solved at, ``best.budget_ms``, as :meth:`CompressionProblem.solve_for` solves), so every
    plan fits the budget in true latency; a removal that leaves no plan within the budget (or a gap in the
    chain) yields nothing. ``links`` are the chains' links (:func:`dp.solve`).

    Why these: a plan that merged segment s badly in composition is most likely replaced by the next best way to
    cover s, which is exactly the optimum without that entry; the DP objective ranks the candidates so the
    joint scoring (:func:`rerank`) spends its passes on the plans the table still rates highest.
    """
    if count < 1:
        raise BadInputError(f"count must be >= 1, got {count}")
    if depth < 0:
        raise BadInputError(f"depth must be >= 0, got {depth}")
    fixed = set(fixed)
    found: dict[tuple[Key, ...], Plan] = {plan_keys(best): best}
    tried: set[frozenset[Key]] = {frozenset()}
    level = [(frozenset(), best)]
    for _ in range(depth):
        following = []
        for removed, plan in level:
            for choice in plan.choices:
                if _key(choice) in fixed:
                    continue
                without = removed | {_key(choice)}
                if without in tried:
                    continue
                tried.add(without)
                try:
                    alternative = solve([c for c in choices if _key(c) not in without], length, budget_ms,
                                        resolution_ms=resolution_ms, links=links)
                except BadInputError:  # nothing within the budget, or the chain cannot be covered without it
                    continue
                following.append((without, alternative))
                found.setdefault(plan_keys(alternative), alternative)
        level = following
    others = sorted((plan for keys, plan in found.items() if keys != plan_keys(best)), key=_dp_order)
    return [best, *others][:count]


def problem_choices(problem) -> list[Choice]:
    """The DP's rows for a measured :class:`~onnxmerge.layermerge.api.CompressionProblem` (both tables already
    leave out its skipped entries), joined on their keys: what :meth:`solve_for` and :func:`rerank` solve."""
    return join_tables(problem.latency, {key: entry.score for key, entry in problem.importance.items()})


def original_keys(problem) -> set[Key]:
    """The entries that leave the network unchanged: the ``fixed`` of :func:`alternative_plans`."""
    return {key for key, option in problem.options.items() if is_original(key, option)}


def _segments(problem, plan: Plan) -> list[SegmentChoice]:
    return [SegmentChoice(c.start, c.end, problem.options[_key(c)]) for c in plan.choices]


def build(problem, plan: Plan, overrides: Overrides | None = None) -> onnx.ModelProto:
    """The compressed network: ``plan`` merged, with ``overrides`` as the merged convs they name (the rest
    composed)."""
    return apply_segments(problem.canonical, problem.analysis, _segments(problem, plan), overrides=overrides or None)


def _run(problem, model: onnx.ModelProto, data, outputs: list[str] | None = None) -> list[np.ndarray]:
    """``model`` on ``data``, untimed: on :attr:`CompressionProblem.pass_threads` threads."""
    return run_batched(make_session(model, threads=problem.pass_threads), data, problem.canonical,
                       outputs=outputs)


def _prefix(model: onnx.ModelProto, names: list[str], data) -> onnx.ModelProto:
    """The part of ``model`` that computes ``names`` from its inputs (:func:`importance.span_model`)."""
    return span_model(model, dict(data.arrays), names)


def joint_fidelity(problem, model: onnx.ModelProto) -> tuple[float, float | None]:
    """(score, top-1 agreement) of ``model`` against the original on the held-out calibration inputs: one pass.

    The score is :func:`importance.fidelity` without labels (-KL for classifiers, -relative squared error
    otherwise) even when the calibration has labels: plans that all keep accuracy on a few hundred images
    differ in KL, not in a handful of flipped labels, and KL is what recovery (distillation) then minimises.
    """
    return fidelity(problem.scorer.reference, _run(problem, model, problem.calibration.held_out))


def joint_score(problem, plan: Plan, overrides: Overrides | None = None) -> float:
    """The held-out score (:func:`joint_fidelity`) of the network ``plan`` builds with ``overrides``."""
    return joint_fidelity(problem, build(problem, plan, overrides))[0]


def independent_refit(problem, plan: Plan) -> Overrides:
    """The refits :meth:`CompressionProblem.solve_for` builds with: each chosen entry whose table score came from
    a refit (``method == "refit"``) refitted on the *original's* activations, independently of the others."""
    overrides = {}
    for c in plan.choices:
        entry = problem.importance.get(_key(c))
        if entry is not None and entry.method == "refit":
            fitted = problem.scorer.refit_params(SegmentChoice(c.start, c.end, problem.options[_key(c)]))
            if fitted is not None:
                overrides[(c.start, c.end)] = fitted
    return overrides


@dataclass
class SegmentRefit:
    """How one chosen segment's merged conv was decided in :func:`sequential_refit`."""

    start: int
    end: int
    method: str  # "refit", "composed" (the refit scored worse) or "composed:<why no refit>"
    fit_images: int
    refit_score: float | None  # held-out score of the partial student with this segment refitted
    composed_score: float | None  # ... and with it composed
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RefitReport:
    """A sequential refit: the merged convs to build with, and what each segment cost."""

    overrides: Overrides
    segments: list[SegmentRefit] = field(default_factory=list)
    target_seconds: float = 0.0  # the one pass of the original for every segment's targets
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"refitted": sorted(map(list, self.overrides)), "segments": [s.to_dict() for s in self.segments],
                "target_seconds": self.target_seconds, "seconds": self.seconds}


def sequential_refit(problem, plan: Plan, *, check_held_out: bool = False, cache: dict | None = None) -> RefitReport:
    """Refit the plan's merged segments in chain order, each on the inputs the network compressed so far gives it.

    Segment i's ridge refit (:func:`importance.refit`, started from nothing but the composed conv's geometry) maps
    the activations at its start tensor in the *student* (segments before i merged, with the convs already
    decided for them; segments after i do not affect that tensor) to the *original's* output of the segment on
    the same fit images. That target is what the rest of the original network expects, so each refit also
    undoes what the segments before it distorted; the independent refit of the importance table cannot, since
    it only ever saw the original's inputs. Names line up: apply_segments keeps the start tensor as the merged
    conv's input and the segment's output tensor (:meth:`ImportanceScorer.target_tensor`).

    A segment whose refit has more unknowns than :data:`importance.MAX_REFIT_UNKNOWNS` (or is not 2-D) keeps
    its composed conv. With ``check_held_out`` a refit is also dropped where the partial student (segments up to
    i merged, the rest original) scores worse on the held-out inputs than with the composed conv. It is off by
    default because the check is myopic: on the digits MobileNet (3 adjacent merges) it rejected the middle
    segment's refit, which the next segment's refit would have corrected, and the joint KL came out 0.95
    instead of 0.48 without it (independent refits: 5.2, composed: 10.1). :func:`rerank`'s joint score is the
    check that sees the whole network.

    Passes: of the original, one per distinct fit-image count (each computing the targets of the segments reading
    that many images, only as deep as they lie), then per segment one prefix pass of the partial student on the
    segment's :meth:`refit_images` and, with
    ``check_held_out``, two held-out passes of the whole partial student.

    ``cache`` (a dict the caller keeps across plans, as :func:`rerank` does) holds the original's targets and
    every fitted conv keyed by the merged segments up to and including it: a segment's refit depends only on
    the segments before it, so plans that share a prefix of merges (leave-one-out alternatives share most of
    theirs) fit it once. Not used with ``check_held_out``, whose decisions depend on more than the prefix.
    """
    began = time.perf_counter()
    scorer, analysis = problem.scorer, problem.analysis
    graph = import_graph(problem.canonical)
    chosen = [c for c in _segments(problem, plan) if not c.is_trivial]
    report = RefitReport({})
    if not chosen:
        report.seconds = time.perf_counter() - began
        return report

    targets_by_segment = {(c.start, c.end): scorer.target_tensor(c.start, c.end) for c in chosen}
    counts = {(c.start, c.end): scorer.refit_images(c.start, c.end, c.option) for c in chosen}
    fit = problem.calibration.fit
    cache = {} if cache is None or check_held_out else cache
    original = cache.setdefault("targets", {})
    need: dict[str, int] = {}  # target tensor -> fit images its segments read
    for span, name in targets_by_segment.items():
        need[name] = max(need.get(name, 0), counts[span])
    missing = {name: n for name, n in need.items() if name not in original or len(original[name]) < n}
    # One pass of the original per distinct image count, each only as deep as its targets: a late 1x1 merge
    # needing hundreds of images does not make every earlier target read them too.
    for images in sorted(set(missing.values()), reverse=True):
        wanted = [name for name, n in missing.items() if n == images]
        original.update(zip(wanted, _run(problem, _prefix(problem.canonical, wanted, fit), fit.rows(slice(0, images)))))
    fits = cache.setdefault("fits", {})
    report.target_seconds = time.perf_counter() - began

    done: list[SegmentChoice] = []
    for index, choice in enumerate(chosen):
        clock = time.perf_counter()
        span = (choice.start, choice.end)
        images = counts[span]
        prefix = tuple((c.start, c.end, option_key(c.option)) for c in chosen[:index + 1])
        if prefix in fits:
            fitted, method = fits[prefix]
            if fitted is not None:
                report.overrides[span] = fitted
            done.append(choice)
            report.segments.append(SegmentRefit(choice.start, choice.end, f"{method} (shared)", images, None, None,
                                                round(time.perf_counter() - clock, 3)))
            continue
        composed = merged_conv(analysis, graph, choice.start, choice.end, choice.option.kept)
        why = _why_no_refit(composed)
        fitted = None
        if why is None:
            tensor = analysis.positions[choice.start].tensor
            student = apply_segments(problem.canonical, analysis, done, overrides=report.overrides or None)
            inputs = _run(problem, _prefix(student, [tensor], fit), fit.rows(slice(0, images)))[0]
            fitted = refit(composed, inputs, original[targets_by_segment[span]][:images])
            why = None if fitted is not None else "geometry"
        refit_score = composed_score = None
        method = f"composed:{why}" if fitted is None else "refit"
        if fitted is not None and check_held_out:
            partial = done + [choice]
            with_refit = apply_segments(problem.canonical, analysis, partial, overrides={**report.overrides,
                                                                                         span: fitted})
            with_composed = apply_segments(problem.canonical, analysis, partial, overrides=report.overrides or None)
            refit_score = joint_fidelity(problem, with_refit)[0]
            composed_score = joint_fidelity(problem, with_composed)[0]
            if refit_score < composed_score:
                fitted, method = None, "composed"
        if fitted is not None:
            report.overrides[span] = fitted
        fits[prefix] = (fitted, method)
        done.append(choice)
        report.segments.append(SegmentRefit(choice.start, choice.end, method, images, refit_score, composed_score,
                                            round(time.perf_counter() - clock, 3)))
    report.seconds = time.perf_counter() - began
    return report


def _why_no_refit(params: ConvParams) -> str | None:
    if params.rank != 2:
        return f"rank {params.rank}"
    if refit_unknowns(params) > MAX_REFIT_UNKNOWNS:
        return f"{refit_unknowns(params)} unknowns > {MAX_REFIT_UNKNOWNS}"
    return None


def refit_overrides(problem, plan: Plan, mode: str, cache: dict | None = None) -> Overrides:
    """The merged convs to build ``plan`` with: ``"sequential"`` (:func:`sequential_refit`, sharing ``cache``),
    ``"independent"`` (:func:`independent_refit`) or ``"composed"`` (none: every merge composed)."""
    if mode == "sequential":
        return sequential_refit(problem, plan, cache=cache).overrides
    if mode == "independent":
        return independent_refit(problem, plan)
    if mode == "composed":
        return {}
    raise BadInputError(f"refit mode must be one of {', '.join(REFIT_MODES)}, got {mode!r}")


@dataclass
class Candidate:
    """One plan :func:`rerank` scored: its DP objective and latency from the tables, its joint held-out score."""

    rank: int  # position in DP-objective order (0: the DP's optimum)
    keys: tuple[Key, ...]
    dp_importance: float
    latency_ms: float
    joint_score: float
    agreement: float | None
    refit_seconds: float
    score_seconds: float

    def to_dict(self) -> dict:
        return {"rank": self.rank, "segments": [[s, e, o if isinstance(o, str) else repr(o)]
                                                for s, e, o in self.keys],
                "dp_importance": self.dp_importance, "latency_ms": self.latency_ms,
                "joint_score": self.joint_score, "agreement": self.agreement,
                "refit_seconds": self.refit_seconds, "score_seconds": self.score_seconds}


@dataclass
class RerankResult:
    """The plan with the best joint held-out score, the merged convs to build it with, and every candidate."""

    plan: Plan
    overrides: Overrides
    mode: str
    candidates: list[Candidate]
    chosen: int  # index into candidates
    seconds: float
    timed_speedup: float | None = None  # the chosen alternative, timed by the caller (None: not timed)
    fallback: str | None = None  # why the caller went back to the DP's plan, if it did

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "refitted": sorted(map(list, self.overrides)), "mode": self.mode,
                "chosen": self.chosen, "candidates": [c.to_dict() for c in self.candidates],
                "timed_speedup": self.timed_speedup, "fallback": self.fallback,
                "seconds": self.seconds}


def rerank(problem, budget_ms: float, best: Plan, count: int = 4, *, mode: str = "sequential",
           depth: int = 1) -> RerankResult:
    """Among ``best`` and its near-optimal alternatives (:func:`alternative_plans` over the problem's own rows,
    :func:`problem_choices`, at ``budget_ms``; at most ``count``), the plan whose network, refitted per ``mode``
    (:func:`refit_overrides`), scores best on the held-out inputs.

    The additive surrogate picked ``best``; the joint score is what the compressed network actually does, so it
    decides. Ties keep the plan the DP rates higher. Cost: per candidate, its refit (``"sequential"``: see
    :func:`sequential_refit`) plus one model build and one held-out pass.
    """
    began = time.perf_counter()
    if mode not in REFIT_MODES:
        raise BadInputError(f"refit mode must be one of {', '.join(REFIT_MODES)}, got {mode!r}")
    plans = alternative_plans(problem_choices(problem), problem.length, budget_ms, best, count,
                              fixed=original_keys(problem), depth=depth, links=problem.analysis.links)
    candidates, overrides, cache = [], [], {}
    for rank, plan in enumerate(plans):
        clock = time.perf_counter()
        fitted = refit_overrides(problem, plan, mode, cache)
        refitted = time.perf_counter()
        score, agreement = joint_fidelity(problem, build(problem, plan, fitted))
        candidates.append(Candidate(rank, plan_keys(plan), plan.importance, plan.latency_ms, score, agreement,
                                    round(refitted - clock, 3), round(time.perf_counter() - refitted, 3)))
        overrides.append(fitted)
    chosen = max(range(len(plans)), key=lambda i: (candidates[i].joint_score, -i))
    return RerankResult(plans[chosen], overrides[chosen], mode, candidates, chosen,
                        round(time.perf_counter() - began, 3))
