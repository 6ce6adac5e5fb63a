"""Verifiers: canny F1 (paper Table 5), depth RMSE, best-of-N choice and thresholds."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from tasks.config import load_config
from tasks.generate.verify import (
    CannyF1, DepthRMSE, best_index, binary_f1, canny_edges, canny_f1, depth_rmse, make_scorers, passes, scorer_for,
)


def _scene(shift: int = 0, size: int = 96) -> np.ndarray:
    img = np.full((size, size, 3), 40, np.uint8)
    cv2.rectangle(img, (20 + shift, 20), (60 + shift, 70), (230, 60, 60), -1)
    cv2.circle(img, (70, 40 + shift), 12, (60, 200, 90), -1)
    return img


def _as_map(edges: np.ndarray) -> np.ndarray:
    return np.repeat(edges[..., None].astype(np.uint8) * 255, 3, axis=2)


def test_binary_f1_counts():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert binary_f1(a, b) == 1.0
    a[0, :2] = True  # 2 predicted
    b[0, 1:4] = True  # 3 true, 1 overlap -> 2*1/(2+3)
    assert binary_f1(a, b) == pytest.approx(0.4)
    assert binary_f1(a, np.zeros((4, 4), bool)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        binary_f1(a, np.zeros((3, 4), bool))


def test_canny_f1_is_one_for_the_same_image_and_falls_with_disagreement():
    img = _scene()
    control = _as_map(canny_edges(img))
    assert canny_f1(control, img) == pytest.approx(1.0)
    shifted = canny_f1(control, _scene(shift=6))
    flat = canny_f1(control, np.full_like(img, 90))
    assert 0.0 < shifted < 0.8 and flat == 0.0
    noisy = np.clip(img.astype(int) + np.random.default_rng(0).integers(-60, 60, img.shape), 0, 255).astype(np.uint8)
    assert shifted < 1.0 and canny_f1(control, noisy) < 1.0


def test_canny_scorer_covers_control_and_dense_directions():
    img = _scene()
    m = _as_map(canny_edges(img))
    s = CannyF1()
    assert s.applies("control:canny") and s.applies("dense:canny") and not s.applies("t2i")
    assert s.score("control:canny", m, img) == pytest.approx(1.0)  # upper map, lower image
    assert s.score("dense:canny", img, m) == pytest.approx(1.0)  # upper image, lower map
    assert s.score("dense:canny", img, np.zeros_like(m)) == 0.0


def test_depth_rmse_and_its_scorer():
    yy = np.linspace(0, 1, 32)[:, None] * np.ones((1, 32))
    assert depth_rmse(yy, yy * 3 + 1) == pytest.approx(0.0)  # relative depth: scale and shift free
    assert depth_rmse(yy, 1 - yy) == pytest.approx(np.sqrt(np.mean((2 * yy - 1) ** 2)))
    s = DepthRMSE(lambda image: image[..., 0].astype(np.float32))  # a stand-in estimator: red = depth
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0] = (yy * 255).astype(np.uint8)
    depth_map = np.repeat((yy * 255).astype(np.uint8)[..., None], 3, axis=2)
    assert s.score("control:depth", depth_map, img) == pytest.approx(0.0, abs=1e-6)
    assert s.score("control:depth", depth_map[::-1], img) > 0.5


def test_best_of_and_thresholds_respect_direction():
    f1, rmse = CannyF1(), DepthRMSE(lambda x: x)
    assert best_index(f1, [0.2, 0.7, 0.7, 0.1]) == 1
    assert best_index(rmse, [0.2, 0.05, 0.3]) == 1
    assert passes(f1, 0.3, {"canny_f1": 0.25}) and not passes(f1, 0.2, {"canny_f1": 0.25})
    assert passes(rmse, 0.1, {"depth_rmse": 0.2}) and not passes(rmse, 0.3, {"depth_rmse": 0.2})
    assert passes(f1, 0.0, {})


def test_make_scorers_from_config():
    cfg = load_config(None, ["generate.scorer=auto"])
    scorers = make_scorers(cfg)
    assert [s.name for s in scorers] == ["canny_f1"]  # no depth estimator configured
    assert scorer_for(scorers, "control:canny").name == "canny_f1" and scorer_for(scorers, "control:depth") is None
    assert make_scorers(load_config(None, ["generate.scorer=none"])) == []
    # A config names no code to import: a module:factory outside the registry (tasks/plugins.py) is
    # refused by the config's validation, before anything would import it.
    with pytest.raises(ValueError, match="not a registered depth estimator"):
        load_config(None, ["generate.scorer=auto", "generate.depth_estimator=tasks.generate.verify:to_gray_factory_missing"])
    with pytest.raises(ValueError, match="depth_estimator"):
        make_scorers(load_config(None, ["generate.scorer=depth_rmse"]))
