"""The benchmarks' JSON output, shared by the scripts in this folder."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(path: Path | None, result: dict) -> None:
    """(Re)write ``result`` to ``path`` (a no-op for None) through a temporary file, so that a run
    stopped while writing leaves the previous complete file: the benchmarks write after every
    measured row, and a row's ``"complete": false`` says the sweep had not ended."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
