"""Memory in use while a model runs: process RSS on the CPU, device memory on CUDA."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import threading

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:  # not Linux: the lifetime peak is the best available figure
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRssSampler:
    """Samples this process's RSS in a background thread; ORT releases the GIL while it runs a model."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.before = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRssSampler":
        self.before = self.peak = current_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def cuda_memory_used_bytes() -> int | None:
    """Device memory this process holds on the GPU (nvidia-smi), or None where it cannot be read."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in result.stdout.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return int(float(used)) * 1024 * 1024
    return None
