"""Models for the soup tests: hand-built graphs, and the digits family of bench.soup (trained once per session)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bench.soup import DigitsFamily, build_digits_family
from conftest import GraphBuilder


def small_cnn(seed: int = 0, *, transB: int = 1, group: int = 1, channels: int = 4) -> onnx.ModelProto:
    """Conv-BN-Relu, a residual conv, global pooling, Flatten and a Gemm head: the shape of a real CNN."""
    g = GraphBuilder((1, 3, 8, 8), seed=seed)
    first = g.node("Relu", [g.batchnorm(g.conv("x", 3, channels, pads=[1, 1, 1, 1]), channels)])
    second = g.conv(first, channels, channels, groups=group, pads=[1, 1, 1, 1])
    pooled = g.node("GlobalAveragePool", [g.node("Add", [second, first])])
    flat = g.node("Flatten", [pooled], axis=1)
    weight = g.rng.standard_normal((5, channels) if transB else (channels, 5)).astype(np.float32)
    head = g.node("Gemm", [flat, g.const(weight), g.const(g.rng.standard_normal(5).astype(np.float32))],
                  transB=transB)
    return g.build(head)


def initializer_arrays(model: onnx.ModelProto) -> list[np.ndarray]:
    return [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]


_TRAINED: dict[str, DigitsFamily] = {}


@pytest.fixture(scope="session")
def digits_family(tmp_path_factory) -> DigitsFamily:
    """A base digits ResNet, four fine-tunes of it (seeds, learning rates, input noise) and two MLPs trained
    from scratch, exported with BatchNormalization kept; short training, so the family takes seconds.

    Each test module that imports this fixture gets its own copy of it, so the family is cached here to be
    trained once per session."""
    if "family" not in _TRAINED:
        _TRAINED["family"] = build_digits_family(tmp_path_factory.mktemp("digits"))
    return _TRAINED["family"]
