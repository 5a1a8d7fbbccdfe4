"""bench.compress's writing side: rows of nets that are not classifiers, refused targets, and re-run models
merged into an existing results file (each entry keeping its own date)."""

import json

from bench.compress import _merged, markdown, pareto_plot


def _entry(model: str, rows: list[dict], **extra) -> dict:
    return {"model": model, "segments": 20, "entries": 27, "original_ms": 1.8, "predicted_max_speedup": 1.35,
            "phases_s": {}, "dp_seconds": 0.001, "total_s": 2.0, "peak_rss_mib": {"analyse": 100.0}, "rows": rows,
            **extra}


def _ok(target: float, **fields) -> dict:
    return {"target": target, "status": "ok", "speedup": {"median": target, "p10": target - 0.02,
                                                          "p90": target + 0.02},
            "merged_segments": 3, "rounds": 1, "goal": "met", **fields}


def test_markdown_shows_relative_error_for_non_classifiers_and_refusals():
    results = {"environment": {"onnxruntime": "1.32.0", "cpu": "test", "date": "D0"}, "models": [
        _entry("fpn 256", [_ok(1.3, top1_agreement=None, fidelity_score=-1.23),
                           {"target": 1.6, "status": "the latency target is below the fastest possible plan"}],
               chains=3, predicted_max_speedup_first_chain=1.07, date="D1"),
        _entry("resnet34 224", [_ok(1.3, top1_agreement=0.5, fidelity_score=-0.2)], date="D2")]}
    text = markdown(results)
    assert "D1, D2 (each model's rows measured in one run)" in text
    assert "| fpn 256 | 1.30× | 1.30× (1.28–1.32) | 3 | rel. sq. error 1.23 |" in text
    assert "| fpn 256 | 1.60× | the latency target is below the fastest possible plan |" in text
    assert "| resnet34 224 | 1.30× | 1.30× (1.28–1.32) | 3 | 50.0% |" in text
    assert "1.35× (3 chains; the first alone 1.07×)" in text


def test_pareto_plot_skips_rows_without_an_agreement(tmp_path):
    results = {"models": [_entry("fpn 256", [_ok(1.3, top1_agreement=None)]),
                          _entry("resnet34 224", [_ok(1.3, top1_agreement=0.5)])]}
    pareto_plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_rerun_models_replace_their_entries_and_keep_the_others_with_their_date(tmp_path):
    previous = tmp_path / "compress.json"
    previous.write_text(json.dumps({"environment": {"date": "old"}, "models": [
        _entry("mobilenet_v2 224", []), _entry("fpn 256", [], date="older")]}))
    fresh = [_entry("fpn 256", [_ok(1.3)], date="new")]
    merged = _merged(fresh, previous)
    assert [(e["model"], e["date"]) for e in merged] == [("mobilenet_v2 224", "old"), ("fpn 256", "new")]
    assert _merged(fresh, tmp_path / "missing.json") == fresh
    previous.write_text("not json")
    assert _merged(fresh, previous) == fresh
