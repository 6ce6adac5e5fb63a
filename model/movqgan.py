"""SBER-MoVQGAN: the image tokenizer of Lumina-mGPT 2.0 (images <-> 8x8-patch codes).

    python -m model.movqgan 270m                    # build, count parameters, encode a random batch
    python -m model.movqgan tiny assets/movqgan-tiny.safetensors

Structure (REFERENCE.md, "The image tokenizer"): the taming-VQGAN `encoder` (downsample = pad
(0,1,0,1) then a stride-2 3x3 conv), `quant_conv` (1x1), `quantize` (nearest codebook vector in L2,
indices in raster order), `post_quant_conv` (1x1) and the MoVQ `decoder`, whose every norm is a
SpatialNorm modulated by the quantized latent (MoVQ, Zheng et al. 2022, eq. 3). Module names follow
the official flat state_dict so that its checkpoints load key for key; `load_movqgan` checks the
key set explicitly (the upstream loader's strict=False hides mismatches).

The network is fully convolutional: encode/decode take any size that is a multiple of 8, batched.
On a GPU, `prepare("cuda")` runs it in bf16 autocast and channels-last (optionally compiled).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# ddconfig of the official presets (MoVQGAN's movqgan/__init__.py); "tiny" keeps the same
# architecture at a width that trains on a CPU in minutes, for the tests and the shipped demo.
_COMMON = dict(ch_mult=(1, 2, 2, 4), attn_resolutions=(32,), resolution=256, z_channels=4, embed_dim=4,
               in_channels=3, out_ch=3)
PRESETS: dict[str, dict] = {
    "tiny": dict(_COMMON, ch=32, num_res_blocks=1, n_embed=1024),
    "67m": dict(_COMMON, ch=128, num_res_blocks=2, n_embed=16384),
    "102m": dict(_COMMON, ch=128, num_res_blocks=4, n_embed=16384),
    "270m": dict(_COMMON, ch=256, num_res_blocks=2, n_embed=16384),
}
PATCH = 8  # pixels per code: ch_mult has 4 levels, 3 downsamplings


class MoVQGANError(ValueError):
    """Bad input to the tokenizer or a checkpoint that does not fit the preset."""


# The architecture in the official repo's keys (its configs/*.yaml: model.params.{embed_dim, n_embed,
# ddconfig}). Any MoVQGAN is these numbers; the presets above are names for the known ones.
ARCH_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embed_dim", "n_embed")
ARCH_DEFAULTS = dict(resolution=256, in_channels=3, out_ch=3)
# Keys of the official configs that do not change the network's weights (training or loader options).
ARCH_IGNORED = {"double_z", "dropout", "target", "ckpt_path", "ignore_keys", "image_key", "monitor", "lossconfig",
                "remap", "sane_index_shape", "colorize_nlabels", "learning_rate", "use_ema", "base_learning_rate"}
# Files read beside a checkpoint <stem>.safetensors (first found wins).
CONFIG_NAMES = ("{stem}.json", "{stem}.yaml", "{stem}.yml", "config.json", "config.yaml", "config.yml")


def architecture(spec: dict, where: str = "MoVQGAN config") -> dict:
    """The full architecture from a config in the official layout: flat keys, or {embed_dim, n_embed,
    ddconfig: {...}}, or a whole official YAML ({model: {params: ...}}). Every error names the key."""
    if not isinstance(spec, dict):
        raise MoVQGANError(f"{where}: expected a mapping of the official keys {ARCH_KEYS}, got {type(spec).__name__}")
    if isinstance(spec.get("model"), dict):
        spec = spec["model"].get("params", spec["model"])
    flat = {k: v for k, v in spec.items() if k != "ddconfig"}
    if isinstance(spec.get("ddconfig"), dict):
        flat.update(spec["ddconfig"])
    if flat.get("double_z"):
        raise MoVQGANError(f"{where}: double_z=true is a KL autoencoder's encoder, not MoVQGAN's; set it false")
    unknown = sorted(set(flat) - set(ARCH_KEYS) - set(ARCH_DEFAULTS) - ARCH_IGNORED)
    if unknown:
        raise MoVQGANError(f"{where}: unknown keys {unknown}; expected {list(ARCH_KEYS)} (+ {sorted(ARCH_DEFAULTS)})")
    missing = [k for k in ARCH_KEYS if k not in flat]
    if missing:
        raise MoVQGANError(f"{where}: missing {missing}; a MoVQGAN config names {list(ARCH_KEYS)}")
    cfg = dict(ARCH_DEFAULTS)
    try:
        cfg.update({k: int(flat[k]) for k in ("ch", "num_res_blocks", "z_channels", "embed_dim", "n_embed")})
        cfg.update({k: int(flat[k]) for k in ARCH_DEFAULTS if k in flat})
        cfg["ch_mult"] = tuple(int(m) for m in flat["ch_mult"])
        cfg["attn_resolutions"] = tuple(int(r) for r in flat["attn_resolutions"])
    except (TypeError, ValueError) as e:
        raise MoVQGANError(f"{where}: {e}; ch, num_res_blocks, z_channels, embed_dim, n_embed are integers, "
                           "ch_mult and attn_resolutions lists of integers") from None
    if 2 ** (len(cfg["ch_mult"]) - 1) != PATCH:
        raise MoVQGANError(f"{where}: ch_mult {list(cfg['ch_mult'])} downsamples x{2 ** (len(cfg['ch_mult']) - 1)}; "
                           f"the token layout needs x{PATCH} (four levels, as every released MoVQGAN)")
    bad = [cfg["ch"] * m for m in cfg["ch_mult"] if (cfg["ch"] * m) % 32]
    if bad:
        raise MoVQGANError(f"{where}: channel widths {bad} are not multiples of 32 (GroupNorm's 32 groups)")
    if cfg["n_embed"] < 2 or min(cfg["ch"], cfg["num_res_blocks"], cfg["z_channels"], cfg["embed_dim"]) < 1:
        raise MoVQGANError(f"{where}: sizes must be positive and n_embed >= 2")
    return cfg


def preset_of(cfg: dict) -> str | None:
    """The preset name of an architecture, when it is one of the known ones."""
    for name, p in PRESETS.items():
        if architecture(p, name) == cfg:
            return name
    return None


def config_beside(weights: str | Path) -> tuple[dict, str] | None:
    """(architecture, file) from a config file next to the weights, or from the architecture that
    save_movqgan writes into a .safetensors header; None when there is neither."""
    import yaml

    p = Path(weights)
    for pattern in CONFIG_NAMES:
        f = p.parent / pattern.format(stem=p.stem)
        if not f.is_file() or f == p:
            continue
        try:
            data = json.loads(f.read_text()) if f.suffix == ".json" else yaml.safe_load(f.read_text())
        except (ValueError, yaml.YAMLError) as e:
            raise MoVQGANError(f"{f}: not valid {f.suffix[1:].upper()} ({e})") from None
        # A shared name (config.json) may belong to something else in the folder, e.g. a decoder.
        if pattern.startswith("config.") and not _names_movqgan(data):
            continue
        return architecture(data, str(f)), str(f)
    if p.suffix == ".safetensors" and p.is_file():
        from safetensors import safe_open

        with safe_open(str(p), "pt") as sf:
            meta = sf.metadata() or {}
        if meta.get("architecture"):
            return architecture(json.loads(meta["architecture"]), f"{p} (header)"), f"{p} (header)"
    return None


def _names_movqgan(data) -> bool:
    if not isinstance(data, dict):
        return False
    params = data["model"].get("params", {}) if isinstance(data.get("model"), dict) else data
    return isinstance(params, dict) and ("n_embed" in params or isinstance(params.get("ddconfig"), dict))


def resolve_architecture(weights: str | Path | None, preset: str | None = "270m",
                         config: dict | None = None) -> tuple[dict, str]:
    """(architecture, where it came from): `config` (models.movqgan) first, then a config beside the
    weights, then the preset's name. Reads no weights."""
    if config:
        return architecture(config, "models.movqgan"), "models.movqgan"
    if weights is not None:
        found = config_beside(weights)
        if found:
            return found
    if preset not in PRESETS:
        raise MoVQGANError(f"unknown MoVQGAN preset {preset!r}: expected one of {sorted(PRESETS)}, or give the "
                           "architecture in a config beside the weights or under models.movqgan")
    return architecture(PRESETS[preset], preset), f"preset {preset!r}"


def swish(x):
    return x * torch.sigmoid(x)


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class SpatialNorm(nn.Module):
    """GroupNorm(f) * conv_y(zq) + conv_b(zq), zq resized to f by nearest (MoVQ eq. 3)."""

    def __init__(self, c: int, zq_ch: int):
        super().__init__()
        self.norm_layer = group_norm(c)
        self.conv_y = nn.Conv2d(zq_ch, c, 1)
        self.conv_b = nn.Conv2d(zq_ch, c, 1)

    def forward(self, f, zq):
        if zq.shape[-2:] != f.shape[-2:]:
            zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class Norm(nn.Module):
    """GroupNorm in the encoder, SpatialNorm in the decoder; one call signature for both."""

    def __new__(cls, c: int, zq_ch: int | None):
        return SpatialNorm(c, zq_ch) if zq_ch else _PlainNorm(c)


class _PlainNorm(nn.GroupNorm):
    def __init__(self, c: int):
        super().__init__(32, c, eps=1e-6, affine=True)

    def forward(self, x, zq=None):
        return super().forward(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, zq_ch: int | None = None):
        super().__init__()
        self.norm1 = Norm(cin, zq_ch)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = Norm(cout, zq_ch)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x, zq=None):
        h = self.conv1(swish(self.norm1(x, zq)))
        h = self.conv2(swish(self.norm2(h, zq)))  # dropout is 0 in every preset
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1x1-conv projections, scale C^-0.5."""

    def __init__(self, c: int, zq_ch: int | None = None):
        super().__init__()
        self.norm = Norm(c, zq_ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x, zq=None):
        h = self.norm(x, zq)
        b, c, hh, ww = x.shape
        q, k, v = (p(h).reshape(b, 1, c, hh * ww).transpose(-1, -2) for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # default scale is C^-0.5, as the original
        return x + self.proj_out(o.transpose(-1, -2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, in_channels, **_):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        res, cin = resolution, ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(cin, ch * mult))
                cin = ch * mult
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(cin)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(cin, cin), AttnBlock(cin), ResnetBlock(cin, cin)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, z_channels, 3, padding=1)  # double_z=False

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class MOVQDecoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, out_ch, embed_dim, **_):
        super().__init__()
        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        zq = embed_dim
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, zq)
        self.mid.attn_1 = AttnBlock(cin, zq)
        self.mid.block_2 = ResnetBlock(cin, cin, zq)
        up = []
        for i in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, ch * ch_mult[i], zq))
                cin = ch * ch_mult[i]
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(cin, zq))
            if i != 0:
                level.upsample = Upsample(cin)
                res *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = SpatialNorm(cin, zq)
        self.conv_out = nn.Conv2d(cin, out_ch, 3, padding=1)

    def forward(self, z, zq):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, zq), zq), zq)
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h, zq)
                if len(level.attn):
                    h = level.attn[j](h, zq)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h, zq)))


class VectorQuantizer(nn.Module):
    """Nearest codebook vector in L2 (taming's VectorQuantizer2, remap=None)."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, h, w] -> LongTensor [B, h, w], distances in fp32, chunked to bound memory."""
        b, d, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)
        e = self.embedding.weight.float()
        e2 = (e * e).sum(1)
        step = max(1, (1 << 26) // e.shape[0])  # <= 256 MiB of fp32 distances at a time
        out = [torch.argmin(e2 - 2 * chunk @ e.t(), dim=1) for chunk in flat.split(step)]  # |z|^2 is constant per row
        return torch.cat(out).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> zq [B, D, h, w]."""
        return self.embedding(codes).permute(0, 3, 1, 2)


@dataclass
class VQOutput:
    recon: torch.Tensor  # [B, 3, H, W] in about [-1, 1]
    codes: torch.Tensor  # [B, H/8, W/8]
    codebook_loss: torch.Tensor  # ||sg(z) - e||^2: moves the codebook
    commit_loss: torch.Tensor  # ||z - sg(e)||^2: keeps the encoder near its codes
    stats: dict = field(default_factory=dict)
    latent: torch.Tensor | None = None  # z [B, embed_dim, H/8, W/8] before quantization


class MoVQGAN(nn.Module):
    def __init__(self, preset: str = "tiny", config: dict | None = None, **overrides):
        """A preset by name, or any architecture (`config`: the official keys, see architecture())."""
        super().__init__()
        if config is None and preset not in PRESETS:
            raise MoVQGANError(f"unknown MoVQGAN preset {preset!r}: expected one of {sorted(PRESETS)}")
        cfg = dict(architecture(config) if config is not None else PRESETS[preset], **overrides)
        if config is not None:
            preset = preset_of(cfg) or "custom"
        self.preset, self.config = preset, cfg
        self.encoder = Encoder(**cfg)
        self.quant_conv = nn.Conv2d(cfg["z_channels"], cfg["embed_dim"], 1)
        self.quantize = VectorQuantizer(cfg["n_embed"], cfg["embed_dim"])
        self.post_quant_conv = nn.Conv2d(cfg["embed_dim"], cfg["z_channels"], 1)
        self.decoder = MOVQDecoder(**cfg)
        self.amp_dtype: torch.dtype | None = None
        self.channels_last = False
        self._latent = self._encode_latent
        self.static_batches = False

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "MoVQGAN":
        return cls(preset, **overrides).eval()

    @property
    def n_embed(self) -> int:
        return self.quantize.embedding.num_embeddings

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    def prepare(self, device: str | torch.device = "cpu", amp: bool | None = None, channels_last: bool | None = None,
                compile: bool = False, cuda_graphs: bool | None = None) -> "MoVQGAN":
        """Move to a device for inference. On CUDA the defaults are bf16 autocast + channels-last;
        compile=True wraps the encoder: on CUDA (cuda_graphs, default on) with static shapes and
        one CUDA graph per bucket shape (mode reduce-overhead; encode() pads a short last batch
        to batch_size so a bucket has one shape), elsewhere with dynamic shapes."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        self.to(device).eval()
        self.amp_dtype = torch.bfloat16 if (cuda if amp is None else amp) else None
        self.channels_last = cuda if channels_last is None else channels_last
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        self.static_batches = bool(compile and (cuda if cuda_graphs is None else cuda_graphs))
        if self.static_batches:
            import torch._dynamo as dynamo

            # one graph per (batch, bucket) shape: more buckets than dynamo's default of 8
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            self._latent = torch.compile(self._encode_latent, mode="reduce-overhead", dynamic=False)
        elif compile:
            self._latent = torch.compile(self._encode_latent, dynamic=True)
        else:
            self._latent = self._encode_latent
        return self

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _encode_latent(self, x):
        with self._autocast():
            return self.quant_conv(self.encoder(x))

    def to_input(self, images) -> torch.Tensor:
        """uint8 [B,H,W,3] (numpy or tensor) or float [-1,1] [B,3,H,W] -> float [B,3,H,W] on the device."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor):
            raise MoVQGANError(f"images of type {type(images).__name__}: expected a numpy array or a tensor")
        if images.dtype == torch.uint8:
            if images.ndim != 4 or images.shape[-1] != 3:
                raise MoVQGANError(f"uint8 images of shape {tuple(images.shape)}: expected [B, H, W, 3]")
            # x/127.5 - 1 as the release; convert on the device (uint8 moves 4x fewer bytes)
            x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        else:
            if images.ndim != 4 or images.shape[1] != 3:
                raise MoVQGANError(f"float images of shape {tuple(images.shape)}: expected [B, 3, H, W] in [-1, 1]")
            x = images.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        if h % PATCH or w % PATCH or h == 0 or w == 0:
            raise MoVQGANError(f"image size {w}x{h}: both sides must be positive multiples of {PATCH}")
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def encode(self, images, batch_size: int | None = None) -> torch.Tensor:
        """Images -> codes LongTensor [B, H/8, W/8] (raster order)."""
        x = self.to_input(images)
        size = batch_size or max(1, len(x))
        parts = []
        for chunk in x.split(size):
            n = len(chunk)
            if self.static_batches and n < size:  # the compiled graph's one shape; GroupNorm is per image
                chunk = torch.cat([chunk, chunk.new_zeros((size - n, *chunk.shape[1:]))])
            # indices() reads the latent at once: a CUDA graph's output is overwritten by its next replay
            parts.append(self.quantize.indices(self._latent(chunk))[:n])
        return torch.cat(parts)

    @torch.inference_mode()
    def decode(self, codes, batch_size: int | None = None) -> torch.Tensor:
        """Codes [B, h, w] (tensor or numpy) -> images float [B, 3, 8h, 8w] clamped to [-1, 1]."""
        c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes).to(self.device).long()
        if c.ndim == 2:
            c = c[None]
        if c.ndim != 3 or c.numel() == 0:
            raise MoVQGANError(f"codes of shape {tuple(c.shape)}: expected [B, rows, cols]")
        if c.min() < 0 or c.max() >= self.n_embed:
            raise MoVQGANError(f"codes {int(c.min())}..{int(c.max())} outside the codebook 0..{self.n_embed - 1}")
        return torch.cat([self.decode_latent(self.quantize.lookup(chunk)) for chunk in c.split(batch_size or len(c))])

    @torch.inference_mode()
    def latent(self, images) -> torch.Tensor:
        """Images -> the encoder's latent before quantization, float [B, embed_dim, H/8, W/8]
        (encode() gives the index of each position's nearest codebook vector)."""
        return self._encode_latent(self.to_input(images)).float()

    @torch.inference_mode()
    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """A latent [B, embed_dim, h, w] -> images float [B, 3, 8h, 8w] clamped to [-1, 1]. decode()
        passes codebook vectors; an unquantized latent() shows what these weights draw without the
        codebook's rounding (bench/eval_ceiling.py)."""
        zq = z.to(self.device).float()
        if self.channels_last:
            zq = zq.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self.decoder(self.post_quant_conv(zq), zq).float().clamp_(-1, 1)

    def forward(self, x: torch.Tensor) -> VQOutput:
        """Training pass: straight-through quantization (VQ-VAE, van den Oord et al. 2017, eq. 3)."""
        z = self.quant_conv(self.encoder(x))
        codes = self.quantize.indices(z.detach())
        e = self.quantize.lookup(codes)
        codebook_loss = F.mse_loss(e, z.detach())
        commit_loss = F.mse_loss(z, e.detach())
        zq = z + (e - z).detach()
        recon = self.decoder(self.post_quant_conv(zq), zq)
        return VQOutput(recon, codes, codebook_loss, commit_loss, latent=z)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [-1, 1] [B, 3, H, W] -> uint8 numpy [B, H, W, 3]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def encoder_flops(preset: str, height: int, width: int) -> float:
    """FLOPs (2 x multiply-adds) of encoder + quant_conv + code search for one image: convs and
    attention matmuls (norms and activations are negligible). tests check it against torch's
    FlopCounterMode on the real module."""
    cfg = PRESETS[preset]
    total = 0.0
    ch, mult, nrb = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"]

    def conv(cin, cout, k, h, w):
        return 2.0 * cin * cout * k * k * h * w

    def attn(c, h, w):
        n = h * w
        return 4 * conv(c, c, 1, h, w) + 2 * 2.0 * n * n * c  # q, k, v, proj + QK^T and AV

    h, w = height, width
    total += conv(cfg["in_channels"], ch, 3, h, w)
    cin, res = ch, cfg["resolution"]
    for i, m in enumerate(mult):
        for _ in range(nrb):
            cout = ch * m
            total += conv(cin, cout, 3, h, w) + conv(cout, cout, 3, h, w) + (conv(cin, cout, 1, h, w) if cin != cout else 0)
            cin = cout
            if res in cfg["attn_resolutions"]:
                total += attn(cin, h, w)
        if i != len(mult) - 1:
            h, w, res = h // 2, w // 2, res // 2
            total += conv(cin, cin, 3, h, w)
    total += 2 * (2 * conv(cin, cin, 3, h, w)) + attn(cin, h, w)
    total += conv(cin, cfg["z_channels"], 3, h, w) + conv(cfg["z_channels"], cfg["embed_dim"], 1, h, w)
    total += 2.0 * h * w * cfg["embed_dim"] * cfg["n_embed"]
    return total


# --- checkpoints ------------------------------------------------------------------------------
# Keys of a training checkpoint that inference does not need: the loss (LPIPS + discriminator) and
# LitEma copies. Reported, never loaded; anything else unexpected is an error.
IGNORED_PREFIXES = ("loss.", "ema_", "model_ema.")
# The demo's tiny model, trained on the shapes source by tasks/assets/train_movqgan.py (docs/tokenize.md).
TINY_ASSET = Path(__file__).resolve().parent.parent / "assets" / "movqgan-tiny.safetensors"


class CheckpointError(MoVQGANError):
    """A checkpoint whose keys or shapes do not fit the preset; lists them by name."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state_dict from .safetensors or .ckpt/.pt/.pth (torch.load with weights_only=True)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: MoVQGAN checkpoint not found (models.movqgan_path)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # an untrusted pickle with code in it lands here: never retried unsafely
        raise CheckpointError(f"{p}: cannot read as a weights-only torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]  # a Lightning checkpoint (MoVQGAN's init_from_ckpt reads this key)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{p}: expected a flat state_dict of tensors")
    return sd


@dataclass
class LoadReport:
    path: str
    loaded: int
    ignored: list[str]  # training-only keys (loss, EMA) that were skipped


def load_movqgan(path: str | Path, preset: str | None = "270m", device: str | torch.device = "cpu",
                 config: dict | None = None) -> MoVQGAN:
    """A MoVQGAN with the weights of an official-layout checkpoint. Its architecture: `config` (the
    official keys), else a config beside the weights (<stem>.json/.yaml, config.json/.yaml, or the
    .safetensors header written by save_movqgan), else `preset`. Every missing, unexpected or
    wrong-shape key is an error that names it. The report is at model.load_report."""
    arch, where = resolve_architecture(path, preset, config)
    sd = read_state_dict(path)
    model = MoVQGAN(config=arch)
    preset = f"{model.preset} (from {where})"
    expected = model.state_dict()
    ignored = sorted(k for k in sd if k not in expected and k.startswith(IGNORED_PREFIXES))
    unexpected = sorted(k for k in sd if k not in expected and k not in ignored)
    missing = sorted(k for k in expected if k not in sd)
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in sd and sd[k].shape != v.shape)
    if missing or unexpected or shapes:
        def names(title, items):
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else "") if items else ""

        raise CheckpointError(
            f"{path}: does not fit MoVQGAN {preset}"
            + names("missing", missing) + names("unexpected", unexpected) + names("wrong shape", shapes)
            + "\n  check models.movqgan_preset (tiny, 67m, 102m, 270m), or give the architecture in a config "
            "beside the weights (<name>.json with ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, "
            "embed_dim, n_embed) or under models.movqgan"
        )
    model.load_state_dict({k: sd[k].float() for k in expected}, strict=True)
    if ignored:
        log.info("%s: skipped %d training-only keys (%s ...)", path, len(ignored), ignored[0])
    model.load_report = LoadReport(str(path), len(expected), ignored)
    return model.prepare(device)


def save_movqgan(model: MoVQGAN, path: str | Path, dtype: torch.dtype = torch.float32, meta: dict | None = None):
    """Write the official flat key layout as safetensors (meta: preset and any notes)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    arch = {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()}
    save_file(sd, str(path), metadata={"preset": model.preset, "architecture": json.dumps(arch),
                                       **{k: str(v) for k, v in (meta or {}).items()}})


if __name__ == "__main__":
    preset = sys.argv[1] if len(sys.argv) > 1 else "tiny"
    m = load_movqgan(sys.argv[2], preset) if len(sys.argv) > 2 else MoVQGAN.from_preset(preset)
    print(f"MoVQGAN {preset}: {count_parameters(m) / 1e6:.1f}M parameters, codebook {m.n_embed}")
    imgs = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    t = time.perf_counter()
    codes = m.encode(imgs)
    print(f"encode {imgs.shape} -> {tuple(codes.shape)} in {time.perf_counter() - t:.2f}s; "
          f"decode -> {tuple(m.decode(codes).shape)}")
