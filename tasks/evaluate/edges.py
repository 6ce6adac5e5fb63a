"""Where canny F1 is lost: edge precision and recall of control:canny rows, exact and within a pixel.

canny F1 (tasks/generate/verify.py) counts an edge one pixel off as a miss and an extra. This
splits it: of the edges canny finds in the generated pictures, the share on the map's edges
(precision), of the map's edges the share found (recall), each counted exactly and within
`--tolerance` pixels (a square neighbourhood), pooled over every control:canny row of the
dataset (pixel counts summed, so large shapes weigh more than the per-row mean F1 does).

    python -m tasks.evaluate.edges out/a/generated [out/b/generated ...] [--json edges.json]
"""

from __future__ import annotations

import argparse
import sys

import cv2
import numpy as np

from tasks.config import EvaluateConfig
from tasks.evaluate.figures import generated_picture
from tasks.evaluate.job import open_generated
from tasks.generate.verify import binary_map, canny_edges
from tasks.panels.compose import decode_panel

_DEFAULTS = EvaluateConfig()
CANNY_LOW, CANNY_HIGH = _DEFAULTS.canny_low, _DEFAULTS.canny_high  # the maps' thresholds


def _prf(hits_pred: int, hits_map: int, n_pred: int, n_map: int) -> dict:
    p = hits_pred / n_pred if n_pred else 0.0
    r = hits_map / n_map if n_map else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0}


def new_counts() -> dict[str, int]:
    """Pixel counts to pool over pictures with add_counts, then summarise with pooled()."""
    return {"pred": 0, "map": 0, "exact": 0, "pred_near": 0, "map_near": 0}


def add_counts(n: dict[str, int], edges: np.ndarray, edges_map: np.ndarray, tolerance: int = 1) -> None:
    """Add one picture's counts: `edges` found in it, `edges_map` the edges it should have (boolean)."""
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    n["pred"] += int(edges.sum())
    n["map"] += int(edges_map.sum())
    n["exact"] += int((edges & edges_map).sum())
    n["pred_near"] += int((edges & (cv2.dilate(edges_map.astype(np.uint8), kernel) > 0)).sum())
    n["map_near"] += int((edges_map & (cv2.dilate(edges.astype(np.uint8), kernel) > 0)).sum())


def pooled(n: dict[str, int]) -> dict:
    """Precision, recall and F1, exact and within the tolerance, of pooled counts."""
    return {
        "exact": _prf(n["exact"], n["exact"], n["pred"], n["map"]),
        "within_tolerance": _prf(n["pred_near"], n["map_near"], n["pred"], n["map"]),
        "edge_pixels_generated_per_map_pixel": round(n["pred"] / n["map"], 4) if n["map"] else None,
    }


def edge_agreement(uri: str, low: int = CANNY_LOW, high: int = CANNY_HIGH, tolerance: int = 1) -> dict:
    """Pooled edge precision/recall of a GENERATED dataset's control:canny rows (see the module)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be 0 or more pixels, got {tolerance}")
    ds = open_generated(uri, "edges")
    tasks = ds.table(columns=["task"]).column("task").to_pylist()
    wanted = [i for i, task in enumerate(tasks) if task == "control:canny"]
    if not wanted:
        raise ValueError(f"{uri} has no control:canny rows to measure")
    rows = ds.take(wanted, columns=["upper", "lower"]).to_pylist()  # only the canny rows' pictures are read
    n = new_counts()
    for row in rows:
        add_counts(n, canny_edges(generated_picture(row), low, high), binary_map(decode_panel(row["upper"])), tolerance)
    return {"dataset": uri, "rows": len(rows), "tolerance_px": tolerance, **pooled(n)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", nargs="+", help="evaluated or not: GENERATED datasets (folders or URIs)")
    ap.add_argument("--tolerance", type=int, default=1, help="pixels an edge may be off and still count (default 1)")
    ap.add_argument("--low", type=int, default=CANNY_LOW, help="canny low threshold (evaluate.canny_low)")
    ap.add_argument("--high", type=int, default=CANNY_HIGH, help="canny high threshold (evaluate.canny_high)")
    ap.add_argument("--json", help="also save the results here")
    a = ap.parse_args(argv)
    results = []
    for uri in a.datasets:
        try:
            res = edge_agreement(uri, a.low, a.high, a.tolerance)
        except (ValueError, FileNotFoundError) as e:
            print(f"edges: {e}", file=sys.stderr)
            return 2
        ex, tol = res["exact"], res["within_tolerance"]
        print(f"{uri}: {res['rows']} rows; exact: precision {ex['precision']:.3f} recall {ex['recall']:.3f} "
              f"F1 {ex['f1']:.3f}; within {a.tolerance} px: precision {tol['precision']:.3f} "
              f"recall {tol['recall']:.3f} F1 {tol['f1']:.3f}; edge pixels generated per map pixel "
              f"{res['edge_pixels_generated_per_map_pixel']}")
        results.append(res)
    if a.json:
        from tasks.assets import save_result

        save_result({"results": results, "command": "python -m tasks.evaluate.edges " + " ".join(argv or sys.argv[1:])},
                    a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
