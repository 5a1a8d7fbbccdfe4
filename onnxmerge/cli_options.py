"""Command-line option groups shared by every subcommand, and the only place strings become values.

The same idea has the same spelling on every command: ``--input-shape NAME:DIMS`` (parsed here into the
``Mapping[str, tuple[int, ...]]`` the API takes), ``--json FILE`` for the report, ``-o/--output`` for the
written model, and the runtime group (``--provider --threads --opt-level --cuda-graph --warmup --runs``)
that becomes one :class:`~onnxmerge.runner.RuntimeSettings`. Defaults come from the library (the CLI never
repeats them), and library errors that name a parameter are translated to the flag here.
"""

from __future__ import annotations

import argparse
import re

from onnxmerge.errors import BadInputError

# Library messages name parameters as ``name=`` (``force=True``, ``speedup=``); the CLI shows the flag instead.
FLAG_FOR_PARAMETER = {
    "input_shapes": "--input-shape",
    "overwrite_input_shapes": "--overwrite-input-shape",
    "fold_size_limit_bytes": "--fold-size-limit",
    "check_n": "--check-n",
    "threads": "--threads",
    "runs": "--runs",
    "warmup": "--warmup",
    "opt_level": "--opt-level",
    "provider": "--provider",
    "cuda_graph": "--cuda-graph",
    "speedup": "--speedup",
    "latency_budget_ms": "--latency-budget",
    "calibration": "--calib",
    "recover_steps": "--recover-steps",
    "recover": "--no-recover",  # only ever written as recover=False
    "plan": "--plan",
    "jobs": "--jobs",
    "alternatives": "--alternatives",
    "search_space": "--search-space",
    "recover_data": "--recover-data",
    "force": "--force",
    "base": "--base",
    "weights": "--weights",
    "density": "--density",
    "method": "--method",
    "evaluation": "--eval",
    "executor": "--executor",
    "config": "--config",
    "ray_address": "--ray-address",
    "pipeline": "--pipeline",
}
_PARAMETER = re.compile(r"\b(" + "|".join(sorted(FLAG_FOR_PARAMETER, key=len, reverse=True))
                        + r")=(True\b|False\b|'[^']*'|\S?)")


def to_cli_terms(message: str) -> str:
    """A library message with ``name=`` parameter references replaced by the flags that set them:
    ``force=True`` → ``--force``, ``method='weighted'`` → ``--method weighted``, ``speedup=`` → ``--speedup``."""
    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if value in ("True", "False"):
            return FLAG_FOR_PARAMETER[name]
        if value.startswith("'"):
            return f"{FLAG_FOR_PARAMETER[name]} {value.strip(chr(39))}"
        return FLAG_FOR_PARAMETER[name] + (f" {value}" if value and not value.isspace() and value not in ",.;)" else value)

    return _PARAMETER.sub(flag, message)


def parse_input_shapes(specs: list[str] | None) -> dict[str | None, tuple[int, ...]]:
    """``name:1,3,224,224`` (or bare dims for a single-input model) → {name: dims}; split on the last colon."""
    shapes: dict[str | None, tuple[int, ...]] = {}
    for spec in specs or []:
        name, _, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise BadInputError(f"bad --input-shape '{spec}': expected name:d0,d1,... with integer dims") from None
        if not shape or any(d <= 0 for d in shape):
            raise BadInputError(f"bad --input-shape '{spec}': dims must be positive integers")
        shapes[name or None] = shape
    return shapes


def byte_size(text: str) -> int:
    """``1048576``, ``512K``, ``1M``, ``2G`` (binary multiples; ``MiB``/``MB`` spellings too) → bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned[-1:] in ("K", "M", "G") else (cleaned, "")
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 512K, 1M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a size cannot be negative: {text!r}")
    return value


def add_input_shape_option(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    parser.add_argument("--input-shape", action="extend", nargs="+", default=[], metavar="NAME:DIMS",
                        help=help_text or "input shape, e.g. input:1,3,224,224 (unknown dims default to 1)")


def input_shapes(args: argparse.Namespace, attribute: str = "input_shape") -> dict | None:
    """The parsed ``--input-shape`` (or another NAME:DIMS option) of ``args``, None when not given."""
    return parse_input_shapes(getattr(args, attribute)) or None


def add_json_option(parser: argparse.ArgumentParser, *, deprecated: tuple[str, ...] = ()) -> None:
    """``--json FILE`` for the report; ``deprecated`` spellings still work and say so."""
    parser.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    for spelling in deprecated:
        parser.add_argument(spelling, dest="json", metavar="FILE", action=_Deprecated,
                            help="deprecated spelling of --json")


def add_output_option(parser: argparse.ArgumentParser, *, positional: bool) -> None:
    """The written model: ``-o/--output FILE``; commands that documented a positional OUTPUT keep it."""
    if positional:
        parser.add_argument("output", nargs="?", help="output .onnx model (or -o)")
        parser.add_argument("-o", "--output", dest="output_option", metavar="FILE", help="output .onnx model")
    else:
        parser.add_argument("-o", "--output", dest="output", metavar="FILE", required=True,
                            help="output .onnx model")


def output_path(args: argparse.Namespace) -> str | None:
    """OUTPUT from the positional or ``-o``; both given (and different) is a usage error."""
    positional, option = getattr(args, "output", None), getattr(args, "output_option", None)
    if positional and option and positional != option:
        raise BadInputError(f"two outputs given ({positional} and -o {option}); give one")
    return option or positional


def add_runtime_options(parser: argparse.ArgumentParser, *, timing: bool = True, defaults=None) -> None:
    """How ORT runs: provider, threads, opt level, CUDA graph and (with ``timing``) warm-up and runs; the
    defaults are the library's (``defaults``, a RuntimeSettings, else RuntimeSettings())."""
    from onnxmerge.runner import OPT_LEVELS, RuntimeSettings

    defaults = defaults or RuntimeSettings()
    group = parser.add_argument_group("runtime")
    group.add_argument("--provider", default=defaults.provider,
                       help=f"execution provider: cpu or cuda (default {defaults.provider})")
    group.add_argument("--threads", type=int, default=defaults.threads,
                       help=f"intra-op threads (default {defaults.threads})")
    group.add_argument("--opt-level", default=defaults.opt_level, choices=list(OPT_LEVELS)[::-1],
                       help=f"ORT graph optimization level (default {defaults.opt_level})")
    group.add_argument("--cuda-graph", action="store_true", help="capture and replay a CUDA graph (cuda only)")
    if timing:
        group.add_argument("--warmup", type=int, default=defaults.warmup,
                           help=f"untimed runs first (default {defaults.warmup})")
        group.add_argument("--runs", type=int, default=defaults.runs, help=f"timed runs (default {defaults.runs})")


def runtime_settings(args: argparse.Namespace, **fixed):
    """The :class:`~onnxmerge.runner.RuntimeSettings` the runtime options of ``args`` describe."""
    from onnxmerge.runner import RuntimeSettings

    values = {name: getattr(args, name) for name in RuntimeSettings.__dataclass_fields__ if hasattr(args, name)}
    return RuntimeSettings(**(values | fixed))


class _Deprecated(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        import sys

        print(f"onnxmerge: note: {option_string} is deprecated; use --json", file=sys.stderr)
        setattr(namespace, self.dest, values)
