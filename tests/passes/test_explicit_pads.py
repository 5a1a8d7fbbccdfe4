import pytest

from conftest import GraphBuilder, reasons, apply, assert_same_outputs, op_types


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("stride,kernel,size", [(1, 3, 7), (2, 3, 8), (2, 4, 9), (3, 2, 10)])
def test_auto_pad_becomes_explicit(mode, stride, kernel, size):
    g = GraphBuilder((1, 2, size, size))
    model = g.build(g.conv("x", 2, 3, k=kernel, strides=[stride, stride], auto_pad=mode))
    run = apply(model, "explicit_pads")
    node = run.model.graph.node[0]
    assert [a.name for a in node.attribute if a.name == "auto_pad"] == []
    assert any(a.name == "pads" for a in node.attribute)
    assert_same_outputs(model, run.model, (1, 2, size, size))


def test_strided_same_padding_without_static_shape_is_refused():
    g = GraphBuilder((1, 2, "h", "w"))
    model = g.build(g.conv("x", 2, 3, strides=[2, 2], auto_pad="SAME_UPPER"))
    run = apply(model, "explicit_pads")
    assert "not static" in reasons(run, "explicit_pads")


def test_stride_one_same_padding_needs_no_shape():
    g = GraphBuilder((1, 2, "h", "w"))
    model = g.build(g.conv("x", 2, 3, k=4, auto_pad="SAME_LOWER"))
    run = apply(model, "explicit_pads")
    assert run.rewrites_per_pass() == {"explicit_pads": 1}
    assert_same_outputs(model, run.model, (1, 2, 6, 5))
    assert op_types(run.model) == ["Conv"]
