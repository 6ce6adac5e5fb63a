"""Benchmarks: each prints its figures and saves them as JSON under bench/results/.

The GPU benchmarks import model/ only (a GPU machine has torch and little else; .importlinter),
and tasks/ sits below bench/ in the layers, so neither can share tasks.assets.save_result, the
recipes' twin of the helper below: it lives here, with the standard library only.
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
