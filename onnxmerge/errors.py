"""Error types that map onto the CLI's exit codes, so the API and the CLI agree on what failed."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one line: errors from ORT and protobuf run over many lines."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__


class OnnxMergeError(Exception):
    """Base class: every error onnxmerge raises on purpose is one of these."""

    exit_code = 2


class BadInputError(OnnxMergeError):
    """The model, a path or an option cannot be used as given (CLI exit 2)."""

    exit_code = 2


class VerificationError(OnnxMergeError):
    """The rewritten model does not match the original within tolerance (CLI exit 1)."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report
