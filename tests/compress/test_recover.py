"""Distillation must recover what a LayerMerge-style change costs, measured in ORT on held-out data, and the
ONNX it writes must be exactly the network it trained."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import GraphBuilder, run_model
from models.digits import load_digits_split, ort_accuracy
from onnxmerge.layermerge.recover import distill
from onnxmerge.layermerge.torch_bridge import OnnxModule
from onnxmerge.errors import BadInputError

torch.set_num_threads(1)  # tiny nets: a second thread only adds sync cost on a shared machine


def without_relu(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The model with one Relu rewired out, as merging two convs across it does."""
    result = copy.deepcopy(model)
    relu = next(node for node in result.graph.node if node.op_type == "Relu" and node.name == name)
    for node in result.graph.node:
        for index, tensor in enumerate(node.input):
            if tensor == relu.output[0]:
                node.input[index] = relu.input[0]
    result.graph.node.remove(relu)
    return result


def predictions(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run_model(model, {"input": x})[0].argmax(1)


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def digits(trained_digits):
    trained = trained_digits("resnet")
    x_train, _, x_test, y_test = load_digits_split(0)
    return trained.model, x_train, x_test, y_test


def test_distillation_recovers_a_removed_activation(digits):
    teacher, x_train, x_test, y_test = digits
    damaged = without_relu(teacher, "/layers/layers.0/layers.0.0/relu/Relu")
    teacher_top1 = predictions(teacher, x_test)
    damaged_accuracy = ort_accuracy(damaged, x_test, y_test)
    damaged_agreement = float((predictions(damaged, x_test) == teacher_top1).mean())

    result = distill(damaged, teacher, {"input": x_train}, steps=300, seed=0, progress=False, threads=1)

    accuracy = ort_accuracy(result.model, x_test, y_test)
    agreement = float((predictions(result.model, x_test) == teacher_top1).mean())
    print(f"held-out accuracy: teacher {ort_accuracy(teacher, x_test, y_test):.4f}, damaged {damaged_accuracy:.4f}, "
          f"distilled {accuracy:.4f}; top-1 agreement {damaged_agreement:.4f} -> {agreement:.4f}; {result.summary()}")
    assert accuracy > damaged_accuracy + 0.1 and accuracy >= 0.95
    assert agreement > damaged_agreement
    assert result.heldout_loss_after < result.heldout_loss_before and result.loss_last < result.loss_first
    assert result.steps == len(result.losses) == 300

    # Only the trained initializers changed, and the written ONNX is exactly the trained network.
    assert list(result.model.graph.node) == list(damaged.graph.node)
    trained = {name for name, _ in OnnxModule(damaged).named_onnx_parameters()}
    before, after = initializers(damaged), initializers(result.model)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[name], after[name]) == (name not in trained) for name in before)
    assert result.max_abs_error <= result.tolerance
    with torch.no_grad():
        torch_logits = OnnxModule(result.model)(torch.from_numpy(x_test)).numpy()
    np.testing.assert_allclose(run_model(result.model, {"input": x_test})[0], torch_logits, rtol=1e-4, atol=1e-4)


def small_pair():
    """A two-output teacher (logits and a feature map, fixed batch 1) and the student without its first Relu."""
    g = GraphBuilder((1, 3, 8, 8), seed=3, input_name="input")
    features = g.node("Relu", [g.conv("input", 3, 6, pads=[1, 1, 1, 1])])
    features = g.conv(features, 6, 6, pads=[1, 1, 1, 1])
    pooled = g.node("Flatten", [g.node("GlobalAveragePool", [g.node("Relu", [features])])])
    logits = g.node("Gemm", [pooled, g.const(g.rng.standard_normal((5, 6)).astype(np.float32)),
                             g.const(np.zeros(5, np.float32))], transB=1)
    teacher = g.build([logits, features])
    return teacher, without_relu(teacher, g.nodes[1].name)


def calibration(count: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)}


def test_distill_is_deterministic_and_trains_every_output():
    teacher, student = small_pair()
    runs = [distill(student, teacher, calibration(), steps=40, lr=3e-3, batch_size=8, seed=seed, progress=progress,
                    threads=1)
            for seed, progress in ((0, True), (0, False), (1, False))]
    assert runs[0].model.SerializeToString() == runs[1].model.SerializeToString()
    assert runs[0].losses == runs[1].losses
    assert runs[0].model.SerializeToString() != runs[2].model.SerializeToString()
    for run in runs:
        assert run.heldout_samples == 4 and run.heldout_loss_after < run.heldout_loss_before
        assert run.max_abs_error <= run.tolerance
    summary = json.loads(json.dumps(runs[0].summary()))
    assert summary["steps"] == 40 and summary["loss_last"] < summary["loss_first"] and "model" not in summary


@pytest.mark.parametrize("calib,options,message", [
    ({}, {}, "non-empty"),
    ({"x": calibration()["input"]}, {}, "do not match the model's inputs"),
    ({"input": calibration()["input"][:, :, :4]}, {}, "has shape"),
    ({"input": calibration()["input"][0]}, {}, "has shape"),
    ({"input": np.zeros((0, 3, 8, 8), np.float32)}, {}, "no samples"),
    ({"input": np.zeros((4, 3, 8, 8), np.int64)}, {}, "dtype"),
    (calibration(), {"steps": 0}, "steps >= 1"),
])
def test_bad_input_is_refused_in_one_line(calib, options, message):
    teacher, student = small_pair()
    with pytest.raises(BadInputError, match=message) as info:
        distill(student, teacher, calib, progress=False, **options)
    assert "\n" not in str(info.value)


def test_a_student_without_weights_is_refused():
    g = GraphBuilder((1, 3, 8, 8), input_name="input")
    model = g.build(g.node("Relu", ["input"]))
    with pytest.raises(BadInputError, match="nothing to train"):
        distill(model, model, calibration(), progress=False)


def test_float64_calibration_is_cast():
    teacher, student = small_pair()
    result = distill(student, teacher, {"input": calibration()["input"].astype(np.float64)}, steps=2,
                     progress=False)
    assert result.steps == 2
