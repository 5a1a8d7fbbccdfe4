"""The zoo bench end to end on one tiny model: files written, every variant present and sane (no timing asserts)."""

import json

from bench.fold import TOOLS, main


def test_bench_fold_on_repvgg_tiny(tmp_path):
    out, report = tmp_path / "fold.md", tmp_path / "fold.json"
    assert main(["--models", "repvgg_tiny", "--runs", "3", "--warmup", "1", "--out", str(out), "--json", str(report)]) == 0
    assert out.is_file() and report.is_file()
    assert "| repvgg_tiny" in out.read_text()
    results = json.loads(report.read_text())
    assert results["environment"]["threads"] == 1 and results["environment"]["runs"] == 3
    [entry] = results["models"]
    assert entry["status"] == "ok" and entry["input_shape"] == [1, 3, 32, 32]
    variants = entry["variants"]
    assert set(variants) == {"original", *TOOLS}
    for name, variant in variants.items():
        if name == "onnxsim" and variant["status"].startswith("n/a"):
            continue  # onnxsim is optional: the bench says why it is missing instead of failing
        assert variant["status"] == "ok", (name, variant["status"])
        assert isinstance(variant["nodes"], int) and variant["nodes"] > 0
        assert variant["latency"]["runs"] == 3 and variant["latency"]["median_ms"] > 0
        if name != "original":
            assert variant["speedup"]["median"] > 0
    assert entry["onnxmerge_verification"]["passed"]
    assert entry["onnxmerge_verification"]["max_abs_error"] is not None
    assert variants["onnxmerge"]["nodes"] < variants["original"]["nodes"]
    assert entry["onnxmerge_vs_onnxslim"]["median"] > 0
