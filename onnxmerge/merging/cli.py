"""``onnxmerge soup`` and ``onnxmerge align``: argument parsing and the rich summary; the work is in the API."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from onnxmerge.cli_options import add_input_shape_option, add_json_option, input_shapes

EXIT_OK = 0


def register(commands) -> None:
    soup = commands.add_parser(
        "soup", help="merge the weights of compatible models (uniform, weighted, greedy, task arithmetic, TIES, DARE)",
        description="Average the weights of structurally identical ONNX models into one model of the same graph. "
                    "Tensors are paired by their position in the graph, not by name.")
    soup.add_argument("models", nargs="+", metavar="MODEL",
                      help="input .onnx models (the output keeps the first's names)")
    soup.add_argument("-o", "--output", help="output .onnx model (not needed with --check)")
    soup.add_argument("--check", action="store_true", help="only check that the models can be merged, and say why not")
    soup.add_argument("--method", default="uniform",
                      choices=["uniform", "weighted", "greedy", "task-arithmetic", "ties", "dare"],
                      help="merge method (default uniform)")
    soup.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per model (weighted, "
                      "task-arithmetic, ties, dare)")
    soup.add_argument("--base", metavar="BASE",
                      help="the model the inputs were fine-tuned from (task-arithmetic, ties, dare)")
    soup.add_argument("--scale", type=float, default=1.0,
                      help="lambda, the scale of the merged task vector (default 1)")
    soup.add_argument("--density", type=float, help="fraction of each task vector kept by ties/dare (default 0.2)")
    soup.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops and of alignment (default 0)")
    soup.add_argument("--eval", metavar="DATA.npz", help="held-out data (arrays named after the model inputs, plus "
                      "'labels'): scores every input and the soup; greedy selects by it")
    soup.add_argument("--metric", default="accuracy", choices=["accuracy", "loss"],
                      help="score of --eval: top-1 accuracy or cross-entropy of the first output (default accuracy)")
    soup.add_argument("--reset-bn", metavar="CALIB.npz", help="recompute BatchNormalization statistics of the result "
                      "from this calibration data")
    soup.add_argument("--batch-size", type=int, default=64, help="samples per ORT run for --eval/--reset-bn "
                      "(default 64; a model with a fixed batch dimension uses that)")
    soup.add_argument("--align", action="store_true", help="permute every model onto the first before merging "
                      "(models trained independently, not fine-tunes of one base)")
    soup.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data (automatic above "
                      "2 GB or when an input did)")
    add_json_option(soup)
    soup.add_argument("--force", action="store_true", help="allow OUTPUT to be one of the inputs")
    soup.set_defaults(handler=run_soup)

    align = commands.add_parser(
        "align", help="permute B's hidden units to match A (Git Re-Basin weight matching), outputs unchanged",
        description="Reorder B's hidden units to line up with A's, so that averaging A and B averages matching "
                    "units. B_aligned computes exactly what B computes (checked in ORT before writing).")
    align.add_argument("reference", metavar="A", help="reference .onnx model")
    align.add_argument("model", metavar="B", help=".onnx model to permute")
    align.add_argument("-o", "--output", required=True, help="output .onnx model (B aligned to A)")
    align.add_argument("--seed", type=int, default=0, help="seed of the sweep order and verification inputs")
    align.add_argument("--max-sweeps", type=int, default=100, help="cap on weight-matching sweeps (default 100)")
    align.add_argument("--check-n", type=int, default=3, help="random input sets to verify with (default 3)")
    add_input_shape_option(align, "shape for verification, e.g. input:1,3,224,224 (unknown dims default to 1)")
    align.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data")
    add_json_option(align)
    align.add_argument("--force", action="store_true", help="allow OUTPUT to be one of the inputs")
    align.set_defaults(handler=run_align)


def run_soup(args: argparse.Namespace, console: Console) -> int:
    from onnxmerge.errors import BadInputError
    from onnxmerge.report import write_json
    from onnxmerge.merging import check_compatible, soup

    if args.check:
        report = check_compatible(args.models, base=args.base)
        _print_check(console, report)
        if args.json:
            write_json(report, args.json)
        return EXIT_OK
    if not args.output:
        raise BadInputError("soup needs -o OUTPUT (or --check)")
    result = soup(args.models, args.output, method=args.method, weights=args.weights, base=args.base,
                  scale=args.scale, density=args.density, seed=args.seed, eval_data=args.eval, metric=args.metric,
                  reset_bn=args.reset_bn, batch_size=args.batch_size, align=args.align, force=args.force,
                  external_data=True if args.external_data else None)
    console.print(soup_table(result))
    for line in summary_lines(result):
        console.print(line, highlight=False)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if args.json:
        write_json(result, args.json)
    console.print(f"wrote {result.output}", highlight=False)
    return EXIT_OK


def run_align(args: argparse.Namespace, console: Console) -> int:
    from onnxmerge.merging import align
    from onnxmerge.report import json_report_on_failure, write_json

    with json_report_on_failure(args.json):
        result = align(args.reference, args.model, args.output, seed=args.seed, max_sweeps=args.max_sweeps,
                       check_n=args.check_n, input_shapes=input_shapes(args), force=args.force,
                       external_data=True if args.external_data else None)
    console.print(f"{result.groups} permutation group(s), {result.moved_channels} of {result.channels} "
                  f"channels moved in {result.sweeps} sweep(s); weight cosine similarity to A "
                  f"{result.cosine_before:.3f} -> {result.cosine_after:.3f}", highlight=False)
    console.print(f"output-identical to B (max abs error {result.verification['max_abs_error']:.3g} on "
                  f"{args.check_n} input set(s)); wrote {result.output}", highlight=False)
    if args.json:
        write_json(result, args.json)
    return EXIT_OK


def _print_check(console: Console, report: dict) -> None:
    roles = ", ".join(f"{count} {role}" for role, count in sorted(report["roles"].items()))
    console.print(f"compatible: {len(report['models'])} models, {report['nodes']} nodes, {report['tensors']} paired "
                  f"tensors ({roles}); levels passed: {', '.join(report['levels_passed'])}", highlight=False)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


def soup_table(result) -> Table:
    """The inputs with their weights, scores and greedy steps, of a SoupResult (or its dict)."""
    from onnxmerge.report import as_report

    report = as_report(result)
    scores = report.get("scores")
    greedy = {step["index"]: step for step in report.get("greedy", {}).get("steps", [])}
    weights = report["parameters"].get("weights")
    table = Table(title=f"onnxmerge soup — {report['method']}")
    table.add_column("#", justify="right")
    table.add_column("model", overflow="fold")
    if weights:
        table.add_column("weight", justify="right")
    if scores:
        table.add_column(scores["metric"], justify="right")
    if greedy:
        table.add_column("greedy: soup score with it", justify="right")
        table.add_column("kept")
    for index, entry in enumerate(report["inputs"]):
        row = [str(index + 1), entry["model"]]
        if weights:
            row.append(f"{weights[index]:g}")
        if scores:
            row.append(f"{scores['models'][index]['score']:.4f}")
        if greedy:
            step = greedy[index]
            row += [f"{step['soup_score']:.4f}", "[green]yes[/]" if step["kept"] else "no"]
        table.add_row(*row)
    return table


def summary_lines(result) -> list[str]:
    from onnxmerge.report import as_report

    report = as_report(result)
    lines = []
    tensors = report["tensors"]
    lines.append(f"tensors: {tensors.get('merged', 0)} merged, {tensors.get('identical', 0)} identical in every "
                 f"input, {tensors.get('copied', 0)} integer/shape copied")
    scores = report.get("scores")
    if scores:
        values = [m["score"] for m in scores["models"]]
        best = max(values) if scores["higher_is_better"] else min(values)
        line = f"{scores['metric']}: soup {scores['soup']:.4f}, best single model {best:.4f}"
        if "uniform_soup" in scores:
            line += f", uniform soup {scores['uniform_soup']:.4f}"
        lines.append(line)
    for entry in report.get("alignment", []):
        lines.append(f"aligned {entry['model']}: {entry['moved_channels']} of {entry['channels']} channels moved, "
                     f"cosine {entry['cosine_before']:.3f} -> {entry['cosine_after']:.3f}")
    bn = report.get("bn_reset")
    if bn and bn.get("batchnorm_nodes"):
        lines.append(f"BatchNorm statistics reset: {bn['batchnorm_nodes']} node(s) in {bn['levels']} level(s) from "
                     f"{bn['samples']} samples")
    return lines
