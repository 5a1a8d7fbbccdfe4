"""Train small CNNs on scikit-learn's bundled digits so passes can be checked on
*trained* weights and real accuracy, not just on random-output equivalence.

Data: `load_digits()` 8x8 images (values 0..16) are scaled to [-1, 1] and bilinearly
upsampled to 16x16, single channel (N x 1 x 16 x 16 float32). The split is a
stratified 80/20 train/held-out split; the first 256 training images double as a
calibration set. Accuracy is measured in ONNX Runtime on the exported model.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F

from .export import export
from .registry import DIGITS_SHAPE, MODELS

ARCHS = ("resnet", "mobilenet")
CALIB_SIZE = 256


@dataclass
class TrainedDigits:
    arch: str
    model: onnx.ModelProto
    path: str | None  # None when trained without out_path
    accuracy: float  # held-out accuracy in ONNX Runtime
    train_seconds: float
    x_test: np.ndarray
    y_test: np.ndarray
    x_calib: np.ndarray


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test), images float32 N x 1 x 16 x 16, labels int64."""
    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    x = F.interpolate(x, size=DIGITS_SHAPE[2:], mode="bilinear", align_corners=False).numpy()
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return x_tr, y_tr, x_te, y_te


def ort_accuracy(model: str | onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float((logits.argmax(1) == y).mean())


def _registry_name(arch: str) -> str:
    name = arch if arch.startswith("digits_") else f"digits_{arch}"
    if name not in MODELS:
        raise KeyError(f"unknown digits arch {arch!r}; choose from: {', '.join(ARCHS)}")
    return name


def train_digits(
    arch: str,
    seed: int = 0,
    epochs: int = 15,
    out_path: str | os.PathLike | None = None,
    keep_bn: bool = True,
    act: Callable[[int], torch.nn.Module] | None = None,
) -> TrainedDigits:
    """Train `arch` ("resnet" or "mobilenet") and export it with a dynamic batch.

    BN is kept by default because folding it is one of the passes under test. ``act(channels)`` builds the
    activation modules instead of the architecture's own (ReLU / ReLU6), e.g. ``lambda c: nn.PReLU(c)``.
    """
    name = _registry_name(arch)
    torch.set_num_threads(2)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    torch.manual_seed(seed)
    model = MODELS[name]() if act is None else MODELS[name](act=act)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    batch = 64
    steps = (len(xt) + batch - 1) // batch
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * steps)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(steps):
            idx = perm[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    train_seconds = time.perf_counter() - start
    model.eval()

    with tempfile.TemporaryDirectory() as tmp:
        path = os.fspath(out_path) if out_path is not None else os.path.join(tmp, f"{name}.onnx")
        export(model, path, input_shape=DIGITS_SHAPE, keep_bn=keep_bn, dynamic_batch=True, seed=seed)
        proto = onnx.load(path)
    return TrainedDigits(
        arch=name,
        model=proto,
        path=path if out_path is not None else None,
        accuracy=ort_accuracy(proto, x_te, y_te),
        train_seconds=train_seconds,
        x_test=x_te,
        y_test=y_te,
        x_calib=x_tr[:CALIB_SIZE],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.digits", description=__doc__)
    p.add_argument("arch", choices=ARCHS)
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--data", help="also write the held-out set as .npz (arrays 'input', 'labels')")
    p.add_argument("--fold-bn", action="store_true", help="let the exporter fold BN (default: keep it)")
    args = p.parse_args(argv)
    res = train_digits(args.arch, seed=args.seed, epochs=args.epochs, out_path=args.output, keep_bn=not args.fold_bn)
    if args.data:
        np.savez(args.data, input=res.x_test, labels=res.y_test)
    print(f"{res.arch}: ORT held-out accuracy {res.accuracy:.4f} ({len(res.y_test)} images), "
          f"trained in {res.train_seconds:.1f}s -> {res.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
