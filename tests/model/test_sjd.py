"""SJD is lossless: same distribution as plain sampling, and exactly greedy decoding near T = 0.

    .venv/bin/python -m pytest -q tests/model/test_sjd.py
"""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import sampling as S
from model.decoder import ModelArgs
from model.engine import Engine, Request, _Job
from model.sjd import (DRAFT_KINDS, above_in_window, accept_first_of, carry_weights, continue_window, draws_left,
                       in_window_above, is_pac, next_window, refill, tree_candidates, tree_carry, tree_path, verify)

pytestmark = pytest.mark.usefixtures("one_thread")


def run_bigram_sjd(table: torch.Tensor, rows: int, window: int, n_tokens: int, speculative: bool,
                   drafts_kind: str = "uniform", width: int = 2, tree: tuple[int, int] = (0, 0),
                   carry_vectors: torch.Tensor | None = None, carry_from_draft: bool = False):
    """Drive verify / continue_window / next_window / refill as the engine's advance() does, with a
    known target, p(x_t | x_{t-1}) = softmax(table[x_{t-1}]).

    drafts_kind: the draft initialisation (model.sjd.DRAFT_KINDS), "above" being the token `width`
    positions back (a row of `width` tokens), once accepted (or, for "pac+above", still a draft of
    the window). tree (siblings, branch): a draft tree at the window's first position, as the
    engine's tree_advance() runs it (each branch node's p from its own input token). carry_vectors
    [V, D]: tree_carry weighted by carry_weights (the engine's way) instead of the plain mean;
    carry_from_draft: a wrong variant for the test to catch, all weight on the context whose p gives
    the carried draft at depth 1 the most mass (weights that depend on that draft, not only on the
    tokens below it)."""
    v = table.shape[0]
    kind = torch.full((rows,), DRAFT_KINDS.index(drafts_kind))
    code_q = S.uniform_codes_q(v)
    seed = torch.arange(rows) + (0 if speculative else 10**6)
    step = torch.zeros(rows, dtype=torch.long)
    idx = torch.arange(window).expand(rows, window)
    last = torch.zeros(rows, dtype=torch.long)  # start token 0
    out = torch.full((rows, n_tokens + window), -1)
    n = torch.zeros(rows, dtype=torch.long)
    spec = torch.full((rows,), speculative)
    steps_to_n = torch.zeros(rows, dtype=torch.long)  # steps each row took to have n_tokens
    row = torch.full((rows,), width)

    def window_drafts(drafts, q, carry, step):
        """The engine's window_drafts: the row above (accepted, or in the window), then refill."""
        t_next = n[:, None] + torch.arange(window)  # positions of the window
        above_at = t_next - width
        known = (above_at >= 0) & (above_at < n[:, None])
        above = torch.where(known, out.gather(1, above_at.clamp(0, out.shape[1] - 1)), 0).clamp(min=0)
        in_win, known_in_win = above_in_window(drafts, carry, row, above, known)
        mine = in_window_above(kind)[:, None]
        above, known = torch.where(mine, in_win, above), torch.where(mine, known_in_win, known)
        rand = S.uniform_codes(S.counter_bits(seed, step, idx, S.STREAM_DRAFT), v)
        return refill(drafts, q, carry, above, known, rand, S.counter_uniform(seed, step, idx, S.STREAM_MIX),
                      code_q, kind)

    drafts, q = window_drafts(torch.zeros(rows, window, dtype=torch.long), torch.zeros(rows, window, v),
                              torch.zeros(rows, window, dtype=torch.bool), step - 1)
    while (n < n_tokens).any():
        inputs = torch.cat([last[:, None], drafts[:, :-1]], 1)
        p = torch.softmax(table[inputs], -1)
        u_acc = S.counter_uniform(seed, step, idx, S.STREAM_ACCEPT)
        u_res = S.counter_uniform(seed, step, idx[:, :1], S.STREAM_RESIDUAL)[:, 0]
        limit = torch.full((rows,), window)
        if tree[0]:
            siblings, branch = tree
            cands = tree_candidates(drafts, q, seed, step, siblings)
            branch_in = torch.cat([cands[:, 1:, None], drafts[:, None, 1:branch].expand(-1, siblings, -1)], 2)
            p_branches = torch.softmax(table[branch_in], -1)
            u_first = S.counter_uniform(seed, step, torch.arange(siblings + 1), S.STREAM_TREE_ACCEPT)
            first, chosen = accept_first_of(p[:, 0], q[:, 0], cands, u_first, u_res, spec)
            main_p = p
            p, drafts, q, limit = tree_path(p, p_branches, drafts, q, first, chosen, limit)
            spec = torch.ones_like(spec)
        tokens, gained = verify(p, drafts, q, u_acc, u_res, limit, spec)
        assert (gained >= 1).all() and (gained <= window).all()
        if tree[0]:  # what the carry-over draws from
            weights = None
            if carry_vectors is not None:
                weights = carry_weights(carry_vectors, first, cands)
            if carry_from_draft:  # the context that gives the carried draft at depth 1 the most mass
                ctx = torch.cat([main_p[:, 1:2], p_branches[:, :, 0]], 1)  # [B, 1 + S, V]
                liked = ctx.gather(2, drafts[:, None, 1:2].expand(-1, ctx.shape[1], 1))[..., 0]
                weights = F.one_hot(liked.argmax(1), ctx.shape[1]).float()
            p = tree_carry(p, main_p, p_branches, chosen, weights)
        fresh = continue_window(p, drafts, q, u_acc, S.counter_uniform(seed, step, idx, S.STREAM_FRESH), is_pac(kind))
        rand = S.uniform_codes(S.counter_bits(seed, step, idx, S.STREAM_DRAFT), v)
        drafts, q = next_window(p, fresh, gained, rand)
        keep = torch.arange(window)[None] < gained[:, None]
        pos = (n[:, None] + torch.arange(window)).clamp(max=out.shape[1] - 1)
        out.scatter_(1, pos, torch.where(keep, tokens, out.gather(1, pos)))
        last = tokens.gather(1, (gained - 1)[:, None])[:, 0]
        steps_to_n = torch.where(n < n_tokens, step + 1, steps_to_n)
        n = n + gained
        carry = torch.arange(window)[None] + gained[:, None] < window
        drafts, q = window_drafts(drafts, q, carry, step)
        step = step + 1
    return out[:, :n_tokens], steps_to_n


@pytest.mark.parametrize("drafts_kind", DRAFT_KINDS)
def test_speculative_rule_samples_the_target_distribution(chi_square, drafts_kind):
    """Every draft initialisation: the joint of the first four tokens (two 'rows' of two) passes
    chi-square against the exact one; 5 symbols, not a power of two, so the uniform part of q is
    the exact (unequal) distribution of the random codes. Window 3, so that the fourth token is
    drafted by the kind itself after the first step (with window 4 it is a carry-over for every
    kind): its row above is accepted, or ("pac+above") still a draft of the window. Claiming
    code_q as the q of "above" drafts, or redrawing a rejected "pac" draft from p instead of the
    residual, fails this test (p < 1e-29)."""
    torch.manual_seed(0)
    v = 5
    table = 2.5 * torch.randn(v, v)  # peaked, so accepting wrong drafts would show
    p = torch.softmax(table, -1)
    exact = torch.einsum("a,ab,bc,cd->abcd", p[0], p, p, p).reshape(-1)  # joint of the first four tokens
    for speculative in (True, False) if drafts_kind == "uniform" else (True,):
        tokens, steps = run_bigram_sjd(table, rows=20000, window=3, n_tokens=4, speculative=speculative,
                                       drafts_kind=drafts_kind)
        codes = ((tokens[:, 0] * v + tokens[:, 1]) * v + tokens[:, 2]) * v + tokens[:, 3]
        counts = torch.bincount(codes, minlength=v ** 4)
        assert chi_square(counts, exact) > 1e-3, speculative
        if speculative:
            assert steps.float().mean() < 4.0  # and it did speculate: fewer steps than tokens


@pytest.mark.parametrize("drafts_kind", ["uniform", "pac", "pac+above"])
@pytest.mark.parametrize("tree", [(1, 1), (2, 2), (3, 1)], ids=["1x1", "2x2", "3x1"])
def test_draft_tree_samples_the_target_distribution(chi_square, drafts_kind, tree):
    """The draft tree (tree_candidates, accept_first_of, tree_path, then verify and the carry-over
    as tree_advance runs them) on the bigram target: the joint of the first four tokens passes
    chi-square against the exact one; window 3, so branches reach the window's end (branch 2:
    limit 3 tokens) and the carry-over past a short branch (branch 1) is exercised. Fewer steps
    than without the tree, for the kinds whose q holds more than one code."""
    torch.manual_seed(0)
    v = 5
    table = 2.5 * torch.randn(v, v)
    p = torch.softmax(table, -1)
    exact = torch.einsum("a,ab,bc,cd->abcd", p[0], p, p, p).reshape(-1)
    tokens, steps = run_bigram_sjd(table, rows=20000, window=3, n_tokens=4, speculative=True,
                                   drafts_kind=drafts_kind, tree=tree)
    codes = ((tokens[:, 0] * v + tokens[:, 1]) * v + tokens[:, 2]) * v + tokens[:, 3]
    assert chi_square(torch.bincount(codes, minlength=v ** 4), exact) > 1e-3
    _, plain_steps = run_bigram_sjd(table, rows=20000, window=3, n_tokens=4, speculative=True,
                                    drafts_kind=drafts_kind)
    if drafts_kind != "uniform":  # "uniform"'s q is one-hot on its code: no second candidate to draw
        assert steps.float().mean() < plain_steps.float().mean()


@pytest.mark.parametrize("drafts_kind", ["pac", "pac+above"])
def test_draft_tree_carry_weighted_by_similarity_samples_the_target_distribution(chi_square, drafts_kind):
    """tree_carry weighted by carry_weights (the engine's carry-over after a drawn first token: the
    contexts weighted by their candidate's resemblance to the drawn token), driven as tree_advance
    runs it (2x2 tree, window 3, random vectors per id, the engine's temperature: near one-hot
    weights) on the bigram target, 100,000 rows: the joint of the first four tokens passes
    chi-square. Weights
    that depend on the draft at depth 1 (the token the carry-over keeps or redraws there, not one
    below it: all weight on the context that likes it most) make its next q wrong and fail it
    (p about 1e-13 and 1e-21; at 20,000 rows it would pass, p 0.03)."""
    torch.manual_seed(0)
    v = 5
    table = 2.5 * torch.randn(v, v)
    p = torch.softmax(table, -1)
    exact = torch.einsum("a,ab,bc,cd->abcd", p[0], p, p, p).reshape(-1)
    vectors = torch.randn(v, 4)
    for wrong in (False, True):
        tokens, _ = run_bigram_sjd(table, rows=100000, window=3, n_tokens=4, speculative=True,
                                   drafts_kind=drafts_kind, tree=(2, 2), carry_vectors=None if wrong else vectors,
                                   carry_from_draft=wrong)
        codes = ((tokens[:, 0] * v + tokens[:, 1]) * v + tokens[:, 2]) * v + tokens[:, 3]
        got = chi_square(torch.bincount(codes, minlength=v ** 4), exact)
        assert (got < 1e-6) if wrong else (got > 1e-3), (wrong, got)


def test_carry_weights_follow_the_drawn_tokens_resemblance():
    """carry_weights: a distribution over the candidates, the one most like the drawn token weighted
    most, equal vectors weighted equally, and tau -> large gives the plain mean."""
    vectors = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    cands = torch.tensor([[3, 2, 1], [2, 2, 3]])
    w = carry_weights(vectors, torch.tensor([0, 2]), cands)
    assert torch.allclose(w.sum(-1), torch.ones(2))
    assert w[0].argmax() == 2 and w[0, 2] > 0.99  # [0.9, 0.1] resembles [1, 0] most
    assert w[1, 0] == w[1, 1] and w[1, 0] > 0.49
    assert torch.allclose(carry_weights(vectors, torch.tensor([0, 2]), cands, tau=1e6), torch.full((2, 3), 1 / 3))


def first_position_exact(p: torch.Tensor, q: torch.Tensor, n_cands: int):
    """Recursive rejection sampling at one position, enumerated exactly (float64): the output's
    distribution and P(a candidate is accepted), candidates drawn from q without replacement
    (sjd.draws_left; a stage with no mass left is skipped, as accept_first_of does)."""
    def stage(p_k, taken, k):
        if k == n_cands:
            return p_k, 0.0
        q_k, has = draws_left(q[None], torch.tensor([taken], dtype=torch.long).reshape(1, -1))
        q_k = q_k[0]
        if not has[0]:
            return stage(p_k, taken + [0], k + 1)
        out, acc = torch.zeros_like(p_k), 0.0
        for c in range(len(q)):
            if q_k[c] == 0:
                continue
            a = min(1.0, float(p_k[c] / q_k[c]))
            out[c] += q_k[c] * a
            acc += float(q_k[c]) * a
            resid = (p_k - q_k).clamp_min(0)
            p_next = resid / resid.sum() if resid.sum() > 0 else p_k
            sub, sub_acc = stage(p_next, taken + [c], k + 1)
            out += q_k[c] * (1 - a) * sub
            acc += float(q_k[c]) * (1 - a) * sub_acc
        return out, acc
    return stage(p, [], 0)


FIRST_POSITION_CASES = {
    "q apart from p": ([0.05, 0.5, 0.3, 0.1, 0.05], [0.6, 0.1, 0.1, 0.1, 0.1]),
    "q misses ids of p": ([0.4, 0.3, 0.2, 0.1, 0.0], [0.0, 0.0, 0.5, 0.2, 0.3]),
    "q one-hot": ([0.2, 0.2, 0.2, 0.2, 0.2], [0.0, 0.0, 1.0, 0.0, 0.0]),
    "q equals p": ([0.1, 0.2, 0.3, 0.4, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0]),
}


@pytest.mark.parametrize("case", list(FIRST_POSITION_CASES))
def test_accept_first_of_gives_p(chi_square, case):
    """The first position's rule alone. Exactly (enumeration over candidates and the acceptance
    probabilities min(1, p_k / q_k)): the token is distributed as p for 1..4 candidates, and more
    candidates accept more often. Then the code itself (tree_candidates + accept_first_of, counter
    draws, 200,000 rows): its tokens pass chi-square against p and its acceptance rate is the
    enumerated one (5 standard errors)."""
    p, q = (torch.tensor(x, dtype=torch.float64) for x in FIRST_POSITION_CASES[case])
    accepts = []
    for k in range(1, 5):
        dist, acc = first_position_exact(p, q, k)
        torch.testing.assert_close(dist, p, atol=1e-12, rtol=0)
        accepts.append(acc)
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(accepts))
    if case == "q apart from p":
        assert accepts[2] > accepts[0] + 0.2  # the reason for the tree

    n, siblings = 200000, 2
    seed, step = torch.arange(n), torch.zeros(n, dtype=torch.long)
    pf, qf = p.float().expand(n, 5), q.float().expand(n, 1, 5)
    first = S.sample(qf[:, 0], S.counter_uniform(seed, step, torch.arange(1), S.STREAM_DRAFT)[:, 0])
    cands = tree_candidates(first[:, None], qf, seed, step, siblings)
    assert (qf[:, 0].gather(1, cands[:, :1]) > 0).all()
    u = S.counter_uniform(seed, step, torch.arange(siblings + 1), S.STREAM_TREE_ACCEPT)
    token, chosen = accept_first_of(pf, qf[:, 0], cands, u, S.counter_uniform(seed, step, torch.arange(1),
                                                                              S.STREAM_RESIDUAL)[:, 0],
                                    torch.ones(n, dtype=torch.bool))
    assert chi_square(torch.bincount(token, minlength=5), p) > 1e-3
    rate, want = float((chosen >= 0).float().mean()), accepts[siblings]
    assert abs(rate - want) <= 5 * (want * (1 - want) / n) ** 0.5 + 1e-9, (rate, want)
    # no candidate repeats one before it (without replacement) where q has mass left
    for k in range(1, siblings + 1):
        _, has = draws_left(qf[:, 0], cands[:, :k])
        assert not (has[:, None] & (cands[:, :k] == cands[:, k:k + 1])).any()


def test_verify_rejects_to_the_residual():
    """One position, draft d with one-hot q: P(keep d) = p(d), otherwise p without d, renormalized."""
    p = torch.tensor([[[0.5, 0.3, 0.2]]]).expand(30000, 1, 3)
    drafts = torch.ones(30000, 1, dtype=torch.long)
    u = torch.rand(30000, 1, generator=torch.Generator().manual_seed(0))
    ur = torch.rand(30000, generator=torch.Generator().manual_seed(1))
    tokens, gained = verify(p, drafts, F.one_hot(drafts, 3).float(), u, ur, torch.ones(30000, dtype=torch.long),
                            torch.ones(30000, dtype=torch.bool))
    assert (gained == 1).all()
    freq = torch.bincount(tokens[:, 0], minlength=3) / 30000.0
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.012, rtol=0)


def test_adaptive_continuation_keeps_drafts_and_draws_from_p(chi_square):
    """continue_window, "pac" rows: a draft x ~ q is kept with probability min(1, p(x) / q(x)),
    else redrawn from the residual, so the token is distributed as p (speculative sampling's rule
    at one position) and the draft survives with probability sum(min(p, q)); other rows draw from p."""
    n = 40000
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    g = torch.Generator().manual_seed(3)
    drafts = torch.multinomial(q, n, replacement=True, generator=g).view(n // 2, 2)
    u_acc, u_fresh = torch.rand(n // 2, 2, generator=g), torch.rand(n // 2, 2, generator=g)
    adaptive = torch.arange(n // 2) % 2 == 0
    out = continue_window(p.expand(n // 2, 2, 4), drafts, q.expand(n // 2, 2, 4), u_acc, u_fresh, adaptive)
    for rows in (adaptive, ~adaptive):
        assert chi_square(torch.bincount(out[rows].reshape(-1), minlength=4), p) > 1e-3
    kept = (out[adaptive] == drafts[adaptive]).float().mean()
    overlap = torch.minimum(p, q).sum()  # P(keep) = 0.5 here; a redraw from the residual never repeats
    assert abs(float(kept) - float(overlap)) < 0.015, (kept, overlap)
    torch.testing.assert_close(out[~adaptive], S.sample(p.expand(n // 2, 2, 4), u_fresh)[~adaptive])


# --- on the tiny decoder, through the engine -----------------------------------------------------

def reference_logits(model, layout, prompt, prefix, body):
    """Guided code logits of the next body position, from full forwards without a cache."""
    cond = torch.tensor([prompt + prefix + body])
    unc = torch.tensor([prefix + body])
    with torch.no_grad():
        c, u = model(cond)[0, -1], model(unc)[0, -1]
    return c, u


def guided_probs(c, u, layout, cfg, top_k, temperature, min_p=0.0):
    lo = layout.code_offset
    g = u[lo:lo + layout.codebook_size] + cfg * (c[lo:lo + layout.codebook_size] - u[lo:lo + layout.codebook_size])
    kth = torch.topk(g, top_k).values[-1]
    g = torch.where(g >= kth, g, torch.tensor(float("-inf")))
    p = torch.softmax(g / temperature, -1)
    p = torch.where(p >= min_p * p.max(), p, 0.0)  # min-p, written the plain way
    return p / p.sum()


@pytest.fixture
def peaky_model(random_decoder, small_layout):
    args = ModelArgs(vocab_size=small_layout.vocab_size, dim=64, n_layers=2, n_heads=4, intermediate_size=160,
                     max_seq_len=256)
    return random_decoder(args, seed=1, scale=0.35)


@pytest.mark.parametrize("tree", [(0, 0), (2, 3)], ids=["no-tree", "tree2x3"])
@pytest.mark.parametrize("drafts", DRAFT_KINDS)
def test_sjd_equals_greedy_near_zero_temperature(peaky_model, small_layout, drafts, tree):
    lay = small_layout
    prompt = lay.encode_prompt("two squares")
    h, w = 32, 64
    prefix = lay.image_prefix(h, w)
    body, gaps = [], []
    for r in range(h // 8):
        for _ in range(w // 8):
            c, u = reference_logits(peaky_model, lay, prompt, prefix, body)
            g = guided_probs(c, u, lay, 3.0, lay.codebook_size, 1.0).log()
            top2 = torch.topk(g, 2).values
            gaps.append(float(top2[0] - top2[1]))
            body.append(lay.code_offset + int(g.argmax()))
        body.append(lay.row_end)
    want = (np.array(body).reshape(h // 8, w // 8 + 1)[:, :-1] - lay.code_offset)
    assert min(gaps) > 1e-3  # no near-ties, so temperature 1e-5 is greedy
    reqs = [Request(id=f"{sjd}", prompt_ids=prompt, height=h, width=w, seed=7, cfg=3.0, temperature=1e-5,
                    top_k=lay.codebook_size, sjd=sjd, drafts=drafts) for sjd in (True, False)]
    engine = Engine(peaky_model, lay, max_batch=2, window=8, kv_bucket=64, tree_siblings=tree[0], tree_branch=tree[1])
    results = {r.id: r for r in engine.generate(reqs)}
    for r in results.values():
        assert r.error is None
        np.testing.assert_array_equal(r.codes, want)
    assert results["True"].steps < results["False"].steps == results["False"].tokens


def count_sibling_steps(engine: Engine) -> list[int]:
    """A counter, [n], of the steps an active slot gained 2+ tokens on a draft tree's sibling
    branch (its K/V moved), filled as the engine steps."""
    count, step = [0], engine.step

    def counted():
        step()
        if engine.tree[0]:
            count[0] += int(((engine.last_kv_from != 1) & engine.state.active).sum())

    engine.step = counted
    return count


@pytest.mark.slow
@pytest.mark.parametrize("tree, min_p", [((0, 0), 0.0), ((2, 3), 0.0), ((0, 0), 0.02)],
                         ids=["no-tree", "tree2x3", "min-p-0.02"])
def test_sjd_and_plain_sampling_match_the_model_distribution(peaky_model, small_layout, chi_square, tree, min_p):
    """The first three codes over many seeds, SJD and plain, against the exact marginals; with and
    without a draft tree (2 siblings of 3 nodes: its branches reach all three codes), and with
    min-p (the reference applies it after top-k and the temperature, as model/sampling.py says)."""
    lay = small_layout
    prompt, h, w, cfg, top_k = lay.encode_prompt("a circle"), 32, 32, 2.0, 10
    prefix = lay.image_prefix(h, w)
    c0, u0 = reference_logits(peaky_model, lay, prompt, prefix, [])
    p0 = guided_probs(c0, u0, lay, cfg, top_k, 1.0, min_p)
    if min_p:  # it cuts about 2% of the first code's mass here: the support check below sees min-p
        assert (p0 > 0).sum() < (guided_probs(c0, u0, lay, cfg, top_k, 1.0) > 0).sum()
    p1_given = torch.stack([guided_probs(*reference_logits(peaky_model, lay, prompt, prefix, [lay.code_offset + a]),
                                         lay, cfg, top_k, 1.0, min_p) for a in range(lay.codebook_size)])
    pairs = list(itertools.product(range(lay.codebook_size), repeat=2))
    with torch.no_grad():
        cond = torch.tensor([prompt + prefix + [lay.code_offset + a, lay.code_offset + b] for a, b in pairs])
        unc = torch.tensor([prefix + [lay.code_offset + a, lay.code_offset + b] for a, b in pairs])
        c2, u2 = peaky_model(cond)[:, -1], peaky_model(unc)[:, -1]
    p2_given = torch.stack([guided_probs(c2[i], u2[i], lay, cfg, top_k, 1.0, min_p) for i in range(len(pairs))])
    joint01 = p0[:, None] * p1_given
    marg = [p0, joint01.sum(0), (joint01.reshape(-1, 1) * p2_given).sum(0)]

    n = 768
    for sjd in (True, False) if not tree[0] else (True,):
        reqs = [Request(id=str(i), prompt_ids=prompt, height=h, width=w, seed=1000 * sjd + i, cfg=cfg, top_k=top_k,
                        min_p=min_p, sjd=sjd) for i in range(n)]
        engine = Engine(peaky_model, lay, max_batch=64, window=8, kv_bucket=64, tree_siblings=tree[0],
                        tree_branch=tree[1])
        sibling_steps = count_sibling_steps(engine)
        codes = torch.tensor(np.stack([r.codes.reshape(-1)[:3] for r in engine.generate(reqs)]))
        assert (sibling_steps[0] > 100) == bool(tree[0])  # the branches' path did run
        for k in range(3):
            counts = torch.bincount(codes[:, k], minlength=lay.codebook_size)
            assert counts[marg[k] == 0].sum() == 0  # never outside the top-k (and min-p) support
            assert chi_square(counts, marg[k]) > 1e-3, (sjd, k)


@pytest.mark.slow
@pytest.mark.parametrize("drafts,tree", [("above", (0, 0)), ("above+carry", (0, 0)), ("pac", (0, 0)),
                                         ("pac+above", (0, 0)), ("pac", (2, 3))],
                         ids=["above", "above+carry", "pac", "pac+above", "pac-tree2x3"])
def test_row_above_drafts_match_the_model_distribution(peaky_model, small_layout, chi_square, drafts, tree):
    """Image to image, so the lower panel's first row has its row above from the start: the first
    three generated codes over many seeds pass chi-square against the exact marginals."""
    lay = small_layout
    prompt, h, w, cfg, top_k = lay.encode_prompt("mirror"), 64, 32, 2.0, 10
    upper = np.arange(16).reshape(4, 4) % lay.codebook_size
    prefix = lay.image_prefix(h, w)
    given = [int(t) for t in np.concatenate([upper + lay.code_offset, np.full((4, 1), lay.row_end)], 1).reshape(-1)]
    probs = lambda body: guided_probs(*reference_logits(peaky_model, lay, prompt, prefix, given + body),
                                      lay, cfg, top_k, 1.0)
    p0 = probs([])
    p1_given = torch.stack([probs([lay.code_offset + a]) for a in range(lay.codebook_size)])
    pairs = list(itertools.product(range(lay.codebook_size), repeat=2))
    with torch.no_grad():
        cond = torch.tensor([prompt + prefix + given + [lay.code_offset + a, lay.code_offset + b] for a, b in pairs])
        unc = torch.tensor([prefix + given + [lay.code_offset + a, lay.code_offset + b] for a, b in pairs])
        c2, u2 = peaky_model(cond)[:, -1], peaky_model(unc)[:, -1]
    p2_given = torch.stack([guided_probs(c2[i], u2[i], lay, cfg, top_k, 1.0) for i in range(len(pairs))])
    joint01 = p0[:, None] * p1_given
    marg = [p0, joint01.sum(0), (joint01.reshape(-1, 1) * p2_given).sum(0)]
    n = 768
    reqs = [Request(id=str(i), prompt_ids=prompt, height=h, width=w, upper_codes=upper, seed=5000 + i, cfg=cfg,
                    top_k=top_k, drafts=drafts) for i in range(n)]
    results = list(Engine(peaky_model, lay, max_batch=64, window=8, kv_bucket=64, tree_siblings=tree[0],
                          tree_branch=tree[1]).generate(reqs))
    codes = torch.tensor(np.stack([r.codes[4:].reshape(-1)[:3] for r in results]))
    for k in range(3):
        counts = torch.bincount(codes[:, k], minlength=lay.codebook_size)
        assert counts[marg[k] == 0].sum() == 0
        assert chi_square(counts, marg[k]) > 1e-3, (drafts, k)
    assert sum(r.tokens for r in results) / sum(r.steps for r in results) > 1.0


# --- the draft tree's forward and K/V move, on the tiny decoder ------------------------------------

def started_engine(model, layout, n: int, **kw) -> Engine:
    """An engine with n t2i requests prefilled and in place (no step yet), driven by hand."""
    engine = Engine(model, layout, max_batch=n, window=8, kv_bucket=64, **kw)
    prompt = layout.encode_prompt("a circle")
    for b in range(n):
        r = Request(id=str(b), prompt_ids=prompt, height=32, width=64, seed=300 + b, cfg=2.0, top_k=10)
        ctx, rows, cols = engine.check(r)
        engine.jobs[b] = _Job(r, ctx, rows, cols, 0.0)
    engine._prefill([(b, engine.jobs[b]) for b in range(n)])
    return engine


def full_window_logits(model, engine: Engine, b: int) -> torch.Tensor:
    """Slot b's next window logits [2, L, C+2] (cond, uncond) from full forwards without a cache:
    prompt + image prefix + the accepted body + the window's drafts."""
    s, job, L = engine.state, engine.jobs[b], engine.window
    n_prompt = len(job.request.prompt_ids)
    body = engine.local_to_global[s.gen[b, :int(s.pos[b] - s.body0[b]) + 1]].tolist()
    drafts = engine.local_to_global[s.drafts[b, :L - 1]].tolist()
    cond = job.context[:n_prompt + 3] + body + drafts
    top = int(s.pos[b])
    with torch.no_grad():
        c = model(torch.tensor([cond]))[0, top:top + L]
        u = model(torch.tensor([cond[n_prompt:]]))[0, top - n_prompt:top - n_prompt + L]
    return torch.stack([c, u])[..., engine.local_to_global]


def step_to_a_sibling_acceptance(engine: Engine, check_main_chain: bool) -> int:
    """Step until a slot gains 2+ tokens on a sibling branch -> that slot. check_main_chain: before
    each step, the window's logits with the tree equal the plain forward's on the same state."""
    L, n = engine.window, engine.max_batch
    for _ in range(8):
        s = engine.state
        if check_main_chain:
            with torch.no_grad():
                tree = engine.window_logits()
                tokens = torch.cat([s.last_tok[:, None], engine.local_to_global[s.drafts[:, :L - 1]]], 1)
                pos = torch.cat([s.pos, s.pos - s.uoff])[:, None] + torch.arange(L)
                plain = engine._decode_logits(tokens.repeat(2, 1), pos, 64)
            assert tree.shape[1] == engine.nodes
            torch.testing.assert_close(tree[:, :L], plain, atol=1e-4, rtol=1e-4)
        before = s.pos.clone()
        engine.step()
        moved = (engine.last_kv_from != 1) & engine.state.active
        if moved.any():
            b = int(moved.nonzero()[0, 0])
            assert int(engine.state.pos[b] - before[b]) >= 2
            return b
    raise AssertionError(f"no sibling branch accepted in 8 steps of {n} slots")


def test_draft_tree_main_chain_is_unchanged_and_an_accepted_branch_moves_its_kv(peaky_model, small_layout,
                                                                                  monkeypatch):
    """The window's logits with the sibling branches fed beside it equal the plain forward's (the
    siblings are invisible to it). After a step that accepted 2+ tokens on a sibling branch, the
    next window's logits equal full forwards without a cache over the accepted tokens: the branch's
    K/V were moved to their positions' slots. Without the move they differ (the test can fail)."""
    lay, n = small_layout, 16
    engine = started_engine(peaky_model, lay, n, tree_siblings=2, tree_branch=3)
    b = step_to_a_sibling_acceptance(engine, check_main_chain=True)
    with torch.no_grad():
        got = engine.window_logits()[[b, n + b], :engine.window]
    torch.testing.assert_close(got, full_window_logits(peaky_model, engine, b), atol=1e-4, rtol=1e-4)

    # the same steps without the move: the accepted tokens' slots hold the main chain's K/V
    peaky_model.clear_cache()
    engine = started_engine(peaky_model, lay, n, tree_siblings=2, tree_branch=3)
    monkeypatch.setattr(engine, "move_tree_kv", lambda before, kv_from: None)
    assert step_to_a_sibling_acceptance(engine, check_main_chain=True) == b
    with torch.no_grad():
        got = engine.window_logits()[[b, n + b], :engine.window]
    assert not torch.allclose(got, full_window_logits(peaky_model, engine, b), atol=1e-3, rtol=1e-3)


def test_draft_tree_settings_are_checked(peaky_model, small_layout):
    """A tree that does not fit the window, or half a tree, is one clear error; so is a carry-over
    temperature that is not a positive number (None, the plain mean, is allowed)."""
    for siblings, branch in ((2, 8), (0, 3), (2, 0), (-1, 2)):
        with pytest.raises(ValueError, match="draft tree"):
            Engine(peaky_model, small_layout, max_batch=1, window=8, tree_siblings=siblings, tree_branch=branch)
    for tau in (0, -0.05, "0.05"):
        with pytest.raises(ValueError, match="tree_carry_tau"):
            Engine(peaky_model, small_layout, max_batch=1, window=8, tree_siblings=2, tree_branch=2, tree_carry_tau=tau)
    assert Engine(peaky_model, small_layout, max_batch=1, window=8, tree_siblings=2, tree_branch=2,
                  tree_carry_tau=None).tree_carry_tau is None
