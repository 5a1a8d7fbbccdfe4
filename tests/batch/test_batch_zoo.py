"""`onnxmerge batch` on a small zoo: good models verified, bad ones reported with their reasons, resumable, safe
to interrupt, and the same under Ray.

Every failure here is real: a truncated file and random bytes really fail to parse; the crash and hang use the
worker's documented test hooks (ONNXMERGE_BATCH_TEST_CRASH / _HANG), which make the real worker process abort or
sleep until the driver's timeout kills it; the memory blow-up is a real allocation refused under a real
RLIMIT_AS.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from models.export import export
from onnxmerge.batch import FAILED, OK, REFUSED, SKIPPED, run_batch
from onnxmerge.batch.runner import TEMP_PREFIX, model_report_path
from onnxmerge.io import load_model, save_model

from conftest import GraphBuilder, op_types

HOOKS = {"ONNXMERGE_BATCH_TEST_CRASH": "crash.onnx", "ONNXMERGE_BATCH_TEST_HANG": "hang.onnx"}
CONFIG = """
[defaults]
check_n = 2
[models."hang.onnx"]
timeout = 3
[models."huge.onnx"]
memory_limit = "2GiB"
[models."nested/*"]
skip = ["fold_batchnorm"]
[models."digits_dynamic.onnx"]
input_shapes = { input = [2, 1, 16, 16] }
"""
GOOD = ["digits_dynamic.onnx", "external/ext.onnx", "nested/deep/conv_bn.onnx", "quantized.onnx", "repvgg_tiny.onnx"]
EXPECTED = {**{name: (OK, None) for name in GOOD}, "broken/random.onnx": (REFUSED, None),
            "broken/truncated.onnx": (REFUSED, None), "crash.onnx": (FAILED, "crash"),
            "hang.onnx": (FAILED, "timeout"), "huge.onnx": (FAILED, "memory")}
# Runs the real CLI whether or not onnxmerge.cli lists the batch command yet.
CLI = [sys.executable, "-c", "import sys, onnxmerge.cli as cli; name = 'onnxmerge.batch.cli'; "
       "name in cli._FEATURE_COMMANDS or cli._FEATURE_COMMANDS.append(name); sys.exit(cli.main())"]


def conv_bn_model(seed: int, channels: int = 8) -> onnx.ModelProto:
    g = GraphBuilder((1, 3, 16, 16), seed=seed)
    y = g.batchnorm(g.conv("x", 3, channels, pads=[1, 1, 1, 1]), channels)
    return g.build(g.conv(g.node("Relu", [y]), channels, channels, k=1))


def temp_entries(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.startswith(TEMP_PREFIX)]


def visible_models(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*.onnx") if not any(p.startswith(TEMP_PREFIX) for p in path.parts)]


def assert_complete(model: Path) -> None:
    """An output counts only with its report, which vouches for exactly this file."""
    load_model(model)
    report = json.loads(model_report_path(model).read_text())
    assert report["status"] == OK and report["details"]["verification"]["passed"] is True


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo")
    (root / "nested" / "deep").mkdir(parents=True)
    (root / "external" / "weights").mkdir(parents=True)
    (root / "broken").mkdir()
    export("repvgg_tiny", root / "repvgg_tiny.onnx", keep_bn=True)
    export("digits_resnet", root / "digits_dynamic.onnx", keep_bn=True, dynamic_batch=True)
    save_model(conv_bn_model(1), root / "nested" / "deep" / "conv_bn.onnx")
    onnx.save(conv_bn_model(2, channels=32), str(root / "external" / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights/ext.bin", size_threshold=0)
    good = (root / "repvgg_tiny.onnx").read_bytes()
    (root / "broken" / "truncated.onnx").write_bytes(good[: len(good) // 2])
    (root / "broken" / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "crash.onnx").write_bytes(good)
    (root / "hang.onnx").write_bytes(good)
    g = GraphBuilder((1, 3, 8, 8))
    scale, zero = g.const(np.float32(0.05)), g.const(np.uint8(128))
    save_model(g.build(g.node("DequantizeLinear", [g.node("QuantizeLinear", ["x", scale, zero]), scale, zero])),
               root / "quantized.onnx")
    g = GraphBuilder((1, 3, 20000, 20000))  # its random verification input alone needs ~9 GB
    save_model(g.build(g.batchnorm(g.conv("x", 3, 4, k=1), 4)), root / "huge.onnx")
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "batch.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def first_run(zoo, config, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in HOOKS.items():
            patch.setenv(name, value)
        report = run_batch(zoo, out, config=config, jobs=2)
    return out, report


def test_good_models_are_verified_and_bad_ones_reported_with_reasons(first_run, zoo):
    out, report = first_run
    results = {result.model: result for result in report.models}
    assert {name: (r.status, r.failure) for name, r in results.items()} == EXPECTED
    assert report.exit_code == 1
    assert "cannot parse" in results["broken/truncated.onnx"].reason
    assert "cannot parse" in results["broken/random.onnx"].reason
    assert "SIGABRT" in results["crash.onnx"].reason
    assert "timed out after 3 s" in results["hang.onnx"].reason
    assert "2.0 GiB" in results["huge.onnx"].reason
    assert "quantized model" in results["quantized.onnx"].reason  # fold passes it through unchanged: ok, noted

    assert sorted(p.relative_to(out).as_posix() for p in visible_models(out)) == GOOD  # mirrored, nothing else
    for name in GOOD:
        assert_complete(out / name)
        assert results[name].row()["verified"] is True
    assert (out / "external" / "ext.onnx.data").is_file()  # external data in, external data out
    assert results["repvgg_tiny.onnx"].row()["nodes_after"] < results["repvgg_tiny.onnx"].row()["nodes_before"]
    # per-model options from the config reached the workers
    assert "BatchNormalization" in op_types(onnx.load(out / "nested" / "deep" / "conv_bn.onnx"))
    assert "BatchNormalization" not in op_types(onnx.load(out / "repvgg_tiny.onnx"))
    assert results["digits_dynamic.onnx"].details["verification"]["input_shapes"] == {"input": [2, 1, 16, 16]}
    assert temp_entries(out) == []


def test_markdown_csv_and_json_reports(first_run):
    out, report = first_run
    markdown = (out / "onnxmerge-batch.md").read_text()
    assert report.summary() in markdown
    assert "5 ok, 0 skipped, 2 refused, 3 failed (1 crash, 1 memory, 1 timeout)" in markdown
    assert "| `hang.onnx` | failed (timeout) |" in markdown
    csv_lines = (out / "onnxmerge-batch.csv").read_text().splitlines()
    assert csv_lines[0].startswith("model,status,failure,nodes_before,nodes_after")
    assert len(csv_lines) == 1 + len(EXPECTED)
    data = json.loads((out / "onnxmerge-batch.json").read_text())
    assert data["exit_code"] == 1 and data["summary"]["ok"] == 5 and data["summary"]["interrupted"] is False
    assert [m["model"] for m in data["models"]] == sorted(EXPECTED)


def test_resume_does_no_work_for_finished_models(first_run, zoo, config):
    out, _ = first_run
    stamps = {path: path.stat().st_mtime_ns for name in GOOD
              for path in (out / name, model_report_path(out / name))}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in HOOKS.items():
            patch.setenv(name, value)
        again = run_batch(zoo, out, config=config, jobs=2, resume=True)
    results = {result.model: result for result in again.models}
    assert {name: results[name].status for name in GOOD} == {name: SKIPPED for name in GOOD}
    assert all(results[name].seconds is None and results[name].row()["nodes_after"] for name in GOOD)
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps  # not rewritten, not even touched
    # refused and failed models are tried again: they may have been fixed, or the failure was transient
    assert {name: (r.status, r.failure) for name, r in results.items() if name not in GOOD} == \
        {name: outcome for name, outcome in EXPECTED.items() if name not in GOOD}
    assert again.exit_code == 1


def test_resume_redoes_a_damaged_output_and_a_changed_option(zoo, config, tmp_path):
    out, good = tmp_path / "out", tmp_path / "good"
    shutil.copytree(zoo / "external", good / "external")  # a model with its external data
    shutil.copy(zoo / "repvgg_tiny.onnx", good)
    ext, repvgg = "external/ext.onnx", "repvgg_tiny.onnx"
    assert run_batch(good, out, jobs=2).exit_code == 0
    damaged = out / ext
    damaged.with_name("ext.onnx.data").write_bytes(b"\0" * 64)  # its weights, that is
    again = {r.model: r.status for r in run_batch(good, out, jobs=2, resume=True).models}
    assert again == {ext: OK, repvgg: SKIPPED}
    assert_complete(damaged)
    changed = {r.model: r.status for r in run_batch(good, out, config=config, jobs=2, resume=True).models}
    assert changed == {ext: OK, repvgg: OK}  # check_n = 2 in the config changes every model's options


def test_an_output_folder_inside_the_input_folder_is_not_taken_for_input(tmp_path):
    root = tmp_path / "zoo"
    root.mkdir()
    save_model(conv_bn_model(3), root / "m.onnx")
    for _ in range(2):
        report = run_batch(root, root / "folded", jobs=1)
        assert [result.model for result in report.models] == ["m.onnx"]
    assert_complete(root / "folded" / "m.onnx")


@pytest.fixture
def slow_zoo(tmp_path) -> Path:
    """Enough work that a kill lands mid-batch: a hanging model holds one of the two slots throughout."""
    root = tmp_path / "zoo"
    (root / "sub").mkdir(parents=True)
    for index in range(8):
        save_model(conv_bn_model(index, channels=48), root / ("sub" if index % 2 else "") / f"m{index}.onnx")
    save_model(conv_bn_model(99), root / "a_hang.onnx")
    return root


def _start_batch(zoo: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "ONNXMERGE_BATCH_TEST_HANG": "a_hang.onnx"}
    return subprocess.Popen([*CLI, "batch", str(zoo), "-o", str(out), "--jobs", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_first_report(out: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not list(out.rglob("*.report.json")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no model finished within 60 s"
        time.sleep(0.05)


def _workers_of(out: Path) -> list[int]:
    """Worker processes whose task lies in `out` (their command line names it)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("kill", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_batch_leaves_only_complete_outputs(slow_zoo, tmp_path, kill):
    out = tmp_path / "out"
    process = _start_batch(slow_zoo, out)
    _wait_for_first_report(out, process)
    process.send_signal(kill)
    _, stderr = process.communicate(timeout=60)

    done = visible_models(out)
    assert 1 <= len(done) < 9
    for model in done:
        assert_complete(model)
    if kill == signal.SIGINT:
        assert process.returncode == 130
        assert "interrupted" in stderr and "Traceback" not in stderr
        assert temp_entries(out) == []  # the driver ended its workers and removed their staging folders
        summary = json.loads((out / "onnxmerge-batch.json").read_text())
        assert summary["summary"]["interrupted"] is True and "a_hang.onnx" in summary["pending"]
    else:
        assert process.returncode == -signal.SIGKILL
        assert temp_entries(out)  # the killed run's staging folders (the hanging worker's at least) remain...
    deadline = time.monotonic() + 10
    while _workers_of(out) and time.monotonic() < deadline:  # workers die with their driver
        time.sleep(0.1)
    assert _workers_of(out) == []

    resumed = run_batch(slow_zoo, out, jobs=2, resume=True)  # hooks off now: everything completes
    statuses = {result.model: result.status for result in resumed.models}
    assert all(statuses[model.relative_to(out).as_posix()] == SKIPPED for model in done)
    assert set(statuses.values()) <= {OK, SKIPPED} and len(statuses) == 9
    assert temp_entries(out) == []  # ...were never taken for outputs, and are gone now
    for model in visible_models(out):
        assert_complete(model)


def test_cli_exit_codes_and_one_line_errors(zoo, tmp_path, monkeypatch, capsys):
    import onnxmerge.cli as cli

    if "onnxmerge.batch.cli" not in cli._FEATURE_COMMANDS:
        monkeypatch.setattr(cli, "_FEATURE_COMMANDS", [*cli._FEATURE_COMMANDS, "onnxmerge.batch.cli"])
    good, empty = tmp_path / "good", tmp_path / "empty"
    good.mkdir()
    empty.mkdir()
    (good / "m.onnx").write_bytes((zoo / "nested" / "deep" / "conv_bn.onnx").read_bytes())
    out = tmp_path / "out"

    def run(*args) -> tuple[int, str]:
        capsys.readouterr()
        code = cli.main(["batch", *map(str, args)])
        return code, capsys.readouterr().err

    assert run(good, "-o", out, "--jobs", "1") == (0, "")
    assert (out / "m.onnx").is_file()
    for args, needle in [((tmp_path / "missing", "-o", out), "input folder not found"),
                         ((good, "-o", out, "--pipeline", "compress"), "needs a 'calibration'"),
                         ((good, "-o", good), "must differ"),
                         ((good, "-o", out, "--config", tmp_path / "none.toml"), "cannot read config"),
                         ((empty, "-o", out), "no .onnx models")]:
        code, err = run(*args)
        assert (code, len(err.strip().splitlines())) == (2, 1), err
        assert needle in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where Ray is not installed
    code, err = run(good, "-o", tmp_path / "ray_out", "--executor", "ray")
    assert code == 2 and "pip install 'onnxmerge[ray]'" in err
    assert not (tmp_path / "ray_out").exists()


def test_ray_executor_gives_the_same_report(first_run, zoo, config, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    for name, value in HOOKS.items():
        monkeypatch.setenv(name, value)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = run_batch(zoo, tmp_path / "out", config=config, jobs=2, executor="ray")
    finally:
        ray.shutdown()
    _, local = first_run
    comparable = ("model", "status", "failure", "nodes_before", "nodes_after", "parameters_before",
                  "parameters_after", "size_after", "verified")
    assert [{key: r.row()[key] for key in comparable} for r in report.models] == \
        [{key: r.row()[key] for key in comparable} for r in local.models]
    refused = [(r.model, r.reason) for r in report.models if r.status == REFUSED]
    assert refused == [(r.model, r.reason) for r in local.models if r.status == REFUSED]  # names the driver's file
    for name in GOOD:
        assert_complete(tmp_path / "out" / name)
    assert (tmp_path / "out" / "external" / "ext.onnx.data").is_file()
