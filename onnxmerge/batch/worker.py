"""The worker process: runs one model's pipeline under a memory limit and writes its result file last.

    python -m onnxmerge.batch.worker TASK_JSON PARENT_PID

Started only by :func:`onnxmerge.batch.isolation.run_isolated`. It dies with its parent (Linux), so a
killed batch leaves no worker behind to write into OUT_DIR later.

Test hooks (for tests only; they make a real worker really misbehave): a model whose path relative to
IN_DIR matches the glob in ``ONNXMERGE_BATCH_TEST_CRASH`` makes its worker ``os.abort()``; one matching
``ONNXMERGE_BATCH_TEST_HANG`` makes it sleep until killed.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

from onnxmerge.batch.config import matches
from onnxmerge.batch.isolation import RESULT_FILE, failure
from onnxmerge.batch.pipelines import get_pipeline
from onnxmerge.batch.results import OK, REFUSED
from onnxmerge.errors import BadInputError, OnnxMergeError, VerificationError, first_line
from onnxmerge.report import write_json

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# ORT reports a failed allocation as a runtime error with this text (verification rewraps it as bad input).
_ORT_ALLOCATION_FAILURES = ("Failed to allocate memory", "bad_alloc")


def main(argv: list[str]) -> int:
    task_path, parent_pid = Path(argv[0]), int(argv[1])
    _die_with_parent(parent_pid)
    task = json.loads(task_path.read_text())
    if task["memory_limit"]:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)  # a lower limit set outside stays in force
        soft = task["memory_limit"] if hard == resource.RLIM_INFINITY else min(task["memory_limit"], hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    _test_hooks(task["model"])
    result = run_task(task)
    write_json(result, task_path.parent / RESULT_FILE)
    return 0


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl: nobody is waiting for this result
            os._exit(1)


def _test_hooks(model: str) -> None:
    def hooked(variable: str) -> bool:
        return variable in os.environ and matches(os.environ[variable], model)

    if hooked("ONNXMERGE_BATCH_TEST_CRASH"):
        os.abort()
    if hooked("ONNXMERGE_BATCH_TEST_HANG"):
        while True:
            time.sleep(3600)


def run_task(task: dict) -> dict:
    """The pipeline's outcome as a result dict: ok, refused (bad input) or failed (with the kind of failure)."""
    source, output = Path(task["source"]), Path(task["staging"]) / task["output_name"]
    options = dict(task["options"])
    if "input_shapes" in options:
        options["input_shapes"] = {name: tuple(dims) for name, dims in options["input_shapes"].items()}
    try:
        report = get_pipeline(task["pipeline"]).run(source, output, options)  # the result's to_dict()
        if task["bench"]:
            report["bench"] = _bench(source, output, options.get("input_shapes"))
        return {"status": OK, "failure": None, "reason": "; ".join(report.get("warnings", [])),
                "report": report}
    except VerificationError as error:
        return {**failure("verification", first_line(error)), "report": error.report}
    except (BadInputError, MemoryError) as error:
        if _out_of_memory(error):
            limit = task["memory_limit"]
            under = f" under the worker's limit of {limit / 2**30:.1f} GiB (raise memory_limit)" if limit else ""
            return failure("memory", f"out of memory{under}: {first_line(error, 200)}")
        return {"status": REFUSED, "failure": None, "reason": first_line(error), "report": None}
    except OnnxMergeError as error:
        return failure("error", first_line(error))
    except Exception as error:  # an onnxmerge bug on this model: reported on its row, the batch goes on
        return failure("error", f"internal error: {type(error).__name__}: {first_line(error)}")


def _bench(source: Path, output: Path, input_shapes: dict | None) -> dict:
    """`compare`'s interleaved timing of the original and the result; a failure to time is noted, not fatal."""
    from onnxmerge.profiler import compare

    try:
        return compare(source, output, input_shapes=input_shapes)
    except OnnxMergeError as error:
        return {"error": first_line(error)}


def _out_of_memory(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, MemoryError) or any(text in str(error) for text in _ORT_ALLOCATION_FAILURES):
            return True
        error = error.__cause__ or error.__context__
    return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
