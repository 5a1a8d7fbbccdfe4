"""The Python API: ``fold`` and the ORT pre-pass ``InferenceSession``. The CLI is a thin shell over these."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import onnx

from onnxmerge.environment import default_cache_dir
from onnxmerge.errors import BadInputError, VerificationError
from onnxmerge.io import ModelLike, io_signature, iter_tensors, staged_model
from onnxmerge.pass_framework import PassOptions
from onnxmerge.pipeline import run_pipeline, select_passes
from onnxmerge.prepared import InputShapes, prepare, preflight_output
from onnxmerge.results import FoldResult
from onnxmerge.stats import model_stats
from onnxmerge.verify import DEFAULT_ATOL, DEFAULT_CHECK_N, DEFAULT_RTOL, EquivalenceChecker
from onnxmerge.version import __version__


def fold(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    only: list[str] | None = None,
    skip: list[str] | None = None,
    check_n: int = DEFAULT_CHECK_N,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    input_shapes: InputShapes | None = None,
    seed: int = 0,
    noise_floor: bool = True,
    allow_costlier_merges: bool = False,
    force: bool = False,
    external_data: bool | None = None,
    overwrite_input_shapes: InputShapes | None = None,
    fold_size_limit_bytes: int = PassOptions.fold_size_limit_bytes,
) -> FoldResult:
    """Apply the exact passes to a fixed point, verify the result in ORT, and only then return/write it.

    A path in gives a Path out (written to ``output``, default ``<stem>.folded.onnx`` beside the input);
    a ModelProto in gives a ModelProto out (also written if ``output`` is given). On a verification
    failure nothing is written and :class:`VerificationError` names the first pass that broke the model.

    ``input_shapes`` picks the sizes verification and statistics use; dynamic dims stay dynamic.
    ``overwrite_input_shapes`` fixes dims in the written model (onnxsim's ``--overwrite-input-shape``), so
    shape arithmetic that reads them folds too. ``fold_size_limit_bytes`` caps a folded tensor's size.

    Memory: a file whose weights are in external data (any model over 2 GB) is folded with its weights on
    disk. Passes read only the tensors they look at, one at a time; the output is staged beside its
    destination (untouched weights copied from the input's data file in chunks) and verified from there,
    one ORT session at a time, so peak memory is about one session's copy of the weights.
    """
    pass_names = select_passes(only, skip)
    if fold_size_limit_bytes < 0:
        raise BadInputError(f"fold_size_limit_bytes must be >= 0, got {fold_size_limit_bytes}")
    prepared = prepare(model, input_shapes=input_shapes, overwrite_input_shapes=overwrite_input_shapes)
    original, base_dir, reference_path = prepared.proto, prepared.base_dir, prepared.reference_path
    if external_data is None and prepared.had_external_data:
        external_data = True
    if prepared.path is not None and output is None:
        output = prepared.path.with_name(prepared.path.stem + ".folded.onnx")
    if output is not None:  # before any work: a bad output path fails in a second, not after the passes
        output = preflight_output(output, prepared, force=force, external_data=external_data)
    shapes = prepared.input_shapes
    result = FoldResult(input=str(prepared.path) if prepared.path else None, passes=pass_names,
                        canonicalization=prepared.notes, before=model_stats(original, shapes))
    with prepared.weights():
        if prepared.quantized:
            message = "quantized model (QLinear*/QuantizeLinear ops): passed through unchanged"
            warnings.warn(message, stacklevel=2)
            result.warnings.append(message)
            result_proto, verify = prepared.proto, None
            result.verification = {"passed": True, "skipped": "model unchanged"}
        else:
            options = PassOptions(allow_costlier_merges=allow_costlier_merges,
                                  fold_size_limit_bytes=fold_size_limit_bytes)
            run = run_pipeline(original, pass_names, options)
            result_proto = run.model
            result.rewrites = run.rewrites_per_pass()
            result.rounds, result.converged = run.rounds, run.converged
            result.refusals = run.refusals_dict()
            if not run.converged:
                result.warnings.append(f"pipeline did not reach a fixed point in {run.rounds} rounds")
            n_steps = len(run.steps)
            del run

            def verify(candidate) -> None:
                checker = EquivalenceChecker(original, check_n=check_n, rtol=rtol, atol=atol,
                                             specs=prepared.specs, seed=seed, noise_floor=noise_floor,
                                             reference_path=reference_path, base_dir=base_dir)
                verification = checker.check(candidate)
                result.verification = verification.to_dict()
                _check_signature(original, result_proto)
                if not verification.passed:
                    culprit = _first_failing_pass(original, pass_names, options, checker, n_steps)
                    result.verification["first_failing_pass"] = culprit
                    raise VerificationError(
                        f"verification failed after pass '{culprit}': {verification.failure}; nothing was written",
                        result.to_dict())

        if output is None:
            if verify is not None:
                verify(result_proto)
            result.after = model_stats(result_proto, shapes)
            result.model = result.proto = result_proto
            return result
        # What is verified is the file that will be published: written into a staging folder beside the
        # output, loaded by ORT from there, moved into place only when it passed (else removed).
        with staged_model(result_proto, output, input_path=prepared.path, force=force, external_data=external_data,
                          base_dir=base_dir) as staged:
            if verify is not None:
                verify(staged.path)
            result.after = model_stats(staged.proto, shapes)
            written = staged.publish()
    result.output = str(written)
    if isinstance(model, onnx.ModelProto):
        result.model = result.proto = result_proto
    else:  # for a file, the proto is the model as written: large tensors reference the output's data file
        result.model, result.proto = written, staged.proto
    return result


def _check_signature(original: onnx.ModelProto, result: onnx.ModelProto) -> None:
    before, after = io_signature(original), io_signature(result)
    if before != after:
        raise VerificationError(f"the model's input/output signature changed: {before} -> {after}")


def _first_failing_pass(original: onnx.ModelProto, pass_names: list[str], options: PassOptions,
                        checker: EquivalenceChecker, n_steps: int) -> str:
    """Binary search over replayed prefixes of the pipeline for the first step whose output fails."""
    low, high = 0, n_steps  # prefix `low` passes, prefix `high` fails
    last_run = None
    while high - low > 1:
        middle = (low + high) // 2
        run = run_pipeline(original, pass_names, options, stop_after_steps=middle)
        if checker.check(run.model).passed:
            low = middle
        else:
            high, last_run = middle, run
    run = last_run or run_pipeline(original, pass_names, options, stop_after_steps=high)
    return run.steps[-1].pass_name if run.steps else "<none>"


def content_hash(path: Path, options: dict) -> str:
    """Hash of the model file, its external data files and the options: the pre-pass cache key."""
    digest = hashlib.sha256()
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    digest.update(__version__.encode())
    digest.update(path.read_bytes())
    proto = onnx.load(str(path), load_external_data=False)
    locations = sorted({entry.value for tensor in iter_tensors(proto.graph) for entry in tensor.external_data
                        if entry.key == "location"})
    for location in locations:
        data_file = path.parent / location
        if data_file.is_file():
            with open(data_file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:32]


def InferenceSession(path: str | os.PathLike, sess_options=None, providers=None, *, passes: list[str] | None = None,
                     cache_dir: str | os.PathLike | None = None, **fold_options):
    """A real ``onnxruntime.InferenceSession`` over the folded model, folded once and cached by content hash.

    If the folded model fails verification the session is built over the original model, with a warning.
    """
    from onnxmerge.ort import ort

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"model file not found: {path}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = content_hash(path, {"passes": passes, **fold_options})
    cached = cache / f"{path.stem}-{key}.onnx"
    target = cached
    if not cached.is_file():
        try:
            fold(path, cached, only=passes, **fold_options)
        except VerificationError as failure:
            warnings.warn(f"onnxmerge pre-pass not applied: {failure}", stacklevel=2)
            target = path
    return ort.InferenceSession(str(target), sess_options=sess_options, providers=providers)
