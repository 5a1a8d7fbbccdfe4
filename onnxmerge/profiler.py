"""``profile`` and ``compare``: latency of a model in ORT with explicit, recorded session settings."""

from __future__ import annotations

from onnxmerge.environment import describe
from onnxmerge.io import ModelLike, load_model
from onnxmerge.memory import PeakRssSampler, cuda_memory_used_bytes
from onnxmerge.errors import BadInputError, first_line
from onnxmerge.runner import bound_runner, check_timing_options, input_specs, make_session, parse_input_shapes, random_inputs
from onnxmerge.stats import model_stats
from onnxmerge.timing import LatencyStats, RatioStats, time_interleaved

DEFAULT_WARMUP = 10
DEFAULT_RUNS = 50


class _Prepared:
    """A loaded model with its session, feeds and the runner the timing loop calls."""

    def __init__(self, model: ModelLike, shapes: dict, *, provider: str, threads: int, opt_level: str,
                 cuda_graph: bool, seed: int):
        loaded = load_model(model)
        self.path = str(loaded.path) if loaded.path else None
        self.proto = loaded.proto
        self.specs = input_specs(self.proto, shapes)
        self.feeds = random_inputs(self.specs, seed)
        self.session = make_session(loaded.path or self.proto, opt_level=opt_level, threads=threads,
                                    provider=provider, cuda_graph=cuda_graph)
        try:
            self.run = bound_runner(self.session, self.feeds, provider)
            self.run()
        except Exception as exc:  # ORT's error types are not public API
            raise BadInputError(f"{self.path or 'the model'} does not run with inputs "
                                f"{self.input_shapes()}: {first_line(exc)}") from None

    def input_shapes(self) -> dict[str, list[int]]:
        return {spec.name: list(spec.shape) for spec in self.specs}

    def assumptions(self) -> list[str]:
        return [note for spec in self.specs for note in spec.assumed]


def _session_settings(prepared: _Prepared, threads: int, opt_level: str, cuda_graph: bool) -> dict:
    return {"providers": prepared.session.get_providers(), "intra_op_threads": threads, "inter_op_threads": 1,
            "execution_mode": "sequential", "opt_level": opt_level, "cuda_graph": cuda_graph}


def profile(model: ModelLike, *, provider: str = "cpu", threads: int = 1, warmup: int = DEFAULT_WARMUP,
            runs: int = DEFAULT_RUNS, input_shapes: dict | list[str] | None = None, opt_level: str = "all",
            per_node: bool = False, trace: str | None = None, cuda_graph: bool = False, seed: int = 0) -> dict:
    """Latency statistics, memory, static costs and (optionally) a per-node breakdown, as one report dict."""
    check_timing_options(runs, threads, opt_level, warmup)
    shapes = parse_input_shapes(input_shapes) if isinstance(input_shapes, list) else input_shapes
    prepared = _Prepared(model, shapes, provider=provider, threads=threads, opt_level=opt_level,
                         cuda_graph=cuda_graph, seed=seed)
    with PeakRssSampler() as rss:
        (samples,) = time_interleaved([prepared.run], runs=runs, warmup=warmup)
    report = {
        "model": prepared.path,
        "environment": describe(provider) | {"threads": threads, "opt_level": opt_level,
                                             "input_shapes": prepared.input_shapes()},
        "session": _session_settings(prepared, threads, opt_level, cuda_graph),
        "assumptions": prepared.assumptions(),
        "warmup": warmup,
        "latency": LatencyStats.from_samples(samples).to_dict(),
        "memory": {"rss_before_bytes": rss.before, "peak_rss_bytes": rss.peak,
                   "device_bytes": cuda_memory_used_bytes() if provider == "cuda" else None},
        "static": model_stats(prepared.proto, {s.name: s.shape for s in prepared.specs}),
    }
    if per_node or trace:
        from onnxmerge.trace import profile_nodes

        breakdown = profile_nodes(prepared.proto, prepared.feeds, provider=provider, threads=threads,
                                  opt_level=opt_level, trace_path=trace)
        report["per_node"] = breakdown.to_dict()
    return report


def compare(model_a: ModelLike, model_b: ModelLike, *, provider: str = "cpu", threads: int = 1,
            warmup: int = DEFAULT_WARMUP, runs: int = DEFAULT_RUNS, input_shapes: dict | list[str] | None = None,
            opt_level: str = "all", cuda_graph: bool = False, seed: int = 0) -> dict:
    """Time A and B interleaved (A B A B ...) in one run; the speed-up is the median of per-round A/B ratios."""
    check_timing_options(runs, threads, opt_level, warmup)
    shapes = parse_input_shapes(input_shapes) if isinstance(input_shapes, list) else input_shapes
    prepared = [_Prepared(m, shapes, provider=provider, threads=threads, opt_level=opt_level,
                          cuda_graph=cuda_graph, seed=seed) for m in (model_a, model_b)]
    if prepared[0].input_shapes() != prepared[1].input_shapes():
        raise BadInputError(f"the models take different inputs: {prepared[0].input_shapes()} vs "
                            f"{prepared[1].input_shapes()}")
    samples_a, samples_b = time_interleaved([p.run for p in prepared], runs=runs, warmup=warmup)
    ratio = RatioStats.from_samples(samples_a, samples_b)
    return {
        "a": prepared[0].path, "b": prepared[1].path,
        "environment": describe(provider) | {"threads": threads, "opt_level": opt_level,
                                             "input_shapes": prepared[0].input_shapes()},
        "session": _session_settings(prepared[0], threads, opt_level, cuda_graph),
        "assumptions": prepared[0].assumptions(),
        "warmup": warmup,
        "latency_a": LatencyStats.from_samples(samples_a).to_dict(),
        "latency_b": LatencyStats.from_samples(samples_b).to_dict(),
        "speedup": {"median": ratio.median, "p10": ratio.p10, "p90": ratio.p90,
                    "meaning": "time(A) / time(B) per interleaved round; > 1 means B is faster"},
    }
