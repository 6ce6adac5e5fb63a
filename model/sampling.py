"""Sampling as plain functions over tensors: CFG, layout constraints, temperature, top-k, draws.

    python -c "import torch; from model.sampling import *; print(sample(torch.tensor([[.2,.8]]), torch.tensor([.5])))"

The engine works in a local image vocabulary (the image span only ever holds codes, row ends
and the image end): local ids 0..C-1 are the C codes, C is the row end, C+1 the image end.
Restricting the head to those rows is exact (the constrained distribution only depends on the
allowed logits) and skips ~9% of the 7B's weight reads per step.

Random numbers come from a counter-based hash of (request seed, request step, window index,
stream) rather than from a shared generator: a request draws the same numbers whatever batch
it is in and whatever its neighbours do, the draws are one vectorized op for the whole batch
(no per-row generator calls or host syncs), and the step captures in a CUDA graph.
"""
from __future__ import annotations

import itertools

import torch

# What the layout allows at a position of the image span (REFERENCE.md, "Sequence layout").
CODE, ROW_END, IMAGE_END, PAST_END = 0, 1, 2, 3

# Streams of counter_uniform: one per purpose, so that no two draws share a number.
STREAM_ACCEPT, STREAM_FRESH, STREAM_RESIDUAL, STREAM_DRAFT, STREAM_MIX = 0, 1, 2, 3, 4
# A draft tree's extra first-position candidates (model/sjd.py, tree_candidates) and their
# acceptance uniforms (accept_first_of).
STREAM_TREE, STREAM_TREE_ACCEPT = 5, 6

# murmur3's 32-bit finalizer constants, as int32 (two's complement). The whole hash runs in
# int32 with wrapping multiplies: triton keeps indices in int32 and refuses a 64-bit constant
# added to one (docs/generate.md, "What breaks triton"), so no constant here leaves int32 range.
_C1 = -0x7A1435B5  # 0x85EBCA6B
_C2 = -0x3D4D51CB  # 0xC2B2AE35
_GOLDEN = -0x61C88647  # 0x9E3779B9


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int32 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (32 - s)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    # murmur3 fmix32: a bijection of 32-bit words with full avalanche (int32 arithmetic wraps)
    x = (x ^ _shr(x, 16)) * _C1
    x = (x ^ _shr(x, 13)) * _C2
    return x ^ _shr(x, 16)


def counter_bits(seed: torch.Tensor, step: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
    """24 random bits (int32 in [0, 2^24)), a pure function of (seed, step, index, stream).

    seed, step: int64 [B] (the seed's two 32-bit halves both count); index: int [L] or [B, L];
    returns [B, L]. A chain of murmur3 finalizers over 32-bit words, all in int32.
    """
    seed = seed.long()
    lo, hi = seed.to(torch.int32), (seed >> 32).to(torch.int32)  # int64 -> int32 keeps the low word
    key = _mix(lo ^ _mix(hi + _mix(torch.full_like(hi, stream) + _GOLDEN)))  # (seed, stream)
    h = _mix(key + step.to(torch.int32) * _C1)
    h = _mix(h[:, None] ^ _mix(index.to(torch.int32) * _C2 + _GOLDEN))  # the index mixed on its own first
    h = _mix(h + key[:, None])
    return _shr(h, 8)


def counter_uniform(seed: torch.Tensor, step: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform [0, 1) float32 numbers on the 2^-24 grid (exact in float32): counter_bits / 2^24."""
    return counter_bits(seed, step, index, stream).float() * (1.0 / (1 << 24))


def uniform_codes(bits: torch.Tensor, n_codes: int) -> torch.Tensor:
    """Codes floor(bits * n / 2^24) from counter_bits: integer arithmetic, so their distribution
    is exactly uniform_codes_q(n) (SJD's q must be the distribution a draft was drawn from)."""
    return (bits.long() * n_codes) >> 24


def uniform_codes_q(n_codes: int, size: int | None = None) -> torch.Tensor:
    """The exact probability of each code under uniform_codes (1/n when n is a power of two),
    float32 [size] (size >= n_codes; ids past the codes get 0)."""
    if not 1 <= n_codes <= 1 << 24:
        raise ValueError(f"uniform_codes_q: {n_codes} codes; expected 1..2^24")
    edges = [-(-(c << 24) // n_codes) for c in range(n_codes + 1)]  # ceil(c * 2^24 / n)
    q = torch.zeros(size or n_codes, dtype=torch.float64)
    q[:n_codes] = torch.tensor([b - a for a, b in itertools.pairwise(edges)], dtype=torch.float64) / (1 << 24)
    return q.float()


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + s * (cond - uncond); s [B] (1 = cond alone).

    The release mixes log-softmaxes; that differs by a per-row constant, which the softmax removes.
    """
    s = scale.to(cond.dtype).view(-1, *([1] * (cond.dim() - 1)))
    return torch.where(s == 1, cond, uncond + s * (cond - uncond))


def position_kinds(body_index: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """CODE / ROW_END / IMAGE_END / PAST_END of image-span positions.

    body_index [B, L]: index from the first code of the image (after the two size tokens);
    rows, cols [B]: the grid of each row's image.
    """
    r, c = rows[:, None], cols[:, None]
    n = r * (c + 1)
    kind = torch.where(body_index % (c + 1) == c, ROW_END, CODE)
    kind = torch.where(body_index == n, IMAGE_END, kind)
    return torch.where(body_index > n, PAST_END, kind)


def allowed_local(kind: torch.Tensor, n_codes: int) -> torch.Tensor:
    """Boolean [..., n_codes + 2] of the local ids the layout allows at positions of these kinds."""
    ids = torch.arange(n_codes + 2, device=kind.device)
    forced = torch.where(kind == ROW_END, n_codes, n_codes + 1)[..., None]
    return torch.where((kind == CODE)[..., None], ids < n_codes, ids == forced)


def top_k_filter(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (k [B] per request, broadcast over the window); -inf elsewhere."""
    v = logits.shape[-1]
    kk = k.clamp(1, v).view(-1, *([1] * (logits.dim() - 1))).expand(*logits.shape[:-1], 1)
    kth = torch.sort(logits, dim=-1, descending=True).values.gather(-1, kk - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def probs_from_logits(logits: torch.Tensor, allowed: torch.Tensor, temperature: torch.Tensor,
                      top_k: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """The distribution sampled at each position: constraints, top-k, softmax(logits / T), then min-p.

    logits [B, L, V] (fp32), allowed [B, L, V] bool, temperature, top_k and min_p [B]. min-p keeps
    the ids whose probability is at least min_p times the position's largest (0 keeps all): where
    the model is sure (a plain background) it drops the tail a stray code comes from, and where it
    hesitates it keeps every plausible id. Both halves of SJD sample from this same distribution.
    """
    x = logits.float().masked_fill(~allowed, float("-inf"))
    x = top_k_filter(x, top_k)
    t = temperature.float().clamp_min(1e-6).view(-1, *([1] * (x.dim() - 1)))
    x = x / t
    if min_p is not None:
        # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p); log(0) = -inf keeps every id
        floor = x.amax(-1, keepdim=True) + torch.log(min_p.float()).view(-1, *([1] * (x.dim() - 1)))
        x = x.masked_fill(x < floor, float("-inf"))
    return torch.softmax(x, dim=-1)


def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from probs [..., V] with uniforms u [...] -> int64 [...].

    The index is a count (how many cdf entries are <= the target, i.e. searchsorted right) and
    the last allowed id a max over a masked arange: sums and maxes split across thread blocks
    in inductor's triton code, where an argmax over 16k codes does not (docs/generate.md).
    """
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[..., -1])[..., None]
    idx = (cdf <= target).sum(-1)
    # never land on a zero-probability tail id through rounding at the top of the cdf
    ids = torch.arange(probs.shape[-1], device=probs.device)
    last = torch.where(probs > 0, ids, 0).amax(-1)
    return torch.minimum(idx, last)
