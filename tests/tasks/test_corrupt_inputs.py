"""Training and pre-tokenization read their inputs with hash checks: a damaged shard stops the job
with its name and what to do, before a damaged row is used; after `datasets repair`, the job's
rerun redoes only the damaged unit, byte for byte.

    .venv/bin/python -m pytest -q tests/tasks/test_corrupt_inputs.py
"""
from __future__ import annotations

from pathlib import Path

import pytest

from train_fixtures import tiny_config, write_tokens  # noqa: E402

from model.layout import Layout  # noqa: E402
from storage import ChecksumError  # noqa: E402
from tasks.config import load_config  # noqa: E402


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: the file still parses as Arrow
    path.write_bytes(bytes(data))


def test_training_refuses_a_damaged_token_shard(tmp_path):
    from tasks.train.job import plan_training

    cfg = load_config(tiny_config(tmp_path))
    write_tokens(tmp_path / "tokens", Layout.shapes())
    plan_training(cfg)  # intact: plans
    _flip(tmp_path / "tokens" / "shards" / "u1.arrow")
    with pytest.raises(ChecksumError, match=r"tokens/shards/u1.arrow: xxh3_128 .*panelforge datasets repair"):
        plan_training(cfg)


def test_pretokenize_refuses_a_damaged_panel_shard(tmp_path):
    import torch
    from test_tokenize import make_panels

    from model.movqgan import MoVQGAN, save_movqgan
    from tasks.tokenize.job import run_tokenize

    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    save_movqgan(MoVQGAN("tiny"), weights)
    make_panels(str(tmp_path / "panels"))
    _flip(tmp_path / "panels" / "shards" / "00001.arrow")
    cfg = load_config(None, [f"workdir={tmp_path}", f"models.movqgan_path={weights}", "tokenize.max_seq=300"])
    with pytest.raises(ChecksumError, match=r"panels/shards/00001.arrow: xxh3_128 .*panelforge datasets repair"):
        run_tokenize(cfg, use_ray=False)
    assert not (tmp_path / "tokens" / "shards").exists() or not any((tmp_path / "tokens" / "shards").iterdir())


def test_repair_then_rerun_of_the_panels_job_redoes_only_the_damaged_unit(tmp_path, capsys):
    from flows.cli import main
    from storage import open_dataset
    from tasks.panels.job import run_build

    cfg = load_config("configs/tiny.yaml", [f"workdir={tmp_path}", "panels.source.count=12", "panels.rows_per_unit=4",
                                            "panels.stage_size=64"])
    assert run_build(cfg, use_ray=False)["units_run"] == 3  # the uninterrupted run
    shards = tmp_path / "panels" / "shards"
    whole = {p.name: p.read_bytes() for p in shards.iterdir()}
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
    _flip(shards / "00001.arrow")
    with pytest.raises(ChecksumError, match=r"shards/00001.arrow: .*panelforge datasets repair"):
        open_dataset(tmp_path / "panels").table()

    assert main(["datasets", "repair", str(tmp_path / "panels")]) == 0
    assert "dropped unit 00001: shards/00001.arrow" in capsys.readouterr().out
    rerun = run_build(cfg, use_ray=False)
    assert (rerun["units_run"], rerun["units_skipped"], rerun["rows_out"]) == (1, 2, 12)
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == whole  # byte for byte
    assert {n: (shards / n).stat().st_mtime_ns for n in ("00000.arrow", "00002.arrow")} == \
        {n: mtimes[n] for n in ("00000.arrow", "00002.arrow")}  # only the damaged unit recomputed
    assert open_dataset(tmp_path / "panels", verify=True).manifest["status"] == "complete"
