"""Sampling functions: counter-based draws, CFG, layout constraints, top-k, temperature.

    .venv/bin/python -m pytest -q tests/model/test_sampling.py
"""
import torch

from model import sampling as S


def test_counter_uniform_is_uniform_deterministic_and_per_request():
    seed = torch.arange(4000)
    step = torch.zeros(4000, dtype=torch.long)
    u = S.counter_uniform(seed, step, torch.arange(16), S.STREAM_ACCEPT)
    assert u.shape == (4000, 16) and u.min() >= 0 and u.max() < 1
    # Kolmogorov-Smirnov distance of 64k draws from U(0, 1)
    ks = (u.flatten().sort().values - torch.linspace(0, 1, u.numel())).abs().max()
    assert ks < 0.01
    # a request's numbers do not depend on its neighbours in the batch
    torch.testing.assert_close(S.counter_uniform(seed[[17]], step[[17]], torch.arange(16), 0), u[[17]], rtol=0, atol=0)
    other = [S.counter_uniform(seed, step + 1, torch.arange(16), 0),
             S.counter_uniform(seed, step, torch.arange(16), S.STREAM_FRESH)]
    for o in other:  # another step or stream: other numbers, uncorrelated
        assert (o != u).float().mean() > 0.99
        assert abs(torch.corrcoef(torch.stack([o.flatten(), u.flatten()]))[0, 1]) < 0.02
    assert (S.counter_uniform(seed + 1, step, torch.arange(16), 0)[:-1] == u[1:]).all()  # seed is the key


def test_cfg_mix():
    cond, unc = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(S.cfg_mix(cond, unc, torch.tensor([4.0])), torch.tensor([[5.0, -3.0]]))
    torch.testing.assert_close(S.cfg_mix(cond, unc, torch.tensor([1.0])), cond)


def test_layout_constraints():
    # a 2 x 3 grid: codes c c c | row end | c c c | row end | image end | past the end
    kinds = S.position_kinds(torch.arange(10)[None], torch.tensor([2]), torch.tensor([3]))[0]
    assert kinds.tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 2, 3]
    allowed = S.allowed_local(kinds, n_codes=4)
    assert allowed.shape == (10, 6)
    assert allowed[0].tolist() == [True] * 4 + [False, False]
    assert allowed[3].tolist() == [False] * 4 + [True, False]
    assert allowed[8].tolist() == allowed[9].tolist() == [False] * 5 + [True]


def test_top_k_and_temperature():
    logits = torch.tensor([[[1.0, 4.0, 3.0, 2.0, 0.0]], [[1.0, 4.0, 3.0, 2.0, 0.0]]])
    allowed = torch.ones(2, 1, 5, dtype=torch.bool)
    allowed[:, :, 1] = False  # the best logit is not allowed here
    p = S.probs_from_logits(logits, allowed, torch.tensor([1.0, 0.5]), torch.tensor([2, 3]))
    assert (p[0, 0] > 0).tolist() == [False, False, True, True, False]  # k=2 among the allowed
    assert (p[1, 0] > 0).tolist() == [True, False, True, True, False]  # k=3
    torch.testing.assert_close(p[0, 0, 2] / p[0, 0, 3], torch.tensor(2.718281828))
    torch.testing.assert_close(p[1, 0, 2] / p[1, 0, 3], torch.tensor(2.718281828 ** 2))
    cold = S.probs_from_logits(logits[:1], torch.ones(1, 1, 5, dtype=torch.bool), torch.tensor([1e-5]),
                               torch.tensor([5]))
    assert cold[0, 0].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]


def test_min_p_keeps_ids_near_the_largest_after_temperature():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.12, 0.05, 0.03]]] * 3))
    allowed = torch.ones(3, 1, 5, dtype=torch.bool)
    allowed[2, :, 0] = False  # the best id is not allowed here: min-p is relative to the best allowed
    p = S.probs_from_logits(logits, allowed, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([5, 5, 5]),
                            torch.tensor([0.0, 0.2, 0.2]))
    torch.testing.assert_close(p[0, 0], torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03]))  # 0 keeps all
    assert (p[1, 0] > 0).tolist() == [True, True, True, False, False]  # >= 0.2 x 0.5 = 0.1
    torch.testing.assert_close(p[1, 0, :3], torch.tensor([0.5, 0.3, 0.12]) / 0.92)  # renormalised, ratios kept
    assert (p[2, 0] > 0).tolist() == [False, True, True, False, False]  # >= 0.2 x 0.3 = 0.06
    # after the temperature: at T 2 the ratios are square roots, so 0.05 / 0.5 -> 0.316 passes 0.2
    hot = S.probs_from_logits(logits[:1], allowed[:1], torch.tensor([2.0]), torch.tensor([5]), torch.tensor([0.2]))
    assert (hot[0, 0] > 0).tolist() == [True, True, True, True, True]
    # and after top-k
    cut = S.probs_from_logits(logits[:1], allowed[:1], torch.tensor([1.0]), torch.tensor([2]), torch.tensor([0.01]))
    assert (cut[0, 0] > 0).tolist() == [True, True, False, False, False]


def test_sample_draws_from_the_distribution():
    p = torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0]).expand(40000, 5)
    u = S.counter_uniform(torch.arange(40000), torch.zeros(40000, dtype=torch.long), torch.arange(1), 0)[:, 0]
    draws = S.sample(p, u)
    freq = torch.bincount(draws, minlength=5) / 40000.0
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.25, 0.0, 0.75, 0.0]), atol=0.01, rtol=0)
    edge = S.sample(p[:2], torch.tensor([0.0, 0.99999994]))  # the ends of [0, 1) never pick a zero
    assert edge.tolist() == [1, 3]
