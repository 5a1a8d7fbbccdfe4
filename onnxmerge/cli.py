"""Command line: parses arguments, calls the Python API, renders the report, maps errors to exit codes."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from rich.console import Console

from onnxmerge.cli_options import (add_input_shape_option, add_json_option, add_output_option, add_runtime_options,
                                   byte_size, input_shapes, output_path, runtime_settings, to_cli_terms)

EXIT_OK, EXIT_VERIFICATION_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
# Feature packages that add subcommands: each module has register(commands), which adds its subparsers with
# set_defaults(handler=fn), fn(args, console) -> exit code. Handlers import their API lazily.
_FEATURE_COMMANDS: list[str] = ["onnxmerge.layermerge.cli", "onnxmerge.merging.cli", "onnxmerge.batch.cli"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other bad input
        self.exit(EXIT_BAD_INPUT, f"onnxmerge: error: {message} (see --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    from onnxmerge.pass_framework import PassOptions
    from onnxmerge.verify import DEFAULT_ATOL, DEFAULT_CHECK_N, DEFAULT_RTOL
    from onnxmerge.version import __version__

    parser = _Parser(prog="onnxmerge", description="Make exported ONNX models faster, verified in ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"onnxmerge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    fold = commands.add_parser("fold", help="exact rewrites: fold BN/affine/Pad, merge convs, re-parameterise",
                               description="Apply exact rewrites to a fixed point; verify in ORT before writing.")
    fold.add_argument("input", nargs="?", help="input .onnx model")
    add_output_option(fold, positional=True)
    fold.add_argument("--check-n", type=int, default=DEFAULT_CHECK_N,
                      help=f"random input sets to verify with (default {DEFAULT_CHECK_N})")
    fold.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"relative tolerance (default {DEFAULT_RTOL})")
    fold.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"absolute tolerance (default {DEFAULT_ATOL})")
    fold.add_argument("--no-noise-floor", dest="noise_floor", action="store_false",
                      help="judge by rtol/atol alone, not also by the float noise ORT's own optimizer makes")
    fold.add_argument("--seed", type=int, default=0, help="seed of the random verification inputs")
    add_input_shape_option(fold, "shape for verification and statistics, e.g. input:1,3,224,224 (unknown dims "
                                 "default to 1; dynamic dims stay dynamic in the output)")
    fold.add_argument("--overwrite-input-shape", action="extend", nargs="+", default=[], metavar="NAME:DIMS",
                      help="fix input dims in the written model, so shape arithmetic that reads them folds too")
    fold.add_argument("--fold-size-limit", type=byte_size, default=PassOptions.fold_size_limit_bytes,
                      metavar="BYTES", help="largest tensor constant folding may store, e.g. 512K, 1M, 64M "
                                            "(default 1M)")
    fold.add_argument("--skip", action="extend", nargs="+", default=[], metavar="PASS", help="passes to skip")
    fold.add_argument("--only", action="extend", nargs="+", default=[], metavar="PASS", help="run only these passes")
    fold.add_argument("--list-passes", action="store_true", help="list the passes and exit")
    fold.add_argument("--explain", action="store_true", help="say why each candidate node was not rewritten")
    fold.add_argument("--allow-costlier-merges", action="store_true",
                      help="merge conv pairs even when the merged conv needs more MACs")
    fold.add_argument("--external-data", action="store_true",
                      help="store weights in OUTPUT.data (automatic above 2 GB or when the input did)")
    add_json_option(fold)
    fold.add_argument("--force", action="store_true", help="allow OUTPUT to be the input file")
    fold.add_argument("--bench", action="store_true",
                      help="time original vs folded interleaved in ORT (as `onnxmerge compare`) and report the ratio")

    profile = commands.add_parser("profile", help="latency, memory and per-node breakdown in ORT",
                                  description="Time a model in ORT with explicit session settings.")
    profile.add_argument("model", help=".onnx model")
    _add_timing_options(profile)
    profile.add_argument("--per-node", action="store_true", help="per-node and per-op-type breakdown (ORT profiler)")
    profile.add_argument("--top", type=int, default=15, help="rows of the per-node table (default 15)")
    profile.add_argument("--trace", metavar="FILE", help="also save ORT's raw profiler trace (Chrome trace JSON)")

    compare = commands.add_parser("compare", help="time two models interleaved and report B's speed-up over A",
                                  description="Time A and B interleaved (A B A B ...) in one run.")
    compare.add_argument("model_a", help="baseline .onnx model (A)")
    compare.add_argument("model_b", help="candidate .onnx model (B)")
    _add_timing_options(compare)
    fold.set_defaults(handler=_run_fold)
    profile.set_defaults(handler=_run_profile)
    compare.set_defaults(handler=_run_compare)
    for module_name in _FEATURE_COMMANDS:
        importlib.import_module(module_name).register(commands)
    return parser


def _add_timing_options(parser: argparse.ArgumentParser) -> None:
    add_runtime_options(parser)
    add_input_shape_option(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    add_json_option(parser)


def _list_passes(console: Console) -> None:
    from onnxmerge.pass_framework import PASSES
    from onnxmerge.passes import DEFAULT_PIPELINE

    for name in DEFAULT_PIPELINE:
        console.print(f"{name:26s} {PASSES[name].description}", highlight=False)


def _run_fold(args: argparse.Namespace, console: Console) -> int:
    from onnxmerge.api import fold
    from onnxmerge.errors import BadInputError
    from onnxmerge.report import fold_table, json_report_on_failure, print_explain, speedup_line, write_json

    if args.list_passes:
        _list_passes(console)
        return EXIT_OK
    output = output_path(args)
    if not args.input or not output:
        raise BadInputError("fold needs INPUT and OUTPUT paths (or --list-passes)")
    with json_report_on_failure(args.json):
        result = fold(args.input, output, only=args.only or None, skip=args.skip, check_n=args.check_n,
                      rtol=args.rtol, atol=args.atol, input_shapes=input_shapes(args), seed=args.seed,
                      noise_floor=args.noise_floor,
                      allow_costlier_merges=args.allow_costlier_merges, force=args.force,
                      external_data=True if args.external_data else None,
                      overwrite_input_shapes=input_shapes(args, "overwrite_input_shape"),
                      fold_size_limit_bytes=args.fold_size_limit)
    console.print(fold_table(result))
    for note in (result.verification or {}).get("assumptions", []):
        console.print(f"note: {note}", highlight=False)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if args.explain:
        print_explain(console, result.refusals or {})
    if args.bench:
        from onnxmerge.profiler import compare

        result.bench = compare(args.input, result.output, input_shapes=input_shapes(args))
        console.print(speedup_line(result.bench), highlight=False)
    if args.json:
        write_json(result, args.json)
    console.print(f"verified on {args.check_n} input set(s); wrote {result.output}", highlight=False)
    return EXIT_OK


def _run_profile(args: argparse.Namespace, console: Console) -> int:
    from onnxmerge.profiler import profile
    from onnxmerge.report import profile_tables, write_json
    from onnxmerge.results import ProfileResult

    result = ProfileResult.from_report(profile(args.model, runtime_settings(args), input_shapes=input_shapes(args),
                                               seed=args.seed, per_node=args.per_node, trace=args.trace))
    for table in profile_tables(result, top=args.top):
        console.print(table)
    for note in result.assumptions:
        console.print(f"note: {note}", highlight=False)
    if args.json:
        write_json(result, args.json)
    return EXIT_OK


def _run_compare(args: argparse.Namespace, console: Console) -> int:
    from onnxmerge.profiler import compare
    from onnxmerge.report import compare_table, speedup_line, write_json
    from onnxmerge.results import CompareResult

    result = CompareResult.from_report(compare(args.model_a, args.model_b, runtime_settings(args),
                                               input_shapes=input_shapes(args), seed=args.seed))
    console.print(compare_table(result))
    console.print(speedup_line(result), highlight=False)
    for note in result.assumptions:
        console.print(f"note: {note}", highlight=False)
    if args.json:
        write_json(result, args.json)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    console = Console()
    errors = Console(stderr=True)
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        from onnxmerge.errors import OnnxMergeError

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the report carries the warnings that matter
            return args.handler(args, console)
    except OnnxMergeError as error:
        errors.print(f"onnxmerge: error: {to_cli_terms(str(error))}", highlight=False, markup=False, soft_wrap=True)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug, not a user error: still one line unless debugging
        if os.environ.get("ONNXMERGE_DEBUG"):
            raise
        errors.print(f"onnxmerge: internal error: {type(error).__name__}: {error} "
                     "(set ONNXMERGE_DEBUG=1 for a traceback)", highlight=False, markup=False, soft_wrap=True)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
