"""Benchmarks: each script prints a table and writes its result as JSON under `RESULTS`."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(path: Path, result: dict) -> Path:
    """`result` as indented JSON at `path`, its directory made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
