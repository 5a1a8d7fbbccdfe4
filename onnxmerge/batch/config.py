"""The optional batch config (TOML): per-model options and limits, chosen by glob patterns.

    [defaults]                       # every model
    check_n = 3
    [models."resnet*.onnx"]          # a pattern without "/" matches the file name,
    input_shapes = { input = [1, 3, 224, 224] }
    [models."vision/big/*"]          # one with "/" the path relative to IN_DIR ("*" crosses "/")
    timeout = 3600
    memory_limit = "16GiB"

A model's settings are, later winning: the built-in defaults, the command line (--timeout,
--memory-limit), [defaults], then every matching [models."..."] table in file order. Every key is checked
before any worker starts, so a typo is a one-line error (exit 2), not a batch of refused models.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from onnxmerge.batch.pipelines import Pipeline
from onnxmerge.errors import BadInputError, first_line

# Settings of the worker that runs the model, whatever the pipeline.
LIMIT_KEYS = ("timeout", "memory_limit")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(value: int | str) -> int | None:
    """Bytes from ``4GiB``, ``512M``, ``1.5g`` or an integer (binary units); ``none`` or 0 means no limit."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise BadInputError(f"bad memory size {value!r}: use e.g. 4GiB, 512MiB, 0 or none")
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size < 0:
        raise BadInputError(f"bad memory size {value!r}: must not be negative")
    return size or None


def matches(pattern: str, relative: str) -> bool:
    """Glob match like .gitignore: a pattern with no "/" is tried on the file name only."""
    target = relative if "/" in pattern else PurePosixPath(relative).name
    return fnmatch.fnmatchcase(target, pattern)


@dataclass(frozen=True)
class ModelSettings:
    options: dict  # passed to the pipeline
    timeout: float  # seconds of wall time for the worker, start to exit
    memory_limit: int | None  # bytes of address space (RLIMIT_AS); None: no limit


@dataclass(frozen=True)
class BatchConfig:
    defaults: dict = field(default_factory=dict)
    patterns: list[tuple[str, dict]] = field(default_factory=list)

    def settings_for(self, relative: str, base: ModelSettings) -> ModelSettings:
        settings = base
        for table in [self.defaults] + [table for pattern, table in self.patterns if matches(pattern, relative)]:
            limits = {key: table[key] for key in LIMIT_KEYS if key in table}
            options = {key: value for key, value in table.items() if key not in LIMIT_KEYS}
            settings = replace(settings, options={**settings.options, **options}, **limits)
        return settings


def load_config(path: str | Path, pipeline: Pipeline) -> BatchConfig:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise BadInputError("reading config= needs Python 3.11+ or `pip install tomli`") from None
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise BadInputError(f"cannot read config {path}: {first_line(exc)}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"config {path} is not valid TOML: {first_line(exc)}") from None
    unknown = set(data) - {"defaults", "models"}
    if unknown:
        raise BadInputError(f"config {path}: unknown table(s) {', '.join(sorted(unknown))}; "
                            "expected [defaults] and [models.\"<glob>\"]")
    models = data.get("models", {})
    if not isinstance(models, dict) or not all(isinstance(table, dict) for table in models.values()):
        raise BadInputError(f'config {path}: models must be tables, e.g. [models."resnet*.onnx"]')
    defaults = _checked_table(data.get("defaults", {}), "[defaults]", pipeline, path)
    patterns = [(pattern, _checked_table(table, f'[models."{pattern}"]', pipeline, path))
                for pattern, table in models.items()]
    return BatchConfig(defaults=defaults, patterns=patterns)


def _checked_table(table: dict, where: str, pipeline: Pipeline, path: Path) -> dict:
    if not isinstance(table, dict):
        raise BadInputError(f"config {path}: {where} must be a table")
    try:
        checked = {key: _checked_value(key, value, pipeline) for key, value in table.items()}
        pipeline.check_table({key: value for key, value in checked.items() if key not in LIMIT_KEYS})
    except BadInputError as error:
        raise BadInputError(f"config {path}, {where}: {error}") from None
    return checked


def _checked_value(key: str, value, pipeline: Pipeline):
    if key == "timeout":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise BadInputError(f"timeout must be a positive number of seconds, not {value!r}")
        return float(value)
    if key == "memory_limit":
        return parse_size(value)
    expected = pipeline.option_types.get(key)
    if expected is None:
        known = ", ".join(sorted([*pipeline.option_types, *LIMIT_KEYS]))
        raise BadInputError(f"unknown option '{key}' for the {pipeline.name} pipeline; known: {known}")
    if expected is dict:
        return _checked_shapes(key, value)
    if expected is list:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise BadInputError(f"{key} must be a list of strings, not {value!r}")
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise BadInputError(f"{key} must be {expected.__name__}, not {value!r}")
    return value


def _checked_shapes(key: str, value) -> dict[str, list[int]]:
    """Input shapes as a table of name → dims, e.g. { input = [1, 3, 224, 224] }."""
    if not isinstance(value, dict) or not all(
            isinstance(dims, list) and dims and all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                                    for d in dims) for dims in value.values()):
        raise BadInputError(f"{key} must be a table of input name = [positive dims], "
                            f"e.g. {{ input = [1, 3, 224, 224] }}, not {value!r}")
    return value
