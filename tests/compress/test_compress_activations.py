"""``compress`` end to end on digits nets built with each activation: parameters survive into the output.

The nets are the digits ResNet with its ReLUs swapped for the activation under test, trained for one epoch:
what is checked is that every activation is recognised, priced, kept with its parameters and run in torch, not
accuracy (tests/compress/test_compress.py checks that on fully trained nets).
"""

import numpy as np
import onnx
import pytest
from torch import nn

from models.digits import train_digits
from models.registry import DIGITS_SHAPE
from onnxmerge import activations as A
from onnxmerge.api import fold
from onnxmerge.graph import import_graph
from onnxmerge.io import save_model
from onnxmerge.latency_table import conv_signatures
from onnxmerge.layermerge.api import compress
from onnxmerge.runner import make_session

# name -> (act(channels) factory, the kind the exported net has)
NETS = {
    "relu": (lambda c: nn.ReLU(), "relu"),
    "relu6": (lambda c: nn.ReLU6(), "relu6"),
    "hardswish": (lambda c: nn.Hardswish(), "hardswish"),
    "silu": (lambda c: nn.SiLU(), "silu"),
    "leakyrelu(0.1)": (lambda c: nn.LeakyReLU(0.1), "leaky_relu"),
    "prelu": (lambda c: nn.PReLU(c, init=0.2), "prelu"),
    "gelu": (lambda c: nn.GELU(), "gelu"),
    "sigmoid": (lambda c: nn.Sigmoid(), "sigmoid"),
    "tanh": (lambda c: nn.Tanh(), "tanh"),
}


def _activations(model: onnx.ModelProto) -> list[A.Activation]:
    """Every activation of the table found in the graph (each once, wherever it is)."""
    graph = import_graph(model)
    found = {}
    for tensor in graph.tensors().values():
        activation = A.after(graph, tensor)
        if activation is not None:
            found.setdefault(activation.nodes, activation)
    return list(found.values())


@pytest.mark.parametrize("name", NETS)
def test_compress_keeps_each_activation_with_its_parameters(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXMERGE_CACHE_DIR", str(tmp_path / "cache"))
    factory, kind = NETS[name]
    digits = train_digits("resnet", epochs=1, act=factory)
    model = save_model(digits.model, tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", input=digits.x_calib[:64])
    test_images = digits.x_test[:8]
    canonical = fold(model, input_shapes={"input": DIGITS_SHAPE}).proto
    original = _activations(canonical)
    assert original and {a.kind for a in original} == {kind}
    if kind == "leaky_relu":
        assert {a.alpha for a in original} == {np.float32(0.1)}
    if kind == "relu6":
        assert {a.bounds for a in original} == {(0.0, 6.0)}

    # The latency table prices every conv with the activation after it: none is refused.
    priced = {sig.activation for _, sig in conv_signatures(canonical, {"input": DIGITS_SHAPE})} - {None}
    assert priced == {a.name for a in original}

    result = compress(model, tmp_path / "out.onnx", calibration=tmp_path / "calib.npz", speedup=1.05,
                      recover_steps=5, runs=3, input_shapes={"input": (1, 1, 16, 16)})
    compressed = onnx.load(tmp_path / "out.onnx")
    outputs = make_session(compressed).run(None, {"input": test_images})[0]
    assert outputs.shape == (8, 10) and np.isfinite(outputs).all()
    convs = [sum(node.op_type == "Conv" for node in m.graph.node) for m in (canonical, compressed)]
    assert convs[1] < convs[0], convs  # a 1.05x target needs at least one merged or pruned segment
    kept = _activations(compressed)
    assert kept and all(a in original for a in kept)  # same kind, same parameters (a PReLU: one of its slopes)
    if kind == "prelu":
        assert all(a.per_channel for a in kept)
    assert result.report["recovery"] is not None  # distilled in torch through the bridge
