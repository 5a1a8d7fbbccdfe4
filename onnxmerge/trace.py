"""Per-node and per-op-type latency from ORT's profiler, which only writes a Chrome-trace JSON.

ORT times each kernel it runs under the name of *its* graph, after optimization: fused nodes keep one
original name (or get a new one, e.g. ``<output>_nchwc``), layout changes add ``ReorderInput`` /
``ReorderOutput`` nodes. Rows therefore carry ORT's name and op; static costs are attached only where
that name is a node of the model.
"""

from __future__ import annotations

import bisect
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxmerge.errors import BadInputError, OnnxMergeError, first_line
from onnxmerge.io import ModelLike, atomic_write_bytes, load_model
from onnxmerge.runner import bound_runner, check_timing_options, make_session, session_options
from onnxmerge.stats import node_costs

_KERNEL_SUFFIX = "_kernel_time"
_LAYOUT_SUFFIX = "_nchwc"
# Ops ORT fuses into the Conv that feeds them (FusedConv, NCHWc Conv with activation or sum).
_FUSED_INTO_CONV = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "Add",
                              "BatchNormalization"})


@dataclass
class NodeTime:
    name: str  # ORT's node name (the model's where ORT kept it)
    op_type: str  # as ORT ran it, e.g. FusedConv where the model has Conv
    provider: str | None
    mean_us: float  # per run, all calls together
    share: float  # of total_node_us
    calls_per_run: float
    macs: int | None  # static, per call; None where the name is not a model node
    parameters: int | None
    gmacs_per_s: float | None


@dataclass
class OpTypeTime:
    op_type: str
    count: int  # distinct nodes, not calls
    total_us: float  # per run
    share: float


@dataclass
class NodeBreakdown:
    nodes: list[NodeTime]  # in execution order
    op_types: list[OpTypeTime]  # slowest first
    total_node_us: float  # mean per run of the summed kernel times
    model_run_us: float  # mean end-to-end ``model_run`` time; the gap is ORT's own overhead
    runs_kept: int

    def top(self, n: int | None = None) -> list[NodeTime]:
        ranked = sorted(self.nodes, key=lambda row: row.mean_us, reverse=True)
        return ranked if n is None else ranked[:n]

    def to_dict(self) -> dict:
        return asdict(self)


def profile_nodes(model: ModelLike, feeds: dict[str, np.ndarray], *, provider: str = "cpu", threads: int = 1,
                  opt_level: str = "all", runs: int = 20, trace_path: str | os.PathLike | None = None
                  ) -> NodeBreakdown:
    """Run a separate profiling session (the profiler slows every run, so never the timed one).

    The first run is dropped: it grows the memory arena and pays one-off kernel setup.
    """
    check_timing_options(runs, threads, opt_level)
    if trace_path is not None and not Path(trace_path).parent.is_dir():
        raise BadInputError(f"trace folder does not exist: {Path(trace_path).parent}")
    proto = load_model(model).proto
    with tempfile.TemporaryDirectory(prefix="onnxmerge-trace-") as folder:
        options = session_options(opt_level, threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "ort_profile")
        session = make_session(proto, provider=provider, options=options)
        wanted = {value.name for value in session.get_inputs()}
        if set(feeds) != wanted:
            raise BadInputError(f"feeds name {sorted(feeds)}, the model's inputs are {sorted(wanted)}")
        try:
            run = bound_runner(session, feeds, provider)
            for _ in range(runs + 1):
                run()
        except Exception as exc:  # ORT's error types are not public API
            raise BadInputError(f"the model does not run with the given feeds: {first_line(exc)}") from None
        raw = Path(session.end_profiling())
        if trace_path is not None:
            atomic_write_bytes(trace_path, raw.read_bytes())
        with open(raw) as handle:
            events = json.load(handle)
    costs = _costs_by_ort_name(proto, {name: tuple(value.shape) for name, value in feeds.items()})
    return _breakdown(events, costs, runs)


def ort_conv_names(proto: onnx.ModelProto) -> dict[str, str]:
    """Every name ORT's profile may give a Conv's kernel, mapped to the Conv's node name.

    At ENABLE_ALL on x86, ORT renames a Conv after the tensor it writes plus ``_nchwc``; when it fused an
    activation or a residual Add into the Conv, that tensor is the fused op's output. Such names are traced
    back to the Conv. A Conv ORT left alone (or ran as FusedConv) keeps its own name.
    """
    names = [node.name or f"{node.op_type}_{index}" for index, node in enumerate(proto.graph.node)]
    producers = {output: (node, name) for node, name in zip(proto.graph.node, names) for output in node.output}
    found = {name: name for node, name in zip(proto.graph.node, names) if node.op_type == "Conv"}
    for tensor, (node, name) in producers.items():
        while node.op_type in _FUSED_INTO_CONV and node.input and node.input[0] in producers:
            upstream, upstream_name = producers[node.input[0]]
            if upstream.op_type not in ("Conv",) + tuple(_FUSED_INTO_CONV):
                break
            node, name = upstream, upstream_name
        if node.op_type == "Conv":
            found.setdefault(tensor + _LAYOUT_SUFFIX, name)
    return found


def _costs_by_ort_name(proto, input_shapes: dict) -> dict[str, dict]:
    """Static costs keyed by every name ORT may give a node (:func:`ort_conv_names` for Convs)."""
    costs = node_costs(proto, input_shapes)
    by_ort_name = dict(costs)
    for ort_name, conv in ort_conv_names(proto).items():
        by_ort_name.setdefault(ort_name, costs[conv])
    return by_ort_name


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _breakdown(trace, costs: dict[str, dict], runs: int) -> NodeBreakdown:
    """Aggregate kernel events per kept run; fields are read defensively as they differ across ORT versions."""
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    events = [e for e in events if isinstance(e, dict) and _number(e.get("ts")) is not None
              and _number(e.get("dur")) is not None]
    model_runs = sorted((_number(e["ts"]), _number(e["dur"])) for e in events if e.get("name") == "model_run")
    # Keep the last ``runs``: that drops the warm-up and any run a runner made while binding (CUDA IOBinding).
    kept = model_runs[max(1, len(model_runs) - runs):]
    if not kept:
        raise OnnxMergeError("ORT's profile holds no model_run event after the warm-up run; cannot split it into runs")
    starts = [start for start, _ in kept]
    rows: dict[str, dict] = {}
    for event in events:
        name = event.get("name")
        if event.get("cat") != "Node" or not isinstance(name, str) or not name.endswith(_KERNEL_SUFFIX):
            continue
        ts, dur = _number(event["ts"]), _number(event["dur"])
        which = bisect.bisect_right(starts, ts) - 1
        if which < 0 or ts > kept[which][0] + kept[which][1]:
            continue  # outside every kept run: the warm-up run
        node_name = name[: -len(_KERNEL_SUFFIX)]
        args = event.get("args") if isinstance(event.get("args"), dict) else {}
        cost = costs.get(node_name, {})
        row = rows.setdefault(node_name, {"op_type": args.get("op_name") or cost.get("op_type") or "unknown",
                                          "provider": args.get("provider"), "us": 0.0, "calls": 0, "first": ts})
        row["us"] += dur
        row["calls"] += 1
        row["first"] = min(row["first"], ts)
    count = len(kept)
    total = sum(row["us"] for row in rows.values()) / count
    nodes = []
    for name, row in sorted(rows.items(), key=lambda item: item[1]["first"]):
        mean_us, calls = row["us"] / count, row["calls"] / count
        macs = costs.get(name, {}).get("macs")
        nodes.append(NodeTime(name=name, op_type=row["op_type"], provider=row["provider"], mean_us=mean_us,
                              share=mean_us / total if total else 0.0, calls_per_run=calls, macs=macs,
                              parameters=costs.get(name, {}).get("parameters"),
                              gmacs_per_s=macs / (mean_us / calls) / 1e3 if macs and mean_us else None))
    per_op: dict[str, list[float]] = {}
    for node in nodes:
        per_op.setdefault(node.op_type, []).append(node.mean_us)
    op_types = sorted((OpTypeTime(op_type=op, count=len(times), total_us=sum(times),
                                  share=sum(times) / total if total else 0.0) for op, times in per_op.items()),
                      key=lambda row: row.total_us, reverse=True)
    return NodeBreakdown(nodes=nodes, op_types=op_types, total_node_us=total,
                         model_run_us=sum(dur for _, dur in kept) / count, runs_kept=count)
