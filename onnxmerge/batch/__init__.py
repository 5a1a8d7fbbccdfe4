"""``onnxmerge batch``: a whole model zoo through one pipeline, each model isolated, resumable, reported."""

from onnxmerge.batch.results import FAILED, OK, REFUSED, SKIPPED, STATUSES, BatchReport, ModelResult
from onnxmerge.batch.runner import BatchListener, run_batch

__all__ = ["run_batch", "BatchReport", "ModelResult", "BatchListener", "OK", "SKIPPED", "REFUSED", "FAILED",
           "STATUSES"]
