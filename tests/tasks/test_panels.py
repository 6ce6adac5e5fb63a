"""Panel composition, decoding, annotators, task mix: pytest -q tests/tasks/test_panels.py"""
import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from model.prompts import render_prompt
from storage import open_dataset
from tasks.panels.annotators import Annotators, canny, soft_edge
from tasks.panels.job import PanelMaker, effective_mix, list_units, pick_task, run_build
from tasks.config import PanelsConfig, load_config
from tasks.panels.compose import Reject, decode_image, decode_panel, encode_image, fit, panel_row
from tasks.shapes.scenes import render_scene


def _png(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_fit_covers_then_centre_crops():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 90:110] = 255  # a bar in the middle must stay in the middle
    out = fit(img, (64, 64), "x.png")
    assert out.shape == (64, 64, 3)
    cols = np.nonzero(out[32, :, 0] > 128)[0]
    assert abs(cols.mean() - 31.5) < 1.5 and 10 <= len(cols) <= 16  # 20 px * 0.64 scale
    with pytest.raises(Reject) as e:
        fit(img, (256, 256), "x.png")
    assert e.value.reason == "too_small" and "x.png" in e.value.detail and "max_upscale" in e.value.detail
    assert fit(img, (256, 256), "x.png", max_upscale=3.0).shape == (256, 256, 3)


def test_encode_decode_roundtrip_is_lossless_for_png():
    img = render_scene(1, 64, 32).image
    for fmt in ("png", "webp"):
        data = encode_image(img, fmt)
        back = decode_panel(data)
        assert back.shape == img.shape
        if fmt == "png":
            assert np.array_equal(back, img)


def test_panel_row_sizes_are_the_whole_image():
    up, lo = np.zeros((32, 64, 3), np.uint8), np.full((32, 64), 255, np.uint8)
    row = panel_row("a", "control:canny", "p", "c", lo, up, "src", "{}")
    assert (row["width"], row["height"]) == (64, 64)
    assert decode_panel(row["upper"]).shape == (32, 64, 3)  # grey maps are stored as RGB
    row = panel_row("b", "t2i", "p", "c", up, None, "src", "{}")
    assert (row["width"], row["height"], row["lower"]) == (64, 32, None)
    with pytest.raises(ValueError, match="differ in size"):
        panel_row("c", "edit", "p", "c", up, np.zeros((16, 64, 3), np.uint8), "src", "{}")


def test_decode_modes_come_out_uint8_rgb_and_correct():
    grey16 = np.full((40, 40), 65535 // 2, np.uint16)
    ok, buf = cv2.imencode(".png", grey16)
    out = decode_image(buf.tobytes(), "g16.png")
    assert out.dtype == np.uint8 and out.shape == (40, 40, 3) and abs(int(out[0, 0, 0]) - 127) <= 1
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent except one pixel
    rgba[0, 0, 3] = 255
    out = decode_image(_png(rgba, "RGBA"), "a.png")
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[4, 4]) == (255, 255, 255)  # over white
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 255] * 256)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert tuple(decode_image(buf.getvalue(), "p.png")[3, 3]) == (0, 0, 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # cyan 0, magenta+yellow full: red
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=100)
    r, g, b = decode_image(buf.getvalue(), "c.jpg")[4, 4].astype(int)
    assert r > 200 and g < 50 and b < 50


def test_exif_rotation_is_applied():
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40] = (255, 0, 0)  # left half red
    stored[:, 40:] = (0, 0, 255)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=95)
    out = decode_image(buf.getvalue(), "r.jpg")
    assert out.shape == (80, 40, 3)  # portrait, as a viewer shows it
    assert out[5, 20, 0] > 200 and out[75, 20, 2] > 200  # the left (red) half is now on top


@pytest.mark.parametrize(
    "data,reason",
    [(b"", "empty_file"), (b"not an image at all" * 10, "corrupt_image")],
)
def test_unusable_bytes_are_rejects(data, reason):
    with pytest.raises(Reject) as e:
        decode_image(data, "bad.jpg")
    assert e.value.reason == reason and "bad.jpg" in e.value.detail


def test_truncated_and_bomb():
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    ok, jpg = cv2.imencode(".jpg", img)
    with pytest.raises(Reject) as e:
        decode_image(jpg.tobytes()[: len(jpg) // 2], "t.jpg")
    assert e.value.reason == "truncated"
    big = _png(np.zeros((2000, 2000), np.uint8), "L")  # 4 MP in a few KB: a small bomb
    with pytest.raises(Reject) as e:
        decode_image(big, "bomb.png", max_pixels=1_000_000)
    assert e.value.reason == "too_many_pixels" and "2000x2000" in e.value.detail


def test_annotators_draw_the_right_maps():
    scene = render_scene(4, 128, 128)
    edges = canny(scene.image, 100, 200)
    assert edges.dtype == np.uint8 and set(np.unique(edges)) <= {0, 255}
    # Canny edges sit on the outlines of the shapes (label changes), not inside them.
    labels = scene.labels
    boundary = cv2.dilate((cv2.Laplacian(labels.astype(np.float32), cv2.CV_32F) != 0).astype(np.uint8), np.ones((3, 3)))
    on_shapes = edges[(labels > 0) & (boundary == 0)]
    assert on_shapes.mean() < 5  # flat colour inside a shape: no edges
    soft = soft_edge(scene.image)
    assert soft.dtype == np.uint8 and soft[boundary > 0].mean() > 3 * soft[(labels > 0) & (boundary == 0)].mean()
    assert not soft_edge(np.full((32, 32, 3), 90, np.uint8)).any()  # flat image: no edges
    # A green disc on a grey of the same brightness: a grey-level detector would see nothing.
    iso = np.full((64, 64, 3), 140, np.uint8)
    cv2.circle(iso, (32, 32), 16, (40, 170, 70), -1)
    assert canny(iso).sum() // 255 > 60 and soft_edge(iso).max() == 255


def test_task_pick_follows_weights_and_is_stable():
    mix = {"t2i": 2.0, "edit": 1.0, "subject": 1.0}
    picks = [pick_task(i, mix) for i in range(400)]
    assert picks == [pick_task(i, mix) for i in range(400)]
    counts = {t: picks.count(t) for t in mix}
    assert abs(counts["t2i"] - 200) <= 4 and abs(counts["edit"] - 100) <= 4
    assert set(picks[:10]) == set(mix)  # even the first handful holds every task


def test_effective_mix_drops_what_the_source_cannot_make():
    pc = PanelsConfig(tasks={"t2i": 1, "control:depth": 1, "edit": 1, "control:pose": 1})
    ann = Annotators()
    assert set(effective_mix(pc, "shapes", ann)) == {"t2i", "control:depth", "edit"}  # exact depth
    assert set(effective_mix(pc, "folder", ann)) == {"t2i"}  # no depth model, no pose package here
    with pytest.raises(ValueError, match="none of these tasks"):
        effective_mix(PanelsConfig(tasks={"edit": 1}), "folder", ann)
    with pytest.raises(ValueError, match="unknown task"):
        effective_mix(PanelsConfig(tasks={"video": 1}), "shapes", ann)


def test_shapes_rows_for_every_task_kind_are_right(tmp_path):
    pc = PanelsConfig(source={"kind": "shapes", "count": 24, "seed": 3}, stage_size=64)
    maker = PanelMaker(pc.model_dump())
    seen = set()
    for item in maker.source.rows(0, 24):
        row = maker.make(item)
        task, params = row["task"], json.loads(row["params"])
        seen.add(task)
        upper = decode_panel(row["upper"])
        if task == "t2i":
            assert (row["width"], row["height"]) == (64, 64) and row["lower"] is None
            assert row["prompt"].endswith("\n" + row["caption"])
            continue
        lower = decode_panel(row["lower"])
        assert upper.shape == lower.shape == (32, 64, 3) and (row["width"], row["height"]) == (64, 64)
        if task == "control:canny":
            assert np.array_equal(upper[..., 0], canny(lower, pc.canny_low, pc.canny_high))
            assert "<canny edge map>" in row["prompt"]
        elif task == "dense:depth":
            scene = render_scene(params["scene_seed"], 64, 32)
            assert np.array_equal(lower[..., 0], scene.depth_vis) and np.array_equal(upper, scene.image)
        elif task == "edit":
            assert params["instruction"] and row["prompt"].endswith(params["instruction"])
        elif task == "subject":
            assert f"displays: {params['subject']}," in row["prompt"]
        assert row["prompt"] == render_prompt(task, 64, 64, row["caption"], instruction=params.get("instruction"),
                                              subject=params.get("subject"))
    assert seen == set(pc.tasks)


def test_units_cover_every_row_once():
    units = list_units(70, 32)
    assert [(u["start"], u["end"]) for u in units] == [(0, 32), (32, 64), (64, 70)]
    assert [u["unit"] for u in units] == ["00000", "00001", "00002"]


def test_interrupted_build_finishes_only_the_remaining_units(tmp_path):
    over = [f"workdir={tmp_path}", "panels.source.count=40", "panels.rows_per_unit=8", "panels.stage_size=64"]
    cfg = load_config("configs/tiny.yaml", over)
    calls = []

    def stop_after_two(state):
        calls.append(state["units_done"])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")

    with pytest.raises(KeyboardInterrupt):
        run_build(cfg, progress=stop_after_two, use_ray=False)
    ds = open_dataset(tmp_path / "panels")
    assert ds.manifest["status"] == "writing" and len(ds.manifest["units"]) == 2 and len(ds) == 16
    rerun = run_build(cfg, use_ray=False)
    assert (rerun["units_skipped"], rerun["units_run"], rerun["units_total"]) == (2, 3, 5)
    assert rerun["rows_out"] == 40 and rerun["balanced"]
    ids = open_dataset(tmp_path / "panels").table(columns=["id"]).column("id").to_pylist()
    assert len(set(ids)) == 40
    # The resumed dataset equals one built in one go, byte for byte.
    fresh = load_config("configs/tiny.yaml", over[1:] + [f"workdir={tmp_path / 'fresh'}"])
    run_build(fresh, use_ray=False)
    a = open_dataset(tmp_path / "panels").table().sort_by("id")
    b = open_dataset(tmp_path / "fresh" / "panels").table().sort_by("id")
    assert a.equals(b)
    again = run_build(cfg, use_ray=False)
    assert again["units_run"] == 0 and again["rows_out"] == 40


def test_large_jpeg_decodes_at_a_reduced_scale_that_still_covers_the_panel():
    img = cv2.resize(render_scene(2, 200, 150).image, (1600, 1200), interpolation=cv2.INTER_CUBIC)
    ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    seen = []

    def panel_for(w, h):
        seen.append((w, h))
        return (256, 192)

    small = decode_image(jpg.tobytes(), "big.jpg", panel_for=panel_for)
    assert seen == [(1600, 1200)]  # asked with the full size, before decoding
    assert small.shape == (300, 400, 3)  # 1/4 scale: the smallest that still covers 256x192
    full = decode_image(jpg.tobytes(), "big.jpg")
    a, b = fit(small, (256, 192), "big.jpg"), fit(full, (256, 192), "big.jpg")
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3  # the same panel, for a fraction of the decode
