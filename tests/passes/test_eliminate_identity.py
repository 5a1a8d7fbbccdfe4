import numpy as np
from onnx import helper

from conftest import GraphBuilder, reasons, apply, assert_same_outputs, op_types


def test_identity_and_dropout_removed_and_output_names_kept():
    g = GraphBuilder((1, 3, 5, 5), opset=13)
    weight = g.node("Identity", [g.const(g.rng.standard_normal((2, 3, 3, 3)).astype(np.float32))])
    conv = g.node("Conv", ["x", weight])
    dropped = g.node("Dropout", [conv])
    out = g.node("Identity", [g.node("Relu", [dropped])])
    model = g.build(out)
    run = apply(model, "eliminate_identity")
    assert op_types(run.model) == ["Conv", "Relu"]
    assert run.model.graph.output[0].name == out
    assert_same_outputs(model, run.model, (1, 3, 5, 5))


def test_identity_from_graph_input_to_output_is_kept():
    g = GraphBuilder((2,))
    model = g.build(g.node("Identity", ["x"]))
    run = apply(model, "eliminate_identity")
    assert op_types(run.model) == ["Identity"]
    assert "preserve the output name" in reasons(run, "eliminate_identity")


def test_dropout_with_used_mask_or_training_is_kept():
    g = GraphBuilder((1, 4), opset=13)
    out, mask = g.node("Dropout", ["x"], n_outputs=2)
    training = g.const(np.array(True))
    g.nodes.append(helper.make_node("Dropout", [out, g.const(np.float32(0.5)), training], ["y"], name="train_drop"))
    model = g.build(["y", mask])
    run = apply(model, "eliminate_identity")
    assert op_types(run.model) == ["Dropout", "Dropout"]
    assert "training mode" in reasons(run, "eliminate_identity", "train_drop")
    assert "mask" in reasons(run, "eliminate_identity")


def test_identity_output_with_other_readers():
    """The source's other readers must follow it to the renamed tensor."""
    g = GraphBuilder((1, 3))
    relu = g.node("Relu", ["x"])
    out = g.node("Identity", [relu])
    model = g.build([out, g.node("Neg", [relu])])
    run = apply(model, "eliminate_identity")
    assert op_types(run.model) == ["Relu", "Neg"]
    assert [o.name for o in run.model.graph.output] == [out, model.graph.output[1].name]
    assert_same_outputs(model, run.model, (1, 3))
