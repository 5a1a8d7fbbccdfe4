"""Human (rich) and machine (JSON) renderings of a result or its report dict; no logic about what the numbers
mean, and no measuring: these functions only format what the result holds (see :mod:`onnxmerge.results`)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import Iterable, Mapping

from rich.console import Console
from rich.table import Table
from rich.text import Text

from onnxmerge.errors import VerificationError
from onnxmerge.io import atomic_write_bytes
from onnxmerge.refusal import Refusal


def format_int(value) -> str:
    return "?" if value is None else f"{value:,}"


def format_bytes(value) -> str:
    if value is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{value} B"
        value /= 1024
    return str(value)


def _delta_style(before, after) -> str:
    if before is None or after is None or before == after:
        return ""
    return "green" if after < before else "red"


def as_report(result) -> dict:
    """A typed result's ``to_dict()``, or the report dict as given."""
    return result.to_dict() if hasattr(result, "to_dict") else result


def fold_table(result) -> Table:
    """Op counts and statistics before/after of a :class:`~onnxmerge.results.FoldResult` (or its dict)."""
    report = as_report(result)
    before, after = report["before"], report.get("after") or {}
    table = Table(title="onnxmerge fold", show_lines=False)
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("folded", justify="right")
    for op in sorted(set(before["ops"]) | set(after.get("ops", {}))):
        b, a = before["ops"].get(op, 0), after.get("ops", {}).get(op, 0)
        table.add_row(op, str(b), f"[{_delta_style(b, a)}]{a}[/]" if _delta_style(b, a) else str(a))
    table.add_section()
    rows = [("nodes", "nodes", format_int), ("parameters", "parameters", format_int), ("MACs", "macs", format_int),
            ("size", "size_bytes", format_bytes)]
    for label, key, fmt in rows:
        b, a = before.get(key), after.get(key)
        style = _delta_style(b, a)
        table.add_row(label, fmt(b), f"[{style}]{fmt(a)}[/]" if style else fmt(a))
    verification = report.get("verification") or {}
    if "max_abs_error" in verification:
        table.add_section()
        table.add_row("max abs error", "", f"{verification['max_abs_error']:.3g}")
    return table


def print_explain(console: Console, refusals: Mapping[str, Iterable[Refusal | Mapping]]) -> None:
    """Every refusal, grouped by pass, one line each: ``  <node> (<op>): <reason>``.

    ``refusals`` maps a pass name to its :class:`Refusal` records or their ``to_dict()`` form (the JSON
    report's). A node without a name shows as ``<unnamed Op #index>``; every record gets its own line.
    """
    if not any(refusals.values()):
        console.print("every candidate node was rewritten")
        return
    for pass_name, found in refusals.items():
        entries = [r.to_dict() if isinstance(r, Refusal) else r for r in found]
        if not entries:
            continue
        console.print(f"[bold]{pass_name}[/]")
        for entry in entries:
            label = entry.get("label") or entry.get("node") or f"<unnamed {entry.get('op_type', '?')}>"
            console.print(f"  {label} ({entry.get('op_type', '?')}): {entry['reason']}", highlight=False,
                          markup=False, soft_wrap=True)


@contextmanager
def json_report_on_failure(path: str | os.PathLike | None):
    """A failed verification still leaves its report (with the first failing pass) where --json asked."""
    try:
        yield
    except VerificationError as failure:
        if path and failure.report:
            write_json(failure.report, path)
        raise


def write_json(report, path: str | os.PathLike) -> None:
    """Atomic like every other write: a half-written report is worse than none. ``report`` is a dict or a
    typed result (written as its ``to_dict()``)."""
    atomic_write_bytes(path, json.dumps(as_report(report), indent=2, default=str).encode())


def _latency_row(table: Table, label: str, stats: dict) -> None:
    table.add_row(label, *(f"{stats[key]:.3f}" for key in ("median_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms",
                                                          "min_ms")), str(stats["runs"]))


def _latency_table(title: str) -> Table:
    table = Table(title=title)
    for column in ("", "median ms", "p90", "p99", "mean", "std", "min", "runs"):
        table.add_column(column, justify="right" if column else "left")
    return table


def profile_tables(result, top: int = 15) -> list[Table]:
    report = as_report(result)
    env = report["environment"]
    latency = _latency_table(f"{report['model'] or 'model'} — {', '.join(report['session']['providers'][:1])}, "
                             f"{env['threads']} thread(s), opt level {env['opt_level']}")
    _latency_row(latency, "latency", report["latency"])
    facts = Table(show_header=False)
    facts.add_column()
    facts.add_column(justify="right")
    memory, static = report["memory"], report["static"]
    facts.add_row("peak RSS during timed runs", format_bytes(memory["peak_rss_bytes"]))
    if memory["device_bytes"] is not None:
        facts.add_row("device memory in use", format_bytes(memory["device_bytes"]))
    facts.add_row("MACs", format_int(static["macs"]))
    facts.add_row("parameters", format_int(static["parameters"]))
    facts.add_row("inputs", ", ".join(f"{k}: {v}" for k, v in env["input_shapes"].items()))
    tables = [latency, facts]
    if "per_node" in report:
        tables += breakdown_tables(report["per_node"], top=top)
    return tables


def compare_table(result) -> Table:
    report = as_report(result)
    env = report["environment"]
    table = _latency_table(f"interleaved, {env['threads']} thread(s), opt level {env['opt_level']}")
    _latency_row(table, f"A {report['a'] or ''}", report["latency_a"])
    _latency_row(table, f"B {report['b'] or ''}", report["latency_b"])
    return table


def speedup_line(result) -> str:
    speedup = as_report(result)["speedup"]
    return (f"speed-up of B over A: {speedup['median']:.3f}x median of per-round ratios "
            f"(p10 {speedup['p10']:.3f}, p90 {speedup['p90']:.3f})")


def breakdown_tables(breakdown: dict, top: int = 15) -> list[Table]:
    """The slowest nodes, then time per op type: where a rewrite could pay off, at a glance."""
    summary = (f"kernels {breakdown['total_node_us']:,.1f} µs of {breakdown['model_run_us']:,.1f} µs per run, "
               f"mean of {breakdown['runs_kept']} runs")
    nodes = Table(title=f"slowest {min(top, len(breakdown['nodes']))} of {len(breakdown['nodes'])} nodes",
                  caption=summary)
    nodes.add_column("node", overflow="fold")
    for column in ("op", "provider"):
        nodes.add_column(column)
    for column in ("µs/run", "share", "calls", "MACs", "GMAC/s"):
        nodes.add_column(column, justify="right")
    for row in sorted(breakdown['nodes'], key=lambda node: node["mean_us"], reverse=True)[:top]:
        provider = (row['provider'] or "?").removesuffix("ExecutionProvider")
        nodes.add_row(Text(row['name']), Text(row['op_type']), Text(provider), f"{row['mean_us']:,.1f}",
                      f"{row['share']:.1%}", f"{row['calls_per_run']:g}", format_int(row['macs']),
                      "" if row['gmacs_per_s'] is None else f"{row['gmacs_per_s']:,.2f}")
    ops = Table(title="time per op type")
    ops.add_column("op")
    for column in ("nodes", "µs/run", "share"):
        ops.add_column(column, justify="right")
    for row in breakdown['op_types']:
        ops.add_row(Text(row['op_type']), str(row['count']), f"{row['total_us']:,.1f}", f"{row['share']:.1%}")
    return [nodes, ops]
