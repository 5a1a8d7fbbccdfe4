"""Rich tables for a compress result (the JSON report holds the same numbers); formatting only."""

from __future__ import annotations

from rich.table import Table

from onnxmerge.report import as_report


def compress_tables(result) -> list[Table]:
    """The summary and the plan of a :class:`~onnxmerge.results.CompressResult` (or its dict)."""
    report = as_report(result)
    summary = Table(title="onnxmerge compress", show_header=False)
    summary.add_column()
    summary.add_column(justify="right")
    speedup = report["measured_speedup"]
    fidelity = report["fidelity"]
    summary.add_row("measured speed-up (interleaved, median)",
                    f"{speedup['median']:.3f}x (p10 {speedup['p10']:.3f}, p90 {speedup['p90']:.3f})")
    target = "-" if report["target_ms"] is None else f"{report['target_ms']:.3f}"
    summary.add_row("latency original / target / measured (ms)",
                    f"{report['original_ms']:.3f} / {target} / {report['measured_ms']:.3f}")
    if report["reached_target"] is False:
        summary.add_row("[yellow]target reached[/]", "[yellow]no: best plan within the bounded rounds[/]")
    summary.add_row("predicted latency of the chain (table)", f"{report['predicted_table_ms']:.3f} ms")
    if fidelity.get("top1_agreement") is not None:
        summary.add_row("top-1 agreement with the original (held out)", f"{fidelity['top1_agreement']:.2%}")
    if "accuracy" in fidelity:
        summary.add_row("accuracy original / compressed (held out)",
                        f"{fidelity['accuracy_original']:.2%} / {fidelity['accuracy']:.2%}")
    summary.add_row("max / mean abs output error", f"{fidelity['max_abs_error']:.3g} / {fidelity['mean_abs_error']:.3g}")
    summary.add_row("segments / (segment, kernel) entries", f"{report['segments']} / {report['entries']}")
    for phase, seconds in report["wall_s"].items():
        summary.add_row(f"time: {phase}", f"{seconds:.1f} s")
    plan = Table(title="plan (merged segments)")
    for column in ("segment", "option", "table ms", "importance"):
        plan.add_column(column, justify="right" if column != "option" else "left")
    for choice in report["plan"]["choices"]:
        if choice["end"] - choice["start"] > 1 or "merged" in str(choice.get("option", "")):
            plan.add_row(f"({choice['start']}, {choice['end']}]", str(choice.get("option", choice.get("option_repr"))),
                         f"{choice['latency_ms']:.3f}", f"{choice['importance']:.4f}")
    return [summary, plan]
