"""Soups of digits nets trained in torch, scored in ORT: greedy selection, BN reset, aligned midpoints."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxmerge.runner import make_session
from onnxmerge.merging import soup
from onnxmerge.merging.data import accuracy, cross_entropy

from soup_helpers import digits_family  # noqa: F401  (session fixture)


def test_greedy_soup_is_at_least_the_best_single_model_and_uniform_is_scored_beside_it(digits_family):
    result = soup(digits_family.finetunes, method="greedy", eval_data=digits_family.val)
    scores = result.report["scores"]
    singles = [entry["score"] for entry in scores["models"]]
    assert scores["soup"] >= max(singles)
    assert 0 < scores["uniform_soup"] <= 1
    steps = result.report["greedy"]["steps"]
    assert steps[0]["model"] == scores["models"][int(np.argmax(singles))]["model"] and steps[0]["kept"]
    assert [step["model"] for step in steps if step["kept"]] == sorted(result.report["greedy"]["kept"],
                                                                       key=[s["model"] for s in steps].index)
    assert len(steps) == len(digits_family.finetunes)


def test_greedy_accepts_any_callable_metric(digits_family):
    x_test, y_test = digits_family.test
    calls = []

    def negative_test_loss(model: onnx.ModelProto) -> float:
        calls.append(model)
        outputs = make_session(model).run(None, {"input": x_test})[0]
        return -cross_entropy(outputs, y_test)

    result = soup(digits_family.finetunes, method="greedy", metric=negative_test_loss)
    assert len(calls) == 2 * len(digits_family.finetunes) + 1  # each input, each candidate, uniform, result
    assert result.report["scores"]["soup"] >= max(m["score"] for m in result.report["scores"]["models"])


def _bn_inputs(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [node.input[0] for node in probe.graph.node if node.op_type == "BatchNormalization"]
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    return dict(zip(names, make_session(probe).run(names, {"input": x})))


def test_reset_bn_writes_the_measured_statistics(digits_family):
    averaged = soup(digits_family.finetunes).model
    reset = soup(digits_family.finetunes, reset_bn=digits_family.calib, batch_size=100)
    model = reset.model
    batchnorms = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert reset.report["bn_reset"]["batchnorm_nodes"] == len(batchnorms) > 0
    assert reset.report["bn_reset"]["levels"] > 1
    calib = np.load(digits_family.calib)["input"]
    measured = _bn_inputs(model, calib)
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in averaged.graph.initializer}
    for node in batchnorms:
        x = measured[node.input[0]].astype(np.float64)
        np.testing.assert_allclose(initializers[node.input[3]], x.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(initializers[node.input[4]], x.var(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
        assert not np.allclose(initializers[node.input[4]], old[node.input[4]], rtol=1e-3)


def test_reset_bn_on_a_folded_export_warns_how_to_keep_bn(digits_family):
    result = soup([digits_family.folded_bn, digits_family.folded_bn], reset_bn=digits_family.calib)
    warning = " ".join(result.report["warnings"])
    assert "cannot be reset" in warning and "--keep-bn" in warning and "TrainingMode.PRESERVE" in warning


def _scores(model, data) -> tuple[float, float]:
    x, y = data
    outputs = make_session(model).run(None, {"input": x})[0]
    return accuracy(outputs, y), cross_entropy(outputs, y)


def test_aligned_midpoint_of_independent_nets_beats_the_naive_midpoint(digits_family):
    naive = soup(digits_family.independent_mlps).model
    aligned = soup(digits_family.independent_mlps, align=True)
    report = aligned.report["alignment"][0]
    assert report["verification"]["passed"] and report["cosine_after"] > report["cosine_before"]
    naive_accuracy, naive_loss = _scores(naive, digits_family.test)
    aligned_accuracy, aligned_loss = _scores(aligned.model, digits_family.test)
    assert aligned_loss < 0.5 * naive_loss
    assert aligned_accuracy > naive_accuracy


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "dare"])
def test_task_vector_methods_with_bn_reset_keep_a_working_model(digits_family, method):
    result = soup(digits_family.finetunes, method=method, base=digits_family.base, scale=0.5,
                  eval_data=digits_family.val, reset_bn=digits_family.calib)
    scores = result.report["scores"]
    assert scores["soup"] > 0.8, scores
    props = {p.key: p.value for p in result.model.metadata_props}
    assert props["onnxmerge.soup.method"] == method and "onnxmerge.soup.base" in props
