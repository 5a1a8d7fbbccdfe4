"""The closed loop between the DP's budget and the latency ORT measures: a search in both directions.

The DP plans against a table, and the table is a model of the network's latency, not the network: a plan it
prices at ``b`` runs at some ``m(b)`` end to end. ``m`` is (nearly) increasing in ``b`` — a larger budget
admits slower, more faithful plans — but its slope and offset are only known by measuring. The goal is a plan
whose measured speed-up reaches the target (within ``low`` of it, the 2% timing noise) without overshooting
it by more than ``high`` (fidelity spent for nothing), and among plans that reach it, the one the DP scores
best.

Why two directions: a loop that only tightens keeps the last plan it built, so it either stops short (the
table was optimistic three times in a row) or keeps a plan far faster than asked. Here every measured plan is
kept, and the next budget is chosen from what the measurements bracket:

- ``meeting`` = the largest budget whose plan reached the target, ``missing`` = the smallest whose plan did
  not. If both are known, the answer lies between them.
- The next budget corrects the last one by the measured error, converted to table units by the slope of
  ``m``: ``b' = b + (target_ms - m(b)) / slope``. The slope is the secant of the last two distinct
  measurements once there are two, and ``initial_slope`` (end-to-end ms per table unit) before that.
- A proposal outside the bracket (the secant can overshoot on a step-shaped ``m``) is replaced by the
  bracket's midpoint, and a budget already tried, or one that yields a plan already measured, is not paid for
  twice: the search bisects instead, and stops when the bracket is narrower than ``min_step``.

The result is the best *measured* plan that meets the target (highest DP objective, then fastest), or, when
none does, an honest miss: the fastest plan measured and by how much it falls short.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Attempt:
    """One round: the budget given to the DP, what the plan it returned scores and costs, and what ORT said."""

    budget: float  # table units (ms of the table)
    plan_key: Hashable  # identifies the plan (two budgets can give the same plan)
    objective: float  # the DP's importance sum of the plan
    predicted_ms: float  # the table's latency of the plan
    measured_ms: float  # end to end, in ORT
    speedup: float  # original / measured, median of interleaved rounds

    def to_dict(self) -> dict:
        data = asdict(self)
        data["plan_key"] = repr(self.plan_key)
        return data


@dataclass
class SearchResult:
    attempts: list[Attempt]
    best: Attempt | None  # the chosen measured plan (None only when nothing was measured)
    reached: bool  # best meets the target (within the low tolerance)
    wanted: float  # the target speed-up
    reason: str  # why the search stopped, in words
    payloads: dict = field(default_factory=dict, repr=False)  # plan_key -> whatever ``evaluate`` returned with it

    def to_dict(self) -> dict:
        return {"attempts": [a.to_dict() for a in self.attempts], "best": self.best and self.best.to_dict(),
                "reached": self.reached, "wanted": self.wanted, "reason": self.reason}


def meets(speedup: float, wanted: float, low: float) -> bool:
    return speedup >= wanted * low


@dataclass(frozen=True)
class Candidate:
    """What the DP returned for a budget, before it is measured."""

    plan_key: Hashable
    objective: float
    predicted_ms: float
    payload: object = field(default=None, compare=False, repr=False)  # what ``measure`` needs (the plan)


def search_budget(solve: Callable[[float], Candidate], measure: Callable[[Candidate], tuple[float, float]], *,
                  wanted: float, original_ms: float, start_budget: float, min_budget: float, max_budget: float,
                  initial_slope: float, low: float = 0.98, high: float = 1.05, max_rounds: int = 5,
                  min_step: float | None = None) -> SearchResult:
    """Find the best measured plan whose speed-up is within [``wanted * low``, ``wanted * high``].

    ``solve(budget)`` runs the DP (cheap); ``measure(candidate)`` builds and times its plan and returns
    (measured ms, speed-up) — the expensive part, paid once per distinct plan: a budget whose plan was
    already measured reuses that measurement and counts no round. Budgets are kept in [``min_budget``,
    ``max_budget``] (the fastest plan's table latency and the original's). At most ``max_rounds`` plans are
    measured. See the module docstring for the rule.
    """
    if not wanted > 0 or not original_ms > 0 or max_rounds < 1 or min_budget > max_budget:
        raise ValueError(f"bad search: wanted={wanted}, original_ms={original_ms}, rounds={max_rounds}, "
                         f"budgets [{min_budget}, {max_budget}]")
    target_ms = original_ms / wanted
    min_step = min_step if min_step is not None else 1e-3 * max(max_budget, 1e-9)
    attempts: list[Attempt] = []
    measured: dict[Hashable, tuple[float, float]] = {}
    payloads: dict = {}
    tried: set[float] = set()
    budget = min(max(start_budget, min_budget), max_budget)
    reason = f"ran out of rounds ({max_rounds})"
    for _ in range(4 * max_rounds):  # solves are cheap; measured rounds are capped below
        candidate = solve(budget)
        tried.add(budget)
        repeated = candidate.plan_key in measured
        if not repeated:
            if len(measured) >= max_rounds:
                break
            measured[candidate.plan_key] = measure(candidate)
            payloads[candidate.plan_key] = candidate.payload
        measured_ms, speedup = measured[candidate.plan_key]
        attempt = Attempt(budget, candidate.plan_key, candidate.objective, candidate.predicted_ms, measured_ms,
                          speedup)
        attempts.append(attempt)
        ok = meets(speedup, wanted, low)
        if ok and speedup <= wanted * high:
            reason = "measured speed-up within the target band"
            break
        if not ok and budget <= min_budget:
            reason = "the fastest plan the table allows misses the target"
            break
        meeting = max((a.budget for a in attempts if meets(a.speedup, wanted, low)), default=None)
        missing = min((a.budget for a in attempts if not meets(a.speedup, wanted, low)), default=None)
        lower = meeting if meeting is not None else min_budget
        upper = missing if missing is not None else max_budget
        if upper - lower <= min_step:
            reason = "the budgets that meet and miss the target are as close as the DP can tell apart"
            break
        proposal = budget + (target_ms - measured_ms) / _slope(attempts, initial_slope)
        inside = lower < proposal < upper if missing is not None else lower < proposal <= upper
        if repeated or not inside or proposal in tried:
            proposal = (lower + upper) / 2
        if proposal in tried:
            reason = "no untried budget left between the plans that meet and miss the target"
            break
        budget = proposal
    best, reached = choose(attempts, wanted, low)
    if not reached and best is not None:
        reason += f"; no measured plan reached {wanted:.3g}x (best {best.speedup:.3g}x)"
    return SearchResult(attempts, best, reached, wanted, reason, payloads)


def _slope(attempts: list[Attempt], initial: float) -> float:
    """End-to-end ms per table unit: the secant of the last two measurements at distinct budgets and
    latencies when it is positive (m increases with the budget), else ``initial``."""
    for older in reversed(attempts[:-1]):
        last = attempts[-1]
        if older.budget != last.budget and older.measured_ms != last.measured_ms:
            slope = (last.measured_ms - older.measured_ms) / (last.budget - older.budget)
            return slope if slope > 0 else initial
    return initial


def choose(attempts: list[Attempt], wanted: float, low: float = 0.98) -> tuple[Attempt | None, bool]:
    """(best attempt, whether it meets the target): among those that meet it, the highest DP objective
    (ties: the faster); when none meets it, the fastest."""
    meeting = [a for a in attempts if meets(a.speedup, wanted, low)]
    if meeting:
        return max(meeting, key=lambda a: (a.objective, a.speedup)), True
    return (max(attempts, key=lambda a: a.speedup), False) if attempts else (None, False)
