"""Resolution buckets of a training stage: about equal area, different aspect ratios, sides x32.

    python -c "from model.buckets import buckets_for, closest_bucket; print(buckets_for(256)); print(closest_bucket(640, 480, 256))"

Lumina-mGPT's FP-SFT (v1 paper, section 3.2) gives each stage a set of candidate resolutions of
about the stage's area (stage_px^2) and sends every image to the one whose aspect ratio is closest,
then resizes it to cover that size and centre-crops. Sides are multiples of 32 because the size
tokens name h/32 and w/32 (REFERENCE.md, "Sequence layout"). Used by panels, tokenize and train.
"""
from __future__ import annotations

from functools import lru_cache

PATCH = 32  # pixels per size-token unit
MAX_RATIO = 4.0  # the release's crop-size list stops at 1:4 and 4:1
MIN_AREA = 0.75  # a bucket keeps at least 3/4 of the stage's area ("about equal area")


@lru_cache(maxsize=None)
def _buckets(stage_px: int, max_ratio: float, min_area: float) -> tuple[tuple[int, int], ...]:
    if stage_px < PATCH or stage_px % PATCH:
        raise ValueError(f"stage size {stage_px} px: expected a positive multiple of {PATCH}")
    n = (stage_px // PATCH) ** 2  # the stage's area in 32x32 patches
    found: set[tuple[int, int]] = set()
    for a in range(1, n + 1):
        b = n // a  # the longest other side that keeps the area within the stage's
        for wp, hp in ((a, b), (b, a)):
            if max(wp, hp) / min(wp, hp) <= max_ratio and wp * hp >= min_area * n:
                found.add((wp * PATCH, hp * PATCH))
    return tuple(sorted(found, key=lambda s: (s[0] / s[1], s[0])))


def buckets_for(stage_px: int, max_ratio: float = MAX_RATIO, min_area: float = MIN_AREA) -> list[tuple[int, int]]:
    """(width, height) buckets of one stage, sorted from tallest to widest."""
    return list(_buckets(int(stage_px), float(max_ratio), float(min_area)))


def closest_bucket(width: int, height: int, stage_px: int, *, dual: bool = False) -> tuple[int, int]:
    """The bucket (whole-image width, height) whose aspect ratio is closest to width x height.

    dual=True: the image becomes ONE panel of a dual panel, so the whole image holds two of it
    stacked (width x 2*height); each panel of the returned bucket is (w, h // 2).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height}: both sides must be positive")
    want = width / (2 * height if dual else height)

    # FP-SFT's score: the smaller over the larger of the two ratios (1.0 = same aspect).
    def score(b: tuple[int, int]) -> tuple[float, int]:
        r = b[0] / b[1]
        return (min(r, want) / max(r, want), b[0] * b[1])

    return max(buckets_for(stage_px), key=score)


def panel_size(bucket: tuple[int, int], dual: bool) -> tuple[int, int]:
    """(width, height) of each panel of a bucket: the whole image, or its upper/lower half."""
    w, h = bucket
    return (w, h // 2) if dual else (w, h)
