"""The two-way budget search on synthetic latency functions (no ORT: the search is pure)."""

import math

import numpy as np
import pytest

from onnxmerge.layermerge.search import Candidate, choose, search_budget

ORIGINAL_MS = 10.0


class Synthetic:
    """A DP stand-in: plans are budgets rounded down to a step (a step-shaped m(b)); the network runs at
    ``offset + slope * plan``, and a plan's objective grows with its budget (slower plans are more faithful)."""

    def __init__(self, slope=1.0, offset=0.0, step=0.25, fastest=2.0, noise=0.0, seed=0):
        self.slope, self.offset, self.step, self.fastest = slope, offset, step, fastest
        self.noise = np.random.default_rng(seed)
        self.sigma = noise
        self.measured = 0

    def solve(self, budget):
        plan = max(self.fastest, math.floor(budget / self.step) * self.step)
        return Candidate(plan_key=plan, objective=-(ORIGINAL_MS - plan) ** 2, predicted_ms=plan, payload=plan)

    def measure(self, candidate):
        self.measured += 1
        ms = (self.offset + self.slope * candidate.payload) * (1 + self.sigma * self.noise.standard_normal())
        return ms, ORIGINAL_MS / ms

    def search(self, wanted, start, **kwargs):
        return search_budget(self.solve, self.measure, wanted=wanted, original_ms=ORIGINAL_MS, start_budget=start,
                             min_budget=self.fastest, max_budget=ORIGINAL_MS, initial_slope=1.0, **kwargs)


def test_an_optimistic_table_is_corrected_by_tightening_into_the_band():
    net = Synthetic(slope=1.0, offset=1.5)  # the table leaves 1.5 ms out: its plans run slower than priced
    result = net.search(1.6, start=ORIGINAL_MS / 1.6)
    assert not (result.attempts[0].speedup >= 1.6 * 0.98)  # the first plan misses...
    assert result.reached and 1.6 * 0.98 <= result.best.speedup <= 1.6 * 1.05  # ...the search lands in the band


def test_a_pessimistic_table_is_loosened_instead_of_overshooting():
    net = Synthetic(slope=0.8, offset=0.0)  # plans run faster than priced: the first one overshoots
    result = net.search(1.5, start=ORIGINAL_MS / 1.5)
    first = result.attempts[0]
    assert first.speedup > 1.5 * 1.05
    assert result.reached and result.best.speedup <= 1.5 * 1.05
    assert result.best.budget > first.budget and result.best.objective > first.objective  # fidelity won back


def test_the_best_meeting_plan_is_kept_not_the_last_one():
    net = Synthetic(slope=1.0, offset=1.0, noise=0.03, seed=3)
    result = net.search(1.4, start=6.0, max_rounds=5)
    meeting = [a for a in result.attempts if a.speedup >= 1.4 * 0.98]
    assert meeting, "the synthetic case is built so that some plan meets the target"
    assert result.best in meeting
    assert result.best.objective == max(a.objective for a in meeting)


def test_an_unreachable_target_is_reported_with_the_fastest_plan():
    net = Synthetic(slope=1.0, offset=4.0, fastest=2.0)  # the fastest plan runs at 6 ms: 1.67x at most
    result = net.search(2.5, start=4.0)
    assert not result.reached
    assert result.best.speedup == max(a.speedup for a in result.attempts)
    assert "no measured plan reached" in result.reason
    assert result.best.plan_key == 2.0  # it did try the fastest plan


def test_each_plan_is_measured_once_and_rounds_are_capped():
    net = Synthetic(slope=1.0, offset=1.0, step=2.0)  # coarse steps: many budgets give the same plan
    result = net.search(1.7, start=5.0, max_rounds=3)
    assert net.measured == len({a.plan_key for a in result.attempts}) <= 3


def test_choose_prefers_meeting_plans_then_objective():
    net = Synthetic()
    slow, fast, faster = (Candidate(k, k - ORIGINAL_MS, k) for k in (8.0, 6.0, 5.0))
    from onnxmerge.layermerge.search import Attempt

    attempts = [Attempt(c.plan_key, c.plan_key, c.objective, c.predicted_ms, c.plan_key, ORIGINAL_MS / c.plan_key)
                for c in (slow, fast, faster)]
    best, reached = choose(attempts, wanted=1.6)
    assert reached and best.plan_key == 6.0  # 1.67x meets 1.6x and scores better than the 2x plan
    best, reached = choose(attempts, wanted=3.0)
    assert not reached and best.plan_key == 5.0
    assert net.measured == 0


def test_bad_arguments_are_refused():
    net = Synthetic()
    with pytest.raises(ValueError):
        search_budget(net.solve, net.measure, wanted=0, original_ms=1, start_budget=1, min_budget=1,
                      max_budget=2, initial_slope=1)
