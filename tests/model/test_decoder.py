"""The decoder: parity with transformers' Chameleon, presets, and the static KV cache.

    .venv/bin/python -m pytest -q tests/model/test_decoder.py
"""
import pytest
import torch

from model.decoder import Decoder, ModelArgs

@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_logits_match_transformers_chameleon(n_kv_heads, tiny_args, random_decoder, hf_twin):
    args = tiny_args(n_kv_heads=n_kv_heads)
    ours = random_decoder(args)
    theirs = hf_twin(args, ours)
    tokens = torch.randint(0, args.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(input_ids=tokens).logits
        got = ours(tokens)
    assert got.shape == want.shape == (2, 37, args.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the logits are not trivially equal: they vary along the sequence
    assert (got[:, 1:] - got[:, :-1]).abs().max() > 0.1


def test_hidden_states_match_chameleon_model(tiny_args, random_decoder, hf_twin):
    args = tiny_args()
    ours = random_decoder(args, seed=3)
    theirs = hf_twin(args, ours, "ChameleonModel")
    tokens = torch.randint(0, args.vocab_size, (1, 20))
    with torch.no_grad():
        want = theirs(input_ids=tokens).last_hidden_state
        got = ours(tokens, return_hidden=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_presets():
    tiny = ModelArgs.from_name("tiny", vocab_size=300)
    assert (tiny.dim, tiny.n_layers, tiny.n_heads, tiny.intermediate_size) == (256, 6, 8, 768)
    n_body = sum(p.numel() for n, p in Decoder(tiny).named_parameters() if n.startswith("layers."))
    assert 2e6 < n_body < 8e6
    seven = ModelArgs.from_name("7b")
    assert (seven.vocab_size, seven.dim, seven.intermediate_size, seven.n_kv_heads) == (171385, 4096, 11008, 32)
    two = ModelArgs.from_name("2b")
    assert (two.dim, two.intermediate_size, two.n_layers, two.max_seq_len) == (2048, 8192, 32, 10240)
    with pytest.raises(ValueError, match="vocab_size=layout.vocab_size"):
        ModelArgs.from_name("tiny")
    with pytest.raises(ValueError, match="unknown decoder preset"):
        ModelArgs.from_name("13b")
    with pytest.raises(ValueError, match="unknown fields"):
        ModelArgs.from_name("2b", hidden=3)


def test_static_cache_matches_full_forward_per_row_positions(tiny_args, random_decoder):
    """Rows at different positions, prefilled one at a time into their own cache rows, then decoded
    together (window of 3 tokens a step, with a roll-back) give the full forward's logits."""
    args = tiny_args()
    model = random_decoder(args, seed=5)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, args.vocab_size, (n,), generator=g) for n in (30, 22, 40)]
    with torch.no_grad():
        full = [model(s[None])[0] for s in seqs]
        model.setup_cache(max_batch=3, max_seq=64)
        starts = [9, 4, 13]
        for b, (s, n0) in enumerate(zip(seqs, starts)):
            # junk first, to prove that positions > the write position are never read
            model(torch.randint(0, args.vocab_size, (1, 20)), torch.arange(20)[None] + n0, rows=torch.tensor([b]))
            out = model(s[None, :n0], torch.arange(n0)[None], rows=torch.tensor([b]))
            torch.testing.assert_close(out[0], full[b][:n0], rtol=1e-5, atol=1e-5)
        pos = torch.tensor(starts)
        for step in range(5):
            window = pos[:, None] + torch.arange(3)[None]
            tokens = torch.stack([s[w] for s, w in zip(seqs, window)])
            out = model(tokens, window, kv_len=48)
            for b in range(3):
                torch.testing.assert_close(out[b], full[b][window[b]], rtol=1e-5, atol=1e-5)
            pos = pos + torch.tensor([1, 2, 3])  # each row keeps a different number of the window
    model.clear_cache()
    assert not model.has_cache


def test_fused_projections_compute_the_same_and_keep_the_keys_on_disk(random_decoder, tiny_args, tmp_path):
    """fuse_projections: one GEMM for q/k/v and one for gate/up; the numbers, the state_dict keys
    and shapes, save_decoder's files and load_state_dict's input are those of the separate layers."""
    from model.hf_checkpoint import load_decoder, save_decoder

    model = random_decoder(tiny_args(), seed=5)
    tokens = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_projections()
    assert model.fused and not hasattr(model.layers[0].attention, "wq")
    assert model.layers[0].attention.wqkv.weight.shape == (3 * 64, 64)
    assert model.layers[0].feed_forward.w13.weight.shape == (2 * 160, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), want, rtol=1e-5, atol=1e-5)
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    # the release's files: written unfused, read back into an unfused decoder, equal
    save_decoder(model, tmp_path / "ckpt")
    loaded, _ = load_decoder(tmp_path / "ckpt")
    assert not loaded.fused
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), want, rtol=1e-5, atol=1e-5)
    # separate keys load into a fused model
    other = random_decoder(tiny_args(), seed=6).fuse_projections()
    other.load_state_dict(before)
    with torch.no_grad():
        torch.testing.assert_close(other(tokens), want, rtol=1e-5, atol=1e-5)
