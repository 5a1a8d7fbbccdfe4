"""The depth-compression DP against brute force, and its input checks."""

import json
import math
import random
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxmerge.layermerge import dp
from onnxmerge.layermerge.dp import Choice, Plan, join_tables, minimum_latency, solve
from onnxmerge.errors import BadInputError

from conftest import all_plans


def _units(budget, resolution):
    """The discretisation solve() documents, restated: whole units that divide the budget exactly."""
    units = max(1, round(max(2000.0, budget / 1e-3) if resolution is None else budget / resolution))
    return units, Fraction(budget) / units


def _cost(choice, unit):
    return math.ceil(Fraction(choice.latency_ms) / unit)


def _assert_covers(plan, choices, length):
    assert [c.start for c in plan.choices] == [0] + [c.end for c in plan.choices[:-1]]
    assert plan.choices[-1].end == length
    assert all(c in choices for c in plan.choices)
    assert plan.latency_ms == math.fsum(c.latency_ms for c in plan.choices)
    assert plan.importance == math.fsum(c.importance for c in plan.choices)


@st.composite
def problems(draw):
    length = draw(st.integers(1, 6))
    latencies = st.one_of(st.integers(0, 30).map(lambda n: n / 10), st.floats(0, 3))
    importances = st.one_of(st.integers(-8, 8).map(lambda n: n / 4), st.floats(-3, 3))
    choices = []
    for start in range(length):
        for end in range(start + 1, length + 1):
            # Single steps are nearly always present, so most tables are solvable but gaps still occur.
            if draw(st.integers(0, 9)) if end == start + 1 else draw(st.booleans()):
                for k in range(draw(st.integers(1, 3))):
                    choices.append(Choice(start, end, f"k{k}", draw(latencies), draw(importances)))
    plans = all_plans(choices, length)
    top = max((math.fsum(c.latency_ms for c in p) for p in plans), default=1.0)
    if plans and draw(st.booleans()):  # exactly some plan's latency: the boundary case
        budget = math.fsum(c.latency_ms for c in draw(st.sampled_from(plans)))
    else:
        budget = draw(st.floats(0.01, top + 0.5))
    resolution = draw(st.sampled_from([None, None, 0.05, 0.1, 0.3, 1.0]))
    return choices, length, budget, resolution, plans


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_brute_force(problem):
    choices, length, budget, resolution, plans = problem
    if not plans:
        with pytest.raises(BadInputError, match="gap"):
            solve(choices, length, budget, resolution_ms=resolution)
        return
    fastest = min(sum(map(Fraction, (c.latency_ms for c in p))) for p in plans)
    assert minimum_latency(choices, length) == float(fastest)
    if Fraction(budget) < fastest or budget <= 0:
        with pytest.raises(BadInputError):
            solve(choices, length, budget, resolution_ms=resolution)
        return
    plan = solve(choices, length, budget, resolution_ms=resolution)
    _assert_covers(plan, choices, length)
    assert plan.latency_ms <= budget
    units, unit = _units(budget, resolution)
    assert plan.resolution_ms == float(unit)
    cost = {c: _cost(c, unit) for c in choices}
    fitting = [p for p in plans if sum(cost[c] for c in p) <= units]
    if fitting:
        best = max(math.fsum(c.importance for c in p) for p in fitting)
        assert plan.importance == pytest.approx(best, rel=1e-9, abs=1e-9)
        assert sum(cost[c] for c in plan.choices) <= units
    else:  # the budget is within the rounding margin of the fastest plan, which is returned
        assert plan.latency_ms == float(fastest)


def _tables():
    latency = {(0, 1, "k1"): 1.0, (0, 1, "k3"): 1.5, (1, 2, "k3"): 2.0, (0, 2, "k5"): 2.2, (0, 2, "k3"): 1.9}
    importance = {(0, 1, "k1"): 0.7, (0, 1, "k3"): 1.0, (1, 2, "k3"): 1.0, (0, 2, "k5"): 0.9, (0, 2, "k3"): 0.6}
    return latency, importance


def test_join_is_by_key_not_position():
    latency, importance = _tables()
    keys = list(importance)
    random.Random(0).shuffle(keys)
    shuffled = {k: importance[k] for k in keys}
    joined = join_tables(latency, shuffled)
    assert {(c.start, c.end, c.option): (c.latency_ms, c.importance) for c in joined} == {
        k: (latency[k], importance[k]) for k in latency}
    reversed_latency = dict(reversed(list(latency.items())))
    for budget in (1.9, 2.5, 3.0, 3.5):
        plan = solve(join_tables(latency, importance), 2, budget)
        assert plan == solve(join_tables(reversed_latency, shuffled), 2, budget)
        assert plan == solve(joined[::-1], 2, budget)
    expected = {3.5: [(0, 1, "k3"), (1, 2, "k3")], 3.0: [(0, 1, "k1"), (1, 2, "k3")], 2.5: [(0, 2, "k5")],
                1.9: [(0, 2, "k3")]}
    for budget, keys in expected.items():
        assert [(c.start, c.end, c.option) for c in solve(joined, 2, budget).choices] == keys


def test_join_names_missing_keys():
    latency, importance = _tables()
    del importance[(0, 2, "k5")]
    with pytest.raises(BadInputError, match=r"importance table has no entry for \(0, 2, 'k5'\)"):
        join_tables(latency, importance)
    latency, importance = _tables()
    importance[(1, 2, "k7")] = 0.5
    with pytest.raises(BadInputError, match=r"latency table has no entry for \(1, 2, 'k7'\)"):
        join_tables(latency, importance)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_rejected(bad):
    latency, importance = _tables()
    with pytest.raises(BadInputError, match=r"latency of \(0, 1, 'k1'\) must be a finite number"):
        join_tables({**latency, (0, 1, "k1"): bad}, importance)
    with pytest.raises(BadInputError, match=r"importance of \(0, 2, 'k3'\)"):
        join_tables(latency, {**importance, (0, 2, "k3"): bad})
    choices = join_tables(latency, importance)
    with pytest.raises(BadInputError, match="budget_ms"):
        solve(choices, 2, bad)
    with pytest.raises(BadInputError, match="resolution_ms"):
        solve(choices, 2, 3.0, resolution_ms=bad)


def test_negative_latency_and_bad_keys_are_rejected():
    with pytest.raises(BadInputError, match="negative"):
        join_tables({(0, 1, "a"): -0.1}, {(0, 1, "a"): 1.0})
    with pytest.raises(BadInputError, match="start < end"):
        join_tables({(2, 1, "a"): 0.1}, {(2, 1, "a"): 1.0})
    with pytest.raises(BadInputError, match="ends past the chain length"):
        solve([Choice(0, 3, "a", 0.1, 1.0)], 2, 1.0)


def test_infeasible_budget_names_the_minimum():
    choices = [Choice(0, 1, "a", 1.5, 1.0), Choice(1, 2, "a", 2.6, 1.0), Choice(0, 2, "b", 4.5, 0.0)]
    assert minimum_latency(choices, 2) == pytest.approx(4.1)
    with pytest.raises(BadInputError, match=r"^budget 3\.20 ms is below the fastest possible plan, 4\.10 ms$"):
        solve(choices, 2, 3.2)
    # Values that agree to two decimals are printed with enough digits to differ.
    with pytest.raises(BadInputError, match=r"budget 4\.099 ms .* 4\.100 ms"):
        solve(choices, 2, 4.099)


def test_gap_names_the_uncovered_position():
    choices = [Choice(0, 1, "a", 1.0, 1.0), Choice(1, 2, "a", 1.0, 1.0), Choice(0, 2, "b", 1.0, 1.0),
               Choice(3, 4, "a", 1.0, 1.0)]
    with pytest.raises(BadInputError, match="no plan gets past position 2"):
        solve(choices, 4, 10.0)
    with pytest.raises(BadInputError, match="position 2"):
        minimum_latency(choices, 4)


def test_budget_at_the_fastest_plan_returns_it():
    # 0.15 ms is 1.5 units of 0.1 ms: rounded up, the two steps need 4 units of a 3-unit budget.
    choices = [Choice(0, 1, "a", 0.15, 1.0), Choice(1, 2, "a", 0.15, 1.0), Choice(0, 2, "b", 0.5, 3.0)]
    plan = solve(choices, 2, 0.3, resolution_ms=0.1)
    assert [c.option for c in plan.choices] == ["a", "a"] and plan.latency_ms <= 0.3
    assert solve(choices, 2, minimum_latency(choices, 2)).latency_ms == minimum_latency(choices, 2)


def test_ties_go_to_the_faster_plan():
    choices = [Choice(0, 1, "a_slow", 2.0, 1.0), Choice(0, 1, "b_fast", 1.0, 1.0)]
    assert solve(choices, 1, 3.0).choices == [choices[1]]


def test_resolution_is_checked(monkeypatch):
    choices = [Choice(0, 1, "a", 1.0, 1.0)]
    monkeypatch.setattr(dp, "_MAX_CELLS", 10_000)
    assert solve(choices, 1, 1e3).resolution_ms == 1e3 / 4999  # default coarsened to fit the table
    with pytest.raises(BadInputError, match="resolution_ms must be positive"):
        solve(choices, 1, 3.0, resolution_ms=0.0)
    with pytest.raises(BadInputError, match="coarser resolution_ms"):
        solve(choices, 1, 3.0, resolution_ms=1e-300)
    assert solve(choices, 1, 3.0, resolution_ms=10.0).resolution_ms == 3.0  # one unit: the whole budget


def test_plan_json_round_trip():
    choices = [Choice(0, 2, "k3x3_s1x1_dense", 0.25, 1.5), Choice(2, 3, (3, 1, False), 0.125, -0.5),
               Choice(3, 4, 7, 0.1, 0.3)]
    plan = solve(choices, 4, 1.0)
    assert json.loads(json.dumps(plan.to_dict()))["choices"][0]["option"] == "k3x3_s1x1_dense"
    restored = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert restored == plan
    assert restored.choices[1].option == (3, 1, False)
    with pytest.raises(BadInputError, match="cannot be written to JSON"):
        Plan([Choice(0, 1, object(), 0.1, 1.0)], 0.1, 1.0, 1.0, 0.001).to_dict()
    with pytest.raises(BadInputError, match="not a depth-compression plan"):
        Plan.from_dict({"choices": [{"start": 0}]})
    with pytest.raises(BadInputError, match="not a depth-compression plan"):
        code = {**plan.to_dict()["choices"][1], "option_repr": "__import__('os')"}
        Plan.from_dict({**plan.to_dict(), "choices": [code]})


def _reference_best(choices, length, units, unit):
    """Pure-Python DP over exact unit sums (a different formulation from solve's 'at most t' table)."""
    reach = [dict() for _ in range(length + 1)]
    reach[0][0] = 0.0
    for c in sorted(choices, key=lambda c: c.end):
        cost = _cost(c, unit)
        target = reach[c.end]
        for spent, value in reach[c.start].items():
            if spent + cost <= units and target.get(spent + cost, -math.inf) < value + c.importance:
                target[spent + cost] = value + c.importance
    return max(reach[length].values())


def _big_chain(length=60, entries=400, seed=0):
    rng = np.random.default_rng(seed)
    choices = {}
    for start in range(length):
        choices[(start, start + 1, "k1")] = Choice(start, start + 1, "k1", rng.uniform(0.05, 0.4), 1.0)
    while len(choices) < entries:
        start = int(rng.integers(0, length - 1))
        end = min(length, start + int(rng.integers(1, 9)))
        kernel = f"k{2 * int(rng.integers(0, 6)) + 1}"
        choices[(start, end, kernel)] = Choice(start, end, kernel, rng.uniform(0.05, 0.3) * (end - start) ** 0.7,
                                               (1 + rng.normal(0, 0.05)) * rng.uniform(0.5, 1.2))
    return list(choices.values())


def test_large_chain_is_fast_and_optimal():
    length = 60
    choices = _big_chain(length)
    fastest = minimum_latency(choices, length)
    budget = fastest + 0.4 * (math.fsum(c.latency_ms for c in choices if c.end == c.start + 1) - fastest)
    began = time.perf_counter()
    plan = solve(choices, length, budget, resolution_ms=budget / 2000)
    elapsed = time.perf_counter() - began
    print(f"\nDP, L={length}, {len(choices)} entries, 2000 units: {elapsed * 1e3:.1f} ms")
    _assert_covers(plan, choices, length)
    assert plan.latency_ms <= budget
    units, unit = _units(budget, budget / 2000)
    assert plan.importance == pytest.approx(_reference_best(choices, length, units, unit), rel=1e-9)
    began = time.perf_counter()
    fine = solve(choices, length, budget)  # default 1 us resolution
    print(f"DP, default resolution, {round(budget / fine.resolution_ms)} units: "
          f"{(time.perf_counter() - began) * 1e3:.1f} ms")
    assert fine.latency_ms <= budget
