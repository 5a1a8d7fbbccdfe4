"""The one place that imports onnxruntime, so a missing or doubled ORT install gets one clear message."""

from __future__ import annotations

from importlib import metadata

from onnxmerge.errors import OnnxMergeError

_ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def _installed_ort_distributions() -> list[str]:
    found = []
    for name in _ORT_DISTRIBUTIONS:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def _import_onnxruntime():
    installed = _installed_ort_distributions()
    if len(installed) > 1:
        raise OnnxMergeError(
            "both onnxruntime and onnxruntime-gpu are installed; they overwrite each other's files. "
            "Fix: pip uninstall -y onnxruntime onnxruntime-gpu, then pip install 'onnxmerge[cpu]' "
            "or 'onnxmerge[gpu]'"
        )
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxMergeError(
            "ONNX Runtime is not installed: pip install 'onnxmerge[cpu]' (or 'onnxmerge[gpu]' for CUDA)"
        ) from exc
    if not hasattr(onnxruntime, "InferenceSession"):
        raise OnnxMergeError(
            "the onnxruntime package is broken (often left behind by uninstalling one of onnxruntime / "
            "onnxruntime-gpu); reinstall exactly one of them"
        )
    return onnxruntime


ort = _import_onnxruntime()
