"""LayerMerge's selection step: segments and kernel options that maximise importance within a latency budget.

A solution is a path 0 = a_0 < ... < a_m = L over chain positions; each step (a_{l-1}, a_l] is a segment
realised with one of its kernel options. Both look-up tables are keyed by ``(start, end, option)`` and are
joined on those keys: the reference code pairs the two tables' rows by position, which silently gives
a segment the wrong score whenever the tables are ordered differently.

A network of several chains (segments.ChainAnalysis.links) numbers their positions one after the other; at
each link p the path steps from p to p + 1 at no cost and no importance (the next chain's stem stays as it
is), so one DP over the concatenation is the per-chain DPs combined over one budget: the best path through
chains A then B within budget T is max over t of best_A(t) + best_B(T - t), which is exactly what the
(position, budget) table computes when it relaxes the link. Links never appear in a returned plan.

The objective is the additive surrogate of the paper (sum of per-entry importances under a sum of
per-entry latencies), solved exactly up to the latency rounding described in :func:`solve`.
"""

from __future__ import annotations

import ast
import math
import numbers
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from onnxmerge.errors import BadInputError, first_line

# The DP keeps a float64 value and an int32 back-pointer per (position, budget unit): about 300 MB here.
_MAX_CELLS = 25_000_000


@dataclass(frozen=True)
class Choice:
    """One joined table row: segment (start, end] realised with kernel option ``option``."""

    start: int
    end: int
    option: Hashable
    latency_ms: float
    importance: float


@dataclass
class Plan:
    """The chosen choices in chain order, with their exact (unrounded) latency and importance sums.

    ``resolution_ms`` is the latency unit the DP actually used (see :func:`solve`).

    JSON form: a ``str`` option is stored as is under ``"option"``; any other option is stored as its
    ``repr`` under ``"option_repr"`` and restored with :func:`ast.literal_eval`, which evaluates literals
    only, so a plan file cannot run code. Options whose ``repr`` is not a literal that reads back equal
    (arbitrary objects) cannot be written.
    """

    choices: list[Choice]
    latency_ms: float
    importance: float
    budget_ms: float
    resolution_ms: float

    def to_dict(self) -> dict:
        return {"choices": [{"start": c.start, "end": c.end, **_encode_option(c.option),
                             "latency_ms": c.latency_ms, "importance": c.importance} for c in self.choices],
                "latency_ms": self.latency_ms, "importance": self.importance,
                "budget_ms": self.budget_ms, "resolution_ms": self.resolution_ms}

    @classmethod
    def from_dict(cls, d: Mapping) -> Plan:
        try:
            choices = [Choice(int(c["start"]), int(c["end"]), _decode_option(c), float(c["latency_ms"]),
                              float(c["importance"])) for c in d["choices"]]
            return cls(choices, float(d["latency_ms"]), float(d["importance"]), float(d["budget_ms"]),
                       float(d["resolution_ms"]))
        except (KeyError, TypeError, ValueError, SyntaxError) as exc:
            raise BadInputError(f"not a depth-compression plan: {type(exc).__name__}: {first_line(exc)}") from exc


def _encode_option(option: Hashable) -> dict:
    if isinstance(option, str):
        return {"option": option}
    text = repr(option)
    try:
        reads_back = ast.literal_eval(text) == option
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        reads_back = False
    if not reads_back:
        raise BadInputError(f"kernel option {text} cannot be written to JSON: use a str, a number or a tuple "
                            f"of them")
    return {"option_repr": text}


def _decode_option(entry: Mapping) -> Hashable:
    option = entry["option"] if "option" in entry else ast.literal_eval(entry["option_repr"])
    hash(option)  # a list read back from a hand-edited file must fail here, not later inside a dict
    return option


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise BadInputError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _position(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadInputError(f"{what} must be an integer position, got {value!r}")
    return int(value)


def _checked_choice(start, end, option, latency, importance) -> Choice:
    """Validate one row; errors name its key, which is how the user finds it in their tables."""
    key = (start, end, option)
    start, end = _position(start, f"start of {key!r}"), _position(end, f"end of {key!r}")
    if not 0 <= start < end:
        raise BadInputError(f"segment {key!r} must satisfy 0 <= start < end")
    latency = _number(latency, f"latency of {key!r}")
    if latency < 0:
        raise BadInputError(f"latency of {key!r} is negative: {latency!r}")
    return Choice(start, end, option, latency, _number(importance, f"importance of {key!r}"))


def _chain_order(choice: Choice):
    # repr(option) makes the order, hence tie-breaking and the returned plan, independent of input order.
    return choice.end, choice.start, repr(choice.option)


def join_tables(latency: Mapping[tuple[int, int, Hashable], float],
                importance: Mapping[tuple[int, int, Hashable], float]) -> list[Choice]:
    """Join the two look-up tables on ``(start, end, option)``; a key in only one of them is an error."""
    for have, lack, missing in (("latency", "importance", set(latency) - set(importance)),
                                ("importance", "latency", set(importance) - set(latency))):
        if missing:
            names = sorted(map(repr, missing))
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise BadInputError(f"the {lack} table has no entry for {', '.join(names[:3])}{more} "
                                f"(present in the {have} table)")
    choices = []
    for key, value in latency.items():
        if not isinstance(key, tuple) or len(key) != 3:
            raise BadInputError(f"table key {key!r} is not (start, end, option)")
        choices.append(_checked_choice(*key, value, importance[key]))
    return sorted(choices, key=_chain_order)


class _Link:
    """The option of a link step (p, p + 1] between two chains: a sentinel no table can contain."""

    def __repr__(self) -> str:
        return "<link>"


_LINK = _Link()


def _checked(choices: Iterable[Choice], length: int, links: Collection[int] = ()) -> list[Choice]:
    """The rows validated, with a free step at every link, in chain order."""
    length = _position(length, "chain length")
    if length < 1:
        raise BadInputError(f"chain length must be at least 1, got {length}")
    links = sorted({_position(p, "link position") for p in links})
    if links and not (0 <= links[0] and links[-1] < length):
        raise BadInputError(f"link positions must lie in 0..{length - 1}, got {links}")
    checked, seen = [Choice(p, p + 1, _LINK, 0.0, 0.0) for p in links], set()
    for c in choices:
        c = _checked_choice(c.start, c.end, c.option, c.latency_ms, c.importance)
        if c.end > length:
            raise BadInputError(f"segment {(c.start, c.end, c.option)!r} ends past the chain length {length}")
        if (c.start, c.end, c.option) in seen:
            raise BadInputError(f"segment {(c.start, c.end, c.option)!r} is listed twice")
        crossed = next((p for p in links if c.start <= p < c.end), None)
        if crossed is not None:
            raise BadInputError(f"segment {(c.start, c.end, c.option)!r} spans the link at position {crossed}, where "
                                "one chain ends and the next begins")
        seen.add((c.start, c.end, c.option))
        checked.append(c)
    return sorted(checked, key=_chain_order)


def _without_links(path: list[Choice]) -> list[Choice]:
    return [c for c in path if c.option is not _LINK]


def _fastest(choices: list[Choice], length: int) -> tuple[list[Choice], Fraction]:
    """Fastest path in exact rational arithmetic (the budget test must not depend on summation order);
    among equally fast paths the more important one wins. ``choices`` must be in chain order."""
    best: list[tuple[Fraction, Fraction, Choice | None] | None] = [None] * (length + 1)
    best[0] = (Fraction(0), Fraction(0), None)
    for c in choices:
        if best[c.start] is not None:
            latency, neg_importance, _ = best[c.start]
            candidate = (latency + Fraction(c.latency_ms), neg_importance - Fraction(c.importance), c)
            if best[c.end] is None or candidate[:2] < best[c.end][:2]:
                best[c.end] = candidate
    if best[length] is None:
        furthest = max(p for p in range(length + 1) if best[p] is not None)
        raise BadInputError(f"the segments leave a gap: no plan gets past position {furthest} "
                            f"(the furthest position reachable from 0), so position {length} cannot be reached")
    path, position = [], length
    while position:
        path.append(best[position][2])
        position = path[-1].start
    return _without_links(path[::-1]), best[length][0]


def minimum_latency(choices: list[Choice], length: int, *, links: Collection[int] = ()) -> float:
    """Latency of the fastest plan covering 0..length (free steps at ``links``), exact (correctly rounded), in ms."""
    return float(_fastest(_checked(choices, length, links), length)[1])


def _distinct(a: float, b: float) -> tuple[str, str]:
    """Two numbers with enough decimals that unequal values do not print alike ("4.10 < 4.10")."""
    for digits in range(2, 18):
        sa, sb = f"{a:.{digits}f}", f"{b:.{digits}f}"
        if sa != sb:
            break
    return sa, sb


def solve(choices: list[Choice], length: int, budget_ms: float, *, resolution_ms: float | None = None,
          links: Collection[int] = ()) -> Plan:
    """The plan of highest total importance whose latency fits ``budget_ms``.

    ``links`` are the positions where one chain ends and the next begins (see the module docstring): the path
    steps over each for free, and no choice may span one.

    The DP runs over (position, budget units). The unit is ``budget_ms / round(budget_ms / resolution_ms)``,
    i.e. the requested resolution nudged so that the budget is a whole number of units; the default
    resolution, ``min(1e-3, budget_ms / 2000)``, is 1 us (well below batch-1 CPU timing noise) and never
    fewer than 2000 units; it is coarsened for budgets so large (hundreds of ms) that the table would not
    fit in memory, where an explicit ``resolution_ms`` is refused instead.

    Each latency is rounded UP to whole units, exactly (rational arithmetic), so a plan the DP accepts never
    exceeds the budget in true, unrounded latency. The price is that plans within the rounding margin of the
    budget are invisible: the result is exactly optimal among plans whose rounded latency fits, hence at
    least as good as any plan whose true latency is <= budget - (its segment count) x unit. If the budget is
    within that margin of the fastest plan, so that nothing fits after rounding, the fastest plan (which
    fits exactly) is returned. Among equally important plans the one with the fewest units wins.

    Raises ``BadInputError`` when the budget is below the fastest plan (naming its latency), when no path
    covers 0..length (naming the position where coverage ends), or on non-finite numbers.
    """
    choices = _checked(choices, length, links)
    budget = _number(budget_ms, "budget_ms")
    fastest, minimum = _fastest(choices, length)
    if Fraction(budget) < minimum:
        shown_budget, shown_minimum = _distinct(budget, float(minimum))
        raise BadInputError(f"budget {shown_budget} ms is below the fastest possible plan, {shown_minimum} ms")
    if budget <= 0:
        raise BadInputError(f"budget_ms must be positive, got {budget!r}")
    if resolution_ms is None:  # counted in units, as budget / 2000 can underflow
        ratio = max(2000.0, min(budget / 1e-3, _MAX_CELLS / (length + 1) - 1))
    else:
        resolution = _number(resolution_ms, "resolution_ms")
        if resolution <= 0:
            raise BadInputError(f"resolution_ms must be positive, got {resolution!r}")
        ratio = budget / resolution
    if not (length + 1) * (ratio + 1) <= _MAX_CELLS:
        raise BadInputError(f"the budget of {budget:g} ms is {ratio:.3g} units of resolution, more than the DP "
                            f"table holds for {length} positions: pass a coarser resolution_ms")
    units = max(1, round(ratio))
    unit = Fraction(budget) / units
    costs = [math.ceil(Fraction(c.latency_ms) / unit) for c in choices]
    path = _knapsack(choices, costs, length, units)
    path = fastest if path is None else _without_links(path)
    return Plan(path, math.fsum(c.latency_ms for c in path), math.fsum(c.importance for c in path), budget,
                float(unit))


def _knapsack(choices: list[Choice], costs: list[int], length: int, units: int) -> list[Choice] | None:
    """Best path with at most ``units`` total cost, or None. ``choices`` must be in chain order, so every
    segment ending at i is relaxed before any segment starting at i."""
    # value[j, t]: best importance over paths 0..j costing at most t units (-inf: none), hence monotone in t.
    value = np.full((length + 1, units + 1), -np.inf)
    value[0] = 0.0
    back = np.full((length + 1, units + 1), -1, dtype=np.int32)
    for index, (c, cost) in enumerate(zip(choices, costs)):
        if cost > units:
            continue
        candidate = value[c.start, :units + 1 - cost] + c.importance
        better = candidate > value[c.end, cost:]
        np.copyto(value[c.end, cost:], candidate, where=better)
        np.copyto(back[c.end, cost:], index, where=better)
    best = value[length, units]
    if best == -np.inf:
        return None
    spent = int(np.argmax(value[length] == best))  # fewest units reaching the optimum
    path, position = [], length
    while position:
        index = int(back[position, spent])
        path.append(choices[index])
        spent -= costs[index]
        position = choices[index].start
    return path[::-1]
