"""The importance score: KL to the original without labels, change in cross-entropy with them; 0 when unchanged."""

import numpy as np
import pytest

from onnxmerge.layermerge.importance import fidelity, row_losses


def test_identical_outputs_score_zero_and_full_agreement():
    logits = [np.random.default_rng(0).standard_normal((8, 5))]
    assert fidelity(logits, logits) == (0.0, 1.0)
    labels = logits[0].argmax(1)
    assert fidelity(logits, logits, labels) == (0.0, 1.0)


def test_labels_switch_the_score_to_the_change_in_cross_entropy():
    reference = np.eye(4)[[0, 1, 2, 3]] * 5.0
    candidate = np.eye(4)[[0, 1, 2, 0]] * 5.0  # one of four predictions changed
    labels = np.array([0, 1, 2, 3])
    score, agreement = fidelity([reference], [candidate], labels)
    # Per row CE = log(e^5 + 3) - logit of the label: unchanged rows add 0, the changed one 5 nats.
    assert agreement == 0.75 and score == pytest.approx(-5.0 / 4)
    assert np.allclose(row_losses([reference], [candidate], labels), [0, 0, 0, 5.0])
    kl_score, _ = fidelity([reference], [candidate])
    assert kl_score < 0 and kl_score != score
    # Unlike a KL, a cross-entropy can fall: a candidate more confident in the right labels scores > 0.
    better, _ = fidelity([reference], [reference * 2], labels)
    assert better > 0 and fidelity([reference * 2], [reference], labels)[0] == pytest.approx(-better)
    # The score is a loss, not a count of flipped predictions: a less confident but still right candidate hurts.
    unsure, unsure_agreement = fidelity([reference], [reference * 0.2], labels)
    assert unsure_agreement == 1.0 and unsure < 0


def test_non_classifier_outputs_score_relative_squared_error():
    reference = [np.ones((2, 3, 4, 4))]
    score, agreement = fidelity(reference, [reference[0] * 1.1])
    assert agreement is None and np.isclose(score, -0.01)


def test_row_losses_average_to_minus_the_score():
    rng = np.random.default_rng(3)
    reference, candidate = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    labels = rng.integers(0, 5, 6)
    for given in (None, labels):
        assert np.mean(row_losses([reference], [candidate], given)) == pytest.approx(
            -fidelity([reference], [candidate], given)[0], rel=1e-12)
    maps = [rng.standard_normal((4, 2, 3, 3)), rng.standard_normal((4, 3))]
    moved = [m + 0.1 * rng.standard_normal(m.shape) for m in maps[:1]] + [maps[1]]
    assert fidelity(maps[:1], moved[:1])[0] < 0
    assert np.mean(row_losses(maps[:1], moved[:1])) == pytest.approx(-fidelity(maps[:1], moved[:1])[0], rel=1e-12)
