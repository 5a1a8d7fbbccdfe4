"""Rich tables for a compress result (the JSON report holds the same numbers) and for the chain analysis
(``compress --inspect``); formatting only."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from onnxmerge.report import as_report

if TYPE_CHECKING:
    from onnxmerge.conv_algebra import ConvParams
    from onnxmerge.layermerge.segments import ChainAnalysis


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
    search = report.get("search") or {}
    if report["reached_target"] is False:
        why = search.get("reason") or "best plan within the bounded rounds"
        summary.add_row("[yellow]target reached[/]", f"[yellow]no: {why}[/]")
    if search.get("attempts"):
        summary.add_row("plans measured by the budget search", str(len({a["plan_key"] for a in search["attempts"]})))
    summary.add_row("predicted latency of the chain (table, kernel time)", f"{report['predicted_table_ms']:.3f} ms")
    model = report.get("latency_model") or {}
    if model:
        summary.add_row("latency outside the table (uncovered)", f"{model['uncovered_ms']:.3f} ms ({model['source']})")
    reranking = report.get("reranking") or {}
    if len(reranking.get("candidates") or []) > 1:
        chosen = reranking["candidates"][reranking["chosen"]]
        summary.add_row("plans re-ranked / chosen (joint held-out score)",
                        f"{len(reranking['candidates'])} / #{reranking['chosen']} ({chosen['joint_score']:.4g})")
    importance = report.get("importance") or {}
    if importance:
        cache = importance.get("cache") or {}
        summary.add_row("importance entries scored / skipped / from cache",
                        f"{importance['entries_scored']} / {importance['entries_skipped']} / {cache.get('hits', 0)}")
    if fidelity.get("top1_agreement") is not None:
        summary.add_row("top-1 agreement with the original (held out)", f"{fidelity['top1_agreement']:.2%}")
    if "accuracy" in fidelity:
        summary.add_row("accuracy original / compressed (held out)",
                        f"{fidelity['accuracy_original']:.2%} / {fidelity['accuracy']:.2%}")
    summary.add_row("max / mean abs output error", f"{fidelity['max_abs_error']:.3g} / {fidelity['mean_abs_error']:.3g}")
    summary.add_row("segments / (segment, kernel) entries", f"{report['segments']} / {report['entries']}")
    rss = report.get("peak_rss_mib") or {}
    for phase, seconds in report["wall_s"].items():
        peak = f", peak RSS {rss[phase]:.0f} MiB" if phase in rss else ""
        summary.add_row(f"time: {phase}", f"{seconds:.1f} s{peak}")
    plan = Table(title="plan (merged segments)")
    for column in ("segment", "option", "table ms", "importance"):
        plan.add_column(column, justify="right" if column != "option" else "left")
    for choice in report["plan"]["choices"]:
        if choice["end"] - choice["start"] > 1 or "merged" in str(choice.get("option", "")):
            plan.add_row(f"({choice['start']}, {choice['end']}]", str(choice.get("option", choice.get("option_repr"))),
                         f"{choice['latency_ms']:.3f}", f"{choice['importance']:.4f}")
    return [summary, plan]


def chain_tables(analysis: ChainAnalysis) -> list[Table]:
    """What ``onnxmerge compress --inspect`` shows: the chain, the excluded convs and every segment's options."""
    count = len(analysis.chain_starts)
    chain = Table(title=f"conv chain{'s' if count > 1 else ''}: positions 0..{len(analysis.convs) - 1}",
                  caption=None if count == 1 else
                  f"{count} chains, starting at convs {', '.join(map(str, analysis.chain_starts))} (each start is "
                  "its chain's stem; the DP steps from one chain's end to the next chain's stem)")
    for column in ("chain", "#", "conv", "kernel", "in -> out", "reducible", "activation", "skips", "break"):
        chain.add_column(column, overflow="fold")
    for conv, position in zip(analysis.convs, analysis.positions):
        skips = [f"{s.source}->{s.target} ({'projection' if s.projection else 'identity'})"
                 for s in analysis.skips if conv.index in (s.source, s.target)]
        shapes = f"{_dims(conv.input_shape[1:])} -> {_dims(conv.output_shape[1:])}"
        which = sum(start <= conv.index for start in analysis.chain_starts) - 1
        chain.add_row(str(which), str(conv.index), conv.node, _describe_kernel(conv.params), shapes,
                      "yes" if conv.reducible else "",
                      position.activation_value.name if position.activation_value else "linear", ", ".join(skips),
                      analysis.breaks.get(conv.index, ""))
    tables = [chain]
    if analysis.excluded:
        off = Table(title="convs not on the chain")
        off.add_column("conv")
        off.add_column("why", overflow="fold")
        for name, reason in analysis.excluded.items():
            off.add_row(name, reason)
        tables.append(off)
    segments = Table(title="segments", caption=f"{len(analysis.segments)} segments, "
                                               f"{analysis.entries} (segment, kernel) entries")
    for column in ("segment", "convs", "channels", "input", "kernel options (kept convs)"):
        segments.add_column(column, overflow="fold")
    for segment in analysis.segments:
        first = segment.options[0]
        options = "; ".join(f"{_dims(o.kernel)}{' dw' if o.depthwise else ''}"
                            f"{'/' + _dims(o.stride) if max(o.stride) > 1 else ''} "
                            f"({','.join(map(str, o.kept))})" for o in segment.options)
        segments.add_row(f"({segment.start}, {segment.end}]", str(segment.end - segment.start),
                         f"{first.in_channels} -> {first.out_channels}", _dims(first.input_hw), options)
    tables.append(segments)
    return tables


def _dims(values) -> str:
    return "x".join(map(str, values))


def _describe_kernel(params: ConvParams) -> str:
    text = _dims(params.kernel_shape)
    if max(params.strides) > 1:
        text += f" s{_dims(params.strides)}"
    if max(params.dilations) > 1:
        text += f" d{_dims(params.dilations)}"
    return text + (" dw" if params.is_depthwise else "")
