"""The importance table on a trained digits ResNet (residual blocks): the walked activations equal full passes,
cross-entropy scores with labels, the held-out size rule, and the on-disk cache (hits score nothing, any change
of model or data misses, a damaged file is rescored, an interrupted table resumes)."""

import math

import numpy as np
import onnx
import pytest

from models.registry import DIGITS_SHAPE
from onnxmerge.api import fold
from onnxmerge.dataset import Dataset, run_batched
from onnxmerge.layermerge import importance
from onnxmerge.layermerge.build import SegmentChoice, apply_segments, merged_conv
from onnxmerge.layermerge.importance import (ImportanceScorer, _Walk, frontier, option_key, rows_for_noise,
                                             span_model, suffix_model)
from onnxmerge.layermerge.segments import analyse_chain
from onnxmerge.runner import make_session

SHAPES = {"input": DIGITS_SHAPE}


@pytest.fixture(scope="module")
def digits(trained_digits):
    """(canonical model, analysis, fit rows, held-out rows, held-out labels) of the trained digits ResNet."""
    from models.digits import load_digits_split

    trained = trained_digits("resnet")
    canonical = fold(trained.model, input_shapes=SHAPES).proto
    analysis = analyse_chain(canonical, SHAPES)
    _, y_train, _, _ = load_digits_split(0)
    x = trained.x_calib
    return canonical, analysis, x[:48], x[48:112], y_train[48:112]


def _entries(analysis, limit=None):
    entries = [(s.start, s.end, o) for s in analysis.segments for o in s.options]
    return entries if limit is None else [e for e in entries if e[0] < limit]


def _scorer(digits, tmp_path, **kwargs):
    canonical, analysis, fit, held_out, _ = digits
    return ImportanceScorer(canonical, analysis, {"input": fit}, holdout={"input": held_out},
                            cache_dir=tmp_path / "cache", **kwargs)


def _plain(table):
    return {key: (entry.score, entry.agreement, entry.method) for key, entry in table.items()}


def test_walked_frontiers_equal_full_passes(digits, tmp_path):
    canonical, analysis, _, held_out, _ = digits
    scorer = _scorer(digits, tmp_path, use_cache=False)
    starts = sorted({s.start for s in analysis.segments})
    names = [frontier(canonical, analysis.positions[start].tensor) for start in starts]
    assert any(len(n) > 1 for n in names)  # residual sources cross some starts: the frontier is not one tensor
    data = Dataset.of({"input": held_out})
    for a, b in zip(names, names[1:]):  # each step runs only the graph between two starts
        inputs = {name: np.zeros((1, 1), np.float32) for name in a}
        assert span_model(canonical, inputs, [n for n in b if n not in a]) is not None
    walk = _Walk(scorer, data)
    # Rows grow, shrink and grow again: extra rows come from the prefix, fewer are a slice.
    rows = [5, 9, 9, 3, 12, 64] + [64] * len(starts)
    for start, count in zip(starts, rows):
        walked = walk.at(start, count)
        full = scorer._prefix(frontier(canonical, analysis.positions[start].tensor), data.rows(slice(0, count)))
        assert list(walked) == list(full) and walked
        for name in full:
            assert walked[name].shape == full[name].shape
            np.testing.assert_allclose(walked[name], full[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(AssertionError):  # the comparison can fail: a different start's frontier differs
        np.testing.assert_allclose(next(iter(walk.at(starts[-1], 64).values())),
                                   next(iter(scorer._prefix(names[1], data).values())), rtol=1e-5)


def test_walked_table_equals_per_start_full_passes(digits, tmp_path):
    canonical, analysis, _, _, _ = digits
    scorer = _scorer(digits, tmp_path, use_cache=False)
    entries = _entries(analysis, limit=4)
    walked = scorer.table(entries, jobs=2)
    assert {entry.method for entry in walked.values()} >= {"refit", "original"}
    by_start = {}
    for start, end, option in entries:
        by_start.setdefault(start, []).append((end, option))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # the old path: every frontier and fit activation from the graph inputs
        full = {(e.start, e.end, e.option): e for start, group in sorted(by_start.items())
                for e in scorer._score_start(start, group, pool, True)}
    assert set(full) == set(walked)
    for key, entry in walked.items():
        assert entry.score == pytest.approx(full[key].score, rel=1e-4, abs=1e-7), key
        assert entry.method == full[key].method


def test_labels_score_the_change_in_cross_entropy(digits, tmp_path):
    canonical, analysis, fit, held_out, labels = digits
    scorer = ImportanceScorer(canonical, analysis, {"input": fit}, holdout={"input": held_out}, labels=labels,
                              use_cache=False, held_out_rows=len(held_out))
    assert not scorer.scores_at_most_zero
    entries = _entries(analysis)
    table = scorer.table(entries, use_refit=False)
    trivial = [key for key, entry in table.items() if entry.method == "original"]
    assert trivial and all(table[key].score == 0.0 for key in trivial)

    def cross_entropy(model):
        logits = make_session(model).run(None, {"input": held_out})[0].astype(np.float64)
        shifted = logits - logits.max(1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
        return -float(np.mean(logp[np.arange(len(labels)), labels]))

    original = cross_entropy(canonical)
    worst = min((key for key in table if key not in trivial), key=lambda key: table[key].score)
    option = next(o for s, e, o in entries if (s, e, option_key(o)) == worst)
    params = merged_conv(analysis, scorer._graph, worst[0], worst[1], option.kept)
    merged = apply_segments(canonical, analysis, [SegmentChoice(worst[0], worst[1], option)],
                            overrides={worst[:2]: params})
    hurt = cross_entropy(merged) - original
    assert hurt > 0.01  # the worst merge of a trained net makes its predictions worse ...
    assert table[worst].score == pytest.approx(-hurt, rel=1e-4)  # ... and scores minus that, in nats
    assert table[worst].score < 0 and not np.isclose(table[worst].score * len(labels),
                                                      round(table[worst].score * len(labels)))


def test_held_out_size_rule():
    rng = np.random.default_rng(0)
    spread = 1.0 + 0.5 * rng.standard_normal(400)  # std / mean about 0.5: (0.5 / 0.1)^2 = 25 rows
    rows, reason = rows_for_noise([spread], 400)
    need = math.ceil((np.std(spread, ddof=1) / (importance.HELD_OUT_RSE * np.mean(spread))) ** 2)
    assert rows == need and 20 <= rows <= 30 and str(need) in reason
    assert rows_for_noise([spread], 400) == (rows, reason)  # deterministic
    assert rows_for_noise([np.full(400, 0.3)], 400)[0] == importance.MIN_HELD_OUT_ROWS  # no noise: the floor
    assert rows_for_noise([np.full(400, 0.3)], 10)[0] == 10  # never more than there are
    assert rows_for_noise([rng.standard_normal(400) * 50 + 0.1], 400)[0] == 400  # too noisy: all
    assert rows_for_noise([np.zeros(400)], 400)[0] == 400  # nothing changed: no estimate, all rows
    # The noisiest pilot decides.
    assert rows_for_noise([np.full(400, 0.3), spread], 400)[0] == rows


def test_held_out_size_is_chosen_once_deterministically_and_scored_on(digits, tmp_path):
    _, analysis, _, held_out, _ = digits
    first, second = _scorer(digits, tmp_path, use_cache=False), _scorer(digits, tmp_path, use_cache=False)
    choice = first.held_out_choice
    assert choice == second.held_out_choice and choice["of"] == len(held_out)
    assert importance.MIN_HELD_OUT_ROWS <= choice["rows"] <= len(held_out) and choice["reason"]
    start = min(s.start for s in analysis.segments)
    assert {len(v) for v in first.held_out_frontier(start).values()} == {choice["rows"]}
    given = _scorer(digits, tmp_path, use_cache=False, held_out_rows=20)
    assert given.held_out_choice["rows"] == 20 and given.cache_key != first.cache_key


def test_cache_hit_scores_nothing_and_gives_the_same_table(digits, tmp_path):
    _, analysis, _, _, _ = digits
    entries = _entries(analysis, limit=4)
    first = _scorer(digits, tmp_path)
    calls = []
    table = first.table(entries, jobs=2, progress=lambda *args: calls.append(args))
    assert (first.cache_hits, first.cache_misses) == (0, len(entries)) and first.cache_path.is_file()
    assert [c[0] for c in calls] == list(range(1, len(entries) + 1)) and {c[1:] for c in calls} == {(len(entries), 0)}

    again = _scorer(digits, tmp_path)
    calls.clear()
    cached = again.table(entries, jobs=2, progress=lambda *args: calls.append(args))
    assert _plain(cached) == _plain(table) and list(cached) == list(table)
    assert (again.cache_hits, again.cache_misses) == (len(entries), 0)
    assert again.sessions == 1  # the original's reference outputs only: no activations, no entry run
    assert calls[-1] == (len(entries), len(entries), len(entries))
    assert again.held_out_choice == first.held_out_choice

    off = _scorer(digits, tmp_path, use_cache=False)
    off.table(entries[:3])
    assert off.cache_hits == 0 and off.cache_misses == 3


def test_changed_calibration_or_weights_miss(digits, tmp_path):
    canonical, analysis, fit, held_out, _ = digits
    entries = _entries(analysis, limit=3)
    base = _scorer(digits, tmp_path)
    base.table(entries)
    changed_fit = fit.copy()
    changed_fit[0, 0, 0, 0] += 0.5
    other_data = ImportanceScorer(canonical, analysis, {"input": changed_fit}, holdout={"input": held_out},
                                  cache_dir=tmp_path / "cache")
    weights = onnx.ModelProto()
    weights.CopyFrom(canonical)
    initializer = next(t for t in weights.graph.initializer if t.dims and np.prod(t.dims) > 8)
    array = onnx.numpy_helper.to_array(initializer).copy()
    array.flat[0] += 0.25
    initializer.CopyFrom(onnx.numpy_helper.from_array(array, initializer.name))
    other_model = ImportanceScorer(weights, analysis, {"input": fit}, holdout={"input": held_out},
                                   cache_dir=tmp_path / "cache")
    labelled = ImportanceScorer(canonical, analysis, {"input": fit}, holdout={"input": held_out},
                                labels=digits[4], cache_dir=tmp_path / "cache")
    keys = {base.cache_key, other_data.cache_key, other_model.cache_key, labelled.cache_key}
    assert len(keys) == 4
    for scorer in (other_data, other_model):
        scorer.table(entries)
        assert (scorer.cache_hits, scorer.cache_misses) == (0, len(entries))
    same = _scorer(digits, tmp_path)
    same.table(entries)
    assert (same.cache_hits, same.cache_misses) == (len(entries), 0)


def test_damaged_cache_is_rescored_and_an_interrupted_table_resumes(digits, tmp_path):
    _, analysis, _, _, _ = digits
    entries = _entries(analysis, limit=4)
    starts = sorted({s for s, _, _ in entries})
    early = [e for e in entries if e[0] in starts[:2]]  # as if interrupted after two starts
    first = _scorer(digits, tmp_path)
    first.table(early)
    resumed = _scorer(digits, tmp_path)
    full = resumed.table(entries)
    assert (resumed.cache_hits, resumed.cache_misses) == (len(early), len(entries) - len(early))

    path = resumed.cache_path
    for damage in (b"{not json", b'{"format": 1, "held_out": {"rows": "x"}}', path.read_bytes()[:-40], b""):
        path.write_bytes(damage)
        again = _scorer(digits, tmp_path)
        assert _plain(again.table(entries)) == _plain(full)
        assert (again.cache_hits, again.cache_misses) == (0, len(entries))
    repaired = _scorer(digits, tmp_path)
    repaired.table(entries)
    assert repaired.cache_hits == len(entries)


def test_merging_into_the_shared_suffix_equals_merging_into_the_whole_network(digits, tmp_path):
    canonical, analysis, _, _, _ = digits
    scorer = _scorer(digits, tmp_path, use_cache=False)
    checked = 0
    for start, end, option in _entries(analysis, limit=6):
        choice = SegmentChoice(start, end, option)
        if choice.is_trivial:
            continue
        frontier_values = scorer.held_out_frontier(start)
        shared = scorer.score(choice, frontier_values, suffix=suffix_model(canonical, frontier_values))
        # The whole network merged, then cut after the start (what scoring did before the shared cut).
        cut = suffix_model(apply_segments(canonical, analysis, [choice]), frontier_values)
        reference, labels = scorer._scored_reference()
        outputs = run_batched(make_session(cut), frontier_values, canonical)
        whole = importance.fidelity(reference, outputs, labels)
        assert shared == pytest.approx(whole, rel=1e-6, abs=1e-9), (start, end, option)
        checked += 1
    assert checked >= 2
