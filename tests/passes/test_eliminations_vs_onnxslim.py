"""The elimination passes together, on a soup of the no-ops tf2onnx and torch.onnx exports leave behind."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T

from onnxmerge.passes import DEFAULT_PIPELINE
from onnxmerge.pipeline import run_pipeline

from conftest import GraphBuilder, assert_same_outputs, op_types

onnxslim = pytest.importorskip("onnxslim")


def _pattern_soup(batch) -> onnx.ModelProto:
    g = GraphBuilder((batch, 3, 8, 8), opset=13)
    int64 = lambda v: g.const(np.asarray(v, np.int64), "c")  # noqa: E731
    y = g.conv("x", 3, 4, pads=[1, 1, 1, 1])
    # tf2onnx: NCHW -> NHWC -> NCHW around an op it kept in NCHW.
    y = g.node("Transpose", [g.node("Transpose", [y], perm=[0, 2, 3, 1])], perm=[0, 3, 1, 2])
    y = g.node("Reshape", [y, int64([-1, 4, 8, 8])])  # view to its own shape
    y = g.node("Cast", [g.node("Cast", [y], to=T.DOUBLE)], to=T.FLOAT)  # .double().float()
    y = g.node("Cast", [y], to=T.FLOAT)  # .float() on a float tensor
    y = g.node("Squeeze", [g.node("Unsqueeze", [y, int64([0])]), int64([0])])
    y = g.node("Slice", [y, int64([0, 0]), int64([np.iinfo(np.int64).max] * 2), int64([2, 3])])  # y[:, :, :, :]
    y = g.node("Expand", [y, int64([1, 4, 1, 1])])  # .expand_as(y)
    # Two heads computing the same thing (a shared module called twice), the second with a twin constant.
    heads = [g.node("Mul", [g.node("Relu", [y]), g.const(np.full((4, 1, 1), 0.5, np.float32))]) for _ in range(2)]
    y = g.node("Add", heads)
    y = g.node("Reshape", [g.node("Reshape", [y, int64([0, 4, 64])]), int64([0, 256])])  # flatten in two steps
    return g.build(g.node("Identity", [y]))


@pytest.mark.parametrize("batch", [1, "N"])
def test_pipeline_leaves_no_more_nodes_than_onnxslim(batch):
    model = _pattern_soup(batch)
    ours = run_pipeline(model, DEFAULT_PIPELINE).model
    theirs = onnxslim.slim(model)
    assert len(ours.graph.node) <= len(theirs.graph.node), (op_types(ours), op_types(theirs))
    assert op_types(ours) == ["Conv", "Relu", "Mul", "Add", "Reshape"]
    assert [o.name for o in ours.graph.output] == [o.name for o in model.graph.output]
    assert_same_outputs(model, ours, (2 if batch == "N" else 1, 3, 8, 8))
