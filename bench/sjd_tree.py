"""Benchmark: where SJD's draft-tree steps end, and what larger trees could gain (issue 20).

    nice python -m bench.sjd_tree --tree 6x8 6x2 --carry-tau none --threads 1
    # -> bench/results/sjd-tree-estimate-tiny.json (docs/generate.md, "Where the tree's steps end")

Runs the engine with a draft tree (Engine(tree_siblings=S, tree_branch=m)) on the shipped tiny
decoder and the job's own requests (bench.generate acceptance's: from text and image to image),
and at every step reads the step's logits and the slots before it:

- Where each step ended (realized): no candidate accepted at the first position (the token drawn
  from the residual: a one-token step), or a candidate accepted (the main chain's draft c_0 or a
  sibling), then the depth of the first rejection, or the window's / branch's end.
- Acceptance probabilities, exact given the step's state (no sampling noise from the
  uniforms): P(the k-th candidate at depth 0 is accepted) under recursive rejection with
  candidates drawn from q without replacement (k up to --max-candidates: c_0 is the window's
  draft, the rest drawn here, so any number of candidates can be scored from the one p computed
  at depth 0); the same at depth 1 under the main chain (p of the window's node for c_0) and under
  each sibling (p of the sibling's node), and at depths 2 and 3 under the main chain; and the
  probability that the chain of reused drafts past a node is accepted to depth d, on the main
  chain and on sibling branches (whose drafts were drawn on the main chain's context).
- A check of the arithmetic: the expected tokens per step of the tree that ran, from the same
  probabilities, beside the measured tokens per step.
- Estimates (Sequoia, Chen et al. 2024: expected tokens of a tree = 1 + the sum over its fed
  nodes of P(the path to the node is accepted)) for tree shapes of at most 16, 32 and 64 extra
  nodes at the same window: S siblings at depth 0 with branches of m nodes, T1 more candidates
  at depth 1 under the main chain and U1 under each sibling, T2 at depth 2 under the main chain,
  each such candidate rooting a sub-branch of m1 nodes that reuses deeper drafts. A node not
  computed in the run (a reused draft past a candidate at depth 1 or 2) is given the sibling
  branches' measured rate for a draft placed past a token it was not drawn on.
Imports model/ (and bench.generate's request builder); CPU.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench import save_result
from bench.generate import RESULTS, acceptance_requests, fingerprint
from storage.manifest import code_version
from model import sampling as S
from model.engine import Engine, _step_draws, window_probs
from model.sjd import (
    CARRY_TAU,
    accept_first_of,
    draws_left,
    parse_tree,
    tree_candidates,
    tree_layout,
)

OUT = RESULTS / "sjd-tree-estimate-tiny.json"
BUDGETS = (16, 32, 64)


def stage_accept(p: torch.Tensor, q: torch.Tensor, cands: torch.Tensor,
                 rest: torch.Tensor | None = None) -> torch.Tensor:
    """P(candidate k is the accepted one) [R, K], exact given the candidates [R, K] (the first drawn
    from q [R, V], the others from `rest` (default q) without replacement), under accept_first_of's
    recursive rejection against p [R, V]."""
    p_cur, q = p.double(), q.double()
    rest = q if rest is None else rest.double()
    reach = torch.ones(p.shape[0], dtype=torch.float64)
    out = []
    for k in range(cands.shape[1]):
        q_k, has = draws_left(q if k == 0 else rest, cands[:, :k])
        c = cands[:, k:k + 1]
        a = (p_cur.gather(-1, c) / q_k.gather(-1, c).clamp_min(1e-300)).clamp(max=1)[:, 0]
        a = torch.where(has, a, 0.0)
        out.append(reach * a)
        reach = reach * (1 - a)
        resid = (p_cur - q_k).clamp_min(0)
        z = resid.sum(-1, keepdim=True)
        p_cur = torch.where(has[:, None] & (z > 0), resid / z.clamp_min(1e-300), p_cur)
    return torch.stack(out, 1)


def more_candidates(q: torch.Tensor, first: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """[R, 1 + k]: first [R], then k draws from q [R, V] without replacement (Gumbel top-k: the same
    law as drawing one at a time from what is left); ids with no mass come last and score 0."""
    g = -torch.log(-torch.log(torch.rand(q.shape, generator=gen, dtype=torch.float64).clamp_min(1e-300)))
    key = torch.where(q > 0, q.double().clamp_min(1e-300).log() + g, -torch.inf)
    key = key.scatter(1, first[:, None], -torch.inf)
    return torch.cat([first[:, None], key.topk(k, dim=1).indices], 1)


def proposals(q: torch.Tensor) -> dict[str, torch.Tensor]:
    """Distributions the depth-0 siblings could be drawn from instead of q (q [R, V]): flattened
    powers of q and mixtures with the uniform over q's support (recursive rejection is exact for
    any proposal known before its candidate is drawn)."""
    support = (q > 0).double()
    flat = support / support.sum(-1, keepdim=True)
    out = {}
    for beta in (0.75, 0.5, 0.25):
        w = q.double().clamp_min(0) ** beta * support
        out[f"q^{beta}"] = w / w.sum(-1, keepdim=True)
    for lam in (0.25, 0.5):
        out[f"{1 - lam}q+{lam}uniform"] = (1 - lam) * q.double() + lam * flat
    return out


def neighbours(s, rows: torch.Tensor):
    """Local ids [R] of the first window position's left neighbour (the last accepted token) and of
    the code one row above it, -1 where that is not a code."""
    at = (s.pos - s.body0)[rows]  # body index of the last accepted token (the first position's is at + 1)
    gen = s.gen[rows]
    n_codes = s.q.shape[-1] - 2
    left = torch.where(at >= 0, gen.gather(1, at.clamp(min=0)[:, None])[:, 0], -1)
    up = at + 1 - (s.cols[rows] + 1)
    above = torch.where(up >= 0, gen.gather(1, up.clamp(min=0)[:, None])[:, 0], -1)
    code = lambda x: torch.where((x >= 0) & (x < n_codes), x, -1)
    return code(left), code(above)


def first_drafts(q: torch.Tensor, left: torch.Tensor, above: torch.Tensor, n_codes: int) -> dict[str, torch.Tensor]:
    """Distributions the first draft could be drawn from, each a function of what is below it: the
    carried q, its powers, and mixtures with the left neighbour's and the above code's one-hot
    (rows without that neighbour keep q)."""
    v = q.shape[-1]
    hot = lambda x: torch.where((x >= 0)[:, None], F.one_hot(x.clamp(min=0), v).double(), q)
    out = {"q": q}
    for beta in (0.5, 0.75, 1.5, 2.0):
        w = q.clamp_min(0) ** beta
        out[f"q^{beta}"] = w / w.sum(-1, keepdim=True)
    for lam in (0.1, 0.25, 0.5):
        out[f"{1 - lam}q+{lam}left"] = (1 - lam) * q + lam * hot(left)
        out[f"{1 - lam}q+{lam}above"] = (1 - lam) * q + lam * hot(above)
    out["0.5q+0.25left+0.25above"] = 0.5 * q + 0.25 * hot(left) + 0.25 * hot(above)
    return out


def chain(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """P(drafts 1..d all accepted), [R, D] for d = 1..D: p, q [R, D, V] at those depths, drafts [R, D],
    alive [R, D]: the depth is inside the row's limit."""
    a = (p.gather(-1, drafts[..., None]) / q.gather(-1, drafts[..., None]).clamp_min(1e-30)).clamp(max=1)[..., 0]
    return torch.where(alive, a.double(), 0.0).cumprod(1)


class Stats:
    """Sums over the steps of one group (weights: the probability the parent is accepted)."""

    def __init__(self, window: int, siblings: int, branch: int, k0: int, k1: int):
        self.window, self.siblings, self.branch = window, siblings, branch
        z = lambda n: np.zeros(n)
        self.rows = 0
        self.p0 = z(1 + k0)  # sum of P(candidate k accepted at depth 0)
        self.first_rows, self.first_by = 0, {}  # first positions that are codes; sum of 1 - TV(p, q') there
        self.p0_by = {}  # the same with the siblings drawn from other proposals (proposals())
        self.w_main = 0.0  # sum of P(c_0 accepted)
        self.main_chain = z(window - 1)  # sum of P(c_0) * P(drafts 1..d accepted), d = 1..L-1
        self.main_alt = {d: z(1 + k1) for d in (1, 2, 3)}  # sum of P(main path to d-1) * P(cand j at depth d)
        self.main_reach = {d: 0.0 for d in (1, 2, 3)}  # sum of P(main path to d - 1 accepted)
        self.w_sib = 0.0
        self.sib_chain = z(branch)  # sum over siblings of P(c_k) * P(branch drafts 1..d accepted)
        self.sib_alt = z(1 + k1)  # sum over siblings of P(c_k) * P(cand j at depth 1 under c_k)
        self.emb = None  # {name: [V, D] unit rows} of the local ids (carry_after_drawn)
        self.pending, self.carry_by, self.carry_rows = {}, {}, 0
        self.expected = 0.0  # the running tree's expected tokens (exact given each state)
        self.gained = 0
        self.ends = {}  # realized: "drawn", "main:<tokens>", "sibling:<tokens>", with "max" at a cap

    def end(self, name: str, n: int = 1):
        self.ends[name] = self.ends.get(name, 0) + n


def record(st: Stats, logits, s, gained, gen, k0: int, k1: int):
    """Add one step's rows (speculative, active) to st: logits of the tree step, s the slots before."""
    length, (siblings, branch) = st.window, (st.siblings, st.branch)
    b = s.drafts.shape[0]
    depth = tree_layout(length, siblings, branch)[0]
    p_all = window_probs(logits, s, depth).double()
    p, pb = p_all[:, :length], p_all[:, length:].reshape(b, siblings, branch, -1)
    limit, _, u_res, _ = _step_draws(s)
    cands = tree_candidates(s.drafts, s.q, s.seed, s.nstep, siblings)
    u_first = S.counter_uniform(s.seed, s.nstep, torch.arange(siblings + 1), S.STREAM_TREE_ACCEPT)
    first, chosen = accept_first_of(p[:, 0], s.q[:, 0], cands, u_first, u_res, s.speculative)
    rows = (s.active & s.speculative).nonzero()[:, 0]
    if not len(rows):
        return
    p, pb, q, drafts, limit, cands, first, chosen, gained = (
        t[rows] for t in (p, pb, s.q.double(), s.drafts, limit, cands, first, chosen, gained))
    r = len(rows)
    st.rows += r
    # position d counts toward the tokens only if d + 1 < limit (at the limit the step ends anyway)
    depth_ok = torch.arange(length)[None] + 1 < limit[:, None]  # [R, L]
    # depth 0: the tree's own candidates (exact for the run), and c_0 + k0 drawn here (for estimates)
    p0_run = stage_accept(p[:, 0], q[:, 0], cands)
    st.p0 += stage_accept(p[:, 0], q[:, 0], more_candidates(q[:, 0], drafts[:, 0], k0, gen)).sum(0).numpy()
    # other first drafts than the carried one: 1 - TV(p, q') for q' from what the step knows
    code = (S.position_kinds((s.pos - s.body0)[rows, None] + 1, s.rows[rows], s.cols[rows])[:, 0] == S.CODE)
    left, above = neighbours(s, rows)
    st.first_rows += int(code.sum())
    for name, qv in first_drafts(q[:, 0], left, above, p.shape[-1] - 2).items():
        acc = torch.minimum(p[:, 0], qv).sum(-1)
        st.first_by[name] = st.first_by.get(name, 0.0) + float(acc[code].sum())
    for name, rest in proposals(q[:, 0]).items():  # siblings drawn from another distribution than q
        got = stage_accept(p[:, 0], q[:, 0], more_candidates(rest, drafts[:, 0], k0, gen), rest).sum(0).numpy()
        st.p0_by[name] = st.p0_by.get(name, 0) + got
    p0_run = p0_run * depth_ok[:, :1]
    w0 = p0_run[:, 0]
    st.w_main += float(w0.sum())
    mc = chain(p[:, 1:], q[:, 1:], drafts[:, 1:], depth_ok[:, 1:])  # [R, L-1]
    st.main_chain += (w0[:, None] * mc).sum(0).numpy()
    reach = torch.cat([torch.ones(r, 1, dtype=torch.float64), mc], 1)  # P(drafts 1..d-1 accepted)
    for d in (1, 2, 3):
        if d >= length:
            continue
        w = w0 * reach[:, d - 1] * depth_ok[:, d]
        alt = stage_accept(p[:, d], q[:, d], more_candidates(q[:, d], drafts[:, d], k1, gen))
        st.main_alt[d] += (w[:, None] * alt).sum(0).numpy()
        st.main_reach[d] += float(w.sum())
    # sibling branches: node i of branch k (depth i + 1) predicts depth i + 1 and verifies drafts[i + 1]
    exp = 1 + w0 * (1 + mc[:, :length - 2].sum(1))
    for k in range(1, siblings + 1):
        wk = p0_run[:, k]
        st.w_sib += float(wk.sum())
        sc = chain(pb[:, k - 1], q[:, 1:branch + 1], drafts[:, 1:branch + 1], depth_ok[:, 1:branch + 1])
        st.sib_chain += (wk[:, None] * sc).sum(0).numpy()
        alt = stage_accept(pb[:, k - 1, 0], q[:, 1], more_candidates(q[:, 1], drafts[:, 1], k1, gen))
        st.sib_alt += ((wk * depth_ok[:, 1])[:, None] * alt).sum(0).numpy()
        exp = exp + wk * (1 + sc[:, :branch - 1].sum(1))
    st.expected += float(exp.sum())
    carry_after_drawn(st, s, rows, p, pb, cands, first, chosen, gained)
    st.gained += int(gained.sum())
    for c, g, lim in zip(chosen.tolist(), gained.tolist(), limit.tolist()):
        if c < 0:
            st.end("drawn: one token")
        else:
            cap = lim if c == 0 else min(lim, branch + 1)
            where = "main" if c == 0 else "sibling"
            st.end(f"{where}: {g} tokens" + (" (cap)" if g >= cap else ""))


def carry_after_drawn(st: Stats, s, rows, p, pb, cands, first, chosen, gained):
    """Where the first token was drawn (no candidate accepted), the next step's first draft is drawn
    from tree_carry's mean of the depth-1 p's over the tree's contexts (c_0 and the siblings). Keep
    those p's and the drawn token per slot; at the slot's next step score other weightings of the
    same p's by 1 - TV against the p that step computes (each a function of what is below: lossless
    as a q). Weights: by the similarity of the drawn token to each candidate (cosine of the
    decoder's input embeddings, or of its head's rows), at temperatures, and the nearest only."""
    if st.emb is None:
        return
    slots = rows.tolist()
    for i, b in enumerate(slots):
        prev = st.pending.pop(b, None)
        if prev is not None and prev[0] == int(s.nstep[b]) and prev[1] == int(s.pos[b]):
            ctx_p, drawn, cand = prev[2:]
            target = p[i, 0]
            for name, table in st.emb.items():
                sim = table[cand] @ table[drawn]  # [K] cosine similarities
                for tau in (0.2, 0.1, 0.05, 0.02):
                    w = torch.softmax(sim / tau, 0)
                    key = f"{name} softmax tau {tau}"
                    acc = float(torch.minimum((w[:, None] * ctx_p).sum(0), target).sum())
                    st.carry_by[key] = st.carry_by.get(key, 0.0) + acc
                nearest = ctx_p[int(sim.argmax())]
                st.carry_by[f"{name} nearest"] = st.carry_by.get(f"{name} nearest", 0.0) + \
                    float(torch.minimum(nearest, target).sum())
            st.carry_by["mean (tree_carry)"] = st.carry_by.get("mean (tree_carry)", 0.0) + \
                float(torch.minimum(ctx_p.mean(0), target).sum())
            st.carry_by["main only"] = st.carry_by.get("main only", 0.0) + float(torch.minimum(ctx_p[0], target).sum())
            st.carry_by["actual q"] = st.carry_by.get("actual q", 0.0) + \
                float(torch.minimum(s.q[b, 0].double(), target).sum())
            st.carry_rows += 1
        if int(chosen[i]) < 0 and int(gained[i]) == 1 and (s.pos - s.body0)[b] + 2 < s.rows[b] * (s.cols[b] + 1):
            ctx = torch.cat([p[i, 1:2], pb[i, :, 0]], 0)  # depth-1 p on c_0's context, then each sibling's
            st.pending[b] = (int(s.nstep[b]) + 1, int(s.pos[b]) + 1, ctx, int(first[i]), cands[i])


def rates(st: Stats) -> dict:
    """The per-node probabilities the estimates use (means over the group's rows)."""
    return {
        "rows": st.rows,
        "p0": (st.p0 / st.rows).tolist(),  # P(the k-th candidate at depth 0 is accepted), k = 0..
        "first_draft_acceptance": {k: v / max(st.first_rows, 1) for k, v in st.first_by.items()},
        "carry_after_drawn": {k: v / max(st.carry_rows, 1) for k, v in st.carry_by.items()},
        "carry_rows": st.carry_rows,
        "p0_by_proposal": {k: (v / st.rows).tolist() for k, v in st.p0_by.items()},
        "main_chain": (st.main_chain / st.w_main).tolist(),  # P(drafts 1..d accepted | c_0 accepted)
        "main_alt": {d: (v / max(st.main_reach[d], 1e-30)).tolist() for d, v in st.main_alt.items()},
        "sib_chain": (st.sib_chain / st.w_sib).tolist(),  # P(branch drafts 1..d | sibling accepted)
        "sib_alt": (st.sib_alt / st.w_sib).tolist(),  # P(j-th candidate at depth 1 | sibling accepted)
        "expected_tokens_per_step": st.expected / st.rows,
        "measured_tokens_per_step": st.gained / st.rows,
    }


class Estimator:
    """Expected tokens per step of a tree shape (module docstring) from the rates: 1 + the sum over
    fed nodes of P(path accepted). Reused drafts past a candidate that is not the main chain's get
    the sibling branches' chain rates (sib_chain; beyond the measured depth, its last ratio)."""

    def __init__(self, rt: dict, window: int):
        sc = list(rt["sib_chain"])
        ratio = sc[-1] / sc[-2] if len(sc) >= 2 and sc[-2] > 0 else 0.0
        while len(sc) < window:
            sc.append(sc[-1] * ratio)
        self.sub = np.concatenate([[0.0], 1 + np.concatenate([[0.0], np.cumsum(sc)])])  # sub[n]: n nodes
        self.p0 = np.concatenate([[0.0], np.cumsum(rt["p0"])])  # p0[k]: candidates 0..k-1
        self.alt = {int(d): np.concatenate([[0.0], np.cumsum(v)]) for d, v in rt["main_alt"].items()}
        self.sib_alt = np.concatenate([[0.0], np.cumsum(rt["sib_alt"])])
        self.main = 1 + sum(rt["main_chain"][:window - 2])
        self.mc1 = rt["main_chain"][0]

    def __call__(self, siblings: int, m: int, t1: int = 0, u1: int = 0, m1: int = 1, t2: int = 0) -> float:
        alt = lambda cum, n: cum[n + 1] - cum[1]  # candidates 1..n (0 is the existing draft)
        main = self.main + (alt(self.alt[1], t1) + self.mc1 * alt(self.alt[2], t2)) * self.sub[m1]
        sib = self.sub[m] + (alt(self.sib_alt, u1) * self.sub[m1] if m >= 2 else 0.0)
        return 1 + self.p0[1] * main + (self.p0[siblings + 1] - self.p0[1]) * sib


def search(est: Estimator, budgets, k0: int, k1: int, branch_max: int, top: int = 5) -> dict:
    """The best shapes of at most each budget's extra nodes (a grid over the estimate's parameters),
    and the best one-level tree (SxM, what the engine has) for each."""
    found = []
    grid = (range(k0 + 1), range(1, branch_max + 1), range(min(k1, 12) + 1), range(5), range(1, 5), range(7))
    for s_, m, t1, u1, m1, t2 in itertools.product(*grid):
        if (s_ == 0 and (m > 1 or u1)) or (u1 and m < 2) or (not (t1 or u1 or t2) and m1 > 1):
            continue
        nodes = s_ * m + t1 * m1 + s_ * u1 * m1 + t2 * m1
        if nodes <= max(budgets):
            found.append((est(s_, m, t1, u1, m1, t2), nodes, s_, m, t1, u1, m1, t2))
    found.sort(reverse=True)
    out = {}
    for n in budgets:
        fit = [f for f in found if f[1] <= n]
        one = [f for f in fit if not (f[4] or f[5] or f[7])]
        out[n] = {"one_level": {"tokens_per_step": round(float(one[0][0]), 3), "tree": f"{one[0][2]}x{one[0][3]}",
                                "nodes": one[0][1]},
                  "best": [{"tokens_per_step": round(float(e), 3), "nodes": nodes, "siblings": s_, "branch": m,
                            "depth1_main": t1, "depth1_per_sibling": u1, "sub_branch": m1, "depth2_main": t2}
                           for e, nodes, s_, m, t1, u1, m1, t2 in fit[:top]]}
    return out


def watch(engine: Engine, st: Stats, rng: torch.Generator, k0: int, k1: int) -> None:
    """Make every engine step also record() its logits and the slots before it into st."""
    logits_of, step, seen = engine.window_logits, engine.step, {}

    def window_logits():
        seen["logits"] = logits_of()
        return seen["logits"]

    def counted():
        before = engine.state
        step()
        record(st, seen["logits"], before, engine.state.pos - before.pos, rng, k0, k1)

    engine.window_logits, engine.step = window_logits, counted


def run_tree(model, layout, base, opts, tree: str, rng: torch.Generator) -> dict:
    """One tree's run over both groups -> {group: realized ends, rates, estimates}."""
    import dataclasses

    siblings, branch = parse_tree(tree)
    groups = {}
    for group, requests in base.items():
        reqs = [dataclasses.replace(r, window=opts.window, drafts=opts.drafts) for r in requests]
        model.clear_cache()
        engine = Engine(model, layout, max_batch=opts.max_batch, window=opts.window, kv_bucket=64,
                        tree_siblings=siblings, tree_branch=branch, tree_carry_tau=opts.carry_tau)
        st = Stats(opts.window, siblings, branch, opts.max_candidates, opts.depth1_candidates)
        with torch.no_grad():
            unit = lambda w: F.normalize(w.float(), dim=-1).double()
            st.emb = {"embedding": unit(model.tok_embeddings.weight[engine.local_to_global]),
                      "head": unit(engine.head)}
        watch(engine, st, rng, opts.max_candidates, opts.depth1_candidates)
        results = list(engine.generate(iter(reqs)))
        assert not any(r.error for r in results), [r.error for r in results if r.error][:3]
        steps, tokens = sum(r.steps for r in results), sum(r.tokens for r in results)
        rt = rates(st)
        est = Estimator(rt, opts.window)
        groups[group] = g = {
            "tokens_per_step": round(tokens / steps, 3), "steps": steps,
            "ends": {k: round(v / st.rows, 4) for k, v in sorted(st.ends.items())}, "rates": rt,
            "estimates": search(est, BUDGETS, opts.max_candidates, opts.depth1_candidates, branch),
            "estimate_of_the_run": round(est(siblings, branch), 3), "estimate_without_tree": round(est(0, 1), 3)}
        summary(tree, group, g)
    return groups


def summary(tree: str, group: str, g: dict) -> None:
    rt, cum = g["rates"], lambda v: [round(sum(v[:k]), 3) for k in (1, 2, 4, 7, 13, 33, 65)]
    r3 = lambda v: [round(x, 3) for x in v[:8]]
    print(f"## {tree} {group}: measured {g['tokens_per_step']} tokens per step, exact expectation "
          f"{rt['expected_tokens_per_step']:.3f}, estimate of the run {g['estimate_of_the_run']}", flush=True)
    print(f"  ends: {json.dumps(g['ends'])}")
    print(f"  depth 0, P(one of the first k candidates accepted), k = 1, 2, 4, 7, 13, 33, 65: {cum(rt['p0'])}")
    for name, v in rt["p0_by_proposal"].items():
        print(f"    siblings from {name}: {cum(v)}")
    print(f"  main chain P(drafts 1..d | c_0): {r3(rt['main_chain'])}; sibling branch: {r3(rt['sib_chain'])}")
    print(f"  depth-1 candidates under c_0: {r3(rt['main_alt'][1])}; under a sibling: {r3(rt['sib_alt'])}")
    first = {k: round(v, 3) for k, v in rt["first_draft_acceptance"].items()}
    print(f"  first draft, 1 - TV(p, q'): {json.dumps(first)}")
    print(f"  carry after a drawn first token ({rt['carry_rows']} steps), 1 - TV: "
          f"{json.dumps({k: round(v, 3) for k, v in rt['carry_after_drawn'].items()})}")
    for n, e in g["estimates"].items():
        print(f"  {n} extra nodes: one level {e['one_level']}; best {e['best'][0]}", flush=True)


def main(argv=None):
    from bench.generate import carry_tau

    ap = argparse.ArgumentParser(prog="python -m bench.sjd_tree")
    ap.add_argument("--checkpoint", default="assets/decoder-tiny")
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--n", type=int, default=16, help="pairs per task")
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--tree", nargs="+", default=["6x8", "6x2"],
                    help="the trees that run (the siblings' branches give the rates of reused drafts, to the "
                         "branch's depth)")
    ap.add_argument("--carry-tau", type=carry_tau, default=CARRY_TAU,
                    help="Engine tree_carry_tau of the runs (none: the plain mean)")
    ap.add_argument("--drafts", default="pac")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-candidates", type=int, default=64, help="extra candidates scored at depth 0")
    ap.add_argument("--depth1-candidates", type=int, default=16, help="extra candidates scored at depths 1-3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    opts = ap.parse_args(argv)
    torch.set_num_threads(opts.threads)
    model, layout, gen_cfg, _, base = acceptance_requests(opts)
    out = {"model": opts.checkpoint, "model_sha256": fingerprint(opts.checkpoint), "code_version": code_version(),
           "window": opts.window,
           "drafts": opts.drafts, "carry_tau": opts.carry_tau, "cfg": gen_cfg.cfg, "temperature": gen_cfg.temperature,
           "requests": {g: len(r) for g, r in base.items()}, "budgets": list(BUDGETS),
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch_threads": torch.get_num_threads(),
           "runs": {}}
    rng = torch.Generator().manual_seed(20)
    for tree in opts.tree:
        out["runs"][tree] = run_tree(model, layout, base, opts, tree, rng)
    save_result(out, opts.out)


if __name__ == "__main__":
    main()
