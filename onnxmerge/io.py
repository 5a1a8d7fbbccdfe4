"""Model loading and saving: the only code that touches model files.

Everything that can make a user's file unusable lives here, once: external data (and its path-traversal
hazard), the 2 GB protobuf limit, IR versions the installed ONNX Runtime can load, atomic writes and the
promise never to overwrite the input by accident.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper

from onnxmerge.errors import BadInputError, first_line

ModelLike = Union[str, os.PathLike, onnx.ModelProto]

# Protobuf refuses to serialise a message of 2 GiB or more; leave headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**27
# Tensors with at least this many bytes of raw data go to the external data file when one is written.
EXTERNAL_TENSOR_MIN_BYTES = 1024
# External tensors of at least this size start at a multiple of ALIGNMENT_BYTES in written data files, so
# ONNX Runtime can map them instead of copying (64 KiB: a multiple of the allocation granularity everywhere).
ALIGN_MIN_BYTES = 1 << 20
ALIGNMENT_BYTES = 1 << 16
# Location of the payload-less stand-ins that light copies put in place of large in-memory tensors.
STRIPPED_LOCATION = "<onnxmerge: payload not copied>"
_COPY_CHUNK_BYTES = 1 << 24
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


def _resolve_location(model_dir: Path, tensor: TensorProto) -> Path:
    """The data file of an external tensor, refusing locations that escape the model's folder (a known ONNX
    path-traversal hazard) or are missing."""
    location = _external_location(tensor)
    root = Path(model_dir).resolve()
    target = (root / location).resolve()
    if os.path.isabs(location) or not target.is_relative_to(root):
        raise BadInputError(
            f"external data of tensor '{tensor.name}' points outside the model's folder ('{location}'); "
            "refusing to read it"
        )
    if not target.is_file():
        raise BadInputError(f"external data file '{location}' of tensor '{tensor.name}' is missing")
    return target


def _check_external_locations(proto: onnx.ModelProto, model_dir: Path) -> None:
    """Refuse locations that escape the model's folder (a known ONNX path-traversal hazard) or are missing."""
    for tensor in iter_tensors(proto.graph):
        if _uses_external_data(tensor):
            _resolve_location(model_dir, tensor)


def external_data_files(proto: onnx.ModelProto, model_dir: Path) -> set[Path]:
    """The (resolved) data files the model's external tensors live in."""
    return {_resolve_location(model_dir, t) for t in iter_tensors(proto.graph) if _uses_external_data(t)}


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
    """Bytes held by stored tensors in memory (what decides whether the 2 GB limit is near)."""
    total = 0
    for tensor in iter_tensors(proto.graph):
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += onnx.numpy_helper.to_array(tensor).nbytes if not _uses_external_data(tensor) else 0
    return total


def external_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the tensors whose data stays in external files (from their declared length, else their dims)."""
    total = 0
    for tensor in iter_tensors(proto.graph):
        if _uses_external_data(tensor):
            length = _external_field(tensor, "length")
            total += int(length) if length is not None else payload_bytes(tensor)
    return total


def payload_bytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's data computed from its dims and type (reading ``raw_data`` would copy it)."""
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    if tensor.data_type in _SUB_BYTE_TYPES:
        return math.ceil(math.prod(tensor.dims) * _SUB_BYTE_TYPES[tensor.data_type] / 8)
    return math.prod(tensor.dims) * itemsize


_SUB_BYTE_TYPES = {getattr(TensorProto, name): bits
                   for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
                   if hasattr(TensorProto, name)}
# Element types whose raw data is the little-endian bytes of the numpy dtype: read straight into an array.
_PLAIN_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8,
                          TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
                          TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL})


def _external_field(tensor: TensorProto, key: str) -> str | None:
    for entry in tensor.external_data:
        if entry.key == key:
            return entry.value
    return None


def _external_range(tensor: TensorProto, model_dir: Path) -> tuple[Path, int, int]:
    """(data file, offset, length) of an external tensor; a missing length means "to the end of the file"."""
    path = _resolve_location(model_dir, tensor)
    offset = int(_external_field(tensor, "offset") or 0)
    length = _external_field(tensor, "length")
    size = path.stat().st_size
    length = size - offset if length is None else int(length)
    if offset < 0 or length < 0 or offset + length > size:
        raise BadInputError(f"external data of tensor '{tensor.name}' ({length} bytes at offset {offset}) does not "
                            f"fit in '{path.name}' ({size} bytes)")
    return path, offset, length


def read_tensor(tensor: TensorProto, model_dir: str | os.PathLike | None = None) -> np.ndarray:
    """A stored tensor's value as a new, writable array; external data is read from ``model_dir`` (never
    kept in the proto, unlike ``onnx.numpy_helper.to_array(tensor, base_dir)``, which loads it into it)."""
    if not _uses_external_data(tensor):
        return np.array(onnx.numpy_helper.to_array(tensor))  # to_array's may be a read-only view of bytes
    if model_dir is None:
        raise BadInputError(f"tensor '{tensor.name}' is stored in external data and the model's folder is unknown")
    path, offset, length = _external_range(tensor, Path(model_dir))
    if tensor.data_type in _PLAIN_TYPES and sys.byteorder == "little":
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = math.prod(tensor.dims)
        if count * dtype.itemsize != length:
            raise BadInputError(f"external data of tensor '{tensor.name}' has {length} bytes, its dims need "
                                f"{count * dtype.itemsize}")
        with open(path, "rb") as handle:
            handle.seek(offset)
            return np.fromfile(handle, dtype=dtype, count=count).reshape(tuple(tensor.dims))
    inline = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    with open(path, "rb") as handle:
        handle.seek(offset)
        inline.raw_data = handle.read(length)
    return np.array(onnx.numpy_helper.to_array(inline))


def iter_tensor_chunks(tensor: TensorProto, model_dir: str | os.PathLike | None,
                       limit: int | None = None) -> Iterator[bytes]:
    """The stored bytes of a tensor (its raw data, or its external range), at most ``limit`` of them, in
    chunks: a digest of a large external tensor never holds it in memory."""
    if not _uses_external_data(tensor):
        data = tensor.raw_data if tensor.HasField("raw_data") else array_bytes(onnx.numpy_helper.to_array(tensor))
        yield data[:limit] if limit is not None else data
        return
    if model_dir is None:
        raise BadInputError(f"tensor '{tensor.name}' is stored in external data and the model's folder is unknown")
    path, offset, length = _external_range(tensor, Path(model_dir))
    remaining = length if limit is None else min(length, limit)
    with open(path, "rb") as handle:
        handle.seek(offset)
        while remaining > 0:
            chunk = handle.read(min(remaining, _COPY_CHUNK_BYTES))
            if not chunk:
                raise BadInputError(f"external data of tensor '{tensor.name}' ends early in '{path.name}'")
            remaining -= len(chunk)
            yield chunk


def array_bytes(array: np.ndarray) -> bytes | memoryview:
    """The bytes of an array's values; strings (object arrays) as length-prefixed UTF-8, not as pointers."""
    array = np.ascontiguousarray(array)
    if array.dtype != object:
        return memoryview(array).cast("B")
    parts = []
    for item in array.ravel():
        encoded = item if isinstance(item, bytes) else str(item).encode()
        parts += [len(encoded).to_bytes(8, "little"), encoded]
    return b"".join(parts)


def load_small_external_data(proto: onnx.ModelProto, model_dir: str | os.PathLike, below_bytes: int) -> int:
    """Read external tensors smaller than ``below_bytes`` into the proto (shape targets, biases, BN statistics:
    what shape inference and the passes read); larger ones stay on disk. Returns how many were read."""
    count = 0
    for tensor in iter_tensors(proto.graph):
        if _uses_external_data(tensor) and payload_bytes(tensor) < below_bytes:
            path, offset, length = _external_range(tensor, Path(model_dir))
            with open(path, "rb") as handle:
                handle.seek(offset)
                raw = handle.read(length)
            _make_inline(tensor, raw)
            count += 1
    return count


def _make_inline(tensor: TensorProto, raw: bytes) -> None:
    del tensor.external_data[:]
    tensor.data_location = TensorProto.DEFAULT
    tensor.raw_data = raw


def _set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    for field in _TENSOR_DATA_FIELDS:
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


_TENSOR_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                       "string_data")


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def _copy_fields(source, target, skip: frozenset[str] | tuple = ()) -> None:
    """Copy every set field of ``source`` into ``target`` except those named in ``skip``."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if _is_repeated(field):
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def is_stripped(tensor: TensorProto) -> bool:
    """Whether ``tensor`` is a light copy's stand-in whose payload was left out."""
    return _uses_external_data(tensor) and _external_field(tensor, "location") == STRIPPED_LOCATION


def light_copy(proto: onnx.ModelProto, min_bytes: int = EXTERNAL_TENSOR_MIN_BYTES) -> onnx.ModelProto:
    """A copy of the model without the raw data of initializers of ``min_bytes`` or more.

    Each such initializer keeps its name, type and dims and is marked as external data at
    :data:`STRIPPED_LOCATION`, so shape inference and statistics see it as a tensor they need not read.
    Tensors already stored externally stay references; nothing of ``proto`` is copied whole, so this costs
    kilobytes whatever the model's size (``CopyFrom`` would copy every weight).
    """
    copy = onnx.ModelProto()
    _copy_fields(proto, copy, skip=("graph",))
    if not proto.HasField("graph"):
        return copy
    _copy_fields(proto.graph, copy.graph, skip=("initializer",))
    for tensor in proto.graph.initializer:
        target = copy.graph.initializer.add()
        if not _uses_external_data(tensor) and tensor.HasField("raw_data") and payload_bytes(tensor) >= min_bytes:
            _copy_fields(tensor, target, skip=_TENSOR_DATA_FIELDS)
            _set_external(target, STRIPPED_LOCATION, 0, payload_bytes(tensor))
        else:
            target.CopyFrom(tensor)
    return copy


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


@dataclass
class StagedModel:
    """A model written into a staging folder beside its destination, not yet visible there.

    ``path`` is the staged model file (its external data file, if any, lies beside it, so ONNX Runtime can
    load it from ``path`` as it is); ``proto`` is the model as written. :meth:`publish` moves both into place
    (data first, then the model), each with an atomic rename.
    """

    path: Path
    target: Path
    proto: onnx.ModelProto
    data_name: str | None

    def publish(self) -> Path:
        if self.data_name is not None:
            os.replace(self.path.parent / self.data_name, self.target.parent / self.data_name)
        os.replace(self.path, self.target)
        return self.target


@contextlib.contextmanager
def staged_model(
    proto: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: Path | None = None,
    force: bool = False,
    external_data: bool | None = None,
    external_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
    base_dir: str | os.PathLike | None = None,
) -> Iterator[StagedModel]:
    """Write the model into a staging folder in the output's folder; the folder is removed on exit, so what
    was not published is gone (see :func:`save_model` for the arguments).

    Tensors that ``proto`` keeps in external data (relative to ``base_dir``) are copied into the output's
    data file in chunks, tensors in memory are written one at a time: the model is never held twice.
    """
    out = Path(path)
    if input_path is not None and out.resolve() == Path(input_path).resolve() and not force:
        raise BadInputError(f"refusing to overwrite the input model {out}; pass force=True to allow it")
    if not out.parent.is_dir():
        raise BadInputError(f"output folder does not exist: {out.parent}")
    if external_data is None:
        external_data = tensor_bytes(proto) + external_bytes(proto) >= external_threshold_bytes
    staging = Path(tempfile.mkdtemp(prefix=".onnxmerge-", dir=out.parent))
    try:
        staged = staging / out.name
        data_name = out.name + ".data"
        if external_data:
            written, wrote_data = _write_with_external_data(proto, staged, data_name, base_dir)
        else:
            written, wrote_data = _inline_copy(proto, base_dir), False
            onnx.save_model(written, str(staged))
        yield StagedModel(path=staged, target=out, proto=written, data_name=data_name if wrote_data else None)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _inline_copy(proto: onnx.ModelProto, base_dir) -> onnx.ModelProto:
    """``proto`` itself, or a copy with its external tensors read in (the caller asked for one file)."""
    if not any(_uses_external_data(t) for t in iter_tensors(proto.graph)):
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # light: the large tensors are references
    for tensor in iter_tensors(copy.graph):
        if _uses_external_data(tensor):
            if base_dir is None:
                raise BadInputError(f"tensor '{tensor.name}' is stored in external data and the model's folder "
                                    "is unknown")
            _make_inline(tensor, b"".join(iter_tensor_chunks(tensor, base_dir)))
    return copy


def _write_with_external_data(proto: onnx.ModelProto, staged: Path, data_name: str,
                              base_dir) -> tuple[onnx.ModelProto, bool]:
    """Write ``staged`` and ``data_name`` beside it; returns the written proto and whether data was written.

    Locations are set here rather than by onnx.save_model(save_as_external_data=True), which refuses when a
    file named like the data file exists in the *current* directory (it checks the location there).
    """
    written = light_copy(proto, EXTERNAL_TENSOR_MIN_BYTES)
    offset, externalized = 0, 0
    with open(staged.parent / data_name, "wb", buffering=0) as data:
        for source, target in zip(iter_tensors(proto.graph), iter_tensors(written.graph)):
            if is_stripped(source):  # a light copy's stand-in stays one (only shapes are read from such files)
                continue
            if _uses_external_data(source):
                if base_dir is None:
                    raise BadInputError(f"tensor '{source.name}' is stored in external data and the model's "
                                        "folder is unknown")
                path, start, length = _external_range(source, Path(base_dir))
                offset = _pad_to_alignment(data, offset, length)
                _copy_range(path, start, length, data)
            elif is_stripped(target) or (target.HasField("raw_data")
                                         and payload_bytes(target) >= EXTERNAL_TENSOR_MIN_BYTES):
                raw = source.raw_data
                length = len(raw)
                offset = _pad_to_alignment(data, offset, length)
                _write_all(data, raw)
                del raw
            else:
                continue
            _set_external(target, data_name, offset, length)
            offset += length
            externalized += 1
    if not externalized:
        (staged.parent / data_name).unlink()
    onnx.save_model(written, str(staged))
    return written, externalized > 0


def _pad_to_alignment(data, offset: int, length: int) -> int:
    if length < ALIGN_MIN_BYTES or offset % ALIGNMENT_BYTES == 0:
        return offset
    padding = ALIGNMENT_BYTES - offset % ALIGNMENT_BYTES
    _write_all(data, bytes(padding))
    return offset + padding


def _write_all(handle, data) -> None:
    view = memoryview(data)
    while view:
        view = view[handle.write(view):]


def _copy_range(path: Path, offset: int, length: int, target) -> None:
    """Append ``length`` bytes of ``path`` from ``offset`` to the unbuffered file ``target``, in the kernel
    where it can (``copy_file_range``), else in chunks."""
    with open(path, "rb", buffering=0) as source:
        copy_file_range = getattr(os, "copy_file_range", None)
        remaining = length
        while remaining and copy_file_range is not None:
            try:
                copied = copy_file_range(source.fileno(), target.fileno(), min(remaining, 1 << 30),
                                         offset + length - remaining)
            except OSError:
                break  # unsupported between these file systems: copy through user space
            if copied == 0:
                raise BadInputError(f"external data file '{path.name}' ends early")
            remaining -= copied
        source.seek(offset + length - remaining)
        while remaining:
            chunk = source.read(min(remaining, _COPY_CHUNK_BYTES))
            if not chunk:
                raise BadInputError(f"external data file '{path.name}' ends early")
            _write_all(target, chunk)
            remaining -= len(chunk)


def save_model(
    proto: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    input_path: Path | None = None,
    force: bool = False,
    external_data: bool | None = None,
    external_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
    base_dir: str | os.PathLike | None = None,
) -> Path:
    """Write atomically (staging folder + rename); external data when asked or when the 2 GB limit is near.

    The input file is never overwritten unless ``force`` is set. ``external_data=None`` decides by size
    (``external_threshold_bytes``, default just under protobuf's 2 GiB limit). Tensors ``proto`` keeps in
    external data are read relative to ``base_dir`` (the folder of the model they came from).
    """
    with staged_model(proto, path, input_path=input_path, force=force, external_data=external_data,
                      external_threshold_bytes=external_threshold_bytes, base_dir=base_dir) as staged:
        return staged.publish()


@contextlib.contextmanager
def temporary_model_file(proto: onnx.ModelProto, base_dir: str | os.PathLike | None = None,
                         prefix: str = "onnxmerge-") -> Iterator[Path]:
    """The one temporary copy of a model on disk, for tools that need a file (ORT beyond 2 GB, ONNX shape
    inference by path): written with external data (tensors ``proto`` keeps external are read from
    ``base_dir``), removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield save_model(proto, Path(folder) / "model.onnx", external_data=True, base_dir=base_dir)


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
