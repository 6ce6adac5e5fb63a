"""Finds the coloured shapes of a shapes-style picture: OpenCV colour segmentation + contour analysis.

    python -m tasks.shapes.detector picture.png "a large red star at the top left on a plain grey background"

Used by the evaluation (tasks/evaluate/job.py) to measure how often a generated picture holds the
colour and the shape its caption asks for, and where each colour lies (the shapes depth estimate).
It needs no learned weights: the shapes source draws saturated palette colours on muted
backgrounds (tasks/shapes/scenes.py), so
- every pixel takes the nearest of the palette colours and the background colours (at several
  brightnesses, for the textures) in CIE Lab, through a 64^3 lookup table built once;
- each palette colour's connected regions (after a 3x3 opening) larger than `min_frac` of the
  picture are candidate shapes;
- a region's outline is re-traced on its crop upscaled to about 96 px, so anti-aliased edges of a
  small shape still give its form, and the outline's (bounding-box fill, log aspect, solidity,
  circularity) is matched to the nearest of the six kinds' templates, drawn by the renderer itself.
Its accuracy on rendered scenes is measured in tests/tasks/test_evaluate.py.
"""
from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass

import cv2
import numpy as np

from tasks.shapes.scenes import BACKGROUNDS, KINDS, PALETTE, render_spec, sample_background

COLOURS = tuple(PALETTE)
_LEVELS = 64  # lookup-table cells per channel (4 RGB values each)
_UPSCALE_TO = 96  # pixels across a region's crop before its outline is traced
_WEIGHTS = np.array([3.0, 2.0, 3.0, 2.0])  # fill, log aspect, solidity, circularity
_CAPTION_SHAPE = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(KINDS) + r")s?\b")


@dataclass
class Detection:
    colour: str
    kind: str
    area: float  # pixels
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1
    contour: np.ndarray  # [N, 1, 2] int32, in picture coordinates


def _lab(rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(rgb, np.float32).reshape(-1, 1, 3) / 255.0  # float input: full-precision Lab
    return cv2.cvtColor(arr, cv2.COLOR_RGB2LAB).reshape(-1, 3)


@functools.lru_cache(maxsize=1)
def _lookup() -> np.ndarray:
    """uint8 [64, 64, 64]: RGB cell -> palette index, or 255 for background."""
    refs = [PALETTE[c] for c in COLOURS]
    # Textures move a background's brightness by up to ~35 (tasks/shapes/scenes.py _background).
    refs += [np.clip(np.asarray(rgb) + d, 0, 255) for rgb in BACKGROUNDS.values() for d in range(-40, 41, 10)]
    ref_lab = _lab(np.asarray(refs))
    axis = (np.arange(_LEVELS) * (256 // _LEVELS) + (256 // _LEVELS) / 2).astype(np.float32)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    lab = _lab(grid)
    w = np.array([0.5, 1.0, 1.0], np.float32)  # lightness counts half: shading must not change a colour
    a, b = lab * w, ref_lab * w
    dist = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]
    nearest = dist.argmin(1)
    table = np.where(nearest < len(COLOURS), nearest, 255).astype(np.uint8)
    return table.reshape(_LEVELS, _LEVELS, _LEVELS)


def colour_labels(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W]: each pixel's palette index (tasks.shapes.scenes.PALETTE order), 255 for background."""
    img = np.asarray(image)[..., :3]
    q = (img // (256 // _LEVELS)).astype(np.intp)
    return _lookup()[q[..., 0], q[..., 1], q[..., 2]]


def colour_mask(image: np.ndarray, colour: str, labels: np.ndarray | None = None) -> np.ndarray:
    """uint8 0/1 [H, W]: where `colour` is, after a 3x3 opening (removes stray edge pixels)."""
    labels = colour_labels(image) if labels is None else labels
    mask = (labels == COLOURS.index(colour)).astype(np.uint8)
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))


def outline_features(contour: np.ndarray) -> np.ndarray:
    """(bounding-box fill, log aspect w/h, solidity, circularity) of a closed outline."""
    area = cv2.contourArea(contour)
    _, _, w, h = cv2.boundingRect(contour)
    hull = cv2.contourArea(cv2.convexHull(contour))
    perimeter = cv2.arcLength(contour, True)
    return np.array([area / max(w * h, 1), np.log(max(w, 1) / max(h, 1)), area / max(hull, 1e-6),
                     4 * np.pi * area / max(perimeter * perimeter, 1e-6)])


@functools.lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    """Each kind's outline features, from the renderer itself (one large shape on plain grey)."""
    bg = sample_background(np.random.default_rng(0), colour="grey", texture="plain")
    out = {}
    for kind in KINDS:
        spec = {"seed": 0, "background": bg, "shapes": [
            {"kind": kind, "colour": "red", "size_word": "large", "r": 0.3, "row": 1, "col": 1,
             "cx": 0.5, "cy": 0.5, "z": 0.4}]}
        scene = render_spec(spec, 128, 128)
        contours, _ = cv2.findContours((scene.labels > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        out[kind] = outline_features(max(contours, key=cv2.contourArea))
    return out


def classify_outline(contour: np.ndarray) -> str:
    f = outline_features(contour)
    return min(_templates().items(), key=lambda kv: float((((f - kv[1]) * _WEIGHTS) ** 2).sum()))[0]


def detect_shapes(image: np.ndarray, min_frac: float = 0.004) -> list[Detection]:
    """The palette-coloured regions of a picture, each with its colour and its nearest kind."""
    img = np.ascontiguousarray(np.asarray(image)[..., :3])
    labels = colour_labels(img)
    height, width = labels.shape
    min_area = min_frac * height * width
    found = []
    for index, colour in enumerate(COLOURS):
        if not (labels == index).any():
            continue
        mask = colour_mask(img, colour, labels)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        for contour in contours:
            area = cv2.contourArea(contour)
            if area < min_area:
                continue
            x, y, w, h = cv2.boundingRect(contour)
            x0, y0, x1, y1 = max(x - 2, 0), max(y - 2, 0), min(x + w + 2, width), min(y + h + 2, height)
            scale = max(1, int(np.ceil(_UPSCALE_TO / max(w, h))))
            crop = cv2.resize(img[y0:y1, x0:x1], ((x1 - x0) * scale, (y1 - y0) * scale), interpolation=cv2.INTER_LINEAR)
            fine, _ = cv2.findContours((colour_labels(crop) == index).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
            outline = max(fine, key=cv2.contourArea) if fine else contour
            found.append(Detection(colour, classify_outline(outline), float(area), (x, y, x + w, y + h), contour))
    return found


def asked_shapes(caption: str) -> list[tuple[str, str]]:
    """(colour, kind) pairs a shapes caption asks for, in order ('a small red star ...')."""
    return [(m.group(1), m.group(2)) for m in _CAPTION_SHAPE.finditer(caption.lower())]


def agreement(detections: list[Detection], asked: list[tuple[str, str]]) -> tuple[float, float] | None:
    """(share of asked colours present, share of asked colour+kind present); None when nothing is asked."""
    if not asked:
        return None
    colours = {d.colour for d in detections}
    pairs = {(d.colour, d.kind) for d in detections}
    return (sum(c in colours for c, _ in asked) / len(asked), sum(p in pairs for p in asked) / len(asked))


def main(argv: list[str]) -> None:
    from PIL import Image

    image = np.asarray(Image.open(argv[0]).convert("RGB"))
    for d in detect_shapes(image):
        print(f"{d.colour:7s} {d.kind:8s} area {d.area:6.0f} bbox {d.bbox}")
    if len(argv) > 1:
        print("asked", asked_shapes(argv[1]), "agreement (colour, colour+kind):", agreement(detect_shapes(image), asked_shapes(argv[1])))


if __name__ == "__main__":
    main(sys.argv[1:])
