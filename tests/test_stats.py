"""MAC counting: exact where shapes allow it, unknown with a reason otherwise, never an exception."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmerge import stats
from onnxmerge.conv_algebra import ConvParams, conv_macs
from onnxmerge.stats import MACS_UNKNOWN_LIST_LIMIT, model_stats, node_costs, static_shapes


def _model(nodes, inputs, outputs, initializers=(), opset=17):
    """inputs/outputs: {name: shape or None} (float32) or ValueInfoProtos; initializers: {name: array}."""
    def values(spec):
        if isinstance(spec, dict):
            return [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in spec.items()]
        return list(spec)
    inits = [numpy_helper.from_array(np.asarray(a), n) for n, a in dict(initializers).items()]
    graph = helper.make_graph(nodes, "stats", values(inputs), values(outputs), inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _single(op, inputs, initializers=None, input_shapes=None, opset=17, **attrs):
    """One node 'n' reading the given inputs ({name: shape}); returns its node_costs entry."""
    initializers = initializers or {}
    graph_inputs = {name: shape for name, shape in inputs.items() if name not in initializers}
    node = helper.make_node(op, list(inputs), ["y"], name="n", **attrs)
    model = _model([node], graph_inputs, {"y": None}, initializers, opset=opset)
    return node_costs(model, input_shapes or {})["n"]


def _known(cost) -> int:
    assert cost["macs_reason"] is None, cost["macs_reason"]
    assert isinstance(cost["macs"], int)
    return cost["macs"]


def _unknown(cost) -> str:
    assert cost["macs"] is None
    assert isinstance(cost["macs_reason"], str) and cost["macs_reason"]
    return cost["macs_reason"]


# --- MatMul: numpy semantics for every rank combination ---------------------------------------------------

MATMUL_CASES = {
    "1x1": ((4,), (4,), 4),
    "1x2": ((4,), (4, 3), 3 * 4),
    "2x1": ((2, 4), (4,), 2 * 4),
    "2x2": ((2, 4), (4, 3), 2 * 3 * 4),
    "3x2": ((5, 2, 4), (4, 3), 5 * 2 * 3 * 4),
    "2x3": ((2, 4), (5, 4, 3), 5 * 2 * 3 * 4),
    "4x4_broadcast": ((2, 1, 3, 4), (1, 5, 4, 6), 2 * 5 * 3 * 6 * 4),
    "1x3": ((4,), (5, 4, 3), 5 * 3 * 4),
    "3x1": ((5, 2, 4), (4,), 5 * 2 * 4),
}


@pytest.mark.parametrize("case", list(MATMUL_CASES))
@pytest.mark.parametrize("b_is_weight", [False, True])
def test_matmul_every_rank_combination(case, b_is_weight):
    a, b, expected = MATMUL_CASES[case]
    # independent check: numpy's output shape times the contracted dim
    assert math.prod(np.matmul(np.zeros(a), np.zeros(b)).shape) * a[-1] == expected
    inits = {"b": np.zeros(b, np.float32)} if b_is_weight else {}
    assert _known(_single("MatMul", {"a": a, "b": b}, inits)) == expected


def test_matmul_integer_and_qlinear_matmul():
    u8 = lambda shape: np.zeros(shape, np.uint8)  # noqa: E731
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 4])
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"], name="n")
    model = _model([node], [a], {"y": None}, {"b": u8((4, 3))})
    assert _known(node_costs(model, {})["n"]) == 2 * 3 * 4
    scalars = {"sa": np.float32(0.1), "za": np.uint8(0), "sb": np.float32(0.1), "zb": np.uint8(0),
               "sy": np.float32(0.1), "zy": np.uint8(0), "b": u8((5, 4, 3))}
    node = helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"], name="n")
    model = _model([node], [a], {"y": None}, scalars)
    assert _known(node_costs(model, {})["n"]) == 5 * 2 * 3 * 4


# --- Gemm -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_each_transpose_combination(trans_a, trans_b):
    m, k, n = 3, 5, 7
    a = (k, m) if trans_a else (m, k)
    b = (n, k) if trans_b else (k, n)
    cost = _single("Gemm", {"a": a, "b": b, "c": (n,)}, {"b": np.zeros(b, np.float32), "c": np.zeros(n, np.float32)},
                   transA=trans_a, transB=trans_b)
    assert _known(cost) == m * n * k


def test_gemm_with_mismatched_operands_is_unknown():
    reason = _unknown(_single("Gemm", {"a": (3, 5), "b": (4, 7)}, {"b": np.zeros((4, 7), np.float32)}))
    assert "contracted" in reason and "Gemm 'n'" in reason


# --- Einsum -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("equation, shapes, contracted, expected", [
    ("ij,jk->ik", [(3, 4), (4, 5)], 4, 3 * 4 * 5),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], 4, 2 * 3 * 4 * 5),
    ("bhqd,bhkd->bhqk", [(2, 3, 5, 8), (2, 3, 7, 8)], 8, 2 * 3 * 5 * 7 * 8),
    ("...ij,...jk->...ik", [(2, 3, 4), (4, 5)], 4, 2 * 3 * 4 * 5),
    ("b i j , b j k", [(2, 3, 4), (2, 4, 5)], 2 * 4, 2 * 3 * 4 * 5),  # implicit output sums b too
])
def test_einsum_two_operands(equation, shapes, contracted, expected):
    # independent check: numpy's einsum output shape times the summed-over sizes
    out = np.einsum(equation.replace(" ", ""), *(np.zeros(s) for s in shapes))
    assert math.prod(out.shape) * contracted == expected
    inputs = {f"x{i}": shape for i, shape in enumerate(shapes)}
    assert _known(_single("Einsum", inputs, equation=equation)) == expected


def test_einsum_one_operand_costs_nothing_three_are_unknown():
    assert _known(_single("Einsum", {"x": (3, 4)}, equation="ij->ji")) == 0
    reason = _unknown(_single("Einsum", {"x": (3, 4), "y": (4, 5), "z": (5, 6)}, equation="ij,jk,kl->il"))
    assert "3 operands" in reason


# --- convolutions -----------------------------------------------------------------------------------------


def _conv(x_shape, w_shape, op="Conv", **attrs):
    return _single(op, {"x": x_shape, "w": w_shape}, {"w": np.zeros(w_shape, np.float32)}, **attrs)


def test_grouped_and_depthwise_conv_match_conv_algebra():
    grouped = _known(_conv((1, 8, 10, 10), (16, 4, 3, 3), group=2, pads=[1, 1, 1, 1]))
    assert grouped == 1 * 16 * 10 * 10 * 4 * 3 * 3
    params = ConvParams.make(np.zeros((16, 4, 3, 3)), None, strides=None, dilations=None, pads=[1] * 4, groups=2)
    assert grouped == conv_macs(params, (10, 10))
    depthwise = _known(_conv((1, 8, 10, 10), (8, 1, 3, 3), group=8, pads=[1, 1, 1, 1]))
    assert depthwise == 8 * 10 * 10 * 9
    params = ConvParams.make(np.zeros((8, 1, 3, 3)), None, strides=None, dilations=None, pads=[1] * 4, groups=8)
    assert depthwise == conv_macs(params, (10, 10))


def test_strided_batched_conv():
    # (2, 3, 15, 15) -> stride 2, k 3, no pad -> 7x7 output
    assert _known(_conv((2, 3, 15, 15), (4, 3, 3, 3), strides=[2, 2])) == 2 * 4 * 7 * 7 * 3 * 9


def test_conv_1d_and_3d():
    assert _known(_conv((2, 3, 20), (6, 3, 5))) == 2 * 6 * 16 * 3 * 5
    assert _known(_conv((1, 2, 4, 6, 6), (4, 2, 3, 3, 3), pads=[1] * 6)) == 4 * 4 * 6 * 6 * 2 * 27


def test_conv_transpose_plain_and_grouped():
    # every input element is scattered over (C_out / group) x kernel outputs
    assert _known(_conv((1, 4, 5, 5), (4, 6, 3, 3), op="ConvTranspose", strides=[2, 2])) == 4 * 25 * 6 * 9
    assert _known(_conv((1, 4, 5, 5), (4, 3, 3, 3), op="ConvTranspose", group=2)) == 4 * 25 * 3 * 9


def test_conv_integer_and_qlinear_conv():
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 4, 4])
    w = np.zeros((2, 3, 1, 1), np.uint8)
    y = helper.make_tensor_value_info("y", TensorProto.INT32, None)
    model = _model([helper.make_node("ConvInteger", ["x", "w"], ["y"], name="n")], [x], [y], {"w": w})
    assert _known(node_costs(model, {})["n"]) == 2 * 16 * 3
    scalars = {"s": np.float32(0.1), "z": np.uint8(0), "w": w}
    node = helper.make_node("QLinearConv", ["x", "s", "z", "w", "s", "z", "s", "z"], ["y"], name="n")
    y = helper.make_tensor_value_info("y", TensorProto.UINT8, None)
    model = _model([node], [x], [y], scalars)
    assert _known(node_costs(model, {})["n"]) == 2 * 16 * 3


# --- unknown, never raising ------------------------------------------------------------------------------


def test_symbolic_dims_unknown_until_pinned():
    inits = {"w": np.zeros((4, 3), np.float32)}
    reason = _unknown(_single("MatMul", {"x": ["batch", 4], "w": (4, 3)}, inits))
    assert reason.startswith("MatMul 'n': ") and "'x'" in reason and "batch" in reason
    assert _known(_single("MatMul", {"x": ["batch", 4], "w": (4, 3)}, inits, input_shapes={"x": (5, 4)})) == 60


@pytest.mark.parametrize("dynamic", [-1, 0])
def test_minus_one_and_zero_input_dims_are_dynamic(dynamic):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    x.type.tensor_type.shape.dim[0].dim_value = dynamic  # paddle2onnx style
    w = np.zeros((4, 3, 3, 3), np.float32)
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="n")], [x], {"y": None}, {"w": w})
    assert "x" not in static_shapes(model, {})
    reason = _unknown(node_costs(model, {})["n"])
    assert "not static" in reason or "unknown" in reason
    assert _known(node_costs(model, {"x": (2, 3, 8, 8)})["n"]) == 2 * 4 * 6 * 6 * 27


def test_unknown_rank_input_is_not_a_scalar():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="n")], [x], {"y": None},
                   {"w": np.zeros((4, 3), np.float32)})
    assert "x" not in static_shapes(model, {})
    assert "'x' unknown" in _unknown(node_costs(model, {})["n"])
    assert "'x' unknown" in _unknown(node_costs(model, {"x": ()})["n"])  # what input_specs makes of it


def test_matmul_input_shape_not_inferable():
    custom = helper.make_node("Mystery", ["x"], ["f"], name="m", domain="custom.ops")
    node = helper.make_node("MatMul", ["f", "w"], ["y"], name="n")
    model = _model([custom, node], {"x": (2, 4)}, {"y": None}, {"w": np.zeros((4, 3), np.float32)})
    model.opset_import.append(helper.make_opsetid("custom.ops", 1))
    costs = node_costs(model, {})
    assert _known(costs["m"]) == 0
    assert _unknown(costs["n"]) == "MatMul 'n': shape of input 'f' unknown"


def test_malformed_nodes_are_unknown():
    assert "missing" in _unknown(_single("MatMul", {"a": (2, 4)}))
    assert "scalar" in _unknown(_single("MatMul", {"a": (), "b": (4,)}))
    assert "broadcast" in _unknown(_single("MatMul", {"a": (2, 3, 4), "b": (5, 4, 6)}))
    assert "contracted" in _unknown(_single("MatMul", {"a": (2, 3), "b": (4, 6)}))
    assert "Einsum 'n'" in _unknown(_single("Einsum", {"a": (2, 3), "b": (3, 4)}, equation="ij,jk,kl->il"))


def test_unexpected_exception_becomes_reason(monkeypatch):
    def boom(a, b):
        raise ZeroDivisionError("first line\nsecond line")
    monkeypatch.setattr(stats, "matmul_macs", boom)
    reason = _unknown(_single("MatMul", {"a": (2, 4), "b": (4, 3)}))
    assert reason == "MatMul 'n': ZeroDivisionError: first line"


def _conv_and_matmul_model():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("MatMul", ["a", "b"], ["m"], name="mm")]
    return _model(nodes, {"x": (1, 3, 8, 8), "a": (2, 4)}, {"c": None, "m": None},
                  {"w": np.zeros((4, 3, 3, 3), np.float32), "b": np.zeros((4, 5), np.float32)})


@pytest.mark.parametrize("error", [RuntimeError, ValueError, onnx.shape_inference.InferenceError, MemoryError])
def test_shape_inference_that_throws_degrades_to_unknown(monkeypatch, error):
    import onnxmerge.graph

    def failing(model):
        raise error("inference exploded\ntraceback noise")
    monkeypatch.setattr(onnxmerge.graph, "run_shape_inference", failing)
    model = _conv_and_matmul_model()
    report = model_stats(model, {})
    assert "inference exploded" in report["shape_inference_error"]
    assert "traceback noise" not in report["shape_inference_error"]
    # MatMul needs only its (declared) inputs; Conv needs the inferred output
    assert report["macs"] is None and report["macs_known"] == 2 * 5 * 4
    assert report["macs_unknown_count"] == 1
    (entry,) = report["macs_unknown"]
    assert entry["node"] == "conv" and entry["op_type"] == "Conv"
    assert "shape of output 'c' unknown" in entry["reason"] and "inference exploded" in entry["reason"]


def test_real_inference_error_is_recorded():
    model = _conv_and_matmul_model()
    del model.opset_import[:]  # onnx raises InferenceError: no opset import for the default domain
    report = model_stats(model, {})
    assert report["shape_inference_error"] and report["macs"] is None and report["macs_known"] == 40


def test_large_model_policy_goes_through_a_file(monkeypatch):
    import onnxmerge.graph

    monkeypatch.setattr(onnxmerge.graph, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    report = model_stats(_conv_and_matmul_model(), {})
    assert report["shape_inference_error"] is None
    assert report["macs"] == 4 * 6 * 6 * 27 + 40


def test_control_flow_with_mac_ops_inside_is_unknown_without_is_zero():
    body_out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [2, 2])
    with_matmul = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["o"])], "then", [], [body_out])
    plain = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "else", [], [body_out])
    cond = {"c": np.array(True)}
    for then_branch, expected in ((with_matmul, None), (plain, 0)):
        node = helper.make_node("If", ["c"], ["y"], name="n", then_branch=then_branch, else_branch=plain)
        model = _model([node], {"x": (2, 2)}, {"y": None}, cond)
        cost = node_costs(model, {})["n"]
        assert cost["macs"] == expected
        if expected is None:
            assert "subgraph" in cost["macs_reason"]


# --- model level ------------------------------------------------------------------------------------------


def test_model_stats_totals_and_capped_unknown_list():
    nodes, inputs = [], {}
    for i in range(30):  # unknown: symbolic batch
        inputs[f"s{i}"] = ["n", 4]
        nodes.append(helper.make_node("MatMul", [f"s{i}", "w"], [f"ys{i}"], name=f"sym{i}"))
    for i in range(3):  # known, same name twice: both count
        inputs[f"k{i}"] = [2, 4]
        nodes.append(helper.make_node("MatMul", [f"k{i}", "w"], [f"yk{i}"], name="dup" if i < 2 else "k"))
    model = _model(nodes, inputs, {f"ys{i}": None for i in range(30)}, {"w": np.zeros((4, 3), np.float32)})
    report = model_stats(model, {})
    assert report["macs"] is None
    assert report["macs_known"] == 3 * 2 * 3 * 4
    assert report["macs_unknown_count"] == 30
    assert len(report["macs_unknown"]) == MACS_UNKNOWN_LIST_LIMIT == 20
    assert all(set(e) == {"node", "op_type", "reason"} and e["reason"] for e in report["macs_unknown"])
    assert report["macs_unknown"][0]["node"] == "sym0"
    json.dumps(report)
    pinned = model_stats(model, {f"s{i}": (1, 4) for i in range(30)})
    assert pinned["macs"] == pinned["macs_known"] == 72 + 30 * 12
    assert pinned["macs_unknown"] == [] and pinned["macs_unknown_count"] == 0
    assert stats.macs(model, {f"s{i}": (1, 4) for i in range(30)}) == 72 + 360


def test_node_costs_reason_key_and_non_mac_ops():
    model = _conv_and_matmul_model()
    costs = node_costs(model, {})
    assert costs["conv"] == {"op_type": "Conv", "macs": 4 * 6 * 6 * 27, "macs_reason": None, "parameters": 4 * 27}
    relu = _single("Relu", {"x": ["n", 3]})
    assert relu["macs"] == 0 and relu["macs_reason"] is None


# --- end to end: fold and profile keep going ------------------------------------------------------------


def _ocr_like_model():
    """A rank-1 MatMul operand and a MatMul whose input has a data-dependent (symbolic) dim."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["v"], name="head"),
             helper.make_node("NonZero", ["x"], ["nz"], name="nz"),
             helper.make_node("Cast", ["nz"], ["nzf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("MatMul", ["nzf", "w2"], ["y"], name="dyn")]
    outputs = [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["batch"]),
               helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    model = _model(nodes, [x], outputs, {"w1": np.ones(4, np.float32), "w2": np.ones((4, 3), np.float32)})
    onnx.checker.check_model(model)
    return model


def test_cli_fold_json_carries_unknown_reasons(tmp_path, capsys):
    from onnxmerge.cli import main

    source, out, report_path = tmp_path / "ocr.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_ocr_like_model(), source)
    assert main(["fold", str(source), str(out), "--json", str(report_path)]) == 0
    assert "internal error" not in capsys.readouterr().err
    report = json.loads(report_path.read_text())
    for side in ("before", "after"):
        facts = report[side]
        assert facts["macs"] is None
        assert facts["macs_known"] == 4  # head: (1, 4) @ (4,) with batch pinned to 1
        assert facts["macs_unknown_count"] == 1
        (entry,) = facts["macs_unknown"]
        assert entry["node"] == "dyn" and entry["op_type"] == "MatMul"
        assert entry["reason"].startswith("MatMul 'dyn': shape of input 'nzf' is not static")


def test_fold_human_table_shows_question_mark(tmp_path, capsys):
    from onnxmerge.cli import main

    source = tmp_path / "ocr.onnx"
    onnx.save(_ocr_like_model(), source)
    assert main(["fold", str(source), str(tmp_path / "out.onnx")]) == 0
    macs_row = next(line for line in capsys.readouterr().out.splitlines() if "MACs" in line)
    assert "?" in macs_row


def test_profile_with_per_node_keeps_unknown_macs():
    from onnxmerge.profiler import profile

    report = profile(_ocr_like_model(), runs=3, warmup=1, per_node=True)
    assert report["static"]["macs"] is None and report["static"]["macs_known"] == 4
    assert report["static"]["macs_unknown"][0]["node"] == "dyn"
    json.dumps(report, default=str)
