import numpy as np
import pytest
from onnx import helper

from conftest import GraphBuilder, reasons, apply, assert_same_outputs, op_types


def _pad(g: GraphBuilder, x: str, pads, value=None, mode=None):
    inputs = [x, g.const(np.asarray(pads, np.int64))]
    if value is not None:
        inputs.append(g.const(np.asarray(value, np.float32)))
    attrs = {"mode": mode} if mode else {}
    return g.node("Pad", inputs, **attrs)


@pytest.mark.parametrize("value", [None, 0.0])
def test_zero_pad_folds_into_conv_pads(value):
    g = GraphBuilder((1, 3, 8, 8))
    padded = _pad(g, "x", [0, 0, 1, 2, 0, 0, 3, 0], value)
    model = g.build(g.conv(padded, 3, 4, pads=[1, 1, 1, 1]))
    run = apply(model, "fold_pad")
    assert op_types(run.model) == ["Conv"]
    conv = run.model.graph.node[0]
    assert list(next(a for a in conv.attribute if a.name == "pads").ints) == [2, 3, 4, 1]
    assert_same_outputs(model, run.model, (1, 3, 8, 8))


def test_opset10_pad_attribute_form():
    g = GraphBuilder((1, 2, 6, 6), opset=10)
    g.nodes.append(helper.make_node("Pad", ["x"], ["p"], name="pad", pads=[0, 0, 1, 1, 0, 0, 1, 1]))
    model = g.build(g.conv("p", 2, 2))
    run = apply(model, "fold_pad")
    assert op_types(run.model) == ["Conv"]
    assert_same_outputs(model, run.model, (1, 2, 6, 6))


@pytest.mark.parametrize("pads,value,mode,reason", [
    ([0, 0, 1, 1, 0, 0, 1, 1], 1.0, None, "not a constant zero"),
    ([0, 0, 1, 1, 0, 0, 1, 1], None, "reflect", "not zero padding"),
    ([0, 1, 0, 0, 0, 0, 0, 0], None, None, "channel axis"),
    ([0, 0, -1, 0, 0, 0, 0, 0], None, None, "negative"),
])
def test_refusals(pads, value, mode, reason):
    g = GraphBuilder((1, 3, 8, 8))
    padded = _pad(g, "x", pads, value, mode)
    channels = 4 if pads[1] else 3
    model = g.build(g.conv(padded, channels, 2))
    run = apply(model, "fold_pad")
    assert "Pad" in op_types(run.model)
    assert reason in reasons(run, "fold_pad")


def test_pad_with_two_consumers_is_refused():
    g = GraphBuilder((1, 3, 8, 8))
    padded = _pad(g, "x", [0, 0, 1, 1, 0, 0, 1, 1])
    model = g.build([g.conv(padded, 3, 2), g.node("Relu", [padded])])
    run = apply(model, "fold_pad")
    assert "Pad" in op_types(run.model)
