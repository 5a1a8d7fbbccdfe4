"""What a batch does to each model, chosen by name, so ``--pipeline compress`` plugs in when it exists.

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
    check: Callable[[dict], None] = lambda options: None  # semantic checks beyond the types


def _fold(source: Path, output: Path, options: dict) -> dict:
    from onnxmerge.api import fold

    return fold(source, output, **options).report


def _check_fold(options: dict) -> None:
    from onnxmerge.pipeline import select_passes

    select_passes(options.get("only"), options.get("skip"))  # unknown pass names are a config error


PIPELINES: dict[str, Pipeline] = {
    "fold": Pipeline(
        "fold",
        option_types={"input_shapes": dict, "check_n": int, "rtol": float, "atol": float, "skip": list,
                      "only": list, "seed": int, "noise_floor": bool, "allow_costlier_merges": bool},
        run=_fold,
        check=_check_fold,
    ),
    "compress": Pipeline("compress"),
}


def get_pipeline(name: str) -> Pipeline:
    pipeline = PIPELINES.get(name)
    if pipeline is None:
        raise BadInputError(f"unknown pipeline '{name}'; choose from: {', '.join(PIPELINES)}")
    if pipeline.run is None:
        raise BadInputError(f"the '{name}' pipeline is not available yet in this version of onnxmerge; "
                            "use --pipeline fold")
    return pipeline
