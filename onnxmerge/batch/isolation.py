"""One model, one fresh worker process: a crash, a hang or a memory blow-up ends that process, not the batch.

Both executors call :func:`run_isolated`; the Ray executor calls it inside a Ray task, so the same
subprocess boundary, timeout and memory limit hold on every machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from onnxmerge.batch.results import FAILED

RESULT_FILE = "result.json"
TASK_FILE = "task.json"
LOG_FILE = "worker.log"


@dataclass(frozen=True)
class Task:
    model: str  # path relative to IN_DIR: names the model in messages, reports and test hooks
    source: str  # the input .onnx (its external data lies beside it)
    staging: str  # a private folder: the worker writes output_name, RESULT_FILE and LOG_FILE here
    output_name: str
    pipeline: str
    options: dict
    bench: bool
    timeout: float
    memory_limit: int | None
    env: dict  # the driver's ONNXMERGE_* variables, so switches and test hooks reach remote workers too


class LiveProcesses:
    """The workers running right now, so an interrupted batch can end them before it returns."""

    def __init__(self):
        self._lock = threading.Lock()
        self._processes: set[subprocess.Popen] = set()
        self._closed = False

    def add(self, process: subprocess.Popen) -> None:
        with self._lock:
            if self._closed:  # started while the batch was being stopped
                _kill_group(process)
            self._processes.add(process)

    def discard(self, process: subprocess.Popen) -> None:
        with self._lock:
            self._processes.discard(process)

    def close(self) -> None:
        """Kill every worker running now or started from now on."""
        with self._lock:
            self._closed = True
            for process in self._processes:
                _kill_group(process)


def failure(kind: str, reason: str) -> dict:
    return {"status": FAILED, "failure": kind, "reason": reason, "report": None}


def run_isolated(task: Task, live: LiveProcesses | None = None) -> dict:
    """Run the task's pipeline in a new worker process; the result dict always comes back, whatever happened."""
    staging = Path(task.staging)
    (staging / TASK_FILE).write_text(json.dumps(asdict(task)))
    command = [sys.executable, "-m", "onnxmerge.batch.worker", str(staging / TASK_FILE), str(os.getpid())]
    started = time.perf_counter()
    with open(staging / LOG_FILE, "wb") as log:
        # A session of its own: a terminal's Ctrl-C reaches the driver, which then ends the workers itself.
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **task.env}, start_new_session=True)
        if live is not None:
            live.add(process)
        try:
            returncode = process.wait(timeout=task.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.wait()
            returncode = None
        finally:
            if live is not None:
                live.discard(process)
    seconds = round(time.perf_counter() - started, 3)
    if returncode is None:
        result = failure("timeout", f"timed out after {task.timeout:g} s (worker killed)")
    elif (staging / RESULT_FILE).is_file():  # written atomically, last: complete even if exit then crashed
        result = json.loads((staging / RESULT_FILE).read_text())
    else:
        result = failure("crash", _describe_exit(returncode, staging / LOG_FILE))
    return {**result, "seconds": seconds}


def _kill_group(process: subprocess.Popen) -> None:
    if process.returncode is not None:  # already reaped: its pid may belong to someone else by now
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _describe_exit(returncode: int, log: Path) -> str:
    if returncode < 0:
        try:
            reason = f"worker crashed ({signal.Signals(-returncode).name})"
        except ValueError:  # a signal number Python has no name for
            reason = f"worker crashed (signal {-returncode})"
    else:
        reason = f"worker exited with code {returncode} without a result"
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return f"{reason}; last output: {lines[-1][:200]}" if lines else reason
