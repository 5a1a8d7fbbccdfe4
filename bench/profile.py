"""How much to trust `onnxmerge profile`, `compare` and the latency-table cache, measured on this machine.

    python -m bench.profile [--runs 50] [--out bench/results/profile.md] [--json bench/results/profile.json]

1. repeatability: two `profile` runs of one model, back to back: difference of the medians;
2. `compare` of a model against itself: median ratio (ideal 1.0) and its p10-p90 spread;
3. the latency-table cache: first vs second build of the same table (fresh cache folder);
4. table additivity: sum of per-conv table entries vs the measured end-to-end latency;
5. reference latencies of the zoo (ResNet-50, MobileNetV2-1.0 at 224, batch 1 and 32) on this CPU.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

from bench.results_io import write_results
from models.export import export
from onnxmerge.environment import describe
from onnxmerge.latency_table import additivity, conv_signatures, measure
from onnxmerge.profiler import compare, profile

RESULTS = Path(__file__).parent / "results"


def _export(name: str, folder: Path, shape: tuple[int, ...], dynamic_batch: bool = False) -> Path:
    path = folder / f"{name}-{'x'.join(map(str, shape))}.onnx"
    export(name, path, input_shape=shape, dynamic_batch=dynamic_batch)
    return path


def run(runs: int, folder: Path) -> dict:
    resnet18 = _export("resnet18", folder, (1, 3, 224, 224))
    first, second = (profile(resnet18, runs=runs)["latency"]["median_ms"] for _ in range(2))
    self_compare = compare(resnet18, resnet18, runs=runs)["speedup"]

    signatures = [signature for _, signature in conv_signatures(resnet18)]
    cache = folder / "latency-cache"
    started = time.perf_counter()
    measure(signatures, cache_dir=cache, runs=runs)
    first_build = time.perf_counter() - started
    started = time.perf_counter()
    table = measure(signatures, cache_dir=cache, runs=runs)
    second_build = time.perf_counter() - started
    add = additivity(resnet18, cache_dir=cache, runs=runs)

    zoo = []
    for name in ("resnet50", "mobilenet_v2"):
        path = _export(name, folder, (1, 3, 224, 224), dynamic_batch=True)
        for batch, batch_runs in ((1, runs), (32, max(5, runs // 10))):
            report = profile(path, runs=batch_runs, warmup=3 if batch > 1 else 10,
                             input_shapes={"input": (batch, 3, 224, 224)})
            zoo.append({"model": name, "batch": batch, "runs": batch_runs, "latency": report["latency"],
                        "peak_rss_bytes": report["memory"]["peak_rss_bytes"]})
    return {
        "environment": describe("cpu") | {"threads": 1, "opt_level": "all", "runs": runs,
                                          "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")},
        "repeatability": {"model": "resnet18 1x3x224x224", "median_ms": [first, second],
                          "difference": abs(first - second) / min(first, second)},
        "self_compare": {"model": "resnet18 1x3x224x224", **self_compare},
        "latency_table_cache": {"signatures": len(signatures), "first_build_s": first_build,
                                "second_build_s": second_build, "speedup": first_build / second_build,
                                "second_build_hits": table.hits, "second_build_misses": table.misses},
        "additivity": {"model": "resnet18 1x3x224x224", **{k: add[k] for k in
                                                          ("end_to_end_ms", "table_sum_ms", "ratio", "uncovered_fraction")}},
        "zoo": zoo,
    }


def markdown(results: dict) -> str:
    env, rep, self_cmp = results["environment"], results["repeatability"], results["self_compare"]
    cache, add = results["latency_table_cache"], results["additivity"]
    lines = [
        f"ORT {env['onnxruntime']} ({env['ort_build']}), CPU: {env['cpu']}, 1 intra-op thread, ENABLE_ALL, "
        f"{env['runs']} timed runs after 10 warm-up runs; {env['date']}.",
        "",
        "| check | result | target |",
        "|---|---|---|",
        f"| two `profile` runs of {rep['model']}: medians | {rep['median_ms'][0]:.2f} ms, {rep['median_ms'][1]:.2f} ms "
        f"(differ by {rep['difference']:.1%}) | within ±3% |",
        f"| `compare` of {self_cmp['model']} with itself | median ratio {self_cmp['median']:.3f} "
        f"(p10 {self_cmp['p10']:.3f}, p90 {self_cmp['p90']:.3f}) | 0.97–1.03 |",
        f"| latency table of its {cache['signatures']} convs: first vs second build | {cache['first_build_s']:.2f} s vs "
        f"{cache['second_build_s'] * 1e3:.1f} ms ({cache['speedup']:,.0f}× faster; {cache['second_build_hits']} distinct "
        f"signatures, {cache['second_build_misses']} misses) "
        "| ≥ 10× |",
        f"| table additivity on {add['model']} | sum of conv entries {add['table_sum_ms']:.2f} ms vs end to end "
        f"{add['end_to_end_ms']:.2f} ms (ratio {add['ratio']:.2f}) | reported |",
        "",
        "| model | batch | median ms | p90 ms | runs | peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["zoo"]:
        lines.append(f"| {row['model']} 224×224 | {row['batch']} | {row['latency']['median_ms']:.2f} | "
                     f"{row['latency']['p90_ms']:.2f} | {row['runs']} | {row['peak_rss_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per measurement (default 50)")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile.md")
    parser.add_argument("--json", type=Path, default=RESULTS / "profile.json")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    with tempfile.TemporaryDirectory(prefix="onnxmerge-bench-") as folder:
        results = run(args.runs, Path(folder))
    text = markdown(results)
    write_results(args.out, args.json, text, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
