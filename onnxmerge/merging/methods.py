"""The merge formulas, one stored tensor at a time: plain numpy, no graph, so each is tested against numpy.

Every function takes the paired tensors of the inputs (already in the compute dtype) and returns the merged
tensor. Methods with a base work on task vectors tau_i = theta_i - theta_0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from onnxmerge.errors import BadInputError

LINEAR_METHODS = ("uniform", "weighted", "greedy")
BASE_METHODS = ("task-arithmetic", "ties", "dare")
METHODS = LINEAR_METHODS + BASE_METHODS
DEFAULT_DENSITY = 0.2


@dataclass(frozen=True)
class MergeSpec:
    """A validated method and its parameters (what provenance records)."""

    method: str
    weights: tuple[float, ...]
    scale: float = 1.0
    density: float = DEFAULT_DENSITY
    seed: int = 0

    @classmethod
    def make(cls, method: str, n_models: int, *, weights=None, scale: float = 1.0, density: float | None = None,
             seed: int = 0, has_base: bool = False) -> "MergeSpec":
        if method not in METHODS:
            raise BadInputError(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
        needs_base = method in BASE_METHODS
        if needs_base and not has_base:
            raise BadInputError(f"method '{method}' works on task vectors and needs a base model (base=)")
        if has_base and not needs_base:
            raise BadInputError(f"base= is used only by {', '.join(BASE_METHODS)}, not by '{method}'")
        if n_models < (1 if needs_base else 2):
            raise BadInputError(f"method '{method}' needs at least {1 if needs_base else 2} input models")
        if weights is not None and method in ("uniform", "greedy"):
            raise BadInputError(f"weights= is not used by '{method}' (use method='weighted')")
        if weights is None:
            if method == "weighted":
                raise BadInputError("method 'weighted' needs weights=, one per model")
            weights = [1.0] * n_models
        weights = tuple(float(w) for w in weights)
        if len(weights) != n_models:
            raise BadInputError(f"got {len(weights)} weight(s) for {n_models} model(s)")
        if not all(math.isfinite(w) for w in weights) or not math.isfinite(scale):
            raise BadInputError("weights and scale must be finite numbers")
        if method == "weighted" and sum(weights) == 0:
            raise BadInputError("the weights sum to zero; a weighted average needs a non-zero total")
        if density is not None and method not in ("ties", "dare"):
            raise BadInputError(f"density= is used only by ties and dare, not by '{method}'")
        density = DEFAULT_DENSITY if density is None else float(density)
        if not 0 < density <= 1:
            raise BadInputError(f"density must be in (0, 1] (got {density})")
        if seed < 0:
            raise BadInputError(f"seed must be >= 0 (got {seed})")
        return cls(method, weights, float(scale), density, int(seed))

    def parameters(self) -> dict:
        if self.method in ("uniform", "greedy"):
            return {}
        if self.method == "weighted":
            return {"weights": list(self.weights)}
        parameters = {"weights": list(self.weights), "scale": self.scale}
        if self.method in ("ties", "dare"):
            parameters["density"] = self.density
        return parameters


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float32 for every float type narrower than it (float16, bfloat16); float64 stays float64."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def linear(tensors: Iterable[np.ndarray], weights: tuple[float, ...]) -> np.ndarray:
    """sum_i w_i theta_i / sum_i w_i, each term scaled before adding so large weights cannot overflow.

    Consumes ``tensors`` one at a time: only the running sum and the current input are held.
    """
    total = sum(weights)
    merged = None
    for tensor, weight in zip(tensors, weights):
        term = tensor * tensor.dtype.type(weight / total)
        merged = np.asarray(term) if merged is None else np.add(merged, term, out=merged)
    return merged


def task_arithmetic(base: np.ndarray, tensors: list[np.ndarray], weights: tuple[float, ...],
                    scale: float) -> np.ndarray:
    """theta_0 + lambda * sum_i w_i tau_i."""
    combined = np.zeros_like(base)
    for tensor, weight in zip(tensors, weights):
        combined += (tensor - base) * base.dtype.type(weight)
    return base + base.dtype.type(scale) * combined


def trim_to_density(delta: np.ndarray, density: float) -> np.ndarray:
    """Keep the ceil(density * n) largest-magnitude entries of one tensor, zero the rest."""
    keep = math.ceil(density * delta.size)
    if keep >= delta.size:
        return delta
    flat = delta.ravel()
    kept = np.zeros_like(flat)
    largest = np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep:]
    kept[largest] = flat[largest]
    return kept.reshape(delta.shape)


def ties(base: np.ndarray, tensors: list[np.ndarray], weights: tuple[float, ...], scale: float,
         density: float) -> np.ndarray:
    """TIES: trim each tau_i, elect a sign per entry from sum_i w_i tau_i, average only the agreeing entries."""
    deltas = [trim_to_density(tensor - base, density) for tensor in tensors]
    elected = np.sign(sum(delta * base.dtype.type(w) for delta, w in zip(deltas, weights)))
    numerator, denominator = np.zeros_like(base), np.zeros_like(base)
    for delta, weight in zip(deltas, weights):
        agrees = (np.sign(delta) == elected) & (delta != 0)
        numerator += np.where(agrees, delta * base.dtype.type(weight), 0)
        denominator += np.where(agrees, base.dtype.type(weight), 0)
    merged = np.divide(numerator, denominator, out=np.zeros_like(base), where=denominator != 0)
    return base + base.dtype.type(scale) * merged


def dare_rng(seed: int, model_index: int, slot_index: int) -> np.random.Generator:
    """One stream per (seed, model, tensor): the result does not depend on the order tensors are merged in."""
    return np.random.default_rng([seed, model_index, slot_index])


def dare(base: np.ndarray, tensors: list[np.ndarray], weights: tuple[float, ...], scale: float, density: float,
         rngs: list[np.random.Generator]) -> np.ndarray:
    """DARE: keep each delta entry with probability density, rescale survivors by 1/density, add linearly."""
    combined = np.zeros_like(base)
    for tensor, weight, rng in zip(tensors, weights, rngs):
        kept = rng.random(base.shape) < density
        combined += np.where(kept, (tensor - base) / base.dtype.type(density), 0) * base.dtype.type(weight)
    return base + base.dtype.type(scale) * combined


def merge_tensors(spec: MergeSpec, tensors: Iterable[np.ndarray], base: np.ndarray | None, slot_index: int,
                  model_indices: list[int], *, statistics: bool = False) -> np.ndarray:
    """Dispatch one slot to the method's formula; ``model_indices`` seed DARE per input.

    Linear methods stream ``tensors``; the task-vector methods need every input's version of the tensor.

    ``statistics`` (BatchNorm running mean/var) are never trimmed or dropped: TIES and DARE sparsify learned
    deltas, and a sparsified variance can turn negative. They follow task arithmetic instead.
    """
    weights = tuple(spec.weights[i] for i in model_indices)
    if spec.method in LINEAR_METHODS:
        return linear(tensors, weights)
    tensors = list(tensors)
    if spec.method == "task-arithmetic" or statistics:
        return task_arithmetic(base, tensors, weights, spec.scale)
    if spec.method == "ties":
        return ties(base, tensors, weights, spec.scale, spec.density)
    rngs = [dare_rng(spec.seed, i, slot_index) for i in model_indices]
    return dare(base, tensors, weights, spec.scale, spec.density, rngs)
