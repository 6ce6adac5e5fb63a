"""MoVQGAN: parameter counts, the official key layout, checkpoint checks, encode/decode, FLOPs.

    .venv/bin/python -m pytest -q tests/model/test_movqgan.py
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from model.movqgan import (PRESETS, CheckpointError, MoVQGAN, MoVQGANError, count_parameters, encoder_flops,
                           load_movqgan, save_movqgan, to_uint8)


def official_keys(cfg: dict) -> set[str]:
    """Parameter names of the upstream MOVQ model (taming Encoder + MOVQDecoder + VectorQuantizer2),
    enumerated from the upstream code's structure, independently of model/movqgan.py."""
    keys: set[str] = set()

    def conv(p):
        keys.update({f"{p}.weight", f"{p}.bias"})

    def norm(p, spatial):
        if spatial:
            conv(f"{p}.norm_layer"), conv(f"{p}.conv_y"), conv(f"{p}.conv_b")
        else:
            conv(p)  # GroupNorm weight + bias

    def block(p, cin, cout, spatial):
        norm(f"{p}.norm1", spatial), conv(f"{p}.conv1"), norm(f"{p}.norm2", spatial), conv(f"{p}.conv2")
        if cin != cout:
            conv(f"{p}.nin_shortcut")

    def attn(p, spatial):
        norm(f"{p}.norm", spatial)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.{n}")

    ch, mult, nrb = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"]
    res, cin = cfg["resolution"], ch
    conv("encoder.conv_in")
    for i, m in enumerate(mult):
        for j in range(nrb):
            block(f"encoder.down.{i}.block.{j}", cin, ch * m, False)
            cin = ch * m
            if res in cfg["attn_resolutions"]:
                attn(f"encoder.down.{i}.attn.{j}", False)
        if i != len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv")
            res //= 2
    block("encoder.mid.block_1", cin, cin, False), attn("encoder.mid.attn_1", False)
    block("encoder.mid.block_2", cin, cin, False)
    norm("encoder.norm_out", False), conv("encoder.conv_out")
    conv("quant_conv"), conv("post_quant_conv")
    keys.add("quantize.embedding.weight")
    conv("decoder.conv_in")
    block("decoder.mid.block_1", cin, cin, True), attn("decoder.mid.attn_1", True)
    block("decoder.mid.block_2", cin, cin, True)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            block(f"decoder.up.{i}.block.{j}", cin, ch * mult[i], True)
            cin = ch * mult[i]
            if res in cfg["attn_resolutions"]:
                attn(f"decoder.up.{i}.attn.{j}", True)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv")
            res *= 2
    norm("decoder.norm_out", True), conv("decoder.conv_out")
    return keys


@pytest.mark.parametrize("preset, millions", [("67m", 67.8), ("102m", 101.6), ("270m", 270.7)])
def test_parameter_counts_and_official_keys(preset, millions):
    with torch.device("meta"):
        model = MoVQGAN(preset)
    assert round(count_parameters(model) / 1e6, 1) == millions
    assert set(model.state_dict()) == official_keys(PRESETS[preset])
    assert model.quantize.embedding.weight.shape == (16384, 4)


@pytest.fixture(scope="module")
def tiny() -> MoVQGAN:
    torch.manual_seed(0)
    return MoVQGAN.from_preset("tiny")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.zeros((3, 40, 24, 3), np.uint8)
    for i in range(3):  # blocky content so that codes differ across the image
        x[i] = np.kron(rng.integers(0, 256, (5, 3, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    return x


def test_tiny_keeps_the_architecture(tiny):
    assert set(tiny.state_dict()) == official_keys(PRESETS["tiny"])
    assert count_parameters(tiny) < 4_000_000  # a few MB shipped


def test_encode_decode_any_multiple_of_8_batched(tiny, images):
    codes = tiny.encode(images)
    assert codes.shape == (3, 5, 3) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < tiny.n_embed
    one_by_one = torch.cat([tiny.encode(images[i:i + 1]) for i in range(3)])
    assert torch.equal(codes, one_by_one)
    assert torch.equal(codes, tiny.encode(images, batch_size=2))
    # float [-1, 1] input gives the same codes as uint8
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(tiny.encode(x), codes)
    out = tiny.decode(codes)
    assert out.shape == (3, 3, 40, 24) and out.min() >= -1 and out.max() <= 1
    assert to_uint8(out).shape == (3, 40, 24, 3)
    assert torch.allclose(tiny.decode(codes[1]), out[1:2], atol=1e-5)


def test_latent_is_what_encode_rounds_and_decode_latent_draws_it(tiny, images):
    """latent() is the encoder's output before the codebook: its nearest codebook vectors are
    encode()'s codes, and decode_latent() of those vectors is decode() of the codes."""
    z = tiny.latent(images)
    assert z.shape == (3, 4, 5, 3) and z.dtype == torch.float32
    codes = tiny.encode(images)
    assert torch.equal(tiny.quantize.indices(z), codes)
    with torch.inference_mode():
        vectors = tiny.quantize.lookup(codes)
    assert torch.allclose(tiny.decode_latent(vectors), tiny.decode(codes), atol=1e-6)
    unrounded = tiny.decode_latent(z)
    assert unrounded.shape == (3, 3, 40, 24) and not torch.allclose(unrounded, tiny.decode(codes))


def test_channels_last_same_codes(images):
    torch.manual_seed(0)
    a = MoVQGAN.from_preset("tiny")
    b = MoVQGAN.from_preset("tiny")
    b.load_state_dict(a.state_dict())
    b.prepare("cpu", channels_last=True)
    assert torch.equal(a.encode(images), b.encode(images))


def test_nearest_neighbour_in_raster_order(tiny):
    z = torch.randn(2, 4, 3, 5)
    got = tiny.quantize.indices(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    want = torch.cdist(flat, tiny.quantize.embedding.weight).argmin(1).view(2, 3, 5)
    assert torch.equal(got, want)


def test_bad_images(tiny):
    with pytest.raises(MoVQGANError, match="multiples of 8"):
        tiny.encode(np.zeros((1, 30, 24, 3), np.uint8))
    with pytest.raises(MoVQGANError, match=r"\[B, H, W, 3\]"):
        tiny.encode(np.zeros((1, 32, 32), np.uint8))
    with pytest.raises(MoVQGANError, match="outside the codebook"):
        tiny.decode(torch.full((1, 2, 2), tiny.n_embed))


def _official_sd(model: MoVQGAN) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["lightning.ckpt", "flat.pt", "model.safetensors"])
def test_checkpoint_in_official_layout_loads(tmp_path, tiny, images, fmt):
    sd = _official_sd(tiny)
    path = tmp_path / fmt
    if fmt == "lightning.ckpt":  # MoVQGAN's training checkpoint: a state_dict key + loss weights
        sd["loss.discriminator.main.0.weight"] = torch.zeros(2, 3, 4, 4)
        torch.save({"state_dict": sd, "epoch": 3}, path)
    elif fmt == "flat.pt":
        torch.save(sd, path)
    else:
        save_movqgan(tiny, path)
    loaded = load_movqgan(path, "tiny")
    assert loaded.load_report.loaded == len(official_keys(PRESETS["tiny"]))
    assert loaded.load_report.ignored == (["loss.discriminator.main.0.weight"] if fmt == "lightning.ckpt" else [])
    assert torch.equal(loaded.encode(images), tiny.encode(images))


def test_checkpoint_with_missing_and_wrong_shape_keys(tmp_path, tiny):
    sd = _official_sd(tiny)
    del sd["decoder.up.0.block.1.norm1.conv_y.weight"]
    del sd["encoder.down.3.attn.0.q.bias"]
    sd["quantize.embedding.weight"] = torch.zeros(16384, 4)
    sd["encoder.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError) as e:
        load_movqgan(tmp_path / "bad.ckpt", "tiny")
    msg = str(e.value)
    assert "missing (2): decoder.up.0.block.1.norm1.conv_y.weight, encoder.down.3.attn.0.q.bias" in msg
    assert "unexpected (1): encoder.extra.weight" in msg
    assert "quantize.embedding.weight: file (16384, 4) vs model (1024, 4)" in msg
    assert "movqgan_preset" in msg


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_untrusted_pickle_is_refused(tmp_path):
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_movqgan(tmp_path / "evil.ckpt", "tiny")
    with pytest.raises(CheckpointError, match="not found"):
        load_movqgan(tmp_path / "nope.ckpt", "tiny")


def test_flop_count_matches_torch_counter(tiny):
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, 64, 96)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        z = tiny.quant_conv(tiny.encoder(x))
        tiny.quantize.indices(z)
    counted = counter.get_total_flops()
    # Ours adds nothing torch leaves out except the codebook search (also a matmul, counted there).
    assert abs(encoder_flops("tiny", 64, 96) - counted) / counted < 0.01


def test_release_figures_of_flops():
    # REFERENCE.md: 0.89 / 3.72 / 8.94 TFLOP per image at 256 / 512 / 768 px for the 270M encoder.
    assert [round(encoder_flops("270m", s, s) / 1e12, 2) for s in (256, 512, 768)] == [0.89, 3.72, 8.94]


def test_same_network_as_diffusers_vqmodel(images):
    diffusers = pytest.importorskip("diffusers")  # only when already installed: not a dependency
    cfg = PRESETS["tiny"]
    ref = diffusers.VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
                            block_out_channels=tuple(cfg["ch"] * m for m in cfg["ch_mult"]),
                            layers_per_block=cfg["num_res_blocks"], latent_channels=4, num_vq_embeddings=cfg["n_embed"],
                            vq_embed_dim=4, norm_type="spatial", norm_num_groups=32)
    ours = MoVQGAN.from_preset("tiny")
    assert count_parameters(ref) == count_parameters(ours)


def test_shipped_tiny_model_reconstructs_shapes():
    from model.movqgan import TINY_ASSET
    from tasks.assets.train_movqgan import evaluate

    model = load_movqgan(TINY_ASSET, "tiny")
    assert TINY_ASSET.stat().st_size < 8 * 2**20
    metrics, _, _ = evaluate(model, count=4, size=128)  # held-out scenes at the demo's size
    torch.manual_seed(0)
    untrained, _, _ = evaluate(MoVQGAN.from_preset("tiny"), count=4, size=128)
    assert metrics["psnr"] > 17 and metrics["psnr"] > untrained["psnr"] + 5, (metrics, untrained)


def test_shipped_tiny_model_keeps_a_panels_codes_whatever_stands_beside_it():
    # a dual image is two pictures: the decoder can only learn what a code means if a panel's
    # codes do not change with the other panel (docs/assets.md, "Local codes"); measured as
    # bench.eval_ceiling measures it: each scene's upper panel swapped for the next scene's
    from bench.eval_ceiling import codes_kept
    from model.movqgan import TINY_ASSET
    from tasks.shapes.scenes import render_scene

    scenes = [render_scene(seed, 128, 128).image for seed in range(7000, 7004)]
    model = load_movqgan(TINY_ASSET, "tiny")
    codes = [model.encode(image[None]) for image in scenes]
    kept = codes_kept(model, scenes, codes)
    lower_codes = {code for c in codes for code in c[0, c.shape[1] // 2:].flatten().tolist()}  # lower panel's code rows
    assert min(kept) > 0.7, kept  # the MoVQGAN shipped until session 11: 0.08-0.45 on these scenes
    assert len(lower_codes) > 40  # and not by giving everything a few codes

# A MoVQGAN that is none of the presets (issue 17): ch 32, two blocks, attention at 8x8, 256 codes.
CUSTOM_YAML = """\
model:
  target: movqgan.models.vqgan.MOVQ
  params:
    embed_dim: 4
    n_embed: 256
    ddconfig:
      double_z: false
      z_channels: 4
      resolution: 64
      in_channels: 3
      out_ch: 3
      ch: 32
      ch_mult: [1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: [8]
      dropout: 0.0
"""


def test_a_non_preset_movqgan_loads_from_the_config_beside_its_weights(tmp_path):
    import yaml

    from model.movqgan import architecture, resolve_architecture

    arch = architecture(yaml.safe_load(CUSTOM_YAML))
    assert arch["n_embed"] == 256 and arch["attn_resolutions"] == (8,)
    torch.manual_seed(1)
    source = MoVQGAN(config=arch).eval()
    assert source.preset == "custom"
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    # The key set the upstream code would have for this config, enumerated independently; the
    # encoder has attention at the 8x8 level only (level 3 at resolution 64).
    assert set(sd) == official_keys(dict(arch))
    assert "encoder.down.3.attn.1.q.weight" in sd and not any(k.startswith("encoder.down.2.attn") for k in sd)
    torch.save({"state_dict": sd}, tmp_path / "movqgan-custom.ckpt")  # a Lightning-style flat checkpoint
    (tmp_path / "movqgan-custom.yaml").write_text(CUSTOM_YAML)

    model = load_movqgan(tmp_path / "movqgan-custom.ckpt")  # the default preset (270m) gives way to the file
    assert model.n_embed == 256 and model.load_report.loaded == len(sd)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    codes = model.encode(images)
    assert tuple(codes.shape) == (2, 4, 6) and int(codes.max()) < 256
    assert torch.equal(codes, source.encode(images))
    assert tuple(model.decode(codes).shape) == (2, 3, 32, 48)

    # The same architecture given in the config (models.movqgan), flat keys: same network.
    (tmp_path / "movqgan-custom.yaml").unlink()
    with pytest.raises(CheckpointError, match="does not fit MoVQGAN 270m"):
        load_movqgan(tmp_path / "movqgan-custom.ckpt")
    flat = {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}
    assert torch.equal(load_movqgan(tmp_path / "movqgan-custom.ckpt", config=flat).encode(images), codes)
    # save_movqgan records the architecture in the safetensors header: the file alone suffices.
    save_movqgan(model, tmp_path / "m.safetensors")
    assert resolve_architecture(tmp_path / "m.safetensors", "tiny")[0] == arch
    assert load_movqgan(tmp_path / "m.safetensors", "tiny").n_embed == 256


def test_bad_movqgan_configs_name_the_key(tmp_path):
    from model.movqgan import architecture, resolve_architecture

    with pytest.raises(MoVQGANError, match=r"missing \['n_embed'\]"):
        architecture({"ch": 32, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1, "attn_resolutions": [],
                      "z_channels": 4, "embed_dim": 4})
    base = dict(ch=32, ch_mult=[1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[], z_channels=4, embed_dim=4, n_embed=64)
    with pytest.raises(MoVQGANError, match="x16"):
        architecture(dict(base, ch_mult=[1, 1, 2, 2, 4]))
    with pytest.raises(MoVQGANError, match="multiples of 32"):
        architecture(dict(base, ch=48))
    with pytest.raises(MoVQGANError, match=r"unknown keys \['chanels'\]"):
        architecture(dict(base, chanels=3))
    with pytest.raises(MoVQGANError, match="unknown MoVQGAN preset 'big'"):
        resolve_architecture(None, "big")
    # A config.json that belongs to something else in the folder (a decoder) is not read as MoVQGAN's.
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    assert resolve_architecture(tmp_path / "w.ckpt", "tiny")[1] == "preset 'tiny'"
    assert architecture(PRESETS["270m"]) == resolve_architecture(None, "270m")[0]
