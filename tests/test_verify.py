import numpy as np
import onnx
import pytest

from onnxmerge.errors import BadInputError
from onnxmerge.verify import EquivalenceChecker

from conftest import GraphBuilder


def _model_and_perturbed(delta: float):
    g = GraphBuilder((1, 3, 8, 8))
    model = g.build(g.node("Relu", [g.batchnorm(g.conv("x", 3, 4, pads=[1, 1, 1, 1]), 4)]))
    perturbed = onnx.ModelProto()
    perturbed.CopyFrom(model)
    weight = perturbed.graph.initializer[0]
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += delta
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    return model, perturbed


def test_identical_model_passes_with_zero_error():
    model, _ = _model_and_perturbed(0.0)
    result = EquivalenceChecker(model, check_n=2).check(model)
    assert result.passed and result.max_abs_error == 0.0
    assert result.outputs[0].noise_floor >= 0.0


@pytest.mark.parametrize("noise_floor", [True, False])
def test_real_error_fails_even_with_the_noise_floor(noise_floor):
    model, perturbed = _model_and_perturbed(1e-2)
    result = EquivalenceChecker(model, noise_floor=noise_floor).check(perturbed)
    assert not result.passed
    assert result.outputs[0].mismatched > 0 and result.max_abs_error > 1e-4
    assert "differs" in result.failure


def test_different_seeds_give_different_inputs_and_are_recorded():
    model, _ = _model_and_perturbed(0.0)
    a, b = EquivalenceChecker(model, seed=1), EquivalenceChecker(model, seed=2)
    assert not np.array_equal(a.feeds[0]["x"], b.feeds[0]["x"])
    assert a.check(model).seed == 1


def test_check_n_must_be_positive():
    model, _ = _model_and_perturbed(0.0)
    with pytest.raises(BadInputError):
        EquivalenceChecker(model, check_n=0)


def test_model_that_does_not_run_at_the_given_shape_is_bad_input():
    model, _ = _model_and_perturbed(0.0)
    with pytest.raises(BadInputError, match="fixes it to 3"):
        EquivalenceChecker(model, input_shapes={"x": (1, 4, 8, 8)})
