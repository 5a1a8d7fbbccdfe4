"""`onnxmerge compress`: argument parsing and rendering only; the work is onnxmerge.layermerge.api."""

from __future__ import annotations

import argparse

from rich.console import Console

from onnxmerge.cli_options import (add_input_shape_option, add_json_option, add_output_option, add_runtime_options,
                                   input_shapes, output_path, runtime_settings)


def register(commands) -> None:
    from onnxmerge.layermerge.api import COMPRESS_SETTINGS, CompressOptions, available_cores
    from onnxmerge.layermerge.segments import SEARCH_SPACES

    parser = commands.add_parser(
        "compress", help="LayerMerge depth compression: remove activations, merge conv runs, recover by distillation",
        description="Choose activations to remove and convs to drop by an exact DP over latency (ORT) and "
                    "importance (calibration data) tables, merge, recover by distillation.")
    parser.add_argument("input", help="input .onnx model")
    add_output_option(parser, positional=True)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--speedup", type=float, help="target end-to-end speed-up in ORT, e.g. 1.5")
    target.add_argument("--latency-budget", type=float, metavar="MS", help="target end-to-end latency in ms")
    parser.add_argument("--calib", help=".npz with one N x ... array per model input, optional 'labels'")
    add_runtime_options(parser, defaults=COMPRESS_SETTINGS)
    add_input_shape_option(parser, "static input shape for latency, e.g. input:1,3,224,224 (default: batch 1, "
                                   "calib dims)")
    recover = parser.add_mutually_exclusive_group()
    recover.add_argument("--recover-steps", type=int, default=CompressOptions.recover_steps,
                         help=f"distillation steps (default {CompressOptions.recover_steps})")
    recover.add_argument("--no-recover", action="store_true", help="skip distillation")
    parser.add_argument("--recover-data", metavar="NPZ",
                        help="a larger unlabeled .npz to distil on (default: the calibration data)")
    parser.add_argument("--lr", type=float, default=CompressOptions.lr,
                        help=f"distillation learning rate (default {CompressOptions.lr})")
    parser.add_argument("--seed", type=int, default=CompressOptions.seed, help="seed of recovery")
    parser.add_argument("--plan", metavar="FILE", help="reuse this plan JSON if it exists, else save the plan here")
    add_json_option(parser, deprecated=("--report",))
    parser.add_argument("--jobs", type=int, default=available_cores(),
                        help=f"importance entries scored in parallel (default: the cores available to this "
                             f"process, {available_cores()} here)")
    parser.add_argument("--alternatives", type=int, default=CompressOptions.alternatives,
                        help="near-optimal plans re-ranked by one joint held-out pass each (1: the DP's plan only; "
                             f"default {CompressOptions.alternatives})")
    parser.add_argument("--search-space", choices=SEARCH_SPACES, default=CompressOptions.search_space,
                        help="'layermerge': the paper's segments exactly (default); 'extended': also cross strides "
                             "when later k>1 convs are pruned, grouped convs, dropping identity-residual blocks")
    parser.add_argument("--cache-dir", metavar="DIR", help="latency and importance caches (default: the user "
                                                          "cache folder; a later target reuses both tables)")
    parser.add_argument("--inspect", action="store_true", help="print the chain, segments and options, then exit")
    parser.add_argument("--force", action="store_true", help="allow OUTPUT to be the input file")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from onnxmerge.errors import BadInputError
    from onnxmerge.report import write_json

    if args.inspect:
        from onnxmerge.layermerge.api import inspect

        for table in inspect(args.input, input_shapes=input_shapes(args), search_space=args.search_space):
            console.print(table)
        return 0
    output = output_path(args)
    if not output or not args.calib:
        raise BadInputError("compress needs INPUT, OUTPUT and --calib (or --inspect)")
    if args.speedup is None and args.latency_budget is None and not args.plan:
        raise BadInputError("give --speedup X or --latency-budget MS (or an existing --plan)")
    from onnxmerge.layermerge.api import CompressOptions, compress
    from onnxmerge.layermerge.report import compress_tables

    options = CompressOptions(speedup=args.speedup, latency_budget_ms=args.latency_budget,
                              recover=not args.no_recover, recover_steps=args.recover_steps, lr=args.lr,
                              jobs=args.jobs, seed=args.seed, alternatives=args.alternatives,
                              search_space=args.search_space, recover_data=args.recover_data)
    result = compress(args.input, output, calibration=args.calib, options=options,
                      settings=runtime_settings(args), input_shapes=input_shapes(args), plan=args.plan,
                      force=args.force, progress=True, cache_dir=args.cache_dir)
    for table in compress_tables(result):
        console.print(table)
    if args.json:
        write_json(result, args.json)
    console.print(f"wrote {output}", highlight=False)
    return 0
