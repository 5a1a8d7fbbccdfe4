"""The CUDA path of profile/compare (IOBinding, CUDA graphs, device memory). Skips cleanly without a GPU."""

import functools

import pytest

from onnxmerge.errors import BadInputError
from onnxmerge.io import save_model
from onnxmerge.profiler import compare, profile
from onnxmerge.runner import make_session

from conftest import GraphBuilder


def _cnn():
    g = GraphBuilder((1, 3, 32, 32))
    return g.build(g.node("Relu", [g.conv(g.node("Relu", [g.conv("x", 3, 16, pads=[1, 1, 1, 1])]), 16, 16)]))


@functools.lru_cache(maxsize=1)
def _cuda_works() -> bool:
    try:
        make_session(_cnn(), provider="cuda")
    except BadInputError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _cuda_works(), reason="needs onnxruntime-gpu and a working CUDA device")


@pytest.fixture
def model_path(tmp_path):
    return save_model(_cnn(), tmp_path / "cnn.onnx")


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_profile_on_cuda_uses_cuda_and_reports_device_memory(model_path, cuda_graph):
    report = profile(model_path, provider="cuda", runs=20, warmup=5, cuda_graph=cuda_graph)
    assert report["session"]["providers"][0] == "CUDAExecutionProvider"
    assert report["session"]["cuda_graph"] is cuda_graph
    assert 0 < report["latency"]["median_ms"] <= report["latency"]["p90_ms"]
    assert report["memory"]["device_bytes"] is None or report["memory"]["device_bytes"] > 0
    assert report["environment"]["gpu"]


def test_compare_and_per_node_on_cuda(model_path):
    report = compare(model_path, model_path, provider="cuda", runs=20, warmup=5)
    assert report["speedup"]["p10"] <= report["speedup"]["median"] <= report["speedup"]["p90"]
    per_node = profile(model_path, provider="cuda", runs=5, warmup=2, per_node=True)["per_node"]
    assert per_node["nodes"] and per_node["total_node_us"] > 0
