"""Typed results of every command: one common core and each command's own fields.

The core (:class:`CommandResult`) is the same for fold, compress, soup, align, profile and compare:

- ``command``, ``onnxmerge_version``;
- ``input`` and ``output``: the model file read and the file written (None for an in-memory model, or when
  the command takes several inputs or writes nothing);
- ``before`` and ``after``: model statistics (:func:`onnxmerge.stats.model_stats`'s dict), None when the
  command does not compute them;
- ``verification``: :meth:`onnxmerge.verify.Verification.to_dict` of the equivalence check in ORT, or None
  when the command does not check equivalence, and then ``verification_note`` says why;
- ``bench``: a ``compare`` report (interleaved timing of the input and the result), or None;
- ``warnings``.

``to_dict()`` is the JSON that ``--json`` writes (plain JSON types only: it round-trips through
``json.dumps``/``json.loads``); ``.report`` is the same dict, read-only, for code written against the older
untyped reports. To change a result, set its fields: ``.report`` is a fresh copy each time.

Results only hold what a command measured; nothing here measures, and the formatting functions
(:mod:`onnxmerge.report` and the command modules' tables) only format what a result holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from onnxmerge.version import __version__

if TYPE_CHECKING:
    import onnx
    from pathlib import Path

    from onnxmerge.layermerge.dp import Plan

CORE_KEYS = ("command", "onnxmerge_version", "input", "output", "before", "after", "verification",
             "verification_note", "bench", "warnings")

COMPRESS_NOTE = ("compression changes the function on purpose; see fidelity (agreement with the original on "
                 "held-out calibration inputs) and recovery (the written ONNX equals the trained network)")
SOUP_NOTE = "merging weights changes the function on purpose; see scores (with evaluation data)"
PROFILE_NOTE = "profile measures one model; it does not change it"
COMPARE_NOTE = "compare times two models; it does not check that they compute the same function"

# Field metadata: how a field appears in to_dict().
_INTERNAL = {"internal": True}  # a Python object (the model), not part of the JSON
_OPTIONAL = {"optional": True}  # left out while None: present only when the command did that step
_FLATTEN = {"flatten": True}  # a dict whose keys join the top level (fields of a report not typed here)


def _key(name: str, **metadata) -> dict:
    return {"key": name, **metadata}


def jsonable(value: Any) -> Any:
    """``value`` in plain JSON types (a fresh copy): tuples become lists, paths strings, numpy values Python
    numbers, and objects with ``to_dict()`` their dict."""
    if isinstance(value, Mapping):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, PurePath):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return jsonable(value.tolist())
    return str(value)


@dataclass(kw_only=True)
class CommandResult:
    """What every command reports; see the module docstring for the meaning of each field."""

    command: str
    onnxmerge_version: str = __version__
    input: str | None = None
    output: str | None = None
    before: dict | None = None
    after: dict | None = None
    verification: dict | None = None
    verification_note: str | None = None
    bench: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        report: dict = {}
        for spec in fields(self):
            metadata = spec.metadata
            if metadata.get("internal"):
                continue
            value = getattr(self, spec.name)
            if metadata.get("flatten"):
                report.update(jsonable(value or {}))
            elif value is not None or not metadata.get("optional"):
                report[metadata.get("key", spec.name)] = jsonable(value)
        return report

    @property
    def report(self) -> dict:
        """``to_dict()``: read-only (a fresh copy each time); set fields to change the result."""
        return self.to_dict()

    @property
    def verified(self) -> bool | None:
        """Whether the equivalence check passed; None when the command does not check equivalence."""
        if self.verification is None:
            return None
        return bool(self.verification.get("passed"))


@dataclass(kw_only=True)
class FoldResult(CommandResult):
    """``model`` has the type that was given: a ModelProto, or the Path the result was written to.

    ``proto`` is the result; for a file input it is the model as written, so when that has external data
    its large tensors reference the output's data file (``onnx.load_external_data_for_model(proto,
    output_folder)`` reads them in).

    ``rewrites``, ``rounds``, ``converged`` and ``refusals`` are None (and absent from the JSON) when the
    passes did not run (a quantized model passes through unchanged).
    """

    command: str = "fold"
    model: onnx.ModelProto | Path | None = field(default=None, metadata=_INTERNAL)
    proto: onnx.ModelProto | None = field(default=None, metadata=_INTERNAL, repr=False)
    passes: list[str] = field(default_factory=list)
    canonicalization: list[str] = field(default_factory=list)
    rewrites: dict[str, int] | None = field(default=None, metadata=_OPTIONAL)
    rounds: int | None = field(default=None, metadata=_OPTIONAL)
    converged: bool | None = field(default=None, metadata=_OPTIONAL)
    refusals: dict[str, list] | None = field(default=None, metadata=_OPTIONAL)

    @property
    def verified(self) -> bool:
        return bool(super().verified)


@dataclass(kw_only=True)
class CompressResult(CommandResult):
    """LayerMerge compression. ``verification`` is None: the result computes a different function on
    purpose. ``fidelity`` compares it with the original on held-out calibration inputs; ``recovery`` (None
    without distillation) holds the check that the written ONNX equals the trained network; ``bench`` is
    the final interleaved timing of the canonical (folded) original against the result."""

    command: str = "compress"
    verification_note: str | None = COMPRESS_NOTE
    model: onnx.ModelProto | Path | None = field(default=None, metadata=_INTERNAL)
    proto: onnx.ModelProto | None = field(default=None, metadata=_INTERNAL, repr=False)
    plan: Plan | None = None
    plan_segments: list[dict] = field(default_factory=list)
    segments: int = 0
    entries: int = 0
    original_ms: float | None = None
    table_original_ms: float | None = None
    target_ms: float | None = None
    rounds: list[dict] = field(default_factory=list)
    reached_target: bool | None = None
    measured_speedup: dict | None = None
    predicted_table_ms: float | None = None
    measured_ms: float | None = None
    fidelity: dict = field(default_factory=dict)
    recovery: dict | None = None
    wall_s: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)  # per phase, sampled
    latency_model: dict | None = None  # how table sums became end-to-end latency (layermerge/context.py)
    search: dict | None = None  # the budget search: attempts, the chosen one, whether the target was reached
    reranking: dict | None = None  # alternative plans scored jointly on held-out data
    importance: dict | None = None  # what the importance table scored, on how many held-out rows, cache use


@dataclass(kw_only=True)
class SoupResult(CommandResult):
    """A weight merge. ``model`` is the Path written to, or the ModelProto when no output path was given.
    ``input`` is None (see ``inputs``); ``before``/``after`` are None (the graph is unchanged)."""

    command: str = "soup"
    verification_note: str | None = SOUP_NOTE
    model: onnx.ModelProto | Path | None = field(default=None, metadata=_INTERNAL)
    method: str = "uniform"
    parameters: dict = field(default_factory=dict)
    seed: int = 0
    inputs: list[dict] = field(default_factory=list)
    base: dict | None = None
    compatibility: dict = field(default_factory=dict)
    alignment: list[dict] | None = field(default=None, metadata=_OPTIONAL)
    scores: dict | None = field(default=None, metadata=_OPTIONAL)
    greedy: dict | None = field(default=None, metadata=_OPTIONAL)
    tensors: dict[str, int] = field(default_factory=dict)
    bn_reset: dict | None = field(default=None, metadata=_OPTIONAL)


@dataclass(kw_only=True)
class AlignResult(CommandResult):
    """B permuted onto A, verified output-identical to B in ORT (``verification``). ``model`` is the Path
    written to or the ModelProto; the JSON's ``model`` key is B's provenance (``model_info``)."""

    command: str = "align"
    model: onnx.ModelProto | Path | None = field(default=None, metadata=_INTERNAL)
    reference: dict = field(default_factory=dict)
    model_info: dict = field(default_factory=dict, metadata=_key("model"))
    seed: int = 0
    compatibility: dict = field(default_factory=dict)
    groups: int = 0
    channels: int = 0
    moved_channels: int = 0
    sweeps: int = 0
    cosine_before: float | None = None
    cosine_after: float | None = None
    matching: dict = field(default_factory=dict, metadata=_FLATTEN)  # further numbers of the weight matching

    ALIGNMENT_KEYS: ClassVar[tuple[str, ...]] = ("groups", "channels", "moved_channels", "sweeps", "cosine_before",
                                                 "cosine_after")

    @classmethod
    def from_alignment(cls, info: dict, **core) -> "AlignResult":
        """From :func:`onnxmerge.merging.rebasin.align_model`'s report (its ``verification`` joins the core)."""
        info = dict(info)
        verification = info.pop("verification", None)
        known = {key: info.pop(key) for key in cls.ALIGNMENT_KEYS if key in info}
        return cls(verification=verification, **known, matching=info, **core)


def _split(report: Mapping, names: tuple[str, ...]) -> tuple[dict, dict]:
    known = {name: report[name] for name in names if name in report}
    rest = {key: value for key, value in report.items() if key not in names}
    return known, rest


@dataclass(kw_only=True)
class TimedResult(CommandResult):
    """A report of timed ORT sessions (profile, compare): the machine, the session options, what was assumed
    about the inputs and the warm-up runs."""

    environment: dict = field(default_factory=dict)
    session: dict = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)
    warmup: int = 0

    TIMED_FIELDS: ClassVar[tuple[str, ...]] = ("environment", "session", "assumptions", "warmup")


@dataclass(kw_only=True)
class ProfileResult(TimedResult):
    """``onnxmerge.profile``'s report, typed: ``input`` is the model's path (``model``), ``before`` its
    statistics (the same as ``static``), ``after`` None, no verification."""

    command: str = "profile"
    verification_note: str | None = PROFILE_NOTE
    model: str | None = None
    latency: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    static: dict = field(default_factory=dict)
    per_node: dict | None = field(default=None, metadata=_OPTIONAL)
    extra: dict = field(default_factory=dict, metadata=_FLATTEN)

    FIELDS: ClassVar[tuple[str, ...]] = ("model", *TimedResult.TIMED_FIELDS, "latency", "memory", "static",
                                         "per_node")

    @classmethod
    def from_report(cls, report: Mapping) -> "ProfileResult":
        known, rest = _split(report, cls.FIELDS)
        return cls(input=known.get("model"), before=known.get("static"), **known, extra=rest)


@dataclass(kw_only=True)
class CompareResult(TimedResult):
    """``onnxmerge.compare``'s report, typed: ``input`` is A's path (``a``); B is ``b``; no statistics, no
    verification."""

    command: str = "compare"
    verification_note: str | None = COMPARE_NOTE
    a: str | None = None
    b: str | None = None
    latency_a: dict = field(default_factory=dict)
    latency_b: dict = field(default_factory=dict)
    speedup: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict, metadata=_FLATTEN)

    FIELDS: ClassVar[tuple[str, ...]] = ("a", "b", *TimedResult.TIMED_FIELDS, "latency_a", "latency_b", "speedup")

    @classmethod
    def from_report(cls, report: Mapping) -> "CompareResult":
        known, rest = _split(report, cls.FIELDS)
        return cls(input=known.get("a"), **known, extra=rest)
