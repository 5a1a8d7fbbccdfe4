"""What a measurement ran on: recorded with every timing and part of every latency-cache key."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from onnxmerge.ort import ort
from onnxmerge.version import __version__


def default_cache_dir() -> Path:
    """Where folded models and latency tables are cached: $ONNXMERGE_CACHE_DIR or ~/.cache/onnxmerge."""
    return Path(os.environ.get("ONNXMERGE_CACHE_DIR", Path.home() / ".cache" / "onnxmerge"))


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi, or None where there is none."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = result.stdout.strip().splitlines()
    return names[0].strip() if result.returncode == 0 and names else None


def ort_build() -> str:
    """Which ORT distribution is installed (the CPU and GPU builds differ in kernels, not only providers)."""
    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return f"onnxruntime {ort.__version__}"


def hardware_fingerprint(provider: str) -> str:
    """The part of a latency-cache key that says which hardware and ORT build measured it."""
    device = gpu_name() if provider == "cuda" else cpu_model()
    return f"{ort_build()}|{provider}|{device}"


def describe(provider: str) -> dict:
    return {
        "onnxmerge": __version__,
        "onnxruntime": ort.__version__,
        "ort_build": ort_build(),
        "provider": provider,
        "cpu": cpu_model(),
        "gpu": gpu_name(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
