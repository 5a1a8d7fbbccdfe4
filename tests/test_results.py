"""One model, one vocabulary: every command's result has the same typed core, and --json writes it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnxmerge
from onnxmerge.batch.render import csv_text, markdown
from onnxmerge.batch.results import OK, REFUSED, BatchReport, ModelResult
from onnxmerge.errors import VerificationError
from onnxmerge.io import save_model
from onnxmerge.layermerge.api import compress
from onnxmerge.merging import align, soup
from onnxmerge.results import (CORE_KEYS, AlignResult, CommandResult, CompareResult, CompressResult, FoldResult,
                               ProfileResult, SoupResult)

from conftest import GraphBuilder


def small_cnn(seed: int) -> onnx.ModelProto:
    """Conv-BN-Relu, a residual conv, pooling and a Gemm head (soup/align need hidden units to permute)."""
    g = GraphBuilder((1, 3, 8, 8), seed=seed)
    first = g.node("Relu", [g.batchnorm(g.conv("x", 3, 4, pads=[1, 1, 1, 1]), 4)])
    second = g.conv(first, 4, 4, pads=[1, 1, 1, 1])
    flat = g.node("Flatten", [g.node("GlobalAveragePool", [g.node("Add", [second, first])])], axis=1)
    head = g.node("Gemm", [flat, g.const(g.rng.standard_normal((5, 4)).astype(np.float32)),
                           g.const(g.rng.standard_normal(5).astype(np.float32))], transB=1)
    return g.build(head)


def assert_core(report: dict, command: str) -> None:
    """The common core: present first, in order, with its types; plain JSON that round-trips."""
    assert tuple(report)[:len(CORE_KEYS)] == CORE_KEYS
    assert report["command"] == command
    assert isinstance(report["onnxmerge_version"], str) and report["onnxmerge_version"]
    for key in ("input", "output", "verification_note"):
        assert report[key] is None or isinstance(report[key], str), key
    for key in ("before", "after", "verification", "bench"):
        assert report[key] is None or isinstance(report[key], dict), key
    assert isinstance(report["warnings"], list) and all(isinstance(w, str) for w in report["warnings"])
    # Either the command checked equivalence, or it says why it did not.
    assert (report["verification"] is None) == (report["verification_note"] is not None)
    for key in ("before", "after"):
        if report[key] is not None:
            assert isinstance(report[key]["nodes"], int) and isinstance(report[key]["ops"], dict)
    assert json.loads(json.dumps(report)) == report


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    return [save_model(small_cnn(seed), folder / f"m{seed}.onnx") for seed in (0, 1)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory, trained_digits):
    """The digits ResNet, its calibration file, and one short compress run (no recovery) with a saved plan."""
    folder = tmp_path_factory.mktemp("digits")
    trained = trained_digits("resnet")
    model = save_model(trained.model, folder / "model.onnx")
    np.savez(folder / "calib.npz", input=trained.x_calib)
    result = compress(model, folder / "out.onnx", calibration=folder / "calib.npz", speedup=1.1, recover=False,
                      runs=5, plan=folder / "plan.json")
    return folder, result


def test_fold_result_core_and_compatibility(pair, tmp_path):
    result = onnxmerge.fold(pair[0], tmp_path / "out.onnx")
    assert isinstance(result, FoldResult) and isinstance(result, CommandResult)
    report = result.to_dict()
    assert_core(report, "fold")
    assert report["input"] == str(pair[0]) and report["output"] == str(tmp_path / "out.onnx")
    assert report["verification"]["passed"] is True and result.verified is True
    assert report["after"]["nodes"] < report["before"]["nodes"] and report["bench"] is None
    assert report["rewrites"]["fold_batchnorm"] == 1 and isinstance(report["rounds"], int)
    assert result.report == report  # .report is to_dict(), read-only: a fresh copy
    result.report["warnings"].append("lost")
    assert result.warnings == []
    result.bench = {"speedup": {"median": 1.0}}  # fields are what changes a result
    assert result.report["bench"] == {"speedup": {"median": 1.0}}


def test_fold_failure_report_has_the_core(pair, tmp_path):
    with pytest.raises(VerificationError) as failure:
        onnxmerge.fold(pair[0], tmp_path / "out.onnx", rtol=0.0, atol=0.0, noise_floor=False)
    report = failure.value.report
    assert_core(report, "fold")
    assert report["verification"]["passed"] is False and report["verification"]["first_failing_pass"]
    assert report["output"] is None and report["after"] is None


def test_compress_result_has_no_verification_but_says_why(digits):
    folder, result = digits
    assert isinstance(result, CompressResult)
    report = result.to_dict()
    assert_core(report, "compress")
    assert report["verification"] is None and result.verified is None
    assert "on purpose" in report["verification_note"] and "fidelity" in report["verification_note"]
    assert report["input"] == str(folder / "model.onnx") and report["output"] == str(folder / "out.onnx")
    assert report["after"]["nodes"] < report["before"]["nodes"]  # statistics of the input, not the canonical fold
    assert report["before"]["ops"]["BatchNormalization"] > 0
    assert report["bench"]["speedup"] == report["measured_speedup"]  # the final interleaved timing
    assert report["plan"] == result.plan.to_dict() and report["fidelity"]["top1_agreement"] is not None
    assert report["recovery"] is None and set(report["wall_s"]) >= {"canonicalize", "verify"}


def test_batch_renders_an_unchecked_verification_as_na(digits, pair, tmp_path):
    _, compressed = digits
    folded = onnxmerge.fold(pair[0], tmp_path / "out.onnx")
    models = [ModelResult("digits.onnx", OK, details=compressed.to_dict(), seconds=1.0),
              ModelResult("m0.onnx", OK, details=folded.to_dict(), seconds=1.0),
              ModelResult("bad.onnx", REFUSED, reason="not an ONNX file")]
    rows = {m.model: m.row() for m in models}
    assert rows["digits.onnx"]["verified"] == "n/a" and rows["digits.onnx"]["max_abs_error"] is None
    assert rows["digits.onnx"]["speedup"] == compressed.measured_speedup["median"]
    assert rows["digits.onnx"]["nodes_after"] < rows["digits.onnx"]["nodes_before"]
    assert rows["m0.onnx"]["verified"] is True and rows["bad.onnx"]["verified"] is None
    report = BatchReport(in_dir="zoo", out_dir="out", pipeline="compress", executor="local", jobs=1, bench=False,
                         models=models)
    lines = {line.split(" | ")[0]: line for line in markdown(report).splitlines() if line.startswith("| `")}
    digits_cells = [cell.strip() for cell in lines["| `digits.onnx`"].split("|")]
    assert "n/a" in digits_cells and "yes" not in digits_cells
    assert "yes" in [cell.strip() for cell in lines["| `m0.onnx`"].split("|")]
    assert ",n/a," in csv_text(report).splitlines()[1]


def test_soup_and_align_results(pair):
    souped = soup(pair)
    assert isinstance(souped, SoupResult)
    report = souped.to_dict()
    assert_core(report, "soup")
    assert report["verification"] is None and "on purpose" in report["verification_note"]
    assert report["input"] is None and len(report["inputs"]) == 2 and report["output"] is None
    assert "scores" not in report and "greedy" not in report  # steps not taken stay out of the report
    aligned = align(*pair)
    assert isinstance(aligned, AlignResult)
    report = aligned.to_dict()
    assert_core(report, "align")
    assert report["verification"]["passed"] is True and report["input"] == str(pair[1])
    assert report["model"]["model"] == str(pair[1])  # the JSON's "model" is B's provenance
    assert isinstance(report["moved_channels"], int) and report["cosine_after"] >= report["cosine_before"]


def test_profile_and_compare_results_keep_their_reports(pair):
    profiled = onnxmerge.profile(pair[0], runs=3, warmup=1)
    result = ProfileResult.from_report(profiled)
    report = result.to_dict()
    assert_core(report, "profile")
    assert {key: report[key] for key in profiled} == json.loads(json.dumps(profiled))  # every key kept
    assert report["input"] == str(pair[0]) and report["before"] == report["static"] and report["after"] is None
    compared = onnxmerge.compare(*pair, runs=3, warmup=1)
    result = CompareResult.from_report(compared)
    report = result.to_dict()
    assert_core(report, "compare")
    assert {key: report[key] for key in compared} == json.loads(json.dumps(compared))
    assert report["input"] == str(pair[0]) and result.speedup["median"] > 0


def test_json_option_writes_the_core_for_every_command(pair, digits, tmp_path, capsys):
    from onnxmerge.cli import main

    folder, _ = digits
    commands = {
        "fold": ["fold", pair[0], tmp_path / "folded.onnx"],
        "profile": ["profile", pair[0], "--runs", "3", "--warmup", "1"],
        "compare": ["compare", *pair, "--runs", "3", "--warmup", "1"],
        # the saved plan is reused: no tables to measure
        "compress": ["compress", folder / "model.onnx", tmp_path / "small.onnx", "--calib", folder / "calib.npz",
                     "--plan", folder / "plan.json", "--no-recover"],
        "soup": ["soup", *pair, "-o", tmp_path / "soup.onnx"],
        "align": ["align", *pair, "-o", tmp_path / "aligned.onnx"],
    }
    for command, args in commands.items():
        path = tmp_path / f"{command}.json"
        assert main([*map(str, args), "--json", str(path)]) == 0, capsys.readouterr()
        report = json.loads(path.read_text())
        assert_core(report, command)
        if command in ("fold", "compress", "soup", "align"):
            assert report["output"] and report["output"].endswith(".onnx")
    assert json.loads((tmp_path / "compress.json").read_text())["verification"] is None
    # compress's earlier spelling of the option still works
    assert main(["compress", str(folder / "model.onnx"), str(tmp_path / "small2.onnx"), "--calib",
                 str(folder / "calib.npz"), "--plan", str(folder / "plan.json"), "--no-recover", "--report",
                 str(tmp_path / "old.json")]) == 0
    assert_core(json.loads((tmp_path / "old.json").read_text()), "compress")


def test_batch_records_fold_results_and_verification_failures(pair, tmp_path):
    """A batch keeps each pipeline's result dict: the core (a bench not run left out), and a fold that fails
    verification is failed (verification) with its partial result, not a crash of the batch."""
    from onnxmerge.batch import run_batch

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    for name, source in (("good.onnx", pair[0]), ("strict.onnx", pair[1])):
        (zoo / name).write_bytes(source.read_bytes())
    config = tmp_path / "batch.toml"
    config.write_text('[models."strict.onnx"]\nrtol = 0.0\natol = 0.0\nnoise_floor = false\n')
    report = run_batch(zoo, tmp_path / "out", config=config, jobs=1)
    results = {result.model: result for result in report.models}
    good, strict = results["good.onnx"], results["strict.onnx"]
    assert good.status == OK and strict.status == "failed" and strict.failure == "verification"
    for result in (good, strict):
        assert set(CORE_KEYS) <= set(result.details) and result.details["command"] == "fold"
        assert result.details["bench"] is None  # not timed: recorded as such, never made up
    assert good.row()["verified"] is True and strict.row()["verified"] is False
    assert strict.details["verification"]["first_failing_pass"]
