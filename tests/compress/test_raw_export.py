"""compress on a raw export whose TF-"same" padding is computed in the graph (the EfficientNet-Lite0 form:
ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast feeding a Pad): the chain is found and compress runs
end to end, without any other tool cleaning the file first."""

import warnings

import numpy as np
import onnx
import pytest

from conftest import op_types
from onnxmerge.layermerge.api import compress, inspect
from onnxmerge.runner import make_session


def _same_pad_net():
    import torch
    from torch import nn

    class SameConv(nn.Sequential):
        """TF "same" padding as efficientnet_lite_pytorch writes it: asymmetric ZeroPad2d, then the conv."""

        def __init__(self, c_in, c_out, k, stride=1, groups=1):
            total = max(k - stride, 0)  # for an even input size
            super().__init__(nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2)),
                             nn.Conv2d(c_in, c_out, k, stride, groups=groups, bias=False), nn.BatchNorm2d(c_out))

    torch.manual_seed(0)
    blocks = [SameConv(3, 16, 3, 2), nn.ReLU6()]
    for c_in, c_out, stride in ((16, 24, 2), (24, 24, 1), (24, 32, 2)):
        blocks += [SameConv(c_in, c_in * 4, 1), nn.ReLU6(), SameConv(c_in * 4, c_in * 4, 3, stride, groups=c_in * 4),
                   nn.ReLU6(), SameConv(c_in * 4, c_out, 1)]
    net = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    with torch.no_grad():  # non-trivial BN statistics, as a trained net has
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def raw_export(tmp_path_factory):
    import torch

    folder = tmp_path_factory.mktemp("raw")
    path = folder / "raw.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_same_pad_net(), (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    np.savez(folder / "calib.npz", input=np.random.default_rng(0).standard_normal((24, 3, 32, 32)).astype(np.float32))
    return folder, path


def test_the_raw_export_has_the_padding_machinery(raw_export):
    ops = op_types(onnx.load(raw_export[1]))
    assert ops.count("Pad") >= 4 and "ConstantOfShape" in ops and "Slice" in ops


def test_inspect_finds_the_whole_chain(raw_export):
    tables = inspect(str(raw_export[1]))
    segments = int(tables[-1].caption.split()[0])
    convs = op_types(onnx.load(raw_export[1])).count("Conv")
    assert convs == 10 and segments >= convs  # every conv is on the chain: at least one segment each


def test_compress_runs_end_to_end_on_the_raw_export(raw_export):
    folder, path = raw_export
    result = compress(path, folder / "out.onnx", calibration=folder / "calib.npz", speedup=1.1, recover_steps=20,
                      runs=5)
    compressed = onnx.load(folder / "out.onnx")
    assert "Pad" not in op_types(compressed) and "ConstantOfShape" not in op_types(compressed)
    assert op_types(compressed).count("Conv") < op_types(onnx.load(path)).count("Conv")
    assert result.report["predicted_table_ms"] < result.report["table_original_ms"]
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert np.all(np.isfinite(make_session(compressed).run(None, {"input": x})[0]))
