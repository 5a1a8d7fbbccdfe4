"""``profile`` and ``compare``: latency of a model in ORT with explicit, recorded session settings."""

from __future__ import annotations

from onnxmerge.environment import describe
from onnxmerge.io import ModelLike
from onnxmerge.memory import PeakRssSampler, cuda_memory_used_bytes
from onnxmerge.errors import BadInputError, first_line
from onnxmerge.prepared import InputShapes, PreparedModel, prepare
from onnxmerge.runner import RuntimeSettings, bound_runner, random_inputs
from onnxmerge.stats import model_stats
from onnxmerge.timing import LatencyStats, RatioStats, time_interleaved

DEFAULT_WARMUP = RuntimeSettings.warmup
DEFAULT_RUNS = RuntimeSettings.runs


class _Timed:
    """A prepared model with its session, feeds and the runner the timing loop calls."""

    def __init__(self, model: ModelLike | PreparedModel, settings: RuntimeSettings, input_shapes, seed: int):
        self.prepared = model if isinstance(model, PreparedModel) else prepare(model, input_shapes=input_shapes)
        self.path = str(self.prepared.path) if self.prepared.path else None
        self.feeds = random_inputs(self.prepared.specs, seed)
        self.session = settings.session(self.prepared.reference_path or self.prepared.proto,
                                        base_dir=self.prepared.base_dir)
        try:
            self.run = bound_runner(self.session, self.feeds, settings.provider)
            self.run()
        except Exception as exc:  # ORT's error types are not public API
            raise BadInputError(f"{self.path or 'the model'} does not run with inputs "
                                f"{self.input_shapes()}: {first_line(exc)}") from None

    def input_shapes(self) -> dict[str, list[int]]:
        return {name: list(shape) for name, shape in self.prepared.input_shapes.items()}


def _session_settings(timed: _Timed, settings: RuntimeSettings) -> dict:
    return {"providers": timed.session.get_providers(), "intra_op_threads": settings.threads, "inter_op_threads": 1,
            "execution_mode": "sequential", "opt_level": settings.opt_level, "cuda_graph": settings.cuda_graph}


def _environment(timed: _Timed, settings: RuntimeSettings) -> dict:
    return describe(settings.provider) | {"threads": settings.threads, "opt_level": settings.opt_level,
                                          "input_shapes": timed.input_shapes()}


def profile(model: ModelLike | PreparedModel, settings: RuntimeSettings | None = None, *,
            input_shapes: InputShapes | None = None, per_node: bool = False, trace: str | None = None,
            seed: int = 0, **overrides) -> dict:
    """Latency statistics, memory, static costs and (optionally) a per-node breakdown, as one report dict.

    ``settings`` says how ORT runs (provider, threads, opt level, CUDA graph, warm-up and timed runs);
    keyword ``overrides`` change single fields of it (``profile(path, runs=100)``).
    """
    settings = (settings or RuntimeSettings()).with_overrides(**overrides)
    timed = _Timed(model, settings, input_shapes, seed)
    with PeakRssSampler() as rss:
        (samples,) = time_interleaved([timed.run], runs=settings.runs, warmup=settings.warmup)
    report = {
        "model": timed.path,
        "environment": _environment(timed, settings),
        "session": _session_settings(timed, settings),
        "assumptions": timed.prepared.assumptions,
        "warmup": settings.warmup,
        "latency": LatencyStats.from_samples(samples).to_dict(),
        "memory": {"rss_before_bytes": rss.before, "peak_rss_bytes": rss.peak,
                   "device_bytes": cuda_memory_used_bytes() if settings.provider == "cuda" else None},
        "static": model_stats(timed.prepared.proto, timed.prepared.input_shapes),
    }
    if per_node or trace:
        from onnxmerge.trace import profile_nodes

        breakdown = profile_nodes(timed.prepared.proto, timed.feeds, provider=settings.provider,
                                  threads=settings.threads, opt_level=settings.opt_level, trace_path=trace)
        report["per_node"] = breakdown.to_dict()
    return report


def compare(model_a: ModelLike | PreparedModel, model_b: ModelLike | PreparedModel,
            settings: RuntimeSettings | None = None, *, input_shapes: InputShapes | None = None, seed: int = 0,
            **overrides) -> dict:
    """Time A and B interleaved (A B A B ...) in one run; the speed-up is the median of per-round A/B ratios."""
    settings = (settings or RuntimeSettings()).with_overrides(**overrides)
    timed = [_Timed(m, settings, input_shapes, seed) for m in (model_a, model_b)]
    if timed[0].input_shapes() != timed[1].input_shapes():
        raise BadInputError(f"the models take different inputs: {timed[0].input_shapes()} vs "
                            f"{timed[1].input_shapes()}")
    samples_a, samples_b = time_interleaved([t.run for t in timed], runs=settings.runs, warmup=settings.warmup)
    ratio = RatioStats.from_samples(samples_a, samples_b)
    return {
        "a": timed[0].path, "b": timed[1].path,
        "environment": _environment(timed[0], settings),
        "session": _session_settings(timed[0], settings),
        "assumptions": timed[0].prepared.assumptions,
        "warmup": settings.warmup,
        "latency_a": LatencyStats.from_samples(samples_a).to_dict(),
        "latency_b": LatencyStats.from_samples(samples_b).to_dict(),
        "speedup": {"median": ratio.median, "p10": ratio.p10, "p90": ratio.p90,
                    "meaning": "time(A) / time(B) per interleaved round; > 1 means B is faster"},
    }
