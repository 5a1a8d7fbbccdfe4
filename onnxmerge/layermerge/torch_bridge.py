"""ONNX graph → torch module and trained weights back, so accuracy recovery can use autograd on the model ORT runs.

There is no converter to depend on (onnx2torch pulls in torchvision and a CUDA torch), and exported CNNs use
a small op set, so each op is run with the torch function that reproduces ONNX Runtime to float32 precision.
Conv/ConvTranspose/Gemm/MatMul weights and biases become parameters (what a depth-compressed net re-learns);
every other tensor (BN statistics, shapes, Resize scales) is a buffer, and ``write_back`` changes nothing but
the parameters' initializers.

A batch-B export (B a fixed positive dim 0 of the graph inputs) often bakes B into shape arguments: the legacy
exporter writes ``x.view(1, -1)`` and ``x.view(x.size(0), -1)`` alike as Reshape(x, [1, -1]), and Expand or
Resize targets as [1, C, H, W]. Training needs other batch sizes, so the module runs such an argument with
the running batch instead, where that is provably the export batch and nothing else: the argument is a
constant (it depends on no graph input), its entry for the data's axis 0 equals B, and the data's axis 0 is
the graph inputs' batch axis (traced from the inputs through ops that keep axis 0 as it is). At batch B the
module computes exactly what the graph computes; the ONNX itself (and what ``write_back`` writes) keeps the
shapes the user exported.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from onnxmerge import activations
from onnxmerge.activations import Activation
from onnxmerge.canonical import graph_inputs, is_dynamic_dim
from onnxmerge.dataset import fixed_batch
from onnxmerge.errors import BadInputError
from onnxmerge.graph import constant_value, import_graph
from onnxmerge.io import io_signature, load_model
from onnxmerge.stats import shape_facts

TRAINABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class _Node:
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict
    opset: int
    activation: Activation | None = None  # an activation of the table whose parameters are constants
    batch: int | None = None  # the export batch, baked into this node's shape argument: run with the real one


_OPS: dict[str, Callable] = {}


def _op(*names: str):
    def register(fn):
        for name in names:
            _OPS[name] = fn
        return fn
    return register


class OnnxModule(nn.Module):
    """Runs an ONNX graph's nodes in topological order with torch ops; ``forward`` takes the graph inputs
    (positionally in graph order, or by name) and returns the graph outputs (a tuple when there are several)."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        proto = load_model(model).proto
        graph = proto.graph
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
        unsupported = sorted({label for node in graph.node if (label := _unsupported(node))})
        if unsupported:
            raise BadInputError(f"cannot train this model in torch: unsupported op(s) {', '.join(unsupported)}; "
                                "pass recover=False to skip accuracy recovery")
        self.input_names = [name for name, _, _ in io_signature(proto)["inputs"]]
        self.output_names = [value.name for value in graph.output]
        self._nodes = [_Node(n.op_type, tuple(n.input), tuple(n.output),
                             {a.name: _attribute(a) for a in n.attribute}, opset)
                       for n in _toposort(graph) if n.op_type != "Constant"]
        self._slots: dict[str, str] = {}  # ONNX tensor name -> attribute holding it
        self.onnx_names: dict[str, str] = {}  # parameter name -> initializer name, for write_back
        trainable = _trainable_initializers(graph)
        for tensor in graph.initializer:
            value = torch.from_numpy(np.array(numpy_helper.to_array(tensor)))
            if tensor.name in trainable and value.is_floating_point():
                self._add(tensor.name, nn.Parameter(value))
            else:
                self._add(tensor.name, value)
        constants = [node for node in graph.node if node.op_type == "Constant"]
        if constants:
            tensors = import_graph(proto).tensors()
            for node in constants:
                self._add(node.output[0], torch.from_numpy(np.array(constant_value(tensors[node.output[0]]))))
        self._nodes = [self._with_activation(node) for node in self._nodes]
        self.export_batch = fixed_batch(proto)  # dataset's rule: the first input's static dim 0
        if self.export_batch is not None:
            rewrites = _batch_rewrites(proto, self._nodes, self._constant_values(), self.export_batch)
            self._nodes = [replace(node, batch=self.export_batch) if index in rewrites else node
                           for index, node in enumerate(self._nodes)]
        # ONNX names of the nodes whose export batch is replaced by the running one (for reports and tests)
        self.batch_generalised = [node.outputs[0] for node in self._nodes if node.batch is not None]

    def _constant_values(self) -> dict[str, torch.Tensor]:
        """Every small tensor that depends on no graph input and no parameter (shape arguments, pads, scales):
        the buffers, and what the nodes computing only from them compute (evaluated once, here)."""
        values = {name: getattr(self, slot) for name, slot in self._slots.items()
                  if not isinstance(getattr(self, slot), nn.Parameter)}
        with torch.no_grad():
            for node in self._nodes:
                inputs = [values.get(name) if name else None for name in node.inputs]
                if any(name and value is None for name, value in zip(node.inputs, inputs)):
                    continue
                if sum(value.numel() for value in inputs if value is not None) > _CONSTANT_NUMEL:
                    continue
                try:
                    result = _OPS[node.op](node, *inputs)
                except Exception:  # noqa: BLE001 - a constant this cannot evaluate just stays unknown
                    continue
                values.update(zip(node.outputs, result if isinstance(result, tuple) else (result,)))
        return values

    def _with_activation(self, node: _Node) -> _Node:
        """The node with its table activation resolved once, when its parameter inputs are constants."""
        if node.op not in activations.SINGLE_OPS:
            return node
        values = []
        for name in node.inputs[1:]:
            if name and name not in self._slots:
                return node  # a parameter computed at run time: resolved on every call instead
            values.append(getattr(self, self._slots[name]).detach().cpu().numpy() if name else None)
        return replace(node, activation=activations.from_op(node.op, node.attrs, values))

    def _add(self, onnx_name: str, value: torch.Tensor) -> None:
        slot = base = "t_" + re.sub(r"\W", "_", onnx_name)
        index = 0
        while hasattr(self, slot):  # two ONNX names can sanitise alike
            index += 1
            slot = f"{base}_{index}"
        if isinstance(value, nn.Parameter):
            self.register_parameter(slot, value)
            self.onnx_names[slot] = onnx_name
        else:
            self.register_buffer(slot, value)
        self._slots[onnx_name] = slot

    def named_onnx_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(initializer name, parameter) pairs: what training changes and write_back stores."""
        for slot, onnx_name in self.onnx_names.items():
            yield onnx_name, getattr(self, slot)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor):
        if len(args) > len(self.input_names):
            raise BadInputError(f"the module takes inputs {self.input_names} ({len(args)} given by position)")
        values = self.run(dict(zip(self.input_names, args)) | kwargs)
        outputs = tuple(values[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

    def run(self, inputs: dict[str, torch.Tensor], capture: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """The graph outputs and the ``capture`` tensors (any intermediate tensor names), by name.

        Distillation matches intermediate feature maps of student and teacher, which ``forward`` (graph outputs
        only, as an ONNX session would give) cannot return; only what is asked for is kept, so the other
        intermediates are freed as usual when the call returns."""
        env = {name: getattr(self, slot) for name, slot in self._slots.items()}
        env.update(inputs)
        missing = [name for name in self.input_names if name not in env]
        if missing:
            raise BadInputError(f"the module takes inputs {self.input_names} (missing {missing})")
        unknown = sorted(set(capture) - set(env) - {name for node in self._nodes for name in node.outputs})
        if unknown:
            raise BadInputError(f"cannot capture {unknown}: no tensor of that name in the graph")
        for node in self._nodes:
            try:
                result = _OPS[node.op](node, *[env[name] if name else None for name in node.inputs])
            except RuntimeError as exc:  # name the node: a shape error alone does not say where
                raise RuntimeError(f"{node.op} '{node.outputs[0]}': {str(exc).strip()}") from exc
            env.update(zip(node.outputs, result if isinstance(result, tuple) else (result,)))
        return {name: env[name] for name in (*self.output_names, *capture)}


def write_back(model: onnx.ModelProto, module: OnnxModule) -> onnx.ModelProto:
    """A copy of ``model`` with each parameter's current value in its initializer; names, dtypes, shapes,
    storage layout and everything else stay as they were."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    tensors = {tensor.name: tensor for tensor in result.graph.initializer}
    for name, param in module.named_onnx_parameters():
        tensor = tensors.get(name)
        if tensor is None or tuple(tensor.dims) != tuple(param.shape):
            raise BadInputError(f"parameter '{name}' has no initializer of shape {list(param.shape)} in the model; "
                                "write_back needs the model the module was built from")
        array = param.detach().cpu().numpy().astype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        if tensor.HasField("raw_data"):
            fresh = numpy_helper.from_array(array, tensor.name)
        else:  # the exporter used typed fields (float_data, ...): keep that layout
            fresh = helper.make_tensor(tensor.name, tensor.data_type, array.shape, array.ravel())
        if tensor.HasField("doc_string"):
            fresh.doc_string = tensor.doc_string
        fresh.metadata_props.extend(tensor.metadata_props)
        tensor.CopyFrom(fresh)
    return result


def _attribute(attribute: onnx.AttributeProto):
    value = helper.get_attribute_value(attribute)
    return value.decode() if isinstance(value, bytes) else value


def _unsupported(node: onnx.NodeProto) -> str | None:
    """The op as named in the refusal, or None when this node can be run in torch."""
    attrs = {a.name: _attribute(a) for a in node.attribute}
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"{node.domain}.{op}"
    if op == "Constant":
        return None if {a.name for a in node.attribute} & {"value", "value_float", "value_floats", "value_int",
                                                          "value_ints"} else "Constant(sparse or string)"
    if op not in _OPS:
        return op
    extra_output = len(node.output) > 1 and any(node.output[1:])
    if op == "ConvTranspose" and ("output_shape" in attrs or attrs.get("auto_pad", "NOTSET") != "NOTSET"):
        return "ConvTranspose(output_shape/auto_pad)"
    if op == "MaxPool" and extra_output:
        return "MaxPool(Indices)"
    if op == "AveragePool" and any(d != 1 for d in attrs.get("dilations", [])):
        return "AveragePool(dilations)"
    if op == "BatchNormalization" and (attrs.get("training_mode", 0) or extra_output):
        return "BatchNormalization(training_mode)"
    if op == "Pad" and attrs.get("mode", "constant") != "constant":
        return f"Pad(mode={attrs['mode']})"
    if op == "Resize":
        if attrs.get("mode", "nearest") not in ("nearest", "linear"):
            return f"Resize(mode={attrs['mode']})"
        transform = attrs.get("coordinate_transformation_mode", "half_pixel")
        if transform not in _RESIZE_TRANSFORMS:
            return f"Resize({transform})"
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if attrs.get("antialias", 0) or "axes" in attrs or policy != "stretch":
            return "Resize(antialias/axes/keep_aspect_ratio_policy)"
    return None


def _toposort(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is computed first (one pass for an already sorted graph)."""
    available = {""} | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            missing = sorted({name for node in waiting for name in node.input if name not in available})
            raise BadInputError(f"the graph reads tensors no node produces (or has a cycle): {missing[:5]}")
        pending = waiting
    return ordered


def _trainable_initializers(graph: onnx.GraphProto) -> set[str]:
    """Initializers feeding a TRAINABLE_OPS node, also through the Identity nodes exporters put in between."""
    identity_source = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    names = set()
    for node in graph.node:
        if node.op_type in TRAINABLE_OPS:
            for name in node.input:
                while name in identity_source:
                    name = identity_source[name]
                names.add(name)
    return names & {t.name for t in graph.initializer}


# ---- a batch baked into shape arguments ------------------------------------------------------------------------

_CONSTANT_NUMEL = 4096  # shape arguments are tiny; bigger all-constant subgraphs are not evaluated ahead
# Ops whose first output keeps the first input's axis 0 (elementwise in it, or acting on the other axes).
_ROW_OPS = frozenset({"Conv", "ConvTranspose", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
                      "GlobalMaxPool", "Cast", "Identity", "Dropout", "Erf", "Sqrt", "Softmax",
                      *activations.SINGLE_OPS})
_BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Equal", "Where"})
_FULL_SLICE = 2 ** 31 - 1  # an end at least this large takes the whole axis (exporters write INT64_MAX)


def _export_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Tensor shapes at the exported input shapes, as far as ONNX shape inference finds them (None: unknown);
    the shared, weight-free inference of :func:`onnxmerge.stats.shape_facts`."""
    facts = shape_facts(proto, None)
    shapes = {name: tuple(d if isinstance(d, int) else None for d in dims) for name, dims in facts.partial.items()}
    shapes.update(facts.static)
    return shapes


def _batch_rewrites(proto: onnx.ModelProto, nodes: list[_Node], values: dict[str, torch.Tensor],
                    batch: int) -> set[int]:
    """Indices of the nodes (Reshape, Expand, Resize sizes) whose constant shape argument holds the export
    batch ``batch`` for a data input whose axis 0 is the graph inputs' batch axis.

    ``batched`` is traced from the graph inputs exported with dim 0 = ``batch`` (calibration feeds every input
    N rows) through the ops that keep axis 0 where it is; any op or argument the rules do not prove keeps the
    batch ends the trace there, so nothing downstream of it is rewritten.
    """
    shapes = _export_shapes(proto)
    shapes.update({name: tuple(value.shape) for name, value in values.items()})
    batched = set()
    for value in graph_inputs(proto):
        dims = value.type.tensor_type.shape.dim
        if dims and not is_dynamic_dim(dims[0]) and dims[0].dim_value == batch:
            batched.add(value.name)
    rewrites = set()
    for index, node in enumerate(nodes):
        keeps, rewrite = _keeps_batch(node, batched, shapes, values, batch)
        if rewrite:
            rewrites.add(index)
        if keeps:
            batched.update(name for name in node.outputs if name)
    return rewrites


def _ints(values: dict[str, torch.Tensor], name: str) -> list[int] | None:
    value = values.get(name) if name else None
    if value is None or value.is_floating_point() or value.dim() > 1:
        return None
    return [int(v) for v in value.reshape(-1).tolist()]


def _node_axes(node: _Node, values: dict[str, torch.Tensor], position: int) -> list[int] | None:
    """A node's axes from its attribute, or from its constant input at ``position``; None when unknown."""
    if "axes" in node.attrs:
        return list(node.attrs["axes"])
    if len(node.inputs) > position and node.inputs[position]:
        return _ints(values, node.inputs[position])
    return None


def _keeps_batch(node: _Node, batched: set[str], shapes: dict, values: dict[str, torch.Tensor],
                 batch: int) -> tuple[bool, bool]:
    """(the outputs' axis 0 is the batch axis, the node's shape argument is to take the running batch)."""
    op, inputs, attrs = node.op, node.inputs, node.attrs
    rank = {name: len(shapes[name]) for name in inputs if name in shapes}

    def axis_zero(axes: list[int] | None, rank_: int | None) -> bool | None:
        """Whether axis 0 is among ``axes`` (None: unknown, as a negative axis needs the rank)."""
        if axes is None or (any(a < 0 for a in axes) and rank_ is None):
            return None
        return any(a % rank_ == 0 if a < 0 else a == 0 for a in axes)

    if op in _BROADCAST_OPS:  # the output's axis 0 is a batched input's when no other input outranks it
        present = [name for name in inputs if name]
        for name in present:
            if name not in batched or name not in rank:
                continue
            others = [other for other in present if other != name]
            if all(other in rank and (rank[other] < rank[name] or other in batched or
                                      (rank[other] == rank[name] and shapes[other][0] == 1)) for other in others):
                return True, False
        return False, False
    x = inputs[0] if inputs else ""
    if op == "Gather" and attrs.get("axis", 0) == 0 and len(inputs) > 1 and inputs[1] in batched:
        return rank.get(inputs[1], 0) >= 1, False  # a lookup of batched indices (an embedding)
    if x not in batched:
        return False, False
    x_rank = rank.get(x)
    if op in _ROW_OPS:
        return True, False
    if op == "Reshape":
        target = _ints(values, inputs[1])
        if not target:
            return False, False
        if target[0] == batch:
            return True, True
        if target[0] == 0 and not attrs.get("allowzero", 0):
            return True, False
        out = shapes.get(node.outputs[0])
        return target[0] == -1 and bool(out) and out[0] == batch, False
    if op == "Expand":  # the target entry aligned with the data's axis 0 (targets align from the right)
        target = _ints(values, inputs[1])
        if target is None or x_rank is None or len(target) < x_rank:
            return False, False
        aligned = len(target) - x_rank
        if target[aligned] == batch:
            return aligned == 0, True
        return aligned == 0 and target[aligned] == 1, False
    if op == "Resize":
        sizes = _ints(values, inputs[3]) if len(inputs) > 3 and inputs[3] else None
        if sizes:
            return sizes[0] == batch, sizes[0] == batch
        scales_name = inputs[1] if node.opset < 11 else (inputs[2] if len(inputs) > 2 else "")
        scales = values.get(scales_name) if scales_name else None
        return scales is not None and scales.numel() > 0 and float(scales.reshape(-1)[0]) == 1.0, False
    if op == "Flatten":
        axis = attrs.get("axis", 1)
        return axis == 1 or (axis < 0 and x_rank is not None and axis + x_rank == 1), False
    if op == "Transpose":
        perm = attrs.get("perm")
        return (perm[0] == 0) if perm else x_rank == 1, False
    if op == "Squeeze":
        return axis_zero(_node_axes(node, values, 1), x_rank) is False, False
    if op == "Unsqueeze":
        axes = _node_axes(node, values, 1)
        out_rank = None if x_rank is None or axes is None else x_rank + len(axes)
        return axis_zero(axes, out_rank) is False, False
    if op in ("Concat", "Split", "Gather"):
        axis = attrs.get("axis", 0)
        return axis_zero([axis], x_rank if op != "Concat" else max(rank.values(), default=None)) is False, False
    if op == "Tile":
        repeats = _ints(values, inputs[1])
        return bool(repeats) and repeats[0] == 1, False
    if op == "Gemm":
        return not attrs.get("transA", 0), False
    if op == "MatMul":
        other = rank.get(inputs[1])
        return x_rank is not None and other is not None and 2 <= x_rank and other <= x_rank, False
    if op == "ReduceMean":
        axes = _node_axes(node, values, 1)
        if not axes:
            return bool(attrs.get("noop_with_empty_axes", 0)) and axes is not None, False
        return axis_zero(axes, x_rank) is False, False
    if op == "Pad":
        return _pad_keeps_batch(node, values, x_rank), False
    if op == "Slice":
        return _slice_keeps_batch(node, values, x_rank), False
    return False, False


def _pad_keeps_batch(node: _Node, values: dict[str, torch.Tensor], x_rank: int | None) -> bool:
    inputs = node.inputs
    pads = list(node.attrs["pads"]) if "pads" in node.attrs else _ints(values, inputs[1] if len(inputs) > 1 else "")
    if not pads:
        return False
    if len(inputs) > 3 and inputs[3]:
        axes = _ints(values, inputs[3])
        if axes is None or (x_rank is None and any(a < 0 for a in axes)):
            return False
        axes = [a % x_rank if a < 0 else a for a in axes]
    else:
        axes = list(range(len(pads) // 2))
    return all(pads[i] == 0 and pads[len(axes) + i] == 0 for i, axis in enumerate(axes) if axis == 0)


def _slice_keeps_batch(node: _Node, values: dict[str, torch.Tensor], x_rank: int | None) -> bool:
    """True when the slice leaves axis 0 whole (not sliced, or sliced from 0 to the end with step 1)."""
    if "starts" in node.attrs:  # opset < 10
        starts, ends, axes, steps = node.attrs["starts"], node.attrs["ends"], node.attrs.get("axes"), None
    else:
        inputs = list(node.inputs) + [""] * (5 - len(node.inputs))
        starts, ends = _ints(values, inputs[1]), _ints(values, inputs[2])
        axes = _ints(values, inputs[3]) if inputs[3] else None
        steps = _ints(values, inputs[4]) if inputs[4] else None
        if starts is None or ends is None or (inputs[3] and axes is None) or (inputs[4] and steps is None):
            return False
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if axis < 0 and x_rank is None:
            return False
        if (axis % x_rank if axis < 0 else axis) == 0 and not (start == 0 and step == 1 and end >= _FULL_SLICE):
            return False
    return True


# ---- padding shared by Conv and the pools -------------------------------------------------------------------

def _explicit_pads(attrs: dict, spatial: tuple[int, ...], kernel: list[int], strides: list[int],
                   dilations: list[int]) -> list[int]:
    """ONNX pads [begins..., ends...], with auto_pad SAME_UPPER/SAME_LOWER resolved for this input size."""
    rank = len(spatial)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return [0] * (2 * rank)
    if auto_pad == "NOTSET":
        return list(attrs.get("pads", [0] * (2 * rank)))
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins + ends


def _torch_pad_order(pads: list[int]) -> list[int]:
    """ONNX [b0, b1, .., e0, e1, ..] → F.pad's (b_last, e_last, .., b0, e0)."""
    rank = len(pads) // 2
    return [p for axis in reversed(range(rank)) for p in (pads[axis], pads[axis + rank])]


def _pool_geometry(node: _Node, x: torch.Tensor):
    a = node.attrs
    kernel = list(a["kernel_shape"])
    rank = len(kernel)
    strides = list(a.get("strides", [1] * rank))
    dilations = list(a.get("dilations", [1] * rank))
    return kernel, strides, dilations, _explicit_pads(a, tuple(x.shape[2:]), kernel, strides, dilations)


# ---- ops ----------------------------------------------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@_op("Conv")
def _conv(node, x, w, b=None):
    rank = w.dim() - 2
    strides = list(node.attrs.get("strides", [1] * rank))
    dilations = list(node.attrs.get("dilations", [1] * rank))
    pads = _explicit_pads(node.attrs, tuple(x.shape[2:]), list(w.shape[2:]), strides, dilations)
    padding = pads[:rank]
    if pads[:rank] != pads[rank:]:
        x, padding = F.pad(x, _torch_pad_order(pads)), 0
    return _CONV[rank](x, w, b, strides, padding, dilations, node.attrs.get("group", 1))


@_op("ConvTranspose")
def _conv_transpose(node, x, w, b=None):
    """Full transposed conv, then the pads cropped off: this covers asymmetric pads too."""
    rank = w.dim() - 2
    a = node.attrs
    strides = list(a.get("strides", [1] * rank))
    y = _CONV_T[rank](x, w, b, strides, 0, list(a.get("output_padding", [0] * rank)), a.get("group", 1),
                      list(a.get("dilations", [1] * rank)))
    pads = list(a.get("pads", [0] * (2 * rank)))
    index = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[rank + i]) for i in range(rank)]
    return y[tuple(index)]


@_op("Gemm")
def _gemm(node, a, b, c=None):
    attrs = node.attrs
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    y = a @ b
    if attrs.get("alpha", 1.0) != 1.0:
        y = y * attrs["alpha"]
    if c is not None:
        y = y + (c if attrs.get("beta", 1.0) == 1.0 else c * attrs["beta"])
    return y


@_op("MatMul")
def _matmul(node, a, b):
    return torch.matmul(a, b)


@_op("BatchNormalization")
def _batch_norm(node, x, scale, bias, mean, var):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attrs.get("epsilon", 1e-5))


@_op(*activations.SINGLE_OPS)
def _activation(node, x, *params):
    """Every single-op activation of the table (Relu, Clip, LeakyRelu, PRelu, Sigmoid, Tanh, HardSigmoid,
    HardSwish, Gelu, Elu, Selu) runs as onnxmerge.activations runs it in torch."""
    if node.op == "Clip" and not x.is_floating_point():  # an integer Clip (shape arithmetic) keeps its dtype
        low, high = (node.attrs.get("min"), node.attrs.get("max")) if not params else (list(params) + [None])[:2]
        return x if low is None and high is None else torch.clamp(x, low, high)
    activation = node.activation
    if activation is None:
        values = [None if p is None else p.detach().cpu().numpy() for p in params]
        activation = activations.from_op(node.op, node.attrs, values)
        if activation is None:
            raise BadInputError(f"cannot run {node.op} with attributes {node.attrs} and non-scalar parameters "
                                "in torch")
    return activation.torch_function()(x)


@_op("Erf")
def _erf(node, x):
    return torch.erf(x)


@_op("Sqrt")
def _sqrt(node, x):
    return torch.sqrt(x)


@_op("Add")
def _add(node, a, b):
    return a + b


@_op("Sub")
def _sub(node, a, b):
    return a - b


@_op("Mul")
def _mul(node, a, b):
    return a * b


@_op("Equal")
def _equal(node, a, b):
    return torch.eq(a, b)


@_op("Where")
def _where(node, condition, a, b):
    return torch.where(condition, a, b)


@_op("Div")
def _div(node, a, b):
    """Integer Div truncates in ONNX (C++ semantics), not floors as Python does."""
    return torch.div(a, b, rounding_mode=None if a.is_floating_point() else "trunc")


@_op("Pow")
def _pow(node, a, b):
    return torch.pow(a, b).to(a.dtype)


@_op("MaxPool")
def _max_pool(node, x):
    kernel, strides, dilations, pads = _pool_geometry(node, x)
    rank = len(kernel)
    ceil_mode = bool(node.attrs.get("ceil_mode", 0))
    padding = pads[:rank]
    if pads[:rank] != pads[rank:] or any(2 * p > k for p, k in zip(padding, kernel)):
        x, padding = F.pad(x, _torch_pad_order(pads), value=-math.inf), 0
    return _MAX_POOL[rank](x, kernel, strides, padding, dilations, ceil_mode)


@_op("AveragePool")
def _average_pool(node, x):
    """Zero-pad explicitly; without count_include_pad, divide by the pooled count of real (unpadded) cells."""
    kernel, strides, _, pads = _pool_geometry(node, x)
    rank = len(kernel)
    ceil_mode = bool(node.attrs.get("ceil_mode", 0))
    pool = _AVG_POOL[rank]
    if not any(pads):
        return pool(x, kernel, strides, 0, ceil_mode)
    order = _torch_pad_order(pads)
    y = pool(F.pad(x, order), kernel, strides, 0, ceil_mode)
    if node.attrs.get("count_include_pad", 0):
        return y
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    return y / pool(F.pad(ones, order), kernel, strides, 0, ceil_mode)


@_op("GlobalAveragePool")
def _global_average_pool(node, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("GlobalMaxPool")
def _global_max_pool(node, x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@_op("Flatten")
def _flatten(node, x):
    axis = node.attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


@_op("Reshape")
def _reshape(node, x, shape):
    keep_zero = node.attrs.get("allowzero", 0)
    dims = [x.shape[i] if d == 0 and not keep_zero else d for i, d in enumerate(shape.tolist())]
    if node.batch is not None and dims and dims[0] == node.batch:
        dims[0] = x.shape[0]
    return x.reshape(dims)


@_op("Expand")
def _expand(node, x, shape):
    """ONNX Expand broadcasts both ways (a target 1 keeps the input's dim), aligned from the right."""
    dims = [int(d) for d in shape.tolist()]
    aligned = len(dims) - x.dim()
    if node.batch is not None and aligned >= 0 and dims[aligned] == node.batch:
        dims[aligned] = x.shape[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(dims)))


@_op("Tile")
def _tile(node, x, repeats):
    return x.repeat(*[int(r) for r in repeats.tolist()])


@_op("ConstantOfShape")
def _constant_of_shape(node, shape):
    value = node.attrs.get("value")
    fill = np.asarray(numpy_helper.to_array(value)).reshape(-1)[:1] if value is not None else np.zeros(1, np.float32)
    return torch.from_numpy(fill.copy()).reshape(()).expand(tuple(int(d) for d in shape.tolist())).clone()


@_op("Transpose")
def _transpose(node, x):
    return x.permute(node.attrs.get("perm", list(reversed(range(x.dim())))))


def _axes(node: _Node, tensor: torch.Tensor | None) -> list[int] | None:
    """Axes from the input (newer opsets) or the attribute (older ones); None when neither is given."""
    if tensor is not None:
        return [int(v) for v in tensor.reshape(-1).tolist()]
    return list(node.attrs["axes"]) if "axes" in node.attrs else None


@_op("Squeeze")
def _squeeze(node, x, axes=None):
    axes = _axes(node, axes)
    if axes is None:
        return torch.squeeze(x)
    return torch.squeeze(x, tuple(a % x.dim() for a in axes))


@_op("Unsqueeze")
def _unsqueeze(node, x, axes=None):
    axes = _axes(node, axes)
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


@_op("Concat")
def _concat(node, *tensors):
    return torch.cat(tensors, dim=node.attrs["axis"])


@_op("Split")
def _split(node, x, split=None):
    axis = node.attrs.get("axis", 0)
    sizes = _axes(node, split) if split is not None else node.attrs.get("split")
    if sizes is None:  # equal parts; the last one smaller when the length does not divide (opset 18)
        parts = node.attrs.get("num_outputs", len(node.outputs))
        sizes = math.ceil(x.shape[axis] / parts)
    return tuple(torch.split(x, sizes, dim=axis))


@_op("Slice")
def _slice(node, x, starts=None, ends=None, axes=None, steps=None):
    if "starts" in node.attrs:  # opset < 10
        starts, ends, axes = node.attrs["starts"], node.attrs["ends"], node.attrs.get("axes")
        steps = None
    else:
        starts, ends, axes, steps = starts.tolist(), ends.tolist(), _axes(node, axes), _axes(node, steps)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        # Python's slice clamping is ONNX's (INT64_MAX ends, negative indices, negative steps).
        indices = range(x.shape[axis])[slice(start, end, step)]
        if step > 0:
            x = x[(slice(None),) * axis + (slice(indices.start, indices.stop, step),)]
        else:
            x = x.index_select(axis, torch.tensor(list(indices), dtype=torch.long))
    return x


@_op("Pad")
def _pad(node, x, pads=None, value=None, axes=None):
    pads = pads.tolist() if pads is not None else list(node.attrs["pads"])
    value = value.item() if value is not None and value.numel() else node.attrs.get("value", 0.0)
    axes = [a % x.dim() for a in _axes(node, axes)] if axes is not None else list(range(x.dim()))
    full = [0] * (2 * x.dim())
    for i, axis in enumerate(axes):
        full[axis], full[x.dim() + axis] = pads[i], pads[len(axes) + i]
    return F.pad(x, _torch_pad_order(full), value=value)


@_op("Shape")
def _shape(node, x):
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    return torch.tensor(x.shape[start:end], dtype=torch.int64)


@_op("Gather")
def _gather(node, x, indices):
    axis = node.attrs.get("axis", 0) % x.dim()
    flat = indices.reshape(-1).long()
    flat = torch.where(flat < 0, flat + x.shape[axis], flat)
    return x.index_select(axis, flat).reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1:]))


def _torch_dtype(onnx_type: int) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


@_op("Cast")
def _cast(node, x):
    return x.to(_torch_dtype(node.attrs["to"]))


@_op("Identity")
def _identity(node, x):
    return x


@_op("Dropout")
def _dropout(node, x, ratio=None, training_mode=None):
    return (x, torch.ones_like(x, dtype=torch.bool)) if len(node.outputs) > 1 else x


@_op("Softmax")
def _softmax(node, x):
    if node.opset >= 13:
        return F.softmax(x, dim=node.attrs.get("axis", -1))
    axis = node.attrs.get("axis", 1) % x.dim()  # before opset 13: softmax over the flattened trailing dims
    return F.softmax(x.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)


@_op("ReduceMean")
def _reduce_mean(node, x, axes=None):
    axes = _axes(node, axes)
    keepdims = bool(node.attrs.get("keepdims", 1))
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    return x.mean(dim=tuple(axes), keepdim=keepdims)


# ---- Resize: per-axis index maths in float32, as ORT does them -----------------------------------------------

_RESIZE_TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn",
                      "half_pixel_symmetric")

def _source_coordinates(mode: str, out_len: int, in_len: int, scale: float) -> np.ndarray:
    """Where each output cell samples the input, for an ONNX coordinate_transformation_mode."""
    x = np.arange(out_len, dtype=np.float32)
    scale, half = np.float32(scale), np.float32(0.5)
    if mode == "half_pixel":
        return (x + half) / scale - half
    if mode == "pytorch_half_pixel":
        return (x + half) / scale - half if out_len > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return x * np.float32(in_len - 1) / np.float32(out_len - 1) if out_len > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_half_pixel_for_nn":
        return (x + half) / scale
    adjustment = np.float32(out_len) / (scale * np.float32(in_len))  # half_pixel_symmetric
    offset = np.float32(in_len) / 2 * (1 - adjustment)
    return offset + (x + half) / scale - half


def _nearest(coords: np.ndarray, mode: str) -> np.ndarray:
    floor = np.floor(coords)
    if mode == "round_prefer_floor":
        return np.where(coords - floor == 0.5, floor, np.floor(coords + 0.5))
    if mode == "round_prefer_ceil":
        return np.floor(coords + 0.5)
    return np.ceil(coords) if mode == "ceil" else floor


@_op("Resize")
def _resize(node, x, roi=None, scales=None, sizes=None):
    a = node.attrs
    if node.opset < 11:  # Resize-10 takes (X, scales)
        roi, scales = None, roi
    transform = a.get("coordinate_transformation_mode", "half_pixel" if node.opset >= 11 else "asymmetric")
    if sizes is not None and sizes.numel():
        out_shape = [int(s) for s in sizes.tolist()]
        if node.batch is not None and out_shape[0] == node.batch:
            out_shape[0] = x.shape[0]
        factors = [np.float32(o) / np.float32(i) for o, i in zip(out_shape, x.shape)]
    else:
        factors = [np.float32(s) for s in scales.tolist()]
        out_shape = [int(f * np.float32(i)) for f, i in zip(factors, x.shape)]
    for axis, (in_len, out_len, factor) in enumerate(zip(x.shape, out_shape, factors)):
        if in_len == out_len and factor == 1:
            continue
        coords = _source_coordinates(transform, out_len, in_len, factor)
        if a.get("mode", "nearest") == "nearest":
            index = np.clip(_nearest(coords, a.get("nearest_mode", "round_prefer_floor")), 0, in_len - 1)
            x = x.index_select(axis, torch.from_numpy(index.astype(np.int64)))
            continue
        coords = np.clip(coords, 0, in_len - 1)
        low = np.floor(coords).astype(np.int64)
        high = np.minimum(low + 1, in_len - 1)
        shape = [1] * x.dim()
        shape[axis] = out_len
        weight = torch.from_numpy(coords - low).to(x.dtype).reshape(shape)
        x_low = x.index_select(axis, torch.from_numpy(low))
        x = x_low + (x.index_select(axis, torch.from_numpy(high)) - x_low) * weight
    return x
