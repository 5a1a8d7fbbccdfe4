import os

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxmerge.errors import BadInputError
from onnxmerge.io import io_signature, load_model, ort_max_ir_version, save_model
from onnxmerge.runner import make_session

from conftest import GraphBuilder, relocate_external_data


def _small_model():
    g = GraphBuilder((1, 3, 6, 6))
    return g.build(g.node("Relu", [g.conv("x", 3, 64)]))


def test_save_then_load_round_trip(tmp_path):
    model = _small_model()
    path = save_model(model, tmp_path / "m.onnx")
    loaded = load_model(path)
    assert loaded.proto.graph.node[0].op_type == "Conv"
    assert not loaded.had_external_data
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp files left behind


def test_external_data_round_trip_loads_in_ort(tmp_path):
    model = _small_model()
    path = save_model(model, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file()
    loaded = load_model(path)
    assert loaded.had_external_data
    feeds = {"x": np.ones((1, 3, 6, 6), np.float32)}
    np.testing.assert_array_equal(make_session(path).run(None, feeds)[0], make_session(model).run(None, feeds)[0])
    np.testing.assert_array_equal(make_session(loaded.proto).run(None, feeds)[0],
                                  make_session(model).run(None, feeds)[0])


def test_external_data_is_chosen_automatically_above_the_threshold(tmp_path):
    """The >2 GB rule, exercised with a small threshold: same code path, no 2 GB allocation in CI."""
    model = _small_model()
    small = save_model(model, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()
    path = save_model(model, tmp_path / "big.onnx", external_threshold_bytes=1024)
    assert (tmp_path / "big.onnx.data").is_file()
    assert load_model(path).had_external_data and not load_model(small).had_external_data
    feeds = {"x": np.ones((1, 3, 6, 6), np.float32)}
    np.testing.assert_array_equal(make_session(path).run(None, feeds)[0], make_session(model).run(None, feeds)[0])


def test_external_data_save_ignores_a_same_named_file_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out.onnx.data").write_bytes(b"unrelated")
    (tmp_path / "o").mkdir()
    path = save_model(_small_model(), tmp_path / "o" / "out.onnx", external_data=True)
    assert load_model(path).had_external_data
    assert (tmp_path / "out.onnx.data").read_bytes() == b"unrelated"


def test_refuses_to_overwrite_input_without_force(tmp_path):
    path = save_model(_small_model(), tmp_path / "m.onnx")
    before = path.read_bytes()
    with pytest.raises(BadInputError, match="overwrite"):
        save_model(_small_model(), path, input_path=path)
    assert path.read_bytes() == before
    save_model(_small_model(), path, input_path=path, force=True)


@pytest.mark.parametrize("content,match", [
    (b"\x08\x07\x12", "empty graph|cannot parse|not a valid"),
    (os.urandom(2048), "cannot parse|empty graph|not a valid"),
])
def test_garbage_files_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(BadInputError, match=match):
        load_model(path)


def test_truncated_file_is_refused(tmp_path):
    path = save_model(_small_model(), tmp_path / "m.onnx")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(BadInputError):
        load_model(path)


def test_empty_graph_is_refused(tmp_path):
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([], "empty", [x], [x]))
    path = tmp_path / "empty.onnx"
    onnx.save(model, path)
    with pytest.raises(BadInputError, match="empty graph"):
        load_model(path)


def test_missing_external_data_is_refused(tmp_path):
    path = save_model(_small_model(), tmp_path / "ext.onnx", external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(BadInputError, match="missing"):
        load_model(path)


def test_external_data_outside_model_folder_is_refused(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    path = save_model(_small_model(), inner / "ext.onnx", external_data=True)
    (inner / "ext.onnx.data").rename(tmp_path / "secret.data")
    relocate_external_data(path, "../secret.data")
    with pytest.raises(BadInputError, match="outside the model's folder"):
        load_model(path)


def test_ir_version_is_clamped_to_what_ort_loads():
    assert 7 <= ort_max_ir_version() <= onnx.IR_VERSION
    model = _small_model()
    model.ir_version = onnx.IR_VERSION
    from onnxmerge.io import clamp_ir_version

    clamp_ir_version(model)
    make_session(model)  # must load
    assert model.ir_version == ort_max_ir_version()


def test_io_signature_keeps_dynamic_dims():
    g = GraphBuilder(("batch", 3, 8, 8))
    model = g.build(g.conv("x", 3, 2))
    assert io_signature(model)["inputs"] == [("x", onnx.TensorProto.FLOAT, ("batch", 3, 8, 8))]
