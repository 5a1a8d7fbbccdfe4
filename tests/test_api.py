import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxmerge
from onnxmerge.errors import BadInputError, VerificationError
from onnxmerge.io import io_signature, save_model
from onnxmerge.runner import make_session

from conftest import GraphBuilder, op_types


def _bn_model(batch="N"):
    g = GraphBuilder((batch, 3, 8, 8))
    weight = g.node("Identity", [g.const(g.rng.standard_normal((4, 3, 3, 3)).astype(np.float32))])
    conv = g.node("Conv", ["x", weight], pads=[1, 1, 1, 1])
    return g.build(g.node("Relu", [g.batchnorm(conv, 4)]))


def test_fold_model_in_model_out_with_report():
    model = _bn_model()
    result = onnxmerge.fold(model)
    assert isinstance(result.model, onnx.ModelProto)
    assert op_types(result.model) == ["Conv", "Relu"]
    report = result.report
    assert report["verification"]["passed"] and result.verified
    assert report["rewrites"]["fold_batchnorm"] == 1
    assert report["before"]["ops"]["BatchNormalization"] == 1 and "BatchNormalization" not in report["after"]["ops"]
    assert report["verification"]["check_n"] == 3
    assert any("set to 1" in note for note in report["verification"]["assumptions"])


def test_fold_path_in_path_out(tmp_path):
    source = save_model(_bn_model(), tmp_path / "m.onnx")
    result = onnxmerge.fold(source, tmp_path / "out.onnx")
    assert result.model == tmp_path / "out.onnx" and result.model.is_file()
    default = onnxmerge.fold(source)
    assert default.model == tmp_path / "m.folded.onnx"


def test_dynamic_batch_and_io_signature_preserved():
    model = _bn_model(batch="batch")
    result = onnxmerge.fold(model)
    assert io_signature(result.model) == io_signature(model)
    session = make_session(result.model)
    for batch in (1, 3):
        assert session.run(None, {"x": np.zeros((batch, 3, 8, 8), np.float32)})[0].shape[0] == batch
    assert result.model.opset_import[0].version == model.opset_import[0].version


def test_input_shape_option_is_used_and_checked():
    model = _bn_model()
    result = onnxmerge.fold(model, input_shapes={"x": (2, 3, 8, 8)})
    assert result.report["verification"]["input_shapes"] == {"x": [2, 3, 8, 8]}
    with pytest.raises(BadInputError, match="fixes it to 3"):
        onnxmerge.fold(model, input_shapes={"x": (1, 4, 8, 8)})
    with pytest.raises(BadInputError, match="unknown input"):
        onnxmerge.fold(model, input_shapes={"y": (1, 3, 8, 8)})


def test_failed_verification_names_the_first_failing_pass_and_writes_nothing(tmp_path):
    """With zero tolerance, float reassociation in the BN fold is caught and attributed to it."""
    source = save_model(_bn_model(), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    with pytest.raises(VerificationError, match="fold_batchnorm") as failure:
        onnxmerge.fold(source, out, rtol=0.0, atol=0.0, noise_floor=False)
    assert not out.exists()
    assert failure.value.report["verification"]["first_failing_pass"] == "fold_batchnorm"


def test_only_and_skip_select_passes():
    model = _bn_model()
    assert "BatchNormalization" in op_types(onnxmerge.fold(model, skip=["fold_batchnorm"]).model)
    only = onnxmerge.fold(model, only=["eliminate_identity"])
    assert op_types(only.model) == ["Conv", "BatchNormalization", "Relu"]
    with pytest.raises(BadInputError, match="unknown pass"):
        onnxmerge.fold(model, only=["no_such_pass"])


def test_quantized_model_passes_through_with_warning():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("z", TensorProto.UINT8, [], [128])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "q", [x], [y], [scale, zero]),
                              opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = onnxmerge.fold(model)
    assert any("quantized" in str(w.message) for w in caught)
    assert result.model.SerializeToString() == model.SerializeToString()


def test_external_data_input_gives_external_data_output(tmp_path):
    g = GraphBuilder((1, 8, 6, 6))
    model = g.build(g.batchnorm(g.conv("x", 8, 64), 64))
    source = save_model(model, tmp_path / "ext.onnx", external_data=True)
    result = onnxmerge.fold(source, tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").is_file()
    feeds = {"x": np.ones((1, 8, 6, 6), np.float32)}
    np.testing.assert_allclose(make_session(result.model).run(None, feeds)[0],
                               make_session(model).run(None, feeds)[0], rtol=1e-4, atol=1e-5)


def test_prepass_session_matches_plain_session_and_is_cached(tmp_path):
    source = save_model(_bn_model(), tmp_path / "m.onnx")
    cache = tmp_path / "cache"
    session = onnxmerge.InferenceSession(source, providers=["CPUExecutionProvider"], cache_dir=cache)
    assert type(session).__name__ == "InferenceSession"
    cached = list(cache.glob("*.onnx"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    plain = make_session(source).run(None, feeds)[0]
    np.testing.assert_allclose(session.run(None, feeds)[0], plain, rtol=1e-4, atol=1e-5)
    onnxmerge.InferenceSession(source, cache_dir=cache)
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not refolded
    assert "BatchNormalization" not in op_types(onnx.load(cached[0]))
