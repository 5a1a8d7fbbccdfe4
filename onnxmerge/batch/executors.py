"""Where the isolated workers run: threads on this machine, each waiting on one worker, or Ray tasks.

Both offer ``submit(task) -> handle``, ``wait_any(handles) -> [(handle, result)]`` and ``close()``; the
batch loop keeps at most ``jobs`` tasks in flight and commits each result in the driver, so the outputs,
reports and progress are the same whichever executor ran the work.
"""

from __future__ import annotations

import logging
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

import onnx

from onnxmerge.batch.isolation import LiveProcesses, Task, failure, run_isolated
from onnxmerge.batch.results import OK
from onnxmerge.errors import BadInputError, first_line
from onnxmerge.io import iter_tensors

EXECUTORS = ("local", "ray")


class LocalExecutor:
    def __init__(self, jobs: int):
        self._pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="onnxmerge-batch")
        self._live = LiveProcesses()

    def submit(self, task: Task) -> Future:
        return self._pool.submit(run_isolated, task, self._live)

    def wait_any(self, handles) -> list[tuple[Future, dict]]:
        done, _ = wait(handles, return_when=FIRST_COMPLETED)
        return [(future, future.result()) for future in done]

    def close(self) -> None:
        self._live.close()
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Each model is a Ray task that runs it in a worker subprocess on whichever node Ray picks.

    Inputs travel to the node and outputs back as bytes, so a cluster needs no shared filesystem, only
    onnxmerge installed on every node. A Ray started here is local unless ``address`` names a cluster.
    """

    def __init__(self, jobs: int, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise BadInputError("executor='ray' needs Ray, which is not installed: pip install 'onnxmerge[ray]'") \
                from None
        self._ray, self._address = ray, address
        self._owns_ray = False
        # A crash is the model's, not the node's: retrying it would only crash again.
        self._remote = ray.remote(num_cpus=1, max_retries=0)(run_shipped)
        self._tasks: dict = {}

    def _connect(self) -> None:
        """On the first submit: a batch that --resume finds done never waits for Ray to start."""
        if self._ray.is_initialized():
            return
        try:
            self._ray.init(address=self._address, include_dashboard=False, log_to_driver=False,
                           logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = f" at {self._address}" if self._address else ""
            raise BadInputError(f"cannot start or reach Ray{where}: {first_line(error)}") from None
        self._owns_ray = True

    def submit(self, task: Task):
        self._connect()
        handle = self._remote.remote(task, ship_inputs(Path(task.source)))
        self._tasks[handle] = task
        return handle

    def wait_any(self, handles) -> list[tuple[object, dict]]:
        ready, _ = self._ray.wait(list(handles), num_returns=1)
        finished = []
        for handle in ready:
            task = self._tasks.pop(handle)
            try:
                result, files = self._ray.get(handle)
            except self._ray.exceptions.RayError as error:  # the Ray worker or its node died
                result, files = failure("crash", f"Ray task failed: {first_line(error)}"), {}
            for name, data in files.items():
                (Path(task.staging) / name).write_bytes(data)
            finished.append((handle, result))
        return finished

    def close(self) -> None:
        for handle in self._tasks:  # force=True kills the Ray worker; its worker subprocess dies with it
            self._ray.cancel(handle, force=True)
        if self._owns_ray:
            self._ray.shutdown()


def ship_inputs(source: Path) -> dict[str, bytes]:
    """The model file and the external data files it names, keyed by path relative to the model's folder."""
    files = {source.name: source.read_bytes()}
    try:
        proto = onnx.load_model_from_string(files[source.name])
    except Exception:  # not an ONNX file: the worker will refuse it with the parser's own message
        return files
    folder = source.parent.resolve()
    locations = {entry.value for tensor in iter_tensors(proto.graph) for entry in tensor.external_data
                 if entry.key == "location"}
    for location in sorted(locations):
        target = (folder / location).resolve()
        if target.is_relative_to(folder) and target.is_file():  # anything else: the worker says what is wrong
            files[location] = target.read_bytes()
    return files


def run_shipped(task: Task, files: dict[str, bytes]) -> tuple[dict, dict[str, bytes]]:
    """Inside a Ray task: lay the inputs out on this node, run the model isolated, return result and outputs."""
    with tempfile.TemporaryDirectory(prefix="onnxmerge-batch-") as folder:
        inputs, staging = Path(folder, "in"), Path(folder, "out")
        for name, data in files.items():
            (inputs / name).parent.mkdir(parents=True, exist_ok=True)
            (inputs / name).write_bytes(data)
        staging.mkdir()
        local_source = str(inputs / Path(task.source).name)
        result = run_isolated(replace(task, source=local_source, staging=str(staging)))
        result["reason"] = result["reason"].replace(local_source, task.source)  # name the driver's file
        outputs = {name: (staging / name).read_bytes() for name in (task.output_name, task.output_name + ".data")
                   if result["status"] == OK and (staging / name).is_file()}
    return result, outputs
