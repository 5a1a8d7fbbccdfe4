"""The fold pipeline on torch-exported zoo models: verified, and the rewrites users expect actually happen."""

from collections import Counter

import onnx
import pytest

import onnxmerge
from models.export import export
from onnxmerge.io import io_signature

SMALL = (1, 3, 64, 64)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")

    def exported(name, keep_bn=True, dynamic_batch=False, shape=SMALL):
        path = folder / f"{name}-{keep_bn}-{dynamic_batch}.onnx"
        if not path.exists():
            export(name, path, input_shape=shape, keep_bn=keep_bn, dynamic_batch=dynamic_batch)
        return path

    return exported


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "vgg", "unet", "repvgg"])
def test_zoo_model_folds_and_verifies(zoo, name):
    source = zoo(name)
    original = onnx.load(source)
    result = onnxmerge.fold(source, source.with_suffix(".folded.onnx"))
    folded = result.proto
    assert result.verified
    assert _ops(folded)["BatchNormalization"] == 0
    assert _ops(folded)["Identity"] == 0 and _ops(folded)["Constant"] == 0
    assert io_signature(folded) == io_signature(original)
    assert result.report["after"]["nodes"] < result.report["before"]["nodes"]
    before = _ops(original)
    if name in ("resnet18", "resnet50", "mobilenet_v2", "vgg", "unet"):
        # Nothing exact is left to merge between these convs: a nonlinearity or a padded conv sits between.
        assert _ops(folded)["Conv"] == before["Conv"]


def test_repvgg_training_form_becomes_plain_convs(zoo):
    source = zoo("repvgg")
    original = onnx.load(source)
    result = onnxmerge.fold(source, source.with_suffix(".folded.onnx"))
    ops = _ops(result.proto)
    blocks = _ops(original)["Relu"]  # one ReLU per RepVGG block
    assert ops["Conv"] == blocks and ops["Add"] == 0 and ops["BatchNormalization"] == 0
    assert result.report["before"]["macs"] > result.report["after"]["macs"]


def test_dynamic_batch_export_keeps_dynamic_batch(zoo):
    source = zoo("resnet18", dynamic_batch=True)
    result = onnxmerge.fold(source, source.with_suffix(".folded.onnx"))
    assert io_signature(result.proto) == io_signature(onnx.load(source))
    assert io_signature(result.proto)["inputs"][0][2][0] == "batch"
    assert any("batch" in note for note in result.report["verification"]["assumptions"])


def test_default_export_without_bn_still_verifies(zoo):
    source = zoo("mobilenet_v2", keep_bn=False)
    result = onnxmerge.fold(source, source.with_suffix(".folded.onnx"))
    assert result.verified
