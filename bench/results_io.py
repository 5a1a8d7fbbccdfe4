"""Writing a benchmark's Markdown and JSON results: atomically, as every other onnxmerge write."""

from __future__ import annotations

import json
from pathlib import Path

from onnxmerge.io import atomic_write_bytes


def write_results(markdown_path: Path, json_path: Path, text: str, results: dict) -> None:
    for path in (markdown_path, json_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(markdown_path, text.encode())
    atomic_write_bytes(json_path, (json.dumps(results, indent=2) + "\n").encode())
    print(text)
