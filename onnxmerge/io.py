"""Model loading and saving: the only code that touches model files.

Everything that can make a user's file unusable lives here, once: external data (and its path-traversal
hazard), the 2 GB protobuf limit, IR versions the installed ONNX Runtime can load, atomic writes and the
promise never to overwrite the input by accident.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, external_data_helper, helper

from onnxmerge.errors import BadInputError, first_line

ModelLike = Union[str, os.PathLike, onnx.ModelProto]

# Protobuf refuses to serialise a message of 2 GiB or more; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**27
QUANTIZED_OPS = frozenset(
    {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QuantizeLinear", "DequantizeLinear",
     "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul"}
)


@dataclass
class LoadedModel:
    """A model in memory plus where it came from, so saving can keep its layout."""

    proto: onnx.ModelProto
    path: Path | None
    had_external_data: bool


def iter_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    """Every TensorProto stored in a graph: initializers, Constant/attribute tensors, and subgraphs'."""
    yield from graph.initializer
    yield from (sparse.values for sparse in graph.sparse_initializer)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from iter_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from iter_tensors(subgraph)


def _uses_external_data(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _external_location(tensor: TensorProto) -> str:
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    raise BadInputError(f"tensor '{tensor.name}' is marked as external data but names no location")


def _check_external_locations(proto: onnx.ModelProto, model_dir: Path) -> None:
    """Refuse locations that escape the model's folder (a known ONNX path-traversal hazard) or are missing."""
    root = model_dir.resolve()
    for tensor in iter_tensors(proto.graph):
        if not _uses_external_data(tensor):
            continue
        location = _external_location(tensor)
        target = (root / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(root):
            raise BadInputError(
                f"external data of tensor '{tensor.name}' points outside the model's folder ('{location}'); "
                "refusing to read it"
            )
        if not target.is_file():
            raise BadInputError(f"external data file '{location}' of tensor '{tensor.name}' is missing")


def load_model(model: ModelLike, *, load_external_data: bool = True) -> LoadedModel:
    """Load a path or take a ModelProto, with external data, and refuse anything unusable with one line.

    ``load_external_data=False`` checks the external data (location, presence, the model's validity) but
    leaves the weights on disk, for callers that stream tensors one at a time.
    """
    if isinstance(model, onnx.ModelProto):
        if any(_uses_external_data(t) for t in iter_tensors(model.graph)):
            raise BadInputError("the ModelProto references external data that is not loaded; pass its path instead")
        _check_not_empty(model, "the given ModelProto")
        return LoadedModel(proto=model, path=None, had_external_data=False)

    path = Path(model)
    if not path.is_file():
        raise BadInputError(f"model file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise BadInputError(f"cannot parse {path} as an ONNX model ({first_line(exc)})") from None
    _check_not_empty(proto, str(path))
    had_external = any(_uses_external_data(t) for t in iter_tensors(proto.graph))
    if had_external:
        _check_external_locations(proto, path.parent)
    if had_external and load_external_data:
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError, RuntimeError) as exc:
            raise BadInputError(f"cannot read the external data of {path} ({first_line(exc)})") from None
    try:
        onnx.checker.check_model(proto if not had_external else str(path))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise BadInputError(f"{path} is not a valid ONNX model ({first_line(exc)})") from None
    return LoadedModel(proto=proto, path=path, had_external_data=had_external)


def _check_not_empty(proto: onnx.ModelProto, what: str) -> None:
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise BadInputError(f"{what} has an empty graph (no nodes)")
    if len(proto.graph.output) == 0:
        raise BadInputError(f"{what} has no graph outputs")


def is_quantized(proto: onnx.ModelProto) -> bool:
    return any(node.op_type in QUANTIZED_OPS for node in proto.graph.node)


def tensor_bytes(proto: onnx.ModelProto) -> int:
    """Bytes held by stored tensors (what decides whether the 2 GB limit is near)."""
    total = 0
    for tensor in iter_tensors(proto.graph):
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += onnx.numpy_helper.to_array(tensor).nbytes if not _uses_external_data(tensor) else 0
    return total


@functools.lru_cache(maxsize=1)
def ort_max_ir_version() -> int:
    """Highest IR version the installed ONNX Runtime accepts, found by asking it (it is not exported)."""
    from onnxmerge.ort import ort

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    for ir_version in range(onnx.IR_VERSION, 6, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir_version)
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # ORT raises its own exception types for an unsupported IR version
            continue
        return ir_version
    return 7


def clamp_ir_version(proto: onnx.ModelProto) -> None:
    """Keep the model's IR version unless the installed ORT cannot load it."""
    proto.ir_version = min(proto.ir_version or onnx.IR_VERSION, ort_max_ir_version())


def save_model(
    proto: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: Path | None = None,
    force: bool = False,
    external_data: bool | None = None,
    external_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> Path:
    """Write atomically (temp file + rename); external data when asked or when the 2 GB limit is near.

    The input file is never overwritten unless ``force`` is set. ``external_data=None`` decides by size
    (``external_threshold_bytes``, default just under protobuf's 2 GiB limit).
    """
    out = Path(path)
    if input_path is not None and out.resolve() == Path(input_path).resolve() and not force:
        raise BadInputError(f"refusing to overwrite the input model {out}; pass --force (force=True) to allow it")
    if not out.parent.is_dir():
        raise BadInputError(f"output folder does not exist: {out.parent}")
    if external_data is None:
        external_data = tensor_bytes(proto) >= external_threshold_bytes
    data_name = out.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=".onnxmerge-", dir=out.parent))
    try:
        staged_model = staging / out.name
        if external_data:
            # Marked here rather than by save_model(save_as_external_data=True), which refuses when a file
            # named like the data file exists in the *current* directory (it checks the location there).
            copy = onnx.ModelProto()
            copy.CopyFrom(proto)
            for tensor in iter_tensors(copy.graph):
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                    external_data_helper.set_external_data(tensor, data_name)
            onnx.save_model(copy, str(staged_model))
            staged_data = staging / data_name
            if staged_data.exists():
                os.replace(staged_data, out.parent / data_name)
        else:
            onnx.save_model(proto, str(staged_model))
        os.replace(staged_model, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file so that readers see the old or the new content, never half of it."""
    target = Path(path)
    handle, temp = tempfile.mkstemp(prefix=".onnxmerge-", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temp, 0o666 & ~_current_umask())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def io_signature(proto: onnx.ModelProto) -> dict[str, list[tuple[str, int, tuple]]]:
    """Names, element types and dims (ints or symbols) of graph inputs and outputs."""
    initializer_names = {t.name for t in proto.graph.initializer}

    def describe(value: onnx.ValueInfoProto) -> tuple[str, int, tuple]:
        tensor_type = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
        ) if tensor_type.HasField("shape") else None
        return value.name, tensor_type.elem_type, dims

    return {
        "inputs": [describe(v) for v in proto.graph.input if v.name not in initializer_names],
        "outputs": [describe(v) for v in proto.graph.output],
    }
