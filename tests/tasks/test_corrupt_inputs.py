"""Training and pre-tokenization read their inputs with hash checks: a damaged shard stops the job
with its name and what to do, before a damaged row is used.

    .venv/bin/python -m pytest -q tests/tasks/test_corrupt_inputs.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import tiny_config, write_tokens  # noqa: E402

from model.layout import Layout  # noqa: E402
from storage import ChecksumError  # noqa: E402
from tasks.config import load_config  # noqa: E402


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: the file still parses as Arrow
    path.write_bytes(bytes(data))


def test_training_refuses_a_damaged_token_shard(tmp_path):
    from tasks.train import plan_training

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
    from tasks.tokenize import run_tokenize

    torch.manual_seed(0)
    weights = tmp_path / "tiny.safetensors"
    save_movqgan(MoVQGAN("tiny"), weights)
    make_panels(str(tmp_path / "panels"))
    _flip(tmp_path / "panels" / "shards" / "00001.arrow")
    cfg = load_config(None, [f"workdir={tmp_path}", f"models.movqgan_path={weights}", "tokenize.max_seq=300"])
    with pytest.raises(ChecksumError, match=r"panels/shards/00001.arrow: xxh3_128 .*panelforge datasets repair"):
        run_tokenize(cfg, use_ray=False)
    assert not (tmp_path / "tokens" / "shards").exists() or not any((tmp_path / "tokens" / "shards").iterdir())
