"""Refusals are records, one per refused candidate: helpers raise Refused, passes list Refusal."""

import io
import json
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from onnxmerge.graph import bypass, import_graph, ints_param, read_conv_params
from onnxmerge.pass_framework import NodeRewritePass, PassContext, Refusal, Refused
from onnxmerge.report import print_explain

from conftest import GraphBuilder, apply, refusals

SLICE_STARTS_AT_1 = "it starts at 1 on axis 1, not 0"
SLICE_ENDS_AT_2 = "it ends at 2 on axis 1 of size 4"


def _unnamed_slices() -> onnx.ModelProto:
    """Two Slice nodes without names, left alone by eliminate_noop_slice for different reasons."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in
               (("a", ["N", 3]), ("b", ["N", 2]))]
    ints = {"one": [1], "two": [2], "zero": [0], "big": [100], "axis": [1]}
    initializers = [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in ints.items()]
    nodes = [helper.make_node("Slice", ["x", "one", "big", "axis"], ["a"]),   # starts at 1
             helper.make_node("Slice", ["x", "zero", "two", "axis"], ["b"])]  # ends at 2 of 4
    graph = helper.make_graph(nodes, "unnamed", [x], outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    assert all(not node.name for node in model.graph.node)
    return model


def test_unnamed_nodes_of_one_op_each_keep_their_refusal():
    run = apply(_unnamed_slices(), "eliminate_noop_slice")
    found = refusals(run, "eliminate_noop_slice")
    assert [(r.node, r.op_type, r.reason) for r in found] == [("", "Slice", SLICE_STARTS_AT_1),
                                                               ("", "Slice", SLICE_ENDS_AT_2)]
    assert [r.label for r in found] == ["<unnamed Slice #0>", "<unnamed Slice #1>"]
    assert all(r.pass_name == "eliminate_noop_slice" for r in found)


def test_explain_lists_every_unnamed_refusal():
    run = apply(_unnamed_slices(), "eliminate_noop_slice")
    out = io.StringIO()
    print_explain(Console(file=out, width=80), run.refusals)
    lines = out.getvalue().splitlines()
    assert lines[0] == "eliminate_noop_slice"
    assert f"  <unnamed Slice #0> (Slice): {SLICE_STARTS_AT_1}" in lines
    assert f"  <unnamed Slice #1> (Slice): {SLICE_ENDS_AT_2}" in lines
    # The JSON form (what the CLI passes) prints the same lines.
    out = io.StringIO()
    print_explain(Console(file=out, width=80), run.refusals_dict())
    assert out.getvalue().splitlines() == lines


def test_cli_explain_and_json_show_both_unnamed_refusals(tmp_path, capsys):
    from onnxmerge.cli import main

    source, folded, report_path = tmp_path / "slices.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_unnamed_slices(), source)
    assert main(["fold", str(source), str(folded), "--explain", "--json", str(report_path)]) == 0
    stdout = capsys.readouterr().out
    explained = [line for line in stdout.splitlines() if "(Slice): " in line]
    assert len(explained) == 2
    assert any(line.endswith(SLICE_STARTS_AT_1) for line in explained)
    assert any(line.endswith(SLICE_ENDS_AT_2) for line in explained)

    report = json.loads(report_path.read_text())
    assert isinstance(report["refusals"], dict)
    assert all(isinstance(found, list) for found in report["refusals"].values())
    slices = report["refusals"]["eliminate_noop_slice"]
    assert sorted(entry["reason"] for entry in slices) == sorted([SLICE_STARTS_AT_1, SLICE_ENDS_AT_2])
    for entry in slices:
        assert entry["pass"] == "eliminate_noop_slice" and entry["op_type"] == "Slice"
        assert set(entry) >= {"pass", "node", "label", "op_type", "reason", "nodes"}
        assert isinstance(entry["nodes"], list)
        assert entry["node"]  # fold canonicalizes: every node has a unique name by then
    assert len({entry["node"] for entry in slices}) == 2


def test_a_node_refused_by_two_passes_is_listed_under_both():
    g = GraphBuilder((1, 4, 9, 9))
    middle = g.conv("x", 4, 6, k=1)  # a bias, and the next conv pads: not exact at the border
    out = g.conv(middle, 6, 5, k=3, pads=[1, 1, 1, 1])
    model = g.build(out)
    second = next(node.name for node in model.graph.node if out in node.output)
    first = next(node.name for node in model.graph.node if middle in node.output)
    run = apply(model, "explicit_pads", "merge_conv_chain", allow_costlier_merges=True)
    by_pass = {name: [r for r in refusals(run, name) if r.node == second]
               for name in ("explicit_pads", "merge_conv_chain")}
    assert [r.reason for r in by_pass["explicit_pads"]] == ["it already has explicit pads"]
    (merge,) = by_pass["merge_conv_chain"]
    assert "bias" in merge.reason and merge.op_type == "Conv"
    assert merge.nodes == (first, second)
    assert merge.to_dict()["nodes"] == [first, second]


def _conv_graph(weight_is_constant: bool) -> gs.Graph:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])
    inputs = [x]
    initializers = []
    if weight_is_constant:
        initializers.append(numpy_helper.from_array(np.ones((3, 2, 3, 3), np.float32), "w"))
    else:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2, 3, 3]))
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
             helper.make_node("Unsqueeze", ["y", "axes"], ["z"], name="unsq")]
    inputs.append(helper.make_tensor_value_info("axes", TensorProto.INT64, [1]))
    outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1, 3, 3, 3])]
    graph = helper.make_graph(nodes, "conv", inputs, outputs, initializer=initializers)
    return import_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def test_helpers_raise_refused_naming_the_nodes():
    graph = _conv_graph(weight_is_constant=False)
    conv, unsqueeze = graph.nodes
    with pytest.raises(Refused) as refused:
        read_conv_params(conv)
    assert refused.value.reason == "its weight is not a constant" and refused.value.nodes == ("conv",)
    with pytest.raises(Refused) as refused:
        read_conv_params(unsqueeze)
    assert refused.value.nodes == ("unsq",) and "not a Conv" in str(refused.value)
    with pytest.raises(Refused) as refused:
        ints_param(unsqueeze, "axes", 1)
    assert refused.value.reason == "its axes input is not a constant" and refused.value.nodes == ("unsq",)
    # A graph input linked to a graph output: removing the node would rename the output.
    with pytest.raises(Refused) as refused:
        bypass(graph, unsqueeze, graph.inputs[0], unsqueeze.outputs[0])
    assert "preserve the output name" in refused.value.reason and refused.value.nodes == ("unsq",)
    assert read_conv_params(_conv_graph(weight_is_constant=True).nodes[0]).out_channels == 3


def test_refused_within_adds_context_and_nodes():
    inner = Refused("its weight is not a constant", ["b", "", "b"])
    assert inner.nodes == ("b",)
    outer = inner.within("cannot read Conv 'b'", ["a", "b"])
    assert outer.reason == "cannot read Conv 'b': its weight is not a constant"
    assert outer.nodes == ("a", "b")
    record = Refusal(pass_name="p", node="", op_type="Relu", reason="r", nodes=outer.nodes, index=3)
    assert record.label == "<unnamed Relu #3>"
    assert record.to_dict() == {"pass": "p", "node": "", "label": "<unnamed Relu #3>", "op_type": "Relu",
                                "reason": "r", "nodes": ["a", "b"], "index": 3}


class _ReturnsAReason(NodeRewritePass):
    name = "returns_a_reason"
    description = "A pass still on the old contract."
    op_types: ClassVar[tuple[str, ...]] = ("Conv",)

    def rewrite(self, graph, node, ctx):
        return "old-style reason"


def test_a_rewrite_returning_a_reason_is_an_error():
    model = onnx.ModelProto()
    with pytest.raises(TypeError, match="raise Refused"):
        _ReturnsAReason().run(_conv_graph(weight_is_constant=True), PassContext(template=model))
