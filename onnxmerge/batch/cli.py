"""``onnxmerge batch IN_DIR -o OUT_DIR``: parses arguments, shows progress, calls :func:`onnxmerge.batch.run_batch`."""

from __future__ import annotations

import argparse
import contextlib
import signal

from rich.console import Console
from rich.text import Text

from onnxmerge.cli_options import add_json_option

from onnxmerge.batch.executors import EXECUTORS
from onnxmerge.batch.pipelines import PIPELINES
from onnxmerge.batch.results import FAILED, OK, REFUSED, SKIPPED, ModelResult
from onnxmerge.batch.runner import DEFAULT_TIMEOUT_S, BatchListener

STATUS_STYLES = {OK: "green", SKIPPED: "cyan", REFUSED: "yellow", FAILED: "red"}


def register(commands) -> None:
    batch = commands.add_parser(
        "batch", help="run a pipeline over every .onnx under a folder: isolated, resumable, reported",
        description="Run a pipeline over every .onnx under IN_DIR, each model in its own worker process, into the "
                    "same relative paths under OUT_DIR; write onnxmerge-batch.{md,csv,json} there. Exit 0: all ok; "
                    "1: some model failed or was refused; 2: bad usage or config.")
    batch.add_argument("in_dir", metavar="IN_DIR", help="folder searched recursively for .onnx models")
    batch.add_argument("-o", "--output", dest="out_dir", metavar="OUT_DIR", required=True,
                       help="folder for the results (the input tree is mirrored)")
    batch.add_argument("--pipeline", default="fold", choices=list(PIPELINES), help="what to do to each model "
                       "(default fold)")
    batch.add_argument("--config", metavar="TOML", help="per-model options and limits by glob pattern")
    batch.add_argument("--jobs", type=int, metavar="N", help="models in flight at once (default: CPU count)")
    batch.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                       help=f"seconds per model before its worker is killed (default {DEFAULT_TIMEOUT_S:g})")
    batch.add_argument("--memory-limit", default="auto", metavar="SIZE",
                       help="address-space limit per worker, e.g. 8GiB, or none (default auto: physical memory / "
                            "jobs, at least 2 GiB)")
    batch.add_argument("--resume", action="store_true",
                       help="skip models whose output and report are complete and up to date")
    batch.add_argument("--executor", default="local", choices=EXECUTORS,
                       help="local worker processes, or Ray tasks (pip install 'onnxmerge[ray]')")
    batch.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to use (default: start Ray locally)")
    add_json_option(batch)
    batch.add_argument("--bench", action="store_true",
                       help="also time each original and result interleaved in ORT and report the speed-up "
                            "(models in flight share the CPU: --jobs 1 gives the quietest timings)")
    batch.set_defaults(handler=_run_batch)


def _run_batch(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from onnxmerge.batch.render import REPORT_STEM
    from onnxmerge.batch.runner import run_batch

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    reports = f"{args.out_dir}/{REPORT_STEM}.md (.csv, .json)"
    try:
        with progress, _sigterm_as_interrupt():
            report = run_batch(args.in_dir, args.out_dir, pipeline=args.pipeline, config=args.config,
                               jobs=args.jobs, timeout=args.timeout, memory_limit=args.memory_limit,
                               resume=args.resume, executor=args.executor, ray_address=args.ray_address,
                               bench=args.bench, listener=_ProgressListener(progress, args.pipeline))
    except KeyboardInterrupt:
        Console(stderr=True).print(f"onnxmerge: batch interrupted; finished models are kept, the report is in "
                                   f"{reports}; run again with --resume", highlight=False, soft_wrap=True)
        raise
    console.print(report.summary(), highlight=False, soft_wrap=True)
    console.print(f"report: {reports}", highlight=False, soft_wrap=True)
    if args.json:  # the same JSON report, also where --json says (as on every command)
        from onnxmerge.report import write_json

        write_json(report.to_dict(), args.json)
    return report.exit_code


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """A batch stopped by SIGTERM (a scheduler, `kill`) ends its workers and writes its report, like Ctrl-C."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _ProgressListener(BatchListener):
    def __init__(self, progress, pipeline: str):
        self.progress, self.pipeline = progress, pipeline
        self.bar = None
        self.running: list[str] = []
        self.counts = {status: 0 for status in STATUS_STYLES}

    def planned(self, models: list[str]) -> None:
        self.bar = self.progress.add_task(self.pipeline, total=len(models))

    def started(self, model: str) -> None:
        self.running.append(model)
        self._describe()

    def finished(self, result: ModelResult) -> None:
        if result.model in self.running:
            self.running.remove(result.model)
        self.counts[result.status] += 1
        self.progress.console.print(_result_line(result), soft_wrap=True)
        self.progress.advance(self.bar)
        self._describe()

    def _describe(self) -> None:
        counts = " · ".join(f"{n} {status}" for status, n in self.counts.items() if n)
        running = f"running {', '.join(self.running)}" if self.running else ""
        self.progress.update(self.bar, description=" · ".join(filter(None, [self.pipeline, counts, running])))


def _result_line(result: ModelResult) -> Text:
    row = result.row()
    if result.status in (OK, SKIPPED):
        facts = [f"nodes {row['nodes_before']} → {row['nodes_after']}"]
        if row["max_abs_error"] is not None:
            facts.append(f"max error {row['max_abs_error']:.2g}")
        if row["speedup"] is not None:
            facts.append(f"speed-up {row['speedup']:.2f}×")
        if row["seconds"] is not None:
            facts.append(f"{row['seconds']:.1f} s")
        facts += [result.reason] if result.reason else []
        detail = ", ".join(facts)
    else:
        detail = f"{result.failure}: {result.reason}" if result.failure else result.reason
    return Text.assemble((f"{result.status:8}", STATUS_STYLES[result.status]), result.model, "  ", (detail, "dim"))
