"""The importance score: KL to the original without labels, change in accuracy with them; 0 when unchanged."""

import numpy as np

from onnxmerge.layermerge.importance import fidelity


def test_identical_outputs_score_zero_and_full_agreement():
    logits = [np.random.default_rng(0).standard_normal((8, 5))]
    assert fidelity(logits, logits) == (0.0, 1.0)
    labels = logits[0].argmax(1)
    assert fidelity(logits, logits, labels) == (0.0, 1.0)


def test_labels_switch_the_score_to_the_change_in_accuracy():
    reference = np.eye(4)[[0, 1, 2, 3]] * 5.0
    candidate = np.eye(4)[[0, 1, 2, 0]] * 5.0  # one of four predictions changed
    labels = np.array([0, 1, 2, 3])
    score, agreement = fidelity([reference], [candidate], labels)
    assert agreement == 0.75 and score == -0.25
    kl_score, _ = fidelity([reference], [candidate])
    assert kl_score < 0 and kl_score != score


def test_non_classifier_outputs_score_relative_squared_error():
    reference = [np.ones((2, 3, 4, 4))]
    score, agreement = fidelity(reference, [reference[0] * 1.1])
    assert agreement is None and np.isclose(score, -0.01)
