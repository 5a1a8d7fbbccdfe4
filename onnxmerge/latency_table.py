"""A latency look-up table of single convolutions, measured in ORT and cached on disk.

LayerMerge's dynamic program prices every candidate merged convolution by a table look-up, so each
distinct convolution is measured once per machine and ORT build, with the profile command's session
settings, and kept in a cache that several processes may fill at once.

Padding convention: ``ConvSignature.padding`` accepts ``"same"`` or explicit ONNX ``pads``
``(x1_begin, ..., xn_begin, x1_end, ..., xn_end)``. ``"same"`` means ``d*(k-1)//2`` at both ends of
each axis (``k//2`` for an undilated kernel: output size = ceil(input / stride) for odd kernels) and is
stored as those explicit pads, so two signatures describing the same convolution share one key.
"""

from __future__ import annotations

import hashlib
import json
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxmerge import activations
from onnxmerge.activations import Activation
from onnxmerge.environment import default_cache_dir, hardware_fingerprint
from onnxmerge.errors import BadInputError
from onnxmerge.graph import import_graph, read_conv_params, weight_dtype
from onnxmerge.refusal import Refused
from onnxmerge.io import ModelLike, clamp_ir_version, load_model
from onnxmerge.profiler import profile
from onnxmerge.report import write_json
from onnxmerge.runner import RuntimeSettings, input_specs, random_inputs
from onnxmerge.stats import static_shapes
from onnxmerge.timing import LatencyStats
from onnxmerge.trace import profile_nodes

OPSET = 17
DTYPES = ("float32", "float16")
# Shorthand names of common activations. A signature's activation is any onnxmerge.activations name or
# Activation (every activation the table recognises can be measured); it is stored as the table's name, e.g.
# "relu6" as "clip(0,6)" and "leaky_relu" as "leakyrelu(0.01)". conv_model emits it as the table emits it at
# OPSET (silu = x * Sigmoid(x), gelu in its Erf form, which ORT fuses into QuickGelu / Gelu at "extended").
ACTIVATIONS = ("relu", "hardswish", "leaky_relu", "sigmoid", "relu6", "silu", "gelu")
# Bump when conv_model changes what it builds: entries measured on the old models stop matching.
# 2: activations named by the activation table, with their parameters ("clip(0,6)", "leakyrelu(0.1)").
DEFAULT_TABLE_RUNS = 30  # entries are cheap to time and cached: more runs than a quick profile
# 3: the runtime settings' cache fields in the key. 4: every entry also holds its kernel time (kernel_ms).
CACHE_FORMAT = 4
# Nodes of a one-conv model's profile that are not the conv's own work: the layout conversions ORT adds
# around an NCHWc kernel, which a conv inside a chain of NCHWc convs does not pay.
_LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput"})


@dataclass(frozen=True, kw_only=True)
class ConvSignature:
    """Everything that decides a convolution's latency (weights' values do not); ints broadcast per axis.

    The spatial rank is ``len(input_hw)``. The measured model always has a bias: a conv without one costs
    the same to within noise, and one entry serves both.
    """

    in_channels: int
    out_channels: int
    kernel: int | tuple[int, ...]
    input_hw: tuple[int, ...]
    stride: int | tuple[int, ...] = 1
    dilation: int | tuple[int, ...] = 1
    groups: int = 1
    padding: str | tuple[int, ...] = "same"
    activation: str | Activation | None = None  # stored as its activation-table name
    dtype: str = "float32"
    batch: int = 1

    def __post_init__(self):
        input_hw = _ints("input_hw", self.input_hw, None)
        rank = len(input_hw)
        kernel = _ints("kernel", self.kernel, rank)
        dilation = _ints("dilation", self.dilation, rank)
        if isinstance(self.padding, str):
            if self.padding != "same":
                raise BadInputError(f"padding must be 'same' or explicit pads, got '{self.padding}'")
            begins = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
            padding = begins + begins
        else:
            padding = _ints("padding", self.padding, 2 * rank, minimum=0)
        normalised = {"input_hw": input_hw, "kernel": kernel, "dilation": dilation, "padding": padding,
                      "stride": _ints("stride", self.stride, rank)}
        for name in ("in_channels", "out_channels", "groups", "batch"):
            normalised[name] = _int(name, getattr(self, name))
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise BadInputError(f"groups={self.groups} must divide in_channels={self.in_channels} and "
                                f"out_channels={self.out_channels}")
        if self.activation is not None:
            object.__setattr__(self, "activation", self._activation().name)
        if self.dtype not in DTYPES:
            raise BadInputError(f"dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        if min(self.output_hw) < 1:
            raise BadInputError(f"input_hw={self.input_hw} is too small for kernel={self.kernel}, "
                                f"dilation={self.dilation}, padding={self.padding} (output {self.output_hw})")

    def _activation(self) -> Activation:
        if isinstance(self.activation, Activation):
            activation = self.activation
        else:
            try:
                activation = activations.parse(str(self.activation))
            except ValueError:
                raise BadInputError(f"unknown activation '{self.activation}'; choose from None, an activation name "
                                    f"such as {', '.join(ACTIVATIONS)}, leakyrelu(0.1), clip(0,4), tanh, "
                                    f"prelu[C,1,1] (kinds: {', '.join(activations.KINDS)})") from None
        if activation.slope is not None:
            try:
                np.broadcast_shapes(activation.slope.shape, (self.out_channels, *self.input_hw))
            except ValueError:
                raise BadInputError(f"activation {activation.name}: its slope does not broadcast over "
                                    f"{self.out_channels} output channels") from None
        return activation

    @property
    def activation_value(self) -> Activation | None:
        """The activation as a table value (a PReLU's slope is 0.25 throughout: its values cost nothing)."""
        return None if self.activation is None else activations.parse(self.activation)

    @property
    def fused(self) -> bool:
        """Whether ORT's CPU EP fuses the activation into the Conv (a linear conv counts as fused): then the
        entry costs about the conv alone; otherwise it includes one more pass over the output."""
        return self.activation is None or self.activation_value.ort_fuses_after_conv

    @property
    def output_hw(self) -> tuple[int, ...]:
        rank = len(self.input_hw)
        return tuple((h + pb + pe - d * (k - 1) - 1) // s + 1 for h, k, s, d, pb, pe in zip(
            self.input_hw, self.kernel, self.stride, self.dilation, self.padding[:rank], self.padding[rank:]))

    def key(self) -> str:
        """Stable across processes and versions (unlike ``hash()``): it names cache entries."""
        def axes(values):
            return "x".join(map(str, values))

        return (f"conv:i{self.in_channels}:o{self.out_channels}:k{axes(self.kernel)}:s{axes(self.stride)}"
                f":d{axes(self.dilation)}:g{self.groups}:p{','.join(map(str, self.padding))}"
                f":hw{axes(self.input_hw)}:b{self.batch}:{self.dtype}:{self.activation or 'linear'}")


def _int(name: str, value, minimum: int = 1) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        raise BadInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def _ints(name: str, value, length: int | None, minimum: int = 1) -> tuple[int, ...]:
    """A per-axis tuple; an int is broadcast to ``length`` axes (``None``: a sequence of any length is needed)."""
    if hasattr(value, "__index__") and length is not None:
        value = (value,) * length
    if not isinstance(value, (tuple, list)) or not value or (length is not None and len(value) != length):
        count = f"{length} integers" if length is not None else "a non-empty tuple of integers"
        raise BadInputError(f"{name} must be {count} >= {minimum}, got {value!r}")
    return tuple(_int(name, v, minimum) for v in value)


def conv_model(signature: ConvSignature, *, seed: int = 0) -> onnx.ModelProto:
    """The smallest model that costs what the signature's convolution costs inside a network."""
    sig = signature
    dtype = np.dtype(sig.dtype)
    elem_type = helper.np_dtype_to_tensor_dtype(dtype)
    rng = np.random.default_rng(seed)
    fan_in = sig.in_channels // sig.groups * int(np.prod(sig.kernel))
    # Unit-variance outputs: float16 neither overflows nor goes subnormal, either of which changes speed.
    weight = rng.standard_normal((sig.out_channels, sig.in_channels // sig.groups, *sig.kernel)) / np.sqrt(fan_in)
    initializers = [numpy_helper.from_array(weight.astype(dtype), "weight"),
                    numpy_helper.from_array(rng.standard_normal(sig.out_channels).astype(dtype), "bias")]
    conv_out = "conv" if sig.activation else "y"
    nodes = [helper.make_node("Conv", ["x", "weight", "bias"], [conv_out], kernel_shape=list(sig.kernel),
                              strides=list(sig.stride), dilations=list(sig.dilation), pads=list(sig.padding),
                              group=sig.groups)]
    if sig.activation:
        activation_nodes, constants = sig.activation_value.emit_onnx(conv_out, "y", dtype=dtype, opset=OPSET,
                                                                     prefix="activation")
        nodes += activation_nodes
        initializers += constants
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", elem_type, [sig.batch, sig.in_channels, *sig.input_hw])],
        [helper.make_tensor_value_info("y", elem_type, [sig.batch, sig.out_channels, *sig.output_hw])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxmerge")
    clamp_ir_version(model)
    return model


@dataclass(eq=False)
class LatencyTable(Mapping):
    """Latency per signature (a read-only mapping), the settings it holds for, and how its build went.

    ``hits`` and ``misses`` count distinct signatures: a signature asked for twice is looked up once.
    """

    entries: dict[ConvSignature, LatencyStats]
    provider: str
    threads: int
    opt_level: str
    fingerprint: str
    hits: int = 0
    misses: int = 0
    cache_dir: Path | None = field(default=None, repr=False)
    kernel: dict[ConvSignature, float] = field(default_factory=dict, repr=False)  # kernel_ms per signature

    def kernel_ms(self, signature: ConvSignature) -> float:
        """The signature's price in context: the mean kernel time per run of its conv (and an activation ORT
        did not fuse) in ORT's per-node profile, without layout conversions or the per-run overhead."""
        return self.kernel[signature]

    def __getitem__(self, signature: ConvSignature) -> LatencyStats:
        return self.entries[signature]

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def to_dict(self) -> dict:
        return {"provider": self.provider, "threads": self.threads, "opt_level": self.opt_level,
                "fingerprint": self.fingerprint, "hits": self.hits, "misses": self.misses,
                "cache_dir": str(self.cache_dir) if self.cache_dir else None,
                "entries": [{"key": sig.key(), "signature": asdict(sig), "fused": sig.fused,
                             "latency": stats.to_dict(), "kernel_ms": self.kernel.get(sig)}
                            for sig, stats in self.entries.items()]}


def cache_key(signature: ConvSignature, settings: RuntimeSettings, fingerprint: str) -> str:
    """Everything a measurement depends on besides how often it is sampled: the signature, the runtime
    settings' :meth:`~onnxmerge.runner.RuntimeSettings.cache_fields`, and ``fingerprint`` (ORT build and
    device)."""
    fields = "|".join(f"{name}={value}" for name, value in sorted(settings.cache_fields().items()))
    return f"v{CACHE_FORMAT}|{signature.key()}|{fields}|{fingerprint}"


def measure(signatures: Iterable[ConvSignature], settings: RuntimeSettings | None = None, *,
            cache_dir: str | Path | None = None, fingerprint: str | None = None,
            progress: Callable[[], None] | None = None, **overrides) -> LatencyTable:
    """Look every signature up in the disk cache, timing (and caching) only the ones missing.

    ``settings`` (one :class:`~onnxmerge.runner.RuntimeSettings`; keyword ``overrides`` change single fields,
    default 30 runs) says how entries are timed; the cache key derives from it. A hit creates no session. An
    entry measured with fewer than ``settings.runs`` runs, or unreadable, is a miss and is overwritten. Each
    entry is one JSON file replaced atomically, so concurrent builds into one cache cannot corrupt it (the
    last writer of an entry wins). ``progress`` is called once per distinct signature. ``fingerprint`` defaults to
    :func:`onnxmerge.environment.hardware_fingerprint`; pass another to keep tables apart by hand.
    """
    settings = (settings or RuntimeSettings(runs=DEFAULT_TABLE_RUNS)).with_overrides(**overrides)
    fingerprint = fingerprint if fingerprint is not None else hardware_fingerprint(settings.provider)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "latency"
    folder.mkdir(parents=True, exist_ok=True)
    table = LatencyTable({}, settings.provider, settings.threads, settings.opt_level, fingerprint, cache_dir=folder)
    for signature in dict.fromkeys(signatures):
        key = cache_key(signature, settings, fingerprint)
        path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
        cached = _read_entry(path, key, settings.runs)
        if cached is None:
            model = conv_model(signature)
            report = profile(model, settings)
            stats = LatencyStats(**report["latency"])
            kernel_ms = kernel_time_ms(model, settings)
            write_json({"key": key, "signature": asdict(signature), "latency": stats.to_dict(),
                        "kernel_ms": kernel_ms, "environment": report["environment"]}, path)
            table.misses += 1
        else:
            stats, kernel_ms = cached
            table.hits += 1
        table.entries[signature] = stats
        table.kernel[signature] = kernel_ms
        if progress is not None:
            progress()
    return table


def kernel_time_ms(model: onnx.ModelProto, settings: RuntimeSettings) -> float:
    """Mean per-run kernel time of a one-conv model from ORT's per-node profile, layout conversions left
    out (a separate profiling session: the profiler slows every run, so never the timed one)."""
    feeds = random_inputs(input_specs(model, None), 0)
    breakdown = profile_nodes(model, feeds, provider=settings.provider, threads=settings.threads,
                              opt_level=settings.opt_level, runs=max(5, min(settings.runs, 20)))
    return sum(row.mean_us for row in breakdown.nodes if row.op_type not in _LAYOUT_OPS) / 1e3


def _read_entry(path: Path, key: str, runs: int) -> tuple[LatencyStats, float] | None:
    try:
        entry = json.loads(path.read_text())
        stats, kernel_ms = LatencyStats(**entry["latency"]), float(entry["kernel_ms"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (stats, kernel_ms) if entry.get("key") == key and stats.runs >= runs else None


def conv_signatures(model: ModelLike, input_shapes: Mapping[str | None, Sequence[int]] | None = None) -> list[tuple[str, ConvSignature]]:
    """Each Conv node's signature at static shapes, with the activation it feeds alone, in graph order.

    Nodes are named as :func:`onnxmerge.stats.node_costs` names them (``Conv_<index>`` when unnamed).
    Convs with ``auto_pad=SAME_*`` or non-constant weights are refused: ``fold`` makes pads explicit.
    The activation is whatever :func:`onnxmerge.activations.after` recognises reading the conv's output alone
    (every form of the table: a Gelu node or its Erf pattern, x * Sigmoid(x), Clip with any bounds...).
    """
    proto = load_model(model).proto
    shapes = dict(input_shapes) if input_shapes else None
    tensor_shapes = static_shapes(proto, {spec.name: spec.shape for spec in input_specs(proto, shapes)})
    graph = import_graph(proto)
    found = []
    for index, node in enumerate(graph.nodes):
        if node.op != "Conv":
            continue
        name = node.name or f"Conv_{index}"
        try:
            params = read_conv_params(node)
        except Refused as refused:
            raise BadInputError(f"conv '{name}' has no latency signature: {refused.reason}") from None
        data_shape = tensor_shapes.get(node.inputs[0].name)
        if data_shape is None:
            raise BadInputError(f"conv '{name}': its input shape is unknown at the given input shapes")
        found.append((name, ConvSignature(
            in_channels=params.in_channels, out_channels=params.out_channels, kernel=params.kernel_shape,
            stride=params.strides, dilation=params.dilations, groups=params.groups, padding=params.pads,
            input_hw=data_shape[2:], batch=data_shape[0], activation=activations.after(graph, node.outputs[0]),
            dtype=str(weight_dtype(node)))))
    return found


def additivity(model: ModelLike, input_shapes: Mapping[str | None, Sequence[int]] | None = None,
               settings: RuntimeSettings | None = None, *, cache_dir: str | Path | None = None,
               fingerprint: str | None = None, **overrides) -> dict:
    """How well the table's sum predicts the whole model, under the same settings.

    Compression turns a speed-up target into a latency budget over the convs; ``uncovered_fraction`` is
    the share of end-to-end time outside the table (clipped to [0, 1]: per-call overheads counted in
    every entry can push the sum past the end-to-end time), ``ratio`` is the unclipped table / end-to-end.
    """
    settings = (settings or RuntimeSettings(runs=DEFAULT_TABLE_RUNS)).with_overrides(**overrides)
    named = conv_signatures(model, input_shapes)
    table = measure([sig for _, sig in named], settings, cache_dir=cache_dir, fingerprint=fingerprint)
    report = profile(model, settings, input_shapes=input_shapes)
    end_to_end = report["latency"]["median_ms"]
    per_conv = {name: table[sig].median_ms for name, sig in named}
    table_sum = sum(per_conv.values())
    ratio = table_sum / end_to_end
    return {"end_to_end_ms": end_to_end, "table_sum_ms": table_sum, "ratio": ratio,
            "uncovered_fraction": min(max(1.0 - ratio, 0.0), 1.0), "convs": len(named), "per_conv_ms": per_conv,
            "table": {"hits": table.hits, "misses": table.misses, "fingerprint": table.fingerprint},
            "environment": report["environment"]}
