"""Resolution buckets (FP-SFT): pytest -q tests/model/test_buckets.py"""
import pytest

from model.buckets import buckets_for, closest_bucket, panel_size


@pytest.mark.parametrize("stage", [64, 128, 256, 512, 768])
def test_buckets_are_about_equal_area_multiples_of_32(stage):
    bs = buckets_for(stage)
    assert (stage, stage) in bs
    for w, h in bs:
        assert w % 32 == 0 and h % 32 == 0
        assert 0.75 * stage * stage <= w * h <= stage * stage
        assert max(w, h) / min(w, h) <= 4.0
    ratios = [w / h for w, h in bs]
    assert ratios == sorted(ratios) and len(set(bs)) == len(bs)
    assert (bs[0][1], bs[0][0]) == bs[-1]  # symmetric: the tallest is the widest turned


def test_closest_bucket_follows_aspect_ratio():
    assert closest_bucket(1000, 1000, 256) == (256, 256)
    w, h = closest_bucket(1600, 900, 512)
    assert w > h and abs(w / h - 16 / 9) < 0.15
    w, h = closest_bucket(900, 1600, 512)
    assert h > w and abs(h / w - 16 / 9) < 0.15
    assert closest_bucket(10000, 10, 256) == buckets_for(256)[-1]  # extreme: clamps to the widest


def test_dual_bucket_holds_two_panels_of_the_image_aspect():
    # A square photo becomes one panel: the whole image is about 1:2 and each half about square.
    b = closest_bucket(640, 640, 256, dual=True)
    pw, ph = panel_size(b, dual=True)
    assert b[1] > b[0] and abs(pw / ph - 1.0) < 0.3
    # A 2:1 photo fits a square dual panel exactly (the release's 768x768 = two 768x384 panels).
    assert closest_bucket(1536, 768, 768, dual=True) == (768, 768)
    assert panel_size((768, 768), dual=True) == (768, 384)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="multiple of 32"):
        buckets_for(100)
    with pytest.raises(ValueError, match="positive"):
        closest_bucket(0, 10, 256)
