"""The shipped small models match their recorded fingerprints, fit the size budget, and load."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def test_assets_match_their_fingerprints():
    recorded = json.loads((ASSETS / "fingerprints.json").read_text())
    shipped = sorted(str(p.relative_to(ASSETS)) for p in ASSETS.rglob("*") if p.is_file() and p.name != "fingerprints.json")
    assert sorted(recorded) == shipped
    for name, digest in recorded.items():
        assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == digest, f"assets/{name} changed"
    assert sum((ASSETS / n).stat().st_size for n in recorded) <= 20 * 2**20


def test_shipped_models_load_together():
    from model.hf_checkpoint import load_decoder
    from model.layout import Layout
    from model.movqgan import load_movqgan

    layout = Layout.shapes()
    decoder, meta = load_decoder(ASSETS / "decoder-tiny")
    assert meta["layout_fingerprint"] == layout.fingerprint
    assert decoder.tok_embeddings.weight.shape[0] == layout.vocab_size
    movq = load_movqgan(ASSETS / "movqgan-tiny.safetensors", "tiny")
    assert movq.quantize.embedding.weight.shape[0] == layout.codebook_size


def test_shipped_decoder_learned_the_shipped_movqgan_codes():
    # generate refuses a decoder whose recorded MoVQGAN is another file: the pair must ship together
    from storage.hashing import file_sha256

    meta = json.loads((ASSETS / "decoder-tiny" / "panelforge.json").read_text())
    assert meta["movqgan"]["sha256"] == file_sha256(str(ASSETS / "movqgan-tiny.safetensors"))


def test_decoder_only_finetune_keeps_the_codes_and_repoints_the_decoder(tmp_path):
    import numpy as np
    import pytest
    import torch

    from model.movqgan import MoVQGAN, load_movqgan, save_movqgan
    from storage.hashing import file_sha256
    from tasks.assets.train_movqgan import finetune_decoder, image_pool, repoint_decoder, same_codes

    torch.manual_seed(0)
    old = tmp_path / "old.safetensors"
    save_movqgan(MoVQGAN("tiny"), old, dtype=torch.float16)
    model, curve = finetune_decoder(str(old), steps=2, batch=2, window=4, pool_size=4, log_every=1)
    new = tmp_path / "new.safetensors"
    save_movqgan(model, new, dtype=torch.float16)
    assert same_codes(old, new) and len(curve) == 2
    a, b = load_movqgan(old, "tiny"), load_movqgan(new, "tiny")
    assert not torch.equal(a.decoder.conv_out.weight, b.decoder.conv_out.weight)  # the decoder half trained
    images = image_pool(3, 64, first_seed=777)
    assert torch.equal(a.encode(images), b.encode(images))
    assert not np.array_equal(a.decode(a.encode(images)).numpy(), b.decode(b.encode(images)).numpy())

    decoder = tmp_path / "decoder"
    decoder.mkdir()
    (decoder / "panelforge.json").write_text(json.dumps({"movqgan": {"sha256": file_sha256(str(old)), "weights": "x"}}))
    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    save_movqgan(MoVQGAN("tiny"), other, dtype=torch.float16)  # another encoder and codebook
    with pytest.raises(ValueError, match="codes differ"):
        repoint_decoder(decoder, old, other)
    with pytest.raises(ValueError, match="did not learn"):
        repoint_decoder(decoder, other, new)
    assert json.loads((decoder / "panelforge.json").read_text())["movqgan"]["sha256"] == file_sha256(str(old))
    rec = repoint_decoder(decoder, old, new)
    assert rec == {"sha256": file_sha256(str(new)), "weights": "x", "codes_same_as_sha256": file_sha256(str(old))}


def test_whole_model_finetune_trains_the_encoder_and_codebook_too(tmp_path):
    import torch

    from model.movqgan import MoVQGAN, load_movqgan, save_movqgan
    from tasks.assets.train_movqgan import same_codes, train

    torch.manual_seed(0)
    old = tmp_path / "old.safetensors"
    save_movqgan(MoVQGAN("tiny"), old, dtype=torch.float16)
    model, curve = train(steps=3, batch=2, crop=16, lr=1e-3, pool_size=4, log_every=1, init_from=str(old),
                         edge_weight=1.0)
    assert [r["step"] for r in curve] == [1, 2, 3] and all(r["edge"] > 0 for r in curve)
    new = tmp_path / "new.safetensors"
    save_movqgan(model, new, dtype=torch.float16)
    a = load_movqgan(old, "tiny")
    assert not torch.equal(a.encoder.conv_in.weight, model.encoder.conv_in.weight.half().float())
    assert not same_codes(old, new)  # a decoder trained on the old codes must learn the new ones

    # a wall-clock budget ends the run early, with the learning rate annealed over it
    _, short = train(steps=10_000, batch=2, crop=16, pool_size=4, log_every=1000, init_from=str(old),
                     budget_seconds=0.5)
    assert len(short) == 1 and 0 < short[0]["step"] < 10_000


def test_context_batches_keep_one_half_and_train_the_latents_to_match():
    import numpy as np
    import torch

    from tasks.assets.train_movqgan import _context_batch, image_pool, train

    pool = image_pool(6, 32, first_seed=900)
    seen = set()
    for seed in range(8):
        x, keep = _context_batch(pool, np.random.default_rng(seed), 3)
        seen.add(keep)
        a, b = x[:3], x[3:]
        kept = slice(0, 16) if keep == 0 else slice(16, 32)
        other = slice(16, 32) if keep == 0 else slice(0, 16)
        assert x.shape == (6, 3, 32, 32) and torch.equal(a[..., kept, :], b[..., kept, :])
        # the swapped half comes from pool images (another one, or by chance the same)
        pool_halves = torch.from_numpy(pool).permute(0, 3, 1, 2).float()[..., other, :] / 127.5 - 1.0
        assert all(any(torch.equal(h, p) for p in pool_halves) for h in b[..., other, :])
    assert seen == {0, 1}

    torch.manual_seed(0)
    _, curve = train(steps=2, batch=4, pool_size=4, log_every=1, context_weight=5.0)
    assert [r["step"] for r in curve] == [1, 2] and all(r["context"] > 0 for r in curve)


def test_a_grown_codebook_keeps_every_code_until_training_restarts_the_new_entries(tmp_path):
    import pytest
    import torch

    from model.movqgan import MoVQGAN, save_movqgan
    from tasks.assets.train_movqgan import grow_codebook, image_pool, train

    torch.manual_seed(0)
    small = MoVQGAN("tiny", n_embed=16)
    images = image_pool(4, 32, first_seed=700)
    grown = grow_codebook(small, 40)
    assert grown.n_embed == 40 and torch.equal(grown.quantize.embedding.weight[:16], small.quantize.embedding.weight)
    assert torch.equal(grown.encode(images), small.encode(images))  # the new entries are never the nearest
    with pytest.raises(ValueError, match="can grow, not shrink"):
        grow_codebook(small, 8)

    old = tmp_path / "old.safetensors"
    save_movqgan(small, old)
    model, curve = train(steps=2, batch=2, crop=16, pool_size=4, log_every=1, init_from=str(old), codes=40)
    assert model.n_embed == 40 and len(curve) == 2
    far = grown.quantize.embedding.weight[16:]
    # every new entry was restarted on an encoder output before the first step: none is left far away
    assert (model.quantize.embedding.weight[16:] - far).abs().min() > 1.0
    assert model.quantize.embedding.weight[16:].abs().max() < far.abs().min() / 10


def test_bad_training_options_are_refused_before_any_work(tmp_path, capsys):
    import pytest

    from tasks.assets.train_movqgan import main

    out = tmp_path / "m.safetensors"
    for argv, says in ((["--context-weight", "-1"], "--context-weight -1.0: a loss weight is 0 or more"),
                       (["--edge-weight", "-0.5"], "--edge-weight -0.5: a loss weight is 0 or more"),
                       (["--budget-seconds", "0"], "--budget-seconds 0.0: give a positive wall time"),
                       (["--codes", "2048"], "--codes grows a trained MoVQGAN's codebook: give --init-from"),
                       (["--codes", "1", "--init-from", "x.safetensors"], "--codes 1: a codebook has 2 entries")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--out", str(out)])
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert not out.exists()


def test_keep_codes_hold_the_reference_drawing_of_generated_codes(tmp_path, capsys):
    """--keep-codes: the decoder half also learns to draw generated code grids as the reference's
    decoder half does; after the same steps it draws them closer to the reference than a run without."""
    import pytest
    import torch
    from safetensors.torch import save_file

    from model.movqgan import MoVQGAN, save_movqgan
    from tasks.assets.train_movqgan import _render, finetune_decoder, load_keep_codes, main

    torch.manual_seed(0)
    init = MoVQGAN("tiny")
    reference = MoVQGAN("tiny")
    reference.load_state_dict({**reference.state_dict(), **{k: v for k, v in init.state_dict().items()
                                                             if not k.startswith(("decoder.", "post_quant_conv."))}})
    old, ref = tmp_path / "old.safetensors", tmp_path / "ref.safetensors"
    save_movqgan(init, old)
    save_movqgan(reference, ref)
    pool = tmp_path / "pool.safetensors"
    save_file({"codes_4x4": torch.randint(0, init.n_embed, (6, 4, 4), dtype=torch.int32),
               "codes_2x4": torch.zeros(1, 2, 4, dtype=torch.int32)}, str(pool))
    grids = load_keep_codes(pool)
    assert grids.shape == (6, 4, 4) and grids.dtype == torch.long  # the largest group of one shape

    def distance(model):
        with torch.no_grad():
            return (_render(model, grids) - _render(reference.eval(), grids)).abs().mean().item()

    runs = {}
    for weight in (0.0, 20.0):
        model, curve = finetune_decoder(str(old), steps=6, batch=2, window=4, lr=2e-3, pool_size=4, log_every=3,
                                        keep_codes=grids, keep_weight=weight, keep_reference=str(ref))
        runs[weight] = (distance(model), curve)
    assert "keep" not in runs[0.0][1][0] and all(r["keep"] > 0 for r in runs[20.0][1])
    assert runs[20.0][0] < 0.8 * runs[0.0][0] and runs[20.0][0] < distance(init.eval())

    out = tmp_path / "m.safetensors"
    other = tmp_path / "other.safetensors"
    save_movqgan(MoVQGAN("tiny"), other)  # another codebook: the codes would mean other pictures
    for argv, says in ((["--keep-codes", str(pool), "--init-from", str(old)], "give --freeze-codes"),
                       (["--freeze-codes", "--init-from", str(old), "--keep-reference", str(ref)], "needs --keep-codes"),
                       (["--freeze-codes", "--init-from", str(old), "--keep-codes", str(pool),
                         "--keep-reference", str(other)], "its codebook is not --init-from's"),
                       (["--freeze-codes", "--init-from", str(old), "--keep-codes", str(tmp_path / "none.safetensors")],
                        "--keep-codes"),
                       (["--keep-weight", "-1"], "--keep-weight -1.0: a loss weight is 0 or more")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--out", str(out)])
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert not out.exists()


def test_canny_loss_reads_canny_s_sobel_near_the_picture_s_edges_only(tmp_path, capsys):
    """canny_l1 compares the Sobel responses cv2.Canny computes, on the pixels next to the picture's
    own canny edges: a change far from every edge costs nothing, one on an edge does."""
    import cv2
    import numpy as np
    import pytest
    import torch

    from model.movqgan import MoVQGAN, save_movqgan
    from tasks.assets.train_movqgan import _sobel, canny_l1, canny_weights, finetune_decoder, main
    from tasks.panels.annotators import canny

    px = np.zeros((1, 32, 32, 3), np.uint8)
    px[0, 8:24, 10:20] = (200, 40, 90)  # one rectangle: its outline is the only edge
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    for ch in range(3):  # cv2's 3x3 Sobel, inside the border
        gx = cv2.Sobel(x[0, ch].numpy(), cv2.CV_32F, 1, 0, ksize=3)[1:-1, 1:-1]
        gy = cv2.Sobel(x[0, ch].numpy(), cv2.CV_32F, 0, 1, ksize=3)[1:-1, 1:-1]
        np.testing.assert_allclose(_sobel(x)[0, 2 * ch].numpy(), gx, atol=1e-5)
        np.testing.assert_allclose(_sobel(x)[0, 2 * ch + 1].numpy(), gy, atol=1e-5)
    w = canny_weights(x)
    edges = canny(px[0]) > 0
    assert w.shape == (1, 1, 30, 30) and edges.any()
    assert bool(w[0, 0][torch.from_numpy(edges[1:-1, 1:-1])].all())  # every edge pixel is weighed
    assert 0 < float(w.mean()) < 0.5  # ... and its neighbours, not the whole picture

    assert float(canny_l1(x, x, w)) == 0.0
    far = x.clone()
    far[..., 27:, 27:] += 0.5  # a corner well away from the rectangle
    assert float(canny_l1(far, x, w)) == 0.0
    near = x.clone()
    near[..., 8:24, 9:11] = 0.0  # the left side blurred into its neighbour
    assert float(canny_l1(near, x, w)) > 0.01
    flat = torch.zeros_like(x)
    assert float(canny_l1(near, flat, canny_weights(flat))) == 0.0  # no edges, nothing to match

    torch.manual_seed(0)
    old = tmp_path / "old.safetensors"
    save_movqgan(MoVQGAN("tiny"), old)
    _, curve = finetune_decoder(str(old), steps=2, batch=2, window=4, pool_size=4, log_every=1, canny_weight=0.1)
    assert all(r["canny"] > 0 for r in curve)
    _, plain = finetune_decoder(str(old), steps=1, batch=2, window=4, pool_size=4, log_every=1)
    assert "canny" not in plain[0]

    out = tmp_path / "m.safetensors"
    for argv, says in ((["--canny-weight", "-1"], "--canny-weight -1.0: a loss weight is 0 or more"),
                       (["--canny-weight", "0.1", "--init-from", str(old)], "--canny-weight trains the decoder half")):
        with pytest.raises(SystemExit) as e:
            main(argv + ["--out", str(out)])
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert not out.exists()
