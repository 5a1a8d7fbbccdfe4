"""ONNX graph → torch module and trained weights back, so accuracy recovery can use autograd on the model ORT runs.

There is no converter to depend on (onnx2torch pulls in torchvision and a CUDA torch), and exported CNNs use
a small op set, so each op is run with the torch function that reproduces ONNX Runtime to float32 precision.
Conv/ConvTranspose/Gemm/MatMul weights and biases become parameters (what a depth-compressed net re-learns);
every other tensor (BN statistics, shapes, Resize scales) is a buffer, and ``write_back`` changes nothing but
the parameters' initializers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from onnxmerge import activations
from onnxmerge.activations import Activation
from onnxmerge.errors import BadInputError
from onnxmerge.graph import constant_value, import_graph
from onnxmerge.io import io_signature, load_model

TRAINABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class _Node:
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict
    opset: int
    activation: Activation | None = None  # an activation of the table whose parameters are constants


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
        env = {name: getattr(self, slot) for name, slot in self._slots.items()}
        env.update(zip(self.input_names, args))
        env.update(kwargs)
        missing = [name for name in self.input_names if name not in env]
        if missing or len(args) > len(self.input_names):
            raise BadInputError(f"the module takes inputs {self.input_names} (missing {missing}, "
                                f"{len(args)} given by position)")
        for node in self._nodes:
            result = _OPS[node.op](node, *[env[name] if name else None for name in node.inputs])
            env.update(zip(node.outputs, result if isinstance(result, tuple) else (result,)))
        outputs = tuple(env[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


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
    return x.reshape(dims)


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
