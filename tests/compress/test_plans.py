"""Plans that survive composition: near-optimal DP alternatives (against brute force), the sequential refit on
the student's own inputs, and the re-ranking of plans by one joint held-out pass (real ORT, a digits net)."""

import math
import random
from fractions import Fraction

import numpy as np
import pytest

from onnxmerge.errors import BadInputError
from onnxmerge.io import save_model
from onnxmerge.layermerge import plans
from onnxmerge.layermerge.api import prepare
from onnxmerge.graph import import_graph
from onnxmerge.layermerge.build import SegmentChoice, merged_conv
from onnxmerge.layermerge.dp import Choice, Plan, solve
from onnxmerge.layermerge.importance import is_original, refit
from onnxmerge.runner import RuntimeSettings

from conftest import all_plans


# --- alternative_plans on synthetic tables ----------------------------------------------------------------------


def _table(rng: random.Random, length: int) -> list[Choice]:
    """Every segment of a tiny chain, one or two options each; latencies in eighths (exact in the DP's units).
    Option "o" of a one-position segment is the original entry (score 0)."""
    choices = []
    for start in range(length):
        for end in range(start + 1, length + 1):
            if end - start == 1:
                choices.append(Choice(start, end, "o", 1.0 + rng.randint(0, 4) / 8, 0.0))
            for option in ("a", "b")[:rng.randint(0, 2) if end - start == 1 else rng.randint(1, 2)]:
                choices.append(Choice(start, end, option, rng.randint(1, 8 * (end - start)) / 8,
                                      -rng.randint(0, 40) / 16))
    return choices


def _fits(plan, budget: float) -> bool:
    return sum(Fraction(c.latency_ms) for c in plan) <= Fraction(budget)


def _best_without(choices, length, budget, removed: set) -> float:
    return max((math.fsum(c.importance for c in plan) for plan in all_plans(choices, length)
                if _fits(plan, budget) and not {plans._key(c) for c in plan} & removed), default=-math.inf)


def _key(c):
    return c.start, c.end, c.option


@pytest.mark.parametrize("seed", range(12))
def test_alternatives_are_feasible_distinct_ordered_and_first_optimal(seed):
    rng = random.Random(seed)
    length = rng.randint(2, 4)
    choices = _table(rng, length)
    originals = {_key(c) for c in choices if c.option == "o"}
    full = sum(c.latency_ms for c in choices if c.option == "o")
    # Between half and all of the original, at least 2 ms: whole eighths are then whole DP units (1 us).
    budget = max(16, rng.randint(math.ceil(full * 4), math.floor(full * 8))) / 8
    try:
        best = solve(choices, length, budget)
    except BadInputError:  # below the fastest plan
        pytest.skip("budget below the fastest plan for this draw")
    every = all_plans(choices, length)
    optimum = max(math.fsum(c.importance for c in p) for p in every if _fits(p, budget))
    count = 6
    found = plans.alternative_plans(choices, length, budget, best, count, fixed=originals)

    assert found[0] is best and best.importance == pytest.approx(optimum, abs=1e-12)
    assert 1 <= len(found) <= count
    keys = [plans.plan_keys(p) for p in found]
    assert len(set(keys)) == len(keys)  # distinct
    for plan in found:
        assert [c.start for c in plan.choices] == [0] + [c.end for c in plan.choices[:-1]]
        assert plan.choices[-1].end == length and all(c in choices for c in plan.choices)
        assert _fits(plan.choices, budget) and plan.latency_ms <= budget
    objectives = [p.importance for p in found[1:]]
    assert objectives == sorted(objectives, reverse=True)
    # Each alternative is the optimum without one removable entry of the best plan, and lacks that entry.
    removable = [k for k in keys[0] if k not in originals]
    for plan in found[1:]:
        reasons = [k for k in removable if k not in plans.plan_keys(plan)
                   and plan.importance == pytest.approx(_best_without(choices, length, budget, {k}), abs=1e-12)]
        assert reasons, f"{plans.plan_keys(plan)} is no leave-one-out optimum"
    # Nothing better than the best plan was missed, and with enough room every distinct re-solve is returned.
    expected = set()
    for k in removable:
        try:
            expected.add(plans.plan_keys(solve([c for c in choices if _key(c) != k], length, budget)))
        except BadInputError:
            pass
    everything = plans.alternative_plans(choices, length, budget, best, 100, fixed=originals)
    assert {plans.plan_keys(p) for p in everything[1:]} == expected - {keys[0]}


def test_fixed_entries_are_never_removed_and_depth_two_finds_more():
    # A chain of 4: originals cost 1 and score 0; merging two neighbours costs 1 and scores -s, with a second,
    # worse option. The budget (3) forces exactly one merge.
    choices = [Choice(k, k + 1, "o", 1.0, 0.0) for k in range(4)]
    scores = {0: -0.1, 1: -0.2, 2: -0.3}
    for k, s in scores.items():
        choices += [Choice(k, k + 2, "a", 1.0, s), Choice(k, k + 2, "b", 1.0, s - 1.0)]
    originals = {_key(c) for c in choices if c.option == "o"}
    best = solve(choices, 4, 3.0)
    assert [k for k in plans.plan_keys(best) if k not in originals] == [(0, 2, "a")]
    assert plans.alternative_plans(choices, 4, 3.0, best, 10, fixed=set(map(_key, choices))) == [best]
    one = plans.alternative_plans(choices, 4, 3.0, best, 10, fixed=originals)
    merged = [[k for k in plans.plan_keys(p) if k not in originals] for p in one]
    assert merged == [[(0, 2, "a")], [(1, 3, "a")]]  # one removal: the next best single merge
    two = plans.alternative_plans(choices, 4, 3.0, best, 10, fixed=originals, depth=2)
    merged_two = [[k for k in plans.plan_keys(p) if k not in originals] for p in two]
    assert merged_two == merged + [[(2, 4, "a")]]  # without both (0, 2, a) and (1, 3, a): the third best
    assert len(plans.alternative_plans(choices, 4, 3.0, best, 2, fixed=originals, depth=2)) == 2
    with pytest.raises(BadInputError):
        plans.alternative_plans(choices, 4, 3.0, best, 0)


# --- the digits net -----------------------------------------------------------------------------------------------

# Kernel options chained with no original conv between them: every start is the previous segment's end.
ADJACENT = [(0, 2, "k1x1_s1x1_dense"), (2, 5, "k3x3_s2x2_dense"), (5, 9, "k1x1_s1x1_dense")]


def _fake_latency(options) -> dict:
    """Deterministic latencies in eighths: an original conv 1 ms, a merge half a ms per position it spans (plus
    1/8 for a spatial kernel), so the DP trades importance for merges the same way on every machine."""
    return {key: 1.0 if is_original(key, option) else
            0.5 * (key[1] - key[0]) + (0.125 if option.kernel != (1, 1) else 0.0)
            for key, option in options.items()}


@pytest.fixture(scope="module")
def problem(tmp_path_factory, trained_digits):
    folder = tmp_path_factory.mktemp("plans")
    digits = trained_digits("mobilenet")
    save_model(digits.model, folder / "model.onnx")
    np.savez(folder / "calib.npz", input=digits.x_calib)
    problem = prepare(folder / "model.onnx", folder / "calib.npz", RuntimeSettings(runs=3))
    problem.measure_tables(jobs=2, latency=_fake_latency(problem.options))
    return problem


def _plan(problem, merged: list) -> Plan:
    """The plan with the ``merged`` entries and original convs everywhere else."""
    rows = {plans._key(c): c for c in plans.problem_choices(problem)}
    covered = {k for s, e, _ in merged for k in range(s + 1, e + 1)}
    keys = sorted(merged + [key for key in plans.original_keys(problem) if key[1] not in covered])
    chosen = [rows[key] for key in keys]
    return Plan(chosen, math.fsum(c.latency_ms for c in chosen), math.fsum(c.importance for c in chosen), 100.0, 0.001)


def test_sequential_refit_beats_independent_and_composed_on_adjacent_merges(problem):
    plan = _plan(problem, ADJACENT)
    assert all(a[1] == b[0] for a, b in zip(ADJACENT, ADJACENT[1:]))
    report = plans.sequential_refit(problem, plan)
    assert [(s.start, s.end) for s in report.segments] == [k[:2] for k in ADJACENT]  # chain order
    assert set(report.overrides) == {(s.start, s.end) for s in report.segments if s.method == "refit"}
    assert report.overrides  # something was refitted, so the comparison below is not composed vs composed
    options = {(c.start, c.end): problem.options[plans._key(c)] for c in plan.choices}
    assert all(1 <= s.fit_images == problem.scorer.refit_images(s.start, s.end, options[s.start, s.end])
               <= problem.scorer.fit_images(s.start) for s in report.segments)
    checked = plans.sequential_refit(problem, plan, check_held_out=True)
    for segment in (s for s in checked.segments if s.refit_score is not None):  # kept only where not worse
        assert (segment.method == "refit") == (segment.refit_score >= segment.composed_score)
    assert set(checked.overrides) == {(s.start, s.end) for s in checked.segments if s.method == "refit"}

    sequential = plans.joint_score(problem, plan, report.overrides)
    independent = plans.joint_score(problem, plan, plans.independent_refit(problem, plan))
    composed = plans.joint_score(problem, plan, {})
    assert sequential >= independent - 1e-6 and sequential >= composed - 1e-6
    assert sequential > composed  # the refits matter on this plan: a no-op implementation fails here
    summed = plan.importance
    assert summed != pytest.approx(composed, rel=0.05)  # the table's sum is not the joint score (not additive)

    # The first segment sees the original's inputs: its sequential refit is an independent refit on the original's
    # activations over the images it reads (refit_images). A later one reads the student's own activations, so
    # its refit differs.
    first = ADJACENT[0][:2]
    if first in report.overrides:
        option = problem.options[ADJACENT[0]]
        images = problem.scorer.refit_images(*first, option)
        inputs, targets = problem.scorer.fit_activations(first[0], [first[1]])
        params = merged_conv(problem.analysis, import_graph(problem.canonical), *first, option.kept)
        np.testing.assert_allclose(report.overrides[first].weight,
                                   refit(params, inputs[:images], targets[first[1]][:images]).weight,
                                   rtol=1e-6, atol=1e-8)
    later = [(s, e) for s, e, _ in ADJACENT[1:] if (s, e) in report.overrides]
    for span in later:
        option = problem.options[next(k for k in ADJACENT if k[:2] == span)]
        independent_fit = problem.scorer.refit_params(SegmentChoice(*span, option))
        assert not np.allclose(report.overrides[span].weight, independent_fit.weight, rtol=1e-4, atol=1e-6)
    assert report.to_dict()["segments"][0]["start"] == 0


def test_rerank_keeps_the_candidate_with_the_best_recomputed_joint_score(problem):
    choices = plans.problem_choices(problem)
    budget = 0.7 * problem.table_original_ms
    best = solve(choices, problem.length, budget)
    result = plans.rerank(problem, budget, best, count=4)
    assert 2 <= len(result.candidates) <= 4 and result.candidates[0].keys == plans.plan_keys(best)
    assert len({c.keys for c in result.candidates}) == len(result.candidates)
    assert all(c.latency_ms <= budget for c in result.candidates)
    recomputed = []
    for candidate in result.candidates:
        plan = next(p for p in plans.alternative_plans(choices, problem.length, budget, best, 4,
                                                       fixed=plans.original_keys(problem))
                    if plans.plan_keys(p) == candidate.keys)
        recomputed.append(plans.joint_score(problem, plan, plans.sequential_refit(problem, plan).overrides))
    np.testing.assert_allclose([c.joint_score for c in result.candidates], recomputed, rtol=1e-6, atol=1e-9)
    assert result.chosen == int(np.argmax(recomputed))
    assert plans.plan_keys(result.plan) == result.candidates[result.chosen].keys
    assert plans.joint_score(problem, result.plan, result.overrides) == pytest.approx(max(recomputed), rel=1e-6)
    table = result.to_dict()
    assert table["chosen"] == result.chosen and len(table["candidates"]) == len(result.candidates)
    assert all(row["joint_score"] <= table["candidates"][result.chosen]["joint_score"] for row in table["candidates"])

    composed = plans.rerank(problem, budget, best, count=2, mode="composed")
    assert composed.overrides == {} and [c.keys for c in composed.candidates] == \
        [c.keys for c in result.candidates[:2]]
    with pytest.raises(BadInputError):
        plans.rerank(problem, budget, best, mode="greedy")


def test_plans_sharing_a_prefix_of_merges_fit_it_once(problem):
    plan = _plan(problem, ADJACENT)
    fresh = plans.sequential_refit(problem, plan)
    cache: dict = {}
    first = plans.sequential_refit(problem, plan, cache=cache)
    again = plans.sequential_refit(problem, plan, cache=cache)
    assert all(s.method.endswith("(shared)") for s in again.segments)  # nothing fitted twice
    assert not any(s.method.endswith("(shared)") for s in first.segments)
    assert set(again.overrides) == set(first.overrides) == set(fresh.overrides)
    for span, params in fresh.overrides.items():
        np.testing.assert_array_equal(again.overrides[span].weight, params.weight)
    shorter = _plan(problem, ADJACENT[:2])  # same first two merges, the third left original
    shared = plans.sequential_refit(problem, shorter, cache=cache)
    assert [s.method.endswith("(shared)") for s in shared.segments] == [True, True]
