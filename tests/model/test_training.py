"""The training step's pieces against plain references: labels, chunked loss + z-loss,
accumulation, schedule, CFG drop, optimizer groups, MFU formula.

    .venv/bin/python -m pytest -q tests/model/test_training.py
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from model.decoder import Decoder, ModelArgs
from model.training import (IGNORE, build_optimizer, cfg_dropped, chunked_loss, drop_context, flops_per_token,
                            lr_at, make_batch, train_step)

ARGS = dict(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=64, max_seq_len=128)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Decoder(ModelArgs.from_name("tiny", **ARGS))


def sample(n, loss_start, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 300, (n,), generator=g).tolist(), loss_start


def test_make_batch_supervises_only_answer_tokens_and_pads():
    ids, start = list(range(10, 30)), 7  # 20 tokens, tokens 7.. supervised
    b = make_batch([(ids, start), (ids[:12], 5)], pad_multiple=8)
    assert b.inputs.shape == (2, 24)  # 19 positions rounded up to 8
    assert b.inputs[0, :19].tolist() == ids[:-1]
    lab = b.labels[0].tolist()
    # position p predicts token p+1: supervised exactly when p+1 >= 7
    assert lab[:6] == [IGNORE] * 6 and lab[6:19] == ids[7:] and lab[19:] == [IGNORE] * 5
    assert b.labels[1, 4:11].tolist() == ids[5:12] and (b.labels[1, 11:] == IGNORE).all()
    assert b.supervised == 13 + 7 and b.tokens == 19 + 11


def test_chunked_loss_matches_full_cross_entropy_and_z_loss():
    model = tiny_model()
    b = make_batch([sample(40, 10, 1), sample(33, 20, 2)])
    hidden = model(b.inputs, return_hidden=True)
    logits = model.output(hidden).float()
    mask = b.labels != IGNORE
    ce_ref = F.cross_entropy(logits[mask], b.labels[mask], reduction="sum")
    z_ref = torch.logsumexp(logits[mask], -1).pow(2).sum()
    (g_ref,) = torch.autograd.grad(ce_ref + 1e-5 * z_ref, model.output.weight, retain_graph=True)
    for chunk in (7, 16, 1000):
        ce, z, n = chunked_loss(hidden, b.labels, model.output, chunk=chunk)
        assert n == int(mask.sum())
        torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-3)
        (g,) = torch.autograd.grad(ce + 1e-5 * z, model.output.weight, retain_graph=True)
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_prompt_tokens_do_not_change_the_loss_target():
    # Same answer, different prompt targets: labels at prompt positions must be ignored, so the
    # loss differs only through the context, and a sample supervised from position 1 counts more.
    b1 = make_batch([(list(range(10, 40)), 15)])
    b2 = make_batch([(list(range(10, 40)), 1)])
    assert b1.supervised == 15 and b2.supervised == 29


def test_accumulation_equals_one_big_batch():
    samples = [sample(30, 12, 3), sample(18, 6, 4), sample(25, 9, 5), sample(30, 20, 6)]
    big, acc = tiny_model(), tiny_model()
    opt_big, opt_acc = build_optimizer(big, 1e-2), build_optimizer(acc, 1e-2)
    m_big = train_step(big, opt_big, [make_batch(samples, pad_multiple=1)], 1e-2, grad_clip=None)
    m_acc = train_step(acc, opt_acc, [make_batch(samples[i:i + 1]) for i in range(4)], 1e-2, grad_clip=None)
    assert m_big["tokens"] == m_acc["tokens"] == sum(len(s) - st for s, st in samples)
    assert m_big["loss"] == pytest.approx(m_acc["loss"], rel=1e-5)
    for (name, p), q in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_train_step_loss_is_supervised_cross_entropy_and_updates_with_lr():
    model = tiny_model()
    before = copy.deepcopy(model)
    b = make_batch([sample(30, 12, 7)])
    with torch.no_grad():
        logits = model(b.inputs).float()
    mask = b.labels != IGNORE
    ref = F.cross_entropy(logits[mask], b.labels[mask]).item()
    opt = build_optimizer(model, 0.0)
    m = train_step(model, opt, [b], lr=3e-3)
    assert m["loss"] == pytest.approx(ref, rel=1e-5)
    assert m["z_loss"] == pytest.approx(torch.logsumexp(logits[mask], -1).pow(2).mean().item(), rel=1e-4)
    assert opt.param_groups[0]["lr"] == 3e-3
    # Adam's first step moves every trained weight by about lr (sign of the gradient).
    delta = (model.layers[0].attention.wq.weight - before.layers[0].attention.wq.weight).abs().max().item()
    assert 1e-3 < delta < 4e-3


def test_lr_schedule_warmup_then_decay():
    kw = dict(peak=1e-3, total=100, warmup=10, min_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(1e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(55, **kw) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, **kw) == pytest.approx(1e-4)
    assert lr_at(55, decay="linear", **kw) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(99, decay="constant", **kw) == 1e-3
    with pytest.raises(ValueError, match="decay"):
        lr_at(50, decay="step", **kw)


def test_cfg_drop_keeps_the_image_part_and_is_deterministic():
    ids = [0, 11, 12, 13, 4, 1, 50, 51, 3, 2, 4]  # BOS prompt turn_end | image_start ...
    kept, start = drop_context(ids, 5, image_start=1)
    assert kept == ids[5:] and start == 0
    with pytest.raises(ValueError, match="image-start"):
        drop_context([0, 11, 4], 2, image_start=1)
    coins = [cfg_dropped(0, 1, step, f"row{i}") for step in range(20) for i in range(100)]
    assert coins == [cfg_dropped(0, 1, step, f"row{i}") for step in range(20) for i in range(100)]
    assert 0.08 < sum(coins) / len(coins) < 0.12  # 10% of samples (REFERENCE.md)
    assert not any(cfg_dropped(0, 1, s, "r", p=0.0) for s in range(100))


def test_optimizer_decays_matrices_only():
    model = tiny_model()
    opt = build_optimizer(model, 1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 and "norm" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"tok_embeddings.weight", "norm.weight",
                                                         "layers.0.attention.q_norm.bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flops_per_token_formula():
    model = tiny_model()
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("tok_embeddings"))
    assert flops_per_token(model, 100) == 6 * n + 12 * 2 * 32 * 100


# --- issue 16: packing, the loss in the logits' dtype, non-finite steps, activation checkpointing ---

def test_packed_rows_give_the_padded_batches_loss_and_gradients():
    from model.training import attention_mask, make_packed_batches, pack

    samples = [sample(n, s, seed) for seed, (n, s) in enumerate([(40, 10), (33, 20), (25, 5), (12, 3), (30, 8)])]
    rows = pack([len(ids) for ids, _ in samples], 64)
    assert sorted(i for r in rows for i in r) == list(range(5)) and len(rows) == 3  # 39+24 | 32+29 | 11
    packed = make_packed_batches(samples, 64, rows_per_batch=2, n_batches=3)
    assert [tuple(b.inputs.shape) for b in packed] == [(2, 64)] * 3  # one shape; the 3rd batch is empty
    assert packed[2].supervised == 0 and sum(b.supervised for b in packed) == make_batch(samples).supervised
    doc = packed[0].doc[0]
    assert doc[:39].eq(0).all() and doc[39:63].eq(1).all() and doc[63] == -1
    assert packed[0].positions[0, 39:63].tolist() == list(range(24))  # positions restart per sample
    m = attention_mask(packed[0].doc, flex=False)[0, 0]
    assert m[45, 39] and not m[45, 38] and not m[38, 45]  # inside a sample, causal, never across

    a, b = tiny_model(), tiny_model()
    oa, ob = build_optimizer(a, 1e-2), build_optimizer(b, 1e-2)
    ra = train_step(a, oa, [make_batch(samples)], 1e-2)
    rb = train_step(b, ob, packed, 1e-2)
    assert ra["tokens"] == rb["tokens"] and ra["seq_tokens"] == rb["seq_tokens"]
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_flex_attention_block_mask_matches_the_sdpa_mask():
    from model.training import attention_mask, make_packed_batches

    model = tiny_model().eval()
    samples = [sample(40, 10, 1), sample(33, 20, 2), sample(20, 5, 3)]
    b = make_packed_batches(samples, 128, rows_per_batch=1)[0]
    with torch.no_grad():  # FlexAttention has no backward on CPUs; its forward is the check here
        dense = model(b.inputs, input_pos=b.positions, attn_mask=attention_mask(b.doc, flex=False))
        flex = model(b.inputs, input_pos=b.positions, attn_mask=attention_mask(b.doc, flex=True))
        # and each sample alone gives what it gives inside the row
        alone = model(torch.tensor([samples[1][0][:-1]]))
    real = b.doc[0] >= 0
    torch.testing.assert_close(flex[0, real], dense[0, real], rtol=1e-4, atol=1e-4)
    at = b.doc[0] == 1
    torch.testing.assert_close(dense[0, at], alone[0], rtol=1e-4, atol=1e-4)


def test_loss_in_the_logits_dtype_matches_fp32_loss_and_gradients():
    from model.training import _LogitsLoss

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 1000, generator=g) * 4).requires_grad_()
    target = torch.randint(0, 1000, (64,), generator=g)
    ref = F.cross_entropy(logits, target, reduction="sum") + 1e-3 * torch.logsumexp(logits, -1).pow(2).sum()
    (g_ref,) = torch.autograd.grad(ref, logits)
    out = _LogitsLoss.apply(logits, target)
    (g_out,) = torch.autograd.grad(out[0] + 1e-3 * out[1], logits)
    torch.testing.assert_close(out[0] + 1e-3 * out[1], ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-7)
    # bf16 logits (the GPU case): no fp32 [n, V] copy, sums in fp32; close to the fp32 reference.
    half = logits.detach().bfloat16().requires_grad_()
    out16 = _LogitsLoss.apply(half, target)
    assert out16.dtype == torch.float32
    ref16 = F.cross_entropy(half.float(), target, reduction="sum")
    assert float(out16[0].detach()) == pytest.approx(float(ref16.detach()), rel=2e-3)
    (g16,) = torch.autograd.grad(out16[0], half)
    assert g16.dtype == torch.bfloat16
    (g16_ref,) = torch.autograd.grad(F.cross_entropy(half.float(), target, reduction="sum"), half)
    torch.testing.assert_close(g16.float(), g16_ref.float(), rtol=2e-2, atol=2e-3)


def test_chunked_loss_gradient_reaches_the_hidden_states():
    model = tiny_model()
    b = make_batch([sample(40, 10, 1), sample(33, 20, 2)])
    hidden = model(b.inputs, return_hidden=True).detach().requires_grad_()
    mask = b.labels != IGNORE
    logits = model.output(hidden)
    ref = F.cross_entropy(logits[mask], b.labels[mask], reduction="sum") + 1e-5 * torch.logsumexp(
        logits[mask], -1).pow(2).sum()
    (g_ref,) = torch.autograd.grad(ref, hidden)
    ce, z, _ = chunked_loss(hidden, b.labels, model.output, chunk=9)
    (g,) = torch.autograd.grad(ce + 1e-5 * z, hidden)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7)


def test_nonfinite_loss_skips_the_step():
    model = tiny_model()
    opt = build_optimizer(model, 1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.layers[0].attention.wq.weight[0, 0] = float("nan")
    before[list(dict(model.named_parameters())).index("layers.0.attention.wq.weight")][0, 0] = float("nan")
    m = train_step(model, opt, [make_batch([sample(40, 10, 1)])], 1e-2)
    assert m["skipped"] and not math.isfinite(m["loss"])
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.nan_to_num(), q.nan_to_num())  # the optimizer did not step
        assert p.grad is None
    assert not train_step(tiny_model(), build_optimizer(tiny_model(), 1e-2), [make_batch([sample(40, 10, 1)])],
                          1e-2)["skipped"]


def test_activation_checkpointing_policies_same_step_and_the_choice_follows_memory():
    from model.training import choose_activation_checkpointing, parallelize

    results = {}
    for policy in ("none", "selective", "full"):
        model = parallelize(tiny_model(), torch.device("cpu"), activation_checkpointing=policy)
        opt = build_optimizer(model, 1e-2)
        m = train_step(model, opt, [make_batch([sample(40, 10, 1), sample(30, 4, 2)])], 1e-2)
        results[policy] = (m["loss"], [p.detach().clone() for p in model.parameters()])
    for policy in ("selective", "full"):
        assert results[policy][0] == results["none"][0]
        for p, q in zip(results[policy][1], results["none"][1]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="expected one of"):
        parallelize(tiny_model(), torch.device("cpu"), activation_checkpointing="some")
    args = ModelArgs.from_name("2b")
    n = 2_600_000_000
    gib = 2**30
    # 2b on one 139 GiB GPU: short micro batches need no recompute; long ones selective, then full.
    picks = [choose_activation_checkpointing(args, t, 1, 139 * gib, n) for t in (2_000, 40_000, 120_000)]
    assert picks[0] == "none" and picks == sorted(picks, key=["none", "selective", "full"].index)
    assert picks[-1] == "full"
    assert choose_activation_checkpointing(args, 9_357, 8, 139 * gib, n) == "none"
