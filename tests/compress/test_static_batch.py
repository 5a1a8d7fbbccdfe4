"""Batch-1 exports whose shape arguments bake in the batch (the legacy exporter writes ``x.view(1, -1)`` and
``x.view(x.size(0), -1)`` alike as Reshape(x, [1, -1])) train at any batch: the torch student runs the export
batch there as the running batch, while the written ONNX keeps the user's shapes. What still cannot train is
refused by compress in seconds, before the tables."""

from __future__ import annotations

import time
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from conftest import GraphBuilder, run_model
from onnxmerge.errors import BadInputError
from onnxmerge.layermerge import api
from onnxmerge.layermerge.recover import distill
from onnxmerge.layermerge.torch_bridge import OnnxModule

torch.set_num_threads(1)  # tiny nets: a second thread only adds sync cost on a shared machine


class Net(nn.Module):
    """conv → relu → conv → relu → a head that carries the batch in a shape argument, as exported at batch 1."""

    def __init__(self, head: str):
        super().__init__()
        torch.manual_seed(0)
        self.head = head
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.token = nn.Parameter(torch.randn(1, 8))
        self.fc = nn.Linear(4 * 8 * 8 + (8 if head == "token" else 0), 5)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv(x))))
        if self.head == "view1":
            y = y.view(1, -1)
        elif self.head == "size0":
            y = y.reshape(y.size(0), -1)
        elif self.head == "expand":  # Expand of a batched tensor, its target built by ConstantOfShape/Where
            y = (y + y.mean(1, keepdim=True).expand(y.size(0), 4, 8, 8)).reshape(y.size(0), -1)
        elif self.head == "token":  # a constant row per sample: its batch is not the input's, nothing proves it
            y = torch.cat([y.view(1, -1), self.token.expand(1, -1)], 1)
        return self.fc(y)


def export(head: str, dynamic: bool = False) -> onnx.ModelProto:
    import io

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Net(head).eval(), (torch.randn(1, 3, 8, 8),), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None)
    return onnx.load_from_string(buffer.getvalue())


def rows(count: int, seed: int = 0, shape=(3, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *shape)).astype(np.float32)


def ort_rows(model: onnx.ModelProto, x: np.ndarray, name: str = "x") -> np.ndarray:
    """The batch-1 model in ORT, one row at a time."""
    return np.concatenate([run_model(model, {name: x[i:i + 1]})[0] for i in range(len(x))])


def assert_rows_match(module: OnnxModule, model: onnx.ModelProto, x: np.ndarray, name: str = "x", atol=1e-5):
    want = ort_rows(model, x, name)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol * max(1.0, float(np.abs(want).max())))


def batch_of(model: onnx.ModelProto) -> int:
    return model.graph.input[0].type.tensor_type.shape.dim[0].dim_value


HEADS = ["view1", "size0", "expand"]


@pytest.mark.parametrize("head", HEADS)
def test_a_batch_1_export_runs_at_batch_5(head):
    model = export(head)
    assert batch_of(model) == 1 and "Reshape" in [n.op_type for n in model.graph.node]
    module = OnnxModule(model)
    assert module.export_batch == 1 and "/Reshape_output_0" in module.batch_generalised
    if head == "expand":
        assert "/Expand_output_0" in module.batch_generalised
    assert_rows_match(module, model, rows(5))


@pytest.mark.parametrize("head", HEADS)
def test_distillation_trains_a_batch_1_export_and_writes_its_shapes(head):
    teacher = export(head)
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    for tensor in student.graph.initializer:  # a perturbed copy, so there is something to learn
        if tensor.name == "conv.weight":
            weight = onnx.numpy_helper.to_array(tensor)
            noise = np.random.default_rng(1).standard_normal(weight.shape).astype(np.float32) * 0.1
            tensor.CopyFrom(onnx.numpy_helper.from_array(weight + noise, tensor.name))
    result = distill(student, teacher, {"x": rows(12)}, steps=4, batch_size=5, progress=False, threads=1)
    written = result.model
    assert batch_of(written) == 1
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in teacher.graph.node]
    assert ([(n.name, list(n.input)) for n in written.graph.node] ==
            [(n.name, list(n.input)) for n in teacher.graph.node])
    assert result.max_abs_error <= result.tolerance  # the written ONNX at batch 1 is the trained torch module
    # ... and the trained module, rebuilt from the written ONNX, runs all 12 rows at once as ORT runs each
    assert_rows_match(OnnxModule(written), written, rows(12, seed=2))


def test_what_is_not_provably_the_batch_keeps_its_target():
    g = GraphBuilder((1, 6))
    flipped = g.node("Transpose", ["x"], perm=[1, 0])  # axis 0 is no longer the batch
    y = g.node("Reshape", [flipped, g.const(np.asarray([1, -1], np.int64))])
    model = g.build(y)
    module = OnnxModule(model)
    assert module.export_batch == 1 and module.batch_generalised == []
    feeds = rows(1, shape=(6,))
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(feeds)).numpy(), run_model(model, {"x": feeds})[0])


def test_a_dynamic_batch_export_is_left_as_it_is():
    model = export("size0", dynamic=True)
    module = OnnxModule(model)
    assert module.export_batch is None and module.batch_generalised == []
    assert_rows_match(module, model, rows(3))


def test_resize_sizes_with_the_batch_follow_the_running_batch():
    g = GraphBuilder((1, 2, 3, 3), opset=18)
    y = g.conv("x", 2, 2, pads=[1, 1, 1, 1])
    up = g.node("Resize", [y, "", "", g.const(np.asarray([1, 2, 6, 5], np.int64))], mode="linear")
    model = g.build(up)
    module = OnnxModule(model)
    assert module.batch_generalised == [up]
    assert_rows_match(module, model, rows(3, shape=(2, 3, 3)))


# ---- refused before the tables -----------------------------------------------------------------------------

def _celu_chain() -> onnx.ModelProto:
    g = GraphBuilder((1, 4, 8, 8))
    return g.build(g.node("GlobalAveragePool", [g.node("Celu", [g.relu_chain("x", 4, 4)])]))


@pytest.fixture
def no_tables(monkeypatch):
    """Fails a test in which compress gets as far as measuring tables."""
    def measure_tables(self, *args, **kwargs):
        raise AssertionError("measure_tables ran")

    monkeypatch.setattr(api.CompressionProblem, "measure_tables", measure_tables)


def test_an_op_torch_lacks_is_refused_before_the_tables(tmp_path, no_tables):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rows(16, shape=(4, 8, 8)))
    start = time.perf_counter()
    with pytest.raises(BadInputError) as info:
        api.compress(_celu_chain(), None, calibration=calib, speedup=1.5, recover=True, runs=3, warmup=1)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message and "Celu" in message and "recover=False" in message


def test_without_recovery_the_same_model_is_not_refused_for_it(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rows(16, shape=(4, 8, 8)))
    result = api.compress(_celu_chain(), None, calibration=calib, latency_budget_ms=1e6, recover=False, runs=3,
                          warmup=1)
    assert result.recovery is None and result.proto is not None


def test_a_batch_that_cannot_be_generalised_is_refused_before_the_tables(tmp_path, no_tables):
    model = export("token")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rows(12))
    start = time.perf_counter()
    with pytest.raises(BadInputError) as info:
        api.compress(model, None, calibration=calib, speedup=1.5, recover=True, runs=3, warmup=1)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message and "batch of 2" in message and "recover=False" in message


# ---- the real case -------------------------------------------------------------------------------------------

def test_efficientnet_lite0_trains_at_any_batch(corpus):
    model = onnx.load(corpus["efficientnet_lite0"])
    assert batch_of(model) == 1
    module = OnnxModule(model)
    assert module.batch_generalised  # the head's Reshape to [1, 1280]
    assert_rows_match(module, model, rows(3, shape=(3, 224, 224)), name="input")


def test_compress_recovers_a_batch_1_export(tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rows(16))
    result = api.compress(export("view1"), tmp_path / "out.onnx", calibration=calib, latency_budget_ms=1e6,
                          recover=True, recover_steps=5, runs=3, warmup=1)
    assert result.recovery is not None and result.recovery["max_abs_error"] <= result.recovery["tolerance"]
    written = onnx.load(tmp_path / "out.onnx")
    assert batch_of(written) == 1  # the user's shapes, as exported
