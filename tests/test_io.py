import os

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxmerge.errors import BadInputError
from onnxmerge.io import (io_signature, is_stripped, light_copy, load_model, load_small_external_data,
                          ort_max_ir_version, read_tensor, save_model, staged_model)
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


# --- weights that stay on disk ------------------------------------------------------------------------------


def _wide_model():
    """A model with a tensor of over 1 MiB (aligned in data files) and small ones (kept inline)."""
    g = GraphBuilder((1, 3, 6, 6))
    small = g.conv("x", 3, 16, pads=[1, 1, 1, 1])
    return g.build(g.node("Relu", [g.conv(small, 16, 64, k=17, pads=[8, 8, 8, 8])]))


def test_read_tensor_reads_external_data_without_loading_it_into_the_proto(tmp_path):
    model = _wide_model()
    path = save_model(model, tmp_path / "ext.onnx", external_data=True)
    proto = onnx.load(str(path), load_external_data=False)
    for stored, original in zip(proto.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(read_tensor(stored, tmp_path), onnx.numpy_helper.to_array(original))
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(not t.HasField("raw_data") for t in external)
    with pytest.raises(BadInputError, match="folder is unknown"):
        read_tensor(next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL))


def test_read_tensor_refuses_locations_outside_the_folder(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    path = save_model(_small_model(), inner / "ext.onnx", external_data=True)
    (inner / "ext.onnx.data").rename(tmp_path / "secret.data")
    relocate_external_data(path, "../secret.data")
    proto = onnx.load(str(path), load_external_data=False)
    external = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    with pytest.raises(BadInputError, match="outside the model's folder"):
        read_tensor(external, inner)


def test_saving_a_model_whose_weights_stay_on_disk_copies_them_and_leaves_the_input_alone(tmp_path):
    model = _wide_model()
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    source = save_model(model, tmp_path / "in" / "m.onnx", external_data=True)
    data = (tmp_path / "in" / "m.onnx.data").read_bytes()
    loaded = load_model(source, load_external_data=False)
    assert loaded.had_external_data
    written = save_model(loaded.proto, tmp_path / "out" / "m.onnx", base_dir=source.parent, external_data=True)
    assert (tmp_path / "in" / "m.onnx.data").read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx", "m.onnx.data"]
    feeds = {"x": np.ones((1, 3, 6, 6), np.float32)}
    np.testing.assert_array_equal(make_session(written).run(None, feeds)[0], make_session(model).run(None, feeds)[0])
    # Large tensors start at multiples of 64 KiB, so ONNX Runtime can map them.
    for tensor in onnx.load(str(written), load_external_data=False).graph.initializer:
        entries = {e.key: int(e.value) for e in tensor.external_data if e.key in ("offset", "length")}
        if entries and entries["length"] >= 1 << 20:
            assert entries["offset"] % (1 << 16) == 0
    one_file = save_model(loaded.proto, tmp_path / "out" / "single.onnx", base_dir=source.parent)  # small: inline
    assert not (tmp_path / "out" / "single.onnx.data").exists()
    np.testing.assert_array_equal(make_session(one_file).run(None, feeds)[0], make_session(model).run(None, feeds)[0])


def test_light_copy_leaves_out_large_payloads_and_keeps_the_source(tmp_path):
    model = _wide_model()
    before = model.SerializeToString()
    light = light_copy(model)
    assert model.SerializeToString() == before
    assert light.ByteSize() < 10_000 < model.ByteSize()
    stripped = [t.name for t in light.graph.initializer if is_stripped(t)]
    kept = [t.name for t in light.graph.initializer if t.HasField("raw_data")]
    assert stripped and kept  # the big weight is a stand-in, the small bias is kept
    assert [list(t.dims) for t in light.graph.initializer] == [list(t.dims) for t in model.graph.initializer]
    inferred = onnx.shape_inference.infer_shapes(light)
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim] == [1, 64, 6, 6]


def test_small_external_tensors_are_read_in_large_ones_stay_on_disk(tmp_path):
    model = _wide_model()
    path = tmp_path / "ext.onnx"
    every_tensor_external = onnx.ModelProto()
    every_tensor_external.CopyFrom(model)  # onnx.save_model marks the tensors of the proto it is given
    onnx.save_model(every_tensor_external, str(path), save_as_external_data=True, size_threshold=0,
                    location="ext.onnx.data")
    proto = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert load_small_external_data(proto, tmp_path, 1024) == 2  # the biases
    assert load_small_external_data(proto, tmp_path, 1 << 20) == 1  # the small conv's weight
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == 1
    for stored, original in zip(proto.graph.initializer, model.graph.initializer):
        if stored.data_location != onnx.TensorProto.EXTERNAL:
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(stored), onnx.numpy_helper.to_array(original))


def test_staged_model_is_invisible_until_published_and_removed_if_not(tmp_path):
    with staged_model(_wide_model(), tmp_path / "m.onnx", external_data=True) as staged:
        assert staged.path.is_file() and (staged.path.parent / "m.onnx.data").is_file()
        assert make_session(staged.path).get_outputs()[0].name  # ORT loads the staged file as it is
        assert not (tmp_path / "m.onnx").exists()
    assert list(tmp_path.iterdir()) == []
    with staged_model(_wide_model(), tmp_path / "m.onnx", external_data=True) as staged:
        staged.publish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_external_data_is_copied_in_chunks_where_the_kernel_cannot_copy_it(tmp_path, monkeypatch):
    def unsupported(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported, raising=False)
    model = _wide_model()
    (tmp_path / "in").mkdir()
    source = save_model(model, tmp_path / "in" / "m.onnx", external_data=True)
    written = save_model(load_model(source, load_external_data=False).proto, tmp_path / "m.onnx",
                         base_dir=source.parent, external_data=True)
    feeds = {"x": np.ones((1, 3, 6, 6), np.float32)}
    np.testing.assert_array_equal(make_session(written).run(None, feeds)[0], make_session(model).run(None, feeds)[0])
