"""A folder of every kind of bad input through the Ray Data job: pytest -q tests/tasks/test_panels_bad_input.py

Each unusable row becomes one reject with its reason, nothing crashes, and rows in = rows out +
rejects; the odd-but-usable images (CMYK, 16-bit, palette, grey, alpha, EXIF-rotated) become panels.
"""
import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from storage import open_dataset
from tasks.panels.job import run_build
from tasks.config import load_config
from tasks.panels.compose import decode_panel

# file -> expected outcome: a reject reason, or "ok"
EXPECTED = {
    "good.jpg": "ok", "cmyk.jpg": "ok", "sixteen.png": "ok", "palette.png": "ok", "grey.png": "ok",
    "alpha.png": "ok", "rotated.jpg": "ok", "sidecar.png": "ok",
    "zero.jpg": "empty_file", "truncated.jpg": "truncated", "corrupt.png": "corrupt_image",
    "tiny.png": "too_small", "bomb.png": "too_many_pixels", "nocaption.jpg": "missing_caption",
    "nullcaption.jpg": "missing_caption", "blank.jpg": "empty_caption", "long.jpg": "prompt_too_long",
    "missing.jpg": "unreadable_path", "folder.jpg": "unreadable_path",
}


def _photo(h=120, w=160, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = rng.integers(40, 200, 3)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 4, tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
    return img


def _save(im: Image.Image, path, **kw):
    im.save(path, **kw)


def make_bad_folder(root):
    root.mkdir()
    _save(Image.fromarray(_photo()), root / "good.jpg", quality=95)
    _save(Image.fromarray(_photo(seed=1)).convert("CMYK"), root / "cmyk.jpg", quality=95)
    ok, buf = cv2.imencode(".png", (np.linspace(0, 65535, 120 * 160).reshape(120, 160)).astype(np.uint16))
    (root / "sixteen.png").write_bytes(buf.tobytes())
    _save(Image.fromarray(_photo(seed=2)).convert("P", palette=Image.Palette.ADAPTIVE), root / "palette.png")
    _save(Image.fromarray(_photo(seed=3)).convert("L"), root / "grey.png")
    rgba = np.dstack([_photo(seed=4), np.full((120, 160), 128, np.uint8)])
    _save(Image.fromarray(rgba, "RGBA"), root / "alpha.png")
    stored = np.zeros((100, 160, 3), np.uint8)
    stored[:, :80] = (230, 20, 20)  # left half red: on top once the EXIF rotation (90 CW) is applied
    stored[:, 80:] = (20, 20, 230)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    _save(im, root / "rotated.jpg", exif=exif, quality=95)
    _save(Image.fromarray(_photo(seed=5)), root / "sidecar.png")
    (root / "sidecar.txt").write_text("a photo captioned by its sidecar file\n")
    (root / "zero.jpg").write_bytes(b"")
    ok, jpg = cv2.imencode(".jpg", (np.random.default_rng(6).random((120, 160, 3)) * 255).astype(np.uint8))
    (root / "truncated.jpg").write_bytes(jpg.tobytes()[: len(jpg) // 2])
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    _save(Image.fromarray(_photo(16, 16)), root / "tiny.png")
    _save(Image.new("L", (3000, 3000)), root / "bomb.png")  # 9 MP in a few KB
    for name in ("nocaption.jpg", "nullcaption.jpg", "blank.jpg", "long.jpg"):
        _save(Image.fromarray(_photo(seed=7)), root / name, quality=90)
    (root / "folder.jpg").mkdir()
    captions = [{"file": f, "caption": f"a test photo named {f}"} for f in
                ("good.jpg", "cmyk.jpg", "sixteen.png", "palette.png", "grey.png", "alpha.png", "rotated.jpg",
                 "zero.jpg", "truncated.jpg", "corrupt.png", "tiny.png", "bomb.png", "missing.jpg", "folder.jpg")]
    captions += [{"file": "nullcaption.jpg", "caption": None}, {"file": "blank.jpg", "caption": "  \n "},
                 {"file": "long.jpg", "caption": "word " * 2000}]
    lines = [json.dumps(c) for c in captions] + ["{this line is not json", '["a list, not an object"]']
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_bad_input_folder_through_the_job(tmp_path, ray_local):
    folder = make_bad_folder(tmp_path / "photos")
    cfg = load_config("configs/tiny.yaml", [
        f"workdir={tmp_path / 'out'}", "panels.stage_size=64", "panels.rows_per_unit=6",
        f"panels.source={{kind: folder, path: '{folder}'}}", "panels.max_pixels=4000000",
        "panels.tasks={t2i: 1, control:canny: 1, dense:hed: 1}",
    ])
    summary = run_build(cfg)
    rows_in = len(EXPECTED) + 2  # + the two broken jsonl lines
    assert summary["rows_in"] == rows_in and summary["balanced"]
    assert summary["rows_out"] + summary["rejects"] == rows_in
    ds = open_dataset(summary["dataset"], verify=True)
    rejects = {r["input_ref"]: r for r in ds.rejects().to_pylist()}
    for name, want in EXPECTED.items():
        if want == "ok":
            assert name not in rejects, rejects.get(name)
        else:
            assert rejects[name]["reason"] == want, (name, rejects[name])
            assert name in rejects[name]["detail"]  # the detail names the file
    bad_rows = [r for ref, r in rejects.items() if ref.startswith("captions.jsonl#")]
    assert len(bad_rows) == 2 and {r["reason"] for r in bad_rows} == {"bad_row"}
    assert all("line" in r["detail"] for r in bad_rows)
    assert summary["rejects_per_reason"]["unreadable_path"] == 2
    assert sum(summary["rows_per_task"].values()) == summary["rows_out"] == 8

    rows = {r["id"]: r for r in ds.table().to_pylist()}
    assert set(rows) == {n for n, w in EXPECTED.items() if w == "ok"}

    def image_of(row):  # the photo's panel: upper for t2i and dense, lower for control
        return decode_panel(row["lower"] if row["task"].startswith("control") else row["upper"])

    for name, row in rows.items():
        img = image_of(row)
        assert img.dtype == np.uint8 and img.ndim == 3 and row["width"] % 32 == 0 and row["height"] % 32 == 0
        assert row["caption"] and row["prompt"].count(row["caption"]) == 1
    rot = image_of(rows["rotated.jpg"])
    h = rot.shape[0]
    assert rot.shape[0] >= rot.shape[1]  # portrait once rotated: a tall bucket
    assert rot[h // 8, :, 0].mean() > 150 and rot[-h // 8, :, 2].mean() > 150  # red on top, blue below
    assert rows["sidecar.png"]["caption"] == "a photo captioned by its sidecar file"
    assert image_of(rows["sixteen.png"]).max() > 200  # 16-bit values scaled, not clipped to black/white
