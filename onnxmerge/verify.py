"""Numerical equivalence of two models in ORT: the gate every exact rewrite must pass before it is written."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxmerge.errors import BadInputError, first_line
from onnxmerge.runner import input_specs, make_session, random_inputs, session_options

# ORT session option: the folder external data is read from when the model is given as bytes.

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
DEFAULT_CHECK_N = 3
# An element also passes if its error is within this multiple of the float32 noise ORT's own optimizer
# introduces on the original model (see EquivalenceChecker).
NOISE_FLOOR_FACTOR = 2.0


@dataclass
class OutputCheck:
    name: str
    noise_floor: float
    max_abs_error: float
    max_rel_error: float
    mismatched: int
    passed: bool


@dataclass
class Verification:
    passed: bool
    check_n: int
    rtol: float
    atol: float
    seed: int
    input_shapes: dict[str, list[int]]
    assumptions: list[str]
    noise_floor: bool
    outputs: list[OutputCheck] = field(default_factory=list)
    failure: str | None = None

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        return asdict(self) | {"max_abs_error": self.max_abs_error}


class EquivalenceChecker:
    """Runs the reference once per seeded input set, then compares any number of candidates against it.

    Both sides run with ORT graph optimizations disabled, so what is compared is our rewrite, not ORT's.

    Float32 results depend on summation order, so a deep net cannot be reproduced to 1e-5 by any rewrite:
    ORT's own optimizer (Conv+BN fusion, layout changes) already moves a random-weight ResNet-50's logits
    by ~4e-5. The reference is therefore also run with ORT's optimizer on, and an element whose error is
    within NOISE_FLOOR_FACTOR x that difference passes too (``noise_floor=False`` turns this off). A real
    mistake (a wrong fold) is orders of magnitude above that floor.

    Memory: at most one ORT session exists at a time (each holds its own copy, or mapping, of the weights):
    the reference's is dropped once its outputs are computed, a candidate's when it has been compared. Models
    whose weights stay in external data are loaded by ORT from files: ``reference_path`` (the file the
    reference was read from, when it is that file's model unchanged) and candidates given as paths (a staged
    output); a ModelProto whose external tensors live in ``base_dir`` is given to ORT as bytes plus that folder.
    """

    def __init__(self, reference: onnx.ModelProto, *, check_n: int = DEFAULT_CHECK_N, rtol: float = DEFAULT_RTOL,
                 atol: float = DEFAULT_ATOL, input_shapes: dict | None = None, seed: int = 0,
                 noise_floor: bool = True, reference_path: str | os.PathLike | None = None,
                 base_dir: str | os.PathLike | None = None, specs=None):
        """``specs`` (input specs a caller already resolved, e.g. ``PreparedModel.specs``) wins over
        ``input_shapes``."""
        if check_n < 1:
            raise BadInputError("check_n must be at least 1")
        self.check_n, self.rtol, self.atol, self.seed, self.noise_floor = check_n, rtol, atol, seed, noise_floor
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.specs = list(specs) if specs is not None else input_specs(reference, input_shapes)
        source = reference_path if reference_path is not None else reference
        session = self._session(source, "disable")
        self.output_names = [o.name for o in session.get_outputs()]
        self.feeds = [random_inputs(self.specs, seed + trial) for trial in range(check_n)]
        try:
            self.expected = [session.run(None, feeds) for feeds in self.feeds]
        except Exception as exc:  # ORT's error types are not part of its public API
            raise BadInputError(f"the model does not run in ONNX Runtime with inputs {self._shapes()}: "
                                f"{first_line(exc)}") from None
        del session  # before the next session: one copy of the weights at a time
        self.noise = {name: 0.0 for name in self.output_names}
        if noise_floor:
            optimized = self._session(source, "all")
            for feeds, expected in zip(self.feeds, self.expected):
                for name, want, got in zip(self.output_names, expected, optimized.run(None, feeds)):
                    if np.issubdtype(want.dtype, np.floating):
                        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
                        self.noise[name] = max(self.noise[name], float(np.nanmax(diff, initial=0.0)))
            del optimized

    def _session(self, model: onnx.ModelProto | str | os.PathLike, opt_level: str):
        """An ORT session over a path, or a ModelProto whose external tensors (if any) live in ``base_dir``."""
        return make_session(model, options=session_options(opt_level), base_dir=self.base_dir)

    def _shapes(self) -> dict[str, list[int]]:
        return {spec.name: list(spec.shape) for spec in self.specs}

    def check(self, candidate: onnx.ModelProto | str | os.PathLike) -> Verification:
        """Compare ``candidate`` (a ModelProto, or the path of a model file) with the reference."""
        result = Verification(passed=True, check_n=self.check_n, rtol=self.rtol, atol=self.atol, seed=self.seed,
                              input_shapes=self._shapes(),
                              assumptions=[note for spec in self.specs for note in spec.assumed],
                              noise_floor=self.noise_floor)
        session = self._session(candidate, "disable")
        names = [o.name for o in session.get_outputs()]
        if names != self.output_names:
            result.passed, result.failure = False, f"output names changed: {self.output_names} -> {names}"
            return result
        stats = {name: [0.0, 0.0, 0] for name in names}
        for feeds, expected in zip(self.feeds, self.expected):
            for name, want, got in zip(names, expected, session.run(None, feeds)):
                if want.shape != got.shape or want.dtype != got.dtype:
                    result.passed = False
                    result.failure = (f"output '{name}' changed from {want.dtype}{list(want.shape)} "
                                      f"to {got.dtype}{list(got.shape)}")
                    return result
                self._accumulate(stats[name], want, got, NOISE_FLOOR_FACTOR * self.noise[name])
        for name, (max_abs, max_rel, mismatched) in stats.items():
            result.outputs.append(OutputCheck(name, self.noise[name], max_abs, max_rel, mismatched, mismatched == 0))
        result.passed = all(o.passed for o in result.outputs)
        if not result.passed:
            worst = max((o for o in result.outputs if not o.passed), key=lambda o: o.max_abs_error)
            result.failure = (f"output '{worst.name}' differs: max abs error {worst.max_abs_error:.3g}, "
                              f"{worst.mismatched} element(s) outside rtol={self.rtol:g} atol={self.atol:g} "
                              f"and {NOISE_FLOOR_FACTOR:g}x ORT's own noise ({worst.noise_floor:.3g})")
        return result

    def _accumulate(self, stat: list, want: np.ndarray, got: np.ndarray, slack: float) -> None:
        if not np.issubdtype(want.dtype, np.number):
            stat[2] += int(np.count_nonzero(want != got))
            return
        want64, got64 = want.astype(np.float64), got.astype(np.float64)
        diff = np.abs(got64 - want64)
        diff = np.where(np.isnan(want64) & np.isnan(got64), 0.0, diff)
        close = np.isclose(got64, want64, rtol=self.rtol, atol=self.atol, equal_nan=True) | (diff <= slack)
        stat[0] = max(stat[0], float(np.max(diff, initial=0.0)))
        stat[1] = max(stat[1], float(np.max(diff / np.maximum(np.abs(want64), np.finfo(np.float32).tiny), initial=0.0)))
        stat[2] += int(np.count_nonzero(~close))
