"""What a batch does to each model, chosen by name (``--pipeline fold`` or ``compress``).

A pipeline's ``run`` executes inside the isolated worker process: ``run(source, output, options)`` writes
``output`` (or raises one of onnxmerge's errors) and returns the report dict. ``option_types`` are the
per-model settings a batch config may give it, checked before any worker starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from onnxmerge.errors import BadInputError


@dataclass(frozen=True)
class Pipeline:
    name: str
    option_types: dict[str, type] = field(default_factory=dict)
    run: Callable[[Path, Path, dict], dict] | None = None  # None: named and planned, not built yet
    check: Callable[[dict], None] = lambda options: None  # a model's merged options, before any worker starts
    check_table: Callable[[dict], None] = lambda options: None  # one config table on its own, at load time


def _fold(source: Path, output: Path, options: dict) -> dict:
    from onnxmerge.api import fold

    return fold(source, output, **options).report


def _check_fold(options: dict) -> None:
    from onnxmerge.pipeline import select_passes

    select_passes(options.get("only"), options.get("skip"))  # unknown pass names are a config error


def _compress(source: Path, output: Path, options: dict) -> dict:
    """LayerMerge compression, its report shaped like fold's (before/after, verification, bench)."""
    from onnxmerge.io import load_model
    from onnxmerge.layermerge.api import compress
    from onnxmerge.runner import input_specs
    from onnxmerge.stats import model_stats

    options = dict(options)
    calibration = options.pop("calibration")
    given = {name: tuple(dims) for name, dims in options.pop("input_shapes", {}).items()}
    result = compress(source, output, calibration=calibration, input_shapes=given or None, **options)
    report = result.report
    original = load_model(source).proto
    shapes = {spec.name: spec.shape for spec in input_specs(original, given)}
    fidelity = report["fidelity"]
    return report | {
        "before": model_stats(original, shapes), "after": model_stats(result.proto, shapes),
        # Compression changes the function on purpose: "verified" means the written ONNX is exactly the
        # trained network; the error columns compare it with the original on held-out calibration inputs.
        "verification": {"passed": True, "max_abs_error": fidelity["max_abs_error"],
                         "top1_agreement": fidelity["top1_agreement"]},
        "bench": {"speedup": report["measured_speedup"]},
    }


def _check_compress_table(options: dict) -> None:
    if "speedup" in options and "latency_budget_ms" in options:
        raise BadInputError("give one of 'speedup' and 'latency_budget_ms', not both")


def _check_compress(options: dict) -> None:
    if not options.get("calibration"):
        raise BadInputError("the compress pipeline needs a 'calibration' file per model (batch config)")
    if ("speedup" in options) == ("latency_budget_ms" in options):
        raise BadInputError("the compress pipeline needs exactly one of 'speedup' and 'latency_budget_ms' "
                            "per model (batch config)")


PIPELINES: dict[str, Pipeline] = {
    "fold": Pipeline(
        "fold",
        option_types={"input_shapes": dict, "check_n": int, "rtol": float, "atol": float, "skip": list,
                      "only": list, "seed": int, "noise_floor": bool, "allow_costlier_merges": bool},
        run=_fold,
        check=_check_fold,
        check_table=_check_fold,
    ),
    "compress": Pipeline(
        "compress",
        option_types={"calibration": str, "speedup": float, "latency_budget_ms": float, "input_shapes": dict,
                      "recover_steps": int, "recover": bool, "lr": float, "jobs": int, "seed": int, "runs": int},
        run=_compress,
        check=_check_compress,
        check_table=_check_compress_table,
    ),
}


def get_pipeline(name: str) -> Pipeline:
    pipeline = PIPELINES.get(name)
    if pipeline is None:
        raise BadInputError(f"unknown pipeline '{name}'; choose from: {', '.join(PIPELINES)}")
    if pipeline.run is None:
        raise BadInputError(f"the '{name}' pipeline is not available yet in this version of onnxmerge; "
                            "use --pipeline fold")
    return pipeline
