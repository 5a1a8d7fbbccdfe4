import json
import math
import multiprocessing

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxmerge.errors import BadInputError
from onnxmerge.io import ort_max_ir_version
from onnxmerge.latency_table import (ACTIVATIONS, ConvSignature, additivity, conv_model, conv_signatures,
                                     measure)
from onnxmerge.runner import make_session

from conftest import GraphBuilder

FAST = {"runs": 3, "warmup": 1}


def sig(**overrides) -> ConvSignature:
    return ConvSignature(**{"in_channels": 4, "out_channels": 8, "kernel": 3, "input_hw": (8, 8)} | overrides)


def run(model: onnx.ModelProto, shape, dtype=np.float32) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    return make_session(model, opt_level="disable").run(None, {"x": x})[0]


def _erf(values: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(values)


NUMPY_ACTIVATIONS = {
    "relu": lambda v: np.maximum(v, 0),
    "relu6": lambda v: np.clip(v, 0, 6),
    "hardswish": lambda v: v * np.clip(v / 6 + 0.5, 0, 1),
    "leaky_relu": lambda v: np.where(v >= 0, v, 0.01 * v),
    "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
    "silu": lambda v: v / (1 + np.exp(-v)),
    "gelu": lambda v: 0.5 * v * (1 + _erf(v / np.sqrt(2))),
}


@pytest.mark.parametrize("signature, out_shape", [
    (sig(), (1, 8, 8, 8)),
    (sig(stride=2, batch=2), (2, 8, 4, 4)),
    (sig(in_channels=8, groups=8), (1, 8, 8, 8)),
    (sig(dilation=2), (1, 8, 8, 8)),
    (sig(kernel=(1, 3), padding=(0, 0, 0, 1)), (1, 8, 8, 7)),
    (sig(kernel=2, stride=2, padding=0), (1, 8, 4, 4)),
    (sig(input_hw=(16,), kernel=5), (1, 8, 16)),
    (sig(dtype="float16", activation="relu6"), (1, 8, 8, 8)),
])
def test_conv_model_runs_with_the_signatures_output_shape(signature, out_shape):
    model = conv_model(signature)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= ort_max_ir_version() and model.opset_import[0].version == 17
    assert signature.output_hw == out_shape[2:]
    y = run(model, (signature.batch, signature.in_channels, *signature.input_hw), np.dtype(signature.dtype))
    assert y.shape == out_shape and y.dtype == np.dtype(signature.dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_conv_model_applies_each_activation_to_the_same_conv(activation):
    linear = run(conv_model(sig()), (1, 4, 8, 8))
    activated = run(conv_model(sig(activation=activation)), (1, 4, 8, 8))
    np.testing.assert_allclose(activated, NUMPY_ACTIVATIONS[activation](linear.astype(np.float64)),
                               rtol=1e-4, atol=1e-5)


def test_same_padding_is_stored_as_the_explicit_pads_it_means():
    assert sig(dilation=2).padding == (2, 2, 2, 2)
    assert sig(kernel=(1, 5)).padding == (0, 2, 0, 2)
    assert sig() == sig(padding=(1, 1, 1, 1)) and sig().key() == sig(padding=1).key()
    assert sig(stride=2).key() == "conv:i4:o8:k3x3:s2x2:d1x1:g1:p1,1,1,1:hw8x8:b1:float32:linear"


def test_second_measure_is_all_cache_hits_with_identical_stats(tmp_path):
    signatures = [sig(), sig(stride=2), sig(in_channels=8, groups=8, activation="relu")]
    first = measure(signatures + [sig()], cache_dir=tmp_path, **FAST)
    assert (first.hits, first.misses, len(first)) == (0, 3, 3)
    assert all(first[s].median_ms > 0 and first[s].runs == 3 for s in signatures)
    assert len(list(tmp_path.glob("*.json"))) == 3
    second = measure(signatures, cache_dir=tmp_path, **FAST)
    assert (second.hits, second.misses) == (3, 0)
    # A fresh measurement never reproduces every float of the first: equal stats came from the cache.
    assert all(second[s] == first[s] for s in signatures)
    as_json = json.loads(json.dumps(second.to_dict()))
    assert [entry["key"] for entry in as_json["entries"]] == [s.key() for s in signatures]
    assert as_json["hits"] == 3 and as_json["entries"][0]["latency"]["median_ms"] == first[sig()].median_ms


@pytest.mark.parametrize("changed", [{"threads": 2}, {"opt_level": "basic"}, {"fingerprint": "another machine"},
                                     {"runs": 4}])
def test_changed_settings_or_hardware_miss(tmp_path, changed):
    settings = FAST | {"fingerprint": "this machine"}
    assert measure([sig()], cache_dir=tmp_path, **settings).misses == 1
    assert measure([sig()], cache_dir=tmp_path, **settings | changed).misses == 1
    assert measure([sig()], cache_dir=tmp_path, **settings).hits == 1  # the original entry is still there


def test_fewer_runs_than_cached_is_a_hit_and_a_corrupt_entry_is_remeasured(tmp_path):
    measure([sig()], cache_dir=tmp_path, runs=4, warmup=0)
    assert measure([sig()], cache_dir=tmp_path, runs=2, warmup=0).hits == 1
    (entry,) = tmp_path.glob("*.json")
    entry.write_text('{"key": "trunc')
    table = measure([sig()], cache_dir=tmp_path, runs=2, warmup=0)
    assert table.misses == 1 and json.loads(entry.read_text())["latency"]["runs"] == 2


def _fill(cache_dir: str, channels: list[int], start) -> None:
    start.wait()  # both processes measure (and write) the shared signatures at the same time
    table = measure([sig(out_channels=c) for c in channels], cache_dir=cache_dir, runs=2, warmup=0)
    assert table.hits + table.misses == len(channels)


def test_two_processes_fill_one_cache(tmp_path):
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    jobs = [context.Process(target=_fill, args=(str(tmp_path), channels, start))
            for channels in (range(4, 64, 4), range(32, 92, 4))]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=60)
    assert [job.exitcode for job in jobs] == [0, 0]
    files = sorted(tmp_path.iterdir())
    assert len(files) == 22 and all(f.suffix == ".json" for f in files)  # no temporary file left behind
    assert all(json.loads(f.read_text())["latency"]["median_ms"] > 0 for f in files)
    assert measure([sig(out_channels=c) for c in range(4, 92, 4)], cache_dir=tmp_path, runs=2, warmup=0).hits == 22


def small_network() -> onnx.ModelProto:
    b = GraphBuilder(["N", 3, 16, 16])
    x = b.node("Relu", [b.conv("x", 3, 8, strides=[2, 2], pads=[1, 1, 1, 1])])
    low, high = b.const(np.array(0, np.float32)), b.const(np.array(6, np.float32))
    x = b.node("Clip", [b.conv(x, 8, 8, groups=8, dilations=[2, 2], pads=[2, 2, 2, 2]), low, high])
    y = b.conv(x, 8, 4, k=1)
    x = b.node("Mul", [y, b.node("Sigmoid", [y])])
    last = b.conv(x, 4, 4, bias=False, pads=[0, 1, 0, 1])  # read by Relu and by the graph: no activation
    return b.build([last, b.node("Relu", [last])])


def test_conv_signatures_read_attributes_shapes_and_activations():
    model = small_network()
    found = conv_signatures(model, {"x": (2, 3, 16, 16)})
    assert [name for name, _ in found] == [n.name for n in model.graph.node if n.op_type == "Conv"]
    common = {"batch": 2, "input_hw": (8, 8)}
    assert [s for _, s in found] == [
        ConvSignature(in_channels=3, out_channels=8, kernel=3, stride=2, padding=1, activation="relu",
                      **common | {"input_hw": (16, 16)}),
        ConvSignature(in_channels=8, out_channels=8, kernel=3, groups=8, dilation=2, padding=2,
                      activation="relu6", **common),
        ConvSignature(in_channels=8, out_channels=4, kernel=1, padding=0, activation="silu", **common),
        ConvSignature(in_channels=4, out_channels=4, kernel=3, padding=(0, 1, 0, 1), **common),
    ]
    assert found[-1][1].output_hw == (6, 8)


def conv_relu_chain() -> onnx.ModelProto:
    b = GraphBuilder([1, 8, 16, 16])
    x = "x"
    for _ in range(3):
        x = b.node("Relu", [b.conv(x, 8, 8, pads=[1, 1, 1, 1])])
    return b.build(x)


def test_additivity_reports_both_latencies_and_the_uncovered_share(tmp_path):
    result = additivity(conv_relu_chain(), cache_dir=tmp_path, runs=5, warmup=2)
    assert result["end_to_end_ms"] > 0 and result["table_sum_ms"] > 0
    assert result["ratio"] == pytest.approx(result["table_sum_ms"] / result["end_to_end_ms"])
    assert 0 <= result["uncovered_fraction"] <= 1
    assert result["convs"] == 3 and len(result["per_conv_ms"]) == 3
    assert (result["table"]["hits"], result["table"]["misses"]) == (0, 1)  # three convs, one distinct signature
    assert additivity(conv_relu_chain(), cache_dir=tmp_path, runs=5, warmup=2)["table"]["hits"] == 1


@pytest.mark.parametrize("overrides, message", [
    ({"activation": "swish2"}, "unknown activation 'swish2'"),
    ({"in_channels": 0}, "in_channels must be an integer >= 1"),
    ({"kernel": (3, -1)}, "kernel must be"),
    ({"input_hw": 8}, "input_hw must be a non-empty tuple"),
    ({"in_channels": 6, "groups": 4}, "groups=4 must divide"),
    ({"kernel": 11, "padding": 0}, "too small"),
    ({"padding": (1, 1)}, "padding must be 4 integers"),
    ({"padding": "valid"}, "padding must be 'same'"),
    ({"stride": 1.5}, "stride must be 2 integers"),
    ({"dtype": "int8"}, "dtype must be one of"),
])
def test_bad_signatures_are_refused_in_one_line(overrides, message):
    with pytest.raises(BadInputError, match=message) as error:
        sig(**overrides)
    assert "\n" not in str(error.value)


def test_bad_settings_are_refused_before_the_cache_is_read(tmp_path):
    measure([sig()], cache_dir=tmp_path, **FAST)
    with pytest.raises(BadInputError, match="threads must be >= 1"):
        measure([sig()], cache_dir=tmp_path, runs=3, threads=0)


def test_conv_signatures_refuses_a_conv_without_constant_weights():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])
    w = helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [2, 2, 1, 1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 4, 4])
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="c")], "g", [x, w], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(BadInputError, match="conv 'c' has no latency signature: its weight is not a constant"):
        conv_signatures(model, {"x": (1, 2, 4, 4), "w": (2, 2, 1, 1)})
