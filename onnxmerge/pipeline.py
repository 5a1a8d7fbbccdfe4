"""Runs passes in order to a fixed point, keeping a log that lets verification replay any prefix."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from onnxmerge.errors import BadInputError
from onnxmerge.graph import export_graph, import_graph
from onnxmerge.io import clamp_ir_version
from onnxmerge.pass_framework import PASSES, PassContext, PassOptions, Refusal
from onnxmerge.passes import DEFAULT_PIPELINE

MAX_ROUNDS = 10


@dataclass
class Step:
    """One application of a pass that changed the graph."""

    round: int
    pass_name: str
    rewrites: int


@dataclass
class PipelineRun:
    model: onnx.ModelProto
    steps: list[Step]
    rounds: int
    converged: bool
    # Per pass (that refused anything), the refusals of its last round, in the order it met the nodes.
    refusals: dict[str, list[Refusal]] = field(default_factory=dict)

    def refusals_dict(self) -> dict[str, list[dict]]:
        """The refusals as the JSON report holds them: ``{pass_name: [refusal.to_dict(), ...]}``."""
        return {name: [refusal.to_dict() for refusal in found] for name, found in self.refusals.items()}

    def rewrites_per_pass(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for step in self.steps:
            counts[step.pass_name] = counts.get(step.pass_name, 0) + step.rewrites
        return counts


def select_passes(only: list[str] | None = None, skip: list[str] | None = None) -> list[str]:
    """The default pipeline narrowed by --only / --skip, in the default order."""
    for name in list(only or []) + list(skip or []):
        if name not in PASSES:
            raise BadInputError(f"unknown pass '{name}'; known passes: {', '.join(DEFAULT_PIPELINE)}")
    selected = [n for n in DEFAULT_PIPELINE if not only or n in only]
    return [n for n in selected if n not in set(skip or [])]


def run_pipeline(
    proto: onnx.ModelProto,
    pass_names: list[str],
    options: PassOptions | None = None,
    *,
    stop_after_steps: int | None = None,
) -> PipelineRun:
    """Apply ``pass_names`` round after round until no pass changes the graph (or MAX_ROUNDS).

    ``stop_after_steps`` replays only the first N graph-changing steps: verification uses it to find the
    first pass that breaks a model.
    """
    graph = import_graph(proto)
    ctx = PassContext(template=proto, options=options or PassOptions())
    passes = [PASSES[name]() for name in pass_names]
    steps: list[Step] = []
    refusals: dict[str, list[Refusal]] = {}
    converged = False
    rounds = 0
    while rounds < MAX_ROUNDS and not _reached(steps, stop_after_steps):
        rounds += 1
        changed = False
        for graph_pass in passes:
            ctx.ensure(graph, graph_pass.requires)
            result = graph_pass.run(graph, ctx)
            refusals[graph_pass.name] = list(result.refusals)
            if result.modified:
                changed = True
                ctx.shapes_current = ctx.shapes_current and graph_pass.preserves_shapes
                steps.append(Step(rounds, graph_pass.name, result.rewrites))
                if _reached(steps, stop_after_steps):
                    break
        if not changed:
            converged = True
            break
    model = export_graph(graph, proto)
    clamp_ir_version(model)
    return PipelineRun(model=model, steps=steps, rounds=rounds, converged=converged,
                       refusals={k: v for k, v in refusals.items() if v})


def _reached(steps: list[Step], limit: int | None) -> bool:
    return limit is not None and len(steps) >= limit
