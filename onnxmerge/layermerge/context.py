"""Latency in context: how the table's per-conv prices add up to the network's end-to-end latency.

The latency table prices each entry by the kernel time of its conv (and an unfused activation) in ORT's
per-node profile of a one-conv model (:mod:`onnxmerge.latency_table`): not the session's wall time, which
also pays the ``ReorderInput``/``ReorderOutput`` layout conversions a lone NCHWc conv needs and ORT's per-run
overhead, neither of which a conv inside a chain pays. Priced by wall time, a merged conv looked cheaper
relative to the convs it replaces than it is, so the DP favoured merges that did not deliver.

The part of the network the table does not cover (pooling, the head, layout conversions at the chain's ends,
ORT's per-run overhead) is read from a per-node profile of the original network: the chain convs' share of a
profiled run is the covered part (every chain conv but the chains' stems, which no entry prices), the rest is
``uncovered``. End to end, a plan whose table sum is ``t`` is
predicted to run at

    predict(t) = uncovered_ms + scale * t,   scale = (original_ms - uncovered_ms) / table_original

where ``table_original`` is the table's sum for the unchanged network, so ``predict(table_original)`` is the
measured ``original_ms`` exactly; ``scale`` absorbs what a conv costs in the network versus alone (caches,
threading). A target ``T`` becomes the DP's budget ``(T - uncovered_ms) / scale``.

When the profile names none of the chain's convs (an execution provider that reports nodes differently), the
uncovered part falls back to ``original_ms - table_original`` (at least 0) with ``scale = 1``, and
``source`` says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import onnx

from onnxmerge.trace import NodeBreakdown, ort_conv_names

@dataclass(frozen=True)
class LatencyModel:
    original_ms: float  # end to end, timed (median)
    uncovered_ms: float  # the part of original_ms outside the chain's convs
    table_original: float  # the table's sum for the unchanged network
    source: str  # how uncovered_ms was obtained
    chain_share: float | None = None  # chain convs' share of a profiled run, when read from a profile

    @property
    def scale(self) -> float:
        return (self.original_ms - self.uncovered_ms) / self.table_original if self.table_original > 0 else 1.0

    def predict(self, table_ms: float) -> float:
        """End-to-end latency of a plan whose table sum is ``table_ms``."""
        return self.uncovered_ms + self.scale * table_ms

    def budget(self, target_ms: float) -> float:
        """The DP's budget (table units) for an end-to-end ``target_ms`` (may be <= 0: unreachable)."""
        return (target_ms - self.uncovered_ms) / self.scale

    def to_dict(self) -> dict:
        return asdict(self) | {"scale": self.scale}


def latency_model(original_ms: float, table_original: float, breakdown: NodeBreakdown | None,
                  model: onnx.ModelProto, conv_nodes: list[str]) -> LatencyModel:
    """The :class:`LatencyModel` of a network from its timed latency, the table's sum for it and a per-node
    profile (None: fall back, see the module docstring)."""
    fallback_reason = "no per-node profile"
    if breakdown is not None and breakdown.model_run_us > 0:
        chain = set(conv_nodes)
        conv_of = ort_conv_names(model)
        chain_us = sum(row.mean_us for row in breakdown.nodes
                       if conv_of.get(row.name) in chain and "Conv" in row.op_type)
        if chain_us > 0:
            share = min(1.0, chain_us / breakdown.model_run_us)
            return LatencyModel(original_ms, original_ms * (1.0 - share), table_original,
                                "per-node profile of the original", share)
        fallback_reason = "the per-node profile names none of the chain's convs"
    return LatencyModel(original_ms, max(0.0, original_ms - table_original), table_original,
                        f"end to end minus the table's sum ({fallback_reason})")
