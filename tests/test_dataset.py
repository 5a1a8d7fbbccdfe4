"""The one dataset module: .npz files checked against real models, and ORT run over them under one batch rule."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge.canonical import canonicalize
from onnxmerge.dataset import Dataset, fixed_batch, iter_batched, load_dataset, run_batched
from onnxmerge.errors import BadInputError
from onnxmerge.layermerge.api import load_calibration
from onnxmerge.merging import data as soup_data
from onnxmerge.merging.bn_reset import reset_batchnorm
from onnxmerge.runner import make_session

WEIGHT = np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32)


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def linear(batch) -> onnx.ModelProto:
    """y = x @ W, x: [batch, 3] float32; ``batch`` is a symbol, a fixed size, or -1 / 0 as exporters write it."""
    return _model([helper.make_node("MatMul", ["x", "w"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])],
                  [numpy_helper.from_array(WEIGHT, "w")])


def two_inputs(batch="N") -> onnx.ModelProto:
    """A magika-style model: int32 byte ids plus a float feature; y = float(ids) summed + x @ W."""
    nodes = [helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["ids_f", "axes"], ["total"], keepdims=1),
             helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "total"], ["y"])]
    return _model(nodes,
                  [helper.make_tensor_value_info("ids", TensorProto.INT32, [batch, 8]),
                   helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])],
                  [numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(np.array([1], np.int64), "axes")])


def batchnorm(batch) -> onnx.ModelProto:
    """BatchNormalization over x: [batch, 3, 2, 2] with placeholder statistics."""
    params = [numpy_helper.from_array(value, name) for name, value in
              (("scale", np.ones(3, np.float32)), ("bias", np.zeros(3, np.float32)),
               ("mean", np.zeros(3, np.float32)), ("var", np.ones(3, np.float32)))]
    return _model([helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 2, 2])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3, 2, 2])], params)


def rows(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3)).astype(np.float32)


def save(tmp_path, name: str = "data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


# --- loading ---------------------------------------------------------------------------------------------------

def test_load_with_and_without_labels(tmp_path):
    x, labels = rows(10), np.arange(10) % 2
    plain = load_dataset(save(tmp_path, "a.npz", x=x), linear("N"))
    assert plain.size == len(plain) == 10 and plain.labels is None and plain.fixed_batch is None
    np.testing.assert_array_equal(plain.arrays["x"], x)
    labelled = load_dataset(save(tmp_path, "b.npz", x=x, labels=labels), linear("N"), need_labels=True)
    np.testing.assert_array_equal(labelled.labels, labels)
    assert list(labelled.arrays) == ["x"]
    assert load_dataset(save(tmp_path, "c.npz", x=x), linear(4)).fixed_batch == 4


def test_dtypes_are_cast_to_the_declared_inputs_and_int32_stays_int32(tmp_path):
    ids = np.random.default_rng(2).integers(0, 256, (6, 8))  # int64 on disk, the model takes int32
    x = rows(6).astype(np.float64)
    dataset = load_dataset(save(tmp_path, ids=ids, x=x), two_inputs())
    assert dataset.arrays["ids"].dtype == np.int32 and dataset.arrays["x"].dtype == np.float32
    np.testing.assert_array_equal(dataset.arrays["ids"], ids)
    session = make_session(two_inputs())
    expected = ids.sum(1, keepdims=True).astype(np.float32) + x.astype(np.float32) @ WEIGHT
    np.testing.assert_allclose(run_batched(session, dataset, batch_size=4)[0], expected, rtol=1e-5)
    int32 = load_dataset({"ids": ids.astype(np.int32), "x": rows(6)}, two_inputs())
    assert int32.arrays["ids"].dtype == np.int32


def test_arrays_of_the_right_dtype_are_not_copied():
    x = rows(8)
    dataset = load_dataset({"x": x}, linear("N"))
    assert np.shares_memory(dataset.arrays["x"], x)


def _refusal(tmp_path, case: str):
    model = linear("N")
    if case == "missing":
        return tmp_path / "nowhere.npz", model, "calibration file not found"
    if case == "garbage":
        path = tmp_path / "garbage.npz"
        path.write_bytes(b"not a zip archive at all")
        return path, model, "cannot read calibration"
    if case == "pickled":
        return save(tmp_path, x=np.array([{"a": 1}] * 4, dtype=object)), model, "cannot read calibration"
    if case == "npy":
        path = tmp_path / "single.npz"
        with open(path, "wb") as handle:
            np.save(handle, rows(4))
        return path, model, "single .npy array"
    if case == "no arrays":
        return save(tmp_path), model, "is empty"
    if case == "missing array":
        return save(tmp_path, ids=np.zeros((4, 8), np.int32)), two_inputs(), "do not match the model's inputs"
    if case == "extra array":
        return save(tmp_path, x=rows(4), extra=rows(4)), model, "the model's inputs are"
    if case == "wrong name":
        return save(tmp_path, image=rows(4)), model, "do not match the model's inputs"
    if case == "inconsistent N":
        return (save(tmp_path, ids=np.zeros((4, 8), np.int32), x=rows(5)), two_inputs(),
                "different numbers of samples")
    if case == "trailing dims":
        return save(tmp_path, x=np.zeros((4, 5), np.float32)), model, "does not fit the model input"
    if case == "rank":
        return save(tmp_path, x=np.zeros(4, np.float32)), model, "has shape \\[4\\]"
    if case == "no samples":
        return save(tmp_path, x=np.zeros((0, 3), np.float32)), model, "holds no samples"
    if case == "labels float":
        return save(tmp_path, x=rows(4), labels=np.zeros(4)), model, "integer class indices"
    if case == "labels length":
        return save(tmp_path, x=rows(4), labels=np.zeros(3, np.int64)), model, "'labels' has shape \\[3\\]"
    if case == "int into float":
        return save(tmp_path, x=np.zeros((4, 3), np.int64)), model, "has dtype int64, the model takes float32"
    if case == "float into int":
        return (save(tmp_path, ids=np.zeros((4, 8)), x=rows(4)), two_inputs(),
                "'ids' has dtype float64, the model takes int32")
    if case == "int out of range":
        return (save(tmp_path, ids=np.full((4, 8), 2**40), x=rows(4)), two_inputs(),
                "outside int32's range")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "garbage", "pickled", "npy", "no arrays", "missing array",
                                  "extra array", "wrong name", "inconsistent N", "trailing dims", "rank",
                                  "no samples", "labels float", "labels length", "int into float",
                                  "float into int", "int out of range"])
def test_bad_data_is_refused_in_one_line(tmp_path, case):
    path, model, message = _refusal(tmp_path, case)
    with pytest.raises(BadInputError, match=message) as info:
        load_dataset(path, model)
    assert "\n" not in str(info.value)


def test_labels_are_required_where_models_are_scored(tmp_path):
    with pytest.raises(BadInputError, match="needs a 'labels' array"):
        soup_data.load_dataset(save(tmp_path, x=rows(4)), linear("N"), what="--eval", need_labels=True)


def test_a_sole_array_of_any_name_is_soups_form_only(tmp_path):
    path = save(tmp_path, image=rows(4))
    assert soup_data.load_dataset(path, linear("N"), what="--eval", need_labels=False).arrays.keys() == {"x"}
    with pytest.raises(BadInputError, match="model's inputs are"):
        load_calibration(path, linear("N"))


def test_trailing_dims_written_as_minus_one_or_zero_are_dynamic(tmp_path):
    for dim in (-1, 0, "F"):
        model = _model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])], [])
        assert load_dataset({"x": np.zeros((4, 7), np.float32)}, model).size == 4


# --- split -----------------------------------------------------------------------------------------------------

def test_split_is_deterministic_and_covers_every_row_once():
    x, labels = rows(20), np.arange(20)
    dataset = load_dataset({"x": x, "labels": labels}, linear("N"))
    fit, held_out = dataset.split(0.25)
    assert (fit.size, held_out.size) == (15, 5)
    np.testing.assert_array_equal(held_out.labels, labels[15:])  # no seed: the last rows, as views
    assert np.shares_memory(held_out.arrays["x"], dataset.arrays["x"])

    first, again, other = dataset.split(0.25, seed=3), dataset.split(0.25, seed=3), dataset.split(0.25, seed=4)
    np.testing.assert_array_equal(first[1].labels, again[1].labels)
    assert not np.array_equal(first[1].labels, other[1].labels)
    assert sorted([*first[0].labels, *first[1].labels]) == list(range(20))
    np.testing.assert_array_equal(first[1].arrays["x"], x[first[1].labels])  # rows and labels stay paired

    assert [part.size for part in load_dataset({"x": rows(2)}, linear("N")).split(0.9)] == [1, 1]
    with pytest.raises(BadInputError, match="need >= 2"):
        load_dataset({"x": rows(1)}, linear("N")).split(0.25)


def test_compress_calibration_holds_out_the_last_quarter(tmp_path):
    calibration = load_calibration(save(tmp_path, x=rows(12), labels=np.arange(12)), linear("N"))
    assert (calibration.fit.size, calibration.held_out.size, calibration.size) == (9, 3, 12)
    np.testing.assert_array_equal(calibration.labels, [9, 10, 11])


# --- batches and ORT runs --------------------------------------------------------------------------------------

def one_row_at_a_time(x: np.ndarray) -> np.ndarray:
    session = make_session(linear("N"))
    return np.concatenate([session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize("batch,batch_size,sizes", [
    ("N", 4, [4, 4, 2]),
    (-1, 4, [4, 4, 2]),
    (0, 4, [4, 4, 2]),
    (1, 4, [1] * 10),
    (4, 3, [4, 4, 4]),  # a fixed batch wins over batch_size; the last batch is padded
])
def test_batches_cover_every_row_exactly_once(batch, batch_size, sizes):
    x = rows(10)
    model = linear(batch)
    dataset = load_dataset({"x": x}, model)
    assert fixed_batch(model) == (batch if isinstance(batch, int) and batch > 0 else None)
    batches = list(dataset.batches(batch_size))
    assert [len(feeds["x"]) for feeds in batches] == sizes
    real = np.concatenate([feeds["x"][:feeds.rows] for feeds in batches])
    np.testing.assert_array_equal(real, x)
    for feeds in batches:
        if not feeds.padded:
            assert np.shares_memory(feeds["x"], dataset.arrays["x"])  # views, no copy of the set
    if batch == 4:
        assert batches[-1].rows == 2 and batches[-1].padded
        np.testing.assert_array_equal(batches[-1]["x"], x[[8, 9, 8, 9]])


@pytest.mark.parametrize("batch", ["N", -1, 0, 1, 4])
def test_run_batched_equals_a_one_row_at_a_time_run(batch):
    x = rows(10)
    model = linear(batch)
    runnable = canonicalize(model).model if batch == 0 else model  # ORT reads a literal 0 as size zero
    session = make_session(runnable)
    expected = one_row_at_a_time(x)
    np.testing.assert_allclose(run_batched(session, {"x": x}, model, batch_size=3)[0], expected, rtol=1e-6)
    np.testing.assert_allclose(run_batched(session, load_dataset({"x": x}, model), batch_size=3)[0], expected,
                               rtol=1e-6)
    parts = list(iter_batched(session, {"x": x}, model, outputs=["y"], batch_size=3))
    assert sum(len(part[0]) for part in parts) == 10


def test_a_fixed_batch_model_refuses_partial_batches_so_padding_is_needed():
    session = make_session(linear(4))
    with pytest.raises(Exception, match="dimensions"):
        session.run(None, {"x": rows(2)})


def test_bn_reset_counts_only_real_samples_with_a_fixed_batch():
    x = np.random.default_rng(5).standard_normal((10, 3, 2, 2)).astype(np.float32) * 3 + 1
    model = batchnorm(4)
    report = reset_batchnorm(model, load_dataset({"x": x}, model), batch_size=64)
    stats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_allclose(stats["mean"], x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], x.var(axis=(0, 2, 3)), rtol=1e-5)
    assert report["samples"] == 10


def test_empty_feeds_are_refused():
    with pytest.raises(BadInputError, match="no samples"):
        run_batched(make_session(linear("N")), Dataset({"x": np.zeros((0, 3), np.float32)}), linear("N"))
