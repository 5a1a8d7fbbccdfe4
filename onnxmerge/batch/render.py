"""The batch report as Markdown (to read or paste), CSV (to sort and plot) and JSON (everything)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from onnxmerge.batch.results import NOT_CHECKED, BatchReport, ModelResult
from onnxmerge.io import atomic_write_bytes
from onnxmerge.report import format_bytes, format_int, write_json

REPORT_STEM = "onnxmerge-batch"
CSV_COLUMNS = ("model", "status", "failure", "nodes_before", "nodes_after", "parameters_before", "parameters_after",
               "size_before", "size_after", "verified", "max_abs_error", "speedup", "speedup_p10", "speedup_p90",
               "seconds", "reason")


def write_reports(report: BatchReport, out_dir: Path) -> list[Path]:
    paths = [out_dir / f"{REPORT_STEM}.{suffix}" for suffix in ("md", "csv", "json")]
    atomic_write_bytes(paths[0], markdown(report).encode())
    atomic_write_bytes(paths[1], csv_text(report).encode())
    write_json(report.to_dict(), paths[2])
    return paths


def csv_text(report: BatchReport) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.row() for result in report.models)
    return buffer.getvalue()


def markdown(report: BatchReport) -> str:
    env = report.environment
    lines = [
        f"# onnxmerge batch: {report.pipeline}",
        "",
        f"- `{report.in_dir}` → `{report.out_dir}`: {report.summary()}",
        f"- executor {report.executor}, {report.jobs} job(s); onnxmerge {env.get('onnxmerge')}, "
        f"ONNX Runtime {env.get('onnxruntime')}, CPU: {env.get('cpu')}",
    ]
    if report.bench:
        lines.append("- speed-up: ORT CPU latency original / result, timed interleaved (`onnxmerge compare`, "
                     "one intra-op thread), median of per-round ratios (p10–p90); > 1 means the result is faster")
    lines += ["", "| model | status | nodes | parameters | size | verified | max abs error | speed-up | time | "
                  "reason |", "|---|---|---:|---:|---:|:-:|---:|---:|---:|---|"]
    lines += [_markdown_row(result) for result in report.models]
    if report.pending:
        lines += ["", "Not run (interrupted): " + ", ".join(f"`{model}`" for model in report.pending)]
    return "\n".join(lines) + "\n"


def _markdown_row(result: ModelResult) -> str:
    row = result.row()

    def change(key: str, fmt) -> str:
        before, after = row[f"{key}_before"], row[f"{key}_after"]
        if before is None:
            return ""
        return fmt(before) if after is None else f"{fmt(before)} → {fmt(after)}"

    status = result.status if result.failure is None else f"{result.status} ({result.failure})"
    speedup = "" if row["speedup"] is None else \
        f"{row['speedup']:.2f}× ({row['speedup_p10']:.2f}–{row['speedup_p90']:.2f})"
    verified = {True: "yes", False: "**no**", None: "", NOT_CHECKED: NOT_CHECKED}[row["verified"]]
    cells = [f"`{result.model}`", status, change("nodes", format_int), change("parameters", format_int),
             change("size", format_bytes), verified,
             "" if row["max_abs_error"] is None else f"{row['max_abs_error']:.2g}",
             speedup,
             "" if row["seconds"] is None else f"{row['seconds']:.1f} s",
             row["reason"].replace("|", "\\|")]
    return "| " + " | ".join(cells) + " |"
