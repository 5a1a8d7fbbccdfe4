"""Export registry models (or any module) to ONNX with the legacy TorchScript exporter.

`keep_bn=True` exists because the exporter normally folds eval-mode BatchNorm into
the preceding Conv, which would leave onnxmerge's BN-folding pass nothing to do.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

from .registry import MODELS, build, default_input_shape

EXAMPLE_PATH = Path(__file__).parent / "examples" / "repvgg_tiny.onnx"


def export(
    name_or_module: str | nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, ...] | None = None,
    keep_bn: bool = False,
    dynamic_batch: bool = False,
    opset: int = 17,
    seed: int = 0,
) -> str:
    """Write an ONNX file (input "input", output "output") and check ORT can load it.

    A registry name is built with `seed`; a module is exported as given (in eval
    mode) and then needs `input_shape`.
    """
    if isinstance(name_or_module, str):
        input_shape = tuple(input_shape or default_input_shape(name_or_module))
        model = build(name_or_module, seed=seed)
    elif input_shape is None:
        raise ValueError("input_shape is required when exporting a module")
    else:
        model = name_or_module.eval()
    x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed))
    path = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and PRESERVE notes
        torch.onnx.export(
            model,
            (x,),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None,
            # The exporter fuses Conv+BN only when training=EVAL. PRESERVE on an
            # eval-mode module skips that fusion yet still emits inference-mode
            # BatchNormalization (training_mode=0, one output), and unlike
            # do_constant_folding=False it keeps folding the rest (Resize scales,
            # Clip bounds), so the graph differs from the default only in BN.
            training=torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL,
        )
    onnx.checker.check_model(path)
    ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return path


def export_example(path: str | os.PathLike = EXAMPLE_PATH) -> str:
    """Regenerate the README example; same as
    `python -m models.export repvgg_tiny -o models/examples/repvgg_tiny.onnx --keep-bn`."""
    return export("repvgg_tiny", path, keep_bn=True)


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if len(dims) < 2 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected a shape like 1,3,224,224, got {text!r}")
    return dims


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.export", description=__doc__)
    p.add_argument("name", help=f"one of: {', '.join(MODELS)}")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--keep-bn", action="store_true", help="keep BatchNormalization nodes")
    p.add_argument("--dynamic-batch", action="store_true", help="make dim 0 of input/output dynamic")
    p.add_argument("--input-shape", type=_shape, help="e.g. 1,3,224,224 (default: per model)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.name not in MODELS:
        print(f"error: unknown model {args.name!r}; choose from: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    out = export(
        args.name,
        args.output,
        input_shape=args.input_shape,
        keep_bn=args.keep_bn,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        seed=args.seed,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
