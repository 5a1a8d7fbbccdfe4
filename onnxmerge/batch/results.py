"""What a batch found, per model and in sum: the one structure the progress lines, the reports and the exit code read.

Statuses:
- ``ok``: the pipeline ran, the result was verified in ORT (where the pipeline checks equivalence: fold does,
  compress changes the function on purpose and says so with ``verification`` None, shown as "n/a") and
  written (with its per-model report);
- ``skipped``: ``--resume`` found it ok and up to date from an earlier run (its numbers are that run's);
- ``refused``: onnxmerge refused the input as unusable (``BadInputError``: not an ONNX file, invalid model,
  missing external data, unusable options): the model's problem, the same on every run;
- ``failed``: the work did not finish; ``failure`` says why: ``verification`` (the rewrite changed the
  outputs: nothing written), ``crash`` (the worker died), ``timeout``, ``memory`` (out of memory under the
  worker's limit) or ``error`` (an unexpected exception: an onnxmerge bug).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, fields

OK, SKIPPED, REFUSED, FAILED = "ok", "skipped", "refused", "failed"
NOT_CHECKED = "n/a"  # the "verified" cell of a result whose command does not check equivalence
STATUSES = (OK, SKIPPED, REFUSED, FAILED)
EXIT_OK, EXIT_SOME_FAILED = 0, 1


@dataclass
class ModelResult:
    model: str  # path relative to IN_DIR
    status: str
    reason: str = ""  # one line: why it was refused or failed; warnings for an ok model
    failure: str | None = None
    seconds: float | None = None  # worker wall time in this run (None when skipped)
    output: str | None = None  # path relative to OUT_DIR
    input_hash: str | None = None  # model + external data + options + onnxmerge version
    output_hash: str | None = None
    details: dict | None = None  # the pipeline's result (to_dict()); with --bench, details["bench"] is `compare`'s

    def row(self) -> dict:
        """The flat numbers every table shows. ``verified`` is True/False, ``"n/a"`` when the pipeline does
        not check equivalence (its result has ``verification`` None), None when there is no result."""
        details = self.details or {}
        before, after = details.get("before") or {}, details.get("after") or {}
        verification = details.get("verification") or {}
        speedup = (details.get("bench") or {}).get("speedup") or {}
        if self.details is not None and "verification" in details and details["verification"] is None:
            verified = NOT_CHECKED
        else:
            verified = verification.get("passed")
        return {
            "model": self.model, "status": self.status, "failure": self.failure,
            "nodes_before": before.get("nodes"), "nodes_after": after.get("nodes"),
            "parameters_before": before.get("parameters"), "parameters_after": after.get("parameters"),
            "size_before": before.get("size_bytes"), "size_after": after.get("size_bytes"),
            "verified": verified, "max_abs_error": verification.get("max_abs_error"),
            "speedup": speedup.get("median"), "speedup_p10": speedup.get("p10"), "speedup_p90": speedup.get("p90"),
            "seconds": self.seconds, "reason": self.reason,
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelResult":
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class BatchReport:
    in_dir: str
    out_dir: str
    pipeline: str
    executor: str
    jobs: int
    bench: bool
    models: list[ModelResult] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # not run: the batch was interrupted
    seconds: float = 0.0
    environment: dict = field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        return bool(self.pending)

    def counts(self) -> dict[str, int]:
        return {status: sum(m.status == status for m in self.models) for status in STATUSES}

    def failures(self) -> dict[str, int]:
        kinds = [m.failure for m in self.models if m.status == FAILED]
        return {kind: kinds.count(kind) for kind in sorted(set(kinds))}

    def speedups(self) -> list[float]:
        return [s for s in (m.row()["speedup"] for m in self.models) if s is not None]

    @property
    def exit_code(self) -> int:
        counts = self.counts()
        return EXIT_SOME_FAILED if counts[REFUSED] or counts[FAILED] else EXIT_OK

    def summary(self) -> str:
        counts = self.counts()
        line = f"{len(self.models)} models: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES)
        if self.failures():
            line += " (" + ", ".join(f"{n} {kind}" for kind, n in self.failures().items()) + ")"
        if self.speedups():
            line += f"; median speed-up {statistics.median(self.speedups()):.2f}× over {len(self.speedups())}"
        line += f"; {self.seconds:.0f} s"
        if self.interrupted:
            line += f"; interrupted: {len(self.pending)} not run (run again with --resume)"
        return line

    def to_dict(self) -> dict:
        speedups = self.speedups()
        summary = {**self.counts(), "failures": self.failures(), "interrupted": self.interrupted,
                   "median_speedup": statistics.median(speedups) if speedups else None, "line": self.summary()}
        return {**asdict(self), "summary": summary, "exit_code": self.exit_code}
