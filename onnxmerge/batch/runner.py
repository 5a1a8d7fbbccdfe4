"""``run_batch``: every .onnx under a folder through one pipeline, each in its own worker, into a mirrored tree.

Why the writes happen in this order:
- workers write only into private staging folders (``.onnxmerge-*``); the driver alone moves a finished
  model into place (a rename, so whole or not at all) and then writes its report (atomically). A report
  therefore vouches for a complete model, and ``--resume`` redoes any model without a matching report;
- Ctrl-C and SIGTERM are held back during those few renames, so an interrupted batch never leaves a model
  without its report; SIGKILL can (at most the one being committed, which is whole; --resume redoes it);
- a lock on OUT_DIR keeps a second batch out, so ``.onnxmerge-*`` entries found at the start are strays of a
  killed run and are removed; until then nothing reads them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import tempfile
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf.message import DecodeError

from onnxmerge.api import content_hash
from onnxmerge.batch.config import BatchConfig, ModelSettings, load_config, parse_size
from onnxmerge.batch.executors import EXECUTORS, LocalExecutor, RayExecutor
from onnxmerge.batch.isolation import Task
from onnxmerge.batch.pipelines import get_pipeline
from onnxmerge.batch.render import write_reports
from onnxmerge.batch.results import OK, SKIPPED, BatchReport, ModelResult
from onnxmerge.environment import describe
from onnxmerge.errors import BadInputError
from onnxmerge.report import write_json

DEFAULT_TIMEOUT_S = 1800.0
MIN_AUTO_MEMORY_LIMIT = 2 * 2**30
TEMP_PREFIX = ".onnxmerge-"  # onnxmerge.io's atomic writes and the batch's staging folders
LOCK_NAME = ".onnxmerge.lock"
MODEL_REPORT_SUFFIX = ".report.json"


class BatchListener:
    """Hooks for a progress display; the batch calls them from the thread that called run_batch."""

    def planned(self, models: list[str]) -> None:
        pass

    def started(self, model: str) -> None:
        pass

    def finished(self, result: ModelResult) -> None:
        pass


@dataclass(frozen=True)
class _Job:
    relative: str
    source: Path
    output: Path
    settings: ModelSettings
    input_hash: str | None


def run_batch(in_dir: str | os.PathLike, out_dir: str | os.PathLike, *, pipeline: str = "fold",
              config: str | os.PathLike | None = None, jobs: int | None = None,
              timeout: float = DEFAULT_TIMEOUT_S, memory_limit: int | str | None = "auto", resume: bool = False,
              executor: str = "local", ray_address: str | None = None, bench: bool = False,
              listener: BatchListener | None = None) -> BatchReport:
    """Run ``pipeline`` on every .onnx under ``in_dir``, writing results to the same relative paths under ``out_dir``.

    ``memory_limit`` caps each worker's address space: "auto" (physical memory / jobs, at least 2 GiB), a
    size ("8GiB") or bytes, or None for no limit. ``config`` is a TOML file of per-model settings (see
    :mod:`onnxmerge.batch.config`). The reports (``onnxmerge-batch.{md,csv,json}`` in ``out_dir``) are
    written even when the batch is interrupted; then KeyboardInterrupt propagates.
    """
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    chosen = get_pipeline(pipeline)
    jobs = (os.cpu_count() or 1) if jobs is None else jobs
    _check_arguments(in_dir, out_dir, jobs, timeout, executor, ray_address)
    base = ModelSettings(options={}, timeout=float(timeout), memory_limit=_memory_limit(memory_limit, jobs))
    batch_config = load_config(config, chosen) if config else BatchConfig()
    models = discover(in_dir, out_dir)
    if not models:
        raise BadInputError(f"no .onnx models under {in_dir}")
    for relative in models:  # whole-model settings are checked before any worker starts
        try:
            chosen.check(batch_config.settings_for(relative, base).options)
        except BadInputError as error:
            raise BadInputError(f"{relative}: {error}") from None
    listener = listener or BatchListener()
    report = BatchReport(in_dir=str(in_dir), out_dir=str(out_dir), pipeline=pipeline, executor=executor, jobs=jobs,
                         bench=bench, environment=describe("cpu"))
    started = time.perf_counter()
    workers = RayExecutor(jobs, ray_address) if executor == "ray" else LocalExecutor(jobs)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(out_dir):
            _remove_strays(out_dir)
            listener.planned(models)
            queue = deque()
            for relative in models:
                job = _plan(relative, in_dir, out_dir, batch_config.settings_for(relative, base), pipeline, bench)
                previous = _previous_result(job) if resume else None
                if previous is not None:
                    report.models.append(previous)
                    listener.finished(previous)
                else:
                    queue.append(job)
            try:
                _dispatch(queue, workers, jobs, pipeline, bench, report, listener, out_dir)
            finally:
                report.seconds = round(time.perf_counter() - started, 1)
                order = {model: index for index, model in enumerate(models)}
                report.models.sort(key=lambda result: order[result.model])
                write_reports(report, out_dir)
    finally:
        workers.close()
    return report


def _check_arguments(in_dir: Path, out_dir: Path, jobs: int, timeout: float, executor: str,
                     ray_address: str | None) -> None:
    if not in_dir.is_dir():
        raise BadInputError(f"input folder not found: {in_dir}")
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInputError(f"output path exists and is not a folder: {out_dir}")
    if out_dir.resolve() == in_dir.resolve():
        raise BadInputError("the output folder must differ from the input folder (outputs keep the inputs' names)")
    if jobs < 1 or timeout <= 0:
        raise BadInputError(f"need jobs >= 1 and timeout > 0 (got jobs={jobs}, timeout={timeout})")
    if executor not in EXECUTORS:
        raise BadInputError(f"unknown executor '{executor}'; choose from: {', '.join(EXECUTORS)}")
    if ray_address and executor != "ray":
        raise BadInputError("ray_address= needs executor='ray'")


def _memory_limit(value: int | str | None, jobs: int) -> int | None:
    if value == "auto":
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return max(MIN_AUTO_MEMORY_LIMIT, physical // jobs)
    return None if value is None else parse_size(value)


def discover(in_dir: Path, out_dir: Path) -> list[str]:
    """Every .onnx file under in_dir as a sorted relative POSIX path, leaving out out_dir and temp entries."""
    in_root, out_root = in_dir.resolve(), out_dir.resolve()
    found = []
    for path in in_root.rglob("*.onnx"):
        relative = path.relative_to(in_root)
        if path.is_file() and not path.is_relative_to(out_root) and \
                not any(part.startswith(TEMP_PREFIX) for part in relative.parts):
            found.append(relative.as_posix())
    return sorted(found)


def model_report_path(output: Path) -> Path:
    return output.with_name(output.stem + MODEL_REPORT_SUFFIX)


def _plan(relative: str, in_dir: Path, out_dir: Path, settings: ModelSettings, pipeline: str, bench: bool) -> _Job:
    source = in_dir / relative
    hashed = {"pipeline": pipeline, "options": settings.options, "bench": bench}
    try:
        input_hash = content_hash(source, hashed)
    except (DecodeError, ValueError, RuntimeError, OSError):  # not parseable: never up to date, refused again
        input_hash = None
    return _Job(relative, source, out_dir / relative, settings, input_hash)


def _previous_result(job: _Job) -> ModelResult | None:
    """An earlier run's result if it was ok for this very input and options and its output is intact."""
    try:
        previous = ModelResult.from_dict(json.loads(model_report_path(job.output).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if previous.status != OK or job.input_hash is None or previous.input_hash != job.input_hash \
            or not job.output.is_file():
        return None
    try:
        intact = content_hash(job.output, {}) == previous.output_hash
    except (DecodeError, ValueError, RuntimeError, OSError):
        intact = False
    return replace(previous, model=job.relative, status=SKIPPED, seconds=None) if intact else None


def _dispatch(queue: deque, workers, jobs: int, pipeline: str, bench: bool, report: BatchReport,
              listener: BatchListener, out_dir: Path) -> None:
    """Keep ``jobs`` workers busy; commit each result as it arrives. Interrupted: end the workers, note the rest."""
    env = {name: value for name, value in os.environ.items() if name.startswith("ONNXMERGE_")}
    in_flight: dict = {}
    try:
        while queue or in_flight:
            while queue and len(in_flight) < jobs:
                job = queue.popleft()
                job.output.parent.mkdir(parents=True, exist_ok=True)
                staging = tempfile.mkdtemp(prefix=TEMP_PREFIX + "batch-", dir=job.output.parent)
                task = Task(model=job.relative, source=str(job.source), staging=staging, output_name=job.output.name,
                            pipeline=pipeline, options=job.settings.options, bench=bench,
                            timeout=job.settings.timeout, memory_limit=job.settings.memory_limit, env=env)
                in_flight[workers.submit(task)] = (job, task)
                listener.started(job.relative)
            for handle, result in workers.wait_any(list(in_flight)):
                job, task = in_flight[handle]
                entry = _commit(job, Path(task.staging), result, out_dir)
                del in_flight[handle]  # only now: an interrupt during the commit still counts it as pending
                report.models.append(entry)
                listener.finished(entry)
    except KeyboardInterrupt:
        report.pending = sorted([job.relative for job, _ in in_flight.values()] + [job.relative for job in queue])
        workers.close()  # first: no worker may still write into a staging folder removed next
        for _, task in in_flight.values():
            shutil.rmtree(task.staging, ignore_errors=True)
        raise


def _commit(job: _Job, staging: Path, result: dict, out_dir: Path) -> ModelResult:
    """Move an ok model into place, then write its report; a model that did not make it leaves no output."""
    entry = ModelResult(model=job.relative, status=result["status"], reason=result["reason"],
                        failure=result["failure"], seconds=result.get("seconds"), input_hash=job.input_hash,
                        details=result["report"])
    staged, data_name = staging / job.output.name, job.output.name + ".data"
    report_path = model_report_path(job.output)
    if entry.details is not None:
        _relocate(entry.details, job.source, job.output if entry.status == OK else None)
    if entry.status == OK:
        entry.output = job.output.relative_to(out_dir).as_posix()
        entry.output_hash = content_hash(staged, {})
    with _signals_held():
        if entry.status == OK:
            if (staging / data_name).is_file():
                os.replace(staging / data_name, job.output.with_name(data_name))
            else:
                job.output.with_name(data_name).unlink(missing_ok=True)  # an earlier output's weights
            os.replace(staged, job.output)
            write_json(entry.to_dict(), report_path)
        else:  # an earlier run's output no longer matches this input
            report_path.unlink(missing_ok=True)
            job.output.unlink(missing_ok=True)
            job.output.with_name(data_name).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    return entry


def _relocate(details: dict, source: Path, output: Path | None) -> None:
    """The worker saw staging (or a Ray node's) paths; the report names the files where they now lie."""
    details["input"] = str(source)
    if output is not None:
        details["output"] = str(output)
    if "a" in (details.get("bench") or {}):
        details["bench"]["a"], details["bench"]["b"] = str(source), str(output)


@contextlib.contextmanager
def _signals_held():
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _locked(out_dir: Path):
    with open(out_dir / LOCK_NAME, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInputError(f"another onnxmerge batch is writing to {out_dir}") from None
        yield


def _remove_strays(out_dir: Path) -> None:
    """Staging folders and temp files left by a killed run (none can be live: this batch holds the lock)."""
    for folder, dirs, files in os.walk(out_dir):
        for name in [*dirs, *files]:
            if name.startswith(TEMP_PREFIX):
                path = Path(folder, name)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        dirs[:] = [name for name in dirs if not name.startswith(TEMP_PREFIX)]
