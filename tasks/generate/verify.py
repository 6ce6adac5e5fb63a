"""Verifiers for best-of-N and the quality filter of bulk generation (paper 4.3.1, Table 5).

    python -m tasks.generate.verify CONTROL.png GENERATED.png      # prints the canny F1 of a pair

A verifier scores a generated pair from its upper and lower panels; best-of-N keeps the best of
N samples and a threshold sends weak pairs to rejects. Offline verifiers need no downloaded
weights: canny F1 (the control map against the same map recomputed from the generated image,
as the paper's Table 5) and depth RMSE when a depth estimator is configured. Learned scorers
plug in as entry points of an installed package, named in `generate.scorer` (tasks/plugins.py).
The evaluation step (issue 8) reuses canny_edges, binary_f1, canny_f1 and depth_rmse.
"""
from __future__ import annotations

from typing import Callable, Protocol

import cv2
import numpy as np


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 [H,W] from uint8 [H,W] or [H,W,3] RGB."""
    image = np.asarray(image)
    if image.ndim == 3:
        return cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    return image.astype(np.uint8, copy=False)


def canny_edges(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Boolean edge map [H,W] of an RGB uint8 image: the panels' own canny annotator."""
    from tasks.panels.annotators import canny

    return canny(np.ascontiguousarray(np.asarray(image)[..., :3]), low, high) > 0


def binary_map(image: np.ndarray) -> np.ndarray:
    """Boolean map [H,W] of a drawn edge map (white edges on black), as stored in an upper panel."""
    return to_gray(image) > 127


def binary_f1(pred: np.ndarray, target: np.ndarray) -> float:
    """Pixel F1 between two boolean maps; 1.0 when both are empty (nothing to find, nothing found)."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    if pred.shape != target.shape:
        raise ValueError(f"maps differ in shape: {pred.shape} vs {target.shape}")
    tp = np.count_nonzero(pred & target)
    n_pred, n_target = np.count_nonzero(pred), np.count_nonzero(target)
    if n_pred == 0 and n_target == 0:
        return 1.0
    return 2.0 * tp / (n_pred + n_target)


def canny_f1(control: np.ndarray, image: np.ndarray, low: int = 100, high: int = 200) -> float:
    """Table 5's canny F1: the edge map `control` against canny recomputed from `image`."""
    return binary_f1(canny_edges(image, low, high), binary_map(control))


def depth_rmse(pred: np.ndarray, target: np.ndarray) -> float:
    """RMSE of two depth maps after scaling each to [0, 1] (relative depth, as estimators give)."""

    def norm(d: np.ndarray) -> np.ndarray:
        d = to_gray(d).astype(np.float64) if np.asarray(d).dtype == np.uint8 else np.asarray(d, np.float64)
        lo, hi = d.min(), d.max()
        return (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)

    a, b = norm(pred), norm(target)
    if a.shape != b.shape:
        raise ValueError(f"depth maps differ in shape: {a.shape} vs {b.shape}")
    return float(np.sqrt(np.mean((a - b) ** 2)))


class Scorer(Protocol):
    """A verifier: scores a pair given its task, upper and lower panels (uint8 [H,W,3])."""

    name: str
    higher_is_better: bool

    def applies(self, task: str) -> bool: ...

    def score(self, task: str, upper: np.ndarray, lower: np.ndarray, caption: str) -> float: ...


class CannyF1:
    """control:canny -> F1(upper map, canny(lower)); dense:canny -> F1(lower map, canny(upper))."""

    name = "canny_f1"
    higher_is_better = True

    def __init__(self, low: int = 100, high: int = 200):
        self.low, self.high = low, high

    def applies(self, task: str) -> bool:
        return task in ("control:canny", "dense:canny")

    def score(self, task: str, upper: np.ndarray, lower: np.ndarray, caption: str = "") -> float:
        if task == "control:canny":
            return canny_f1(upper, lower, self.low, self.high)
        return canny_f1(lower, upper, self.low, self.high)


class DepthRMSE:
    """control:depth -> RMSE(upper map, depth(lower)); dense:depth -> RMSE(lower map, depth(upper))."""

    name = "depth_rmse"
    higher_is_better = False

    def __init__(self, estimator: Callable[[np.ndarray], np.ndarray]):
        self.estimator = estimator

    def applies(self, task: str) -> bool:
        return task in ("control:depth", "dense:depth")

    def score(self, task: str, upper: np.ndarray, lower: np.ndarray, caption: str = "") -> float:
        if task == "control:depth":
            return depth_rmse(self.estimator(lower), upper)
        return depth_rmse(lower, self.estimator(upper))


def make_scorers(cfg) -> list[Scorer]:
    """The scorers named by cfg.generate.scorer: 'auto' (canny F1, plus depth RMSE when
    cfg.generate.depth_estimator names an estimator), 'none', a built-in name, or the name of an
    entry point in the 'panelforge.scorers' group (tasks/plugins.py)."""
    from tasks.plugins import BUILTIN_SCORERS, load_estimator_factory, load_scorer_factory

    gen = cfg.generate
    names = [s.strip() for s in str(gen.scorer).split(",") if s.strip()]
    scorers: list[Scorer] = []
    for name in names:
        if name == "none":
            continue
        if name in ("auto", "canny_f1"):
            scorers.append(CannyF1(cfg.evaluate.canny_low, cfg.evaluate.canny_high))
        if name in ("auto", "depth_rmse") and gen.depth_estimator:
            scorers.append(DepthRMSE(load_estimator_factory(gen.depth_estimator)(cfg)))
        elif name == "depth_rmse":
            raise ValueError("generate.scorer=depth_rmse needs generate.depth_estimator (a registered estimator)")
        if name not in BUILTIN_SCORERS:
            scorers.append(load_scorer_factory(name)(cfg))
    return scorers


def scorer_for(scorers: list[Scorer], task: str) -> Scorer | None:
    return next((s for s in scorers if s.applies(task)), None)


def passes(scorer: Scorer, score: float, thresholds: dict[str, float]) -> bool:
    """Whether `score` meets the threshold configured for this scorer (none configured: it does)."""
    thr = thresholds.get(scorer.name)
    if thr is None:
        return True
    return score >= thr if scorer.higher_is_better else score <= thr


def best_index(scorer: Scorer, scores: list[float]) -> int:
    """Index of the best score (the first one on ties, so the choice is deterministic)."""
    arr = np.asarray(scores, dtype=np.float64)
    return int(np.argmax(arr) if scorer.higher_is_better else np.argmin(arr))


def main() -> None:
    import sys

    from PIL import Image

    control, generated = (np.asarray(Image.open(p).convert("RGB")) for p in sys.argv[1:3])
    print(f"canny F1 = {canny_f1(control, generated):.4f}")


if __name__ == "__main__":
    main()
