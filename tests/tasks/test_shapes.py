"""The synthetic shapes source: pytest -q tests/tasks/test_shapes.py"""
import random

import cv2
import numpy as np
import pytest

from tasks.shapes.scenes import (COUNT_WORDS, EDIT_OPS, KINDS, PALETTE, caption_of, edit_pair, render_scene,
                          render_spec, subject_pair)


def test_same_seed_same_scene_and_no_global_rng():
    np.random.seed(1)
    random.seed(1)
    a = render_scene(5, 96, 64)
    np.random.seed(2)
    random.seed(2)
    b = render_scene(5, 96, 64)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.depth, b.depth)
    assert a.caption == b.caption and a.shapes == b.shapes
    assert a.image.dtype == np.uint8 and a.image.shape == (64, 96, 3)
    assert a.depth.dtype == np.float32 and a.depth.shape == (64, 96)
    assert not np.array_equal(render_scene(6, 96, 64).image, a.image)


def test_one_seed_is_one_scene_at_any_size():
    small, big = render_scene(11, 64, 64), render_scene(11, 256, 256)
    assert small.caption == big.caption
    for s, b in zip(small.shapes, big.shapes):
        assert (s["kind"], s["colour"], s["cell"]) == (b["kind"], b["colour"], b["cell"])
        assert b["centre"][0] == pytest.approx(4 * s["centre"][0])
    down = big.image.reshape(64, 4, 64, 4, 3).mean((1, 3))
    assert np.abs(down - small.image).mean() < 6  # the same picture, not just the same caption


@pytest.mark.parametrize("seed", range(40))
def test_truth_matches_pixels_and_caption(seed):
    scene = render_scene(seed, 128, 128)
    assert 1 <= len(scene.shapes) <= 3
    colours = [s["colour"] for s in scene.shapes]
    assert len(set(colours)) == len(colours)  # so 'the red circle' names one shape
    cap = scene.caption
    if len(scene.shapes) > 1:
        assert cap.startswith(COUNT_WORDS[len(scene.shapes)] + " shapes")
    for i, s in enumerate(scene.shapes):
        assert s["kind"] in KINDS and f"{s['colour']} {s['kind']} {s['position']}" in cap
        visible = scene.labels == i + 1
        # Large shapes: even a partly covered one keeps a real visible part.
        assert visible.sum() > 0.01 * 128 * 128
        # The exact depth is the shape's z wherever it is visible, and its colour is there too.
        assert np.all(scene.depth[visible] == np.float32(s["z"]))
        inner = cv2.erode(visible.astype(np.uint8), np.ones((5, 5), np.uint8), borderValue=0).astype(bool)
        assert np.abs(scene.image[inner].astype(int) - PALETTE[s["colour"]]).max() <= 1
        x0, y0, x1, y1 = s["bbox"]
        ys, xs = np.nonzero(visible)
        assert x0 <= xs.min() and xs.max() < x1 + 1 and y0 <= ys.min() and ys.max() < y1 + 1
    bg = scene.labels == 0
    assert scene.depth[bg].min() >= 0.85 and np.all(scene.depth[~bg] < 0.85)
    # Near is bright in the visualisation, as depth estimators draw it.
    if scene.shapes:
        assert scene.depth_vis[~bg].mean() > scene.depth_vis[bg].mean()


def test_nearer_shape_occludes_farther():
    overlaps = 0
    for seed in range(40):
        scene = render_scene(seed, 128, 128, count=3)
        spec = scene.spec
        # Each shape's full outline: the same shape rendered alone.
        full = [render_spec(dict(spec, shapes=[s]), 128, 128).labels == 1 for s in spec["shapes"]]
        for i in range(3):
            for j in range(3):
                both = full[i] & full[j]
                if i < j and both.any():
                    overlaps += 1
                    near = i if spec["shapes"][i]["z"] < spec["shapes"][j]["z"] else j
                    assert np.all(scene.labels[both] == near + 1)
                    assert np.all(scene.depth[both] == np.float32(spec["shapes"][near]["z"]))
        zs = sorted(s["z"] for s in scene.shapes)
        assert all(b - a >= 0.08 - 1e-9 for a, b in zip(zs, zs[1:]))
    assert overlaps > 0  # the layouts do produce occlusions to learn from


@pytest.mark.parametrize("op", EDIT_OPS)
def test_edit_pairs_change_what_the_instruction_says(op):
    for seed in range(12):
        pair = edit_pair(seed, 96, 96, op=op)
        src, tgt = pair.source.shapes, pair.target.shapes
        assert pair.op == op and pair.instruction
        assert pair.source.background == pair.target.background
        key = lambda s: (s["colour"], s["kind"])
        if op == "add":
            assert len(tgt) == len(src) + 1 and pair.instruction.startswith("add a ")
            new = tgt[-1]
            assert f"{new['colour']} {new['kind']} {new['position']}" in pair.instruction
        elif op == "remove":
            assert len(tgt) == len(src) - 1
            gone = set(map(key, src)) - set(map(key, tgt))
            assert len(gone) == 1 and pair.instruction == "remove the {} {}".format(*gone.pop())
        else:
            assert len(tgt) == len(src)
            changed = [(a, b) for a, b in zip(src, tgt) if a != b]
            assert len(changed) == 1
            a, b = changed[0]
            assert f"the {a['colour']} {a['kind']}" in pair.instruction
            if op == "recolour":
                assert b["colour"] != a["colour"] and pair.instruction.endswith(b["colour"])
            elif op == "move":
                assert b["cell"] != a["cell"] and b["position"].split(" ", 1)[1] in pair.instruction
            else:
                assert b["size_word"] != a["size_word"]
                assert pair.instruction.endswith("bigger" if b["size"] > a["size"] else "smaller")
        assert not np.array_equal(pair.source.image, pair.target.image)
        assert pair.target.caption == caption_of(pair.target.spec)


def test_edit_pairs_are_deterministic_and_mix_ops():
    a, b = edit_pair(3, 64, 64), edit_pair(3, 64, 64)
    assert a.instruction == b.instruction and np.array_equal(a.target.image, b.target.image)
    assert len({edit_pair(s, 32, 32).op for s in range(30)}) == len(EDIT_OPS)


def test_subject_pair_shows_the_same_object_in_a_new_scene():
    for seed in range(10):
        p = subject_pair(seed, 96, 96)
        (alone,) = p.subject.shapes
        assert p.description == f"a {alone['colour']} {alone['kind']}"
        assert alone["position"] == "in the center" and p.subject.background["texture"] == "plain"
        assert any((s["colour"], s["kind"]) == (alone["colour"], alone["kind"]) for s in p.scene.shapes)
        assert tuple(p.subject.image[48, 48]) == PALETTE[alone["colour"]]


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="too small"):
        render_scene(0, 4, 4)
    with pytest.raises(ValueError, match="unknown edit op"):
        edit_pair(0, 64, 64, op="explode")
    with pytest.raises(ValueError, match="outside 0..3"):
        render_scene(0, 64, 64, count=5)
