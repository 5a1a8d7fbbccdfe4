import numpy as np
import pytest
from onnx import helper

from conftest import GraphBuilder, apply, assert_same_outputs, op_types, reasons

PASS = "eliminate_noop_slice"
INT64_MAX = np.iinfo(np.int64).max


def _slice(g: GraphBuilder, x: str, starts, ends, axes=None, steps=None) -> str:
    inputs = [x] + [g.const(np.asarray(v, np.int64), "s") for v in (starts, ends)]
    if axes is not None or steps is not None:
        inputs.append(g.const(np.asarray(axes, np.int64), "s") if axes is not None else "")
    if steps is not None:
        inputs.append(g.const(np.asarray(steps, np.int64), "s"))
    return g.node("Slice", inputs)


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ([0], [INT64_MAX], [1], None),  # torch's x[:, :]
    ([0, 0], [2, 3], None, None),
    ([-9], [3], [-1], [1]),  # a start before the beginning clamps to 0
    ([0], [100], [0], [1]),
])
def test_full_slices_are_removed(starts, ends, axes, steps):
    g = GraphBuilder((2, 3))
    model = g.build(g.node("Relu", [_slice(g, "x", starts, ends, axes, steps)]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu"]
    assert_same_outputs(model, run.model, (2, 3))


def test_full_slice_of_a_dynamic_axis_needs_an_open_end():
    g = GraphBuilder(("N", 3))
    full = _slice(g, "x", [0], [INT64_MAX], [0])
    model = g.build([g.node("Relu", [full]), g.node("Neg", [_slice(g, "x", [0], [1000], [0])])])
    run = apply(model, PASS)
    assert sorted(op_types(run.model)) == ["Neg", "Relu", "Slice"]
    assert "ends at 1000 on axis 0, whose size is not static" in reasons(run, PASS)
    assert_same_outputs(model, run.model, (4, 3))


def test_opset9_attribute_form():
    g = GraphBuilder((2, 3), opset=9)
    g.nodes.append(helper.make_node("Slice", ["x"], ["full"], name="full", starts=[0], ends=[INT64_MAX], axes=[1]))
    g.nodes.append(helper.make_node("Slice", ["x"], ["part"], name="part", starts=[1], ends=[3], axes=[1]))
    model = g.build([g.node("Relu", ["full"]), g.node("Neg", ["part"])])
    run = apply(model, PASS)
    assert sorted(op_types(run.model)) == ["Neg", "Relu", "Slice"]
    assert "changes the shape (2, 3) -> (2, 2)" in reasons(run, PASS)
    assert_same_outputs(model, run.model, (2, 3))


@pytest.mark.parametrize("starts,ends,axes,steps,reason", [
    ([-1], [-INT64_MAX], [1], [-1], "negative step -1"),
    ([0], [INT64_MAX], [1], [2], "step 2, not 1"),
    ([1], [3], [1], None, "changes the shape (2, 3) -> (2, 2)"),
    ([0], [2], [1], None, "changes the shape"),
])
def test_refusals(starts, ends, axes, steps, reason):
    g = GraphBuilder((2, 3))
    model = g.build(g.node("Relu", [_slice(g, "x", starts, ends, axes, steps)]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Slice", "Relu"]
    assert reason in reasons(run, PASS)


def test_dynamic_axis_not_started_at_0_is_refused():
    g = GraphBuilder(("N", 3))
    model = g.build(g.node("Relu", [_slice(g, "x", [1], [INT64_MAX], [0])]))
    run = apply(model, PASS)
    assert op_types(run.model) == ["Slice", "Relu"]
    assert "starts at 1 on axis 0, not 0" in reasons(run, PASS)


def test_runtime_starts_are_refused():
    g = GraphBuilder((2, 3))
    starts = g.node("Shape", [g.const(np.zeros((0,), np.float32))])  # [0], but only at run time
    g.nodes.append(helper.make_node("Slice", ["x", starts, g.const(np.array([9], np.int64))], ["y"], name="sl"))
    model = g.build(g.node("Relu", ["y"]))
    run = apply(model, PASS)
    assert "Slice" in op_types(run.model)
    assert "starts input is not a constant" in reasons(run, PASS)


def test_full_slice_on_graph_output_keeps_the_output_name_and_input_to_output_is_kept():
    g = GraphBuilder((2, 3))
    out = _slice(g, g.node("Relu", ["x"]), [0], [INT64_MAX], [0])
    kept = _slice(g, "x", [0], [INT64_MAX], [0])
    model = g.build([out, kept])
    run = apply(model, PASS)
    assert op_types(run.model) == ["Relu", "Slice"]
    assert [o.name for o in run.model.graph.output] == [out, kept]
    assert "preserve the output name" in reasons(run, PASS)
    assert_same_outputs(model, run.model, (2, 3))
