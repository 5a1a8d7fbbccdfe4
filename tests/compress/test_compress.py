"""End to end on the digits-trained nets, plan reuse, and bad inputs (one-line errors, exit 2)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

from onnxmerge.layermerge.api import compress
from onnxmerge.errors import BadInputError
from onnxmerge.io import save_model
from onnxmerge.runner import make_session

from conftest import GraphBuilder, op_types

# Held-out digits accuracy may drop by at most this much (7 of 360 images) after a short recovery.
ACCURACY_TOLERANCE = 0.02


@pytest.fixture(scope="module", params=["resnet", "mobilenet"])
def trained(request, tmp_path_factory, trained_digits):
    folder = tmp_path_factory.mktemp(request.param)
    result = trained_digits(request.param)
    save_model(result.model, folder / "model.onnx")
    np.savez(folder / "calib.npz", input=result.x_calib)
    return folder, result


def _accuracy(model, trained) -> float:
    outputs = make_session(model).run(None, {"input": trained.x_test})[0]
    return float(np.mean(outputs.argmax(1) == trained.y_test))


def test_compress_end_to_end_keeps_accuracy_and_reuses_its_plan(trained):
    folder, digits = trained
    plan = folder / "plan.json"
    result = compress(folder / "model.onnx", folder / "out.onnx", calibration=folder / "calib.npz", speedup=1.15,
                      recover_steps=200, runs=10, plan=plan)
    report = result.report
    original = onnx.load(folder / "model.onnx")
    compressed = onnx.load(folder / "out.onnx")
    assert op_types(compressed).count("Conv") < op_types(original).count("Conv")
    assert report["predicted_table_ms"] < report["table_original_ms"]
    assert report["measured_speedup"]["median"] > 0 and report["rounds"]
    assert _accuracy(compressed, digits) >= _accuracy(original, digits) - ACCURACY_TOLERANCE
    assert report["recovery"]["max_abs_error"] <= report["recovery"]["tolerance"]  # final ONNX == trained net
    assert set(report["wall_s"]) >= {"canonicalize", "analyse", "latency_table", "importance_table", "recover"}
    saved = json.loads(plan.read_text())
    assert saved["plan"]["choices"]
    segments = saved["segments"]
    assert [s["segment"][0] for s in segments][0] == 0 and all(
        a["segment"][1] == b["segment"][0] for a, b in zip(segments, segments[1:]))  # the plan covers the chain
    assert all(s["segment"][0] < k <= s["segment"][1] for s in segments for k in s["kept_convs"])
    again = compress(folder / "model.onnx", None, calibration=folder / "calib.npz", plan=plan, recover=False,
                     runs=3)
    assert again.plan.to_dict() == result.plan.to_dict()
    assert "importance_table" not in again.report["wall_s"]


def test_budget_below_the_fastest_plan_names_the_minimum(trained):
    folder, _ = trained
    with pytest.raises(BadInputError, match="below the fastest possible plan"):
        compress(folder / "model.onnx", None, calibration=folder / "calib.npz", speedup=50.0, recover=False,
                 runs=5)


@pytest.mark.parametrize("kind,match", [
    ("missing", "calibration file not found"),
    ("names", "model's inputs are"),
    ("shape", "does not fit the model input"),
])
def test_bad_calibration_is_refused(tmp_path, kind, match):
    g = GraphBuilder(("N", 3, 8, 8))
    model = save_model(g.build(g.node("Relu", [g.conv(g.node("Relu", [g.conv("x", 3, 4, pads=[1, 1, 1, 1])]), 4, 4,
                                                               pads=[1, 1, 1, 1])])), tmp_path / "m.onnx")
    calib = tmp_path / "calib.npz"
    if kind == "names":
        np.savez(calib, image=np.zeros((4, 3, 8, 8), np.float32))
    elif kind == "shape":
        np.savez(calib, x=np.zeros((4, 3, 9, 9), np.float32))
    with pytest.raises(BadInputError, match=match):
        compress(model, None, calibration=calib, speedup=1.2, recover=False)


def test_bad_recover_data_and_search_space_are_refused_before_the_tables(tmp_path):
    g = GraphBuilder(("N", 3, 8, 8))
    x = g.node("Relu", [g.conv(g.node("Relu", [g.conv("x", 3, 4, pads=[1, 1, 1, 1])]), 4, 4, pads=[1, 1, 1, 1])])
    weight = g.const(np.ones((3, 4), np.float32))
    model = save_model(g.build(g.node("Gemm", [g.node("Flatten", [g.node("GlobalAveragePool", [x])]), weight],
                                      transB=1)), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.zeros((8, 3, 8, 8), np.float32))
    np.savez(tmp_path / "more.npz", x=np.zeros((8, 3, 9, 9), np.float32))
    started = time.perf_counter()
    with pytest.raises(BadInputError, match="recover data"):
        compress(model, None, calibration=tmp_path / "calib.npz", speedup=1.2, recover_data=tmp_path / "more.npz",
                 cache_dir=tmp_path / "cache")
    assert time.perf_counter() - started < 60 and not (tmp_path / "cache" / "importance").exists()
    with pytest.raises(BadInputError, match="search_space="):
        compress(model, None, calibration=tmp_path / "calib.npz", speedup=1.2, search_space="wide")
    with pytest.raises(BadInputError, match="alternatives="):
        compress(model, None, calibration=tmp_path / "calib.npz", speedup=1.2, alternatives=0)


def test_dynamic_spatial_dims_need_input_shape(tmp_path):
    g = GraphBuilder(("N", 3, "H", "W"))
    model = save_model(g.build(g.conv(g.node("Relu", [g.conv("x", 3, 4, pads=[1, 1, 1, 1])]), 4, 4)),
                       tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(BadInputError, match="input_shapes="):
        compress(model, None, calibration=tmp_path / "calib.npz", speedup=1.2, recover=False)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxmerge", "compress", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "160"})


def test_cli_inspect_and_bad_inputs(tmp_path):
    g = GraphBuilder((1, 3, 8, 8))
    chain = g.node("Relu", [g.conv(g.node("Relu", [g.conv("x", 3, 4, pads=[1, 1, 1, 1])]), 4, 4, pads=[1, 1, 1, 1])])
    model = save_model(g.build(g.node("Relu", [g.conv(chain, 4, 4, pads=[1, 1, 1, 1])])), tmp_path / "m.onnx")
    inspected = _cli(model, "--inspect")
    assert inspected.returncode == 0, inspected.stderr
    assert "segments" in inspected.stdout and "entries" in inspected.stdout
    no_chain = GraphBuilder((1, 3, 8, 8))
    flat = save_model(no_chain.build(no_chain.node("Relu", ["x"])), tmp_path / "flat.onnx")
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 3, 8, 8), np.float32))
    for args, needle in [((flat, "--inspect"), "no chain of convolutions"),
                         ((model, tmp_path / "o.onnx", "--speedup", "1.2"), "--calib"),
                         ((model, tmp_path / "o.onnx", "--calib", tmp_path / "nope.npz", "--speedup", "1.2"),
                          "not found")]:
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr


def test_labelled_calibration_scores_cross_entropy(tmp_path, trained_digits):
    from models.digits import load_digits_split

    digits = trained_digits("resnet")
    _, y_train, _, _ = load_digits_split(0)
    save_model(digits.model, tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", input=digits.x_calib, labels=y_train[:len(digits.x_calib)])
    result = compress(tmp_path / "model.onnx", None, calibration=tmp_path / "calib.npz", speedup=1.1,
                      recover=False, runs=5, cache_dir=tmp_path / "cache")
    fidelity = result.report["fidelity"]
    assert 0.9 <= fidelity["accuracy_original"] <= 1.0 and 0.0 <= fidelity["accuracy"] <= 1.0
    # With labels the table scores the change in cross-entropy (which can be positive: nothing is provably
    # dominated, so nothing is skipped), never a change in accuracy.
    importance = result.report["importance"]
    assert importance["score"].startswith("cross-entropy") and importance["entries_skipped"] == 0
    assert importance["cache"]["misses"] > 0 and importance["held_out"]["rows"] >= 1
    again = compress(tmp_path / "model.onnx", None, calibration=tmp_path / "calib.npz", speedup=1.1,
                     recover=False, runs=5, cache_dir=tmp_path / "cache")
    assert again.report["importance"]["cache"]["misses"] == 0  # a second target reuses the cached table
    assert again.report["importance"]["cache"]["hits"] == importance["entries_scored"]
