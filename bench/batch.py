"""Throughput of ``onnxmerge batch`` (fold) over the zoo: one worker vs two vs Ray, in models per minute.

The zoo's models are exported with BatchNorm kept (as a training export gives them, so fold has work to do)
at a modest input size, ``--copies`` times each in separate subfolders. Every configuration folds the same
files into a fresh output folder; wall time runs from the ``run_batch`` call to its return, so it includes
worker start-up (and starting Ray, for the Ray rows). Afterwards one batch with ``--bench`` over a single copy
gives the example report (per-model interleaved ORT speed-ups) shown in the README.

    python -m bench.batch [--models a b ...] [--copies 2] [--input-size 112] [--configs local:1 local:2 ray:2]
                          [--out bench/results/batch.md] [--json bench/results/batch.json]
                          [--report bench/results/batch.report.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from bench.fold import bench_shape
from models.export import export
from models.registry import MODELS
from onnxmerge.batch import run_batch
from onnxmerge.batch.render import markdown as report_markdown
from onnxmerge.environment import describe
from onnxmerge.io import atomic_write_bytes

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "vgg", "repvgg", "repvgg_tiny", "unet"]
DEFAULT_CONFIGS = ["local:1", "local:2", "ray:2"]


def parse_config(text: str) -> tuple[str, int]:
    executor, _, jobs = text.partition(":")
    if executor not in ("local", "ray") or not jobs.isdigit() or int(jobs) < 1:
        raise argparse.ArgumentTypeError(f"bad config {text!r}: expected local:N or ray:N")
    return executor, int(jobs)


def build_zoo(folder: Path, models: list[str], copies: int, input_size: int) -> list[dict]:
    zoo = []
    for name in models:
        shape = bench_shape(name, input_size)
        first = folder / "copy0" / f"{name}.onnx"
        first.parent.mkdir(parents=True, exist_ok=True)
        export(name, first, input_shape=shape, keep_bn=True)
        for copy in range(1, copies):
            target = folder / f"copy{copy}" / first.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(first.read_bytes())
        zoo.append({"model": name, "input_shape": list(shape), "size_bytes": first.stat().st_size})
    return zoo


def time_config(zoo: Path, out: Path, executor: str, jobs: int) -> dict:
    started = time.perf_counter()
    report = run_batch(zoo, out, jobs=jobs, executor=executor)
    wall = time.perf_counter() - started
    return {"executor": executor, "jobs": jobs, "models": len(report.models), "wall_s": round(wall, 1),
            "models_per_minute": round(len(report.models) / wall * 60, 2),
            "worker_s": round(sum(m.seconds or 0.0 for m in report.models), 1), "statuses": report.counts()}


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def markdown(results: dict) -> str:
    env, rows = results["environment"], results["throughput"]
    baseline = next((row["wall_s"] for row in rows if (row["executor"], row["jobs"]) == ("local", 1)), None)
    zoo = ", ".join(f"{m['model']} {'x'.join(map(str, m['input_shape'][2:]))}" for m in results["zoo"])
    lines = [
        "# onnxmerge batch: fold throughput over the zoo",
        "",
        f"- date: {env['date']}; CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs, shared with other work)",
        f"- onnxmerge {env['onnxmerge']}, ONNX Runtime {env['onnxruntime']}, Ray {env['ray']}",
        f"- zoo: {len(results['zoo'])} models × {results['copies']} copies = {rows[0]['models'] if rows else 0} "
        f"files, exported with BatchNorm kept: {zoo}",
        "- each file: fold to a fixed point + ORT verification (3 input sets) in its own worker process; "
        "wall time includes worker start-up, and Ray's start for the ray rows",
        "- Ray's rows also copy every model through Ray's object store and share the CPUs with Ray's own "
        "processes: Ray pays off across machines, not on one",
        "",
        "| executor | jobs | files | wall s | models / min | vs local ×1 | sum of worker s | statuses |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        statuses = ", ".join(f"{n} {status}" for status, n in row["statuses"].items() if n)
        ratio = f"{baseline / row['wall_s']:.2f}×" if baseline else "—"
        lines.append(f"| {row['executor']} | {row['jobs']} | {row['models']} | {row['wall_s']:.1f} | "
                     f"{row['models_per_minute']:.1f} | {ratio} | {row['worker_s']:.1f} | {statuses} |")
    lines += ["", f"Example report (`--bench`, one copy, jobs 1): [batch.report.md](batch.report.md) — "
                  f"{results['example_summary']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=DEFAULT_MODELS, metavar="NAME")
    parser.add_argument("--copies", type=int, default=2, help="files per model (default 2)")
    parser.add_argument("--input-size", type=int, default=112, help="H=W of the ImageNet models (default 112)")
    parser.add_argument("--configs", nargs="+", type=parse_config, default=[parse_config(c) for c in DEFAULT_CONFIGS],
                        metavar="EXECUTOR:JOBS", help=f"default: {' '.join(DEFAULT_CONFIGS)}")
    parser.add_argument("--out", type=Path, default=RESULTS / "batch.md")
    parser.add_argument("--json", type=Path, default=RESULTS / "batch.json")
    parser.add_argument("--report", type=Path, default=RESULTS / "batch.report.md")
    args = parser.parse_args(argv)
    if args.copies < 1 or args.input_size < 1:
        parser.error("need --copies >= 1 and --input-size >= 1")

    results: dict = {"environment": describe("cpu") | {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "logical_cpus": os.cpu_count(), "ray": _version("ray")}, "copies": args.copies, "throughput": []}
    with tempfile.TemporaryDirectory(prefix="onnxmerge-bench-batch-") as folder:
        zoo = Path(folder) / "zoo"
        results["zoo"] = build_zoo(zoo, args.models, args.copies, args.input_size)
        for executor, jobs in args.configs:
            print(f"{executor} x{jobs}", file=sys.stderr, flush=True)
            out = Path(folder) / f"out-{executor}-{jobs}"
            results["throughput"].append(time_config(zoo, out, executor, jobs))
        print("example report (--bench)", file=sys.stderr, flush=True)
        example = run_batch(zoo / "copy0", Path(folder) / "example", jobs=1, bench=True)
    results["example_summary"] = example.summary()
    text = markdown(results)
    for path in (args.out, args.json, args.report):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, text.encode())
    atomic_write_bytes(args.json, (json.dumps(results, indent=2) + "\n").encode())
    atomic_write_bytes(args.report, report_markdown(replace(example, in_dir="zoo", out_dir="out")).encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
