"""The activation table: recognition in every export form, emission, torch, ORT fusion, names, value semantics,
and the consumers (latency table, merge builder, torch bridge, Re-Basin) taking every activation it knows."""

import math
import subprocess
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from onnxmerge import activations as A
from onnxmerge.graph import import_graph
from onnxmerge.latency_table import ConvSignature, conv_model, conv_signatures, measure
from onnxmerge.layermerge.build import SegmentChoice, apply_segments, dominant_activation
from onnxmerge.layermerge.segments import analyse_chain
from onnxmerge.layermerge.torch_bridge import OnnxModule

from conftest import GraphBuilder, run_model

C, HW = 4, 6
SLOPE = np.array([0.1, -0.2, 0.3, 0.05], np.float32).reshape(C, 1, 1)


def _c(b, value):
    return b.const(np.asarray(value, np.float32), "c")


def _gelu_erf(order: str, scale: str = "div"):
    def build(b, x):
        scaled = b.node("Div", [x, _c(b, math.sqrt(2))]) if scale == "div" else \
            b.node("Mul", [_c(b, math.sqrt(0.5)), x])
        gate = b.node("Add", [b.node("Erf", [scaled]), _c(b, 1.0)]) if order != "swapped" else \
            b.node("Add", [_c(b, 1.0), b.node("Erf", [scaled])])
        if order == "half first":
            return b.node("Mul", [b.node("Mul", [x, _c(b, 0.5)]), gate])
        if order == "gate halved":
            return b.node("Mul", [x, b.node("Mul", [gate, _c(b, 0.5)])])
        if order == "swapped":
            return b.node("Mul", [_c(b, 0.5), b.node("Mul", [gate, x])])
        return b.node("Mul", [b.node("Mul", [x, gate]), _c(b, 0.5)])  # torch's legacy exporter
    return build


def _gelu_tanh(cube: str):
    def build(b, x):  # torch's legacy exporter: mul(half, mul(x, add(one, tanh(beta * (x + kappa * x^3)))))
        x3 = b.node("Mul", [x, b.node("Mul", [x, x])]) if cube == "mul" else b.node("Pow", [x, _c(b, 3.0)])
        inner = b.node("Mul", [_c(b, math.sqrt(2 / math.pi)), b.node("Add", [x, b.node("Mul", [_c(b, 0.044715), x3])])])
        return b.node("Mul", [_c(b, 0.5), b.node("Mul", [x, b.node("Add", [_c(b, 1.0), b.node("Tanh", [inner])])])])
    return build


# form -> (opset, expected activation, builder(b, x) -> output)
FORMS = {
    "Relu": (17, A.relu(), lambda b, x: b.node("Relu", [x])),
    "Clip(0,6) inputs": (17, A.relu6(), lambda b, x: b.node("Clip", [x, _c(b, 0), _c(b, 6)])),
    "Clip(0,6) attributes": (10, A.relu6(), lambda b, x: b.node("Clip", [x], min=0.0, max=6.0)),
    "Clip(-1,2.5) inputs": (17, A.clip(-1, 2.5), lambda b, x: b.node("Clip", [x, _c(b, -1), _c(b, 2.5)])),
    "Clip(min 0.5) attribute": (10, A.clip(0.5), lambda b, x: b.node("Clip", [x], min=0.5)),
    "Clip(max 4) input": (17, A.clip(high=4), lambda b, x: b.node("Clip", [x, "", _c(b, 4)])),
    "HardSwish": (17, A.hardswish(), lambda b, x: b.node("HardSwish", [x])),
    "x*HardSigmoid(x)": (13, A.hardswish(),
                         lambda b, x: b.node("Mul", [x, b.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])),
    "HardSigmoid(0.3,0.4)": (17, A.hardsigmoid(0.3, 0.4), lambda b, x: b.node("HardSigmoid", [x], alpha=0.3, beta=0.4)),
    "Sigmoid(x)*x": (17, A.silu(), lambda b, x: b.node("Mul", [b.node("Sigmoid", [x]), x])),
    "x*Sigmoid(x)": (17, A.silu(), lambda b, x: b.node("Mul", [x, b.node("Sigmoid", [x])])),
    "LeakyRelu(0.1)": (17, A.leaky_relu(0.1), lambda b, x: b.node("LeakyRelu", [x], alpha=0.1)),
    "LeakyRelu default": (17, A.leaky_relu(), lambda b, x: b.node("LeakyRelu", [x])),
    "PRelu per channel": (17, A.prelu(SLOPE), lambda b, x: b.node("PRelu", [x, b.const(SLOPE, "slope")])),
    "PRelu scalar": (17, A.prelu([0.25]), lambda b, x: b.node("PRelu", [x, _c(b, [0.25])])),
    "Gelu": (20, A.gelu(), lambda b, x: b.node("Gelu", [x])),
    "Gelu tanh": (20, A.gelu("tanh"), lambda b, x: b.node("Gelu", [x], approximate="tanh")),
    "GELU erf (torch)": (17, A.gelu(), _gelu_erf("torch")),
    "GELU erf, operands swapped": (17, A.gelu(), _gelu_erf("swapped")),
    "GELU erf, 0.5*x first, x/sqrt2 as a Mul": (17, A.gelu(), _gelu_erf("half first", "mul")),
    "GELU erf, gate halved": (17, A.gelu(), _gelu_erf("gate halved")),
    "GELU tanh (torch)": (17, A.gelu("tanh"), _gelu_tanh("mul")),
    "GELU tanh, Pow": (17, A.gelu("tanh"), _gelu_tanh("pow")),
    "Sigmoid": (17, A.sigmoid(), lambda b, x: b.node("Sigmoid", [x])),
    "Tanh": (17, A.tanh(), lambda b, x: b.node("Tanh", [x])),
    "Elu(0.5)": (17, A.elu(0.5), lambda b, x: b.node("Elu", [x], alpha=0.5)),
    "Selu": (17, A.selu(), lambda b, x: b.node("Selu", [x])),
}

# One of each kind, with non-default parameters where it has any.
EACH = {
    "relu": A.relu(), "relu6": A.relu6(), "clip": A.clip(-1, 2.5), "hardswish": A.hardswish(),
    "hardsigmoid": A.hardsigmoid(0.3, 0.4), "silu": A.silu(), "leaky_relu": A.leaky_relu(0.1),
    "prelu": A.prelu(SLOPE), "gelu": A.gelu(), "gelu(tanh)": A.gelu("tanh"), "sigmoid": A.sigmoid(),
    "tanh": A.tanh(), "elu": A.elu(0.5), "selu": A.selu(),
}


def _conv_act_conv(build, opset):
    """x -> conv -> [activation] -> conv; returns the model and the names of the activation's nodes."""
    b = GraphBuilder((1, C, HW, HW), opset=opset)
    y = b.conv("x", C, C, pads=[1, 1, 1, 1])
    before = len(b.nodes)
    out = build(b, y)
    names = tuple(node.name for node in b.nodes[before:])
    return b.build(b.conv(out, C, C, pads=[1, 1, 1, 1])), names, out


def _first_conv_output(graph):
    return next(node for node in graph.nodes if node.op == "Conv").outputs[0]


def _feeds(shape=(2, C, HW, HW), seed=0):
    return {"x": (np.random.default_rng(seed).standard_normal(shape) * 3).astype(np.float32)}


def _activation_model(activation, opset, shape=(2, C, HW, HW)) -> onnx.ModelProto:
    nodes, initializers = activation.emit_onnx("x", "y", opset=opset)
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "activation", [value("x", onnx.TensorProto.FLOAT, list(shape))],
                              [value("y", onnx.TensorProto.FLOAT, list(shape))], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


# --- recognition ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_recognised_after_a_conv_with_its_parameters(form):
    opset, expected, build = FORMS[form]
    model, names, out = _conv_act_conv(build, opset)
    graph = import_graph(model)
    found = A.match_after(graph, _first_conv_output(graph))
    assert found is not None and found.activation == expected
    assert found.activation.nodes == names and found.activation.output == out == found.output.name
    assert [node.name for node in found.nodes] == list(names)
    if len(names) == 1:
        assert A.from_node(found.nodes[0]) == expected


@pytest.mark.parametrize("form", ["Relu", "Sigmoid(x)*x", "GELU erf (torch)"])
def test_not_recognised_when_something_else_reads_inside_it(form):
    opset, _, build = FORMS[form]
    b = GraphBuilder((1, C, HW, HW), opset=opset)
    y = b.conv("x", C, C, pads=[1, 1, 1, 1])
    out = build(b, y)
    inner = b.nodes[-2].output[0] if len(b.nodes) > 2 else y  # a value inside the pattern, or its input
    graph = import_graph(b.build([b.conv(out, C, C, pads=[1, 1, 1, 1]), inner]))
    assert A.after(graph, _first_conv_output(graph)) is None


def test_hardsigmoid_gate_that_is_not_hardswish_is_not_recognised():
    build = lambda b, x: b.node("Mul", [x, b.node("HardSigmoid", [x])])  # noqa: E731 - alpha 0.2
    model, _, _ = _conv_act_conv(build, 17)
    graph = import_graph(model)
    assert A.after(graph, _first_conv_output(graph)) is None


# --- emission ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_emitted_in_place_of_the_original_computes_the_same_and_is_recognised_again(form):
    opset, expected, build = FORMS[form]
    model, names, out = _conv_act_conv(build, opset)
    conv_out = next(n for n in model.graph.node if n.op_type == "Conv").output[0]
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    kept = [n for n in copy.graph.node if n.name not in names]
    nodes, initializers = expected.emit_onnx(conv_out, out, opset=opset, prefix="emitted")
    del copy.graph.node[:]
    copy.graph.node.extend(kept[:1] + nodes + kept[1:])
    copy.graph.initializer.extend(initializers)
    onnx.checker.check_model(copy, full_check=True)
    graph = import_graph(copy)
    again = A.after(graph, _first_conv_output(graph))
    assert again == expected and len(again.nodes) == len(nodes)
    np.testing.assert_allclose(run_model(copy, _feeds((1, C, HW, HW)))[0],
                               run_model(model, _feeds((1, C, HW, HW)))[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [10, 13, 17, 20])
@pytest.mark.parametrize("name", EACH)
def test_emitted_at_each_opset_matches_torch_and_the_bridge(name, opset):
    activation = EACH[name]
    model = _activation_model(activation, opset)
    feeds = _feeds()
    want = run_model(model, feeds)[0]
    x = torch.from_numpy(feeds["x"])
    np.testing.assert_allclose(activation.torch_function()(x).numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(activation.torch_module()(x).detach().numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(OnnxModule(model)(x).detach().numpy(), want, rtol=1e-5, atol=1e-5)
    graph = import_graph(model)
    assert A.after(graph, graph.inputs[0]) == activation


@pytest.mark.parametrize("opset", [10, 17, 20])
@pytest.mark.parametrize("name", [*EACH, "clip(max 4)"])
def test_graphsurgeon_emission_builds_the_same_model(name, opset):
    activation = EACH.get(name) or A.clip(high=4)
    shape = (2, C, HW, HW)
    x = gs.Variable("x", dtype=np.float32, shape=list(shape))
    y = gs.Variable("y", dtype=np.float32, shape=list(shape))
    graph = gs.Graph(inputs=[x], outputs=[y], opset=opset)
    graph.nodes.extend(activation.emit_gs(graph, x, y, opset=opset))
    model = gs.export_onnx(graph)
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(run_model(model, _feeds())[0], run_model(_activation_model(activation, opset),
                                                                        _feeds())[0], rtol=1e-6, atol=1e-6)
    imported = import_graph(model)
    assert A.after(imported, imported.inputs[0]) == activation


def test_emitted_forms_follow_the_opset():
    def ops(activation, opset):
        return [n.op_type for n in activation.emit_onnx("x", "y", opset=opset)[0]]

    assert ops(A.hardswish(), 13) == ["HardSigmoid", "Mul"] and ops(A.hardswish(), 14) == ["HardSwish"]
    assert ops(A.gelu(), 17) == ["Div", "Erf", "Add", "Mul", "Mul"] and ops(A.gelu(), 20) == ["Gelu"]
    assert ops(A.silu(), 20) == ["Sigmoid", "Mul"]
    (clip10,), _ = A.relu6().emit_onnx("x", "y", opset=10)
    assert {a.name: a.f for a in clip10.attribute} == {"min": 0.0, "max": 6.0} and list(clip10.input) == ["x"]
    (clip17,), constants = A.clip(high=4).emit_onnx("x", "y", opset=17)
    assert list(clip17.input)[:2] == ["x", ""] and [float(onnx.numpy_helper.to_array(c)) for c in constants] == [4]
    (leaky,), _ = A.leaky_relu(0.1).emit_onnx("x", "y")
    assert math.isclose(leaky.attribute[0].f, 0.1, rel_tol=1e-7)
    (prelu,), (slope,) = A.prelu(SLOPE).emit_onnx("x", "y")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(slope), SLOPE)
    _, constants = A.relu6().emit_onnx("x", "y", dtype=np.float16)
    assert all(onnx.numpy_helper.to_array(c).dtype == np.float16 for c in constants)


def test_gelu_tanh_torch_matches_ort_gelu_op_and_its_decomposition():
    x = torch.from_numpy(_feeds()["x"])
    want = torch.nn.functional.gelu(x, approximate="tanh").numpy()
    for opset in (17, 20):
        np.testing.assert_allclose(run_model(_activation_model(A.gelu("tanh"), opset), _feeds())[0], want,
                                   rtol=1e-5, atol=1e-5)


# --- ORT fusion, names, values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EACH)
def test_ort_fusable_flag_is_what_ort_does(name, tmp_path):
    activation = EACH[name]
    b = GraphBuilder((1, C, HW, HW))
    nodes, initializers = activation.emit_onnx(b.conv("x", C, C, pads=[1, 1, 1, 1]), "y", opset=17)
    b.nodes += nodes
    b.initializers += initializers
    model = b.build("y", shapes={"y": [1, C, HW, HW]})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    fused = [n for n in optimized.graph.node if n.op_type == "FusedConv"]
    assert (len(fused) == 1 and len(optimized.graph.node) == 1) == activation.ort_fuses_after_conv
    if fused:
        attrs = {a.name: helper.get_attribute_value(a) for a in fused[0].attribute}
        assert attrs["activation"].decode() == nodes[0].op_type


def test_names_are_stable_and_parse_back():
    names = {key: value.name for key, value in EACH.items()}
    assert names == {
        "relu": "relu", "relu6": "clip(0,6)", "clip": "clip(-1,2.5)", "hardswish": "hardswish",
        "hardsigmoid": "hardsigmoid(0.3,0.4)", "silu": "silu", "leaky_relu": "leakyrelu(0.1)",
        "prelu": "prelu[4,1,1]", "gelu": "gelu", "gelu(tanh)": "gelu(tanh)", "sigmoid": "sigmoid",
        "tanh": "tanh", "elu": "elu(0.5)", "selu": "selu(1.6732632,1.050701)"}
    assert A.clip(0.5).name == "clip(0.5,inf)" and A.leaky_relu().name == "leakyrelu(0.01)"
    for activation in EACH.values():
        parsed = A.parse(activation.name)
        assert parsed == activation or (activation.kind == "prelu" and parsed.slope.shape == SLOPE.shape)
    assert A.parse("relu6") == A.relu6() and A.parse("leaky_relu") == A.leaky_relu(0.01)
    assert A.parse("leakyrelu(0.1)") == A.leaky_relu(0.1)
    with pytest.raises(ValueError):
        A.parse("swish2")


def test_values_are_hashable_and_equal_by_content():
    assert A.leaky_relu(0.1) == A.make("leaky_relu", alpha=np.float32(0.1)) != A.leaky_relu(0.01)
    assert A.clip(0, 6) == A.relu6() and A.clip(0, 6).kind == "relu6" and A.clip(0, 4).kind == "clip"
    same = A.prelu(SLOPE.copy())
    assert same == A.prelu(SLOPE) and hash(same) == hash(A.prelu(SLOPE))
    assert A.prelu(SLOPE * 2) != same and A.prelu(SLOPE.reshape(-1)) != same  # values and layout count
    located = A.relu().located(["n"], "t", "Relu")
    assert located == A.relu() and hash(located) == hash(A.relu()) and located.nodes == ("n",)
    assert len({*EACH.values(), *(A.parse(a.name) for a in EACH.values() if a.kind != "prelu")}) == len(EACH)
    assert A.gelu() != A.gelu("tanh") and A.hardswish() != A.hardsigmoid(1 / 6, 0.5)
    with pytest.raises(Exception):
        A.relu().kind = "tanh"
    slope = A.prelu(SLOPE).slope
    assert not slope.flags.writeable
    fitted = A.prelu(SLOPE).fitted(8)
    assert fitted.slope.shape == (8, 1, 1) and np.allclose(fitted.slope, SLOPE.mean())
    assert A.leaky_relu(0.1).fitted(8) == A.leaky_relu(0.1)


def test_activations_imports_without_torch():
    code = "import sys, onnxmerge.activations; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- consumers -------------------------------------------------------------------------------------------------


def test_latency_table_measures_every_activation(tmp_path):
    signatures = []
    for activation in EACH.values():
        sig = ConvSignature(in_channels=C, out_channels=C, kernel=3, input_hw=(HW, HW), activation=activation)
        assert sig.activation == activation.name and sig.fused == activation.ort_fuses_after_conv
        linear = run_model(conv_model(ConvSignature(in_channels=C, out_channels=C, kernel=3, input_hw=(HW, HW))),
                           _feeds((1, C, HW, HW)))[0]
        activated = run_model(conv_model(sig), _feeds((1, C, HW, HW)))[0]
        reference = sig.activation_value.torch_function()(torch.from_numpy(linear)).numpy()
        np.testing.assert_allclose(activated, reference, rtol=1e-5, atol=1e-5)
        signatures.append(sig)
    table = measure(signatures, cache_dir=tmp_path, runs=2, warmup=0)
    assert len(table) == len(EACH) and all(table[s].median_ms > 0 for s in signatures)


@pytest.mark.parametrize("form", FORMS)
def test_conv_signatures_price_the_conv_with_its_activation(form):
    opset, expected, build = FORMS[form]
    model, _, _ = _conv_act_conv(build, opset)
    (_, first), (_, second) = conv_signatures(model, {"x": (1, C, HW, HW)})
    assert first.activation == expected.name and second.activation is None


def _chain(activation, seed=0):
    """c0 -> act -> c1 -> act -> c2 (linear) -> c3 -> act: segment (0, 2] ends at a linear position."""
    b = GraphBuilder((1, C, HW, HW), seed=seed)
    rng = np.random.default_rng(seed)
    x = "x"
    for index, activated in enumerate([True, True, False, True]):
        x = b.conv(x, C, C, pads=[1, 1, 1, 1])
        if activated:
            own = A.prelu(rng.uniform(0.05, 0.3, (C, 1, 1))) if activation.kind == "prelu" else activation
            nodes, initializers = own.emit_onnx(x, f"act{index}", opset=17)
            b.nodes += nodes
            b.initializers += initializers
            x = f"act{index}"
    return b.build(x, shapes={x: [1, C, HW, HW]})


@pytest.mark.parametrize("name", [name for name in EACH if name != "clip"])
def test_a_merged_segment_ending_linear_gets_the_networks_activation_with_its_parameters(name):
    model = _chain(EACH[name])
    analysis = analyse_chain(model)
    assert [p.activation_value is not None for p in analysis.positions] == [True, True, False, True]
    assert analysis.positions[1].activation == EACH[name].kind
    dominant = dominant_activation(analysis)
    assert dominant == analysis.positions[0].activation_value
    segment = next(s for s in analysis.segments if (s.start, s.end) == (0, 2))
    option = next(o for o in segment.options if o.kept == (1, 2))
    merged = apply_segments(model, analysis, [SegmentChoice(0, 2, option)])
    graph = import_graph(merged)
    merged_conv = next(n for n in graph.nodes if n.op == "Conv" and n.name.startswith("merged"))
    assert A.after(graph, merged_conv.outputs[0]) == dominant
    assert run_model(merged, _feeds((1, C, HW, HW)))[0].shape == (1, C, HW, HW)
    assert apply_segments(model, analysis, [SegmentChoice(0, 2, option)], activation_kind="tanh") is not None


def test_clip_with_other_bounds_is_recognised_but_stays_a_break_for_merging():
    model = _chain(A.clip(0, 4))
    analysis = analyse_chain(model)
    graph = import_graph(model)
    assert A.after(graph, _first_conv_output(graph)) == A.clip(0, 4)
    assert all(p.activation is None for p in analysis.positions)


def test_rebasin_permutes_a_per_channel_prelu_slope_with_its_channels(tmp_path):
    from onnxmerge.io import save_model
    from onnxmerge.merging import align
    from onnxmerge.merging.compat import model_structure
    from onnxmerge.merging.rebasin import permutation_groups

    def model(seed):
        b = GraphBuilder((1, 3, HW, HW), seed=seed)
        slope = b.const(np.random.default_rng(seed).uniform(0.05, 0.5, (C, 1, 1)).astype(np.float32), "slope")
        hidden = b.node("PRelu", [b.conv("x", 3, C, pads=[1, 1, 1, 1]), slope])
        hidden = b.node("LeakyRelu", [b.node("Sigmoid", [hidden])], alpha=0.1)
        return b.build(b.conv(hidden, C, 2, k=1))

    a = model(0)
    structure = model_structure(a)
    (group,) = permutation_groups(a, structure)
    members = {(structure.slots[slot].tensor.name, axis) for slot, axis, _ in group.members}
    assert (next(t.name for t in a.graph.initializer if t.name.startswith("slope")), 0) in members
    result = align(save_model(a, tmp_path / "a.onnx"), save_model(model(1), tmp_path / "b.onnx"),
                   tmp_path / "aligned.onnx")
    assert result.report["verification"]["passed"]
    np.testing.assert_allclose(run_model(onnx.load(result.model), _feeds((1, 3, HW, HW)))[0],
                               run_model(model(1), _feeds((1, 3, HW, HW)))[0], rtol=1e-5, atol=1e-5)
