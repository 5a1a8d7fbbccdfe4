"""Building ORT sessions and the inputs to feed them, the same way for verification, profiling and tuning."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from onnxmerge.canonical import is_dynamic_dim
from onnxmerge.errors import BadInputError
from onnxmerge.io import EXTERNAL_DATA_THRESHOLD_BYTES, iter_tensors, temporary_model_file, tensor_bytes
from onnxmerge.ort import ort

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(opt_level: str = "all", threads: int = 1) -> "ort.SessionOptions":
    """Explicit, reproducible settings: fixed intra-op threads, one inter-op thread, sequential."""
    options = ort.SessionOptions()
    options.graph_optimization_level = OPT_LEVELS[opt_level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def provider_list(provider: str = "cpu", *, cuda_graph: bool = False) -> list:
    """ORT's provider list for a short name; CPU stays last so unsupported nodes still run."""
    available = sorted(name for name, full in PROVIDERS.items() if full in ort.get_available_providers())
    if provider not in PROVIDERS:
        raise BadInputError(f"unknown provider '{provider}'; available here: {', '.join(available)}")
    if provider not in available:
        raise BadInputError(f"provider '{provider}' is not in this ONNX Runtime build (pip install "
                            f"'onnxmerge[gpu]' for CUDA); available here: {', '.join(available)}")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    options = {"enable_cuda_graph": "1"} if cuda_graph else {}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


@dataclass(frozen=True)
class RuntimeSettings:
    """How ORT runs a model for timing: one frozen, hashable value passed whole from the CLI down to the
    timing loop and the latency cache (whose key derives from :meth:`cache_fields`)."""

    provider: str = "cpu"
    threads: int = 1
    opt_level: str = "all"
    cuda_graph: bool = False
    warmup: int = 10
    runs: int = 50

    def __post_init__(self) -> None:
        check_timing_options(self.runs, self.threads, self.opt_level, self.warmup)
        if self.provider not in PROVIDERS:
            provider_list(self.provider)  # raises, naming the providers this ORT build offers
        if self.cuda_graph and self.provider != "cuda":
            raise BadInputError("cuda_graph needs provider='cuda'")

    def with_overrides(self, **overrides) -> "RuntimeSettings":
        """A copy with some fields changed (unknown names are refused with the list of known ones)."""
        unknown = sorted(set(overrides) - set(self.__dataclass_fields__))
        if unknown:
            raise BadInputError(f"unknown runtime setting(s) {unknown}; known: {sorted(self.__dataclass_fields__)}")
        return replace(self, **overrides) if overrides else self

    def cache_fields(self) -> dict:
        """What changes a measured latency (not how many times it is sampled): the latency cache's key."""
        return {"provider": self.provider, "threads": self.threads, "opt_level": self.opt_level,
                "cuda_graph": self.cuda_graph}

    def session(self, model, *, base_dir=None) -> "ort.InferenceSession":
        """An ORT session over ``model`` with these settings."""
        return make_session(model, opt_level=self.opt_level, threads=self.threads, provider=self.provider,
                            cuda_graph=self.cuda_graph, base_dir=base_dir)


def check_timing_options(runs: int, threads: int, opt_level: str, warmup: int = 0) -> None:
    """The settings every timed or profiled run shares, refused with one line when unusable."""
    if warmup < 0 or runs < 1:
        raise BadInputError(f"need runs >= 1 and warmup >= 0 (got runs={runs}, warmup={warmup})")
    if threads < 1:
        raise BadInputError(f"threads must be >= 1 (got {threads}); 0 would let ORT pick and hide the setting")
    if opt_level not in OPT_LEVELS:
        raise BadInputError(f"unknown opt level '{opt_level}'; choose from {', '.join(OPT_LEVELS)}")


def make_session(model: onnx.ModelProto | str | os.PathLike, *, opt_level: str = "all", threads: int = 1,
                 provider: str = "cpu", cuda_graph: bool = False,
                 options: "ort.SessionOptions | None" = None,
                 base_dir: str | os.PathLike | None = None) -> "ort.InferenceSession":
    """An ORT session over a path or an in-memory model (large models go through a temporary file); an
    in-memory model whose large tensors stayed in external data reads them from ``base_dir``.

    Asking for CUDA where it cannot load is an error here, not ORT's silent fall-back to the CPU: what
    the session really uses is read back with ``get_providers()``.
    """
    options = options or session_options(opt_level, threads)
    providers = provider_list(provider, cuda_graph=cuda_graph)
    session = _create_session(model, options, providers, base_dir)
    wanted = PROVIDERS[provider]
    if session.get_providers()[0] != wanted:
        raise BadInputError(f"{wanted} was requested but could not be loaded (session uses "
                            f"{session.get_providers()}; installed build offers {ort.get_available_providers()})")
    return session


_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_DISABLE_PREPACKING_KEY = "session.disable_prepacking"


def _create_session(model, options, providers, base_dir=None) -> "ort.InferenceSession":
    """A session over a path; over a ModelProto as bytes, with its external tensors (if any) read from
    ``base_dir``; through the one temporary model file when the proto is too large to serialise."""
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(str(model), options, providers=providers)
    external = base_dir is not None and any(t.data_location == onnx.TensorProto.EXTERNAL
                                            for t in iter_tensors(model.graph))
    if external:
        # Weights in external data: ORT maps them from their file. Pre-packing them would take a second copy
        # of every weight.
        options.add_session_config_entry(_DISABLE_PREPACKING_KEY, "1")
    if tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD_BYTES:
        if external:
            options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(Path(base_dir).resolve()))
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with temporary_model_file(model, base_dir) as path:
        return ort.InferenceSession(str(path), options, providers=providers)


def bound_runner(session: "ort.InferenceSession", feeds: dict[str, np.ndarray], provider: str = "cpu"):
    """A zero-argument callable running the session once, for timing loops.

    On CUDA, inputs are copied to the device once and outputs stay there (IOBinding), so the timed call
    contains no host copies; outputs are bound to pre-allocated buffers, which CUDA graphs require.
    """
    if provider == "cpu":
        return lambda: session.run(None, feeds)
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", 0)
    session.run_with_iobinding(binding)  # learn the output shapes, then pin buffers at fixed addresses
    shapes = [(value.shape(), value.data_type()) for value in binding.get_outputs()]
    binding.clear_binding_outputs()
    for output, (shape, data_type) in zip(session.get_outputs(), shapes):
        dtype = _ORT_TYPE_TO_NUMPY.get(data_type, np.float32)
        binding.bind_ortvalue_output(output.name, ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0))
    binding.synchronize_inputs()
    return lambda: session.run_with_iobinding(binding)


_ORT_TYPE_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                      "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


@dataclass
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    assumed: list[str]  # human-readable notes about dims we had to guess


def input_specs(model: onnx.ModelProto, overrides: dict[str | None, tuple[int, ...]] | None = None) -> list[InputSpec]:
    """Concrete shapes for every real graph input: declared dims, user overrides, unknown dims → 1 (said)."""
    overrides = dict(overrides or {})
    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializer_names]
    if None in overrides:
        if len(inputs) != 1:
            raise BadInputError("input_shapes= without an input name needs a single-input model")
        overrides[inputs[0].name] = overrides.pop(None)
    unknown = set(overrides) - {v.name for v in inputs}
    if unknown:
        raise BadInputError(
            f"input_shapes= names unknown input(s) {sorted(unknown)}; model inputs: {[v.name for v in inputs]}"
        )
    specs = []
    for value in inputs:
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        declared = list(tensor_type.shape.dim)
        if value.name in overrides:
            shape = overrides[value.name]
            if len(shape) != len(declared):
                raise BadInputError(
                    f"input_shapes= for '{value.name}' has rank {len(shape)}, the model declares rank {len(declared)}"
                )
            for axis, (dim, want) in enumerate(zip(declared, shape)):
                if not is_dynamic_dim(dim) and dim.dim_value != want:
                    raise BadInputError(
                        f"input_shapes= for '{value.name}' sets dim {axis} to {want}, the model fixes it to {dim.dim_value}"
                    )
            specs.append(InputSpec(value.name, dtype, tuple(shape), []))
            continue
        shape, assumed = [], []
        for axis, dim in enumerate(declared):
            if not is_dynamic_dim(dim):
                shape.append(dim.dim_value)
            else:
                shape.append(1)
                written = dim.dim_param or (f"written as {dim.dim_value}" if dim.HasField("dim_value") else "unnamed")
                assumed.append(f"{value.name}[{axis}] ({written}) set to 1")
        specs.append(InputSpec(value.name, dtype, tuple(shape), assumed))
    return specs


def random_inputs(specs: list[InputSpec], seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs: standard normal floats (both signs exercise more of a graph), small ints, random bools."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            feeds[spec.name] = rng.integers(0, 10, spec.shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = rng.random(spec.shape) < 0.5
        else:
            raise BadInputError(f"input '{spec.name}' has dtype {spec.dtype}, which random inputs do not cover")
    return feeds
