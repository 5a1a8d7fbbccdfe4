"""Per-node profiling on real ORT sessions: names, static costs and totals must agree with the model."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from rich.console import Console

from onnxmerge.errors import BadInputError
from onnxmerge.stats import node_costs
from onnxmerge.report import breakdown_tables
from onnxmerge.trace import profile_nodes

from conftest import GraphBuilder

SHAPE = (1, 3, 16, 16)
RUNS = 5


@pytest.fixture(scope="module")
def model():
    builder = GraphBuilder(SHAPE)
    y = builder.conv("x", 3, 8, pads=[1, 1, 1, 1])
    y = builder.node("Relu", [y])
    y = builder.conv(y, 8, 8, pads=[1, 1, 1, 1])
    return builder.build(builder.node("GlobalAveragePool", [y]))


@pytest.fixture(scope="module")
def feeds():
    return {"x": np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)}


@pytest.fixture(scope="module")
def unoptimized(model, feeds):
    return profile_nodes(model, feeds, opt_level="disable", runs=RUNS)


def test_every_model_node_appears_with_its_op_and_costs(model, feeds, unoptimized):
    costs = node_costs(model, {"x": SHAPE})
    rows = {row.name: row for row in unoptimized.nodes}
    assert {name: row.op_type for name, row in rows.items()} == {n.name: n.op_type for n in model.graph.node}
    assert [row.name for row in unoptimized.nodes] == [n.name for n in model.graph.node]  # execution order
    for name, cost in costs.items():
        assert rows[name].macs == cost["macs"] and rows[name].parameters == cost["parameters"]
        assert rows[name].provider == "CPUExecutionProvider"
        assert rows[name].calls_per_run == 1
    convs = [row for row in unoptimized.nodes if row.op_type == "Conv"]
    assert all(row.macs > 0 and row.gmacs_per_s > 0 for row in convs)
    assert all(row.gmacs_per_s is None for row in unoptimized.nodes if row.op_type != "Conv")


def test_kernel_times_fit_inside_the_runs(unoptimized):
    total = sum(row.mean_us for row in unoptimized.nodes)
    assert total == pytest.approx(unoptimized.total_node_us)
    assert 0 < total <= unoptimized.model_run_us
    assert sum(row.share for row in unoptimized.op_types) == pytest.approx(1.0)
    assert sum(row.share for row in unoptimized.nodes) == pytest.approx(1.0)
    assert unoptimized.runs_kept == RUNS
    conv = next(row for row in unoptimized.op_types if row.op_type == "Conv")
    assert conv.count == 2


def test_top_is_sorted_by_time(unoptimized):
    top = unoptimized.top(2)
    assert len(top) == 2
    assert top[0].mean_us >= top[1].mean_us >= max(row.mean_us for row in unoptimized.nodes if row not in top)


def test_optimized_graph_with_renamed_and_fused_nodes(model, feeds):
    breakdown = profile_nodes(model, feeds, opt_level="all", runs=RUNS)
    model_names = {node.name for node in model.graph.node}
    assert breakdown.nodes and breakdown.total_node_us > 0 and breakdown.runs_kept == RUNS
    assert 0 < breakdown.total_node_us <= breakdown.model_run_us
    assert sum(row.share for row in breakdown.op_types) == pytest.approx(1.0)
    costs = node_costs(model, {name: value.shape for name, value in feeds.items()})
    conv_macs = sorted(c["macs"] for c in costs.values() if c["op_type"] == "Conv")
    renamed_convs = sorted(row.macs for row in breakdown.nodes
                           if row.name not in model_names and row.name.endswith("_nchwc") and row.op_type == "Conv")
    if renamed_convs:  # x86 NCHWc layout: convs are named after (fused) output tensors, costs still attach
        assert renamed_convs == conv_macs
    for row in breakdown.nodes:
        if row.name not in model_names and not row.name.endswith("_nchwc"):
            assert row.macs is None and row.parameters is None and row.gmacs_per_s is None


def test_trace_path_keeps_the_raw_trace(model, feeds, tmp_path):
    target = tmp_path / "trace.json"
    profile_nodes(model, feeds, opt_level="disable", runs=2, trace_path=target)
    events = json.loads(target.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    assert sum(event["name"] == "model_run" for event in events) == 3  # the warm-up run is in the raw trace
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json"]  # no temporary file left behind


def test_dict_and_tables(unoptimized):
    json.dumps(unoptimized.to_dict())
    assert unoptimized.to_dict()["runs_kept"] == RUNS
    console = Console(file=io.StringIO(), width=200, record=True)
    tables = breakdown_tables(unoptimized.to_dict(), top=3)
    assert len(tables) == 2
    for table in tables:
        console.print(table)
    text = console.export_text()
    for row in unoptimized.top(3):
        assert row.name in text
    for row in unoptimized.op_types:
        assert row.op_type in text


@pytest.mark.parametrize("kwargs, message", [
    ({"runs": 0}, "runs >= 1"),
    ({"threads": 0}, "threads must be >= 1"),
    ({"opt_level": "max"}, "unknown opt level"),
    ({"trace_path": "/nonexistent-folder/trace.json"}, "trace folder does not exist"),
])
def test_bad_arguments(model, feeds, kwargs, message):
    with pytest.raises(BadInputError, match=message):
        profile_nodes(model, feeds, **kwargs)


def test_wrong_feed_names(model):
    with pytest.raises(BadInputError, match="model's inputs"):
        profile_nodes(model, {"y": np.zeros(SHAPE, np.float32)}, runs=1)


def test_feeds_the_model_cannot_run(model):
    with pytest.raises(BadInputError, match="does not run with the given feeds"):
        profile_nodes(model, {"x": np.zeros((1, 5, 16, 16), np.float32)}, runs=1)
