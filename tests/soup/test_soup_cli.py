"""`onnxmerge soup` and `onnxmerge align` end to end: exit codes, one-line errors, inputs left untouched."""

import hashlib
import json
import os
import subprocess
import sys

import onnx
import pytest

from onnxmerge.io import save_model

from soup_helpers import digits_family, small_cnn  # noqa: F401  (session fixture)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxmerge", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "160"})


def _digest(*paths) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def _assert_one_line_error(result, code: int, needle: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def pair(tmp_path):
    return [save_model(small_cnn(seed), tmp_path / f"m{seed}.onnx") for seed in (0, 1)]


def test_soup_writes_the_model_a_summary_and_a_json_report(pair, tmp_path):
    out, report = tmp_path / "soup.onnx", tmp_path / "report.json"
    result = _cli("soup", *pair, "-o", out, "--method", "weighted", "--weights", "1", "3", "--json", report)
    assert result.returncode == 0, result.stderr
    assert "weighted" in result.stdout and "10 merged" in result.stdout and f"wrote {out}" in result.stdout
    data = json.loads(report.read_text())
    assert data["tensors"] == {"merged": 10} and data["parameters"] == {"weights": [1.0, 3.0]}
    assert {p.key for p in onnx.load(out).metadata_props} >= {"onnxmerge.soup.inputs", "onnxmerge.version"}


def test_check_reports_compatible_models_and_refuses_others_in_one_line(pair, tmp_path):
    result = _cli("soup", "--check", *pair)
    assert result.returncode == 0 and "compatible: 2 models" in result.stdout
    other = save_model(small_cnn(0, transB=0, channels=5), tmp_path / "other.onnx")
    five = save_model(small_cnn(1, transB=1, channels=5), tmp_path / "five.onnx")
    before = _digest(other, five)
    _assert_one_line_error(_cli("soup", "--check", five, other), 2, "topology level")
    _assert_one_line_error(_cli("soup", five, other, "-o", tmp_path / "out.onnx"), 2, "attribute transB")
    assert _digest(other, five) == before and not (tmp_path / "out.onnx").exists()


def test_bad_options_exit_2_and_a_nan_result_exits_1(pair, tmp_path):
    _assert_one_line_error(_cli("soup", *pair, "-o", tmp_path / "o.onnx", "--method", "ties"), 2, "needs a base model")
    _assert_one_line_error(_cli("soup", *pair), 2, "needs -o OUTPUT")
    broken = small_cnn(1)
    broken.graph.initializer[0].float_data[:] = []
    weight = onnx.numpy_helper.to_array(broken.graph.initializer[0]).copy()
    weight.flat[0] = float("inf")
    broken.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(weight, broken.graph.initializer[0].name))
    infinite = save_model(broken, tmp_path / "inf.onnx")
    _assert_one_line_error(_cli("soup", pair[0], infinite, "-o", tmp_path / "o.onnx"), 1, "NaN/Inf")
    assert not (tmp_path / "o.onnx").exists()


def test_align_writes_an_output_identical_model(pair, tmp_path):
    out = tmp_path / "aligned.onnx"
    before = _digest(*pair)
    result = _cli("align", *pair, "-o", out, "--json", tmp_path / "align.json")
    assert result.returncode == 0, result.stderr
    assert "output-identical to B" in result.stdout and out.is_file()
    assert json.loads((tmp_path / "align.json").read_text())["verification"]["passed"] is True
    assert _digest(*pair) == before


def test_greedy_on_digits_reports_scores_and_what_it_kept(digits_family, tmp_path):
    out, report = tmp_path / "greedy.onnx", tmp_path / "greedy.json"
    result = _cli("soup", *digits_family.finetunes, "-o", out, "--method", "greedy", "--eval", digits_family.val,
                  "--reset-bn", digits_family.calib, "--json", report)
    assert result.returncode == 0, result.stderr
    assert "kept" in result.stdout and "uniform soup" in result.stdout
    data = json.loads(report.read_text())
    singles = [m["score"] for m in data["scores"]["models"]]
    assert data["scores"]["soup"] >= max(singles) and data["greedy"]["kept"]
    merged_several = len(data["greedy"]["kept"]) > 1
    reset = bool(data["bn_reset"]["batchnorm_nodes"])
    assert ("BatchNorm statistics reset" in result.stdout) == merged_several == reset
