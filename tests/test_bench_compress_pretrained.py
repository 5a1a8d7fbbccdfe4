"""bench.compress_pretrained without compressing anything: the fidelity metrics on hand-made logits, the goal
checks, and the Markdown/JSON writer on a fake result (a real run takes far too long for the suite)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import compress_pretrained as bench
from bench.compress_pretrained import (Goal, check_goal, fidelity, mean_kl, markdown, top1_agreement, topk_overlap,
                                       write)


def test_top1_agreement_by_hand():
    a = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0], [0.0, 0.0, 1.0]])
    b = np.array([[2.0, 1.0, 0.0], [3.0, 2.0, 1.0], [0.0, 0.0, 9.0], [1.0, 0.0, 0.0]])
    assert top1_agreement(a, b) == pytest.approx(0.5)  # rows 0 and 2 agree
    assert top1_agreement(a, a) == 1.0


def test_top5_overlap_by_hand():
    ten = np.arange(10, dtype=np.float64)
    a = np.stack([ten, ten])  # top 5: {5..9} twice
    b = np.stack([ten, -ten])  # row 0 the same; row 1: top 5 is {0..4}, no overlap
    assert topk_overlap(a, b) == pytest.approx(0.5)
    c = np.stack([ten, ten])
    c[1, [9, 8]] = -1.0  # row 1: top 5 is {3,4,5,6,7}: 3 shared with {5..9}
    assert topk_overlap(a, c) == pytest.approx((5 / 5 + 3 / 5) / 2)
    assert topk_overlap(a, a, k=3) == 1.0


def test_kl_by_hand():
    p_logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    q_logits = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.2, 0.7]])) + 3.0  # a shift does not change softmax
    row0 = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(1.0)
    assert mean_kl(p_logits, q_logits) == pytest.approx(row0 / 2)
    assert mean_kl(p_logits, p_logits) == pytest.approx(0.0, abs=1e-12)
    big = np.array([[1000.0, 0.0], [0.0, 1000.0]])  # numerically stable on large logits
    assert np.isfinite(mean_kl(big, big[::-1]))


def test_fidelity_dict_and_shape_check():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 1000))
    got = fidelity(a, a + 1e-3 * rng.standard_normal(a.shape))
    assert got["rows"] == 16 and got["top1_agreement"] == 1.0 and got["top5_overlap"] > 0.9
    assert 0 <= got["kl"] < 1e-4
    with pytest.raises(ValueError):
        fidelity(a, a[:8])


def test_goals():
    goal = bench.goal_for(1.5)
    assert goal == Goal(1.47, top1=0.95, top5=0.90)
    ok = {"target": 1.5, "status": "ok", "speedup": {"median": 1.5}, "top1_agreement": 0.96, "top5_overlap": 0.93}
    assert check_goal(ok) == {"goal": goal.describe(), "goal_met": True, "missed": []}
    slow = ok | {"speedup": {"median": 1.40}, "top5_overlap": 0.80}
    assert check_goal(slow)["missed"] == ["speed-up", "top-5"] and check_goal(slow)["goal_met"] is False
    assert check_goal({"target": 1.3, "status": "compress failed: x"})["goal_met"] is False
    assert check_goal({"target": 1.8, "status": "ok"})["goal_met"] is None  # reported only
    assert bench.goal_for(1.3).speedup == 1.27 and bench.goal_for(1.3).top1 == 0.98


def _fake_results() -> dict:
    rows = [
        {"target": 1.3, "status": "ok", "speedup": {"median": 1.31, "p10": 1.28, "p90": 1.35},
         "top1_agreement": 0.984, "top5_overlap": 0.951, "kl": 0.0123, "rows": 128, "wall_s": 754.2,
         "peak_rss_mib": 2150.0,
         "compress": {"measured_speedup": {"median": 1.33, "p10": 1.3, "p90": 1.36}, "reached_target": True,
                      "fidelity": {"top1_agreement": 0.99}, "merged_segments": 4, "closed_loop_rounds": 1}},
        {"target": 1.5, "status": "ok", "speedup": {"median": 1.44, "p10": 1.40, "p90": 1.49},
         "top1_agreement": 0.96, "top5_overlap": 0.85, "kl": 0.05, "rows": 128, "wall_s": 61.0,
         "peak_rss_mib": 900.0, "compress": {}},
        {"target": 1.8, "status": "compress failed: the latency target is below the fastest possible plan",
         "wall_s": 30.0, "peak_rss_mib": None},
    ]
    for row in rows:
        row |= check_goal(row)
    return {"environment": {"onnxruntime": "1.x", "cpu": "test CPU", "date": "2026-01-01T00:00:00+00:00"},
            "model": "efficientnet_lite0",
            "calibration": {"rows": 512, "photos": ["astronaut", "brick"], "size": 224, "seed": 0},
            "evaluation": {"rows": 128, "photos": ["chelsea", "coffee"], "size": 224, "seed": 0},
            "settings": {"recover_steps": 300, "runs": 50, "table_cache": "none"}, "rows": rows}


def test_markdown_rows_and_goals():
    text = markdown(_fake_results() | {"plot": "unknown (matplotlib not installed)"})
    lines = text.splitlines()
    row13 = next(ln for ln in lines if ln.startswith("| 1.30× | 1.31× (1.28–1.35)"))
    assert "98.4%" in row13 and "95.1%" in row13 and "0.0123" in row13 and "12.6 min" in row13
    assert "2.10 GiB" in row13 and row13.rstrip().endswith("| met |")
    row15 = next(ln for ln in lines if ln.startswith("| 1.50× | 1.44×"))
    assert "missed (speed-up, top-5)" in row15 and "900 MiB" in row15 and "61 s" in row15
    row18 = next(ln for ln in lines if ln.startswith("| 1.80× | compress failed"))
    assert "reported" in row18 and "unknown" in row18
    assert "plot: unknown (matplotlib not installed)" in text
    assert "chelsea, coffee" in text  # the held-out photos are named


def test_write_markdown_and_json(tmp_path, monkeypatch):
    results = _fake_results()
    monkeypatch.setattr(bench, "pareto_plot", lambda results, path: "unknown (matplotlib not installed)")
    write(results, tmp_path / "r.md", tmp_path / "r.json", tmp_path / "r.png")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["rows"][0]["goal_met"] is True and saved["rows"][1]["goal_met"] is False
    assert saved["rows"][2]["goal_met"] is None and saved["plot"] == "unknown (matplotlib not installed)"
    assert "| 1.30× |" in (tmp_path / "r.md").read_text()


def test_pareto_plot_never_raises(tmp_path):
    pytest.importorskip("matplotlib")
    results = _fake_results()
    assert bench.pareto_plot(results, tmp_path / "p.png") == "p.png"
    assert (tmp_path / "p.png").stat().st_size > 0
    assert bench.pareto_plot({"rows": [{"status": "ok"}]}, tmp_path / "q.png").startswith("failed")


def test_quick_arguments():
    args = bench.parse_args(["--quick", "--eval", "4"])
    assert args.quick and args.calib == 16 and args.eval == 4 and args.targets == [1.3] and args.runs == 5
    assert args.out.name == "compress_pretrained_quick.md" and args.json.name == "compress_pretrained_quick.json"
    full = bench.parse_args([])
    assert full.calib == 512 and full.eval == 128 and full.targets == [1.3, 1.5, 1.8]
    assert full.model == "efficientnet_lite0"  # the fixed-batch raw export: its student trains (batch generalised)
    assert bench.parse_args(["--model", "efficientnet_lite0_dynamic"]).model == "efficientnet_lite0_dynamic"


def test_accepted_kwargs():
    def f(a, *, b=1):
        return a, b

    def g(**kw):
        return kw

    assert bench.accepted_kwargs(f, {"b": 2, "zzz": 3}) == {"b": 2}
    assert bench.accepted_kwargs(g, {"zzz": 3}) == {"zzz": 3}


def test_child_plumbing_reports_a_failing_compress(tmp_path):
    """The child process, its log and its per-child rusage, on a compress that fails at once (no model)."""
    spec = {"model": str(tmp_path / "missing.onnx"), "output": str(tmp_path / "out.onnx"),
            "kwargs": {"calibration": str(tmp_path / "missing.npz"), "speedup": 1.3}}
    child = bench.run_child(spec, tmp_path, "t", timeout_s=300)
    assert child["returncode"] != 0 and child["error"] and child["error"] != "no output"
    assert child["peak_rss_mib"] is None or child["peak_rss_mib"] > 10
    assert child["wall_s"] > 0 and (tmp_path / "log-t.txt").is_file()


def test_bench_target_measures_a_compressed_model(corpus, tmp_path, monkeypatch):
    """Everything after compress on the real Lite0, with compress faked by a copy of the model: fidelity 1,
    KL 0, a speed-up near 1, and the goal check."""
    import shutil

    from models.photos import photo_split

    model = corpus["efficientnet_lite0_dynamic"]

    def fake_child(spec, folder, tag, timeout_s=None):
        assert spec["kwargs"]["speedup"] == 1.3 and spec["kwargs"]["threads"] == 1
        shutil.copy(model, spec["output"])
        return {"returncode": 0, "wall_s": 1.0, "peak_rss_mib": 123.0,
                "report": {"output": spec["output"], "reached_target": False, "rounds": [{}, {}],
                           "plan_segments": [{"segment": [0, 1]}, {"segment": [1, 4]}]}}

    monkeypatch.setattr(bench, "run_child", fake_child)
    evaluation = photo_split(0, 3).evaluation
    reference = bench.model_logits(model, evaluation)
    row = bench.bench_target(1.3, model=model, calibration=tmp_path / "c.npz", evaluation=evaluation,
                             reference=reference, folder=tmp_path, recover_steps=1, runs=3, jobs=1, seed=0,
                             timeout_s=None, table_cache=None, timing_shape={"input": (1, 3, 224, 224)})
    assert row["status"] == "ok", row["status"]
    assert row["top1_agreement"] == 1.0 and row["top5_overlap"] == 1.0 and row["kl"] == pytest.approx(0, abs=1e-9)
    assert 0.5 < row["speedup"]["median"] < 2.0 and row["peak_rss_mib"] == 123.0
    assert row["compress"]["merged_segments"] == 1 and row["compress"]["closed_loop_rounds"] == 2
    row |= check_goal(row)
    assert row["goal_met"] is False and row["missed"] == ["speed-up"]
