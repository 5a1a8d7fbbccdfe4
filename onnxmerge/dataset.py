"""One dataset vocabulary: calibration/evaluation ``.npz`` files, checked against a model and fed to ORT.

Compression (importance tables, fidelity evaluation), recovery (distillation targets) and weight soups
(held-out evaluation, BatchNorm reset) all read data the same way and run ORT over it the same way:

* **The file.** An ``.npz`` (read with ``allow_pickle=False``) holding one ``N x ...`` array per graph input,
  named after the input, and optionally ``labels``: integer class indices with N as their first dim (one per
  sample, or per pixel for dense outputs). The API also takes the same arrays as a dict. Arrays are cast to
  the dtypes the model declares within a kind (float64 -> float32, int64 -> int32 when the values fit);
  across kinds (ints into a float input, floats into an int input) they are refused, as that is almost
  always unnormalised or wrong data. Every refusal is one line naming the file and the array.
* **The batch rule.** :func:`fixed_batch`: a model whose first input has a static positive dim 0 was
  exported for exactly that many rows; -1, 0 and symbols are dynamic (:func:`canonical.is_dynamic_dim`).
  With a fixed batch B every ORT call gets exactly B rows: the last, partial batch is padded by repeating
  its own rows and the padded rows' outputs are dropped, so no sample is lost and none is counted twice.
  A dynamic model gets ``batch_size`` rows per call, the last batch shorter.
* **Streaming.** :meth:`Dataset.batches` yields slices of the loaded arrays (views, never a copy of the whole
  set); only a padded last batch is a copy, of B rows. :func:`run_batched` / :func:`iter_batched` are the
  one place ORT runs over many rows.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import onnx

from onnxmerge.canonical import graph_inputs, is_dynamic_dim
from onnxmerge.errors import BadInputError, first_line

LABELS_KEY = "labels"
DEFAULT_BATCH = 256  # rows per ORT call for a dynamic-batch model unless the caller says otherwise

DataSource = Union[str, os.PathLike, Mapping[str, np.ndarray], "Dataset"]


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch the export fixes: the first graph input's dim 0 when it is a static positive value, else None.

    -1 and 0 (written by some exporters for a dynamic dim), symbols and missing dims are dynamic.
    """
    inputs = graph_inputs(model)
    if not inputs or not inputs[0].type.tensor_type.HasField("shape"):
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    if not dims or is_dynamic_dim(dims[0]):
        return None
    return int(dims[0].dim_value)


class Feeds(dict):
    """One batch: input name -> rows, ready for ``session.run``; ``rows`` of them are real samples.

    With a fixed export batch the last batch may be padded with repeated rows up to the batch size; outputs
    past ``rows`` along axis 0 belong to the padding and must be dropped (:func:`iter_batched` does it).
    """

    __slots__ = ("rows",)

    def __init__(self, arrays: Mapping[str, np.ndarray], rows: int):
        super().__init__(arrays)
        self.rows = rows

    @property
    def padded(self) -> bool:
        return any(len(array) != self.rows for array in self.values())


@dataclass(frozen=True, eq=False)
class Dataset:
    """Samples checked against a model: one ``N x ...`` array per input, optional labels, the model's batch rule.

    ``fixed_batch`` is the batch the model the data was loaded against fixes (None: dynamic); it is the rule
    :meth:`batches` follows unless a model is passed to it.
    """

    arrays: Mapping[str, np.ndarray]
    labels: np.ndarray | None = None
    fixed_batch: int | None = None
    origin: str = "data"
    size: int = field(init=False)

    def __post_init__(self):
        counts = {len(array) for array in self.arrays.values()}
        if len(counts) > 1:
            raise BadInputError(f"{self.origin}: arrays hold different numbers of samples: {sorted(counts)}")
        object.__setattr__(self, "size", counts.pop() if counts else 0)

    @classmethod
    def of(cls, arrays: "Dataset | Mapping[str, np.ndarray]", *, fixed_batch: int | None = None) -> "Dataset":
        """Feeds as they are (e.g. intermediate activations), unchecked against any model."""
        if isinstance(arrays, Dataset):
            return arrays
        return cls({name: np.asarray(array) for name, array in arrays.items()}, fixed_batch=fixed_batch)

    def __len__(self) -> int:
        return self.size

    def rows(self, index: slice | np.ndarray) -> "Dataset":
        """A subset: a slice gives views, an index array copies only the rows it picks."""
        return Dataset({name: array[index] for name, array in self.arrays.items()},
                       None if self.labels is None else self.labels[index], self.fixed_batch, self.origin)

    def split(self, held_out_fraction: float, seed: int | None = None) -> tuple["Dataset", "Dataset"]:
        """(fit, held-out), deterministic: round(N·(1-fraction)) rows to fit, at least one in each part.

        Without a seed the held-out part is the last rows (views, file order kept); with one, the rows are
        drawn by a seeded permutation (each part keeps file order).
        """
        if not 0 < held_out_fraction < 1:
            raise BadInputError(f"held-out fraction must be between 0 and 1 (got {held_out_fraction})")
        if self.size < 2:
            raise BadInputError(f"{self.origin}: {self.size} sample(s) cannot be split into a fit and a held-out "
                                "part; need >= 2")
        cut = min(self.size - 1, max(1, int(round(self.size * (1 - held_out_fraction)))))
        if seed is None:
            return self.rows(slice(0, cut)), self.rows(slice(cut, None))
        order = np.random.default_rng(seed).permutation(self.size)
        return self.rows(np.sort(order[:cut])), self.rows(np.sort(order[cut:]))

    def batch_rows(self, batch_size: int = DEFAULT_BATCH, model: onnx.ModelProto | None = None) -> int:
        """Rows per ORT call: the fixed batch (``model``'s, else the one recorded at load), else ``batch_size``."""
        fixed = fixed_batch(model) if model is not None else self.fixed_batch
        if fixed is not None:
            return fixed
        if batch_size < 1:
            raise BadInputError(f"batch size must be >= 1 (got {batch_size})")
        return batch_size

    def batches(self, batch_size: int = DEFAULT_BATCH, model: onnx.ModelProto | None = None) -> Iterator[Feeds]:
        """Every row exactly once, in order, as feeds of :meth:`batch_rows` rows (views of the arrays).

        With a fixed batch the last partial batch is padded by repeating its rows (``Feeds.rows`` says how many
        are real); with a dynamic batch it is simply shorter.
        """
        step = self.batch_rows(batch_size, model)
        fixed = (fixed_batch(model) if model is not None else self.fixed_batch) is not None
        for start in range(0, self.size, step):
            rows = min(step, self.size - start)
            if rows == step or not fixed:
                yield Feeds({name: array[start:start + rows] for name, array in self.arrays.items()}, rows)
            else:
                index = start + np.arange(step) % rows
                yield Feeds({name: array[index] for name, array in self.arrays.items()}, rows)


def iter_batched(session, data: "Dataset | Mapping[str, np.ndarray]", model: onnx.ModelProto | None = None, *,
                 outputs: list[str] | None = None, batch_size: int = DEFAULT_BATCH) -> Iterator[list[np.ndarray]]:
    """``session.run`` batch by batch under the batch rule of ``model`` (default: the dataset's own), padding
    rows trimmed from every output whose dim 0 is the batch."""
    for feeds in Dataset.of(data).batches(batch_size, model):
        results = session.run(outputs, feeds)
        if feeds.padded:
            step = len(next(iter(feeds.values())))
            results = [r[:feeds.rows] if r.ndim and r.shape[0] == step else r for r in results]
        yield results


def run_batched(session, data: "Dataset | Mapping[str, np.ndarray]", model: onnx.ModelProto | None = None, *,
                outputs: list[str] | None = None, batch_size: int = DEFAULT_BATCH) -> list[np.ndarray]:
    """The session's outputs over every row of ``data``, concatenated along axis 0 (see :func:`iter_batched`)."""
    parts = list(iter_batched(session, data, model, outputs=outputs, batch_size=batch_size))
    if not parts:
        raise BadInputError("no samples to run the model on")
    return [np.concatenate([part[k] for part in parts]) for k in range(len(parts[0]))]


def load_dataset(source: DataSource, model: onnx.ModelProto, *, what: str = "calibration",
                 need_labels: bool = False, sole_array_any_name: bool = False) -> Dataset:
    """Read and check data for ``model``: an ``.npz`` path, or a dict of the same arrays (the API form).

    ``what`` names the data in messages (``calibration``, ``--eval``, ``--reset-bn``). With
    ``sole_array_any_name`` a single-input model also takes a file holding one array of any name.
    """
    if isinstance(source, Dataset):
        source = dict(source.arrays) | ({} if source.labels is None else {LABELS_KEY: source.labels})
    origin = what if isinstance(source, Mapping) else f"{what} {source}"
    arrays = _read_arrays(source, what, origin)
    inputs = graph_inputs(model)
    names = [value.name for value in inputs]
    if not arrays:
        raise BadInputError(f"{origin} is empty: need a non-empty set of N x ... arrays, one per model input "
                            f"{names} (plus optional '{LABELS_KEY}')")
    labels = arrays.pop(LABELS_KEY, None) if LABELS_KEY not in names else None
    if set(arrays) != set(names):
        if sole_array_any_name and len(names) == 1 and len(arrays) == 1:
            arrays = {names[0]: next(iter(arrays.values()))}
        else:
            sole = " (or one array of any name)" if sole_array_any_name and len(names) == 1 else ""
            raise BadInputError(f"{origin}: arrays {sorted(arrays)} do not match the model's inputs; the model's "
                                f"inputs are {names}{sole} (plus optional '{LABELS_KEY}')")
    checked = {}
    for value in inputs:
        checked[value.name] = _check_array(np.asarray(arrays[value.name]), value, origin)
    dataset = Dataset(checked, None, fixed_batch(model), origin)  # refuses unequal N
    if labels is not None:
        labels = _check_labels(np.asarray(labels), dataset.size, origin)
    elif need_labels:
        raise BadInputError(f"{origin}: needs a '{LABELS_KEY}' array (integer class per sample) to score models")
    return Dataset(checked, labels, dataset.fixed_batch, origin)


def _read_arrays(source, what: str, origin: str) -> dict[str, np.ndarray]:
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise BadInputError(f"{what} must be an .npz path or a dict of input name -> N x ... array "
                            f"(got {type(source).__name__})")
    path = Path(source)
    if not path.is_file():
        raise BadInputError(f"{what} file not found: {path}")
    try:
        with open(path, "rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError("it holds a single .npy array, not an .npz archive of named arrays")
            with loaded:
                return {name: loaded[name] for name in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInputError(f"cannot read {origin} as .npz ({first_line(exc)})") from None


def _check_array(array: np.ndarray, value: onnx.ValueInfoProto, origin: str) -> np.ndarray:
    """The array cast to the input's dtype, its rank and static non-batch dims checked."""
    name, tensor_type = value.name, value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise BadInputError(f"{origin}: model input '{name}' is not a tensor; only tensor inputs can be fed")
    if tensor_type.HasField("shape"):
        declared = list(tensor_type.shape.dim)
        if array.ndim != len(declared) or any(not is_dynamic_dim(dim) and array.shape[axis] != dim.dim_value
                                               for axis, dim in enumerate(declared) if axis > 0):
            shown = [dim.dim_param or (dim.dim_value if not is_dynamic_dim(dim) else "?") for dim in declared]
            raise BadInputError(f"{origin}: array '{name}' has shape {list(array.shape)}, which does not fit the "
                                f"model input {shown} (samples N first)")
    if array.ndim == 0:
        raise BadInputError(f"{origin}: array '{name}' is a scalar; need N x ... samples")
    if len(array) == 0:
        raise BadInputError(f"{origin}: array '{name}' holds no samples (shape {list(array.shape)})")
    return np.ascontiguousarray(_cast(array, onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type), name,
                                      origin))


def _cast(array: np.ndarray, dtype: np.dtype, name: str, origin: str) -> np.ndarray:
    """Cast within a kind (float to float, int to int when every value fits); refuse across kinds."""
    if array.dtype == dtype:
        return array
    refused = BadInputError(f"{origin}: array '{name}' has dtype {array.dtype}, the model takes {np.dtype(dtype)}")
    if np.issubdtype(dtype, np.floating):
        if not np.issubdtype(array.dtype, np.floating):
            raise refused
    elif np.issubdtype(dtype, np.integer):
        if not np.issubdtype(array.dtype, np.integer):
            raise refused
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise BadInputError(f"{origin}: array '{name}' has values outside {np.dtype(dtype)}'s range, the "
                                "dtype the model takes")
    else:
        raise refused
    return array.astype(dtype)


def _check_labels(labels: np.ndarray, count: int, origin: str) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise BadInputError(f"{origin}: '{LABELS_KEY}' must hold integer class indices (got dtype {labels.dtype})")
    if labels.ndim == 0 or len(labels) != count:
        raise BadInputError(f"{origin}: '{LABELS_KEY}' has shape {list(labels.shape)}, need one per sample "
                            f"({count} first)")
    return labels
