"""Benchmarks: each prints its figures and saves them as JSON under bench/results/.

bench/ imports model/ only (a GPU machine has torch and little else), so its one helper for
writing a result lives here rather than in tasks/.
"""

from __future__ import annotations

import json
from pathlib import Path


def save_result(result: dict, out: str | Path) -> Path:
    """Write a benchmark's result as JSON (folders made; values JSON does not know as text) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"saved {out}")
    return out
