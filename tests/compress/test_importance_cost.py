"""What the importance table costs: dominated entries are never scored, fit activations do not grow with the
calibration set, the ridge refit is gathered chunk by chunk with one Gram per geometry, and jobs default to the
available cores."""

import itertools
import math
import os
from fractions import Fraction

import numpy as np
import pytest

from onnxmerge.api import fold
from onnxmerge.conv_algebra import ConvParams
from onnxmerge.dataset import Dataset
from onnxmerge.io import save_model
from onnxmerge.layermerge import importance
from onnxmerge.layermerge.api import CompressOptions, available_cores, prepare
from onnxmerge.layermerge.build import SegmentChoice, merged_conv
from onnxmerge.layermerge.dp import join_tables, minimum_latency, solve
from onnxmerge.layermerge.importance import (ImportanceScorer, dominated_entries, is_original, option_key, refit,
                                             refit_geometry, refit_shared)
from onnxmerge.layermerge.segments import analyse_chain
from onnxmerge.runner import RuntimeSettings

from conftest import GraphBuilder

SHAPE = (1, 3, 8, 8)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Importance caches of these tests go to their own folder: a score read from an earlier run's cache is not
    scored, which is what several tests count."""
    monkeypatch.setenv("ONNXMERGE_CACHE_DIR", str(tmp_path / "cache"))


def _chain_model():
    """Stem, three 3x3 convs, a strided 3x3 conv, a 3x3 conv, then a linear classifier: 21 entries over 5
    positions (kernels up to 9x9 across the stride), small enough to enumerate every plan."""
    g = GraphBuilder(("N", 3, 8, 8))
    x = g.node("Relu", [g.conv("x", 3, 8, pads=[1, 1, 1, 1])])
    for _ in range(3):
        x = g.node("Relu", [g.conv(x, 8, 8, pads=[1, 1, 1, 1])])
    x = g.node("Relu", [g.conv(x, 8, 8, pads=[1, 1, 1, 1], strides=[2, 2])])
    x = g.node("Relu", [g.conv(x, 8, 8, pads=[1, 1, 1, 1])])
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
    weight = g.const(g.rng.standard_normal((5, 8)).astype(np.float32))
    return g.build(g.node("Gemm", [x, weight, g.const(np.zeros(5, np.float32))], transB=1))


def _images(count: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, *SHAPE[1:])).astype(np.float32)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chain")
    model = save_model(_chain_model(), folder / "model.onnx")
    np.savez(folder / "calib.npz", x=_images(32))
    labels = np.random.default_rng(1).integers(0, 5, 32)
    np.savez(folder / "labelled.npz", x=_images(32), labels=labels)
    return model, folder


def _fake_latency(options) -> tuple[dict, set]:
    """Latencies in eighths of a ms (exact in binary and in the DP's units): originals 1 ms (+1/8 per position),
    merges alternately cheaper than their span's originals, exactly as slow, and slower; and the keys that must
    be dominated."""
    original = {key[1]: 1.0 + 0.125 * key[1] for key, option in options.items() if is_original(key, option)}
    latency, dominated = {}, set()
    for index, (key, option) in enumerate(sorted(options.items())):
        if is_original(key, option):
            latency[key] = original[key[1]]
            continue
        span = sum(original[k] for k in range(key[0] + 1, key[1] + 1))
        latency[key] = [span - 0.375, span, span + 0.25][index % 3]
        if index % 3:
            dominated.add(key)
    return latency, dominated


def _best_by_brute_force(latency: dict, scores: dict, length: int, budget: float) -> float:
    by_segment = {}
    for key in latency:
        by_segment.setdefault(key[:2], []).append(key)
    best = -math.inf
    for cut in range(length):
        for inner in itertools.combinations(range(1, length), cut):
            points = (0, *inner, length)
            segments = list(zip(points, points[1:]))
            if all(s in by_segment for s in segments):
                for plan in itertools.product(*(by_segment[s] for s in segments)):
                    if sum(Fraction(latency[k]) for k in plan) <= Fraction(budget):
                        best = max(best, math.fsum(scores[k] for k in plan))
    return best


def _plan_keys(plan) -> list:
    return [(c.start, c.end, c.option) for c in plan.choices]


def test_dominated_entries_are_never_scored_and_every_plan_is_unchanged(chain, monkeypatch):
    model, folder = chain
    problem = prepare(model, folder / "calib.npz", RuntimeSettings(runs=3), input_shapes={"x": SHAPE})
    latency, expected = _fake_latency(problem.options)
    assert expected and len(expected) < len(problem.options) - problem.length

    scored = []
    real_score = ImportanceScorer.score

    def counting_score(self, choice, frontier_values, params=None, suffix=None):
        scored.append((choice.start, choice.end, option_key(choice.option)))
        return real_score(self, choice, frontier_values, params, suffix)

    monkeypatch.setattr(ImportanceScorer, "score", counting_score)
    problem.measure_tables(jobs=2, latency=latency)
    assert set(problem.skipped_entries) == expected == dominated_entries(latency, problem.options)
    assert problem.skipped_entries == {key: latency[key] for key in expected}
    assert not set(scored) & expected
    non_trivial = {key for key, option in problem.options.items() if not is_original(key, option)}
    assert set(scored) == non_trivial - expected  # every other merge is scored (composed, maybe refit too)
    assert set(problem.latency) == set(problem.importance) == set(problem.options) - expected

    # The same scorer with nothing skipped: the full tables the DP would have had before (scored again, not read
    # from the cache the first table filled).
    scored.clear()
    problem.scorer.use_cache = False
    full = problem.scorer.table([(s, e, problem.options[(s, e, k)]) for (s, e, k) in problem.options], jobs=2)
    assert set(scored) == non_trivial
    for key, entry in problem.importance.items():
        assert entry.score == pytest.approx(full[key].score, rel=1e-9, abs=1e-12)
        assert entry.method == full[key].method
    full_scores = {key: entry.score for key, entry in full.items()}
    assert all(score <= 0 for score in full_scores.values())
    kept = join_tables(problem.latency, {key: entry.score for key, entry in problem.importance.items()})
    everything = join_tables(latency, full_scores)
    fastest = minimum_latency(everything, problem.length)
    assert minimum_latency(kept, problem.length) == fastest
    budgets = np.arange(math.ceil(fastest * 8), sum(latency[k] for k, o in problem.options.items()
                                                     if is_original(k, o)) * 8 + 2) / 8
    for budget in budgets:
        with_skips, without = solve(kept, problem.length, budget), solve(everything, problem.length, budget)
        assert not set(_plan_keys(with_skips)) & expected
        assert _plan_keys(with_skips) == _plan_keys(without)
        assert with_skips.importance == pytest.approx(
            _best_by_brute_force(latency, full_scores, problem.length, budget), rel=1e-9, abs=1e-12)

    halfway = (fastest + problem.table_original_ms) / 2  # a target between the original and the fastest plan
    plan, _, rounds = problem.solve_for(problem.original_ms * halfway / problem.table_original_ms)
    assert rounds and not set(_plan_keys(plan)) & expected


def test_accuracy_scores_skip_nothing(chain):
    model, folder = chain
    problem = prepare(model, folder / "labelled.npz", RuntimeSettings(runs=3), input_shapes={"x": SHAPE})
    latency, expected = _fake_latency(problem.options)
    assert expected and problem.calibration.labels is not None
    assert not problem.scorer.scores_at_most_zero  # a change in accuracy can be positive: no proof of domination
    problem.measure_tables(latency=latency)
    assert problem.skipped_entries == {}
    assert set(problem.importance) == set(problem.latency) == set(problem.options)


def test_domination_needs_the_whole_original_span_and_is_exact():
    options = {(0, 1, "a"): _option((1,)), (1, 2, "a"): _option((2,)), (0, 2, "m"): _option((2,)),
               (2, 3, "x"): _option(()), (1, 3, "m"): _option((3,))}  # position 3 has no original entry
    # 0.1 + 0.7 rounds down in floats: a merge priced at that float is a hair cheaper than its span, exactly.
    assert Fraction(0.1 + 0.7) < Fraction(0.1) + Fraction(0.7)
    latency = {(0, 1, "a"): 0.1, (1, 2, "a"): 0.7, (0, 2, "m"): 0.1 + 0.7, (2, 3, "x"): 5.0, (1, 3, "m"): 9.0}
    assert dominated_entries(latency, options) == set()
    latency[(0, 2, "m")] = 0.8  # above the exact sum
    assert dominated_entries(latency, options) == {(0, 2, "m")}


def _option(kept):
    from onnxmerge.layermerge.segments import KernelOption

    return KernelOption(kernel=(3, 3), stride=(1, 1), depthwise=False, kept=tuple(kept), in_channels=8,
                        out_channels=8, input_hw=(8, 8))


def _scorer(canonical, analysis, images: np.ndarray, fit: int) -> ImportanceScorer:
    return ImportanceScorer(canonical, analysis, Dataset.of({"x": images[:fit]}),
                            holdout=Dataset.of({"x": images[-4:]}))


def test_sequential_refits_read_images_for_their_own_unknowns_only(monkeypatch):
    """A chosen segment's refit reads ROWS_PER_UNKNOWN rows per unknown of its own merged conv (at least
    MIN_REFIT_ROWS), never more images than the table read at its start."""
    monkeypatch.setattr(importance, "MAX_REFIT_ROWS", 2000)
    monkeypatch.setattr(importance, "MIN_REFIT_ROWS", 100)
    monkeypatch.setattr(importance, "ROWS_PER_UNKNOWN", 4)
    canonical = fold(_chain_model(), input_shapes={"x": SHAPE}).proto
    analysis = analyse_chain(canonical, {"x": SHAPE})
    scorer = _scorer(canonical, analysis, _images(68), 64)
    seen = set()
    for segment in analysis.segments:
        pixels = int(np.prod(analysis.convs[segment.end].output_shape[2:]))
        for option in segment.options:
            unknowns = option.in_channels // option.groups * int(np.prod(option.kernel)) + 1
            rows = min(2000, max(100, 4 * unknowns))
            images = scorer.refit_images(segment.start, segment.end, option)
            assert images == min(scorer.fit_images(segment.start), math.ceil(rows / pixels))
            seen.add(images < scorer.fit_images(segment.start))
    assert seen == {True, False}  # small merges read fewer images than the table; the largest are capped


def test_fit_activations_read_only_the_images_the_refit_rows_need(monkeypatch):
    monkeypatch.setattr(importance, "MAX_REFIT_ROWS", 100)
    canonical = fold(_chain_model(), input_shapes={"x": SHAPE}).proto
    analysis = analyse_chain(canonical, {"x": SHAPE})
    images = _images(68)
    read = []
    real_iter = importance.iter_batched

    def counting_iter(session, data, *args, **kwargs):
        read.append(Dataset.of(data).size)
        return real_iter(session, data, *args, **kwargs)

    monkeypatch.setattr(importance, "iter_batched", counting_iter)
    small, large = _scorer(canonical, analysis, images, 16), _scorer(canonical, analysis, images, 64)
    graph = small._graph
    for start in (0, 1, 4):
        segments = [s for s in analysis.segments if s.start == start]
        smallest_map = min(int(np.prod(analysis.convs[s.end].output_shape[2:])) for s in segments)
        need = math.ceil(100 / smallest_map)  # 100 rows of a 4x4 map: 7 images
        ends = sorted({s.end for s in segments})
        runs = []
        for scorer in (small, large):
            read.clear()
            inputs, targets = scorer.fit_activations(start, ends)
            assert read == [need] and len(inputs) == need and {len(t) for t in targets.values()} == {need}
            runs.append((inputs, targets))
        np.testing.assert_array_equal(runs[0][0], runs[1][0])
        for segment in segments:
            for option in segment.options:
                if SegmentChoice(start, segment.end, option).is_trivial:
                    continue
                params = merged_conv(analysis, graph, start, segment.end, option.kept)
                fits = [refit(params, inputs, targets[segment.end]) for inputs, targets in runs]
                assert fits[0] is not None
                np.testing.assert_array_equal(fits[0].weight, fits[1].weight)
                np.testing.assert_array_equal(fits[0].bias, fits[1].bias)
        # The final build's refit of one entry sees the very activations the table's did.
        merges = [SegmentChoice(start, s.end, o) for s in segments for o in s.options]
        for choice in [c for c in merges if not c.is_trivial][-1:]:
            params = merged_conv(analysis, graph, start, choice.end, choice.option.kept)
            np.testing.assert_array_equal(large.refit_params(choice).weight,
                                          refit(params, runs[1][0], runs[1][1][choice.end]).weight)
    # The held-out scoring still reads the whole held-out set.
    read.clear()
    frontier = large.held_out_frontier(0)
    assert read == [4] and {len(v) for v in frontier.values()} == {4}


def _dense_reference(params: ConvParams, inputs: np.ndarray, targets: np.ndarray, images: int) -> ConvParams:
    """The ridge refit restated with a whole float64 im2col over the first ``images`` images (the old code)."""
    (top, left), (bottom, right) = params.pads_begin, params.pads_end
    padded = np.pad(inputs[:images].astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (sh, sw) = params.kernel_shape, params.strides
    out_h, out_w = targets.shape[2:]
    taps = [padded[:, :, a:a + sh * (out_h - 1) + 1:sh, b:b + sw * (out_w - 1) + 1:sw]
            for a in range(kh) for b in range(kw)]
    patches = np.stack(taps, -1).transpose(0, 2, 3, 1, 4).reshape(-1, inputs.shape[1], kh * kw)
    flat = targets[:images].transpose(0, 2, 3, 1).reshape(-1, params.out_channels).astype(np.float64)
    rows = np.random.default_rng(0).permutation(len(patches))[:importance.MAX_REFIT_ROWS]
    patches, flat = patches[rows], flat[rows]
    groups, per_in = params.groups, params.in_channels // params.groups
    per_out = params.out_channels // groups
    weight, bias = np.zeros_like(params.weight), np.zeros(params.out_channels)
    for g in range(groups):
        design = np.concatenate([patches[:, g * per_in:(g + 1) * per_in].reshape(len(rows), -1),
                                 np.ones((len(rows), 1))], axis=1)
        gram = design.T @ design
        gram += importance.RIDGE * np.trace(gram) / len(gram) * np.eye(len(gram))
        out = slice(g * per_out, (g + 1) * per_out)
        solution = np.linalg.solve(gram, design.T @ flat[:, out])
        weight[out] = solution[:-1].T.reshape(weight[out].shape)
        bias[out] = solution[-1]
    return ConvParams.make(weight, bias, strides=params.strides, pads=params.pads, groups=groups)


@pytest.mark.parametrize("channels,groups,kernel,stride", [(6, 1, 3, 1), (6, 1, 5, 2), (12, 12, 7, 1), (8, 2, 3, 2)])
def test_chunked_refit_solves_the_dense_ridge_problem(monkeypatch, channels, groups, kernel, stride):
    monkeypatch.setattr(importance, "MAX_REFIT_ROWS", 300)
    monkeypatch.setattr(importance, "_CHUNK_VALUES", 2000)  # many row chunks ...
    monkeypatch.setattr(importance, "_BLOCK_COLUMNS", 60)  # ... and several blocks of groups
    rng = np.random.default_rng(kernel + stride)
    pad = kernel // 2
    params = ConvParams.make(rng.standard_normal((channels, channels // groups, kernel, kernel)),
                             rng.standard_normal(channels), strides=(stride, stride), pads=(pad,) * 4, groups=groups)
    inputs = rng.standard_normal((16, channels, 10, 10)).astype(np.float32)
    out = (10 + 2 * pad - kernel) // stride + 1
    targets = [rng.standard_normal((16, channels, out, out)).astype(np.float32) for _ in range(2)]
    images = math.ceil(300 / out ** 2)  # 3 or 12 of the 16
    for got, target in zip(refit_shared([params, params], inputs, targets), targets):
        want = _dense_reference(params, inputs, target, images)
        np.testing.assert_allclose(got.weight, want.weight, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(got.bias, want.bias, rtol=1e-7, atol=1e-9)
        alone = refit(params, inputs, target)  # the shared Gram gives each entry exactly its own refit
        np.testing.assert_array_equal(alone.weight, got.weight)
    # More images than the rows need change nothing.
    more = refit(params, np.concatenate([inputs, inputs[:3]]), np.concatenate([targets[0], targets[0][:3]]))
    np.testing.assert_array_equal(more.weight, refit(params, inputs, targets[0]).weight)
    other = ConvParams.make(params.weight, strides=(stride, stride), pads=(0,) * 4, groups=groups)
    assert refit_geometry(other) != refit_geometry(params)
    with pytest.raises(ValueError):
        refit_shared([params, other], inputs, targets)


def test_jobs_default_to_the_available_cores(monkeypatch):
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert CompressOptions().jobs == available_cores() == expected
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert CompressOptions().jobs == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert CompressOptions().jobs == 7
    assert CompressOptions(jobs=1).jobs == 1


def test_cli_jobs_default_and_help_name_the_available_cores():
    import argparse

    from onnxmerge.layermerge.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    compress = parser._subparsers._group_actions[0].choices["compress"]
    jobs = next(action for action in compress._actions if action.dest == "jobs")
    assert jobs.default == available_cores() and "cores available" in jobs.help
