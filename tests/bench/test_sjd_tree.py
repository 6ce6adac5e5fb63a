"""bench.sjd_tree's arithmetic: exact per-node acceptance and the Sequoia-style estimate.

    .venv/bin/python -m pytest -q tests/bench/test_sjd_tree.py
"""
import torch

from bench.sjd_tree import Estimator, more_candidates, stage_accept


def test_stage_accept_is_the_first_positions_acceptance():
    """Averaged over candidates drawn as the tree draws them (c_0 from q, the next from q without
    c_0), stage_accept's P(candidate k accepted) matches the two-candidate recursive rejection
    enumerated by hand, per candidate; one candidate is min(1, p/q) at it."""
    p = torch.tensor([0.05, 0.5, 0.3, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    first = second = 0.0
    for c0 in range(5):
        a0 = min(1.0, float(p[c0] / q[c0]))
        resid = (p - q).clamp_min(0)
        p1 = resid / resid.sum()
        q1 = q.clone()
        q1[c0] = 0
        q1 = q1 / q1.sum()
        first += float(q[c0]) * a0
        second += float(q[c0]) * (1 - a0) * float((q1 * torch.minimum(torch.ones(5, dtype=torch.float64),
                                                                         p1 / q1.clamp_min(1e-30))).sum())
    rows = 40000
    gen = torch.Generator().manual_seed(0)
    c0 = torch.multinomial(q.float(), rows, replacement=True, generator=gen)
    qs = q.expand(rows, 5)
    got = stage_accept(p.expand(rows, 5), qs, more_candidates(qs, c0, 1, gen))
    assert torch.allclose(got[:, 0], (p[c0] / q[c0]).clamp(max=1))
    for k, want in enumerate((first, second)):
        se = float(got[:, k].std()) / rows ** 0.5
        assert abs(float(got[:, k].mean()) - want) < 5 * se + 1e-9, (k, float(got[:, k].mean()), want)
    assert second > 0.05  # the second candidate matters in this case, so the check has teeth


def test_the_estimate_adds_each_nodes_path_probability():
    """1 + the sum over fed nodes of P(path accepted): the plain window, siblings with branches, and
    a depth-1 candidate with its sub-branch, from made-up rates."""
    rt = {"p0": [0.4, 0.1, 0.05], "main_chain": [0.7, 0.5, 0.3, 0.1], "sib_chain": [0.4, 0.2],
          "main_alt": {1: [0.7, 0.05, 0.02], 2: [0.8, 0.04], 3: [0.9]}, "sib_alt": [0.4, 0.06]}
    est = Estimator(rt, window=5)
    main = 1 + 0.7 + 0.5 + 0.3  # the window's drafts 1..L-2 on c_0's path
    assert abs(est(0, 1) - (1 + 0.4 * main)) < 1e-12
    assert abs(est(2, 2) - (1 + 0.4 * main + 0.15 * (1 + 0.4))) < 1e-12  # siblings: c_k, then one reused draft
    # one more candidate at depth 1 under c_0 with a sub-branch of 2 nodes (itself + a reused draft)
    assert abs(est(0, 1, t1=1, m1=2) - (1 + 0.4 * (main + 0.05 * (1 + 0.4)))) < 1e-12
    assert abs(est(0, 1, t2=1) - (1 + 0.4 * (main + 0.7 * 0.04))) < 1e-12  # at depth 2, after draft 1
