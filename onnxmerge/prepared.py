"""The prepared model: everything a command derives from a model, derived once at the top and handed down.

Every command (fold, profile, compare, compress, soup, align, batch) starts the same way: load the file
(external weights stay on disk), undo exporter quirks (:mod:`onnxmerge.canonical`, which also guarantees
unique node names), resolve the input shapes, and check that the output may be written before doing any
expensive work. :func:`prepare` does that once and returns a :class:`PreparedModel`; later stages take that
object instead of a path or a proto plus loose shape arguments, so nothing is loaded, parsed or inferred
twice.

Input shapes are ``Mapping[str, Sequence[int]]`` here (``None`` as the key means "the only input");
``name:dims`` strings are a command-line spelling, parsed in :mod:`onnxmerge.cli_options`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import onnx

from onnxmerge.canonical import canonicalize
from onnxmerge.errors import BadInputError
from onnxmerge.io import (EXTERNAL_TENSOR_MIN_BYTES, ModelLike, external_data_files, is_quantized, load_model,
                          load_small_external_data)
from onnxmerge.runner import InputSpec, input_specs

InputShapes = Mapping[str | None, Sequence[int]]


@dataclass
class PreparedModel:
    """A loaded, canonical model and the facts every stage needs about it.

    ``proto`` is canonical (see :mod:`onnxmerge.canonical`); when the file keeps its weights in external
    data, large tensors still reference ``base_dir`` (read them inside :meth:`weights`). ``reference_path``
    is a file ORT can load that computes exactly what ``proto`` computes (the input itself when
    canonicalization changed nothing ORT can see), else None.
    """

    proto: onnx.ModelProto
    path: Path | None
    base_dir: Path | None
    input_data_files: frozenset[Path]
    specs: tuple[InputSpec, ...]
    notes: list[str] = field(default_factory=list)
    renamed_nodes: int = 0
    quantized: bool = False
    reference_path: Path | None = None

    @property
    def had_external_data(self) -> bool:
        return self.base_dir is not None

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """The concrete shape of every graph input (declared dims, the caller's, unknown dims → 1)."""
        return {spec.name: spec.shape for spec in self.specs}

    @property
    def assumptions(self) -> list[str]:
        """Dims that had to be guessed (set to 1), in words, for reports."""
        return [note for spec in self.specs for note in spec.assumed]

    @functools.cached_property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Static shape of every tensor at :attr:`input_shapes` — the one cached shape inference."""
        from onnxmerge.stats import static_shapes

        return static_shapes(self.proto, self.input_shapes)

    def graph(self):
        """A fresh onnx-graphsurgeon view of :attr:`proto` (passes rewrite it in place, so never shared)."""
        from onnxmerge.graph import import_graph

        return import_graph(self.proto)

    @contextmanager
    def weights(self) -> Iterator[None]:
        """Within this block, reading a constant's values resolves external data against the model's folder."""
        from onnxmerge.graph import external_data_dir

        with external_data_dir(self.base_dir):
            yield


def prepare(model: ModelLike, *, input_shapes: InputShapes | None = None,
            overwrite_input_shapes: InputShapes | None = None) -> PreparedModel:
    """Load ``model`` (a path or a ModelProto) and derive what every command needs, once.

    The caller's ModelProto is never modified. A model read from a file is canonicalized in place (copying
    would copy every weight in memory); weights in external data stay on disk. A quantized model is left as
    it was read, names included.
    """
    _check_shapes_mapping("input_shapes", input_shapes)
    _check_shapes_mapping("overwrite_input_shapes", overwrite_input_shapes)
    loaded = load_model(model, load_external_data=False)
    base_dir = loaded.path.parent if loaded.had_external_data else None
    data_files = frozenset(external_data_files(loaded.proto, base_dir)) if base_dir is not None else frozenset()
    if base_dir is not None:
        load_small_external_data(loaded.proto, base_dir, EXTERNAL_TENSOR_MIN_BYTES)
    quantized = is_quantized(loaded.proto)
    value_infos = len(loaded.proto.graph.value_info)
    if quantized:
        proto, notes, renamed = loaded.proto, [], 0
    else:
        canonical = canonicalize(loaded.proto, overwrite_input_shapes, in_place=loaded.path is not None)
        proto, notes, renamed = canonical.model, canonical.notes, canonical.renamed_nodes
    unchanged = not notes and len(proto.graph.value_info) == value_infos
    return PreparedModel(
        proto=proto, path=loaded.path, base_dir=base_dir, input_data_files=data_files,
        specs=tuple(input_specs(proto, dict(input_shapes) if input_shapes else None)),
        notes=notes, renamed_nodes=renamed, quantized=quantized,
        reference_path=loaded.path if unchanged and loaded.path is not None else None)


def _check_shapes_mapping(name: str, shapes) -> None:
    if shapes is None:
        return
    if not isinstance(shapes, Mapping):
        raise BadInputError(f"{name} takes a mapping of input name to dims, e.g. {{'input': (1, 3, 224, 224)}}; "
                            f"got {type(shapes).__name__}")
    for key, dims in shapes.items():
        try:
            ok = len(dims) > 0 and all(int(d) == d and int(d) > 0 for d in dims)
        except TypeError:
            ok = False
        if not ok:
            raise BadInputError(f"{name}[{key!r}] must be a sequence of positive integers, got {dims!r}")


def preflight_output(output: str | os.PathLike, prepared: PreparedModel, *, force: bool = False,
                     external_data: bool | None = None) -> Path:
    """Check, before any expensive work, that ``output`` may be written: its folder exists and is writable,
    it is not the input (unless ``force``), and its external data file would not replace the input's."""
    out = Path(output)
    if out.is_dir():
        raise BadInputError(f"output {out} is a folder; give a file name")
    folder = out.parent
    if not folder.is_dir():
        raise BadInputError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInputError(f"output folder is not writable: {folder}")
    if out.exists() and not os.access(out, os.W_OK):
        raise BadInputError(f"output file is not writable: {out}")
    if prepared.path is not None and out.resolve() == prepared.path.resolve() and not force:
        raise BadInputError(f"refusing to overwrite the input model {out}; pass force=True to allow it")
    if external_data is not False and not force:
        data_file = (folder / (out.name + ".data")).resolve()
        if data_file in prepared.input_data_files:
            raise BadInputError(f"writing {out} would overwrite {data_file.name}, the input's external data; "
                                "choose another output name or pass force=True")
    return out
