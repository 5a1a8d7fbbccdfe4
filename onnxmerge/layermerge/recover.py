"""Accuracy recovery: distil the original model (teacher) into the depth-compressed one (student) in torch.

Merging convs and removing activations changes the function a network computes; LayerMerge recovers the lost
accuracy by fine-tuning the merged network (reference §2.5, §6.1). Labels are not needed for that: the
teacher's outputs on unlabeled calibration inputs are the target. Calibration sets are small (a few hundred
images), so recovery has to make the most of each one:

- **Online teacher.** The teacher runs as a frozen torch module on every training batch instead of once
  over the set in ORT: its targets then follow the augmentation below, and memory stays bounded (no table of
  targets for all rows; the inputs are indexed per batch, never copied whole). That the torch teacher is the
  deployed one is checked: on held-out rows it must reproduce the teacher in ORT (``teacher_max_abs_error``).
- **Augmentation** (a single float 4-D NCHW image input only): each row is flipped horizontally with
  probability 1/2 and, with probability 1/2, replaced by a random crop of 50-100% of its area (input aspect
  ratio) resized back bilinearly; the rest stay as they are, so clean inputs, the ones the model is judged
  on, keep a fair share of every batch. Seeded with a torch Generator: deterministic for a seed.
- **Feature matching.** ``match`` names intermediate tensors both graphs compute (the caller passes the
  segment ends LayerMerge kept, where student and teacher should agree exactly); their scale-free MSE
  guides the layers between, which the outputs alone constrain only weakly.
- **Best by held-out.** A held-out part is scored every ``eval_every`` steps (and untrained, at step 0); the
  best state, not the last, is returned, so a diverging run (too high a learning rate, an interrupted run)
  never ends worse than what it started from.

Loss on a batch (every term scale-free, so one learning rate suits logits of any magnitude and dense outputs):
- every float output: MSE divided by the variance of the teacher's output on the held-out rows;
- classifier logits (an N x C output, C >= 2) also get Hinton's T² · KL(softmax(t/T) ‖ softmax(s/T)) with
  T = 2: the KL term transfers the teacher's class ranking (top-1 agreement, hence accuracy) including its
  "dark knowledge" on wrong classes, while the MSE term pins the logits' scale and offset, so the student
  converges to the teacher's function rather than to any logits with the same softmax;
- ``feature_weight`` × the mean over matched tensors of MSE / variance of the teacher's tensor in the batch.
  The default 1.0 gives the features together the weight of one output's MSE term: both are ~1 for a student
  that only gets the mean right, and taking the mean (not the sum) keeps the balance whatever the count;
- with ``labels``: ``label_weight`` × cross-entropy to them on the classifier output. The default 0.5 keeps
  the teacher the main target (held-out selection scores agreement with the teacher) while the labels
  correct where the teacher itself is wrong.

The held-out score is top-1 agreement with the teacher (the mean over classifier outputs; ties broken by the
lower held-out loss) when there is a classifier output, else the held-out loss over the outputs (features and
labels are training aids, not what the model is judged on). The written ONNX is checked against the trained
torch module on held-out rows in ORT.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from onnxmerge.layermerge.torch_bridge import OnnxModule, write_back
from onnxmerge.errors import BadInputError, VerificationError, first_line
from onnxmerge.io import ModelLike, io_signature, load_model
from onnxmerge.dataset import Dataset, load_dataset, run_batched
from onnxmerge.progress import Reporter
from onnxmerge.runner import make_session

TEMPERATURE = 2.0
# The written ONNX must reproduce the trained module up to float32 reordering noise (~1e-6 of the output
# range for the zoo); a weight stored in the wrong place or dtype is off by orders of magnitude more.
CHECK_RTOL = 1e-4
# The torch teacher against the teacher in ORT with its graph optimisations (fusions reorder more float
# arithmetic than the unoptimised check above); an op the bridge gets wrong is off by far more.
TEACHER_RTOL = 1e-3
MAX_HELDOUT = 256  # held-out rows scored: bounds the cost of each evaluation and of the targets kept for them
# A step (teacher forward, student forward and backward, Adam) of EfficientNet-Lite0 at 224 x 224 on 2 threads
# measured ~0.7 s at batch 16 and ~1.9 s at 32 on a quiet 2-core machine (plus a one-off ~10-20 s oneDNN warm-up
# in the first step; several times more on a loaded one). 32 costs more per row, and 300 steps of it (~10 min)
# would not fit a 10-minute pipeline; 300 steps of 16 take ~3.5 min, and a few hundred images are many epochs.
DEFAULT_BATCH = 16
FEATURE_WEIGHT = 1.0
LABEL_WEIGHT = 0.5
EVALUATIONS = 10  # held-out evaluations per run when eval_every is not given (plus the untrained one)
FLIP_PROBABILITY = 0.5
CROP_PROBABILITY = 0.5
CROP_SCALE = (0.5, 1.0)  # area fraction of a random crop
_NO_WEIGHTS = ("the student has no Conv/ConvTranspose/Gemm/MatMul weights stored as initializers; there is nothing "
               "to train")


@dataclass
class DistillResult:
    """The trained student (the best held-out checkpoint, already written back to ONNX and checked in ORT)
    and how training went."""

    model: onnx.ModelProto = field(repr=False)
    losses: list[float] = field(repr=False)  # training loss at every step run
    steps: int  # steps run: the steps asked for unless interrupted
    wall_seconds: float
    heldout_samples: int
    heldout_loss_before: float  # untrained student
    heldout_loss_after: float  # at the last evaluation (end of training)
    max_abs_error: float  # written ONNX in ORT vs the trained torch module, on the held-out inputs
    tolerance: float
    heldout_loss_best: float  # of the returned checkpoint
    agreement_before: float | None  # held-out top-1 agreement with the teacher; None without a classifier output
    agreement_after: float | None
    agreement_best: float | None
    best_step: int  # the step whose state is returned (0: training never beat the untrained student)
    history: list[dict]  # every held-out evaluation: {"step", "loss", "agreement"}
    interrupted: bool  # Ctrl-C stopped training; the best checkpoint until then is returned
    augmented: bool  # whether image augmentation was applied
    matched: list[str]  # intermediate tensors whose feature loss was trained
    teacher_max_abs_error: float  # torch teacher vs the teacher in ORT, un-augmented held-out rows
    step_seconds: float  # mean wall time of a training step (teacher forward, student forward and backward)

    @property
    def loss_first(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def loss_last(self) -> float:
        return self.losses[-1] if self.losses else math.nan

    def summary(self) -> dict:
        """The numbers for a report: everything but the model and the per-step curve."""
        report = asdict(self)
        del report["model"], report["losses"]
        return report | {"loss_first": self.loss_first, "loss_last": self.loss_last}


def distill(student: onnx.ModelProto, teacher: ModelLike, calibration: Dataset | dict[str, np.ndarray], *,
            steps: int = 300, lr: float = 1e-3, batch_size: int = DEFAULT_BATCH, seed: int = 0,
            progress: bool | Reporter = True, threads: int = 2, held_out: Dataset | dict[str, np.ndarray] | None = None,
            match: Sequence[str] = (), feature_weight: float = FEATURE_WEIGHT, augment: bool = True,
            labels: np.ndarray | None = None, label_weight: float = LABEL_WEIGHT,
            eval_every: int | None = None, trainable: Collection[str] | None = None) -> DistillResult:
    """Train ``student``'s Conv/Gemm/MatMul weights to reproduce ``teacher`` on ``calibration`` (input name →
    N x ... array, or a loaded :class:`~onnxmerge.dataset.Dataset`) with Adam and a cosine schedule;
    deterministic for a seed and thread count. See the module docstring for the loss and the held-out score.

    ``held_out``: the rows to score and pick the checkpoint on (at most 256 of them, a seeded pick); all of
    ``calibration`` then trains. Without it a seeded tenth of ``calibration`` (1-256 rows) is held out.
    ``match``: intermediate tensor names in both graphs to match (refused when missing in either graph, or
    when their shapes or dtypes differ: a mismatch means the caller's positions are wrong, and training
    without them would hide it). ``labels``: one integer class per ``calibration`` row (the rows held out by
    the seeded split go unused), for a cross-entropy term on the one classifier output; labels inside a
    Dataset are not used unless passed here. ``eval_every``: steps between held-out evaluations (default:
    about 10 per run). ``progress``: a :class:`~onnxmerge.progress.Reporter` (compress passes its own) or
    whether to make one: a bar on a terminal, else a line on stderr every tenth of the run (or 30 s), each
    with the latest loss and held-out agreement.
    ``trainable``: initializer names to train (default: every weight); the others stay frozen, which keeps a
    pretrained network's untouched layers exactly as they were while the changed ones learn.

    Ctrl-C during training stops it: the best checkpoint so far is written back, checked and returned with
    ``interrupted=True`` (a line on stderr says so); a second Ctrl-C aborts as usual.
    """
    start = time.perf_counter()
    if steps < 1 or batch_size < 1 or threads < 1 or not lr > 0 or (eval_every is not None and eval_every < 1):
        raise BadInputError(f"need steps >= 1, batch_size >= 1, threads >= 1, lr > 0 and eval_every >= 1 "
                            f"(got steps={steps}, batch_size={batch_size}, threads={threads}, lr={lr}, "
                            f"eval_every={eval_every})")
    if not (feature_weight >= 0 and label_weight >= 0):
        raise BadInputError(f"need feature_weight >= 0 and label_weight >= 0 (got {feature_weight}, {label_weight})")
    student = load_model(student).proto
    teacher = load_model(teacher).proto
    inputs = _check_calibration(student, teacher, calibration).arrays
    count = len(next(iter(inputs.values())))
    outputs = _float_outputs(student, teacher)
    match = _check_match(student, teacher, match)
    module = OnnxModule(student)
    if not list(module.parameters()):
        raise BadInputError(_NO_WEIGHTS)
    if trainable is not None:
        wanted = set(trainable)
        unknown = sorted(wanted - {name for name, _ in module.named_onnx_parameters()})
        if unknown or not wanted:
            raise BadInputError(f"trainable= names no weight of the student: {unknown[:3] or 'none given'}")
        for name, param in module.named_onnx_parameters():
            param.requires_grad_(name in wanted)
    if held_out is None:
        train, rows = _split(count, seed)
        held = _rows(inputs, np.sort(rows))
    else:
        train = np.arange(count)
        held = _check_calibration(student, teacher, held_out, what="held-out").arrays
        size = len(next(iter(held.values())))
        if size > MAX_HELDOUT:
            held = _rows(held, np.sort(np.random.default_rng(seed).permutation(size)[:MAX_HELDOUT]))
    targets = _run_ort(make_session(teacher, threads=threads), held, outputs, teacher)
    classifiers = [name for name in outputs if targets[name].ndim == 2 and targets[name].shape[1] >= 2]
    labels = _check_labels(labels, count, classifiers, targets)
    teacher_module = OnnxModule(teacher).requires_grad_(False)
    augmented = augment and _is_image(inputs)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        teacher_error = _check_teacher(teacher_module, held, targets, batch_size)
        run = _Run(module, teacher_module, inputs, train, held, targets, classifiers, labels, match,
                   steps=steps, lr=lr, batch_size=batch_size, seed=seed, augmented=augmented,
                   feature_weight=feature_weight, label_weight=label_weight,
                   eval_every=eval_every or max(1, math.ceil(steps / EVALUATIONS)))
        run.train(progress if isinstance(progress, Reporter) else Reporter(enabled=progress))
        run.restore_best()
        trained = _predict(module, held, batch_size)
        written = write_back(student, module)
    finally:
        torch.set_num_threads(previous_threads)
    runtime = _run_ort(make_session(written, opt_level="disable", threads=threads), held, outputs, written)
    error = max(float(np.abs(runtime[name] - trained[name]).max()) for name in outputs)
    scale = max(float(np.abs(trained[name]).max()) for name in outputs)
    first, last, best = run.history[0], run.history[-1], run.best
    result = DistillResult(written, run.losses, len(run.losses), time.perf_counter() - start,
                           len(next(iter(held.values()))), first["loss"], last["loss"], error,
                           CHECK_RTOL * max(1.0, scale), best["loss"], first["agreement"], last["agreement"],
                           best["agreement"], best["step"], run.history, run.interrupted, augmented, list(match),
                           teacher_error, run.step_seconds())
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


class _Run:
    """One training run: the online-teacher loop, the held-out evaluations and the best state so far."""

    def __init__(self, module: OnnxModule, teacher: OnnxModule, inputs: dict[str, np.ndarray], train: np.ndarray,
                 held: dict[str, np.ndarray], targets: dict[str, np.ndarray], classifiers: list[str],
                 labels: tuple[str, np.ndarray] | None, match: list[str], *, steps: int, lr: float, batch_size: int,
                 seed: int, augmented: bool, feature_weight: float, label_weight: float, eval_every: int):
        self.module, self.teacher, self.inputs, self.train_rows = module, teacher, inputs, train
        self.held, self.targets, self.classifiers, self.labels, self.match = held, targets, classifiers, labels, match
        self.steps, self.lr, self.batch_size, self.seed, self.augmented = steps, lr, batch_size, seed, augmented
        self.feature_weight, self.label_weight, self.eval_every = feature_weight, label_weight, eval_every
        self.variances = _variances(targets)
        self.losses: list[float] = []
        self.history: list[dict] = []
        # (evaluation, parameters) of the best state so far, one attribute so that an interrupt between two
        # assignments cannot pair an evaluation with another state's parameters
        self._best: tuple[dict, dict[str, torch.Tensor]] | None = None
        self.interrupted = False
        self.train_seconds = 0.0

    def step_seconds(self) -> float:
        return self.train_seconds / len(self.losses) if self.losses else math.nan

    def train(self, reporter: Reporter) -> None:
        """Evaluate the untrained student, then train ``steps`` steps, evaluating every ``eval_every`` and at
        the end, with ``reporter`` showing the loss and held-out agreement; Ctrl-C stops the loop with
        ``interrupted`` set (the best state so far is kept)."""
        self.evaluate(0)  # before the loop: an interrupt needs a checkpoint to fall back on
        try:
            with reporter.phase("distill", total=self.steps) as advance:
                generator = torch.Generator().manual_seed(self.seed)
                optimizer = torch.optim.Adam([p for p in self.module.parameters() if p.requires_grad], lr=self.lr)
                schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.steps)
                batch_size = min(self.batch_size, len(self.train_rows))
                order, position = torch.randperm(len(self.train_rows), generator=generator).numpy(), 0
                for step in range(1, self.steps + 1):
                    if position + batch_size > len(order):
                        order, position = torch.randperm(len(self.train_rows), generator=generator).numpy(), 0
                    rows = self.train_rows[order[position:position + batch_size]]
                    position += batch_size
                    began = time.perf_counter()
                    loss = self.loss(rows, generator)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    self.losses.append(loss.item())
                    self.train_seconds += time.perf_counter() - began
                    if step % self.eval_every == 0 or step == self.steps:
                        self.evaluate(step)
                    advance(note=f"loss {self.losses[-1]:.4g}  held-out {self.score_text()}")
        except KeyboardInterrupt:
            self.interrupted = True
            print(f"distill: interrupted after {len(self.losses)} of {self.steps} steps; keeping the best held-out "
                  f"checkpoint (step {self.best['step']}, {self.score_text()})", file=sys.stderr, flush=True)

    def loss(self, rows: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """The training loss on the calibration ``rows`` (augmented when enabled); the teacher runs on the same
        augmented batch, so its targets are those of the inputs the student sees."""
        feeds = {name: torch.from_numpy(array[rows]) for name, array in self.inputs.items()}
        if self.augmented:
            feeds = {name: _augment(tensor, generator) for name, tensor in feeds.items()}
        with torch.no_grad():
            wanted = _forward(self.teacher, feeds, self.match, who="teacher")
        predicted = _forward(self.module, feeds, self.match)
        total = _loss(predicted, {name: wanted[name] for name in self.targets}, self.variances)
        if self.match and self.feature_weight:
            total = total + self.feature_weight * _feature_loss(predicted, wanted, self.match)
        if self.labels is not None and self.label_weight:
            name, labels = self.labels
            total = total + self.label_weight * F.cross_entropy(predicted[name], torch.from_numpy(labels[rows]))
        return total

    def evaluate(self, step: int) -> None:
        """Score the current state on the held-out rows; keep a copy of it when it is the best so far."""
        loss, agreement = _evaluate(self.module, self.held, self.targets, self.variances, self.classifiers,
                                    self.batch_size)
        entry = {"step": step, "loss": loss, "agreement": agreement}
        self.history.append(entry)
        # a diverged state (inf/NaN loss) is never the best: only the untrained one is kept unconditionally
        if self._best is None or (math.isfinite(loss) and _key(entry) > _key(self.best)):
            self._best = entry, {name: param.detach().clone() for name, param in self.module.named_parameters()}

    @property
    def best(self) -> dict:
        return self._best[0]

    def restore_best(self) -> None:
        state = self._best[1]
        with torch.no_grad():
            for name, param in self.module.named_parameters():
                param.copy_(state[name])

    def score_text(self) -> str:
        if not self.history:
            return "-"
        last = self.history[-1]
        if last["agreement"] is None:
            return f"loss {last['loss']:.4g} (best {self.best['loss']:.4g} at step {self.best['step']})"
        return f"agreement {last['agreement']:.4f} (best {self.best['agreement']:.4f} at step {self.best['step']})"


def _key(entry: dict) -> tuple[float, ...]:
    """Higher is better: agreement first (ties to the lower loss) when there is a classifier, else the loss."""
    if entry["agreement"] is None:
        return (-entry["loss"],)
    return entry["agreement"], -entry["loss"]


def _check_calibration(student: onnx.ModelProto, teacher: onnx.ModelProto,
                       calibration: Dataset | dict[str, np.ndarray], what: str = "calibration") -> Dataset:
    """The data checked against the student (names, shapes, dtypes cast) by the one dataset loader."""
    names = [name for name, _, _ in io_signature(student)["inputs"]]
    if [name for name, _, _ in io_signature(teacher)["inputs"]] != names:
        raise BadInputError(f"student inputs {names} differ from the teacher's "
                            f"{[name for name, _, _ in io_signature(teacher)['inputs']]}")
    if not isinstance(calibration, (dict, Dataset)):
        raise BadInputError(f"{what} must be a non-empty dict of input name -> N x ... array; inputs: {names}")
    return load_dataset(calibration, student, what=what)


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


def _check_match(student: onnx.ModelProto, teacher: onnx.ModelProto, match: Sequence[str]) -> list[str]:
    """The names to match, each computed by a node of both graphs (shapes and dtypes are checked per batch)."""
    if isinstance(match, str) or not all(isinstance(name, str) for name in match):
        raise BadInputError(f"match must be a sequence of tensor names (got {match!r})")
    names = list(dict.fromkeys(match))
    for model, who in ((student, "student"), (teacher, "teacher")):
        computed = {name for node in model.graph.node for name in node.output}
        missing = [name for name in names if name not in computed]
        if missing:
            raise BadInputError(f"match: no node of the {who} computes {missing}; pass tensor names both graphs "
                                "compute (the kept segment ends)")
    return names


def _check_labels(labels: np.ndarray | None, count: int, classifiers: list[str],
                  targets: dict[str, np.ndarray]) -> tuple[str, np.ndarray] | None:
    """(classifier output, int64 labels) for the cross-entropy term, or None without labels."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if len(classifiers) != 1:
        raise BadInputError(f"labels need exactly one classifier output (N x C logits, C >= 2); the model has "
                            f"{len(classifiers)}")
    classes = targets[classifiers[0]].shape[1]
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (count,):
        raise BadInputError(f"labels must be one integer class per calibration row, shape [{count}] (got dtype "
                            f"{labels.dtype}, shape {list(labels.shape)})")
    if labels.min() < 0 or labels.max() >= classes:
        raise BadInputError(f"labels must lie in [0, {classes}) for the {classes}-class output "
                            f"'{classifiers[0]}' (got {labels.min()}..{labels.max()})")
    return classifiers[0], labels.astype(np.int64)


def _is_image(inputs: dict[str, np.ndarray]) -> bool:
    """One float 4-D input taken as NCHW images; an input whose last axis looks like channels (1, 3 or 4)
    while axis 1 does not is NHWC, where a flip along axis 3 would permute channels: not augmented."""
    if len(inputs) != 1:
        return False
    array = next(iter(inputs.values()))
    if array.ndim != 4 or not np.issubdtype(array.dtype, np.floating):
        return False
    return not (array.shape[3] in (1, 3, 4) and array.shape[1] not in (1, 3, 4))


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random resized crops (area 50-100%, the input's aspect ratio, bilinear back
    to the input size) of N x C x H x W images, each with probability 1/2 per row; one batched grid_sample."""
    count = len(images)
    flip = torch.rand(count, generator=generator) < FLIP_PROBABILITY
    crop = torch.rand(count, generator=generator) < CROP_PROBABILITY
    low, high = CROP_SCALE
    side = torch.sqrt(low + (high - low) * torch.rand(count, generator=generator))  # crop side / image side
    side = torch.where(crop, side, torch.ones(count))
    # crop centre in normalised [-1, 1] coordinates, uniform over the positions that keep the crop inside
    centre = (torch.rand(count, 2, generator=generator) * 2 - 1) * (1 - side)[:, None]
    if not (flip.any() or crop.any()):
        return images
    theta = torch.zeros(count, 2, 3, dtype=images.dtype)
    theta[:, 0, 0] = torch.where(flip, -side, side)
    theta[:, 1, 1] = side
    theta[:, :, 2] = centre.to(images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    augmented = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    keep = ~(flip | crop)
    return torch.where(keep[:, None, None, None], images, augmented)  # untouched rows stay bit-exact


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


def _chunks(arrays: dict[str, np.ndarray], size: int):
    count = len(next(iter(arrays.values())))
    for begin in range(0, count, size):
        yield {name: array[begin:begin + size] for name, array in arrays.items()}


def _forward(module: OnnxModule, inputs: dict[str, np.ndarray | torch.Tensor], capture: Sequence[str] = (),
             who: str = "student") -> dict[str, torch.Tensor]:
    try:
        return module.run({name: torch.as_tensor(array) for name, array in inputs.items()}, capture)
    except RuntimeError as exc:
        count = len(next(iter(inputs.values())))
        raise BadInputError(f"the {who} does not run in torch on a batch of {count} ({first_line(exc)}); "
                            "the graph hard-codes its batch size where the torch module cannot generalise it: "
                            "export it with a dynamic batch, or pass recover=False to skip accuracy recovery") from None


def _predict(module: OnnxModule, inputs: dict[str, np.ndarray], chunk: int) -> dict[str, np.ndarray]:
    """The module's outputs on ``inputs``, run ``chunk`` rows at a time (a forward keeps every intermediate)."""
    parts = []
    with torch.no_grad():
        for rows in _chunks(inputs, chunk):
            parts.append(_forward(module, rows))
    return {name: torch.cat([part[name] for part in parts]).numpy() for name in module.output_names}


def _check_teacher(teacher: OnnxModule, held: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                   chunk: int) -> float:
    """The torch teacher's largest deviation from the teacher in ORT on (a batch of) held-out rows; refused
    beyond float noise, as every training target comes from the torch teacher."""
    rows = {name: array[:chunk] for name, array in held.items()}
    with torch.no_grad():
        computed = _forward(teacher, rows, who="teacher")
    error = max(float(np.abs(computed[name].numpy() - targets[name][:chunk]).max()) for name in targets)
    tolerance = TEACHER_RTOL * max(1.0, max(float(np.abs(targets[name][:chunk]).max()) for name in targets))
    if not error <= tolerance:
        raise VerificationError(f"the teacher run in torch differs from the teacher in ONNX Runtime by {error:.3g} "
                                f"(tolerance {tolerance:.3g}): an op is not reproduced, so its targets would be wrong; "
                                "pass recover=False to skip accuracy recovery")
    return error


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


def _feature_loss(predicted: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor],
                  names: list[str]) -> torch.Tensor:
    """Mean over ``names`` of MSE / the teacher tensor's variance in this batch (no set-wide statistic exists
    with an online teacher; a feature map's many elements make the batch variance a stable scale)."""
    terms = []
    for name in names:
        student, teacher = predicted[name], wanted[name]
        if student.shape != teacher.shape or not (student.is_floating_point() and teacher.is_floating_point()):
            raise BadInputError(f"match: '{name}' is {student.dtype} {list(student.shape)} in the student but "
                                f"{teacher.dtype} {list(teacher.shape)} in the teacher; matched tensors must agree")
        terms.append(F.mse_loss(student, teacher) / teacher.var(unbiased=False).clamp_min(1e-12))
    return torch.stack(terms).mean()


def _variances(targets: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: max(float(array.astype(np.float64).var()), 1e-12) for name, array in targets.items()}


def _evaluate(module: OnnxModule, held: dict[str, np.ndarray], targets: dict[str, np.ndarray],
              variances: dict[str, float], classifiers: list[str], chunk: int) -> tuple[float, float | None]:
    """(loss, top-1 agreement with the teacher) on the held-out rows, ``chunk`` rows per forward; the
    agreement is the mean over classifier outputs, None without one."""
    total, agree, count = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(next(iter(held.values()))), chunk):
            rows = {name: array[begin:begin + chunk] for name, array in held.items()}
            size = len(next(iter(rows.values())))
            predicted = _forward(module, rows)
            wanted = {name: torch.from_numpy(array[begin:begin + chunk]) for name, array in targets.items()}
            total += _loss(predicted, wanted, variances).item() * size  # every term is a mean over rows
            agree += sum(int((predicted[name].argmax(1) == wanted[name].argmax(1)).sum()) for name in classifiers)
            count += size
    return total / count, (agree / (count * len(classifiers)) if classifiers else None)
