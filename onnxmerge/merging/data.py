"""Evaluation and calibration data (.npz) fed through ORT in batches, and the metrics greedy soup ranks by."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
import onnx

from onnxmerge.errors import BadInputError, first_line
from onnxmerge.runner import input_specs, make_session

LABELS_KEY = "labels"
DataLike = Union[str, os.PathLike, dict]
# A user metric scores a whole candidate model; higher is better (negate a loss).
ModelScore = Callable[[onnx.ModelProto], float]


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    origin: str

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, model: onnx.ModelProto, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most ``batch_size`` samples, or exactly the batch a model with a fixed batch dim takes."""
        fixed = {_fixed_batch(value) for value in _graph_inputs(model)} - {None}
        if len(fixed) > 1:
            raise BadInputError(f"the model's inputs fix different batch sizes {sorted(fixed)}")
        step = next(iter(fixed)) if fixed else batch_size
        if fixed and len(self) % step:
            raise BadInputError(f"{self.origin}: {len(self)} samples do not split into batches of {step}, "
                                "the batch size the model's inputs fix")
        for start in range(0, len(self), step):
            yield {name: array[start:start + step] for name, array in self.inputs.items()}


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _fixed_batch(value: onnx.ValueInfoProto) -> int | None:
    dims = value.type.tensor_type.shape.dim
    return dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def load_dataset(data: DataLike, model: onnx.ModelProto, *, what: str, need_labels: bool) -> Dataset:
    """Arrays keyed by graph input name (a single-input model also takes any one array) plus ``labels``."""
    origin = f"{what} {data}" if not isinstance(data, dict) else what
    arrays = _read_arrays(data, origin)
    labels = arrays.pop(LABELS_KEY, None)
    specs = input_specs(model)
    names = [spec.name for spec in specs]
    if set(names) <= set(arrays):
        chosen = {name: arrays[name] for name in names}
    elif len(names) == 1 and len(arrays) == 1:
        chosen = {names[0]: next(iter(arrays.values()))}
    else:
        raise BadInputError(f"{origin}: need arrays named after the model's inputs {names}"
                            f"{' (or one array)' if len(names) == 1 else ''}, found {sorted(arrays)}")
    inputs = {}
    for spec in specs:
        array = np.asarray(chosen[spec.name])
        if array.ndim != len(spec.shape):
            raise BadInputError(f"{origin}: array for input '{spec.name}' has rank {array.ndim}, the model "
                                f"expects rank {len(spec.shape)}")
        inputs[spec.name] = np.ascontiguousarray(array, dtype=spec.dtype)
    lengths = {len(array) for array in inputs.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise BadInputError(f"{origin}: input arrays must be non-empty and equally long (got {sorted(lengths)})")
    if need_labels and labels is None:
        raise BadInputError(f"{origin}: needs a '{LABELS_KEY}' array to score models")
    if labels is not None and len(labels) != lengths.pop():
        raise BadInputError(f"{origin}: '{LABELS_KEY}' has {len(labels)} entries for {len(inputs[names[0]])} samples")
    return Dataset(inputs, None if labels is None else np.asarray(labels), origin)


def _read_arrays(data: DataLike, origin: str) -> dict[str, np.ndarray]:
    if isinstance(data, dict):
        return dict(data)
    path = Path(data)
    if not path.is_file():
        raise BadInputError(f"{origin}: file not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError) as exc:
        raise BadInputError(f"{origin}: cannot read it as .npz ({first_line(exc)})") from None


def run_first_output(model: onnx.ModelProto | str | os.PathLike, dataset: Dataset, batch_size: int,
                     template: onnx.ModelProto) -> np.ndarray:
    session = make_session(model)
    output = session.get_outputs()[0].name
    return np.concatenate([session.run([output], feeds)[0] for feeds in dataset.batches(template, batch_size)])


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 along axis 1 (class scores), so it also covers per-pixel labels."""
    return float(np.mean(outputs.argmax(axis=1) == labels))


def cross_entropy(outputs: np.ndarray, labels: np.ndarray) -> float:
    logits = outputs.astype(np.float64)
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.expand_dims(labels.astype(np.int64), 1), axis=1)
    return float(-picked.mean())


BUILTIN_METRICS = {"accuracy": (accuracy, True), "loss": (cross_entropy, False)}


@dataclass
class Scorer:
    """Scores a model; ``higher_is_better`` tells greedy soup which way to rank."""

    name: str
    higher_is_better: bool
    score: ModelScore

    def better(self, candidate: float, incumbent: float) -> bool:
        return candidate > incumbent if self.higher_is_better else candidate < incumbent

    def ranking_key(self, value: float) -> float:
        return -value if self.higher_is_better else value


def make_scorer(metric: str | ModelScore, eval_data: DataLike | None, template: onnx.ModelProto,
                batch_size: int) -> Scorer:
    if callable(metric):
        return Scorer(getattr(metric, "__name__", "metric"), True, metric)
    if metric not in BUILTIN_METRICS:
        raise BadInputError(f"unknown metric '{metric}'; choose from {', '.join(BUILTIN_METRICS)} "
                            "(or pass a callable through the API)")
    if eval_data is None:
        raise BadInputError(f"metric '{metric}' needs evaluation data (--eval data.npz with a '{LABELS_KEY}' array)")
    dataset = load_dataset(eval_data, template, what="--eval", need_labels=True)
    function, higher_is_better = BUILTIN_METRICS[metric]

    def score(model: onnx.ModelProto) -> float:
        return function(run_first_output(model, dataset, batch_size, template), dataset.labels)

    return Scorer(metric, higher_is_better, score)
