"""The reference models are the ground truth the passes are tested against, so these
tests pin what the exported graphs look like and that ORT reproduces torch."""
from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from models import INPUT_SHAPES, MODELS, build, default_input_shape
from models.digits import load_digits_split, ort_accuracy
from models.export import EXAMPLE_PATH, export, export_example

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v2_1.4", "vgg", "repvgg", "unet"]


def small_shape(name: str, batch: int = 1) -> tuple[int, ...]:
    """ImageNet-sized defaults are exported at 64x64 to keep the suite fast."""
    _, c, h, w = INPUT_SHAPES[name]
    return (batch, c, min(h, 64), min(w, 64))


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Export each (name, keep_bn, dynamic_batch) once per session."""
    cache: dict[tuple, str] = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(name: str, keep_bn: bool = False, dynamic_batch: bool = False) -> str:
        key = (name, keep_bn, dynamic_batch)
        if key not in cache:
            path = root / f"{name}-{int(keep_bn)}{int(dynamic_batch)}.onnx"
            cache[key] = export(name, path, small_shape(name), keep_bn=keep_bn, dynamic_batch=dynamic_batch)
        return cache[key]

    return get


def ops(path: str | Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def run_ort(path: str | Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["output"], {"input": x})[0]


def assert_matches_torch(path: str, name: str, shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        refs = build(name)(x)
    refs = [r.numpy() for r in (refs if isinstance(refs, tuple) else (refs,))]  # the FPN returns one map per level
    outs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape
        # Deep nets (ResNet-50) accumulate float32 reordering error of ~1e-5 of the
        # output range between torch and ORT kernels; a wrong BN fold is off by ~1e-1.
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=5e-5 * max(1.0, np.abs(ref).max()))


def count_modules(name: str, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in MODELS[name]().modules())


def test_registry_has_required_models_and_shapes():
    assert set(REQUIRED) <= set(MODELS)
    for name in REQUIRED[:-1]:
        assert default_input_shape(name) == (1, 3, 224, 224)
    assert default_input_shape("unet") == (1, 3, 64, 64)
    assert default_input_shape("repvgg_tiny") == (1, 3, 32, 32)
    assert set(INPUT_SHAPES) == set(MODELS)
    with pytest.raises(KeyError, match="unknown model"):
        build("nope")


def test_randomize_bn_is_not_identity():
    bn = next(m for m in build("resnet18").modules() if isinstance(m, nn.BatchNorm2d))
    for t, default in [(bn.weight, 1.0), (bn.bias, 0.0), (bn.running_mean, 0.0), (bn.running_var, 1.0)]:
        assert (t - default).abs().max() > 0.1


@pytest.mark.parametrize("keep_bn", [False, True], ids=["folded", "keep_bn"])
@pytest.mark.parametrize("name", list(MODELS))
def test_export_matches_torch_and_bn_handling(exported, name, keep_bn):
    path = exported(name, keep_bn=keep_bn)
    assert_matches_torch(path, name, small_shape(name))
    bns = [n for n in onnx.load(path).graph.node if n.op_type == "BatchNormalization"]
    if keep_bn:
        assert len(bns) == count_modules(name, nn.BatchNorm2d)
        for n in bns:  # inference form: single output, training_mode unset or 0
            assert len(n.output) == 1
            assert all(a.i == 0 for a in n.attribute if a.name == "training_mode")
    else:
        # Only a BN with no preceding conv (RepVGG's identity branch) can survive folding.
        expected = count_modules(name, nn.BatchNorm2d) - count_modules(name, nn.Conv2d) if "repvgg" in name else 0
        assert len(bns) == expected


@pytest.mark.parametrize(
    "name,convs", [("resnet18", 20), ("resnet34", 36), ("resnet50", 53), ("mobilenet_v2", 52), ("mobilenet_v2_1.4", 52)]
)
def test_layer_counts(exported, name, convs):
    c = ops(exported(name))
    assert c["Conv"] == convs
    assert c["Gemm"] == 1


@pytest.mark.parametrize("name,first,last", [("mobilenet_v2", 32, 1280), ("mobilenet_v2_1.4", 48, 1792)])
def test_mobilenet_width_rounding(exported, name, first, last):
    graph = onnx.load(exported(name)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    inits = {t.name: t for t in graph.initializer}
    out_ch = [inits[n.input[1]].dims[0] for n in convs]
    assert (out_ch[0], out_ch[-1]) == (first, last)
    groups = [a.i for n in convs for a in n.attribute if a.name == "group"]
    assert sum(g > 1 for g in groups) == 17  # one depthwise conv per inverted residual


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "unet", "repvgg_tiny"])
def test_dynamic_batch(exported, name):
    path = exported(name, keep_bn=True, dynamic_batch=True)
    graph = onnx.load(path).graph
    for vi in (graph.input[0], graph.output[0]):
        assert vi.type.tensor_type.shape.dim[0].dim_param
    for batch in (1, 3):
        assert_matches_torch(path, name, small_shape(name, batch))


def _repvgg_blocks(path: str) -> list[list[onnx.NodeProto]]:
    """For each block-closing Relu, the leaves (non-Add producers) of its Add tree."""
    graph = onnx.load(path).graph
    producer = {o: n for n in graph.node for o in n.output}
    blocks = []
    for relu in (n for n in graph.node if n.op_type == "Relu"):
        leaves, stack = [], [producer[relu.input[0]]]
        while stack:
            n = stack.pop()
            if n.op_type == "Add":
                stack += [producer[i] for i in n.input]
            else:
                leaves.append(n)
        blocks.append(leaves)
    return blocks


@pytest.mark.parametrize("name,identity_blocks", [("repvgg", 17), ("repvgg_tiny", 4)])
def test_repvgg_three_branch_blocks(exported, name, identity_blocks):
    path = exported(name, keep_bn=True)
    graph = onnx.load(path).graph
    producer = {o: n for n in graph.node for o in n.output}
    blocks = _repvgg_blocks(path)
    assert len(blocks) == sum(isinstance(m, nn.ReLU) for m in MODELS[name]().modules())
    assert sum(len(b) == 3 for b in blocks) == identity_blocks
    assert all(len(b) in (2, 3) for b in blocks)
    for leaves in blocks:
        assert all(n.op_type == "BatchNormalization" for n in leaves)
        convs = [producer[n.input[0]] for n in leaves if n.input[0] in producer and producer[n.input[0]].op_type == "Conv"]
        kernels = sorted(next(a.ints[0] for a in c.attribute if a.name == "kernel_shape") for c in convs)
        assert kernels == [1, 3]
        block_input = convs[0].input[0]
        assert all(c.input[0] == block_input for c in convs)
        if len(leaves) == 3:  # the identity BN reads the block input directly
            assert sum(n.input[0] == block_input for n in leaves) == 1


@pytest.mark.parametrize("keep_bn", [False, True])
def test_unet_has_resize_and_concat(exported, keep_bn):
    path = exported("unet", keep_bn=keep_bn)
    c = ops(path)
    assert c["Resize"] == 3
    assert c["Concat"] == 3  # only the skip connections; Resize scales are constant-folded
    for n in onnx.load(path).graph.node:
        if n.op_type == "Concat":
            assert [a.i for a in n.attribute if a.name == "axis"] == [1]


def test_export_is_deterministic_per_seed(tmp_path):
    a = Path(export("repvgg_tiny", tmp_path / "a.onnx", keep_bn=True, seed=3)).read_bytes()
    b = Path(export("repvgg_tiny", tmp_path / "b.onnx", keep_bn=True, seed=3)).read_bytes()
    c = Path(export("repvgg_tiny", tmp_path / "c.onnx", keep_bn=True, seed=4)).read_bytes()
    assert a == b
    assert a != c


def test_export_opset_and_module(tmp_path):
    path = export("repvgg_tiny", tmp_path / "o13.onnx", opset=13)
    assert [o.version for o in onnx.load(path).opset_import if o.domain in ("", "ai.onnx")] == [13]
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="input_shape"):
        export(module, tmp_path / "m.onnx")
    export(module, tmp_path / "m.onnx", input_shape=(1, 3, 8, 8), keep_bn=True)
    assert ops(tmp_path / "m.onnx")["BatchNormalization"] == 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_export_cli(tmp_path):
    out = tmp_path / "cli.onnx"
    r = _cli("models.export", "repvgg_tiny", "-o", str(out), "--keep-bn", "--dynamic-batch",
             "--input-shape", "1,3,16,16", "--opset", "15", "--seed", "1")
    assert r.returncode == 0, r.stderr
    model = onnx.load(str(out))
    assert model.graph.input[0].name == "input" and model.graph.output[0].name == "output"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 16, 16]
    assert ops(out)["BatchNormalization"] > 0
    assert run_ort(out, np.zeros((2, 3, 16, 16), np.float32)).shape == (2, 10)


def test_export_cli_unknown_model(tmp_path):
    r = _cli("models.export", "no_such_net", "-o", str(tmp_path / "x.onnx"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "unknown model 'no_such_net'" in r.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_digits_split():
    x_tr, y_tr, x_te, y_te = load_digits_split(0)
    assert x_tr.dtype == x_te.dtype == np.float32
    assert x_tr.shape[1:] == x_te.shape[1:] == default_input_shape("digits_resnet")[1:]
    assert len(x_tr) + len(x_te) == 1797 and len(x_te) == 360
    assert set(np.unique(y_te)) == set(range(10))
    assert np.array_equal(load_digits_split(0)[3], y_te)


@pytest.mark.parametrize("arch", ["resnet", "mobilenet"])
def test_digits_trainer_reaches_97_percent_in_ort(trained_digits, arch):
    res = trained_digits(arch)
    out = res.path
    assert res.accuracy >= 0.97, res.accuracy
    assert Path(out).exists()
    assert ops(out)["BatchNormalization"] == count_modules(f"digits_{arch}", nn.BatchNorm2d)
    assert ort_accuracy(str(out), res.x_test, res.y_test) == res.accuracy
    assert res.x_calib.shape == (256, *res.x_test.shape[1:])


def test_digits_cli_writes_model_and_npz(tmp_path):
    out, data = tmp_path / "d.onnx", tmp_path / "d.npz"
    r = _cli("models.digits", "resnet", "-o", str(out), "--data", str(data), "--epochs", "1")
    assert r.returncode == 0, r.stderr
    npz = np.load(data)
    assert sorted(npz.files) == ["input", "labels"]
    assert npz["input"].shape == (360, 1, 16, 16) and npz["labels"].shape == (360,)
    assert run_ort(out, npz["input"]).shape == (360, 10)


def test_example_model_is_shipped_and_current(tmp_path):
    assert EXAMPLE_PATH.exists() and EXAMPLE_PATH.stat().st_size < 1_000_000
    shipped = onnx.load(str(EXAMPLE_PATH))
    assert ops(EXAMPLE_PATH)["BatchNormalization"] > 0
    x = np.random.default_rng(0).standard_normal(default_input_shape("repvgg_tiny")).astype(np.float32)
    assert run_ort(EXAMPLE_PATH, x).shape == (1, 10)
    fresh = onnx.load(export_example(tmp_path / "fresh.onnx"))
    assert [n.op_type for n in fresh.graph.node] == [n.op_type for n in shipped.graph.node]
    old = {t.name: numpy_helper.to_array(t) for t in shipped.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in fresh.graph.initializer}
    assert old.keys() == new.keys()
    for k in old:  # not byte equality: BN calibration may differ in the last bits across CPUs
        np.testing.assert_allclose(new[k], old[k], rtol=1e-5, atol=1e-6)
