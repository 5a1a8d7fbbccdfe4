"""Accuracy recovery: distil the original model (teacher) into the depth-compressed one (student) in torch.

Merging convs and removing activations changes the function a network computes; LayerMerge recovers the lost
accuracy by fine-tuning the merged network (reference §2.5, §6.1). Labels are not needed for that: the
teacher's outputs on unlabeled calibration inputs are the target. They are computed once with ORT, the
runtime the user ships, so the student learns what the deployed original really outputs.

Loss, per float output, on a batch:
- every output: MSE divided by the variance of the teacher's output over the calibration set, which makes
  the loss scale-free (one learning rate suits logits of any magnitude and dense outputs alike);
- classifier logits (an N x C output, C >= 2) also get Hinton's T² · KL(softmax(t/T) ‖ softmax(s/T)) with
  T = 2: the KL term transfers the teacher's class ranking (top-1 agreement, hence accuracy) including its
  "dark knowledge" on wrong classes, while the MSE term pins the logits' scale and offset, so the student
  converges to the teacher's function rather than to any logits with the same softmax.

A seeded slice of the calibration set is held out of training: the loss on it before and after says
whether fidelity improved, and the written ONNX is checked against the trained torch module on it in ORT.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from onnxmerge.layermerge.torch_bridge import OnnxModule, write_back
from onnxmerge.errors import BadInputError, VerificationError, first_line
from onnxmerge.io import ModelLike, io_signature, load_model
from onnxmerge.dataset import Dataset, load_dataset, run_batched
from onnxmerge.runner import make_session

TEMPERATURE = 2.0
# The written ONNX must reproduce the trained module up to float32 reordering noise (~1e-6 of the output
# range for the zoo); a weight stored in the wrong place or dtype is off by orders of magnitude more.
CHECK_RTOL = 1e-4
MAX_HELDOUT = 256
_NO_WEIGHTS = ("the student has no Conv/ConvTranspose/Gemm/MatMul weights stored as initializers; there is nothing "
               "to train")


@dataclass
class DistillResult:
    """The trained student (already written back to ONNX and checked in ORT) and how training went."""

    model: onnx.ModelProto = field(repr=False)
    losses: list[float] = field(repr=False)  # training loss at every step
    steps: int
    wall_seconds: float
    heldout_samples: int
    heldout_loss_before: float
    heldout_loss_after: float
    max_abs_error: float  # written ONNX in ORT vs the trained torch module, on the held-out inputs
    tolerance: float

    @property
    def loss_first(self) -> float:
        return self.losses[0]

    @property
    def loss_last(self) -> float:
        return self.losses[-1]

    def summary(self) -> dict:
        """The numbers for a report: everything but the model and the per-step curve."""
        report = asdict(self)
        del report["model"], report["losses"]
        return report | {"loss_first": self.loss_first, "loss_last": self.loss_last}


def distill(student: onnx.ModelProto, teacher: ModelLike, calibration: Dataset | dict[str, np.ndarray], *,
            steps: int = 300, lr: float = 1e-3, batch_size: int = 32, seed: int = 0, progress: bool = True,
            threads: int = 2) -> DistillResult:
    """Train ``student``'s Conv/Gemm/MatMul weights to reproduce ``teacher`` on ``calibration`` (input name →
    N x ... array, or a loaded :class:`~onnxmerge.dataset.Dataset`) with Adam and a cosine schedule;
    deterministic for a seed and thread count."""
    start = time.perf_counter()
    if steps < 1 or batch_size < 1 or threads < 1 or not lr > 0:
        raise BadInputError(f"need steps >= 1, batch_size >= 1, threads >= 1 and lr > 0 "
                            f"(got steps={steps}, batch_size={batch_size}, threads={threads}, lr={lr})")
    student = load_model(student).proto
    teacher = load_model(teacher).proto
    inputs = _check_calibration(student, teacher, calibration).arrays
    outputs = _float_outputs(student, teacher)
    module = OnnxModule(student)
    if not list(module.parameters()):
        raise BadInputError(_NO_WEIGHTS)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        targets = _run_ort(make_session(teacher, threads=threads), inputs, outputs, teacher)
        train, heldout = _split(len(next(iter(inputs.values()))), seed)
        before, _ = _heldout(module, inputs, targets, heldout)
        losses = _train(module, inputs, targets, train, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                        progress=progress)
        after, trained = _heldout(module, inputs, targets, heldout)
        written = write_back(student, module)
    finally:
        torch.set_num_threads(previous_threads)
    runtime = _run_ort(make_session(written, opt_level="disable", threads=threads), _rows(inputs, heldout),
                       outputs, written)
    error = max(float(np.abs(runtime[name] - trained[name].numpy()).max()) for name in outputs)
    scale = max(float(np.abs(trained[name].numpy()).max()) for name in outputs)
    result = DistillResult(written, losses, steps, time.perf_counter() - start, len(heldout), before, after,
                           error, CHECK_RTOL * max(1.0, scale))
    if not error <= result.tolerance:
        raise VerificationError(f"the written ONNX differs from the trained torch module by {error:.3g} "
                                f"(tolerance {result.tolerance:.3g}); the final ONNX must be exactly what was "
                                "trained", report=result.summary())
    return result


def check_trainable(student: ModelLike, calibration: Dataset | dict[str, np.ndarray], *, threads: int = 2) -> None:
    """Refuse, in seconds, a student that :func:`distill` could not train: an op the torch bridge lacks, no
    weights, or a graph that does not run in torch at a batch other than its export batch (one forward, no
    gradient, on a few calibration rows). Raises the BadInputError distill would raise after the tables."""
    student = load_model(student).proto
    module = OnnxModule(student)
    if not list(module.parameters()):
        raise BadInputError(_NO_WEIGHTS)
    if not isinstance(calibration, Dataset):
        calibration = load_dataset(calibration, student, what="calibration")
    arrays = calibration.arrays
    count = len(next(iter(arrays.values())))
    if not count:
        return
    rows = np.arange(3 if module.export_batch == 2 else 2) % count  # a batch the export did not fix
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            _forward(module, _rows(arrays, rows))
    finally:
        torch.set_num_threads(previous_threads)


def _check_calibration(student: onnx.ModelProto, teacher: onnx.ModelProto,
                       calibration: Dataset | dict[str, np.ndarray]) -> Dataset:
    """The calibration data checked against the student (names, shapes, dtypes cast) by the one dataset loader."""
    names = [name for name, _, _ in io_signature(student)["inputs"]]
    if [name for name, _, _ in io_signature(teacher)["inputs"]] != names:
        raise BadInputError(f"student inputs {names} differ from the teacher's "
                            f"{[name for name, _, _ in io_signature(teacher)['inputs']]}")
    if not isinstance(calibration, (dict, Dataset)):
        raise BadInputError(f"calibration must be a non-empty dict of input name -> N x ... array; inputs: {names}")
    return load_dataset(calibration, student, what="calibration")


def _float_outputs(student: onnx.ModelProto, teacher: onnx.ModelProto) -> list[str]:
    """Outputs the loss covers: matched by name, float only (an argmax or shape output carries no gradient)."""
    declared = io_signature(student)["outputs"]
    names = sorted(name for name, _, _ in declared)
    if sorted(name for name, _, _ in io_signature(teacher)["outputs"]) != names:
        raise BadInputError(f"student outputs {names} differ from the teacher's "
                            f"{sorted(name for name, _, _ in io_signature(teacher)['outputs'])}")
    floats = [name for name, elem_type, _ in declared
              if np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type), np.floating)]
    if not floats:
        raise BadInputError("the model has no float outputs to distil")
    return floats


def _run_ort(session, inputs: dict[str, np.ndarray], outputs: list[str],
             model: onnx.ModelProto) -> dict[str, np.ndarray]:
    try:
        return dict(zip(outputs, run_batched(session, inputs, model, outputs=outputs)))
    except Exception as exc:  # ORT's error types are not part of its public API
        raise BadInputError(f"the model does not run in ONNX Runtime on the calibration inputs: "
                            f"{first_line(exc)}") from None


def _split(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, held-out) indices; a single sample is both, as nothing can be held out of it."""
    order = np.random.default_rng(seed).permutation(count)
    if count == 1:
        return order, order
    held = max(1, min(MAX_HELDOUT, count // 10))
    return order[held:], order[:held]


def _rows(arrays: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {name: array[index] for name, array in arrays.items()}


def _forward(module: OnnxModule, inputs: dict[str, np.ndarray | torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        result = module(**{name: torch.as_tensor(array) for name, array in inputs.items()})
    except RuntimeError as exc:
        count = len(next(iter(inputs.values())))
        raise BadInputError(f"the student does not run in torch on a batch of {count} ({first_line(exc)}); "
                            "the graph hard-codes its batch size where the torch student cannot generalise it: "
                            "export it with a dynamic batch, or pass recover=False to skip accuracy recovery") from None
    return dict(zip(module.output_names, result if isinstance(result, tuple) else (result,)))


def _loss(predicted: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
          variances: dict[str, float]) -> torch.Tensor:
    total = torch.zeros(())
    for name, target in targets.items():
        student = predicted[name]
        total = total + F.mse_loss(student, target) / variances[name]
        if target.dim() == 2 and target.shape[1] >= 2:
            total = total + TEMPERATURE ** 2 * F.kl_div(F.log_softmax(student / TEMPERATURE, dim=1),
                                                        F.log_softmax(target / TEMPERATURE, dim=1),
                                                        reduction="batchmean", log_target=True)
    return total


def _variances(targets: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: max(float(array.astype(np.float64).var()), 1e-12) for name, array in targets.items()}


def _heldout(module: OnnxModule, inputs, targets, heldout: np.ndarray) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss on the held-out rows, and the student's outputs there."""
    with torch.no_grad():
        predicted = _forward(module, _rows(inputs, heldout))
    wanted = {name: torch.from_numpy(array) for name, array in _rows(targets, heldout).items()}
    return _loss(predicted, wanted, _variances(targets)).item(), predicted


def _train(module: OnnxModule, inputs, targets, train: np.ndarray, *, steps: int, lr: float, batch_size: int,
           seed: int, progress: bool) -> list[float]:
    variances = _variances(targets)
    inputs = {name: torch.from_numpy(array[train]) for name, array in inputs.items()}
    targets = {name: torch.from_numpy(array[train]) for name, array in targets.items()}
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    batch_size = min(batch_size, len(train))
    order, position, losses = torch.randperm(len(train), generator=generator), 0, []
    columns = (TextColumn("distilling"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("distill", total=steps, loss="-")
        for _ in range(steps):
            if position + batch_size > len(order):
                order, position = torch.randperm(len(train), generator=generator), 0
            index = order[position:position + batch_size]
            position += batch_size
            predicted = _forward(module, {name: tensor[index] for name, tensor in inputs.items()})
            loss = _loss(predicted, {name: tensor[index] for name, tensor in targets.items()}, variances)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(task, advance=1, loss=f"{losses[-1]:.4g}")
    return losses
