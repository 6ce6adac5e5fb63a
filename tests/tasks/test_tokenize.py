"""The pretokenize job: tokens per bucket, rejects with reasons, resume, wrong inputs, Ray path.

    .venv/bin/python -m pytest -q tests/tasks/test_tokenize.py
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from model.layout import Layout
from model.movqgan import MoVQGAN, save_movqgan
from model.prompts import render_prompt
from storage import PANELS, DatasetWriter, open_dataset
from storage.hashing import recorded
from tasks.config import load_config
from tasks.panels.compose import panel_row
from tasks.shapes.scenes import render_scene
from tasks.tokenize.job import TokenizeError, run_tokenize


def _row(i: int, task: str, w: int, h: int, dual: bool, prompt: str | None = None) -> dict:
    ph = h // 2 if dual else h
    upper = render_scene(i, w, ph).image
    lower = render_scene(i + 1000, w, ph).image if dual else None
    prompt = prompt or render_prompt("t2i", w, h, f"scene {i}")
    return panel_row(f"row-{i:03d}", task, prompt, f"scene {i}", upper, lower, "test", "{}")


def make_panels(uri: str) -> dict[str, str]:
    """A panels dataset with good rows in two buckets and one bad row of each kind; returns
    the expected reject reason per bad row id."""
    rows = [_row(i, "t2i", 64, 64, False) for i in range(4)]
    rows += [_row(i, "control:canny", 64, 64, True) for i in range(4, 7)]
    rows += [_row(i, "t2i", 32, 64, False) for i in range(7, 9)]
    bad = {}
    r = _row(20, "t2i", 64, 64, False)
    r.update(id="bad-size", width=72)
    bad[r["id"]] = "bad_size"
    rows.append(r)
    r = _row(21, "t2i", 64, 64, False)
    r.update(id="corrupt", upper=b"\x89PNG\r\n\x1a\n-truncated")
    bad[r["id"]] = "undecodable"
    rows.append(r)
    r = _row(22, "control:canny", 64, 64, True)
    r.update(id="halves-differ", lower=_row(23, "t2i", 32, 32, False)["upper"])
    bad[r["id"]] = "bad_size"
    rows.append(r)
    r = _row(24, "t2i", 64, 64, False, prompt="word " * 400)
    r.update(id="long-prompt")
    bad[r["id"]] = "too_long"
    rows.append(r)
    w = DatasetWriter(uri, "panels", config={"test": True})
    w.write_unit("00000", pa.Table.from_pylist(rows[:8], schema=PANELS))
    w.write_unit("00001", pa.Table.from_pylist(rows[8:], schema=PANELS))
    w.finalize()
    return bad


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("movq") / "tiny.safetensors"
    save_movqgan(MoVQGAN("tiny"), path)
    return str(path)


def _cfg(tmp_path, weights, *extra):
    return load_config(None, [f"workdir={tmp_path}", f"models.movqgan_path={weights}", "tokenize.rows_per_unit=2",
                              "tokenize.batch_size=3", "tokenize.max_seq=300", *extra])


def test_job_tokens_rejects_and_layout(tmp_path, weights):
    bad = make_panels(str(tmp_path / "panels"))
    cfg = _cfg(tmp_path, weights)
    s = run_tokenize(cfg, use_ray=False)
    assert s["balanced"] and s["rows_in"] == 13 and s["rows_out"] == 9 and s["rejects"] == 4
    assert s["rejects_per_reason"] == {"bad_size": 2, "undecodable": 1, "too_long": 1}
    assert {b["bucket"]: b["samples"] for b in s["buckets"]} == {"32x64": 2, "64x64": 7}
    ds = open_dataset(s["dataset"])
    rejects = ds.rejects().to_pylist()
    assert {r["input_ref"]: r["reason"] for r in rejects} == bad
    assert all(r["stage"] == "tokenize" and r["detail"] for r in rejects)

    layout = Layout.from_config(cfg.models)
    assert ds.meta["fingerprint"] == layout.fingerprint and ds.meta["movqgan"]["preset"] == "tiny"
    for shard in ds.manifest["shards"]:  # every unit holds one bucket
        assert shard["unit"].split("-")[0] in ("32x64", "64x64")

    from model.movqgan import load_movqgan
    from tasks.panels.compose import decode_panel

    model = load_movqgan(weights, "tiny")
    panels = open_dataset(str(tmp_path / "panels")).table().to_pylist()
    by_id = {p["id"]: p for p in panels}
    for row in ds.table().to_pylist():
        p = by_id[row["id"]]
        image = decode_panel(p["upper"])
        if p["lower"] is not None:
            image = np.concatenate([image, decode_panel(p["lower"])], axis=0)
        want = model.encode(image[None])[0].numpy()
        ids, start = row["tokens"], row["loss_start"]
        assert ids[:start] == layout.encode_prompt(p["prompt"])
        np.testing.assert_array_equal(layout.parse_image(ids), want)
        assert (row["grid_h"], row["grid_w"]) == want.shape and row["bucket"] == f"{p['width']}x{p['height']}"
        assert row["task"] == p["task"] and ids[-1] == layout.turn_end


def test_resume_after_interruption(tmp_path, weights):
    make_panels(str(tmp_path / "panels"))
    cfg = _cfg(tmp_path, weights)

    def stop(state):
        if state["units_done"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_tokenize(cfg, progress=stop, use_ray=False)
    partial = open_dataset(tmp_path / "tokens").manifest  # manifest.json with its commit log
    assert len(partial["units"]) == 2 and partial["status"] == "writing"
    s = run_tokenize(cfg, use_ray=False)
    assert s["units_skipped"] == 2 and s["units_run"] == s["units_total"] - 2
    ds = open_dataset(s["dataset"])
    ids = ds.table(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 9 and s["balanced"]
    # A resumed run with another layout is refused rather than mixing layouts.
    other = _cfg(tmp_path, weights, "models.code_offset=2000")
    with pytest.raises(Exception, match="another meta"):
        run_tokenize(other, use_ray=False)


def test_input_of_another_schema_version_or_kind(tmp_path, weights):
    make_panels(str(tmp_path / "panels"))
    manifest = tmp_path / "panels" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["schema_version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(TokenizeError, match="schema"):
        run_tokenize(_cfg(tmp_path, weights), use_ray=False)
    with pytest.raises(TokenizeError, match="cannot tokenize"):
        run_tokenize(_cfg(tmp_path, weights, "tokenize.input=nothing-here"), use_ray=False)
    s = run_tokenize(_cfg(tmp_path / "b", weights, f"tokenize.input={tmp_path / 'b' / 'panels'}"), use_ray=False) \
        if make_panels(str(tmp_path / "b" / "panels")) else None
    with pytest.raises(TokenizeError, match="'tokens' dataset"):
        run_tokenize(_cfg(tmp_path / "c", weights, f"tokenize.input={s['dataset']}"), use_ray=False)


def test_missing_weights_is_a_clear_error(tmp_path):
    make_panels(str(tmp_path / "panels"))
    cfg = load_config(None, [f"workdir={tmp_path}", "models.movqgan_preset=270m", "models.tokenizer=qwen-offline"])
    with pytest.raises(TokenizeError, match="movqgan_path is not set"):
        run_tokenize(cfg, use_ray=False)


@pytest.mark.slow
def test_on_ray_actors(tmp_path, weights, ray_local):
    make_panels(str(tmp_path / "panels"))
    s = run_tokenize(_cfg(tmp_path, weights, "tokenize.workers=1"), use_ray=True)
    assert s["balanced"] and s["rows_out"] == 9 and s["units_run"] == s["units_total"]
    assert s["throughput"]["encode_s"] > 0 and s["throughput"]["decode_s"] > 0
    # The Ray Data stages (CPU decode actors ahead of the encoder actors) write the same shard
    # bytes as the one-process path: same rows, same rejects, same order.
    local = run_tokenize(_cfg(tmp_path / "local", weights, f"tokenize.input={tmp_path / 'panels'}"), use_ray=False)

    def shards(summary):
        m = open_dataset(summary["dataset"]).manifest
        return {(kind, e["unit"]): recorded(e) for kind in ("shards", "rejects") for e in m[kind]}

    assert shards(s) == shards(local) and len(shards(s)) >= s["units_total"]


def test_static_batches_pad_the_last_batch_without_changing_codes(weights):
    """With CUDA graphs (tokenize.compile on a GPU) every batch of a bucket has one shape: a short
    last batch is padded with blank images. GroupNorm works per image, so the codes are the same."""
    from model.movqgan import load_movqgan

    model = load_movqgan(weights, "tiny")
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 48, 3), dtype=np.uint8)
    plain = model.encode(images, batch_size=3)
    seen = []
    latent = model._latent
    model._latent = lambda x: seen.append(tuple(x.shape)) or latent(x)
    model.static_batches = True
    padded = model.encode(images, batch_size=3)
    assert seen == [(3, 3, 32, 48), (3, 3, 32, 48)]  # 3 + (2 padded to 3)
    assert torch.equal(plain, padded) and padded.shape == (5, 4, 6)
