"""Evaluation and calibration data (.npz) fed through ORT in batches, and the metrics greedy soup ranks by."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import onnx

from onnxmerge.dataset import LABELS_KEY, Dataset, run_batched
from onnxmerge.dataset import load_dataset as _load_dataset
from onnxmerge.errors import BadInputError
from onnxmerge.runner import make_session

__all__ = ["LABELS_KEY", "DataLike", "Dataset", "ModelScore", "Scorer", "accuracy", "cross_entropy", "load_dataset",
           "make_scorer", "run_first_output"]

DataLike = Union[str, os.PathLike, dict]
# A user metric scores a whole candidate model; higher is better (negate a loss).
ModelScore = Callable[[onnx.ModelProto], float]


def load_dataset(data: DataLike, model: onnx.ModelProto, *, what: str, need_labels: bool) -> Dataset:
    """Soup's data (``--eval``, ``--reset-bn``) read by the one dataset loader; a single-input model also takes a
    file holding one array of any name, as soup always has."""
    return _load_dataset(data, model, what=what, need_labels=need_labels, sole_array_any_name=True)


def run_first_output(model: onnx.ModelProto | str | os.PathLike, dataset: Dataset, batch_size: int,
                     template: onnx.ModelProto) -> np.ndarray:
    """The first output over every sample, batched under ``template``'s export batch rule."""
    session = make_session(model)
    output = session.get_outputs()[0].name
    return run_batched(session, dataset, template, outputs=[output], batch_size=batch_size)[0]


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
        raise BadInputError(f"metric '{metric}' needs evaluation data (evaluation= data with a '{LABELS_KEY}' array)")
    dataset = load_dataset(eval_data, template, what="--eval", need_labels=True)
    function, higher_is_better = BUILTIN_METRICS[metric]

    def score(model: onnx.ModelProto) -> float:
        return function(run_first_output(model, dataset, batch_size, template), dataset.labels)

    return Scorer(metric, higher_is_better, score)
