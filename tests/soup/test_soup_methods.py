"""Merge formulas against numpy on small hand-built models, streaming, dtype, NaN refusal and provenance."""

import hashlib
import json
import math
from contextlib import ExitStack

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxmerge.errors import BadInputError, VerificationError
from onnxmerge.io import save_model
from onnxmerge.merging import soup
from onnxmerge.merging.source import open_source

from conftest import GraphBuilder, relocate_external_data, run_model
from soup_helpers import initializer_arrays, small_cnn


@pytest.fixture
def three_models(tmp_path):
    return [save_model(small_cnn(seed), tmp_path / f"m{seed}.onnx") for seed in range(3)]


def test_uniform_and_weighted_equal_numpy_averages_of_paired_initializers(three_models):
    inputs = [initializer_arrays(onnx.load(p)) for p in three_models]
    uniform = soup(three_models).model
    weighted = soup(three_models, method="weighted", weights=[1, 2, 5]).model
    for index, (got_uniform, got_weighted) in enumerate(zip(initializer_arrays(uniform),
                                                            initializer_arrays(weighted))):
        stack = np.stack([arrays[index] for arrays in inputs])
        np.testing.assert_allclose(got_uniform, stack.mean(axis=0), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got_weighted, np.average(stack, axis=0, weights=[1, 2, 5]), rtol=1e-6, atol=1e-7)
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    assert np.isfinite(run_model(uniform, feeds)[0]).all()


def test_copies_of_one_model_merge_bit_exactly(tmp_path):
    model = small_cnn(4)
    result = soup([model, model, model], method="weighted", weights=[0.3, 0.3, 0.4])
    for got, want in zip(initializer_arrays(result.model), initializer_arrays(model)):
        assert got.tobytes() == want.tobytes()
    assert result.report["tensors"] == {"identical": len(model.graph.initializer)}


def _fine_tunes(base: onnx.ModelProto, count: int, size: float = 0.02) -> list[onnx.ModelProto]:
    """Copies of base with sparse, sign-conflicting deltas, so trimming and sign election both matter."""
    rng = np.random.default_rng(7)
    tuned = []
    for _ in range(count):
        model = onnx.ModelProto()
        model.CopyFrom(base)
        for tensor in model.graph.initializer:
            value = numpy_helper.to_array(tensor)
            delta = rng.standard_normal(value.shape) * (rng.random(value.shape) < 0.6)
            tensor.CopyFrom(numpy_helper.from_array((value + size * delta).astype(np.float32), tensor.name))
        tuned.append(model)
    return tuned


def _ties_reference(base, tuned, weights, scale, density):
    """TIES written out independently: threshold by sorting, elect by weighted sum, disjoint weighted mean."""
    trimmed = []
    for theta in tuned:
        delta = (theta - base).ravel()
        keep = math.ceil(density * delta.size)
        threshold = np.sort(np.abs(delta))[::-1][keep - 1]
        trimmed.append(np.where(np.abs(delta) >= threshold, delta, 0).reshape(base.shape))
    sign = np.sign(sum(w * t for w, t in zip(weights, trimmed)))
    mask = [(np.sign(t) == sign) & (t != 0) for t in trimmed]
    numerator = sum(w * t * m for w, t, m in zip(weights, trimmed, mask))
    denominator = sum(w * m for w, m in zip(weights, mask))
    merged = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), 0)
    return base + scale * merged


def test_task_arithmetic_and_ties_match_their_formulas():
    base = small_cnn(0)
    tuned = _fine_tunes(base, 3)
    weights, scale = [1.0, 0.5, 2.0], 0.7
    arithmetic = soup(tuned, method="task-arithmetic", base=base, weights=weights, scale=scale).model
    ties = soup(tuned, method="ties", base=base, weights=weights, scale=scale, density=0.4).model
    base_arrays = initializer_arrays(base)
    tuned_arrays = [initializer_arrays(m) for m in tuned]
    statistics = _bn_statistics(base)
    for index, theta0 in enumerate(base_arrays):
        thetas = [arrays[index] for arrays in tuned_arrays]
        want = theta0 + scale * sum(w * (t - theta0) for w, t in zip(weights, thetas))
        np.testing.assert_allclose(initializer_arrays(arithmetic)[index], want, rtol=1e-5, atol=1e-6)
        if base.graph.initializer[index].name not in statistics:
            want = _ties_reference(theta0.astype(np.float64), [t.astype(np.float64) for t in thetas], weights,
                                   scale, 0.4)
        np.testing.assert_allclose(initializer_arrays(ties)[index], want, rtol=1e-5, atol=1e-6)


def _bn_statistics(model: onnx.ModelProto) -> set[str]:
    """Running mean/var names: TIES and DARE merge them by task arithmetic, never sparsified."""
    return {name for node in model.graph.node if node.op_type == "BatchNormalization" for name in node.input[3:5]}


def test_dare_is_reproducible_by_seed_and_drops_or_rescales_each_delta():
    base = small_cnn(0)
    tuned = _fine_tunes(base, 2)
    run = lambda seed, density=0.5: initializer_arrays(  # noqa: E731
        soup(tuned, method="dare", base=base, density=density, seed=seed).model)
    first, again, other = run(3), run(3), run(4)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, again))
    assert any(a.tobytes() != b.tobytes() for a, b in zip(first, other))
    full = run(3, density=1.0)
    arithmetic = initializer_arrays(soup(tuned, method="task-arithmetic", base=base).model)
    for got, want in zip(full, arithmetic):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # One fine-tune: every merged delta is either dropped or the delta scaled by 1/density.
    single = initializer_arrays(soup(tuned[:1], method="dare", base=base, density=0.25, seed=1).model)
    base_arrays, tuned_arrays = initializer_arrays(base), initializer_arrays(tuned[0])
    statistics = _bn_statistics(base)
    kept_fraction = []
    for tensor, got, theta0, theta in zip(base.graph.initializer, single, base_arrays, tuned_arrays):
        delta, merged_delta = theta - theta0, got - theta0
        if tensor.name in statistics:
            np.testing.assert_allclose(merged_delta, delta, rtol=1e-4, atol=1e-6)
            continue
        dropped = np.isclose(merged_delta, 0, atol=1e-6)
        np.testing.assert_allclose(merged_delta[~dropped], delta[~dropped] / 0.25, rtol=1e-4, atol=1e-5)
        kept_fraction.append(np.mean(~dropped[delta != 0]))
    assert 0.1 < np.mean(kept_fraction) < 0.4


def test_nan_and_float16_overflow_are_refused_and_nothing_is_written(tmp_path):
    broken = small_cnn(1)
    weight = numpy_helper.to_array(broken.graph.initializer[0]).copy()
    weight.flat[3] = np.nan
    broken.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, broken.graph.initializer[0].name))
    with pytest.raises(VerificationError, match="NaN/Inf"):
        soup([small_cnn(0), broken], tmp_path / "nan.onnx")
    assert not (tmp_path / "nan.onnx").exists()

    def half_model(value: float) -> onnx.ModelProto:
        g = GraphBuilder((1, 4))
        g.input.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
        out = g.node("Add", ["x", g.const(np.full((4,), value, dtype=np.float16))])
        model = g.build(out)
        return model

    with pytest.raises(VerificationError, match="float16"):
        soup([half_model(40000.0)], tmp_path / "inf.onnx", method="task-arithmetic", base=half_model(0.0), scale=2.0)
    assert not (tmp_path / "inf.onnx").exists()
    result = soup([half_model(1000.0), half_model(3000.0)]).model
    merged = numpy_helper.to_array(result.graph.initializer[0])
    assert merged.dtype == np.float16 and np.all(merged == 2000.0)
    base = small_cnn(0)
    with pytest.raises(VerificationError, match="negative running variance"):
        soup(_fine_tunes(base, 1, size=2.0), method="task-arithmetic", base=base, scale=3.0)


def test_provenance_names_inputs_method_parameters_seed_and_version(three_models, tmp_path):
    out = soup(three_models, tmp_path / "soup.onnx", method="weighted", weights=[1, 1, 2], seed=5).model
    props = {p.key: p.value for p in onnx.load(out).metadata_props}
    inputs = json.loads(props["onnxmerge.soup.inputs"])
    assert [entry["sha256"] for entry in inputs] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in three_models]
    assert props["onnxmerge.soup.method"] == "weighted"
    assert json.loads(props["onnxmerge.soup.parameters"]) == {"weights": [1.0, 1.0, 2.0]}
    assert props["onnxmerge.soup.seed"] == "5"
    from onnxmerge.version import __version__
    assert props["onnxmerge.version"] == __version__


def test_external_data_inputs_are_merged_and_left_untouched(tmp_path):
    models = [small_cnn(seed, channels=32) for seed in range(2)]
    paths = []
    for index, model in enumerate(models):
        folder = tmp_path / f"in{index}"
        folder.mkdir()
        paths.append(save_model(model, folder / "model.onnx", external_data=True))
    before = [(p.read_bytes(), (p.parent / "model.onnx.data").read_bytes()) for p in paths]
    out = soup(paths, tmp_path / "soup.onnx").model
    assert (tmp_path / "soup.onnx.data").is_file()
    merged = initializer_arrays(onnx.load(out))
    for index, got in enumerate(merged):
        want = np.mean([initializer_arrays(m)[index] for m in models], axis=0)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert before == [(p.read_bytes(), (p.parent / "model.onnx.data").read_bytes()) for p in paths]


def test_unreadable_inputs_are_refused_in_one_line(tmp_path):
    good = save_model(small_cnn(0), tmp_path / "good.onnx")
    folder = tmp_path / "hostile"
    folder.mkdir()
    hostile = save_model(small_cnn(1, channels=32), folder / "model.onnx", external_data=True)
    relocate_external_data(hostile, "../good.onnx")
    with pytest.raises(BadInputError, match="points outside the model's folder"):
        soup([good, hostile])
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    with pytest.raises(BadInputError, match="cannot parse"):
        soup([good, tmp_path / "garbage.onnx"])
    with pytest.raises(BadInputError, match="not found"):
        soup([good, tmp_path / "missing.onnx"])


def test_opened_inputs_hold_structure_only_so_merging_streams(tmp_path):
    path = save_model(small_cnn(0, channels=64), tmp_path / "big.onnx")
    with ExitStack() as stack:
        source = open_source(path, stack, 0)
        assert source.proto.ByteSize() < path.stat().st_size / 10
        first = source.proto.graph.initializer[0]
        np.testing.assert_array_equal(source.read(first), initializer_arrays(onnx.load(path))[0])


def test_bad_options_and_overwriting_an_input_are_refused(three_models):
    cases = [
        (dict(method="weighted"), "needs weights="),
        (dict(method="weighted", weights=[1, 2]), "2 weight(s) for 3 model(s)"),
        (dict(method="ties"), "needs a base model"),
        (dict(method="uniform", base=three_models[0]), "base= is used only by"),
        (dict(method="dare", base=three_models[0], density=1.5), "density must be in (0, 1]"),
        (dict(method="greedy"), "needs evaluation data"),
        (dict(method="median"), "unknown method 'median'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BadInputError) as caught:
            soup(three_models, **kwargs)
        assert message in str(caught.value), kwargs
    before = three_models[0].read_bytes()
    with pytest.raises(BadInputError, match="refusing to overwrite"):
        soup(three_models, three_models[0])
    assert three_models[0].read_bytes() == before
