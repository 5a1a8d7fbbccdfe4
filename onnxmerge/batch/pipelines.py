"""What a batch does to each model, chosen by name (``--pipeline fold`` or ``compress``).

A pipeline's ``run`` executes inside the isolated worker process: ``run(source, output, options)`` writes
``output`` (or raises one of onnxmerge's errors) and returns the command's typed result as ``to_dict()``
(:mod:`onnxmerge.results`: the core every command shares, then its own fields). ``option_types`` are the
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

    return fold(source, output, **options).to_dict()


def _check_fold(options: dict) -> None:
    from onnxmerge.pipeline import select_passes

    select_passes(options.get("only"), options.get("skip"))  # unknown pass names are a config error


def _compress(source: Path, output: Path, options: dict) -> dict:
    """LayerMerge compression; its result fills the core itself (statistics, bench, verification None)."""
    from onnxmerge.layermerge.api import compress

    return compress(source, output, **options).to_dict()


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
                            "use pipeline='fold'")
    return pipeline
