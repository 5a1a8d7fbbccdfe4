"""More than one chain per network: an FPN's towers are chains of their own, the DP combines the chains over one
budget (links), and a plan merging on several chains builds, refits, recovers and keeps the outputs' names."""

import math
from fractions import Fraction

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxmerge.api import fold
from onnxmerge.errors import BadInputError
from onnxmerge.io import load_model
from onnxmerge.layermerge import plans
from onnxmerge.layermerge.api import CompressOptions, compress, prepare
from onnxmerge.layermerge.build import SegmentChoice, apply_segments
from onnxmerge.layermerge.dp import Choice, minimum_latency, solve
from onnxmerge.layermerge.importance import is_original
from onnxmerge.layermerge.segments import analyse_chain
from onnxmerge.runner import RuntimeSettings

from conftest import GraphBuilder, run_model


@pytest.fixture(scope="module")
def fpn(tmp_path_factory):
    """The models.fpn reference detector (random weights, BN folded by the exporter) at 1x3x64x64, and a small
    random calibration set."""
    from models.export import export

    folder = tmp_path_factory.mktemp("fpn")
    export("fpn", folder / "fpn.onnx")
    np.savez(folder / "calib.npz", input=np.random.default_rng(0).standard_normal((32, 3, 64, 64)).astype(np.float32))
    return folder


def _canonical(path):
    proto = load_model(path).proto
    return fold(proto, input_shapes={"input": (1, 3, 64, 64)}).proto


def _chain_of(analysis, position: int) -> int:
    return max(k for k, start in enumerate(analysis.chain_starts) if start <= position)


# --- analysis ----------------------------------------------------------------------------------------------------


def test_every_tower_of_an_fpn_is_a_chain(fpn):
    model = _canonical(fpn / "fpn.onnx")
    analysis = analyse_chain(model)
    assert len(analysis.chain_starts) == 3
    assert analysis.links == tuple(start - 1 for start in analysis.chain_starts[1:])
    by_chain = {}
    for conv in analysis.convs:
        by_chain.setdefault(_chain_of(analysis, conv.index), []).append(conv.node)
    # The longest path is the backbone into one level's tower; each other level's smoothing conv and tower
    # are a chain of their own, with the smoothing conv as its stem.
    assert any(name.startswith("/stages.") for name in by_chain[0])
    for chain in (1, 2):
        assert by_chain[chain][0].startswith("/smooth.")
        assert all(name.startswith("/towers.") for name in by_chain[chain][1:])
    towers = {name.split("/")[1] for chain in by_chain.values() for name in chain if name.startswith("/towers.")}
    assert towers == {"towers.0", "towers.1", "towers.2"}
    # Each tower's 1x1 output conv is its chain's head, kept aside.
    heads = [name for name, why in analysis.excluded.items() if why.startswith("head conv")]
    assert sorted(heads) == [f"/towers.{level}/towers.{level}.2/Conv" for level in range(3)]
    for segment in analysis.segments:  # no segment spans two chains or contains a stem
        assert _chain_of(analysis, segment.start) == _chain_of(analysis, segment.end)
        assert not set(range(segment.start + 1, segment.end + 1)) & set(analysis.chain_starts)
    assert {_chain_of(analysis, s.start) for s in analysis.segments if s.end - s.start > 1} == {0, 1, 2}
    for start in analysis.chain_starts[1:]:  # a later chain's first position is its stem's output
        stem = next(n for n in model.graph.node if n.name == analysis.convs[start].node)
        assert analysis.positions[start].tensor == stem.output[0]


def test_a_branch_with_nothing_to_merge_is_not_a_chain():
    """Main chain stem -> 3 convs; a side branch conv -> MaxPool -> conv has a break between its only two convs."""
    g = GraphBuilder((1, 3, 16, 16), seed=1)
    stem = g.node("Relu", [g.conv("x", 3, 8, pads=[1, 1, 1, 1])])
    main = g.relu_chain(stem, 3, 8)
    side = g.node("Relu", [g.conv(stem, 8, 8, pads=[1, 1, 1, 1])])
    side = g.node("MaxPool", [side], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    side = g.conv(side, 8, 8, pads=[1, 1, 1, 1])
    model = g.build(g.node("Add", [main, side]))
    analysis = analyse_chain(model)
    assert analysis.chain_starts == (0,) and analysis.links == ()
    side_convs = [n.name for n in model.graph.node if n.op_type == "Conv"][4:]
    assert all("nothing to merge" in analysis.excluded[name] for name in side_convs)


# --- the DP over several chains ----------------------------------------------------------------------------------


@st.composite
def two_chains(draw):
    """Two chains of 1-3 positions each, whole-ms latencies (exact DP units at resolution 1), every single step
    present so both chains are always covered."""
    lengths = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    chains = []
    for length in lengths:
        rows = []
        for start in range(length):
            for end in range(start + 1, length + 1):
                for k in range(1 if end == start + 1 else draw(st.integers(0, 2))):
                    rows.append((start, end, f"k{k}", draw(st.integers(1, 6)), draw(st.integers(-8, 0)) / 4))
                if end == start + 1:
                    rows.append((start, end, "o", draw(st.integers(2, 6)), 0.0))
        chains.append((length, rows))
    return chains


def _chain_best(rows, length: int, budget: int) -> float:
    """The best importance of one chain alone within ``budget`` (-inf when nothing fits)."""
    if budget < 1:
        return -math.inf
    choices = [Choice(*row) for row in rows]
    try:
        return solve(choices, length, float(budget), resolution_ms=1.0).importance
    except BadInputError:
        return -math.inf


@settings(max_examples=150, deadline=None)
@given(two_chains(), st.integers(2, 30))
def test_links_combine_the_per_chain_dps_over_one_budget(chains, budget):
    (length_a, rows_a), (length_b, rows_b) = chains
    # Chain B's positions follow chain A's: its stem ends position length_a + 1 (reached over the link).
    offset = length_a + 1
    choices = [Choice(*row) for row in rows_a] + [Choice(s + offset, e + offset, o, lat, imp)
                                                    for s, e, o, lat, imp in rows_b]
    length, links = length_a + length_b + 1, (length_a,)
    combined = max(_chain_best(rows_a, length_a, t) + _chain_best(rows_b, length_b, budget - t)
                   for t in range(budget + 1))
    fastest = minimum_latency(choices, length, links=links)
    assert fastest == minimum_latency([Choice(*r) for r in rows_a], length_a) + \
        minimum_latency([Choice(*r) for r in rows_b], length_b)
    if combined == -math.inf:
        with pytest.raises(BadInputError):
            solve(choices, length, float(budget), resolution_ms=1.0, links=links)
        return
    plan = solve(choices, length, float(budget), resolution_ms=1.0, links=links)
    assert plan.importance == pytest.approx(combined, abs=1e-12)
    assert sum(Fraction(c.latency_ms) for c in plan.choices) <= budget
    # The plan covers both chains and never shows the link: A's path to length_a, then B's from offset.
    assert [c.start for c in plan.choices] == [0] + [c.end if c.end != length_a else offset
                                                     for c in plan.choices[:-1]]
    assert plan.choices[-1].end == length


def test_a_choice_across_a_link_or_a_link_outside_the_chain_is_refused():
    choices = [Choice(0, 1, "o", 1.0, 0.0), Choice(2, 3, "o", 1.0, 0.0), Choice(1, 3, "x", 1.0, 0.0)]
    with pytest.raises(BadInputError, match="spans the link at position 1"):
        solve(choices, 3, 5.0, links=(1,))
    with pytest.raises(BadInputError, match="link positions"):
        solve(choices[:2], 3, 5.0, links=(3,))
    plan = solve(choices[:2], 3, 5.0, links=(1,))
    assert [(c.start, c.end) for c in plan.choices] == [(0, 1), (2, 3)]


# --- building and compressing several chains ---------------------------------------------------------------------


def _option(analysis, start, end, kept):
    segment = next(s for s in analysis.segments if (s.start, s.end) == (start, end))
    return next(o for o in segment.options if o.kept == kept)


def test_merging_a_later_chain_changes_only_its_own_output(fpn):
    """A two-conv merge on a tower chain equals that tower with its middle ReLU removed, away from the border
    where the pad-at-front form differs; the other levels' outputs stay exactly as they were."""
    model = _canonical(fpn / "fpn.onnx")
    analysis = analyse_chain(model)
    start = analysis.chain_starts[1]
    end = start + 2
    merged = apply_segments(model, analysis, [SegmentChoice(start, end, _option(analysis, start, end,
                                                                                (start + 1, end)))])
    relu = analysis.positions[start + 1].activation_nodes
    assert len(relu) == 1
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    node = next(n for n in reference.graph.node if n.name == relu[0])
    for other in reference.graph.node:
        other.input[:] = [node.input[0] if name == node.output[0] else name for name in other.input]
    reference.graph.node.remove(node)
    feeds = {"input": np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    got, want, original = run_model(merged, feeds), run_model(reference, feeds), run_model(model, feeds)
    level = next(i for i, out in enumerate(model.graph.output)
                 if not np.array_equal(got[i], original[i]))
    assert sum(not np.array_equal(a, b) for a, b in zip(got, original)) == 1
    np.testing.assert_allclose(got[level][..., 1:-1, 1:-1], want[level][..., 1:-1, 1:-1], rtol=1e-4, atol=1e-4)


def _fake_latency(options) -> dict:
    """An original conv 1 ms, a merge half a ms per position it spans: the fastest plan merges on every chain."""
    return {key: 1.0 if is_original(key, option) else 0.5 * (key[1] - key[0]) for key, option in options.items()}


def test_a_plan_across_chains_is_solved_refitted_and_recovered(fpn):
    problem = prepare(fpn / "fpn.onnx", fpn / "calib.npz", RuntimeSettings(runs=3))
    problem.measure_tables(jobs=2, latency=_fake_latency(problem.options))
    analysis = problem.analysis
    choices = plans.problem_choices(problem)
    fastest = minimum_latency(choices, problem.length, links=analysis.links)
    plan = solve(choices, problem.length, fastest, links=analysis.links)
    merged = [c for c in plan.choices if c.end - c.start > 1]
    assert {_chain_of(analysis, c.start) for c in merged} == {0, 1, 2}
    refit = plans.sequential_refit(problem, plan)
    assert {(s.start, s.end) for s in refit.segments} == {(c.start, c.end) for c in merged}
    student = plans.build(problem, plan, refit.overrides)
    assert [o.name for o in student.graph.output] == [o.name for o in problem.canonical.graph.output]
    refitted, _ = plans.joint_fidelity(problem, student)
    composed, _ = plans.joint_fidelity(problem, plans.build(problem, plan))
    assert refitted > composed  # each refit sees what the segments before it (any chain) did
    trained = problem.recover(student, plan, CompressOptions(speedup=1.2, recover_steps=8, lr=1e-3))
    assert trained.model.graph.output[0].name == problem.canonical.graph.output[0].name


def test_compress_keeps_every_output_of_a_multi_chain_net(fpn, tmp_path):
    result = compress(fpn / "fpn.onnx", tmp_path / "out.onnx", calibration=fpn / "calib.npz", speedup=1.2,
                      recover=False, runs=5, cache_dir=tmp_path / "cache")
    written = onnx.load(str(tmp_path / "out.onnx"))
    original = onnx.load(str(fpn / "fpn.onnx"))
    assert [o.name for o in written.graph.output] == [o.name for o in original.graph.output]
    feeds = {"input": np.zeros((1, 3, 64, 64), np.float32)}
    assert [a.shape for a in run_model(written, feeds)] == [a.shape for a in run_model(original, feeds)]
    assert result.to_dict()["plan"]["choices"]


def test_inspect_tables_say_which_chain_each_conv_is_on(fpn):
    from rich.console import Console

    from onnxmerge.layermerge.report import chain_tables

    analysis = analyse_chain(_canonical(fpn / "fpn.onnx"))
    console = Console(record=True, width=400)
    for table in chain_tables(analysis):
        console.print(table)
    text = console.export_text()
    assert "conv chains: positions 0..16" in text
    assert f"3 chains, starting at convs {', '.join(map(str, analysis.chain_starts))}" in text
    rows = [line for line in text.splitlines() if "/towers." in line and "Conv" in line and "head conv" not in line]
    chains = {line.split("│")[1].strip() for line in rows}
    assert chains == {"0", "1", "2"}
