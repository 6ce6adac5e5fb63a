"""The recipes that train the shipped tiny models on the shapes world (docs/assets.md)."""

import json
from pathlib import Path


def save_result(result: dict, out: str | Path) -> None:
    """Write a recipe's or measurement's result as JSON (folders made) and say where."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")
