"""Latency in context: entries priced by kernel time, the uncovered part read from a per-node profile of the
original, and the latency model that turns a target into the DP's budget."""

import numpy as np
import pytest

from onnxmerge.api import fold
from onnxmerge.latency_table import ConvSignature, conv_model, kernel_time_ms, measure
from onnxmerge.layermerge.context import LatencyModel, latency_model
from onnxmerge.layermerge.segments import analyse_chain
from onnxmerge.runner import RuntimeSettings, input_specs, random_inputs
from onnxmerge.trace import ort_conv_names, profile_nodes

from conftest import GraphBuilder

SHAPE = (1, 3, 32, 32)


def _net():
    g = GraphBuilder(("N", 3, 32, 32))
    x = g.node("Relu", [g.conv("x", 3, 16, pads=[1, 1, 1, 1])])
    for _ in range(3):
        x = g.node("Relu", [g.conv(x, 16, 16, pads=[1, 1, 1, 1])])
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
    weight = g.const(g.rng.standard_normal((10, 16)).astype(np.float32))
    return g.build(g.node("Gemm", [x, weight, g.const(np.zeros(10, np.float32))], transB=1))


def test_kernel_time_leaves_out_layout_conversions_and_run_overhead(tmp_path):
    # A small conv: its session wall time is mostly ORT's per-run overhead and the NCHWc reorders, so the
    # kernel time is well below it even on a busy machine.
    signature = ConvSignature(in_channels=16, out_channels=16, kernel=1, input_hw=(14, 14), activation="relu")
    table = measure([signature], RuntimeSettings(runs=20), cache_dir=tmp_path)
    kernel, wall = table.kernel_ms(signature), table[signature].median_ms
    assert 0 < kernel < wall
    again = measure([signature], RuntimeSettings(runs=20), cache_dir=tmp_path)
    assert again.hits == 1 and again.kernel_ms(signature) == kernel  # cached with the entry
    assert kernel_time_ms(conv_model(signature), RuntimeSettings(runs=20)) > 0


def test_the_profile_names_every_chain_conv_and_the_model_reproduces_the_original():
    shapes = {"x": SHAPE}
    model = fold(_net(), input_shapes=shapes).proto
    analysis = analyse_chain(model, shapes)
    breakdown = profile_nodes(model, random_inputs(input_specs(model, shapes), 0), runs=10)
    names = {}
    for ort_name, conv in ort_conv_names(model).items():
        names.setdefault(conv, set()).add(ort_name)
    names = {conv: names.get(conv, set()) for conv in (c.node for c in analysis.convs)}
    profiled = {row.name for row in breakdown.nodes if "Conv" in row.op_type}
    assert len(names) == len(analysis.convs) == 4
    assert all(candidates & profiled for candidates in names.values())  # each chain conv found in the profile
    result = latency_model(2.0, 1.2, breakdown, model, [c.node for c in analysis.convs])
    assert result.source.startswith("per-node profile") and 0 < result.chain_share <= 1
    assert 0 <= result.uncovered_ms < 2.0
    assert result.predict(1.2) == pytest.approx(2.0)  # the unchanged network is predicted at its measured time


def test_without_a_profile_the_model_falls_back_and_says_why():
    result = latency_model(2.0, 1.5, None, None, [])
    assert result.uncovered_ms == pytest.approx(0.5) and result.scale == pytest.approx(1.0)
    assert "no per-node profile" in result.source
    over = latency_model(2.0, 4.0, None, None, [])  # a table that over-counts is scaled down, never negative
    assert over.uncovered_ms == 0 and over.predict(4.0) == pytest.approx(2.0)


def test_budget_inverts_predict():
    model = LatencyModel(original_ms=10.0, uncovered_ms=2.0, table_original=4.0, source="test")
    assert model.scale == pytest.approx(2.0)
    for target in (3.0, 6.5, 10.0):
        assert model.predict(model.budget(target)) == pytest.approx(target)
    assert model.budget(1.5) < 0  # below the uncovered part: no plan can reach it
