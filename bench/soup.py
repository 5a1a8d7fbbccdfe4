"""Soup benchmarks: the memory of a streaming merge, and what each method scores on digits fine-tunes.

Memory: ``--models`` ResNet-50s are exported with different seeds (the exporter's default, BN folded) and
merged uniformly; each merge runs in a fresh interpreter whose RSS is sampled every millisecond
(``PeakRssSampler``), and the peak above the interpreter's RSS before the merge is compared with one model's
file size. The same models saved with external data, and a naive merge (``onnx.load`` every model, average
with numpy), are measured the same way.

Digits: a digits ResNet is trained, fine-tuned several times (seeds, learning rates, input noise) and every
method is scored in ORT on two halves of the held-out split: ``val`` (what greedy selects by) and ``test``.
Two MLPs and two ResNets trained from scratch give the naive and the aligned midpoint.

    python -m bench.soup [--models 8] [--skip-memory] [--skip-digits]
                         [--out bench/results/soup.md] [--json bench/results/soup.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
MEASURE_FLAG = "--measure"


# ------------------------------------------------------------------------------------------ digits models

def train(module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, seed: int, noise: float = 0.0):
    """SGD with momentum on the digits training split; ``noise`` adds Gaussian input noise (augmentation)."""
    import torch
    from torch.nn import functional as F

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 64):
            index = order[start:start + 64]
            batch = xt[index]
            if noise:
                batch = batch + noise * torch.randn(batch.shape, generator=generator)
            loss = F.cross_entropy(module(batch), yt[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return module.eval()


def digits_mlp(width: int = 128):
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def export_digits(module, path: Path, keep_bn: bool = True) -> Path:
    from models.export import export
    from models.registry import DIGITS_SHAPE

    export(module, path, input_shape=DIGITS_SHAPE, keep_bn=keep_bn, dynamic_batch=True)
    return path


@dataclass
class DigitsFamily:
    base: Path
    finetunes: list[Path]
    folded_bn: Path  # the base exported the default way, BN folded into the convs
    independent_mlps: list[Path]  # trained from scratch with different seeds
    independent_resnets: list[Path]
    val: Path  # .npz: first half of the held-out split (greedy selects by it)
    test: tuple[np.ndarray, np.ndarray]  # second half
    calib: Path  # .npz: training images for BN statistics


# (learning rate, input noise) of each fine-tune
FINETUNES = [(0.02, 0.0), (0.05, 0.3), (0.01, 0.6), (0.08, 0.0), (0.005, 0.0), (0.03, 0.45)]


def build_digits_family(folder: Path, *, finetunes: int = 4, base_epochs: int = 2, finetune_epochs: int = 1,
                        mlp_epochs: int = 10, resnet_epochs: int = 0) -> DigitsFamily:
    """Train and export the family (BatchNorm kept); ``resnet_epochs=0`` skips the independent ResNets."""
    import torch

    from models.digits import load_digits_split
    from models.registry import MODELS

    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_digits_split(0)
    torch.manual_seed(0)
    base = train(MODELS["digits_resnet"](), x_train, y_train, epochs=base_epochs, lr=0.05, seed=0)
    tuned = []
    for index, (lr, noise) in enumerate(FINETUNES[:finetunes]):
        module = train(copy.deepcopy(base), x_train, y_train, epochs=finetune_epochs, lr=lr, seed=10 + index,
                       noise=noise)
        tuned.append(export_digits(module, folder / f"finetune{index}.onnx"))
    mlps, resnets = [], []
    for seed in (1, 2):
        torch.manual_seed(seed)
        mlps.append(export_digits(train(digits_mlp(), x_train, y_train, epochs=mlp_epochs, lr=0.05, seed=seed),
                                  folder / f"mlp{seed}.onnx"))
        if resnet_epochs:
            torch.manual_seed(seed)
            net = train(MODELS["digits_resnet"](), x_train, y_train, epochs=resnet_epochs, lr=0.05, seed=seed)
            resnets.append(export_digits(net, folder / f"resnet{seed}.onnx"))
    half = len(x_test) // 2
    np.savez(folder / "val.npz", input=x_test[:half], labels=y_test[:half])
    np.savez(folder / "calib.npz", input=x_train[:512])
    return DigitsFamily(export_digits(base, folder / "base.onnx"), tuned,
                        export_digits(base, folder / "folded.onnx", keep_bn=False), mlps, resnets,
                        folder / "val.npz", (x_test[half:], y_test[half:]), folder / "calib.npz")


def _scores(model, data: tuple[np.ndarray, np.ndarray]) -> dict:
    from onnxmerge.runner import make_session
    from onnxmerge.merging.data import accuracy, cross_entropy

    x, y = data
    outputs = make_session(model).run(None, {"input": x})[0]
    return {"accuracy": accuracy(outputs, y), "loss": cross_entropy(outputs, y)}


def bench_digits(folder: Path) -> dict:
    from onnxmerge.merging import soup

    family = build_digits_family(folder, finetunes=6, base_epochs=3, finetune_epochs=2, resnet_epochs=4)
    val_file = np.load(family.val)
    val = (val_file["input"], val_file["labels"])
    rows = []

    def row(name: str, model, **extra) -> None:
        rows.append({"method": name, "val": _scores(model, val), "test": _scores(model, family.test), **extra})

    for index, path in enumerate(family.finetunes):
        row(f"fine-tune {index}", str(path))
    best = max(rows, key=lambda r: r["val"]["accuracy"])
    rows.append({**best, "method": f"best single ({best['method']}, by val)"})
    base = {"base": family.base}
    configurations = [
        ("uniform", {}), ("uniform + reset-bn", {"reset_bn": family.calib}),
        ("greedy", {"method": "greedy", "eval_data": family.val}),
        ("greedy + reset-bn", {"method": "greedy", "eval_data": family.val, "reset_bn": family.calib}),
        ("greedy by val loss + reset-bn", {"method": "greedy", "eval_data": family.val, "metric": "loss",
                                           "reset_bn": family.calib}),
        ("task arithmetic λ=0.5", {"method": "task-arithmetic", "scale": 0.5, **base}),
        ("task arithmetic λ=0.5 + reset-bn", {"method": "task-arithmetic", "scale": 0.5, "reset_bn": family.calib,
                                              **base}),
        ("TIES density 0.2 + reset-bn", {"method": "ties", "reset_bn": family.calib, **base}),
        ("DARE density 0.2 λ=0.5 + reset-bn", {"method": "dare", "scale": 0.5, "reset_bn": family.calib, **base}),
    ]
    for name, options in configurations:
        result = soup(family.finetunes, **options)
        kept = (result.greedy or {}).get("kept")
        row(name, result.model, **({"kept": [Path(p).stem for p in kept]} if kept else {}))
    pairs = []
    for label, nets, options in (("MLP 256-128-128-10", family.independent_mlps, {}),
                                 ("digits ResNet, + reset-bn", family.independent_resnets,
                                  {"reset_bn": family.calib})):
        singles = [_scores(str(p), family.test) for p in nets]
        naive = soup(nets, **options).model
        aligned = soup(nets, align=True, **options)
        pairs.append({"models": label, "singles": singles, "naive": _scores(naive, family.test),
                      "aligned": _scores(aligned.model, family.test),
                      "cosine": [aligned.alignment[0]["cosine_before"], aligned.alignment[0]["cosine_after"]]})
    return {"methods": rows, "alignment": pairs, "held_out": {"val": len(val[1]), "test": len(family.test[1])}}


# ------------------------------------------------------------------------------------------------ memory

def export_resnet50s(folder: Path, count: int) -> list[Path]:
    from models.export import export

    return [Path(export("resnet50", folder / f"resnet50_seed{seed}.onnx", seed=seed)) for seed in range(count)]


def _measure(mode: str, paths: list[str], output: str) -> dict:
    """Runs in a fresh interpreter: everything imported first, so the peak above ``before`` is the merge's."""
    import onnx

    from onnxmerge.merging import soup
    from onnxmerge.memory import PeakRssSampler

    started = time.perf_counter()
    with PeakRssSampler() as sampler:
        if mode == "naive":
            models = [onnx.load(p) for p in paths]
            merged = models[0]
            for index, tensor in enumerate(merged.graph.initializer):
                stack = np.stack([onnx.numpy_helper.to_array(m.graph.initializer[index]) for m in models])
                tensor.CopyFrom(onnx.numpy_helper.from_array(stack.mean(axis=0).astype(stack.dtype), tensor.name))
            onnx.save(merged, output)
        else:
            soup(paths, output, external_data=mode == "external")
    return {"before_rss_bytes": sampler.before, "peak_rss_bytes": sampler.peak,
            "wall_s": time.perf_counter() - started}


def bench_memory(folder: Path, count: int) -> dict:
    from onnxmerge.io import load_model, save_model

    paths = export_resnet50s(folder, count)
    external = []
    for path in paths:
        target = folder / "external" / path.stem / path.name
        target.parent.mkdir(parents=True)
        external.append(save_model(load_model(path).proto, target, external_data=True))
    size = paths[0].stat().st_size
    rows = []
    for mode, label, inputs in (("inline", "onnxmerge soup, weights inside each .onnx", paths),
                                ("external", "onnxmerge soup, weights in external .data files", external),
                                ("naive", "reference: onnx.load every model, numpy mean", paths)):
        command = [sys.executable, "-m", "bench.soup", MEASURE_FLAG, mode, str(folder / f"out_{mode}.onnx"),
                   *map(str, inputs)]
        measured = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        growth = measured["peak_rss_bytes"] - measured["before_rss_bytes"]
        rows.append({"mode": mode, "label": label, **measured, "growth_bytes": growth,
                     "growth_over_model": growth / size, "wall_s_per_model": measured["wall_s"] / count})
    return {"models": count, "model": "resnet50 (224x224, BN folded, float32)", "model_bytes": size, "rows": rows}


# ------------------------------------------------------------------------------------------------ report

def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def markdown(results: dict) -> str:
    lines = [f"# onnxmerge soup benchmark ({results['date']})", "",
             f"ORT {results['environment']['onnxruntime']}, {results['environment']['cpu']}, "
             f"python {results['environment']['python']}.", ""]
    memory = results.get("memory")
    if memory:
        lines += [f"## Peak memory: uniform soup of {memory['models']} × {memory['model']}", "",
                  f"One model file: {_mib(memory['model_bytes'])}. Peak RSS above the interpreter's RSS before the "
                  "merge (ORT, onnx and numpy already imported), sampled every 1 ms; each row in a fresh process.", "",
                  "| merge | peak RSS growth | × one model | total peak RSS | wall | wall per model |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in memory["rows"]:
            lines.append(f"| {row['label']} | {_mib(row['growth_bytes'])} | {row['growth_over_model']:.2f}× | "
                         f"{_mib(row['peak_rss_bytes'])} | {row['wall_s']:.1f} s | {row['wall_s_per_model']:.2f} s |")
        lines.append("")
    digits = results.get("digits")
    if digits:
        held = digits["held_out"]
        lines += ["## Digits fine-tunes: methods compared", "",
                  f"digits ResNet (BN kept) fine-tuned 6 times from one base; accuracy (and cross-entropy) in ORT on "
                  f"the held-out split: `val` ({held['val']} images, greedy selects by it) and `test` "
                  f"({held['test']} images, used by nothing).", "",
                  "| model | val acc | test acc | test loss | greedy kept |", "|---|---:|---:|---:|---|"]
        for row in digits["methods"]:
            kept = ", ".join(row.get("kept", []))
            lines.append(f"| {row['method']} | {row['val']['accuracy']:.3f} | {row['test']['accuracy']:.3f} | "
                         f"{row['test']['loss']:.3f} | {kept} |")
        lines += ["", "## Independently trained pairs: naive vs aligned midpoint (test split)", "",
                  "| models | single A / B acc | naive midpoint acc (loss) | aligned midpoint acc (loss) | "
                  "weight cosine before → after alignment |", "|---|---|---:|---:|---:|"]
        for pair in digits["alignment"]:
            singles = " / ".join(f"{s['accuracy']:.3f}" for s in pair["singles"])
            lines.append(f"| {pair['models']} | {singles} | {pair['naive']['accuracy']:.3f} "
                         f"({pair['naive']['loss']:.2f}) | {pair['aligned']['accuracy']:.3f} "
                         f"({pair['aligned']['loss']:.2f}) | {pair['cosine'][0]:.3f} → {pair['cosine'][1]:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [MEASURE_FLAG]:
        mode, output, *paths = argv[1:]
        print(json.dumps(_measure(mode, paths, output)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.soup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=8, help="ResNet-50s in the memory benchmark (default 8)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "soup.md")
    parser.add_argument("--json", type=Path, default=RESULTS / "soup.json")
    args = parser.parse_args(argv)

    from bench.results_io import write_results
    from onnxmerge.environment import describe

    results: dict = {"date": datetime.date.today().isoformat(), "environment": describe("cpu")}
    with tempfile.TemporaryDirectory(prefix="onnxmerge-bench-soup-") as folder:
        if not args.skip_memory:
            (Path(folder) / "memory").mkdir()
            results["memory"] = bench_memory(Path(folder) / "memory", args.models)
        if not args.skip_digits:
            (Path(folder) / "digits").mkdir()
            results["digits"] = bench_digits(Path(folder) / "digits")
    write_results(args.out, args.json, markdown(results), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
