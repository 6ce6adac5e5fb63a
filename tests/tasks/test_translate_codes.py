"""tasks/assets/translate_codes.py: a decoder carried over to another MoVQGAN's codes."""
import json

import pytest
import torch

from model.decoder import Decoder, ModelArgs
from model.hf_checkpoint import load_decoder, save_decoder
from model.layout import Layout
from model.movqgan import TINY_ASSET, load_movqgan, save_movqgan
from storage.hashing import file_sha256
from tasks.assets.train_movqgan import grow_codebook, image_pool
from tasks.assets.translate_codes import code_counts, main, translate_decoder, translate_rows


def test_each_new_code_gets_the_weighted_mean_of_the_old_codes_it_replaces():
    rows = torch.arange(12.0).view(6, 2)  # two text rows, then four old codes
    counts = torch.tensor([[3.0, 1.0, 0.0, 0.0],   # new 0: old 0 three times, old 1 once
                           [0.0, 0.0, 0.0, 0.0],   # new 1: never seen, keeps old row 1
                           [0.0, 0.0, 2.0, 2.0],   # new 2: half old 2, half old 3
                           [0.0, 0.0, 0.0, 5.0],
                           [0.0, 0.0, 0.0, 0.0]])  # new 4, past the old codebook, never seen: the old codes' mean
    out = translate_rows(rows, 2, counts)
    old = rows[2:]
    assert out.shape == (7, 2) and torch.equal(out[:2], rows[:2])
    assert torch.allclose(out[2], 0.75 * old[0] + 0.25 * old[1])
    assert torch.equal(out[3], old[1])
    assert torch.allclose(out[4], 0.5 * (old[2] + old[3]))
    assert torch.equal(out[5], old[3])
    assert torch.allclose(out[6], old.mean(0))
    with pytest.raises(ValueError, match="last rows"):
        translate_rows(torch.zeros(8, 2), 2, counts)  # codes not at the end cannot grow


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """A small random decoder that 'learned' the shipped MoVQGAN's codes (its record says so)."""
    torch.manual_seed(0)
    layout = Layout.shapes()
    args = ModelArgs(vocab_size=layout.vocab_size, dim=32, n_layers=1, n_heads=2, intermediate_size=64, max_seq_len=64)
    folder = tmp_path_factory.mktemp("dec") / "decoder"
    save_decoder(Decoder(args), folder, {"layout": layout.meta(), "layout_fingerprint": layout.fingerprint,
                                         "movqgan": {"preset": "tiny", "weights": TINY_ASSET.name,
                                                     "sha256": file_sha256(str(TINY_ASSET))}},
                 dtype=torch.float32)
    return folder


def logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).float()[0]


def test_a_permuted_codebook_carries_every_seen_code_over_exactly(tmp_path, decoder_dir):
    old = load_movqgan(TINY_ASSET, "tiny")
    perm = torch.randperm(old.n_embed, generator=torch.Generator().manual_seed(1))  # new code k = old code perm[k]
    new = load_movqgan(TINY_ASSET, "tiny")
    new.quantize.embedding.weight.data = old.quantize.embedding.weight.data[perm].clone()
    new_path = tmp_path / "permuted.safetensors"
    save_movqgan(new, new_path, dtype=torch.float16)
    images = image_pool(8, 32, first_seed=123)
    counts = code_counts(old, load_movqgan(new_path, "tiny"), images)
    seen = torch.nonzero(counts.sum(1)).flatten()
    assert len(seen) > 20 and torch.equal(counts[seen].argmax(1), perm[seen])  # the same patches, renamed

    note = translate_decoder(decoder_dir, TINY_ASSET, new_path, tmp_path / "out", images)
    assert note["new_codes_seen"] == len(seen) and note["images"] == 8
    a, _ = load_decoder(decoder_dir)
    b, meta = load_decoder(tmp_path / "out")
    assert meta["movqgan"]["sha256"] == file_sha256(str(new_path)) and meta["layout"]["codebook_size"] == 1024
    off = Layout.shapes().code_offset
    k = seen[:10]
    old_ids = [1, 5, 7] + (off + perm[k]).tolist()  # some text, then old codes
    new_ids = [1, 5, 7] + (off + k).tolist()  # the same patches under the new names
    la, lb = logits(a, old_ids), logits(b, new_ids)
    assert torch.allclose(lb[:, off + seen], la[:, off + perm[seen]], atol=1e-5)
    assert torch.allclose(lb[:, :off], la[:, :off], atol=1e-5)


def test_a_grown_codebook_widens_the_vocabulary_and_keeps_the_old_codes(tmp_path, decoder_dir):
    old = load_movqgan(TINY_ASSET, "tiny")
    new_path = tmp_path / "grown.safetensors"
    save_movqgan(grow_codebook(old, 1100), new_path, dtype=torch.float16)
    note = translate_decoder(decoder_dir, TINY_ASSET, new_path, tmp_path / "out", image_pool(4, 32, first_seed=5))
    assert note["same_index"] == 1.0
    a, _ = load_decoder(decoder_dir)
    b, meta = load_decoder(tmp_path / "out")
    off = Layout.shapes().code_offset
    assert b.args.vocab_size == off + 1100 == meta["layout"]["vocab_size"] == meta["args"]["vocab_size"]
    assert meta["layout_fingerprint"] == Layout.shapes(codebook_size=1100).fingerprint
    ids = [1, 2, off + 3, off + 900]
    assert torch.allclose(logits(b, ids)[:, :off + 1024], logits(a, ids), atol=1e-5)
    # the grown entries, never seen, start from the old codes' mean
    assert torch.allclose(b.tok_embeddings.weight[off + 1050], a.tok_embeddings.weight[off:].mean(0), atol=1e-6)


def test_bad_translations_are_refused_with_nothing_written(tmp_path, decoder_dir, capsys):
    other = tmp_path / "other.safetensors"
    save_movqgan(load_movqgan(TINY_ASSET, "tiny"), other, dtype=torch.float32)  # same codes, another file
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:  # the decoder did not learn `other`'s codes
        main(["--decoder", str(decoder_dir), "--old", str(other), "--new", str(other), "--out", str(out),
              "--images", "2", "--size", "32"])
    assert e.value.code == 2 and "give the MoVQGAN whose codes it learned as --old" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    with pytest.raises(SystemExit) as e:
        main(["--decoder", str(decoder_dir), "--old", str(TINY_ASSET), "--new", str(other), "--out", str(out)])
    assert e.value.code == 2 and "exists" in capsys.readouterr().err
    assert json.loads((decoder_dir / "panelforge.json").read_text())["layout"]["codebook_size"] == 1024
