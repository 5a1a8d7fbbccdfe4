"""Input models opened without their weights, so a soup of N models never holds N models in memory.

A path is parsed once; if its weights are stored inline they are spilled to a temporary external-data
file, after which the graph in memory is only structure and each tensor is read from disk when the merge
reaches it. A ModelProto given through the API is already in memory and is read from directly.
"""

from __future__ import annotations

import hashlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

from onnxmerge.io import ModelLike, iter_tensors, load_model, temporary_model_file

_HASH_CHUNK = 1 << 20


@dataclass
class ModelSource:
    """One input: its graph (tensors possibly external, under ``data_dir``) and where it came from."""

    proto: onnx.ModelProto
    label: str
    path: Path | None = None
    data_dir: Path | None = None
    had_external_data: bool = False
    hashes: dict = field(default_factory=dict)

    def read(self, tensor: TensorProto) -> np.ndarray:
        """The tensor's values; external tensors are read from disk, leaving the graph data-less."""
        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        copy = TensorProto()
        copy.CopyFrom(tensor)
        return numpy_helper.to_array(copy, base_dir=str(self.data_dir))

    def materialize(self) -> onnx.ModelProto:
        """A full in-memory copy (for ORT sessions and for writing the output)."""
        copy = onnx.ModelProto()
        copy.CopyFrom(self.proto)
        for tensor in iter_tensors(copy.graph):
            if tensor.data_location == TensorProto.EXTERNAL:
                load_external_data_for_tensor(tensor, str(self.data_dir))
        return copy

    def provenance(self) -> dict:
        return {"model": self.label, **self.hashes}


def open_source(model: ModelLike, stack: ExitStack, index: int) -> ModelSource:
    """Open one input lazily; temporary spill files live as long as ``stack``."""
    if isinstance(model, onnx.ModelProto):
        proto = load_model(model).proto
        digest = hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
        return ModelSource(proto=proto, label=f"<ModelProto #{index + 1}>", hashes={"sha256": digest})
    path = Path(model)
    loaded = load_model(path, load_external_data=False)  # checked, weights left on disk
    proto, external = loaded.proto, loaded.had_external_data
    if external:
        data_dir = path.parent
    else:
        data_dir, proto = spill(proto, stack)
    return ModelSource(proto=proto, label=str(path), path=path, data_dir=data_dir, had_external_data=external,
                       hashes=_file_hashes(path, proto if external else None))


def spill(proto: onnx.ModelProto, stack: ExitStack) -> tuple[Path, onnx.ModelProto]:
    """Move the tensors' bytes into a temporary external-data file (kept while ``stack`` lives).

    Returns the folder and the graph re-read without data. ``proto`` is consumed: protobuf keeps a message's
    bytes allocated until the message itself is freed, so only the re-read copy is small.
    """
    path = stack.enter_context(temporary_model_file(proto, prefix="onnxmerge-soup-"))
    return path.parent, onnx.load(str(path), load_external_data=False)


def _file_hashes(path: Path, external_proto: onnx.ModelProto | None) -> dict:
    """sha256 of the model file and of each external data file it names (what ``sha256sum`` prints)."""
    hashes = {"sha256": _sha256(path)}
    if external_proto is not None:
        locations = sorted({entry.value for tensor in iter_tensors(external_proto.graph)
                            for entry in tensor.external_data if entry.key == "location"})
        hashes["external_data_sha256"] = {location: _sha256(path.parent / location) for location in locations}
    return hashes


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
