"""compress on the prepared-model spine: unnamed and repeated node names are fine, the output is checked
before any table is measured, settings travel as one value."""

import time

import numpy as np
import onnx
import pytest

from conftest import GraphBuilder, op_types
from onnxmerge.errors import BadInputError
from onnxmerge.io import save_model
from onnxmerge.layermerge.api import CompressOptions, compress, inspect
from onnxmerge.runner import RuntimeSettings


def _chain(names: str) -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu-Conv-Relu-Conv with every node unnamed, or all named "n"."""
    g = GraphBuilder((1, 4, 8, 8))
    model = g.build(g.node("GlobalAveragePool", [g.relu_chain("x", 4, 4)]))
    for node in model.graph.node:
        node.name = "" if names == "unnamed" else "n"
    return model


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((16, 4, 8, 8)).astype(np.float32))
    return path


@pytest.mark.parametrize("names", ["unnamed", "duplicate"])
def test_unnamed_or_repeated_node_names_are_not_refused(names, calib, tmp_path):
    model = save_model(_chain(names), tmp_path / "m.onnx")
    named = save_model(_chain("unnamed"), tmp_path / "ref.onnx")
    assert int(inspect(str(model))[-1].caption.split()[0]) == int(inspect(str(named))[-1].caption.split()[0]) > 0
    result = compress(model, tmp_path / "out.onnx", calibration=calib, latency_budget_ms=1e6, recover=False,
                      runs=3, warmup=1)
    out = onnx.load(tmp_path / "out.onnx")
    assert op_types(out).count("Conv") <= 4 and result.output == str(tmp_path / "out.onnx")
    assert len({n.name for n in out.graph.node}) == len(out.graph.node)  # every node named, once


def test_output_is_checked_before_any_work(calib, tmp_path):
    model = save_model(_chain("unnamed"), tmp_path / "m.onnx")
    started = time.perf_counter()
    with pytest.raises(BadInputError, match="output folder does not exist"):
        compress(model, tmp_path / "missing" / "out.onnx", calibration=calib, speedup=1.5, recover=False)
    with pytest.raises(BadInputError, match="force=True"):
        compress(model, model, calibration=calib, speedup=1.5, recover=False)
    assert time.perf_counter() - started < 5  # refused before canonicalisation, tables or timing


def test_settings_and_options_are_one_value_each(calib, tmp_path):
    with pytest.raises(BadInputError, match="unknown compress parameter"):
        compress(_chain("unnamed"), None, calibration=calib, speedup=1.5, thread=2)
    with pytest.raises(BadInputError, match="speedup=0.9 must be > 1"):
        CompressOptions(speedup=0.9)
    with pytest.raises(BadInputError, match="threads must be >= 1"):
        compress(_chain("unnamed"), None, calibration=calib, settings=RuntimeSettings(threads=0))
    assert hash(CompressOptions(speedup=1.5)) == hash(CompressOptions(speedup=1.5))
    assert RuntimeSettings().with_overrides(runs=5).cache_fields() == RuntimeSettings().cache_fields()
