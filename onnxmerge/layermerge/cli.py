"""`onnxmerge compress`: argument parsing and rendering only; the work is onnxmerge.layermerge.api."""

from __future__ import annotations

import argparse

from rich.console import Console

from onnxmerge.cli_options import add_json_option


def register(commands) -> None:
    parser = commands.add_parser(
        "compress", help="LayerMerge depth compression: remove activations, merge conv runs, recover by distillation",
        description="Choose activations to remove and convs to drop by an exact DP over latency (ORT) and "
                    "importance (calibration data) tables, merge, recover by distillation.")
    parser.add_argument("input", help="input .onnx model")
    parser.add_argument("output", nargs="?", help="output .onnx model (not needed with --inspect)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--speedup", type=float, help="target end-to-end speed-up in ORT, e.g. 1.5")
    target.add_argument("--latency-budget", type=float, metavar="MS", help="target end-to-end latency in ms")
    parser.add_argument("--calib", help=".npz with one N x ... array per model input, optional 'labels'")
    parser.add_argument("--provider", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for latency (default 1)")
    parser.add_argument("--input-shape", action="extend", nargs="+", default=[], metavar="NAME:DIMS",
                        help="static input shape for latency, e.g. input:1,3,224,224 (default: batch 1, calib dims)")
    recover = parser.add_mutually_exclusive_group()
    recover.add_argument("--recover-steps", type=int, default=300, help="distillation steps (default 300)")
    recover.add_argument("--no-recover", action="store_true", help="skip distillation")
    parser.add_argument("--lr", type=float, default=1e-3, help="distillation learning rate (default 1e-3)")
    parser.add_argument("--plan", metavar="FILE", help="reuse this plan JSON if it exists, else save the plan here")
    add_json_option(parser)
    parser.add_argument("--report", dest="json", metavar="FILE", help="the same as --json")
    parser.add_argument("--jobs", type=int, default=1, help="importance entries scored in parallel (default 1)")
    parser.add_argument("--inspect", action="store_true", help="print the chain, segments and options, then exit")
    parser.add_argument("--force", action="store_true", help="allow OUTPUT to be the input file")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from onnxmerge.errors import BadInputError
    from onnxmerge.report import write_json

    if args.inspect:
        from onnxmerge.layermerge.api import inspect

        for table in inspect(args.input, input_shapes=args.input_shape or None):
            console.print(table)
        return 0
    if not args.output or not args.calib:
        raise BadInputError("compress needs INPUT, OUTPUT and --calib (or --inspect)")
    if args.speedup is None and args.latency_budget is None and not args.plan:
        raise BadInputError("give --speedup X or --latency-budget MS (or an existing --plan)")
    from onnxmerge.layermerge.api import compress
    from onnxmerge.layermerge.report import compress_tables

    result = compress(args.input, args.output, calibration=args.calib, speedup=args.speedup,
                      latency_budget_ms=args.latency_budget, provider=args.provider, threads=args.threads,
                      input_shapes=args.input_shape or None, recover_steps=args.recover_steps,
                      recover=not args.no_recover, lr=args.lr, plan=args.plan, jobs=args.jobs, force=args.force,
                      progress=True)
    for table in compress_tables(result):
        console.print(table)
    if args.json:
        write_json(result, args.json)
    console.print(f"wrote {args.output}", highlight=False)
    return 0
