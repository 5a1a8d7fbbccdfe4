"""Recovery that makes the most of a few hundred images: feature matching at kept positions, an online torch
teacher under augmentation, the best held-out checkpoint, optional labels, progress off a terminal, Ctrl-C.

All on the trained digits ResNet with one Relu removed (what merging two convs across it does), in real ORT
sessions and real torch modules."""

from __future__ import annotations

import copy
import re
import signal

import numpy as np
import onnx
import pytest
import torch

from conftest import run_model
from models.digits import load_digits_split
from onnxmerge.errors import BadInputError
from onnxmerge.layermerge.recover import _augment, _is_image, distill
from onnxmerge.layermerge.torch_bridge import OnnxModule
from test_recover import calibration, small_pair, without_relu

torch.set_num_threads(1)  # tiny nets: a second thread only adds sync cost on a shared machine

REMOVED = "/layers/layers.0/layers.0.0/relu/Relu"
KEPT = "/layers/layers.0/layers.0.0/relu_1/Relu_output_0"  # the first block's end: computed by both graphs


@pytest.fixture(scope="module")
def digits(trained_digits):
    teacher = trained_digits("resnet").model
    x_train, y_train, x_test, _ = load_digits_split(0)
    return teacher, without_relu(teacher, REMOVED), x_train[:384], y_train[:384], x_test[:128]


def agreement(model: onnx.ModelProto, teacher: onnx.ModelProto, x: np.ndarray) -> float:
    return float((run_model(model, {"input": x})[0].argmax(1) == run_model(teacher, {"input": x})[0].argmax(1)).mean())


def with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The model with an intermediate tensor also exposed as a graph output, so ORT computes it."""
    result = copy.deepcopy(model)
    result.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return result


def test_the_bridge_captures_intermediate_tensors_as_ort_computes_them(digits):
    teacher, _, _, _, x_test = digits
    module = OnnxModule(teacher)
    with torch.no_grad():
        values = module.run({"input": torch.from_numpy(x_test)}, capture=[KEPT])
    logits, kept = run_model(with_output(teacher, KEPT), {"input": x_test})
    assert sorted(values) == sorted([*module.output_names, KEPT])
    np.testing.assert_allclose(values[KEPT].numpy(), kept, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(values[module.output_names[0]].numpy(), logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(BadInputError, match="cannot capture"):
        module.run({"input": torch.from_numpy(x_test[:2])}, capture=["nope"])


def test_feature_loss_is_added_at_the_given_names(digits):
    teacher, student, x_train, _, x_test = digits
    options = dict(steps=1, seed=0, progress=False, threads=1, held_out={"input": x_test})
    plain = distill(student, teacher, {"input": x_train}, **options)
    once = distill(student, teacher, {"input": x_train}, match=[KEPT], **options)
    twice = distill(student, teacher, {"input": x_train}, match=[KEPT], feature_weight=2.0, **options)
    assert plain.matched == [] and once.matched == twice.matched == [KEPT]
    # Same first batch, same weights: the only difference is feature_weight x the feature term, which is
    # positive here because the removed Relu sits inside the matched block.
    feature = once.losses[0] - plain.losses[0]
    assert feature > 1e-3
    assert twice.losses[0] - plain.losses[0] == pytest.approx(2 * feature, rel=1e-4)
    # Training on the matched features as well still recovers the outputs.
    trained = distill(student, teacher, {"input": x_train}, match=[KEPT], steps=60, seed=0, progress=False,
                      threads=1, held_out={"input": x_test})
    assert trained.heldout_loss_best < trained.heldout_loss_before
    assert agreement(trained.model, teacher, x_test) >= agreement(student, teacher, x_test)


@pytest.mark.parametrize("match,message", [
    (["nope"], "no node of the student computes"),
    ([REMOVED + "_output_0"], "no node of the student computes"),  # only the teacher still has it
    (KEPT, "sequence of tensor names"),
])
def test_unknown_match_names_are_refused_in_one_line(digits, match, message):
    teacher, student, x_train, _, _ = digits
    with pytest.raises(BadInputError, match=re.escape(message)) as info:
        distill(student, teacher, {"input": x_train[:32]}, match=match, steps=1, progress=False, threads=1)
    assert "\n" not in str(info.value)


def test_matched_tensors_of_different_shapes_are_refused():
    teacher, student = small_pair()
    pooled = next(node.output[0] for node in teacher.graph.node if node.op_type == "GlobalAveragePool")
    flat = next(node.output[0] for node in student.graph.node if node.op_type == "Flatten")
    renamed = copy.deepcopy(student)  # the student's Flatten output [N, 6] takes the teacher's [N, 6, 1, 1] name
    names = {pooled: "swap", flat: pooled}
    for node in renamed.graph.node:
        node.output[:] = [names.get(name, name) for name in node.output]
        node.input[:] = [names.get(name, name) for name in node.input]
    with pytest.raises(BadInputError, match="matched tensors must agree"):
        distill(renamed, teacher, calibration(), match=[pooled], steps=1, progress=False, threads=1)


def test_augmentation_on_and_off_both_train_and_the_online_teacher_is_the_ort_teacher(digits):
    teacher, student, x_train, _, x_test = digits
    # The torch teacher that makes every target reproduces the teacher in ORT on clean inputs.
    with torch.no_grad():
        torch_logits = OnnxModule(teacher)(torch.from_numpy(x_test)).numpy()
    np.testing.assert_allclose(torch_logits, run_model(teacher, {"input": x_test})[0], rtol=1e-4, atol=1e-4)
    before = agreement(student, teacher, x_test)
    runs = {augment: distill(student, teacher, {"input": x_train}, augment=augment, steps=80, seed=0,
                             progress=False, threads=1, held_out={"input": x_test})
            for augment in (True, False)}
    for augment, run in runs.items():
        assert run.augmented is augment
        assert run.teacher_max_abs_error <= 1e-4
        assert run.heldout_loss_best < run.heldout_loss_before and run.loss_last < run.loss_first
        assert agreement(run.model, teacher, x_test) > before
    assert runs[True].losses != runs[False].losses


def test_augmentation_flips_and_crops_some_rows_and_leaves_the_rest_exact():
    images = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 3, 12, 12)).astype(np.float32))
    out = _augment(images, torch.Generator().manual_seed(0))
    again = _augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and torch.equal(out, again)
    same = [bool(torch.equal(a, b)) for a, b in zip(out, images)]
    flipped = [bool(torch.allclose(a, b.flip(-1), atol=1e-5)) for a, b in zip(out, images)]
    cropped = [not s and not f for s, f in zip(same, flipped)]
    assert 5 < sum(same) < 30 and 3 < sum(flipped) < 30 and 15 < sum(cropped) < 50
    # A crop zooms in: less of the image's range than the whole, never values outside it.
    row = cropped.index(True)
    assert out[row].min() >= images[row].min() - 1e-5 and out[row].max() <= images[row].max() + 1e-5
    assert _is_image({"input": images.numpy()})
    assert not _is_image({"input": images.numpy().transpose(0, 2, 3, 1)})  # NHWC: a flip would mix channels
    assert not _is_image({"input": images.numpy()[:, 0, 0]})


def test_the_best_checkpoint_is_returned_not_the_diverged_last_one(digits):
    teacher, student, x_train, _, x_test = digits
    result = distill(student, teacher, {"input": x_train}, lr=3.0, steps=30, eval_every=3, seed=0,
                     progress=False, threads=1, held_out={"input": x_test})
    agreements = [entry["agreement"] for entry in result.history]
    assert [entry["step"] for entry in result.history] == list(range(0, 31, 3))
    assert result.agreement_after < result.agreement_before  # a learning rate this large diverges
    assert result.agreement_best == max(agreements) >= result.agreement_before
    # The returned ONNX is the best state: its agreement in ORT is the best one, not the last one.
    assert agreement(result.model, teacher, x_test) == pytest.approx(result.agreement_best)
    assert agreement(result.model, teacher, x_test) >= agreement(student, teacher, x_test)
    assert result.history[result.best_step // 3]["agreement"] == result.agreement_best
    assert result.heldout_loss_best == result.history[result.best_step // 3]["loss"]


def test_labels_add_a_cross_entropy_term(digits):
    teacher, student, x_train, y_train, x_test = digits
    options = dict(steps=20, seed=0, progress=False, threads=1, held_out={"input": x_test})
    plain = distill(student, teacher, {"input": x_train}, **options)
    labelled = distill(student, teacher, {"input": x_train}, labels=y_train, **options)
    weightless = distill(student, teacher, {"input": x_train}, labels=y_train, label_weight=0.0, **options)
    assert labelled.losses[0] > plain.losses[0]  # same batch and weights: + label_weight x cross-entropy
    assert labelled.losses != plain.losses and weightless.losses == plain.losses
    assert labelled.heldout_loss_best < labelled.heldout_loss_before


@pytest.mark.parametrize("labels,message", [
    (np.zeros(10, np.int64), "one integer class per calibration row"),
    (np.full(384, 10), r"must lie in \[0, 10\)"),
    (np.zeros(384, np.float32), "one integer class per calibration row"),
])
def test_bad_labels_are_refused(digits, labels, message):
    teacher, student, x_train, _, _ = digits
    with pytest.raises(BadInputError, match=message):
        distill(student, teacher, {"input": x_train}, labels=labels, steps=1, progress=False, threads=1)


def test_progress_off_a_terminal_prints_periodic_lines(capfd):
    teacher, student = small_pair()
    distill(student, teacher, calibration(), steps=20, batch_size=8, progress=True, threads=1)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("[distill]")]
    # progress.Reporter's lines: started, every tenth of the run, done; each tenth with the latest loss and score
    assert lines[0].split()[1] == "0/20" and lines[0].endswith("started")
    assert lines[-1].split()[1] == "20/20" and lines[-1].endswith("done")
    assert [line.split()[1] for line in lines[1:-1]] == [f"{step}/20" for step in range(2, 21, 2)]
    assert all(re.search(r"eta \d+s loss [\d.e+-]+ +held-out agreement [\d.]+ \(best [\d.]+ at step \d+\)$", line)
               for line in lines[1:-1])
    distill(student, teacher, calibration(), steps=20, batch_size=8, progress=False, threads=1)
    assert capfd.readouterr().err == ""


def test_ctrl_c_returns_the_best_checkpoint_so_far(capfd):
    teacher, student = small_pair()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        signal.signal(signal.SIGALRM, lambda *_: signal.raise_signal(signal.SIGINT))
        signal.setitimer(signal.ITIMER_REAL, 1.5)
        result = distill(student, teacher, calibration(), steps=10**7, eval_every=20, batch_size=8,
                         progress=False, threads=1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, previous)
    assert result.interrupted and 0 < result.steps == len(result.losses) < 10**7
    assert result.best_step in [entry["step"] for entry in result.history]
    assert result.max_abs_error <= result.tolerance
    assert "interrupted after" in capfd.readouterr().err


def test_only_the_named_weights_train(digits):
    teacher, student, x_train, _, x_test = digits
    names = [init.name for init in student.graph.initializer if init.dims and len(init.dims) == 4]
    chosen = set(names[:1])
    result = distill(student, teacher, {"input": x_train}, steps=5, seed=0, progress=False, threads=1,
                     held_out={"input": x_test}, trainable=chosen)
    before = {i.name: onnx.numpy_helper.to_array(i) for i in student.graph.initializer}
    after = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    changed = {name for name in before if name in after and not np.array_equal(before[name], after[name])}
    if result.best_step:  # the returned state is a trained one: exactly the named weight moved
        assert changed == chosen
    else:
        assert changed == set()
    with pytest.raises(BadInputError, match="trainable= names no weight"):
        distill(student, teacher, {"input": x_train}, steps=1, progress=False, threads=1, trainable={"nope"})
