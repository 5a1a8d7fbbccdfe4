"""The torch module must compute what ORT computes (it is what distillation trains), and write_back must
change nothing but the trained initializers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import GraphBuilder, run_model
from models.export import export
from onnxmerge.layermerge.torch_bridge import OnnxModule, write_back
from onnxmerge.errors import BadInputError

torch.set_num_threads(1)  # tiny nets: a second thread only adds sync cost on a shared machine


def assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, rtol=1e-5, atol=1e-5) -> OnnxModule:
    want = run_model(model, feeds)
    module = OnnxModule(model)
    with torch.no_grad():
        got = module(**{name: torch.from_numpy(value) for name, value in feeds.items()})
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(want)
    for w, g in zip(want, got):
        assert g.shape == w.shape and g.numpy().dtype == w.dtype
        np.testing.assert_allclose(g.numpy(), w, rtol=rtol, atol=atol * max(1.0, float(np.abs(w).max(initial=0))))
    return module


def feeds_for(shape, seed=0, name="x"):
    return {name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def ints(values):
    return np.asarray(values, np.int64)


def floats(values):
    return np.asarray(values, np.float32)


# ---- the zoo, as exported ----------------------------------------------------------------------------------

@pytest.mark.parametrize("keep_bn", [False, True], ids=["default", "keep_bn"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg", "repvgg", "unet"])
def test_zoo_models_match_ort(tmp_path, name, keep_bn):
    model = onnx.load(export(name, tmp_path / "model.onnx", input_shape=(1, 3, 64, 64), keep_bn=keep_bn))
    # Deep nets differ from ORT by float32 reordering (~1e-6 of the output range); a wrong op is off by far more.
    module = assert_matches_ort(model, feeds_for((1, 3, 64, 64), name="input"), rtol=1e-4, atol=5e-5)
    convs = sum(node.op_type in ("Conv", "Gemm") for node in model.graph.node)
    assert len(list(module.parameters())) >= convs  # every weight is trainable
    if keep_bn:
        assert not any("running_var" in tensor for tensor, _ in module.named_onnx_parameters())
    rewritten = write_back(model, module)
    assert rewritten.SerializeToString() == model.SerializeToString()


# ---- op coverage on small graphs ---------------------------------------------------------------------------

def convs():
    g = GraphBuilder((2, 4, 9, 9))
    a = g.conv("x", 4, 6, k=3, pads=[1, 0, 2, 1], dilations=[2, 1], strides=[2, 1])
    b = g.conv("x", 4, 4, k=3, groups=2, auto_pad="SAME_UPPER", strides=[2, 2])
    c = g.conv("x", 4, 4, k=2, groups=4, bias=False, auto_pad="SAME_LOWER")
    w = g.const(g.rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    t = g.node("ConvTranspose", ["x", w, g.const(floats(g.rng.standard_normal(6)))],
               strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 0], group=2)
    return g.build([a, b, c, t]), feeds_for((2, 4, 9, 9))


def conv_1d_3d():
    g = GraphBuilder((1, 3, 5, 6, 7))
    w3 = g.const(floats(g.rng.standard_normal((4, 3, 3, 1, 2))))
    y3 = g.node("Conv", ["x", w3], pads=[1, 0, 1, 0, 0, 1], strides=[1, 2, 1])
    flat = g.node("Reshape", ["x", g.const(ints([1, 3, -1]))])
    w1 = g.const(floats(g.rng.standard_normal((2, 3, 4))))
    y1 = g.node("Conv", [flat, w1], pads=[3, 0], dilations=[2])
    return g.build([y3, y1]), feeds_for((1, 3, 5, 6, 7))


def dense():
    g = GraphBuilder((3, 5))
    a = g.node("Gemm", ["x", g.const(floats(g.rng.standard_normal((4, 5)))), g.const(floats([1, 2, 3, 4]))],
               transB=1, alpha=0.5, beta=2.0)
    b = g.node("Gemm", [g.const(floats(g.rng.standard_normal((5, 2)))), "x"], transA=1, transB=1)
    stacked = g.node("Unsqueeze", ["x", g.const(ints([0]))])
    c = g.node("MatMul", [stacked, g.const(floats(g.rng.standard_normal((5, 3))))])
    return g.build([a, b, c]), feeds_for((3, 5))


def activations():
    g = GraphBuilder((2, 3, 4, 4), opset=20)
    y = g.node("Clip", ["x", "", g.const(floats(0.7))])
    y = g.node("Add", [g.node("LeakyRelu", [y], alpha=0.2), g.node("HardSigmoid", ["x"], alpha=0.3, beta=0.4)])
    y = g.node("Mul", [g.node("HardSwish", [y]), g.node("Gelu", ["x"])])
    y = g.node("Sub", [g.node("Gelu", [y], approximate="tanh"), g.node("Erf", ["x"])])
    y = g.node("Div", [g.node("Tanh", [y]), g.node("Sqrt", [g.node("Sigmoid", ["x"])])])
    y = g.node("Pow", [y, g.const(floats(2.0))])
    y = g.node("Relu", [g.node("Clip", [y, g.const(floats(0.1)), g.const(floats(3.0))])])
    return g.build([y, g.node("Softmax", [y], axis=1)], ir_version=9), feeds_for((2, 3, 4, 4))


def old_opset_forms():
    g = GraphBuilder((2, 3, 4, 5), opset=9)
    y = g.node("Clip", ["x"], min=-0.5, max=0.5)
    y = g.node("Softmax", [y], axis=2)  # opset < 13: over the flattened trailing dims
    s = g.node("Slice", [y], starts=[1, 0], ends=[100, -1], axes=[1, 3])
    u = g.node("Unsqueeze", [g.node("Squeeze", [g.node("ReduceMean", [s], axes=[2], keepdims=1)], axes=[2])],
               axes=[0])
    parts = g.node("Split", ["x"], n_outputs=2, axis=3, split=[2, 3])
    return g.build([s, u, *parts]), feeds_for((2, 3, 4, 5))


def pools():
    g = GraphBuilder((2, 3, 11, 10))
    outs = [
        g.node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
        g.node("MaxPool", ["x"], kernel_shape=[2, 3], pads=[0, 2, 1, 0], dilations=[2, 1]),
        g.node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
        g.node("AveragePool", ["x"], kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 0, 1], count_include_pad=0),
        g.node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
        g.node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
        g.node("AveragePool", ["x"], kernel_shape=[2, 2]),
        g.node("GlobalMaxPool", ["x"]),
        g.node("GlobalAveragePool", ["x"]),
        g.node("AveragePool", [g.node("Reshape", ["x", g.const(ints([0, 0, -1]))])], kernel_shape=[3], strides=[2],
               pads=[2, 1]),
        g.node("Flatten", ["x"], axis=-1),
    ]
    return g.build(outs), feeds_for((2, 3, 11, 10))


def shape_ops():
    g = GraphBuilder((2, 3, 4, 6), opset=18)
    batch = g.node("Unsqueeze", [g.node("Gather", [g.node("Shape", ["x"]), g.const(ints(0))]), g.const(ints([0]))])
    flat = g.node("Reshape", ["x", g.node("Concat", [batch, g.const(ints([-1]))], axis=0)])
    tail = g.node("Shape", ["x"], start=-2)
    zero_dims = g.node("Reshape", ["x", g.const(ints([0, 0, -1]))])
    picked = g.node("Gather", ["x", g.const(ints([[-1, 0], [1, 1]]))], axis=3)
    t = g.node("Transpose", ["x"], perm=[0, 2, 3, 1])
    sq = g.node("Squeeze", [g.node("Slice", ["x", g.const(ints([1])), g.const(ints([2])), g.const(ints([1]))]),
                            g.const(ints([1]))])
    rev = g.node("Slice", ["x", g.const(ints([-1, 5])), g.const(ints([-100, 0])), g.const(ints([2, 3])),
                           g.const(ints([-1, -2]))])
    stepped = g.node("Slice", ["x", g.const(ints([1])), g.const(ints([2**62])), g.const(ints([-1])),
                               g.const(ints([2]))])
    a, b, c = g.node("Split", ["x"], n_outputs=3, axis=3, num_outputs=3)
    sized = g.node("Split", ["x", g.const(ints([1, 3]))], n_outputs=2, axis=2)
    joined = g.node("Concat", [c, a, b], axis=3)
    padded = g.node("Pad", ["x", g.const(ints([1, -1, 0, 2])), g.const(floats(1.5)), g.const(ints([1, 3]))])
    cast = g.node("Cast", [g.node("Cast", ["x"], to=TensorProto.INT64)], to=TensorProto.FLOAT)
    dropped = g.node("Dropout", ["x"])
    mean = g.node("ReduceMean", ["x", g.const(ints([1, -1]))], keepdims=0)
    int_div = g.node("Div", [g.node("Shape", ["x"]), g.const(ints([-4, 2, 3, 4]))])
    outputs = [flat, tail, zero_dims, picked, t, sq, rev, stepped, joined, *sized, padded, cast, dropped, mean, int_div]
    model = g.build(outputs, ir_version=9, shapes={flat: [2, 72], zero_dims: [2, 3, 24]})
    return model, feeds_for((2, 3, 4, 6))


def broadcast_ops():
    """What the legacy exporter writes for ``x.expand(...)`` (ConstantOfShape/Mul/Equal/Where building the
    target), Expand both ways and with a longer target, and Tile."""
    g = GraphBuilder((2, 1, 3, 1), opset=17)
    ones = g.node("ConstantOfShape", [g.const(ints([4]))], value=numpy_helper.from_array(ints([1])))
    minus = g.node("Mul", [ones, g.const(ints(-1))])
    wanted = g.const(ints([2, 4, 3, 5]))
    target = g.node("Where", [g.node("Equal", [wanted, minus]), ones, wanted])
    expanded = g.node("Expand", ["x", target])
    both_ways = g.node("Expand", ["x", g.const(ints([1, 3, 1, 2]))])  # a target 1 keeps the input's dim
    longer = g.node("Expand", ["x", g.const(ints([2, 1, 1, 1, 4]))])
    tiled = g.node("Tile", ["x", g.const(ints([1, 2, 1, 3]))])
    zeros = g.node("Add", ["x", g.node("ConstantOfShape", [g.const(ints([2, 1, 1, 1]))])])
    return g.build([expanded, both_ways, longer, tiled, zeros], ir_version=9), feeds_for((2, 1, 3, 1))


def resize_cases():
    g = GraphBuilder((1, 2, 5, 6), opset=18)
    outs = []
    for mode, transform, nearest in [
        ("nearest", "asymmetric", "floor"), ("nearest", "asymmetric", "round_prefer_floor"),
        ("nearest", "asymmetric", "round_prefer_ceil"), ("nearest", "half_pixel", "round_prefer_floor"),
        ("nearest", "align_corners", "round_prefer_ceil"), ("nearest", "half_pixel", "ceil"),
        ("linear", "half_pixel", None),
        ("linear", "align_corners", None), ("linear", "pytorch_half_pixel", None), ("linear", "asymmetric", None),
        ("linear", "half_pixel_symmetric", None),
    ]:
        attrs = {"mode": mode, "coordinate_transformation_mode": transform}
        if nearest:
            attrs["nearest_mode"] = nearest
        outs.append(g.node("Resize", ["x", "", g.const(floats([1, 1, 2, 2]))], **attrs))
        outs.append(g.node("Resize", ["x", "", g.const(floats([1, 1, 1.5, 0.6]))], **attrs))
        outs.append(g.node("Resize", ["x", "", "", g.const(ints([1, 2, 7, 1]))], **attrs))
    return g.build(outs, ir_version=9), feeds_for((1, 2, 5, 6))


def resize_old_opsets():
    g = GraphBuilder((1, 2, 3, 4), opset=10)
    model10 = g.build(g.node("Resize", ["x", g.const(floats([1, 1, 2, 1.5]))], mode="linear"))
    g = GraphBuilder((1, 2, 3, 4), opset=11)
    model11 = g.build(g.node("Resize", ["x", g.const(floats([])), g.const(floats([1, 1, 2, 1.5]))],
                             coordinate_transformation_mode="tf_half_pixel_for_nn"))
    return model10, model11


@pytest.mark.parametrize("model", resize_old_opsets(), ids=["opset10", "opset11"])
def test_old_resize_forms_match_ort(model):
    assert_matches_ort(model, feeds_for((1, 2, 3, 4)))


CASES = [convs, conv_1d_3d, dense, activations, old_opset_forms, pools, shape_ops, broadcast_ops, resize_cases]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_ops_match_ort(case):
    model, feeds = case()
    assert_matches_ort(model, feeds)


def test_graph_out_of_order_is_sorted():
    model, feeds = activations()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    with torch.no_grad():
        got = OnnxModule(model)(torch.from_numpy(feeds["x"]))
    want = run_model(activations()[0], feeds)
    np.testing.assert_allclose(got[0].numpy(), want[0], rtol=1e-5, atol=1e-5)


# ---- what is trainable -------------------------------------------------------------------------------------

def test_weights_are_parameters_and_the_rest_buffers():
    g = GraphBuilder((1, 3, 6, 6))
    weight = g.const(floats(g.rng.standard_normal((4, 3, 3, 3))))
    through = g.node("Identity", [weight])  # exporters feed weights through Identity
    y = g.batchnorm(g.node("Conv", ["x", through]), 4)
    y = g.node("Reshape", [y, g.const(ints([1, -1]))])
    y = g.node("Gemm", [y, g.const(floats(g.rng.standard_normal((64, 2)))), g.const(floats([0.5, -0.5]))])
    module = OnnxModule(g.build(y))
    trainable = {name for name, _ in module.named_onnx_parameters()}
    assert trainable == {weight, g.initializers[-2].name, g.initializers[-1].name}
    assert all(p.requires_grad for p in module.parameters())
    assert len(list(module.buffers())) == 5  # four BN tensors and the reshape target


# ---- refusals ----------------------------------------------------------------------------------------------

def test_unsupported_ops_are_named_in_one_line():
    g = GraphBuilder((1, 2, 4, 4), opset=18)
    y = g.node("Celu", ["x"])
    y = g.node("Resize", [y, "", g.const(floats([1, 1, 2, 2]))], mode="cubic")
    model = g.build(y)
    model.graph.node.append(helper.make_node("FusedConv", [y], ["z"], domain="com.microsoft"))
    with pytest.raises(BadInputError) as info:
        OnnxModule(model)
    message = str(info.value)
    assert "\n" not in message and "recover=False" in message  # the CLI says --no-recover
    for op in ("Celu", "Resize(mode=cubic)", "com.microsoft.FusedConv"):
        assert op in message


def test_write_back_refuses_a_module_of_another_model():
    first, _ = dense()
    other, _ = convs()
    with pytest.raises(BadInputError, match="no initializer"):
        write_back(first, OnnxModule(other))


# ---- write_back ----------------------------------------------------------------------------------------------

def test_write_back_stores_trained_values_and_nothing_else():
    model, feeds = convs()
    module = OnnxModule(model)
    with torch.no_grad():
        for param in module.parameters():
            param.mul_(1.5).add_(0.25)
        trained = [t.numpy() for t in module(torch.from_numpy(feeds["x"]))]
    rewritten = write_back(model, module)
    changed = {name for name, _ in module.named_onnx_parameters()}
    for before, after in zip(model.graph.initializer, rewritten.graph.initializer):
        assert (before.name, before.data_type, list(before.dims)) == (after.name, after.data_type, list(after.dims))
        if before.name in changed:
            np.testing.assert_array_equal(numpy_helper.to_array(after), numpy_helper.to_array(before) * 1.5 + 0.25)
        else:
            assert before == after
    assert list(rewritten.graph.node) == list(model.graph.node)
    assert model.graph.input == rewritten.graph.input and model.graph.output == rewritten.graph.output
    for want, got in zip(trained, run_model(rewritten, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_write_back_keeps_typed_field_storage():
    g = GraphBuilder((1, 2, 3, 3))
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 2, 1, 1], [1.0, 2.0, 3.0, 4.0])
    g.initializers.append(weight)
    model = g.build(g.node("Conv", ["x", "w"]))
    module = OnnxModule(model)
    assert write_back(model, module).SerializeToString() == model.SerializeToString()
    with torch.no_grad():
        next(module.parameters()).add_(1.0)
    stored = write_back(model, module).graph.initializer[0]
    assert not stored.HasField("raw_data") and list(stored.float_data) == [2.0, 3.0, 4.0, 5.0]
