"""The one table of activations: how each is recognised in a graph, emitted, run in torch, fused by ORT, named.

Every consumer goes through this module: the LayerMerge chain analysis (activation slots between convs), the
latency table (a conv priced together with its activation), the merge builder (an activation re-emitted with
its parameters), the torch bridge (activations run in torch for distillation) and Git Re-Basin alignment (which
activations commute with a channel permutation).

An :class:`Activation` is a frozen, hashable value: a ``kind`` (:data:`KINDS`), its parameters (Clip bounds,
LeakyRelu/Elu alpha, HardSigmoid alpha/beta, Selu alpha/gamma, Gelu approximation) and, for PReLU, its slope
array. Two activations are equal when they compute the same function (kind, parameters, slope content), in
whatever export form they were found; ``nodes``/``output``/``form`` record where and how one was found and
take no part in equality.

Export forms recognised (each kind is emitted in the first form the target opset allows):

- ``Relu``; ``Clip`` with constant bounds, as attributes (opset < 11) or inputs (opset >= 11), a missing bound
  being +-inf (Clip(0, 6) is kind ``relu6``, any other bounds kind ``clip``);
- ``HardSwish`` (opset >= 14) and ``x * HardSigmoid(x; alpha=1/6, beta=0.5)`` (its opset-13 export);
  a plain ``HardSigmoid`` with its alpha/beta is kind ``hardsigmoid``;
- SiLU: ``x * Sigmoid(x)``;
- ``LeakyRelu`` with its alpha; ``PRelu`` with a constant slope (per-channel, laid out as the model has it,
  e.g. (C, 1, 1), or a scalar); ``Elu`` (alpha); ``Selu`` (alpha, gamma); ``Sigmoid``; ``Tanh``;
- GELU: the ``Gelu`` op (opset 20, approximate "none"/"tanh"; also ``com.microsoft.Gelu``), the erf form
  torch's legacy exporter writes, ``(x * (Erf(x / sqrt2) + 1)) * 0.5`` (``x * (1/sqrt2)`` too, and the 0.5
  applied to x first or to the gate), and the tanh form ``0.5 * x * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``
  (x^3 as ``x * (x * x)`` or ``Pow(x, 3)``).

Multi-node forms are declared once, as expression patterns (:data:`_PATTERNS`), which serve both to recognise
them and to emit them, so that what is emitted is always recognised again.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from onnxmerge.graph import constant_value, is_graph_output, is_omitted, producer, unique_name

KINDS = ("relu", "relu6", "clip", "hardswish", "hardsigmoid", "silu", "leaky_relu", "prelu", "gelu", "sigmoid",
         "tanh", "elu", "selu")

# ONNX op -> kind, for the activations that are one node (Clip is relu6 or clip by its bounds).
SINGLE_OPS: Mapping[str, str] = {
    "Relu": "relu", "Clip": "clip", "HardSwish": "hardswish", "HardSigmoid": "hardsigmoid",
    "LeakyRelu": "leaky_relu", "PRelu": "prelu", "Gelu": "gelu", "Sigmoid": "sigmoid", "Tanh": "tanh",
    "Elu": "elu", "Selu": "selu",
}

# ONNX Runtime's CPU execution provider fuses a Conv with the one node reading it into FusedConv when that node
# is Relu, Sigmoid, Tanh, LeakyRelu, Clip (constant min/max) or HardSigmoid, for float inputs (float16 too where
# MLAS has fp16 vector intrinsics), at graph optimisation level "extended" and above. Source:
# onnxruntime/core/optimizer/conv_activation_fusion.cc, ConvActivationSelector::Select
# (is_supported_non_cuda_ep_activation, plus HardSigmoid for the CPU/JS/WebGPU EPs); HardSwish, Elu, Gelu and
# others are fused only for WebGPU's internal NHWC conv, and the CUDA EP fuses none of these there.
ORT_CONV_FUSED_OPS = frozenset({"Relu", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "HardSigmoid"})

# Re-Basin (onnxmerge.merging.rebasin): activations applied elementwise with scalar parameters commute with any
# permutation of the channels, so a channel space passes through them unchanged. PRelu's slope is per channel:
# it is a constant operand indexed by the channel axis, which the alignment permutes with the space (handled
# like the constant of a per-channel Mul; a scalar slope broadcasts and stays as it is).
PERMUTATION_INVARIANT_OPS = frozenset(op for op in SINGLE_OPS if op != "PRelu")
PER_CHANNEL_PARAM_OPS = frozenset({"PRelu"})

_KIND_OP = {kind: op for op, kind in SINGLE_OPS.items()} | {"relu6": "Clip"}  # the single op of a kind

_FLOAT_MAX = float(np.finfo(np.float32).max)
_SELU_ALPHA, _SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875
# Parameter names and ONNX defaults per kind, in the order names and ``params`` list them.
_DEFAULTS: dict[str, tuple[tuple[str, Any], ...]] = {
    "clip": (("min", -math.inf), ("max", math.inf)),  # relu6 is a clip of bounds (0, 6)
    "hardsigmoid": (("alpha", 0.2), ("beta", 0.5)),
    "leaky_relu": (("alpha", 0.01),),
    "gelu": (("approximate", "none"),),
    "elu": (("alpha", 1.0),),
    "selu": (("alpha", _SELU_ALPHA), ("gamma", _SELU_GAMMA)),
}
# Names that differ from the kind (the rest are the kind itself); parse() also accepts every kind.
_NAMES = {"relu6": "clip", "leaky_relu": "leakyrelu"}
ALIASES = {"relu6": "clip(0,6)", "leaky_relu": "leakyrelu(0.01)", "swish": "silu", "hard_swish": "hardswish",
           "hard_sigmoid": "hardsigmoid"}


def _f32(value) -> float:
    """A parameter as the float32 ONNX stores, as a Python float; |v| >= float32 max means no bound (inf)."""
    number = float(np.asarray(value, dtype=np.float64).reshape(()))
    if math.isnan(number):
        raise ValueError("an activation parameter is NaN")
    if abs(number) >= _FLOAT_MAX:
        return math.copysign(math.inf, number)
    return float(np.float32(number)) + 0.0  # + 0.0 turns -0.0 into 0.0


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return np.format_float_positional(np.float32(value), trim="-")


@dataclass(frozen=True, eq=False)
class Activation:
    """One activation function with its parameters; equal and hashed by kind, parameters and slope content.

    Build one with :func:`make` (or the helpers :func:`relu`, :func:`clip`, ...), :func:`parse` (a name), or
    recognise one in a graph with :func:`from_node` / :func:`after`.
    """

    kind: str
    params: tuple[tuple[str, Any], ...] = ()  # (name, value) in _DEFAULTS order: floats, or Gelu's "approximate"
    slope: np.ndarray | None = field(default=None, repr=False)  # PReLU only: float32, read-only
    nodes: tuple[str, ...] = ()  # names of the graph nodes it was recognised from (not part of equality)
    output: str | None = None  # name of the tensor it writes there (not part of equality)
    form: str | None = None  # the export form it was found in, e.g. "HardSigmoid*x" (not part of equality)

    # --- value semantics -------------------------------------------------------------------------------------

    def _content(self) -> tuple:
        slope = None if self.slope is None else (self.slope.shape, self.slope.tobytes())
        return self.kind, self.params, slope

    def __eq__(self, other) -> bool:
        return isinstance(other, Activation) and self._content() == other._content()

    def __hash__(self) -> int:
        return hash(self._content())

    def __repr__(self) -> str:
        return f"Activation({self.name})"

    # --- parameters --------------------------------------------------------------------------------------------

    def param(self, name: str):
        """A parameter by name (KeyError if the kind has none of that name)."""
        return dict(self.params)[name]

    @property
    def bounds(self) -> tuple[float, float]:
        """(min, max) of a Clip/ReLU6 (+-inf where unbounded)."""
        return self.param("min"), self.param("max")

    @property
    def alpha(self) -> float:
        return self.param("alpha")

    @property
    def per_channel(self) -> bool:
        """Whether a parameter is indexed by the channel: a PReLU slope of more than one value."""
        return self.slope is not None and self.slope.size > 1

    @property
    def tag(self) -> str:
        """The name without parameters, safe in node and tensor names: ``relu``, ``clip``, ``leakyrelu``..."""
        return _NAMES.get(self.kind, self.kind)

    @property
    def name(self) -> str:
        """Stable text for reports, plans and cache keys: ``relu``, ``clip(0,6)``, ``leakyrelu(0.1)``,
        ``gelu(tanh)``, ``prelu[16,1,1]`` (a PReLU is named by its slope's shape, not its values)."""
        base = self.tag
        if self.kind == "prelu":
            return f"prelu[{','.join(map(str, self.slope.shape))}]"
        if self.kind == "gelu":
            return "gelu" if self.param("approximate") == "none" else f"gelu({self.param('approximate')})"
        if not self.params:
            return base
        return f"{base}({','.join(_text(value) for _, value in self.params)})"

    @property
    def ort_fuses_after_conv(self) -> bool:
        """Whether ORT's CPU EP fuses it into the Conv it follows (see :data:`ORT_CONV_FUSED_OPS`)."""
        return _KIND_OP.get(self.kind) in ORT_CONV_FUSED_OPS

    @property
    def commutes_with_permutation(self) -> bool:
        """Whether permuting channels before it equals permuting after it, with the parameters unchanged."""
        return not self.per_channel

    def fitted(self, channels: int) -> "Activation":
        """The same activation for a tensor of ``channels`` channels: a per-channel PReLU gets a slope of that
        many channels, each its mean slope (used where the network's activation is added at a new place)."""
        if not self.per_channel or self.slope.shape[0] == channels:
            return self
        slope = np.full((channels, *self.slope.shape[1:]), float(self.slope.mean()), dtype=np.float32)
        return make("prelu", slope=slope)

    def located(self, nodes: Sequence[str], output: str | None, form: str | None = None) -> "Activation":
        """The same value, recording the graph nodes and output it was found as."""
        return replace(self, nodes=tuple(nodes), output=output, form=form if form is not None else self.form)

    # --- emission ----------------------------------------------------------------------------------------------

    def emit_onnx(self, source: str, target: str, *, dtype=np.float32, opset: int = 17,
                  prefix: str | None = None) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """onnx.helper nodes computing this activation from ``source`` into ``target``, and the initializers
        they read (named ``<prefix>.<...>``; ``prefix`` defaults to the name of ``target``)."""
        prefix = prefix or target
        nodes, initializers, counter = [], [], itertools.count()

        def constant(value: np.ndarray) -> str:
            name = f"{prefix}.c{next(counter)}"
            initializers.append(numpy_helper.from_array(np.asarray(value), name))
            return name

        for index, step in enumerate(_steps(self, opset, np.dtype(dtype))):
            inputs = [{"x": source}.get(ref, f"{prefix}.{ref}") if isinstance(ref, str) else
                      ("" if ref is None else constant(ref)) for ref in step.inputs]
            output = target if step.output == "y" else f"{prefix}.{step.output}"
            nodes.append(helper.make_node(step.op, inputs, [output], name=f"{prefix}.{step.op}{index}",
                                          **step.attrs))
        return nodes, initializers

    def emit_gs(self, graph: gs.Graph, source: gs.Tensor, target: gs.Tensor, *, opset: int,
                name: str | None = None, dtype=None) -> list[gs.Node]:
        """onnx-graphsurgeon nodes computing this activation from ``source`` into ``target`` (not yet added to
        the graph); constants take ``dtype``, by default that of ``source`` (float32 when it is unknown)."""
        if dtype is None:
            dtype = source.dtype if source.dtype is not None else np.float32
        dtype = np.dtype(dtype)
        name = name or unique_name(graph, self.tag)
        tensors: dict[str, gs.Tensor] = {"x": source, "y": target}
        nodes = []
        for index, step in enumerate(_steps(self, opset, dtype)):
            inputs = []
            for ref in step.inputs:
                if ref is None:
                    inputs.append(gs.Variable.empty())
                elif isinstance(ref, str):
                    inputs.append(tensors[ref])
                else:
                    inputs.append(gs.Constant(unique_name(graph, f"{name}.const"), np.ascontiguousarray(ref)))
            if step.output not in tensors:
                tensors[step.output] = gs.Variable(unique_name(graph, f"{name}.{step.output}"), dtype=dtype,
                                                   shape=source.shape)
            node_name = name if step.output == "y" else unique_name(graph, f"{name}.{step.op}")
            nodes.append(gs.Node(step.op, name=node_name, attrs=dict(step.attrs), inputs=inputs,
                                 outputs=[tensors[step.output]]))
        return nodes

    # --- torch -------------------------------------------------------------------------------------------------

    def torch_function(self) -> Callable:
        """``f(x) -> y`` in torch, matching ONNX Runtime to float32 precision (torch is imported here)."""
        import torch
        import torch.nn.functional as F

        kind = self.kind
        if kind == "relu":
            return F.relu
        if kind in ("relu6", "clip"):
            low, high = self.bounds
            low, high = (None if math.isinf(low) else low), (None if math.isinf(high) else high)
            return (lambda x: x) if low is None and high is None else (lambda x: torch.clamp(x, low, high))
        if kind == "hardswish":
            return F.hardswish
        if kind == "hardsigmoid":
            alpha, beta = self.param("alpha"), self.param("beta")
            return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)
        if kind == "silu":
            return F.silu
        if kind == "leaky_relu":
            alpha = self.alpha
            return lambda x: F.leaky_relu(x, alpha)
        if kind == "prelu":
            slope = torch.from_numpy(self.slope.copy())
            return lambda x: torch.where(x >= 0, x, x * slope.to(device=x.device, dtype=x.dtype))
        if kind == "gelu":
            approximate = self.param("approximate")
            return lambda x: F.gelu(x, approximate=approximate)
        if kind == "sigmoid":
            return torch.sigmoid
        if kind == "tanh":
            return torch.tanh
        if kind == "elu":
            alpha = self.alpha
            return lambda x: F.elu(x, alpha)
        alpha, gamma = self.param("alpha"), self.param("gamma")  # selu
        return lambda x: gamma * torch.where(x > 0, x, alpha * torch.expm1(x))

    def torch_module(self):
        """A ``torch.nn.Module`` running :meth:`torch_function` (a PReLU's slope as a buffer, not trained)."""
        from torch import nn

        activation = self

        class _ActivationModule(nn.Module):
            def __init__(self):
                super().__init__()
                self.function = activation.torch_function()

            def forward(self, x):
                return self.function(x)

            def extra_repr(self) -> str:
                return activation.name

        return _ActivationModule()


# --- construction ------------------------------------------------------------------------------------------


def make(kind: str, *, slope=None, **params) -> Activation:
    """An activation of ``kind`` (or ``relu6``'s alias ``clip`` with bounds 0, 6) with its ONNX defaults for
    parameters not given; floats are rounded to float32 as ONNX stores them."""
    if kind not in KINDS:
        raise ValueError(f"unknown activation kind '{kind}'; known: {', '.join(KINDS)}")
    if kind == "relu6":
        kind, params = "clip", {"min": 0.0, "max": 6.0, **params}
    defaults = _DEFAULTS.get(kind, ())
    unknown = set(params) - {name for name, _ in defaults}
    if unknown:
        raise ValueError(f"activation '{kind}' takes no parameter(s) {sorted(unknown)}")
    values = []
    for name, default in defaults:
        value = params.get(name, default)
        if name == "approximate":
            if value not in ("none", "tanh"):
                raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {value!r}")
            values.append((name, value))
        else:
            values.append((name, _f32(default if value is None else value)))
    if kind == "clip" and tuple(v for _, v in values) == (0.0, 6.0):
        kind = "relu6"
    array = None
    if kind == "prelu":
        if slope is None:
            raise ValueError("prelu needs its slope")
        array = np.array(slope, dtype=np.float32)  # a fresh copy, so nobody else can change it
        if array.size == 0:
            raise ValueError("prelu slope is empty")
        array.setflags(write=False)
    elif slope is not None:
        raise ValueError(f"activation '{kind}' has no slope")
    return Activation(kind, tuple(values), array)


def relu() -> Activation:
    return make("relu")


def clip(low: float = -math.inf, high: float = math.inf) -> Activation:
    return make("clip", min=low, max=high)


def relu6() -> Activation:
    return make("relu6")


def hardswish() -> Activation:
    return make("hardswish")


def hardsigmoid(alpha: float = 0.2, beta: float = 0.5) -> Activation:
    return make("hardsigmoid", alpha=alpha, beta=beta)


def silu() -> Activation:
    return make("silu")


def leaky_relu(alpha: float = 0.01) -> Activation:
    return make("leaky_relu", alpha=alpha)


def prelu(slope) -> Activation:
    return make("prelu", slope=slope)


def gelu(approximate: str = "none") -> Activation:
    return make("gelu", approximate=approximate)


def sigmoid() -> Activation:
    return make("sigmoid")


def tanh() -> Activation:
    return make("tanh")


def elu(alpha: float = 1.0) -> Activation:
    return make("elu", alpha=alpha)


def selu(alpha: float = _SELU_ALPHA, gamma: float = _SELU_GAMMA) -> Activation:
    return make("selu", alpha=alpha, gamma=gamma)


_NAME = re.compile(r"^\s*([a-z_0-9]+)\s*(?:\(([^()]*)\))?\s*(?:\[([0-9,\s]*)\])?\s*$")


def parse(text: str) -> Activation:
    """The activation a :attr:`Activation.name` names (also the kinds and :data:`ALIASES`, e.g. ``relu6``,
    ``leaky_relu``). A ``prelu[shape]`` gets a slope of that shape, all 0.25 (torch's initial slope):
    enough to measure its latency."""
    text = ALIASES.get(text.strip(), text)
    found = _NAME.match(text)
    if found is None:
        raise ValueError(f"cannot read activation name {text!r}")
    base, args, shape = found.groups()
    kind = {"leakyrelu": "leaky_relu"}.get(base, base)
    if kind not in KINDS:
        raise ValueError(f"unknown activation '{text}'")
    if kind == "prelu":
        dims = tuple(int(d) for d in shape.split(",") if d.strip()) if shape else (1,)
        if args:
            raise ValueError(f"prelu takes its shape in brackets, as in prelu[16,1,1], not {text!r}")
        return make("prelu", slope=np.full(dims, 0.25, dtype=np.float32))
    if shape is not None:
        raise ValueError(f"only prelu takes a shape, not {text!r}")
    values = [a.strip() for a in args.split(",")] if args else []
    names = [name for name, _ in _DEFAULTS.get(kind, ())]
    if kind == "relu6" and values:
        raise ValueError(f"relu6 takes no parameters: {text!r}")
    if len(values) > len(names):
        raise ValueError(f"activation '{kind}' takes at most {len(names)} parameter(s): {text!r}")
    try:
        params = {name: (value if name == "approximate" else float(value)) for name, value in zip(names, values)}
        return make(kind, **params)
    except ValueError as exc:
        raise ValueError(f"cannot read activation name {text!r}: {exc}") from None


def from_op(op: str, attrs: Mapping[str, Any], inputs: Sequence[np.ndarray | None] = (),
            domain: str = "") -> Activation | None:
    """The activation one ONNX node computes, from its op, attributes and the values of its inputs after the
    first (None where omitted); None when it is no activation of the table."""
    if domain == "com.microsoft" and op == "Gelu":
        return make("gelu")
    if domain not in ("", "ai.onnx") or op not in SINGLE_OPS:
        return None
    kind = SINGLE_OPS[op]
    inputs = list(inputs)
    try:
        if op == "Clip":
            if "min" in attrs or "max" in attrs or not any(v is not None for v in inputs[:2]):
                bounds = [attrs.get("min"), attrs.get("max")]  # opset < 11 (or no bounds at all)
            else:
                bounds = (inputs + [None, None])[:2]
            if any(b is not None and np.size(b) != 1 for b in bounds):
                return None
            return make("clip", min=bounds[0], max=bounds[1])
        if op == "PRelu":
            if not inputs or inputs[0] is None:
                return None
            return make("prelu", slope=inputs[0])
        names = {name for name, _ in _DEFAULTS.get(kind, ())}
        params = {name: (value.decode() if isinstance(value, bytes) else value)
                  for name, value in attrs.items() if name in names}
        return make(kind, **params)
    except (ValueError, TypeError):
        return None


def clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """(min, max) of a Clip, from its attributes (opset < 11) or inputs (opset >= 11), -inf/+inf for a bound
    it omits; None when a bound is not a constant scalar."""
    if "min" in node.attrs or "max" in node.attrs or len(node.inputs) < 2:
        bounds = [node.attrs.get("min"), node.attrs.get("max")]
    else:
        bounds = []
        for tensor in (list(node.inputs[1:3]) + [None])[:2]:
            value = None if tensor is None or is_omitted(tensor) else constant_value(tensor)
            if value is None and tensor is not None and not is_omitted(tensor):
                return None
            bounds.append(value)
    if any(b is not None and np.size(b) != 1 for b in bounds):
        return None
    low, high = (_f32(b) if b is not None else default for b, default in zip(bounds, (-math.inf, math.inf)))
    return low, high


def from_node(node: gs.Node) -> Activation | None:
    """The activation a single graph node computes (its parameter inputs must be constants), located at it."""
    if node.op not in SINGLE_OPS or not node.inputs or not node.outputs:
        return None
    if node.op == "Clip":
        bounds = clip_bounds(node)
        found = None if bounds is None else make("clip", min=bounds[0], max=bounds[1])
    else:
        values = []
        for tensor in node.inputs[1:]:
            value = None if is_omitted(tensor) else constant_value(tensor)
            if value is None and not is_omitted(tensor):
                return None
            values.append(value)
        found = from_op(node.op, node.attrs, values, node.domain or "")
    return found.located([node.name], node.outputs[0].name, node.op) if found is not None else None


# --- multi-node forms: expression patterns -------------------------------------------------------------------


@dataclass(frozen=True)
class _Op:
    """An op in a pattern: args are _Op, X (the activation's input) or a float constant; attrs are
    (name, value, ONNX default) that must match (floats to 1e-4 relative)."""

    op: str
    args: tuple
    attrs: tuple[tuple[str, Any, Any], ...] = ()


class _Input:
    """The activation's input in a pattern."""

    def __repr__(self) -> str:
        return "x"


X = _Input()
_SQRT2, _HALF_SQRT2 = math.sqrt(2.0), math.sqrt(0.5)
_GELU_BETA, _GELU_KAPPA = math.sqrt(2.0 / math.pi), 0.044715
_COMMUTATIVE = frozenset({"Mul", "Add"})


def _op(op: str, *args, **attrs) -> _Op:
    defaults = {"HardSigmoid": {"alpha": 0.2, "beta": 0.5}}.get(op, {})
    return _Op(op, args, tuple((name, value, defaults.get(name)) for name, value in attrs.items()))


def _halved(body: _Op, gate: _Op) -> list[_Op]:
    """``0.5 * body * gate`` where body is x: the 0.5 applied last, to x first, or to the gate."""
    return [_op("Mul", _op("Mul", body, gate), 0.5), _op("Mul", _op("Mul", body, 0.5), gate),
            _op("Mul", body, _op("Mul", gate, 0.5))]


def _gelu_erf_patterns() -> list[_Op]:
    patterns = []
    for scaled in (_op("Div", X, _SQRT2), _op("Mul", X, _HALF_SQRT2)):
        patterns += _halved(X, _op("Add", _op("Erf", scaled), 1.0))
    return patterns


def _gelu_tanh_patterns() -> list[_Op]:
    patterns = []
    for cube in (_op("Mul", X, _op("Mul", X, X)), _op("Pow", X, 3.0)):
        inner = _op("Mul", _op("Add", X, _op("Mul", cube, _GELU_KAPPA)), _GELU_BETA)
        patterns += _halved(X, _op("Add", _op("Tanh", inner), 1.0))
    return patterns


# (activation, form, pattern); the first pattern of an activation is the form it is emitted in when no
# single op exists at the target opset.
_PATTERNS: list[tuple[Activation, str, _Op]] = [
    (make("silu"), "Sigmoid*x", _op("Mul", X, _op("Sigmoid", X))),
    (make("hardswish"), "HardSigmoid*x", _op("Mul", X, _op("HardSigmoid", X, alpha=1 / 6, beta=0.5))),
    *[(make("gelu"), "erf", pattern) for pattern in _gelu_erf_patterns()],
    *[(make("gelu", approximate="tanh"), "tanh", pattern) for pattern in _gelu_tanh_patterns()],
]


def _ops_and_depth(pattern) -> tuple[set[str], int]:
    if not isinstance(pattern, _Op):
        return set(), 0
    ops, depth = {pattern.op}, 0
    for arg in pattern.args:
        inner, inner_depth = _ops_and_depth(arg)
        ops |= inner
        depth = max(depth, inner_depth)
    return ops, depth + 1


_PATTERN_OPS = frozenset().union(*(_ops_and_depth(p)[0] for _, _, p in _PATTERNS))
_PATTERN_DEPTH = max(_ops_and_depth(p)[1] for _, _, p in _PATTERNS)  # longest input-to-output path


def _close(value: float, expected: float, rel: float) -> bool:
    return math.isclose(value, expected, rel_tol=rel, abs_tol=0.0)


def _matches(pattern, tensor: gs.Tensor, x: gs.Tensor, found: list[gs.Node]) -> bool:
    """Whether ``tensor`` computes ``pattern`` of ``x``; appends the matched nodes, inputs before readers."""
    if pattern is X:
        return tensor is x
    if isinstance(pattern, float):
        value = constant_value(tensor)
        return value is not None and value.size == 1 and _close(float(value.reshape(-1)[0]), pattern, 1e-6)
    node = producer(tensor)
    if node is None or node.op != pattern.op or len(node.inputs) != len(pattern.args) or (node.domain or "") \
            not in ("", "ai.onnx"):
        return False
    for name, value, default in pattern.attrs:
        if not _close(float(node.attrs.get(name, default)), value, 1e-4):
            return False
    orders = [pattern.args]
    if pattern.op in _COMMUTATIVE:
        orders.append(pattern.args[::-1])
    for args in orders:
        mark = len(found)
        if all(_matches(arg, t, x, found) for arg, t in zip(args, node.inputs)):
            found.append(node)
            return True
        del found[mark:]
    return False


class Match(NamedTuple):
    """An activation recognised in a graph: the value, the nodes it spans (inputs first), the tensor it writes."""

    activation: Activation
    nodes: list[gs.Node]
    output: gs.Tensor


def _readers(tensor: gs.Tensor) -> list[gs.Node]:
    return list({id(node): node for node in tensor.outputs}.values())


def match_after(graph: gs.Graph, x: gs.Tensor) -> Match | None:
    """The activation reading ``x`` when nothing else reads ``x`` or any value inside it (what can be removed
    as a whole, or fused into x's producer); None if there is none. ``x`` must not be a graph output."""
    if is_graph_output(graph, x):
        return None
    readers = _readers(x)
    if len(readers) == 1:
        node = readers[0]
        if node.inputs and node.inputs[0] is x and all(t is not x for t in node.inputs[1:]):
            found = from_node(node)
            if found is not None:
                return Match(found, [node], node.outputs[0])
    if not readers or any(node.op not in _PATTERN_OPS for node in readers):
        return None
    candidates, frontier, seen = [], list(readers), {id(node) for node in readers}
    for _ in range(_PATTERN_DEPTH):
        candidates += frontier
        following = []
        for node in frontier:
            for out in node.outputs:
                for reader in out.outputs:
                    if id(reader) not in seen and reader.op in _PATTERN_OPS:
                        seen.add(id(reader))
                        following.append(reader)
        frontier = following
    for activation, form, pattern in _PATTERNS:
        for root in candidates:
            if root.op != pattern.op or len(root.outputs) != 1:
                continue
            found: list[gs.Node] = []
            if _matches(pattern, root.outputs[0], x, found) and _closed(graph, x, found, root):
                matched = {id(node): node for node in found}
                order = {id(node): index for index, node in enumerate(graph.nodes) if id(node) in matched}
                nodes = sorted(matched.values(), key=lambda node: order.get(id(node), -1))  # graph order
                return Match(activation.located([n.name for n in nodes], root.outputs[0].name, form), nodes,
                             root.outputs[0])
    return None


def _closed(graph: gs.Graph, x: gs.Tensor, nodes: list[gs.Node], root: gs.Node) -> bool:
    """Nothing outside the matched nodes reads x or a value computed inside them (but the root's output)."""
    inside = {id(node) for node in nodes}
    if any(id(reader) not in inside for reader in x.outputs):
        return False
    for node in nodes:
        if node is root:
            continue
        for out in node.outputs:
            if is_graph_output(graph, out) or any(id(reader) not in inside for reader in out.outputs):
                return False
    return True


def after(graph: gs.Graph, x: gs.Tensor) -> Activation | None:
    """The activation :func:`match_after` finds reading ``x`` (e.g. a Conv's output), located at its nodes."""
    found = match_after(graph, x)
    return found.activation if found is not None else None


# --- emission steps ------------------------------------------------------------------------------------------


class _Step(NamedTuple):
    op: str
    inputs: list  # "x", a local tensor name, a constant array, or None (omitted optional input)
    output: str  # "y" for the activation's output
    attrs: dict


def _steps(activation: Activation, opset: int, dtype: np.dtype) -> list[_Step]:
    """The nodes computing the activation at ``opset``, in order, with constants of ``dtype``."""
    kind = activation.kind

    def const(value) -> np.ndarray:
        return np.array(value, dtype=dtype)

    if kind in ("relu6", "clip"):
        low, high = activation.bounds
        if opset < 11:
            attrs = {key: value for key, value in (("min", low), ("max", high)) if not math.isinf(value)}
            return [_Step("Clip", ["x"], "y", attrs)]
        inputs = ["x", None if math.isinf(low) else const(low), None if math.isinf(high) else const(high)]
        while inputs[-1] is None:
            inputs.pop()
        return [_Step("Clip", inputs, "y", {})]
    if kind == "prelu":
        return [_Step("PRelu", ["x", activation.slope.astype(dtype)], "y", {})]
    single = {"hardswish": 14, "gelu": 20}.get(kind, 6 if kind in _KIND_OP else None)  # opset of the op
    if single is not None and opset >= single:
        op = _KIND_OP[kind]
        attrs = {name: value for name, value in activation.params
                 if not (kind == "gelu" and value == "none")}
        return [_Step(op, ["x"], "y", attrs)]
    pattern = next(p for a, _, p in _PATTERNS if a == activation)
    steps: list[_Step] = []

    def emit(node) -> Any:
        if node is X:
            return "x"
        if isinstance(node, float):
            return const(node)
        inputs = [emit(arg) for arg in node.args]
        name = f"t{len(steps)}"
        steps.append(_Step(node.op, inputs, name, {key: value for key, value, _ in node.attrs}))
        return name

    emit(pattern)
    last = steps[-1]
    steps[-1] = last._replace(output="y")
    return steps
