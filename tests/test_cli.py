import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxmerge.io import save_model

from conftest import GraphBuilder, op_types, relocate_external_data


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxmerge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "COLUMNS": "120"})


@pytest.fixture
def model_path(tmp_path):
    g = GraphBuilder((1, 3, 8, 8))
    conv = g.conv("x", 3, 4, pads=[1, 1, 1, 1])
    return save_model(g.build(g.node("Relu", [g.batchnorm(conv, 4)])), tmp_path / "m.onnx")


def test_fold_writes_verified_model_and_json(model_path, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = _cli("fold", model_path, out, "--json", report, "--explain")
    assert result.returncode == 0, result.stderr
    assert "BatchNormalization" in result.stdout and "max abs error" in result.stdout
    assert op_types(onnx.load(out)) == ["Conv", "Relu"]
    data = json.loads(report.read_text())
    assert data["verification"]["passed"] is True
    assert data["after"]["nodes"] == 2


def test_version_help_and_list_passes():
    assert _cli("--version").stdout.startswith("onnxmerge ")
    assert "--check-n" in _cli("fold", "--help").stdout
    listing = _cli("fold", "--list-passes").stdout
    for name in ("fold_batchnorm", "merge_conv_chain", "reparam_branches", "cleanup"):
        assert name in listing


def test_verification_failure_exits_1_and_writes_nothing(model_path, tmp_path):
    out = tmp_path / "out.onnx"
    result = _cli("fold", model_path, out, "--rtol", "0", "--atol", "0", "--no-noise-floor")
    assert result.returncode == 1
    assert "fold_batchnorm" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def _assert_bad_input(result, needle):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["truncated", "random", "empty_graph", "missing_data", "traversal"])
def test_bad_inputs_exit_2_and_leave_input_untouched(tmp_path, model_path, kind):
    big = GraphBuilder((1, 8, 4, 4))
    if kind == "truncated":
        target = model_path
        target.write_bytes(target.read_bytes()[:100])
        needle = "onnxmerge: error"
    elif kind == "random":
        target = tmp_path / "r.onnx"
        target.write_bytes(np.random.default_rng(0).bytes(4096))
        needle = "onnxmerge: error"
    elif kind == "empty_graph":
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
        target = tmp_path / "e.onnx"
        onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "e", [x], [x])), target)
        needle = "empty graph"
    elif kind == "missing_data":
        target = save_model(big.build(big.conv("x", 8, 64)), tmp_path / "x.onnx", external_data=True)
        (tmp_path / "x.onnx.data").unlink()
        needle = "missing"
    else:
        target = save_model(big.build(big.conv("x", 8, 64)), tmp_path / "x.onnx", external_data=True)
        relocate_external_data(target, "../../etc/passwd")
        needle = "outside the model's folder"
    before = target.read_bytes()
    result = _cli("fold", target, tmp_path / "out.onnx")
    _assert_bad_input(result, needle)
    assert target.read_bytes() == before
    assert not (tmp_path / "out.onnx").exists()


def test_quantized_model_exits_0_with_warning(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.05]),
             helper.make_tensor("z", TensorProto.UINT8, [], [128]),
             helper.make_tensor("w", TensorProto.UINT8, [2, 3, 1, 1], [130, 120, 128, 140, 127, 129]),
             helper.make_tensor("ws", TensorProto.FLOAT, [], [0.02])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("QLinearConv", ["q", "s", "z", "w", "ws", "z", "s", "z"], ["qc"]),
             helper.make_node("DequantizeLinear", ["qc", "s", "z"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "q", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    source = tmp_path / "q.onnx"
    onnx.save(model, source)
    before = source.read_bytes()
    result = _cli("fold", source, tmp_path / "out.onnx")
    assert result.returncode == 0, result.stderr
    assert "quantized" in result.stdout
    assert source.read_bytes() == before
    assert "QLinearConv" in op_types(onnx.load(tmp_path / "out.onnx"))


def test_usage_errors_exit_2(model_path, tmp_path):
    _assert_bad_input(_cli("fold", model_path), "INPUT and OUTPUT")
    _assert_bad_input(_cli("fold", model_path, tmp_path / "o.onnx", "--skip", "nope"), "unknown pass")
    _assert_bad_input(_cli("fold", model_path, tmp_path / "o.onnx", "--input-shape", "x:1,a"), "bad --input-shape")
    _assert_bad_input(_cli("fold", model_path, tmp_path / "o.onnx", "--check-n", "x"), "invalid int value")
    _assert_bad_input(_cli("fold", tmp_path / "nope.onnx", tmp_path / "o.onnx"), "not found")


def test_refuses_to_overwrite_input_unless_forced(model_path):
    before = model_path.read_bytes()
    _assert_bad_input(_cli("fold", model_path, model_path), "overwrite")
    assert model_path.read_bytes() == before
    assert _cli("fold", model_path, model_path, "--force").returncode == 0
    assert op_types(onnx.load(model_path)) == ["Conv", "Relu"]


def test_library_errors_name_parameters_and_the_cli_names_flags(tmp_path):
    """The API says ``force=True``/``input_shapes=``; the same refusal on the command line names the flag."""
    import onnxmerge
    from onnxmerge.cli_options import to_cli_terms
    from onnxmerge.errors import BadInputError

    g = GraphBuilder((1, 3, 8, 8))
    path = save_model(g.build(g.conv("x", 3, 4)), tmp_path / "m.onnx")
    with pytest.raises(BadInputError, match=r"force=True"):
        onnxmerge.fold(str(path), str(path))
    with pytest.raises(BadInputError, match=r"input_shapes= names unknown input"):
        onnxmerge.fold(str(path), str(tmp_path / "o.onnx"), input_shapes={"y": (1, 3, 8, 8)})
    result = _cli("fold", path, path)
    assert result.returncode == 2 and "--force" in result.stderr and "force=True" not in result.stderr
    result = _cli("fold", path, tmp_path / "o.onnx", "--input-shape", "y:1,3,8,8")
    assert result.returncode == 2 and "--input-shape names unknown input" in result.stderr
    assert to_cli_terms("use method='weighted'") == "use --method weighted"
    assert to_cli_terms("speedup=0.9 must be > 1") == "--speedup 0.9 must be > 1"


def test_batch_writes_its_report_where_json_says(model_path, tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "m.onnx").write_bytes(model_path.read_bytes())
    report = tmp_path / "batch.json"
    result = _cli("batch", zoo, "-o", tmp_path / "out", "--jobs", "1", "--json", report)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert [m["model"] for m in data["models"]] == ["m.onnx"] and data["exit_code"] == 0

