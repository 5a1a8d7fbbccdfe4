"""Models whose weights live in external data: fold keeps them on disk, verifies from files, writes atomically.

The ``large`` test folds a real > 2 GB model in a child process and bounds its peak memory; the others use
small external-data models and run in a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxmerge
from onnxmerge.errors import BadInputError, VerificationError
from onnxmerge.graph import constant_value, external_data_dir, import_graph
from onnxmerge.io import io_signature, load_model, save_model
from onnxmerge.runner import make_session

from conftest import GraphBuilder, op_types, relocate_external_data
from large_model import build_large_model

MIB = 1 << 20
# Peak resident memory of `onnxmerge fold` over the weights' bytes: one ORT session's copy (or mapping) of
# the weights, plus the interpreter and libraries; never a second copy.
PEAK_RSS_OVER_WEIGHTS = 1.5


def _fingerprint(path: Path) -> tuple:
    """Size, mtime and a hash of the first and last MiB: enough to see any rewrite of a large file."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(MIB))
        handle.seek(max(0, stat.st_size - MIB))
        digest.update(handle.read(MIB))
    return stat.st_size, stat.st_mtime_ns, digest.hexdigest()


def _run_measured(command: list[str], log: Path, timeout_s: float) -> tuple[int, int]:
    """(exit code, peak RSS in bytes) of one child process, from wait4's rusage of exactly that child
    (RUSAGE_CHILDREN would be the largest of every child this test process ever waited for)."""
    with open(log, "wb") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        killer = threading.Timer(timeout_s, child.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)  # reaps the child itself: Popen.wait would lose the rusage
        finally:
            killer.cancel()
        child.returncode = os.waitstatus_to_exitcode(status)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return child.returncode, usage.ru_maxrss * scale


def _outputs(path: Path, feeds: dict) -> list[np.ndarray]:
    session = make_session(path, opt_level="disable")
    try:
        return session.run(None, feeds)
    finally:
        del session  # one session (one copy of the weights) at a time


@pytest.mark.large
@pytest.mark.skipif(not hasattr(os, "wait4"), reason="needs os.wait4 to measure the child's peak memory")
def test_fold_of_a_model_over_2gb_keeps_weights_on_disk(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    try:
        source, weight_bytes = build_large_model(folder)
        assert weight_bytes > 2 * 1024**3
        data = folder / "big.onnx.data"
        before = {path: _fingerprint(path) for path in (source, data)}
        model_bytes = source.read_bytes()
        out = folder / "out.onnx"

        code, peak = _run_measured([sys.executable, "-m", "onnxmerge", "fold", str(source), str(out)],
                                   tmp_path / "fold.log", timeout_s=600)
        log = (tmp_path / "fold.log").read_text(errors="replace")
        assert code == 0, log
        print(f"onnxmerge fold: peak RSS {peak / 2**30:.2f} GiB, {peak / weight_bytes:.2f}x the weights")
        assert peak <= PEAK_RSS_OVER_WEIGHTS * weight_bytes, (
            f"peak RSS {peak / 2**30:.2f} GiB is over {PEAK_RSS_OVER_WEIGHTS}x the weights "
            f"({weight_bytes / 2**30:.2f} GiB)")

        assert {path: _fingerprint(path) for path in (source, data)} == before
        assert source.read_bytes() == model_bytes
        assert sorted(p.name for p in folder.iterdir()) == ["big.onnx", "big.onnx.data", "out.onnx", "out.onnx.data"]

        written = onnx.load(str(out), load_external_data=False)
        assert "BatchNormalization" not in op_types(written)
        locations = {entry.value for tensor in written.graph.initializer for entry in tensor.external_data
                     if entry.key == "location"}
        assert locations == {"out.onnx.data"}
        assert io_signature(written) == io_signature(onnx.load(str(source), load_external_data=False))

        feeds = {"x": np.random.default_rng(7).standard_normal((1, 16, 8, 8)).astype(np.float32)}
        (want,) = _outputs(source, feeds)
        (got,) = _outputs(out, feeds)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # 4 GB: not left for pytest's kept temp folders


# --- small models with external data ----------------------------------------------------------------------


def _external_bn_model(tmp_path: Path, name: str = "ext.onnx") -> tuple[Path, onnx.ModelProto]:
    g = GraphBuilder((1, 8, 6, 6))
    model = g.build(g.node("Relu", [g.batchnorm(g.conv("x", 8, 64), 64)]))
    return save_model(model, tmp_path / name, external_data=True), model


def test_fold_leaves_external_data_input_untouched_and_writes_external_output(tmp_path):
    source, model = _external_bn_model(tmp_path)
    data = tmp_path / "ext.onnx.data"
    before = (source.read_bytes(), data.read_bytes(), data.stat().st_mtime_ns)
    result = onnxmerge.fold(source, tmp_path / "out.onnx")
    assert (source.read_bytes(), data.read_bytes(), data.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "out.onnx", "out.onnx.data"]
    assert result.verified and "BatchNormalization" not in op_types(result.proto)
    # The returned proto is the model as written: its weights are references into the output's data file.
    locations = {e.value for t in result.proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.data"}
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 8, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(make_session(result.model).run(None, feeds)[0],
                               make_session(model).run(None, feeds)[0], rtol=1e-4, atol=1e-5)
    assert result.report["before"]["size_bytes"] >= data.stat().st_size


def test_failed_verification_with_external_data_writes_nothing(tmp_path):
    source, _ = _external_bn_model(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(VerificationError, match="fold_batchnorm") as failure:
        onnxmerge.fold(source, tmp_path / "out.onnx", rtol=0.0, atol=0.0, noise_floor=False)
    assert failure.value.report["verification"]["first_failing_pass"] == "fold_batchnorm"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no staging folder left


def test_output_that_would_replace_the_input_data_file_is_refused(tmp_path):
    source, _ = _external_bn_model(tmp_path, name="a.onnx")
    (tmp_path / "a.onnx.data").rename(tmp_path / "ext.onnx.data")
    relocate_external_data(source, "ext.onnx.data")
    data = (tmp_path / "ext.onnx.data").read_bytes()
    with pytest.raises(BadInputError, match="external data"):
        onnxmerge.fold(source, tmp_path / "ext.onnx")
    assert (tmp_path / "ext.onnx.data").read_bytes() == data
    assert not (tmp_path / "ext.onnx").exists()


def test_weights_are_read_from_disk_on_demand_and_never_cached(tmp_path):
    source, model = _external_bn_model(tmp_path)
    loaded = load_model(source, load_external_data=False)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    expected = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == conv.input[1]))
    with external_data_dir(tmp_path):
        graph = import_graph(loaded.proto)
    weight = graph.tensors()[conv.input[1]]
    np.testing.assert_array_equal(constant_value(weight), expected)
    np.testing.assert_array_equal(weight.values, expected)
    assert type(weight._values).__name__ == "_StoredValues"  # still lazy: nothing kept on the graph
    stored = next(t for t in loaded.proto.graph.initializer if t.name == conv.input[1])
    assert stored.data_location == onnx.TensorProto.EXTERNAL and not stored.HasField("raw_data")  # nor in the proto


def test_external_data_input_can_be_written_as_one_file(tmp_path):
    source, model = _external_bn_model(tmp_path)
    result = onnxmerge.fold(source, tmp_path / "out.onnx", external_data=False)
    assert not (tmp_path / "out.onnx.data").exists()  # asked for one file: weights read in from the input
    feeds = {"x": np.ones((1, 8, 6, 6), np.float32)}
    np.testing.assert_allclose(make_session(result.model).run(None, feeds)[0],
                               make_session(model).run(None, feeds)[0], rtol=1e-4, atol=1e-5)


def test_constant_folding_reads_external_weights_it_evaluates(tmp_path):
    """fold_constants' onnx-ir round trip reads an external weight (here, to fold its Transpose) from disk."""
    g = GraphBuilder((2, 32))
    weight = g.const(g.rng.standard_normal((16, 32)).astype(np.float32))
    model = g.build(g.node("MatMul", ["x", g.node("Transpose", [weight], perm=[1, 0])]))
    source = save_model(model, tmp_path / "t.onnx", external_data=True)
    result = onnxmerge.fold(source, tmp_path / "out.onnx")
    assert op_types(result.proto) == ["MatMul"]
    feeds = {"x": np.random.default_rng(5).standard_normal((2, 32)).astype(np.float32)}
    np.testing.assert_allclose(make_session(result.model).run(None, feeds)[0],
                               make_session(model).run(None, feeds)[0], rtol=1e-5, atol=1e-6)


def test_canonicalized_external_data_model_is_verified_against_its_canonical_form(tmp_path):
    """With pinned input shapes the reference is not the input file: ORT gets it as bytes plus the folder."""
    g = GraphBuilder(("N", 8, 6, 6))
    model = g.build(g.node("Relu", [g.batchnorm(g.conv("x", 8, 64), 64)]))
    source = save_model(model, tmp_path / "dyn.onnx", external_data=True)
    result = onnxmerge.fold(source, tmp_path / "out.onnx", overwrite_input_shapes={"x": (2, 8, 6, 6)})
    assert result.verified and result.report["canonicalization"]
    assert "BatchNormalization" not in op_types(result.proto)
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 8, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(make_session(result.model).run(None, feeds)[0],
                               make_session(model).run(None, feeds)[0], rtol=1e-4, atol=1e-5)
