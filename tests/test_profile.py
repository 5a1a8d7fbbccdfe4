"""profile and compare on small CPU models: fields present and plausible; bad inputs are one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from onnxmerge.errors import BadInputError
from onnxmerge.io import save_model
from onnxmerge.profiler import compare, profile
from onnxmerge.runner import make_session

from conftest import GraphBuilder


def _cnn(batch=1, size=16):
    g = GraphBuilder((batch, 3, size, size))
    conv = g.node("Relu", [g.conv("x", 3, 16, pads=[1, 1, 1, 1])])
    return g.build(g.node("GlobalAveragePool", [g.conv(conv, 16, 16, pads=[1, 1, 1, 1])]))


@pytest.fixture
def cnn_path(tmp_path):
    return save_model(_cnn(), tmp_path / "cnn.onnx")


def test_profile_report_fields_are_plausible(cnn_path):
    report = profile(cnn_path, runs=20, warmup=3)
    latency = report["latency"]
    assert latency["runs"] == 20
    assert 0 < latency["min_ms"] <= latency["median_ms"] <= latency["p90_ms"] <= latency["p99_ms"]
    assert latency["std_ms"] >= 0 and latency["mean_ms"] > 0
    assert report["session"]["providers"][0] == "CPUExecutionProvider"
    assert report["session"]["intra_op_threads"] == 1 and report["session"]["inter_op_threads"] == 1
    env = report["environment"]
    for key in ("onnxruntime", "ort_build", "cpu", "provider", "threads", "opt_level", "input_shapes"):
        assert key in env
    assert env["input_shapes"] == {"x": [1, 3, 16, 16]}
    assert report["memory"]["peak_rss_bytes"] >= report["memory"]["rss_before_bytes"] > 0
    assert report["static"]["macs"] == 2 * 16 * 16 * 9 * (3 * 16 + 16 * 16) // 2
    json.dumps(report)


def test_compare_of_a_model_with_itself_and_with_its_fold(cnn_path, tmp_path):
    report = compare(cnn_path, cnn_path, runs=20, warmup=3)
    speedup = report["speedup"]
    assert speedup["p10"] <= speedup["median"] <= speedup["p90"]
    assert 0.2 < speedup["median"] < 5  # same model: a ratio near 1, loose because the machine is shared
    assert report["latency_a"]["runs"] == report["latency_b"]["runs"] == 20


def test_dynamic_dims_default_to_one_and_are_said(tmp_path):
    path = save_model(_cnn(batch="N"), tmp_path / "dyn.onnx")
    report = profile(path, runs=3, warmup=1)
    assert report["environment"]["input_shapes"]["x"][0] == 1
    assert any("N" in note for note in report["assumptions"])
    with_shape = profile(path, runs=3, warmup=1, input_shapes={"x": (4, 3, 16, 16)})
    assert with_shape["environment"]["input_shapes"]["x"] == [4, 3, 16, 16]


@pytest.mark.parametrize("kwargs,match", [
    ({"provider": "tpu"}, "unknown provider 'tpu'; available here: cpu"),
    ({"input_shapes": {"x": (1, 3, 16)}}, "rank"),
    ({"input_shapes": {"x": (1, 4, 16, 16)}}, "fixes it to 3"),
    ({"runs": 0}, "runs >= 1"),
    ({"threads": 0}, "threads must be >= 1"),
    ({"opt_level": "max"}, "unknown opt level"),
])
def test_bad_profile_options(cnn_path, kwargs, match):
    with pytest.raises(BadInputError, match=match):
        profile(cnn_path, **kwargs)


def test_cuda_request_without_cuda_is_refused_not_silently_cpu(cnn_path):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        try:
            make_session(cnn_path, provider="cuda")
        except BadInputError as error:  # GPU build without a usable GPU: must say so
            assert "could not be loaded" in str(error)
        else:
            pytest.skip("a working CUDA device is present")
    else:
        with pytest.raises(BadInputError, match="not in this ONNX Runtime build.*available here: cpu"):
            profile(cnn_path, provider="cuda", runs=1)


def test_compare_refuses_models_with_different_inputs(cnn_path, tmp_path):
    other = save_model(_cnn(size=12), tmp_path / "other.onnx")
    with pytest.raises(BadInputError, match="different inputs"):
        compare(cnn_path, other, runs=2, warmup=0)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxmerge", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "160"})


def test_profile_and_compare_cli(cnn_path, tmp_path):
    out = tmp_path / "p.json"
    result = _cli("profile", cnn_path, "--runs", "10", "--warmup", "2", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "median ms" in result.stdout and "peak RSS" in result.stdout
    assert json.loads(out.read_text())["latency"]["runs"] == 10
    result = _cli("compare", cnn_path, cnn_path, "--runs", "10", "--warmup", "2")
    assert result.returncode == 0, result.stderr
    assert "speed-up of B over A" in result.stdout


@pytest.mark.parametrize("args,needle", [
    (["profile", "MODEL", "--provider", "tpu"], "available here: cpu"),
    (["profile", "MODEL", "--input-shape", "x:1,3,16"], "rank"),
    (["profile", "CORRUPT"], "cannot parse"),
    (["profile", "MODEL", "--opt-level", "max"], "invalid choice"),
])
def test_profile_cli_bad_inputs_exit_2(cnn_path, tmp_path, args, needle):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x0a\xff\xff\xff\xff" * 50)
    args = [str(cnn_path) if a == "MODEL" else str(corrupt) if a == "CORRUPT" else a for a in args]
    result = _cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_fold_bench_reports_a_speedup(tmp_path):
    g = GraphBuilder((1, 8, 16, 16))
    three = g.batchnorm(g.conv("x", 8, 8, k=3, bias=False, pads=[1, 1, 1, 1]), 8)
    one = g.batchnorm(g.conv("x", 8, 8, k=1, bias=False), 8)
    source = save_model(g.build(g.node("Relu", [g.node("Add", [three, one])])), tmp_path / "rep.onnx")
    report_path = tmp_path / "r.json"
    result = _cli("fold", source, tmp_path / "out.onnx", "--bench", "--json", report_path)
    assert result.returncode == 0, result.stderr
    assert "speed-up of B over A" in result.stdout
    assert json.loads(report_path.read_text())["bench"]["speedup"]["median"] > 0
