"""The batch throughput bench end to end on one tiny model: files written and sane (no timing asserts)."""

import json

from bench.batch import main


def test_bench_batch_on_repvgg_tiny(tmp_path):
    out, data, report = tmp_path / "batch.md", tmp_path / "batch.json", tmp_path / "batch.report.md"
    assert main(["--models", "repvgg_tiny", "--copies", "2", "--configs", "local:1", "--out", str(out),
                 "--json", str(data), "--report", str(report)]) == 0
    results = json.loads(data.read_text())
    (row,) = results["throughput"]
    assert (row["executor"], row["jobs"], row["models"], row["statuses"]["ok"]) == ("local", 1, 2, 2)
    assert row["models_per_minute"] > 0
    assert "| local | 1 | 2 |" in out.read_text()
    assert "| `repvgg_tiny.onnx` | ok | 59 → 19 |" in report.read_text() and "speed-up" in report.read_text()
