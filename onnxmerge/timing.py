"""Latency measurement in ORT: the one timing loop every speed figure of this project comes from."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class LatencyStats:
    """Summary of per-run latencies in milliseconds."""

    runs: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float

    @classmethod
    def from_samples(cls, seconds: np.ndarray) -> "LatencyStats":
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(runs=int(ms.size), median_ms=float(np.median(ms)), p90_ms=float(np.percentile(ms, 90)),
                   p99_ms=float(np.percentile(ms, 99)), mean_ms=float(ms.mean()), std_ms=float(ms.std()),
                   min_ms=float(ms.min()))

    def to_dict(self) -> dict:
        return asdict(self)


def time_interleaved(runners: list, runs: int = 50, warmup: int = 10) -> list[np.ndarray]:
    """Time several zero-argument callables in rounds (A B A B ...), returning seconds per run for each.

    Interleaving exposes every model to the same machine state (other load, thermal, frequency), so the
    per-round ratios of two models are far steadier than ratios of two separate timing runs.
    """
    for _ in range(warmup):
        for run in runners:
            run()
    samples = np.empty((len(runners), runs))
    for round_index in range(runs):
        for which, run in enumerate(runners):
            start = time.perf_counter_ns()
            run()
            samples[which, round_index] = (time.perf_counter_ns() - start) * 1e-9
    return list(samples)


@dataclass
class RatioStats:
    """Per-round speed-up of B over A (time A / time B): >1 means B is faster."""

    median: float
    p10: float
    p90: float

    @classmethod
    def from_samples(cls, a_seconds: np.ndarray, b_seconds: np.ndarray) -> "RatioStats":
        ratios = np.asarray(a_seconds) / np.asarray(b_seconds)
        return cls(median=float(np.median(ratios)), p10=float(np.percentile(ratios, 10)),
                   p90=float(np.percentile(ratios, 90)))
