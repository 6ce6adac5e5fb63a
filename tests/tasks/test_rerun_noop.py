"""A rerun of a finished job does nothing: no unit, no model, no Ray.

    .venv/bin/python -m pytest -q tests/tasks/test_rerun_noop.py
"""
from __future__ import annotations

import time

import tasks.ray_jobs  # noqa: E402
from storage import open_dataset  # noqa: E402
from tasks.panels.job import run_build  # noqa: E402
from tasks.config import load_config  # noqa: E402


def refuse(*args, **kwargs):
    raise AssertionError("a rerun of a complete dataset started Ray or loaded a unit's model")


def forbid(monkeypatch, module, name: str) -> None:
    """Any call of Ray (started or joined), its unit mapper, or the job's model class fails the test."""
    monkeypatch.setattr(tasks.ray_jobs, "ray_started", refuse)
    monkeypatch.setattr(tasks.ray_jobs, "map_units", refuse)
    monkeypatch.setattr(module, name, refuse)


def test_rerun_of_complete_panels_starts_no_ray(tmp_path, monkeypatch):
    cfg = load_config("configs/tiny.yaml", [f"workdir={tmp_path}", "panels.source.count=12", "panels.rows_per_unit=4",
                                            "panels.stage_size=64"])
    first = run_build(cfg, use_ray=False)
    assert first["units_run"] == 3
    manifest = (tmp_path / "panels" / "manifest.json").read_bytes()
    import tasks.panels.job as bp

    forbid(monkeypatch, bp, "PanelMaker")
    t = time.perf_counter()
    again = run_build(cfg, use_ray=True)
    print(f"panels rerun: {time.perf_counter() - t:.2f} s")
    assert (again["units_run"], again["units_skipped"], again["rows_out"]) == (0, 3, 12)
    assert (tmp_path / "panels" / "manifest.json").read_bytes() == manifest  # nothing rewritten
    assert open_dataset(tmp_path / "panels", verify=True).manifest["status"] == "complete"


def test_rerun_of_complete_tokens_starts_no_ray(tmp_path, monkeypatch):
    import torch
    from test_tokenize import make_panels

    import tasks.tokenize.job as tok
    from model.movqgan import MoVQGAN, save_movqgan

    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    save_movqgan(MoVQGAN("tiny"), weights)
    make_panels(str(tmp_path / "panels"))
    cfg = load_config(None, [f"workdir={tmp_path}", f"models.movqgan_path={weights}", "tokenize.rows_per_unit=4",
                             "tokenize.max_seq=300"])
    first = tok.run_tokenize(cfg, use_ray=False)
    assert first["units_run"] >= 2
    forbid(monkeypatch, tok, "Tokenizer")
    t = time.perf_counter()
    again = tok.run_tokenize(cfg, use_ray=True)
    print(f"tokens rerun: {time.perf_counter() - t:.2f} s")
    assert again["units_run"] == 0 and again["rows_out"] == first["rows_out"]
