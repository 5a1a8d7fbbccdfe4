"""Recompute BatchNormalization running statistics of a merged model from calibration data (REPAIR-style).

Averaged weights change the activations, so averaged running mean/var describe no real network. The BN
inputs are exposed as extra graph outputs and measured in ORT. In inference mode a BN normalizes with its
stored statistics, so a BN's input depends on every BN upstream: BNs are reset in order of depth (number of
BNs on the deepest path to them), each level measured with all shallower levels already reset. The result
is exactly the per-channel population mean and variance (ddof=0) of each BN's input over the data.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxmerge.dataset import Dataset, iter_batched
from onnxmerge.errors import BadInputError
from onnxmerge.runner import make_session

FOLDED_BN_WARNING = (
    "the model has no BatchNormalization nodes (BN was folded into the convolutions at export), so its "
    "statistics cannot be reset; export with BN kept: `python -m models.export NAME --keep-bn`, or "
    "torch.onnx.export(..., training=torch.onnx.TrainingMode.PRESERVE)")


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch (Chan et al.)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, batch: np.ndarray) -> None:
        values = np.moveaxis(batch.astype(np.float64), 1, 0).reshape(batch.shape[1], -1)
        count = values.shape[1]
        mean = values.mean(axis=1)
        m2 = ((values - mean[:, None]) ** 2).sum(axis=1)
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * count / total
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / self.count


def batchnorm_levels(graph: onnx.GraphProto) -> list[list[onnx.NodeProto]]:
    """BN nodes grouped by depth; level d only reads tensors that depend on BNs of levels < d."""
    depth: dict[str, int] = defaultdict(int)
    levels: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:  # ONNX requires topological order
        reached = max((depth[name] for name in node.input if name), default=0)
        if node.op_type == "BatchNormalization":
            reached += 1
            levels[reached].append(node)
        for name in node.output:
            depth[name] = reached
    return [levels[d] for d in sorted(levels)]


def reset_batchnorm(model: onnx.ModelProto, calibration: Dataset, batch_size: int) -> dict:
    """Overwrite every BN's running mean/var (inputs 3 and 4) in ``model`` with the measured statistics."""
    levels = batchnorm_levels(model.graph)
    if not levels:
        has_conv = any(node.op_type in ("Conv", "ConvTranspose") for node in model.graph.node)
        return {"batchnorm_nodes": 0, "warning": FOLDED_BN_WARNING if has_conv else
                "the model has no BatchNormalization nodes; nothing to reset"}
    for level in levels:
        for node in level:
            if len([name for name in node.output if name]) != 1:
                raise BadInputError(f"BatchNormalization '{node.name}' is in training mode (several outputs); "
                                    "export the model for inference")
    stats = []
    for level in levels:
        measured = _measure(model, level, calibration, batch_size)
        for node, moments in zip(level, measured):
            _write_statistic(model.graph, node, 3, moments.mean)
            _write_statistic(model.graph, node, 4, moments.variance)
            stats.append({"node": node.name, "channels": int(moments.mean.size)})
    return {"batchnorm_nodes": len(stats), "levels": len(levels), "samples": len(calibration),
            "nodes": stats}


def _measure(model: onnx.ModelProto, level: list[onnx.NodeProto], calibration: Dataset,
             batch_size: int) -> list[_Moments]:
    existing = {value.name for value in model.graph.output}
    added = []
    for node in level:
        if node.input[0] not in existing and node.input[0] not in added:
            elem_type = _tensor_elem_type(model.graph, node.input[1])
            model.graph.output.append(helper.make_tensor_value_info(node.input[0], elem_type, None))
            added.append(node.input[0])
    try:
        session = make_session(model)
    finally:
        del model.graph.output[len(model.graph.output) - len(added):]
    names = [node.input[0] for node in level]
    moments = {name: _Moments() for name in names}
    # Streamed batch by batch under the model's export batch rule; padding rows are dropped before counting.
    for values in iter_batched(session, calibration, model, outputs=names, batch_size=batch_size):
        for name, value in zip(names, values):
            if value.ndim < 2:
                raise BadInputError(f"the input of BatchNormalization reading '{name}' has rank {value.ndim}")
            moments[name].update(value)
    return [moments[name] for name in names]


def _initializer_map(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def _tensor_elem_type(graph: onnx.GraphProto, name: str) -> int:
    """BN's X has the element type of its scale (ONNX type constraint T)."""
    tensor = _initializer_map(graph).get(name)
    if tensor is not None:
        return tensor.data_type
    for value in list(graph.value_info) + list(graph.input):
        if value.name == name:
            return value.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT


def _readers(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for node in graph.node:
        for name in node.input:
            counts[name] += 1
    for value in graph.output:
        counts[value.name] += 1
    return counts


def _write_statistic(graph: onnx.GraphProto, node: onnx.NodeProto, index: int, values: np.ndarray) -> None:
    """Overwrite the BN's own initializer in place; give it a new one if the old is shared or not one."""
    initializers = _initializer_map(graph)
    name = node.input[index]
    current = initializers.get(name)
    dtype = helper.tensor_dtype_to_np_dtype(current.data_type) if current is not None else np.float32
    new = numpy_helper.from_array(values.astype(dtype), name)
    if current is not None and _readers(graph)[name] == 1:
        current.CopyFrom(new)
        return
    taken = {t.name for t in graph.initializer} | {out for n in graph.node for out in n.output}
    suffix = "running_mean" if index == 3 else "running_var"
    fresh, counter = f"{node.name or 'batchnorm'}.{suffix}", 0
    while fresh in taken:
        counter += 1
        fresh = f"{node.name or 'batchnorm'}.{suffix}_{counter}"
    new.name = fresh
    graph.initializer.append(new)
    node.input[index] = fresh
