"""Per-row evaluation figures: control fidelity and caption agreement of one generated row.

    python -c "from tasks.evaluate.figures import METRICS; print(list(METRICS))"

What tasks/evaluate/job.py (the job) and tasks/evaluate/report.py (the report) both need: the metric
names, the shapes scene a row was made from, its exact depth, and RowScorer, which scores a row
against its own inputs and against its partner's picture (the floor). tasks/evaluate/job.py's
docstring says what each figure measures.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Callable

import cv2
import numpy as np

from model.prompts import is_dual
from tasks.panels.compose import decode_panel
from tasks.shapes.detector import COLOURS, agreement, asked_shapes, colour_labels, detect_shapes
from tasks.shapes.scenes import KINDS
from tasks.generate.verify import canny_f1, depth_rmse

# metric -> (what it is, "higher"/"lower" is better)
METRICS = {
    "canny_f1": ("canny F1, control map vs edges of the generated panel", "higher"),
    "depth_rmse": ("depth RMSE vs the exact depth (both scaled to [0, 1])", "lower"),
    "caption_colour": ("share of the asked colours present", "higher"),
    "caption_shape": ("share of the asked colour+shape present", "higher"),
}
PAPER = {("canny_f1", "control:canny"): "0.49 (7B, real photos)"}  # issue 8, from the paper's Table 5
_SHAPES_SOURCE = re.compile(r"(?:^|:)shapes:(\d+):")  # generate's shapes rows: generated:shapes:<seed>:<task>


# ---------------------------------------------------------------------------------------------
# Per-row figures


def scene_of(row: dict):
    """The shapes scene a generated row was made from (re-rendered from its seed at the panel's
    size), or None when the row does not come from the shapes source."""
    from tasks.shapes.scenes import render_scene

    m = _SHAPES_SOURCE.search(row.get("source") or "")
    if not m:
        return None
    height = row["height"] // 2 if is_dual(row["task"]) else row["height"]
    return render_scene(int(m.group(1)), row["width"], height)


def shapes_depth(image: np.ndarray, scene) -> np.ndarray:
    """uint8 depth map (near bright) of a picture of `scene`: each of the scene's colours found in
    the picture gets its shape's z, everything else the background plane (tasks/shapes/scenes.py)."""
    from tasks.shapes.scenes import BG_DEPTH

    h, w = image.shape[:2]
    depth = np.linspace(BG_DEPTH[0], BG_DEPTH[1], h, dtype=np.float32)[:, None].repeat(w, 1)
    labels = colour_labels(image)
    for s in sorted(scene.shapes, key=lambda s: -s["z"]):  # far first, as the renderer paints
        depth[labels == COLOURS.index(s["colour"])] = s["z"]
    return np.round(255 * (1 - depth)).astype(np.uint8)


def caption_of(row: dict) -> str:
    """What the user asked for: the caption before any prompt rewriting."""
    params = json.loads(row.get("params") or "{}")
    return params.get("input_caption") or row.get("caption") or ""


def shows_scene(task: str) -> bool:
    """Whether a task's generated picture should show the caption's scene (t2i, control:*)."""
    return task == "t2i" or task.startswith("control:")


def generated_picture(row: dict) -> np.ndarray:
    """The picture the model drew: the whole image for t2i, else the lower panel."""
    return decode_panel(row["upper"] if row.get("lower") is None else row["lower"])


def _fit(picture: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A partner's picture at this row's size (rows of another task may differ in size)."""
    if picture.shape[:2] == like.shape[:2]:
        return picture
    return cv2.resize(picture, (like.shape[1], like.shape[0]), interpolation=cv2.INTER_AREA)


class RowScorer:
    """Figures of one row against its own inputs and against its partner's picture (the floor)."""

    def __init__(self, evaluate_cfg: dict, depth_estimator: Callable | None = None):
        self.low, self.high = evaluate_cfg["canny_low"], evaluate_cfg["canny_high"]
        self.min_frac = evaluate_cfg["min_shape_frac"]
        self.estimator = depth_estimator

    def __call__(self, row: dict, partner: dict | None) -> list[dict]:
        task = row["task"]
        upper = decode_panel(row["upper"])
        picture = generated_picture(row)
        other = _fit(generated_picture(partner), picture) if partner is not None else None
        out: list[dict] = []

        def add(metric: str, fn: Callable[[np.ndarray], float | None]) -> None:
            value = fn(picture)
            if value is None:
                return
            floor = fn(other) if other is not None else None
            out.append({"id": row["id"], "task": task, "metric": metric, "value": value, "floor": floor})

        if task == "control:canny":
            add("canny_f1", lambda pic: canny_f1(upper, pic, self.low, self.high))
        elif task == "dense:canny":
            add("canny_f1", lambda pic: canny_f1(pic, upper, self.low, self.high))
        elif task in ("control:depth", "dense:depth"):
            scene = scene_of(row)
            if task == "control:depth" and scene is not None and np.array_equal(scene.depth_vis, upper[..., 0]):
                add("depth_rmse", lambda pic: depth_rmse(shapes_depth(pic, scene), upper))
            elif task == "control:depth" and self.estimator is not None:
                add("depth_rmse", lambda pic: depth_rmse(self.estimator(pic), upper))
            elif task == "dense:depth" and scene is not None and np.array_equal(scene.image, upper):
                add("depth_rmse", lambda pic: depth_rmse(pic, scene.depth_vis))
        asked = asked_shapes(caption_of(row))
        if asked and shows_scene(task):
            found: dict[int, tuple[float, float]] = {}  # one detection per picture for both figures

            def agree(pic: np.ndarray, i: int) -> float:
                if id(pic) not in found:
                    found[id(pic)] = agreement(detect_shapes(pic, self.min_frac), asked)
                return found[id(pic)][i]

            add("caption_colour", lambda pic: agree(pic, 0))
            add("caption_shape", lambda pic: agree(pic, 1))
        return out


class KindCounts:
    """Outcomes of asked shapes, pooled by asked kind (tasks/evaluate/kinds.py, report.md): each is
    drawn, in its colour as another kind (which: the largest region of that colour), or its colour
    is missing. min_frac: evaluate.min_shape_frac."""

    def __init__(self):
        self.asked: Counter = Counter()
        self.drawn: Counter = Counter()
        self.colour_only: Counter = Counter()
        self.drawn_as: dict[str, Counter] = {k: Counter() for k in KINDS}

    def add(self, picture: np.ndarray, asked: list[tuple[str, str]], min_frac: float = 0.004) -> list[str | None]:
        """Count one picture's asked shapes; returns, for each, the kind it is read as (the asked
        kind when drawn) or None when its colour is missing."""
        found = detect_shapes(picture, min_frac)
        pairs = {(d.colour, d.kind) for d in found}
        read_as = []
        for colour, kind in asked:
            self.asked[kind] += 1
            if (colour, kind) in pairs:
                self.drawn[kind] += 1
                read_as.append(kind)
                continue
            same_colour = [d for d in found if d.colour == colour]
            read_as.append(max(same_colour, key=lambda d: d.area).kind if same_colour else None)
            if same_colour:
                self.colour_only[kind] += 1
                self.drawn_as[kind][read_as[-1]] += 1
        return read_as

    def table(self) -> dict[str, dict]:
        out = {}
        for kind in KINDS:
            n = self.asked[kind]
            if not n:
                continue
            out[kind] = {"asked": n, "drawn": round(self.drawn[kind] / n, 4),
                         "colour_only": round(self.colour_only[kind] / n, 4),
                         "colour_missing": round((n - self.drawn[kind] - self.colour_only[kind]) / n, 4),
                         "drawn_as": dict(self.drawn_as[kind].most_common())}
        n = sum(self.asked.values())
        out["all"] = {"asked": n, "drawn": round(sum(self.drawn.values()) / n, 4) if n else 0.0}
        return out


_COLUMNS = ["id", "task", "upper", "lower", "caption", "params", "source", "width", "height"]


def asking_rows(ds, tasks: tuple[str, ...], limit: int | None = None):
    """(row, asked shapes) of a GENERATED dataset's rows of `tasks` whose caption asks for shapes,
    in the dataset's order; `limit`: only the first that many rows of those tasks are read."""
    task_column = ds.table(columns=["task"]).column("task").to_pylist()
    wanted = [i for i, task in enumerate(task_column) if task in tasks][:limit]
    if not wanted:
        return
    for row in ds.take(wanted, columns=_COLUMNS).to_pylist():
        asked = asked_shapes(caption_of(row))
        if asked:
            yield row, asked
