"""LayerMerge compression in ORT: speed-up vs fidelity at several targets, and wall time per phase.

    python -m bench.compress [--speedups 1.3 1.6 2.0] [--digits-speedups 1.2 1.4] [--runs 30]

(a) MobileNetV2-1.0 and ResNet-34 at 1x3x224x224 with random weights: calibration is 64 standard-normal
    images (48 to fit, 16 held out); fidelity is top-1 agreement with the original; no recovery (there is
    nothing meaningful to distil towards on random weights).
(b) the digits-trained ResNet-style and MobileNetV2-style nets: calibration is 256 training images
    (unlabelled); accuracy on the 360 held-out test images, after recovery by distillation on the whole
    training split, unlabelled (1437 images, as ``compress --recover-data``; ``--digits-recover-data
    calibration`` distils on the 256 calibration images only).
Every target runs what compress() runs: the budget search, the re-ranking of near-optimal plans with sequential
refits, and (digits) recovery with compress's defaults.
(c) optional (``--models fpn``): the reference FPN detector (models/fpn.py) at 1x3x256x256, random weights, as
    (a); it has three conv chains, and "predicted max speed-up" also gives the first chain's alone.
``--models`` names run anew; entries of models not named are kept from the existing results file.
Tables (latency in ORT, importance) are built once per model; each target is a DP solve with the
closed loop on measured latency. ORT CPU, 1 thread, batch 1. Results: bench/results/compress.{md,json,png}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.results_io import write_results
from models.digits import load_digits_split, train_digits
from models.export import export
from onnxmerge.dataset import load_dataset
from onnxmerge.environment import describe
from onnxmerge.errors import BadInputError
from onnxmerge.layermerge.api import CompressOptions, available_cores, evaluate, prepare
from onnxmerge.runner import RuntimeSettings
from onnxmerge.layermerge.dp import join_tables, minimum_latency, solve
from onnxmerge.layermerge.importance import is_original
from onnxmerge.runner import make_session

RESULTS = Path(__file__).parent / "results"
ALTERNATIVES = CompressOptions().alternatives  # compress's defaults
RECOVER_LR = CompressOptions().lr


def _phase_times(clock_seconds: dict) -> dict:
    return {k: round(v, 1) for k, v in clock_seconds.items()}


def bench_model(label: str, model: Path, calibration: Path, speedups: list[float], *, runs: int,
                recover_steps: int = 0, test_set: tuple | None = None, cache_dir: Path | None = None,
                recover_data: Path | None = None) -> dict:
    from onnxmerge.layermerge.api import _PhaseClock

    clock = _PhaseClock()
    started = time.perf_counter()
    problem = prepare(model, calibration, RuntimeSettings(runs=runs), clock=clock, cache_dir=cache_dir)
    problem.pass_threads = available_cores()  # as compress(): untimed passes and recovery on every core
    data = None if recover_data is None else load_dataset(recover_data, problem.canonical, what="recover data")
    problem.measure_tables(clock=clock)
    choices = join_tables(problem.latency, {k: e.score for k, e in problem.importance.items()})
    dp_started = time.perf_counter()
    links = problem.analysis.links
    solve(choices, problem.length, problem.table_original_ms, links=links)
    dp_seconds = time.perf_counter() - dp_started
    rows = []
    for target in speedups:
        row = {"target": target}
        target_started = time.perf_counter()
        try:
            plan, student, rounds = problem.solve_for(problem.original_ms / target)
        except BadInputError as refused:
            rows.append(row | {"status": str(refused)})
            continue
        # What compress() does after the search: re-rank near-optimal plans on the network each builds
        # (sequential refit, joint held-out score), then distil with feature maps at the kept positions.
        plan, student, reranking = problem.refine(plan, count=ALTERNATIVES)
        if recover_steps:
            student = problem.recover(student, plan, CompressOptions(speedup=target, recover_steps=recover_steps,
                                                                     lr=RECOVER_LR), data).model
        measured = problem.compare(student)
        fidelity = evaluate(problem, student)
        ratio = measured["speedup"]["median"] / target
        row["goal"] = (("met" if 0.98 <= ratio <= 1.05 else f"missed ({ratio - 1:+.1%} of the target)")
                       if test_set is None else None)
        row |= {"status": "ok", "speedup": measured["speedup"], "rounds": len(rounds),
                "rerank_s": reranking.seconds, "rerank_chosen": reranking.chosen,
                "search": problem.search.to_dict() if problem.search else None,
                "merged_segments": sum(1 for c in plan.choices if c.end - c.start > 1),
                "predicted_table_ms": plan.latency_ms, "measured_ms": measured["latency_b"]["median_ms"],
                "top1_agreement": fidelity["top1_agreement"], "fidelity_score": fidelity.get("score"),
                "seconds": round(time.perf_counter() - target_started, 1)}
        if test_set is not None:
            x, y = test_set
            row["accuracy"] = float(np.mean(make_session(student).run(None, {"input": x})[0].argmax(1) == y))
        rows.append(row)
    fastest = minimum_latency(choices, problem.length, links=links)
    reachable = problem.original_ms / problem.latency_model.predict(fastest)
    if links:  # what the longest path alone could reach: every later chain left as it is
        first = [c for c in choices
                 if c.end <= links[0] or is_original((c.start, c.end, c.option), problem.options[c.start, c.end, c.option])]
        first_chain = problem.original_ms / problem.latency_model.predict(minimum_latency(first, problem.length,
                                                                                           links=links))
    entry = {"model": label, "segments": len(problem.analysis.segments), "entries": problem.analysis.entries,
             "original_ms": problem.original_ms, "table_original_ms": problem.table_original_ms,
             "predicted_max_speedup": reachable, "latency_model": problem.latency_model.to_dict(),
             "chains": len(problem.analysis.chain_starts),
             "predicted_max_speedup_first_chain": first_chain if links else reachable,
             "peak_rss_mib": clock.peak_rss_mib,
             "dp_seconds": dp_seconds, "phases_s": _phase_times(clock.seconds),
             "total_s": round(time.perf_counter() - started, 1), "rows": rows}
    if test_set is not None:
        x, y = test_set
        entry["accuracy_original"] = float(np.mean(
            make_session(problem.canonical).run(None, {"input": x})[0].argmax(1) == y))
        for row in rows:
            if row["status"] == "ok" and row["target"] >= 1.5:
                loss_pp = 100 * (entry["accuracy_original"] - row["accuracy"])
                row["goal"] = ("met" if loss_pp <= 0.5 and row["speedup"]["median"] >= 1.5 * 0.98
                               else f"missed (loss {loss_pp:.2f} pp at {row['speedup']['median']:.2f}x)")
        measured_best = max((r["speedup"]["median"] for r in rows if r["status"] == "ok"), default=0.0)
        entry["goal_reachable"] = ("met" if max(reachable, measured_best) >= 1.5 * 0.98 else
                                   f"missed (at most about {max(reachable, measured_best):.2f}x)")
    clock.close()
    print(f"{label}: done in {entry['total_s']} s", file=sys.stderr, flush=True)
    return entry


def markdown(results: dict) -> str:
    env = results["environment"]
    dates = sorted({entry.get("date", env["date"]) for entry in results["models"]})
    lines = [f"ORT {env['onnxruntime']}, CPU {env['cpu']}, 1 thread, batch 1, ENABLE_ALL; "
             f"{', '.join(dates)} (each model's rows measured in one run).", "",
             "| model | target | measured speed-up (p10–p90) | merged segments | top-1 agreement | accuracy | "
             "measured plans | goal |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for entry in results["models"]:
        for row in entry["rows"]:
            if row["status"] != "ok":
                lines.append(f"| {entry['model']} | {row['target']:.2f}× | {row['status']} | | | | | |")
                continue
            s = row["speedup"]
            accuracy = (f"{row['accuracy']:.2%} (orig {entry['accuracy_original']:.2%})"
                        if "accuracy" in row else "–")
            lines.append(f"| {entry['model']} | {row['target']:.2f}× | {s['median']:.2f}× ({s['p10']:.2f}–{s['p90']:.2f}) "
                         f"| {row['merged_segments']} | {_agreement(row)} | {accuracy} | {row['rounds']} | "
                         f"{row.get('goal') or '–'} |")
    lines += ["", "| model | segments / entries | original ms | predicted max speed-up | canonicalize | analyse | "
                  "latency table | importance table | DP solve | total s | peak RSS MiB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for entry in results["models"]:
        p = entry["phases_s"]
        reach = f"{entry['predicted_max_speedup']:.2f}×" + (f" ({entry['goal_reachable']})"
                                                             if "goal_reachable" in entry else "")
        if entry.get("chains", 1) > 1:
            reach += (f" ({entry['chains']} chains; the first alone "
                      f"{entry['predicted_max_speedup_first_chain']:.2f}×)")
        lines.append(f"| {entry['model']} | {entry['segments']} / {entry['entries']} | {entry['original_ms']:.2f} | "
                     f"{reach} | {p.get('canonicalize', 0)} | {p.get('analyse', 0)} | {p.get('latency_table', 0)} | "
                     f"{p.get('importance_table', 0)} | {entry['dp_seconds'] * 1e3:.1f} ms | {entry['total_s']} | "
                     f"{max(entry['peak_rss_mib'].values(), default=0):.0f} |")
    return "\n".join(lines) + "\n"


def _agreement(row: dict) -> str:
    """Top-1 agreement, or for a net that is not a classifier (the FPN) its relative squared error."""
    if row.get("top1_agreement") is not None:
        return f"{row['top1_agreement']:.1%}"
    score = row.get("fidelity_score")
    return "–" if score is None else f"rel. sq. error {-score:.3g}"


def pareto_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for entry in results["models"]:
        rows = [r for r in entry["rows"] if r["status"] == "ok" and
                (r.get("accuracy") is not None or r.get("top1_agreement") is not None)]
        if not rows:  # refused targets, or not a classifier (no agreement to plot)
            continue
        values = [r.get("accuracy", r["top1_agreement"]) for r in rows]
        axis.plot([1.0] + [r["speedup"]["median"] for r in rows],
                  [entry.get("accuracy_original", 1.0)] + values, marker="o", label=entry["model"])
    axis.set_xlabel("measured speed-up in ORT (median of interleaved ratios)")
    axis.set_ylabel("accuracy (digits) / top-1 agreement (random weights)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _merged(fresh: list[dict], previous_path: Path) -> list[dict]:
    """``fresh`` entries, preceded by the entries of other models from the existing results (their own dates)."""
    try:
        document = json.loads(previous_path.read_text())
        previous = document["models"]
        for entry in previous:
            entry.setdefault("date", document["environment"]["date"])
    except (OSError, ValueError, KeyError, TypeError):
        return fresh
    names = {entry["model"] for entry in fresh}
    return [entry for entry in previous if entry["model"] not in names] + fresh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.3, 1.6, 2.0])
    parser.add_argument("--digits-speedups", type=float, nargs="+", default=[1.3, 1.5])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--recover-steps", type=int, default=300)
    parser.add_argument("--digits-recover-data", choices=("train", "calibration"), default="train",
                        help="digits recovery data: the whole training split unlabelled (1437 images, "
                             "compress --recover-data) or only the 256 calibration images")
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet34", "digits_resnet",
                                                          "digits_mobilenet"])
    args = parser.parse_args(argv)
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    results = {"environment": describe("cpu") | {"date": date}, "models": []}
    with tempfile.TemporaryDirectory(prefix="onnxmerge-bench-") as folder:
        folder = Path(folder)
        for name in args.models:
            if name.startswith("digits_"):
                trained = train_digits(name, seed=0, out_path=folder / f"{name}.onnx")
                np.savez(folder / f"{name}.npz", input=trained.x_calib)
                recover_data = None
                if args.digits_recover_data == "train":  # the whole training split, unlabelled
                    recover_data = folder / f"{name}-train.npz"
                    np.savez(recover_data, input=load_digits_split(0)[0])
                results["models"].append(bench_model(name, folder / f"{name}.onnx", folder / f"{name}.npz",
                                                     args.digits_speedups, runs=args.runs,
                                                     recover_steps=args.recover_steps, recover_data=recover_data,
                                                     test_set=(trained.x_test, trained.y_test),
                                                     cache_dir=folder / "cache"))
            else:
                side = 256 if name == "fpn" else 224
                export(name, folder / f"{name}.onnx", input_shape=(1, 3, side, side))
                calibration = np.random.default_rng(0).standard_normal((64, 3, side, side)).astype(np.float32)
                np.savez(folder / f"{name}.npz", input=calibration)
                results["models"].append(bench_model(f"{name} {side}", folder / f"{name}.onnx",
                                                     folder / f"{name}.npz", args.speedups, runs=args.runs,
                                                     cache_dir=folder / "cache"))
            results["models"][-1]["date"] = date
    RESULTS.mkdir(parents=True, exist_ok=True)
    results["models"] = _merged(results["models"], RESULTS / "compress.json")
    pareto_plot(results, RESULTS / "compress.png")
    write_results(RESULTS / "compress.md", RESULTS / "compress.json", markdown(results), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
