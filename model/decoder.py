"""The Lumina-mGPT 2.0 decoder: the Chameleon architecture, small and readable (gpt-fast style).

    python -c "from model.decoder import Decoder, ModelArgs; m = Decoder(ModelArgs.from_name('tiny', vocab_size=512)); print(sum(p.numel() for p in m.parameters()))"

Pre-norm RMSNorm (eps 1e-5), SwiGLU MLP, rotary embeddings (theta 10000, the rotate-half
convention of transformers), per-head qk LayerNorm with weight and bias applied before RoPE,
no other biases, untied input embedding and output head (REFERENCE.md, "The decoder").
The same numbers as transformers' ChameleonModel given the same weights
(tests/model/test_decoder.py); key names of the release's folder: model/hf_checkpoint.py.

Two ways to call forward:
- no cache (training): a plain causal forward over tokens [B, T];
- after setup_cache(): input_pos [B, T] gives each row's positions; K/V are written at those
  slots and each query attends to its row's slots <= its position (model/kv_cache.py).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from model.kv_cache import KVCache

RELEASE_VOCAB = 171385  # paper Table 2


@dataclass
class ModelArgs:
    vocab_size: int | None = RELEASE_VOCAB
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: as many as n_heads (the release has no GQA)
    intermediate_size: int = 11008
    max_seq_len: int = 10240
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5  # RMSNorm; the qk LayerNorm uses 1e-5 too (fixed in transformers)
    attn_dropout: float = 0.0  # transformers' attention_dropout (training only)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"ModelArgs: dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelArgs":
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown decoder preset {name!r}: choose one of {sorted(PRESETS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"ModelArgs.from_name({name!r}): unknown fields {sorted(unknown)}")
        args = replace(PRESETS[key], **overrides)
        if args.vocab_size is None:
            raise ValueError(f"preset {name!r} has no fixed vocabulary: pass vocab_size=layout.vocab_size")
        return args

    def matches(self, other: "ModelArgs") -> list[str]:
        """Names of the architecture fields that differ (a checkpoint from another preset)."""
        skip = {"attn_dropout", "max_seq_len"}
        return [f.name for f in fields(self) if f.name not in skip and getattr(self, f.name) != getattr(other, f.name)]


PRESETS = {
    # CPU-trainable: a few M parameters besides the embedding and head (sized by the layout).
    "tiny": ModelArgs(vocab_size=None, dim=256, n_layers=6, n_heads=8, intermediate_size=768, max_seq_len=2048),
    "2b": ModelArgs(dim=2048, n_layers=32, n_heads=32, intermediate_size=8192),
    "7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, intermediate_size=11008),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32, then back to the input dtype before the weight (as transformers).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class HeadLayerNorm(nn.Module):
    """Chameleon's qk-norm: LayerNorm statistics over head_dim, a separate weight and bias per head."""

    def __init__(self, n_heads: int, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., n_heads, head_dim]
        x = F.layer_norm(x, (x.shape[-1],), None, None, self.eps)
        return x * self.weight + self.bias


def rope_tables(head_dim: int, max_seq: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.arange(max_seq, dtype=torch.float)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def masked_attention(q, k, v, mask, gqa: bool, dropout: float) -> torch.Tensor:
    """Attention under a mask made by model/training.py's attention_mask: a FlexAttention
    BlockMask (GPUs: only the blocks inside a sample are computed) or a bool [B, 1, T, T]."""
    if not isinstance(mask, torch.Tensor):
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, dropout_p=dropout)


class _Fusable(nn.Module):
    """Linear layers reading the same input that fuse() turns into one (one GEMM instead of two or
    three; gpt-fast does the same). state_dict() still names the separate layers and
    load_state_dict() takes them, so checkpoints on disk never see the fused weight."""

    _parts: tuple[str, ...] = ()
    _fused_name = ""

    def __init__(self):
        super().__init__()
        self.register_state_dict_post_hook(_Fusable._split_on_save)
        self.register_load_state_dict_pre_hook(_Fusable._join_on_load)

    @property
    def fused(self) -> bool:
        return self._fused_name in self._modules

    def fuse(self) -> None:
        """Replace the parts by one Linear over the concatenated weights (idempotent)."""
        if self.fused:
            return
        parts = [getattr(self, n) for n in self._parts]
        w = torch.cat([m.weight.detach() for m in parts])
        fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(w, requires_grad=parts[0].weight.requires_grad)
        for n in self._parts:
            delattr(self, n)
        setattr(self, self._fused_name, fused)
        self._split_sizes = [m.out_features for m in parts]

    def projections(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.fused:
            return list(getattr(self, self._fused_name)(x).split(self._split_sizes, dim=-1))
        return [getattr(self, n)(x) for n in self._parts]

    @staticmethod
    def _split_on_save(module, state_dict, prefix, local_metadata):
        key = f"{prefix}{module._fused_name}.weight"
        if key in state_dict:
            w = state_dict.pop(key)
            for n, part in zip(module._parts, w.split(module._split_sizes, dim=0)):
                state_dict[f"{prefix}{n}.weight"] = part

    @staticmethod
    def _join_on_load(module, state_dict, prefix, *args):
        keys = [f"{prefix}{n}.weight" for n in module._parts]
        if module.fused and all(k in state_dict for k in keys):
            state_dict[f"{prefix}{module._fused_name}.weight"] = torch.cat([state_dict.pop(k) for k in keys])


class Attention(_Fusable):
    _parts, _fused_name = ("wq", "wk", "wv"), "wqkv"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.dropout = args.attn_dropout
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.q_norm = HeadLayerNorm(args.n_heads, args.head_dim)
        self.k_norm = HeadLayerNorm(args.n_kv_heads, args.head_dim)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos, rows, kv_len):
        b, t, _ = x.shape
        q, k, v = self.projections(x)
        q = self.q_norm(q.view(b, t, self.n_heads, self.head_dim))
        k = self.k_norm(k.view(b, t, self.n_kv_heads, self.head_dim))
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [b, t, 1, head_dim]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        gqa = self.n_kv_heads != self.n_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa,
                                               dropout_p=self.dropout if self.training else 0.0)
        elif self.kv_cache is None:  # packed training rows: attention kept inside each sample
            y = masked_attention(q, k, v, mask, gqa, self.dropout if self.training else 0.0)
        else:
            k, v = self.kv_cache.update(input_pos, k, v, rows, kv_len)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(_Fusable):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    _parts, _fused_name = ("w1", "w3"), "w13"

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)  # down

    def forward(self, x):
        gate, up = self.projections(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, mask=None, input_pos=None, rows=None, kv_len=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos, rows, kv_len)
        return h + self.feed_forward(self.ffn_norm(h))


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module):
        # transformers' Chameleon initializer_range 0.02; norms start at identity.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def setup_cache(self, max_batch: int, max_seq: int, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> None:
        """Allocate the static KV cache of every layer: max_batch rows of max_seq slots."""
        if max_seq > self.args.max_seq_len:
            raise ValueError(f"setup_cache: max_seq {max_seq} exceeds the model's context {self.args.max_seq_len}")
        ref = self.output.weight
        dtype = dtype or (ref.dtype if ref.is_floating_point() else torch.bfloat16)
        device = device or self.rope_cos.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch, self.args.n_kv_heads, max_seq, self.args.head_dim,
                                               dtype=dtype, device=device)

    def fuse_projections(self) -> "Decoder":
        """q/k/v and gate/up each become one matmul (inference: the engine and quantize_decoder call
        this before quantizing). state_dict() keeps the separate keys (the formats on disk)."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()
        return self

    @property
    def fused(self) -> bool:
        return all(layer.attention.fused and layer.feed_forward.fused for layer in self.layers)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    @property
    def has_cache(self) -> bool:
        return self.layers[0].attention.kv_cache is not None

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, return_hidden: bool = False,
                rows: torch.Tensor | None = None, kv_len: int | None = None, attn_mask=None,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V] (or the final normed hidden states [B, T, dim]).

        input_pos [B, T]: positions of each row (with a cache: where K/V are written and which
        slots are read). rows: the cache rows these B sequences use (default: all, in order).
        kv_len: attend to the first kv_len cache slots only (must exceed every input_pos).
        attn_mask: without a cache, packed training rows' mask (model/training.py attention_mask);
        with one, a bool [B, 1, T, kv_len] of the slots each query reads, instead of "slots <= its
        position" (a draft tree: siblings share a position but not their ancestors).
        slots [B, T]: the cache slots K/V are written at, when they are not the RoPE positions
        input_pos (a draft tree's sibling branches sit past the window; model/engine.py).
        """
        b, t = tokens.shape
        if input_pos is None:
            pos = torch.arange(t, device=tokens.device).expand(b, t)
        else:
            pos = input_pos
        cos = self.rope_cos[pos]
        sin = self.rope_sin[pos]
        x = self.tok_embeddings(tokens)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        mask = attn_mask
        if input_pos is not None and self.has_cache and attn_mask is None:
            n = kv_len or self.layers[0].attention.kv_cache.max_seq
            mask = torch.arange(n, device=tokens.device)[None, None, None, :] <= input_pos[:, None, :, None]
        write_at = input_pos if slots is None else slots
        for layer in self.layers:
            x = layer(x, cos, sin, mask, write_at if mask is not None else None, rows, kv_len)
        x = self.norm(x)
        return x if return_hidden else self.output(x)
