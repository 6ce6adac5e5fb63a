"""Speculative Jacobi decoding (Teng et al., ICLR 2025), one window step as pure tensor functions.

    python -m pytest -q tests/model/test_sjd.py

One step feeds [last accepted token, L-1 drafts] and gets the target distribution p at the L
window positions. verify() accepts draft x_i while u_i < min(1, p_i(x_i) / q_i(x_i)), and at the
first rejection resamples from normalize(max(0, p_i - q_i)): speculative sampling's rule, so
the output has exactly the distribution of plain sampling (tests/model/test_sjd.py checks it).
next_window() is the Jacobi carry-over: the positions after the accepted ones keep this step's
fresh samples, with their distributions as q, and random codes (one-hot q) refill the window.
The rejected positions' K/V need no clean-up: the next step starts at the first unaccepted
position, and the cache masks slots above each query position (model/kv_cache.py).

A row with speculative=False is plain sampling on the same step: it keeps one token drawn from
p at the first window position, so SJD is a switch per request.

Draft initialisations (DRAFT_KINDS, chosen per request; issue 20). Any q is lossless as long as
each draft is drawn from its q independently of the acceptance draws (speculative sampling's
theorem, conditioned on everything drawn before this step), so the kinds only change how often
drafts are accepted:
- "uniform": the paper's: a uniformly random code, q one-hot on it (exact given the code);
- "above": the code one row above at the same column (the image is raster-ordered; ZipAR shows
  codes depend mostly on that neighbour) with probability ABOVE_WEIGHT, else a uniform code;
  q is that mixture, ABOVE_WEIGHT * onehot(above) + (1 - ABOVE_WEIGHT) * uniform. Positions whose
  row above is not accepted yet (the first row, windows longer than a row) draft as "uniform";
- "above+carry": "above", and the Jacobi carry-over too draws from the mixture
  (1 - CARRY_ABOVE_WEIGHT) * p_prev + CARRY_ABOVE_WEIGHT * onehot(above) instead of p_prev alone.
Every kind keeps the Jacobi carry-over (previous step's samples and probabilities past the
first rejection).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.sampling import CODE, ROW_END, sample

DRAFT_KINDS = ("uniform", "above", "above+carry")
ABOVE_WEIGHT = 0.75
CARRY_ABOVE_WEIGHT = 0.5


def verify(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, u_accept: torch.Tensor,
           u_residual: torch.Tensor, limit: torch.Tensor, speculative: torch.Tensor):
    """Accept a prefix of the drafts, resample at the first rejection.

    p, q [B, L, V]: target and draft distributions of the window positions; drafts [B, L] ids;
    u_accept [B, L], u_residual [B] uniforms; limit [B] >= 1: how many positions this row may
    still produce (end of its image, its own window); speculative [B] bool.
    Returns (tokens [B, L]: valid up to gained, gained [B] >= 1).
    """
    b, length = drafts.shape
    idx = torch.arange(length, device=drafts.device)
    p_d = p.gather(-1, drafts[..., None])[..., 0]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    ok = (u_accept * q_d < p_d) & speculative[:, None] & (idx[None] < limit[:, None])
    n_acc = ok.long().cumprod(1).sum(1)
    j = n_acc.clamp(max=length - 1)
    rows = torch.arange(b, device=drafts.device)
    p_j, q_j = p[rows, j], q[rows, j]
    resid = (p_j - q_j).clamp_min(0)
    # p == q leaves no residual; a rejection then has probability 0, so any choice is exact.
    use_resid = speculative[:, None] & (resid.sum(-1, keepdim=True) > 0)
    x_j = sample(torch.where(use_resid, resid, p_j), u_residual)
    need = n_acc < limit
    tokens = torch.where((idx[None] == n_acc[:, None]) & need[:, None], x_j[:, None], drafts)
    gained = n_acc + need.long()
    return tokens, gained


def next_window(p: torch.Tensor, fresh: torch.Tensor, gained: torch.Tensor, random_drafts: torch.Tensor):
    """Drafts and their q for the window after moving forward by gained [B] positions.

    fresh [B, L]: tokens sampled from p this step; random_drafts [B, L]: new codes (one-hot q).
    """
    b, length, v = p.shape
    src = torch.arange(length, device=p.device)[None] + gained[:, None]
    carry = src < length
    src = src.clamp(max=length - 1)
    drafts = torch.where(carry, fresh.gather(1, src), random_drafts)
    q = torch.where(carry[..., None], p.gather(1, src[..., None].expand(b, length, v)),
                    F.one_hot(random_drafts, v).to(p.dtype))
    return drafts, q


def refill(drafts: torch.Tensor, q: torch.Tensor, carry: torch.Tensor, above: torch.Tensor,
           known_above: torch.Tensor, random: torch.Tensor, u_mix: torch.Tensor, code_q: torch.Tensor,
           kind: torch.Tensor):
    """Apply each row's draft initialisation (DRAFT_KINDS[kind], kind [B]) to a window.

    drafts, q [B, L(, V)]: the Jacobi carry-over, valid where carry [B, L]; above [B, L]: the local
    id one row above each position, valid where known_above; random [B, L]: codes drawn from
    code_q [V] (sampling.uniform_codes); u_mix [B, L]: uniforms choosing the mixture's part.
    Returns (drafts, q), q the exact distribution each draft was drawn from.
    """
    v = q.shape[-1]
    rand_q = F.one_hot(random, v).to(q.dtype)
    above_q = F.one_hot(above, v).to(q.dtype)
    use_above = (kind >= 1)[:, None] & known_above & ~carry
    fresh = torch.where(use_above & (u_mix < ABOVE_WEIGHT), above, random)
    fresh_q = torch.where(use_above[..., None], ABOVE_WEIGHT * above_q + (1 - ABOVE_WEIGHT) * code_q, rand_q)
    mix_carry = (kind == 2)[:, None] & known_above & carry
    carried = torch.where(mix_carry & (u_mix < CARRY_ABOVE_WEIGHT), above, drafts)
    carried_q = torch.where(mix_carry[..., None], CARRY_ABOVE_WEIGHT * above_q + (1 - CARRY_ABOVE_WEIGHT) * q, q)
    return (torch.where(carry, carried, fresh),
            torch.where(carry[..., None], carried_q, fresh_q))


def force_layout(drafts: torch.Tensor, q: torch.Tensor, kind: torch.Tensor, n_codes: int):
    """Row ends and the image end are known in advance: draft them with certainty (local ids)."""
    forced = torch.where(kind == ROW_END, n_codes, n_codes + 1)
    is_code = kind == CODE
    drafts = torch.where(is_code, drafts, forced)
    q = torch.where(is_code[..., None], q, F.one_hot(forced, q.shape[-1]).to(q.dtype))
    return drafts, q
