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
  (1 - CARRY_ABOVE_WEIGHT) * p_prev + CARRY_ABOVE_WEIGHT * onehot(above) instead of p_prev alone;
- "pac": adaptive continuation (SJD-PAC, Kang et al. 2026): past the first rejection a draft is
  not replaced by a fresh sample of p but tested like an accepted one, u_i < p_i(x_i) / q_i(x_i),
  and kept if it passes, else redrawn from normalize(max(0, p_i - q_i)) (continue_window). That is
  speculative sampling's one-position rule, so the kept-or-redrawn token is distributed exactly
  as p_i, and p_i is its q on the next step, as for a fresh sample; but the window's drafts now
  change only where the model disagrees with them, so the next step's context matches the one
  each p_i was computed on and more of them are accepted. New random codes carry their exact
  distribution (sampling.uniform_codes_q) as q, not a one-hot on the code: a draft x ~ q is then
  accepted with probability sum min(p, q) instead of 1 / C;
- "pac+above": "pac", with the new positions at the window's end drafted from the code one row
  above as in "above", that row being accepted or still a draft of this window (the carried
  positions' drafts, which "above" does not use).

Why "pac" stays lossless though a kept draft depends on the draft before it. Information only
flows up the sequence: the draft at position j, its q, and p_j are functions of the draws at
positions below j (their drafts, acceptance and redraw uniforms, over all steps) and of x_j's own
draws. Induction over steps: given everything below j, x_j ~ q_j (true for a new draft, and for a
carried one by the one-position rule: given everything below j, the old draft ~ its q, its
acceptance uniform is unused elsewhere, so the kept-or-redrawn token ~ p_j, a function of what is
below j). Verification of j happens when all below it are accepted, with p the model's
distribution given the accepted prefix: speculative sampling's theorem applies position by
position. The same holds for a q that depends on drafts below j in the same window ("pac+above").
tests/model/test_sjd.py checks every kind with chi-square tests and greedy equality.

Draft tree (SJD-PAC's proactive drafting, Engine(tree_siblings=S, tree_branch=m); issue 20). The
window's first draft is accepted least often (its q is the previous step's p, computed on a
context the step then changed), and a rejection there ends the step at one token. The tree adds
S candidates for that first position, drawn from the same q without replacement (tree_candidates), each the
root of a branch of m nodes [candidate, drafts[1], ..., drafts[m-1]] (the deeper drafts are the
main chain's, shared). The forward feeds the window and the branches at once (tree_layout: each
node reads the accepted prefix and its own ancestors only). accept_first_of verifies the first
position over the candidates (multi-draft speculative sampling); the accepted branch's p gives
the path that verify() and the carry-over read for depths 2..m+1 (tree_path).
Lossless: (1) the first position: recursive rejection sampling (Jeon et al., "Recursive
Speculative Decoding", 2024). c_0 (the carried draft) ~ q given everything below (the induction
above); c_k, k >= 1, is drawn from q_k = q without c_0..c_{k-1}, renormalized (without
replacement: a repeat of a rejected candidate is never accepted, so i.i.d. copies would be
wasted). Backward induction over the stages: the procedure from stage k on, given the history,
outputs p_k: P(out = x) = sum_c q_k(c) [1{c = x} min(1, p_k(c) / q_k(c)) + (1 - min(1, ..)) p_{k+1}(x)]
= min(p_k, q_k)(x) + (1 - sum min(p_k, q_k)) p_{k+1}(x) = p_k(x), because p_{k+1} =
normalize(max(0, p_k - q_k)) depends on the history but not on c_k, and the last stage's fallback
draws from its p exactly. A rejected c_k had p_k(c_k) < q_k(c_k), so p_{k+1}(c_k) = 0: removing it
from the next q loses nothing. So the first token ~ p_0 = p (test_accept_first_of_gives_p exactly,
by enumeration). (2) Depths >= 2 of the accepted branch: its drafts are the main
chain's, each drawn from its q before this step from what is below it; the choice of the branch
is a function of draws at the first position (candidates, their uniforms) that the draft's draw
does not depend on, so given everything below it the draft is still ~ q, and it is verified
against p on the accepted branch's context: speculative sampling's theorem as for the chain.
Only the one accepted branch is verified past the first position. (3) The carry-over: any q is
valid as long as it is the distribution the next draft is drawn from; on a sibling path the
positions past the branch keep the main chain's p (computed with c_0 below them, a draw below
them): a worse q, still an exact one. Where no candidate was accepted (the first token drawn from
the residual, a code none of the computed contexts had), depths 2..m+1 carry a mixture of the
main chain's and the branches' p there instead (tree_carry; a broader guess than one wrong
context), each context weighted by how much its candidate resembles the drawn code (carry_weights:
a softmax of cosine similarities of the head's rows; a function of the first position's draws,
which lie below those depths): continue_window's kept-or-redrawn token is distributed exactly as
that mixture, which is its next q.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.sampling import CODE, ROW_END, STREAM_TREE, counter_uniform, sample

DRAFT_KINDS = ("uniform", "above", "above+carry", "pac", "pac+above")
DEFAULT_DRAFTS = "pac"  # Request.drafts and generate.sjd_drafts (docs/generate.md: the measured best)
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


def continue_window(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor, u_accept: torch.Tensor,
                    u_fresh: torch.Tensor, adaptive: torch.Tensor) -> torch.Tensor:
    """The token each window position hands to the Jacobi carry-over, [B, L] ids, each ~ p exactly.

    Rows with adaptive [B] ("pac" kinds): the draft if u_accept * q(draft) < p(draft), else a draw
    from normalize(max(0, p - q)) with u_fresh (speculative sampling's rule at every position, not
    only up to the first rejection); other rows: a fresh draw from p with u_fresh. One draw either
    way. u_accept is the step's acceptance uniforms: verify() reads position i only up to the first
    rejection and the carry-over only reads the positions after it, so no uniform serves twice.
    """
    p_d = p.gather(-1, drafts[..., None])[..., 0]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    keep = adaptive[:, None] & (u_accept * q_d < p_d)
    resid = (p - q).clamp_min(0)
    # p == q leaves no residual; a rejection then has probability 0, so any choice is exact.
    use_resid = adaptive[:, None, None] & (resid.sum(-1, keepdim=True) > 0)
    drawn = sample(torch.where(use_resid, resid, p), u_fresh)
    return torch.where(keep, drafts, drawn)


def above_in_window(carried: torch.Tensor, carry: torch.Tensor, row: torch.Tensor, above: torch.Tensor,
                    known: torch.Tensor):
    """Add the row above that is still a draft of this window to the accepted one.

    carried [B, L]: the window's carried-over drafts, valid where carry; row [B]: tokens per image
    row (codes + row end); above, known [B, L]: the accepted row above (sjd.refill's inputs).
    Returns (above, known) where a position's row above is known if accepted or carried.
    """
    length = carried.shape[1]
    at = torch.arange(length, device=carried.device)[None] - row[:, None]
    inside = (at >= 0) & carry.gather(1, at.clamp(min=0))
    return torch.where(inside, carried.gather(1, at.clamp(min=0)), above), known | inside


def refill(drafts: torch.Tensor, q: torch.Tensor, carry: torch.Tensor, above: torch.Tensor,
           known_above: torch.Tensor, random: torch.Tensor, u_mix: torch.Tensor, code_q: torch.Tensor,
           kind: torch.Tensor):
    """Apply each row's draft initialisation (DRAFT_KINDS[kind], kind [B]) to a window.

    drafts, q [B, L(, V)]: the Jacobi carry-over, valid where carry [B, L]; above [B, L]: the local
    id one row above each position, valid where known_above (for "pac+above" also where it is a
    carried draft: above_in_window); random [B, L]: codes drawn from code_q [V]
    (sampling.uniform_codes); u_mix [B, L]: uniforms choosing the mixture's part.
    Returns (drafts, q), q the exact distribution each draft was drawn from.
    """
    v = q.shape[-1]
    pac = is_pac(kind)[:, None, None]
    rand_q = torch.where(pac, code_q.to(q.dtype), F.one_hot(random, v).to(q.dtype))
    above_q = F.one_hot(above, v).to(q.dtype)
    uses_above = (kind == DRAFT_KINDS.index("above")) | (kind == DRAFT_KINDS.index("above+carry")) \
        | (kind == DRAFT_KINDS.index("pac+above"))
    use_above = uses_above[:, None] & known_above & ~carry
    fresh = torch.where(use_above & (u_mix < ABOVE_WEIGHT), above, random)
    fresh_q = torch.where(use_above[..., None], ABOVE_WEIGHT * above_q + (1 - ABOVE_WEIGHT) * code_q, rand_q)
    mix_carry = (kind == DRAFT_KINDS.index("above+carry"))[:, None] & known_above & carry
    carried = torch.where(mix_carry & (u_mix < CARRY_ABOVE_WEIGHT), above, drafts)
    carried_q = torch.where(mix_carry[..., None], CARRY_ABOVE_WEIGHT * above_q + (1 - CARRY_ABOVE_WEIGHT) * q, q)
    return (torch.where(carry, carried, fresh),
            torch.where(carry[..., None], carried_q, fresh_q))


def is_pac(kind: torch.Tensor) -> torch.Tensor:
    """Rows [B] whose draft kind continues adaptively (continue_window) and keeps random codes' exact q."""
    return (kind == DRAFT_KINDS.index("pac")) | (kind == DRAFT_KINDS.index("pac+above"))


def in_window_above(kind: torch.Tensor) -> torch.Tensor:
    """Rows [B] whose "above" drafts may read the row above from this window's drafts."""
    return kind == DRAFT_KINDS.index("pac+above")


def force_layout(drafts: torch.Tensor, q: torch.Tensor, kind: torch.Tensor, n_codes: int):
    """Row ends and the image end are known in advance: draft them with certainty (local ids)."""
    forced = torch.where(kind == ROW_END, n_codes, n_codes + 1)
    is_code = kind == CODE
    drafts = torch.where(is_code, drafts, forced)
    q = torch.where(is_code[..., None], q, F.one_hot(forced, q.shape[-1]).to(q.dtype))
    return drafts, q


# --- draft tree at the window's first position (module docstring, "Draft tree") --------------------

DEFAULT_TREE = "0x0"  # Engine's default and generate.sjd_tree's: none (docs/generate.md, "Draft tree")


def parse_tree(text) -> tuple[int, int]:
    """"SxM" (or [S, M]) -> (siblings, branch) of Engine's draft tree; "0x0": none. Only the form is
    checked here; Engine checks the sizes against its window."""
    try:
        a, b = (int(x) for x in (text.lower().split("x") if isinstance(text, str) else text))
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"draft tree {text!r}: expected SIBLINGSxBRANCH, e.g. 2x3 (0x0: none)") from None
    return a, b


def tree_layout(length: int, siblings: int, branch: int, device=None):
    """The N = length + siblings * branch nodes a tree step feeds per row, as offsets from the row's
    position pos (the last accepted token).

    Returns (depth, slot, base, lo, hi), each int64 [N]: node n's token sits at RoPE position
    pos + depth[n] and writes cache slot pos + slot[n]; it reads slots <= pos + base[n] and slots
    pos + lo[n] .. pos + hi[n]. Nodes 0..length-1 are the main chain (depth = slot = base = n, no
    extra range: the plain window's rule); branch k's nodes (depth 1..branch) sit past the window
    at slots length + k * branch + depth - 1 and read the accepted prefix (base 0) and their own
    branch up to themselves.
    """
    main = torch.arange(length, device=device)
    j = torch.arange(siblings * branch, device=device)
    d = j % branch + 1
    start = length + (j // branch) * branch
    depth = torch.cat([main, d])
    slot = torch.cat([main, length + j])
    base = torch.cat([main, torch.zeros_like(j)])
    lo = torch.cat([torch.ones_like(main), start])
    hi = torch.cat([torch.zeros_like(main), length + j])  # main chain: lo > hi, no range
    return depth, slot, base, lo, hi


def tree_mask(pos: torch.Tensor, base: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Bool [B, 1, N, kv_len] of the cache slots each node of each row reads (tree_layout's offsets
    from pos [B]); Decoder.forward's attn_mask."""
    s = torch.arange(kv_len, device=pos.device)[None, None, :]
    p = pos[:, None, None]
    allowed = (s <= p + base[None, :, None]) | ((s >= p + lo[None, :, None]) & (s <= p + hi[None, :, None]))
    return allowed[:, None]


def tree_candidates(drafts: torch.Tensor, q: torch.Tensor, seed: torch.Tensor, step: torch.Tensor,
                    siblings: int) -> torch.Tensor:
    """The first position's candidates, local ids [B, 1 + siblings]: the window's first draft, then
    `siblings` draws from its q (q[:, 0]) without replacement (stream STREAM_TREE): candidate k is
    drawn from q with candidates 0..k-1 removed (draws_left; a row whose q has no mass left gets a
    placeholder that accept_first_of never accepts). A pure function of the slot state, so the
    forward (which feeds them) and advance() (which verifies them) agree."""
    u = counter_uniform(seed, step, torch.arange(1, siblings + 1, device=drafts.device), STREAM_TREE)
    cands = drafts[:, :1]
    for k in range(siblings):  # unrolled: static shapes
        q_k, _ = draws_left(q[:, 0], cands)
        cands = torch.cat([cands, sample(q_k, u[:, k])[:, None]], 1)
    return cands


def draws_left(q: torch.Tensor, taken: torch.Tensor):
    """q [B, V] with the ids taken [B, k] removed, renormalized, and whether any mass is left [B]
    (the distribution of a draw without replacement after those)."""
    q_k = q.scatter(-1, taken, 0.0)
    z = q_k.sum(-1, keepdim=True)
    return q_k / z.clamp_min(1e-30), z[:, 0] > 0


def accept_first_of(p: torch.Tensor, q: torch.Tensor, cands: torch.Tensor, u_accept: torch.Tensor,
                    u_residual: torch.Tensor, speculative: torch.Tensor):
    """Recursive rejection sampling (Jeon et al. 2024) at one position over candidates drawn from q
    without replacement (tree_candidates).

    p, q [B, V]; cands [B, K] ids; u_accept [B, K], u_residual [B] uniforms; speculative [B] bool.
    Candidate k's draft distribution is q_k = q without candidates 0..k-1, renormalized
    (draws_left); it is accepted if no earlier one was and u_k * q_k(c_k) < p_k(c_k), p_0 = p; after
    a rejection p_{k+1} = normalize(max(0, p_k - q_k)) (all zero: a rejection had probability 0, p_k
    stays). A stage whose q_k has no mass is skipped. If none is accepted the token is drawn from
    the last p_k; rows with speculative False draw from p. Returns (token [B] ~ p exactly, chosen
    [B]: the accepted candidate's index, -1 if the token was drawn).
    """
    b, k_n = cands.shape
    chosen = torch.full((b,), -1, dtype=torch.long, device=cands.device)
    p_cur = p
    for k in range(k_n):  # unrolled: static shapes
        c = cands[:, k:k + 1]
        q_k, has_mass = draws_left(q, cands[:, :k])
        live = speculative & has_mass
        ok = live & (chosen < 0) & (u_accept[:, k] * q_k.gather(-1, c)[:, 0] < p_cur.gather(-1, c)[:, 0])
        chosen = torch.where(ok, k, chosen)
        resid = (p_cur - q_k).clamp_min(0)
        z = resid.sum(-1, keepdim=True)
        p_cur = torch.where(live[:, None] & (z > 0), resid / z.clamp_min(1e-30), p_cur)
    drawn = sample(p_cur, u_residual)
    token = torch.where(chosen >= 0, cands.gather(1, chosen.clamp(min=0)[:, None])[:, 0], drawn)
    return token, chosen


def tree_path(p: torch.Tensor, p_branches: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor,
              first: torch.Tensor, chosen: torch.Tensor, limit: torch.Tensor):
    """The window as verify() and the carry-over read it after accept_first_of.

    p [B, L, V]: the main chain's target distributions; p_branches [B, S, m, V]: each sibling
    branch's (node d predicts depth d + 1); drafts, q: the window's; first [B]: the first
    position's token, chosen [B] its candidate (0 the main chain's draft, k >= 1 sibling k, -1
    drawn). Position 0 becomes first with p = q = one-hot (verify passes it with certainty);
    on a sibling branch depths 2..m+1 take the branch's p and the row may gain at most m + 1
    tokens (past the branch no p was computed on its context); a drawn first token ends the step
    there (limit 1). Returns (p, drafts, q, limit) of the path.
    """
    b, _, v = p.shape
    m = p_branches.shape[2]
    one = F.one_hot(first, v).to(p.dtype)[:, None]
    rows = torch.arange(b, device=p.device)
    on_sib = chosen >= 1
    branch_p = p_branches[rows, (chosen - 1).clamp(min=0)]  # [B, m, V]
    sib_p = torch.cat([one, branch_p, p[:, m + 1:]], 1)
    path_p = torch.where(on_sib[:, None, None], sib_p, torch.cat([one, p[:, 1:]], 1))
    path_q = torch.cat([one, q[:, 1:]], 1)
    path_drafts = torch.cat([first[:, None], drafts[:, 1:]], 1)
    limit = torch.where(chosen < 0, 1, torch.where(on_sib, limit.clamp(max=m + 1), limit))
    return path_p, path_drafts, path_q, limit


CARRY_TAU = 0.05  # carry_weights' temperature (docs/generate.md, "Carry-over weighted by similarity")


def carry_weights(vectors: torch.Tensor, first: torch.Tensor, cands: torch.Tensor, tau: float = CARRY_TAU):
    """tree_carry's weights [B, 1 + S] of the tree's contexts (candidate 0: the main chain, k: sibling
    k's branch) after a drawn first token: a softmax over the candidates of the cosine similarity
    between the drawn token's vector and each candidate's, divided by tau. vectors [V, D]: a vector
    per local id (the engine: the decoder's head rows); first [B] the first position's token, cands
    [B, 1 + S] its candidates. The drawn code was no candidate, and its next position's p is closest
    to the p computed on the context of the code that resembles it most (measured: bench.sjd_tree).
    A function of the first position's draws only, which lie below every depth it weights, so the
    mixture is an exact q whatever the weights."""
    v = F.normalize(vectors[cands].float(), dim=-1)
    f = F.normalize(vectors[first].float(), dim=-1)
    return torch.softmax((v * f[:, None]).sum(-1) / tau, -1)


def tree_carry(path_p: torch.Tensor, p: torch.Tensor, p_branches: torch.Tensor, chosen: torch.Tensor,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """The distributions the carry-over draws the next window's drafts from (continue_window's
    target, next_window's q), [B, L, V]: the path's, except where the first token was drawn
    (chosen < 0). There the token below depths 2..m+1 is new, a code none of the computed contexts
    had, so each of those depths takes a mixture of its p over the main chain and every branch
    instead of the main chain's alone (a broader guess; any q is exact for the draft drawn from it):
    weights [B, 1 + S] (carry_weights; default the mean)."""
    m = p_branches.shape[2]
    if weights is None:
        mix = (p[:, 1:m + 1] + p_branches.sum(1)) / (1 + p_branches.shape[1])
    else:
        w = weights.to(p.dtype)
        mix = w[:, :1, None] * p[:, 1:m + 1] + (w[:, 1:, None, None] * p_branches).sum(1)
    drawn = (chosen < 0)[:, None, None]
    return torch.cat([path_p[:, :1], torch.where(drawn, mix, path_p[:, 1:m + 1]), path_p[:, m + 1:]], 1)
