"""The generation actor: samples, best-of-N, quality filter, rows in the GENERATED schema."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_fixtures import FixedScorer, StandInEngine, engine_types, write_config, write_prompts, write_tiny_models  # noqa: E402

from storage import DatasetWriter, open_dataset  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.generate.job import GenerateWorker, Parts, make_units, output_uri  # noqa: E402
from tasks.generate.requests import expand_inputs, sample_seed  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("gen-models"))


def _worker(tmp_path, models, generate, engine=None):
    from model.layout import Layout
    from model.movqgan import load_movqgan

    engine_types()
    cfg = load_config(write_config(tmp_path, models, generate))
    movq = load_movqgan(models[1], "tiny")
    parts = Parts(engine or StandInEngine(movq.n_embed), Layout.from_config(cfg.models), movq, "fp-test")
    return cfg, GenerateWorker(cfg.model_dump(), output_uri(cfg), parts=parts)


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_best_of_n_keeps_the_best_sample_and_records_how(tmp_path, models):
    shapes = {"kind": "shapes", "count": 4, "seed": 1, "tasks": ["t2i", "control:canny"], "size": "64x64"}
    cfg, worker = _worker(tmp_path, models, {"inputs": shapes, "best_of": 3})
    worker.scorers = [FixedScorer()]
    pairs = expand_inputs(cfg).pairs
    rows, rejects, stats = worker.run_pairs(pairs)

    assert rejects == [] and [r["id"] for r in rows] == [p.id for p in pairs]
    assert stats["samples"] == 2 * 1 + 2 * 3  # N samples only where a verifier applies
    engine_seeds = {r.id: r.seed for r in worker.parts.engine.seen}
    for row, pair in zip(rows, pairs):
        params = json.loads(row["params"])
        assert row["model_fingerprint"] == "fp-test" and json.loads(row["sampling"])["top_k"] == 64
        if pair.task == "t2i":
            assert row["lower"] is None and row["score"] is None and params["best_of"] == 1
            assert _png(row["upper"]).shape == (64, 64, 3) and row["seed"] == pair.seed
            continue
        assert row["upper"] == pair.upper  # the given control map is kept as given
        scores = params["scores"]
        best = int(np.argmax(scores))
        assert len(scores) == 3 and len(set(scores)) == 3
        assert row["score"] == pytest.approx(max(scores), abs=1e-4) and params["sample"] == best
        assert row["seed"] == sample_seed(pair.seed, best) == engine_seeds[f"{pair.id}|{best}"]
        lower = _png(row["lower"])
        assert lower.shape == (32, 64, 3) and lower.mean() == pytest.approx(row["score"], abs=1e-3)


def test_threshold_and_engine_errors_go_to_rejects_each_pair_once(tmp_path, models):
    edges = np.zeros((32, 64, 3), np.uint8)
    edges[8, 10:50] = edges[24, 10:50] = edges[8:25, 10] = edges[8:25, 49] = 255  # a rectangle's outline
    Image.fromarray(edges).save(tmp_path / "edges.png")
    prompts = write_prompts(tmp_path / "p.jsonl", [
        {"id": "c", "prompt": "a red circle", "task": "control:canny", "upper": "edges.png", "count": 2},
        {"id": "t", "prompt": "a red circle", "task": "t2i"},
        {"id": "big", "prompt": "a red circle", "task": "t2i", "size": "64x320"},
    ])
    cfg, worker = _worker(tmp_path, models, {"inputs": {"kind": "file", "path": str(prompts)}, "best_of": 2,
                                             "thresholds": {"canny_f1": 0.99}})
    pairs = expand_inputs(cfg).pairs
    rows, rejects, stats = worker.run_pairs(pairs)
    assert [r["id"] for r in rows] == ["t#0"]
    by_id = {r["input_ref"]: r for r in rejects}
    assert set(by_id) == {"c#0", "c#1", "big#0"}
    assert by_id["big#0"]["reason"] == "engine_error" and "exceeds" in by_id["big#0"]["detail"]
    detail = json.loads(by_id["c#0"]["detail"])
    assert by_id["c#0"]["reason"] == "below_threshold" and detail["scorer"] == "canny_f1"
    assert 0.0 <= detail["score"] < 0.99 and detail["threshold"] == 0.99
    assert stats["reasons"] == {"below_threshold": 2, "engine_error": 1}


def test_a_unit_writes_its_shard_and_rejects_in_the_generated_schema(tmp_path, models):
    shapes = {"kind": "shapes", "count": 3, "seed": 0, "tasks": ["t2i", "control:canny", "edit"], "size": "64x64"}
    cfg, worker = _worker(tmp_path, models, {"inputs": shapes})
    pairs = expand_inputs(cfg).pairs
    units = make_units(pairs, 2)
    assert [len(u["pairs"]) for u in units] == [2, 1] and make_units(pairs, 2) == units
    w = DatasetWriter(output_uri(cfg), kind="generated")
    for u in units:
        out = worker(u)
        assert out["stats"]["pairs"] == len(u["pairs"])
        w.commit(out["info"])
    w.finalize()
    ds = open_dataset(output_uri(cfg), verify=True)
    assert ds.kind == "generated" and sorted(ds.table(["id"]).column("id").to_pylist()) == sorted(p.id for p in pairs)
    assert ds.rows_per_task() == {"t2i": 1, "control:canny": 1, "edit": 1}


def test_model_fingerprint_follows_content_not_paths(tmp_path):
    import shutil

    from storage.hashing import file_sha256
    from tasks.generate.job import model_fingerprint

    assets = Path(__file__).resolve().parents[2] / "assets"
    movq = file_sha256(str(assets / "movqgan-tiny.safetensors"))
    copy = tmp_path / "copy"
    shutil.copytree(assets / "decoder-tiny", copy / "decoder")
    here = model_fingerprint(str(assets / "decoder-tiny"), movq, "L")
    assert len(here) == 16
    assert model_fingerprint(str(copy / "decoder"), movq, "L") == here
    assert model_fingerprint(str(copy / "decoder"), movq, "M") != here  # the layout counts
    assert model_fingerprint(str(copy / "decoder"), "0" * 64, "L") != here  # the MoVQGAN counts
    (copy / "decoder" / "panelforge.json").write_text("{}")  # provenance only: not part of the weights
    assert model_fingerprint(str(copy / "decoder"), movq, "L") == here
    with open(copy / "decoder" / "model.safetensors", "r+b") as f:  # one byte of the weights
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert model_fingerprint(str(copy / "decoder"), movq, "L") != here


def test_cfg_by_task_sets_each_rows_guidance_and_is_recorded(tmp_path, models):
    """generate.cfg_by_task: the exact task first, then its kind, else generate.cfg; the engine is
    asked with that scale and the row's sampling records it."""
    tasks = ["t2i", "control:canny", "control:depth", "dense:depth"]
    shapes = {"kind": "shapes", "count": 4, "seed": 1, "tasks": tasks, "size": "64x64"}
    cfg, worker = _worker(tmp_path, models, {"inputs": shapes, "cfg": 4.0,
                                             "cfg_by_task": {"control": 2.0, "control:depth": 1.0}})
    rows, rejects, _ = worker.run_pairs(expand_inputs(cfg).pairs)
    want = {"t2i": 4.0, "control:canny": 2.0, "control:depth": 1.0, "dense:depth": 4.0}
    assert not rejects and sorted(r["task"] for r in rows) == sorted(tasks)
    for row in rows:
        assert json.loads(row["sampling"])["cfg"] == want[row["task"]]
    asked = {r.task: r.cfg for r in worker.parts.engine.seen}
    assert asked == want


def test_min_p_reaches_the_engine_and_the_rows_and_off_keeps_older_manifests(tmp_path, models):
    from tasks.generate.job import EngineSettings, job_config

    shapes = {"kind": "shapes", "count": 2, "seed": 1, "tasks": ["t2i", "control:canny"], "size": "64x64"}
    cfg, worker = _worker(tmp_path, models, {"inputs": shapes, "min_p": 0.1})
    rows, rejects, _ = worker.run_pairs(expand_inputs(cfg).pairs)
    assert not rejects and {json.loads(r["sampling"])["min_p"] for r in rows} == {0.1}
    assert {r.min_p for r in worker.parts.engine.seen} == {0.1}
    settings = EngineSettings("cpu", "none", "eager")
    assert job_config(cfg, settings)["generate"]["min_p"] == 0.1  # a rerun with another min-p is refused
    (tmp_path / "off").mkdir()
    off = load_config(write_config(tmp_path / "off", models, {"inputs": shapes}))
    # min-p off: the manifest's generate section is what versions before min-p wrote, so they resume
    assert "min_p" not in job_config(off, settings)["generate"]


def test_map_guidance_gives_control_rows_an_empty_map_in_the_unconditional_branch(tmp_path, models):
    """generate.map_guidance: the named control tasks' requests carry the MoVQGAN codes of a black
    upper panel for the unconditional branch (the row's own map stays the conditional one's); other
    tasks carry none; the rows' sampling and the manifest record it, and off leaves both as before."""
    from model.movqgan import load_movqgan
    from tasks.generate.job import EngineSettings, job_config

    tasks = ["t2i", "control:canny", "control:depth", "dense:depth", "edit"]
    shapes = {"kind": "shapes", "count": 5, "seed": 1, "tasks": tasks, "size": "64x64"}
    cfg, worker = _worker(tmp_path, models, {"inputs": shapes, "map_guidance": ["control:canny"]})
    rows, rejects, _ = worker.run_pairs(expand_inputs(cfg).pairs)
    assert not rejects and sorted(r["task"] for r in rows) == sorted(tasks)
    movq = load_movqgan(models[1], "tiny")
    empty = movq.encode(np.zeros((1, 32, 64, 3), np.uint8))[0].cpu().numpy()
    seen = {r.task: r for r in worker.parts.engine.seen}
    np.testing.assert_array_equal(seen["control:canny"].uncond_upper_codes, empty)
    assert not np.array_equal(seen["control:canny"].upper_codes, empty)  # its own map stays the cond one
    assert all(seen[t].uncond_upper_codes is None for t in tasks if t != "control:canny")
    for row in rows:
        assert json.loads(row["sampling"]).get("map_guidance") == ("empty" if row["task"] == "control:canny" else None)
    settings = EngineSettings("cpu", "none", "eager")
    assert job_config(cfg, settings)["generate"]["map_guidance"] == ["control:canny"]  # a rerun without is refused
    (tmp_path / "off").mkdir()
    off = load_config(write_config(tmp_path / "off", models, {"inputs": shapes}))
    assert "map_guidance" not in job_config(off, settings)["generate"]  # older manifests resume


@pytest.mark.parametrize("bf16_kernels", [False, True])
def test_a_bf16_decoder_generates_in_float32_on_a_cpu_without_bf16_kernels(tmp_path, models, monkeypatch, bf16_kernels):
    """On a CPU whose oneDNN emulates bf16 (AVX2) the engine runs the decoder in float32, several
    times faster there (bench/cpu_dtype.py); with bf16 kernels it keeps the checkpoint's bf16."""
    import torch

    import model.hf_checkpoint as hf
    from model.hf_checkpoint import load_decoder, save_decoder
    from tasks.generate.job import load_parts

    decoder, meta = load_decoder(models[0])
    save_decoder(decoder, tmp_path / "bf16", meta=meta, dtype=torch.bfloat16)
    monkeypatch.setattr(hf, "cpu_has_fast_bf16", lambda: bf16_kernels)
    cfg = load_config(write_config(tmp_path, (str(tmp_path / "bf16"), *models[1:]), {}))
    parts = load_parts(cfg, fingerprint="fp-test")
    want = torch.bfloat16 if bf16_kernels else torch.float32
    assert {p.dtype for p in parts.engine.model.parameters()} == {want}
    assert parts.engine.cache_dtype == want
    assert parts.engine_params()["dtype"] == str(want).removeprefix("torch.")  # each row records it
