"""Decoder checkpoints in the release's transformers format: round trips both ways, shards, errors.

    .venv/bin/python -m pytest -q tests/model/test_hf_checkpoint.py
"""
import json

import pytest
import torch
from safetensors import safe_open

from model.decoder import ModelArgs
from model.hf_checkpoint import CheckpointError, load_decoder, save_decoder


@pytest.fixture
def tiny_model(tiny_args, random_decoder):
    return random_decoder(tiny_args(), seed=11)


def test_round_trip_single_file(tiny_model, tmp_path):
    save_decoder(tiny_model, tmp_path, meta={"preset": "test", "layout": "abc123"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "panelforge.json"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.self_attn.q_proj.weight" in keys and "lm_head.weight" in keys
    assert "model.layers.0.self_attn.q_norm.bias" in keys and "model.embed_tokens.weight" in keys
    loaded, meta = load_decoder(tmp_path)
    assert meta["preset"] == "test" and meta["layout"] == "abc123" and meta["skipped_keys"] == 0
    assert loaded.args == tiny_model.args
    tokens = torch.randint(0, tiny_model.args.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), tiny_model(tokens), rtol=0, atol=0)


def test_sharded_with_index_and_bf16(tiny_model, tmp_path):
    save_decoder(tiny_model, tmp_path, max_shard_bytes=40_000, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    loaded, _ = load_decoder(tmp_path)
    assert loaded.output.weight.dtype == torch.bfloat16
    want = tiny_model.state_dict()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v.float(), want[k].to(torch.bfloat16).float(), rtol=0, atol=0)


def test_transformers_loads_what_we_save_and_we_load_what_it_saves(tiny_model, tmp_path, hf_twin):
    import transformers

    save_decoder(tiny_model, tmp_path / "ours")
    theirs = transformers.ChameleonForConditionalGeneration.from_pretrained(
        tmp_path / "ours", attn_implementation="eager").eval()
    tokens = torch.randint(0, tiny_model.args.vocab_size, (1, 25))
    with torch.no_grad():
        want = tiny_model(tokens)
        torch.testing.assert_close(theirs(input_ids=tokens).logits, want, rtol=1e-5, atol=1e-5)
        # A folder written by transformers itself (the release's kind, VQ-GAN keys included).
        hf_twin(tiny_model.args, tiny_model).save_pretrained(tmp_path / "hf", max_shard_size="50KB")
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
        loaded, meta = load_decoder(tmp_path / "hf")
        assert meta["skipped_keys"] > 0  # the Chameleon VQ-GAN tensors
        torch.testing.assert_close(loaded(tokens), want, rtol=1e-5, atol=1e-5)


def test_bad_folders_fail_clearly(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_decoder(tmp_path)
    save_decoder(tiny_model, tmp_path)
    with pytest.raises(CheckpointError, match="another preset"):
        load_decoder(tmp_path, expect=ModelArgs.from_name("tiny", vocab_size=tiny_model.args.vocab_size))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing \['layers.2"):
        load_decoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "swin_norm": True}))
    with pytest.raises(CheckpointError, match="swin_norm"):
        load_decoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_decoder(tmp_path)


def test_generation_dtype_upcasts_only_on_a_cpu_without_bf16_kernels(monkeypatch):
    import model.hf_checkpoint as hf

    assert isinstance(hf.cpu_has_fast_bf16(), bool)
    monkeypatch.setattr(hf, "cpu_has_fast_bf16", lambda: False)
    assert hf.generation_dtype("cpu") == torch.float32
    assert hf.generation_dtype(torch.device("cuda", 0)) is None  # a GPU keeps the checkpoint's dtype
    monkeypatch.setattr(hf, "cpu_has_fast_bf16", lambda: True)
    assert hf.generation_dtype("cpu") is None


def test_cpu_has_fast_bf16_is_false_when_torch_has_no_probe(monkeypatch):
    import model.hf_checkpoint as hf

    monkeypatch.setattr(torch.ops, "mkldnn", object())
    assert hf.cpu_has_fast_bf16() is False
