"""The engine: a request's seed fixes its image whatever the batch; tasks; bad requests fail alone.

    .venv/bin/python -m pytest -q tests/model/test_engine.py
"""
import numpy as np
import pytest

from model.decoder import ModelArgs
from model.engine import Engine, Request

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(engine_model):
    return engine_model


def mixed_requests(lay):
    rng = np.random.default_rng(0)
    upper = rng.integers(0, lay.codebook_size, (4, 8))  # the upper panel of a 64x64 dual panel
    return [
        Request("t2i-32x32", lay.encode_prompt("a red circle"), 32, 32, seed=1, task="t2i"),
        Request("edit-64x64", lay.encode_prompt("make it blue"), 64, 64, upper_codes=upper, seed=2, task="edit"),
        Request("pair-64x32", lay.encode_prompt("a pair of squares"), 64, 32, seed=3, cfg=1.0, task="pair"),
        Request("plain-32x64", lay.encode_prompt("a wide one"), 32, 64, seed=4, sjd=False, top_k=5),
        Request("depth-64x32", lay.encode_prompt("depth"), 64, 32, upper_codes=upper[:, :4], seed=5,
                task="dense:depth", temperature=0.7, window=3),
        Request("t2i-32x32-b", lay.encode_prompt("a red circle"), 32, 32, seed=6, min_p=0.05),
    ], upper


def test_batch_of_mixed_sizes_and_tasks_gives_each_request_its_image_alone(model, small_layout):
    reqs, upper = mixed_requests(small_layout)
    engine = Engine(model, small_layout, max_batch=3, window=8, kv_bucket=64)
    order, batched = [], {}
    for res in engine.generate(reqs):  # 6 requests through 3 slots: continuous batching
        assert res.error is None, res.error
        order.append(res.id)
        batched[res.id] = res
    assert sorted(order) == sorted(r.id for r in reqs)
    assert order != [r.id for r in reqs]  # they finished at their own pace
    alone = Engine(model, small_layout, max_batch=1, window=8, kv_bucket=64)
    for r in reqs:
        (res,) = alone.generate([r])
        np.testing.assert_array_equal(res.codes, batched[r.id].codes, err_msg=r.id)
        assert res.steps == batched[r.id].steps
    b = batched
    assert b["edit-64x64"].codes.shape == (8, 8) and b["pair-64x32"].codes.shape == (8, 4)
    assert b["plain-32x64"].codes.shape == (4, 8)
    np.testing.assert_array_equal(b["edit-64x64"].codes[:4], upper)  # the given upper panel is kept
    np.testing.assert_array_equal(b["depth-64x32"].codes[:4], upper[:, :4])
    assert b["edit-64x64"].tokens == 4 * 9 + 1  # only the lower panel (and the image end) generated
    assert b["plain-32x64"].steps == b["plain-32x64"].tokens == 4 * 9 + 1  # sjd off: one token a step
    assert b["t2i-32x32"].steps <= b["t2i-32x32"].tokens
    # different seeds, different images; a seed is not tied to a slot
    assert not np.array_equal(b["t2i-32x32"].codes, b["t2i-32x32-b"].codes)


def test_top_k_limits_the_codes(model, small_layout):
    reqs = [Request(f"k{s}", small_layout.encode_prompt("x"), 32, 32, seed=s, top_k=1, sjd=s % 2 == 0)
            for s in range(4)]
    codes = [r.codes for r in Engine(model, small_layout, max_batch=4, window=4, kv_bucket=64).generate(reqs)]
    # top-k 1 is greedy: every seed gives the same image
    for c in codes[1:]:
        np.testing.assert_array_equal(c, codes[0])


def test_min_p_near_one_is_greedy_with_and_without_sjd(model, small_layout):
    def codes(**sampling):
        reqs = [Request(f"p{s}", small_layout.encode_prompt("x"), 32, 32, seed=s, sjd=s % 2 == 0, **sampling)
                for s in range(4)]
        return [r.codes for r in Engine(model, small_layout, max_batch=4, window=4, kv_bucket=64).generate(reqs)]

    greedy = codes(top_k=1)[0]
    for c in codes(min_p=0.999):  # only ids within 0.1% of the best survive: the argmax, every seed
        np.testing.assert_array_equal(c, greedy)
    assert any(not np.array_equal(c, greedy) for c in codes(min_p=0.0))  # and 0 samples


@pytest.mark.parametrize("change, message", [
    (dict(height=40), "height 40 px is not a positive multiple of 32"),
    (dict(width=256, height=256), "needs 1065 positions .* the context holds 256"),
    (dict(task="inpaint"), "unknown task 'inpaint'"),
    (dict(task="edit"), "is image-to-image; give upper_codes"),
    (dict(top_k=0), "top_k 0 must be an integer >= 1"),
    (dict(cfg=0.5), "cfg 0.5 is below 1"),
    (dict(min_p=1.0), r"min_p 1.0 must be in \[0, 1\)"),
    (dict(temperature=0.0), "temperature 0.0 must be > 0"),
    (dict(upper_codes=np.zeros((4, 4), dtype=np.int64)), r"upper_codes of shape \(4, 4\)"),
    (dict(upper_codes=np.full((2, 4), 99)), "upper_codes must be integer codes in 0..15"),
    (dict(prompt_ids=[]), "prompt_ids must be a non-empty"),
    (dict(uncond_upper_codes=np.zeros((2, 4), dtype=np.int64)), "uncond_upper_codes without upper_codes"),
    (dict(upper_codes=np.zeros((2, 4), dtype=np.int64), uncond_upper_codes=np.zeros((2, 3), dtype=np.int64)),
     r"uncond_upper_codes of shape \(2, 3\)"),
    (dict(upper_codes=np.zeros((2, 4), dtype=np.int64), uncond_upper_codes=np.full((2, 4), -1)),
     "uncond_upper_codes must be integer codes in 0..15"),
])
def test_bad_requests_fail_alone_before_any_work(model, small_layout, change, message):
    good = [Request(f"good{i}", small_layout.encode_prompt("ok"), 32, 32, seed=i) for i in range(2)]
    fields = dict(id="bad", prompt_ids=small_layout.encode_prompt("bad"), height=32, width=32, seed=9)
    bad = Request(**{**fields, **change})
    engine = Engine(model, small_layout, max_batch=2, window=4, kv_bucket=64)
    results = list(engine.generate([good[0], bad, good[1]]))
    assert results[0].id == "bad" and results[0].codes is None and results[0].steps == 0
    assert "request 'bad'" in results[0].error
    import re
    assert re.search(message, results[0].error), results[0].error
    assert {r.id for r in results[1:]} == {"good0", "good1"}
    assert all(r.error is None and r.codes.shape == (4, 4) for r in results[1:])


def test_int8_weight_only_on_cpu(model, small_layout):
    import torch

    from model.quantize import quantize_decoder, weight_bytes

    tokens = torch.randint(0, small_layout.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)
    before = weight_bytes(model)
    quantize_decoder(model, "int8")
    assert model.fused  # q/k/v and gate/up fused before quantizing: one int8 GEMM each
    assert type(model.layers[0].feed_forward.w13.weight).__name__ != "Parameter"  # a torchao quantized tensor
    assert weight_bytes(model) < 0.6 * before
    with torch.no_grad():
        got = model(tokens)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
    assert (got - want).abs().max() > 0  # it did change the weights
    with pytest.raises(ValueError, match="needs the model on a CUDA GPU"):
        quantize_decoder(model, "int4")
    (res,) = Engine(model, small_layout, max_batch=1, window=4, kv_bucket=64).generate(
        [Request("q", small_layout.encode_prompt("int8"), 32, 32, seed=0)])
    assert res.error is None and res.codes.shape == (4, 4)


@pytest.mark.slow
def test_the_step_traces_as_whole_graphs_for_compile(model, small_layout):
    """fullgraph=True: the forward and the sampling step have no graph break (CUDA graphs on GPUs);
    the compiled engine gives the same images as the eager one."""
    reqs = [Request(f"c{s}", small_layout.encode_prompt("compile"), 32, 64, seed=s, sjd=s != 1) for s in range(3)]
    eager = {r.id: r.codes for r in Engine(model, small_layout, max_batch=2, window=4, kv_bucket=64).generate(reqs)}
    model.clear_cache()
    engine = Engine(model, small_layout, max_batch=2, window=4, kv_bucket=64, compile=True,
                    compile_backend="aot_eager")
    for r in engine.generate(reqs):
        np.testing.assert_array_equal(r.codes, eager[r.id])


def test_with_the_real_shapes_layout(random_decoder):
    """model/layout.py's Layout (the demo's shapes tokenizer): the engine's output parses under it."""
    from model.layout import Layout

    lay = Layout.shapes(codebook_size=16)
    args = ModelArgs(vocab_size=lay.vocab_size, dim=64, n_layers=2, n_heads=4, intermediate_size=160,
                     max_seq_len=256)
    model = random_decoder(args, seed=4, scale=0.3)
    upper = np.arange(16).reshape(2, 8) % 16
    reqs = [Request("t", lay.encode_prompt("a red circle"), 32, 64, seed=1, task="t2i"),
            Request("e", lay.encode_prompt("make it blue"), 32, 64, upper_codes=upper, seed=2, task="edit")]
    out = {r.id: r for r in Engine(model, lay, max_batch=2, window=8, kv_bucket=64).generate(reqs)}
    assert out["t"].error is None and out["t"].codes.shape == (4, 8)
    np.testing.assert_array_equal(out["e"].codes[:2], upper)
    ids, _ = lay.encode_sample("x", out["e"].codes)
    np.testing.assert_array_equal(lay.parse_image(ids), out["e"].codes)


def test_chunked_prefill_gives_the_same_cache_and_images(model, small_layout):
    """prefill_tokens bounds the tokens of each prefill forward; the cache it leaves and the images
    are those of one forward over all contexts (the chunks attend to what the earlier ones wrote)."""
    import torch

    reqs, _ = mixed_requests(small_layout)
    whole = Engine(model, small_layout, max_batch=6, window=8, kv_bucket=64)
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: sizes.append(a[0].numel()), with_kwargs=True)
    whole._prefill([(b, _job(whole, r)) for b, r in enumerate(reqs)])
    one_forward = list(sizes)
    cache = [(layer.attention.kv_cache.k.clone(), layer.attention.kv_cache.v.clone()) for layer in model.layers]
    sizes.clear()
    chunked = Engine(model, small_layout, max_batch=6, window=8, kv_bucket=64, prefill_tokens=40)
    chunked._prefill([(b, _job(chunked, r)) for b, r in enumerate(reqs)])
    hook.remove()
    assert len(one_forward) == 1 and max(sizes) <= 40 < one_forward[0] and len(sizes) > 3
    for layer, (k, v) in zip(model.layers, cache):
        c = layer.attention.kv_cache
        n = max(len(j.context) for j in chunked.jobs) - 1  # slots below every row's context
        for row, job in enumerate(chunked.jobs):
            m = len(job.context) - 1
            torch.testing.assert_close(c.k[row, :, :m], k[row, :, :m], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c.v[row, :, :m], v[row, :, :m], rtol=1e-5, atol=1e-6)
        assert n > 40
    model.clear_cache()
    want = {r.id: r.codes for r in Engine(model, small_layout, max_batch=3, window=8, kv_bucket=64).generate(reqs)}
    got = Engine(model, small_layout, max_batch=3, window=8, kv_bucket=64, prefill_tokens=16).generate(reqs)
    for r in got:
        np.testing.assert_array_equal(r.codes, want[r.id], err_msg=r.id)


def _job(engine, r):
    from model.engine import _Job

    ctx, rows, cols = engine.check(r)
    b = engine.jobs.index(None)
    engine.jobs[b] = _Job(r, ctx, rows, cols, 0.0)
    return engine.jobs[b]


def test_fit_batch_is_the_engines_own_rule(model, small_layout):
    """fit_batch answers the largest batch check_fits accepts; a batch that cannot fit is one clear
    error naming max_batch, the memory asked and the memory free (the engine checks with it)."""
    from model.decoder import ModelArgs

    args = ModelArgs.from_name("7b")
    gib = 2 ** 30
    for free in (20 * gib, 123.5 * gib, 139 * gib):
        best = Engine.fit_batch(args, 9789, free, margin=0.1)
        assert best >= 1
        Engine.check_fits(args, best, 9789, free, margin=0.1)  # what fit_batch chose is never refused
        with pytest.raises(ValueError, match=f"max_batch {best + 1} needs [0-9.]+ GiB .* GiB are free: use max_batch {best} "):
            Engine.check_fits(args, best + 1, 9789, free, margin=0.1)
    need = Engine.memory_needed(args, 1, 9789)
    assert need["kv_cache"] == 2 * 9789 * 32 * 2 * 4096 * 2  # bf16: 2 rows x slots x layers x K,V x dim
    assert Engine.fit_batch(args, 9789, need["total"] // 2) == 0
    # 26 rows x 9789 slots did not fit 123.5 GiB on the H200 (../shared/GPU.md): fit_batch agrees
    assert Engine.fit_batch(args, 9789, 123.5 * gib) < 13

    calls = []

    class Tight(Engine):
        def _free_bytes(self):
            calls.append(1)
            return Engine.memory_needed(model, 2, 256, n_local=18)["total"] / 0.9

    Tight(model, small_layout, max_batch=2, window=16, max_seq=256, kv_bucket=64)
    with pytest.raises(ValueError, match=r"Engine: max_batch 3 needs [0-9.]+ MiB .* MiB are free: use max_batch 2"):
        Tight(model, small_layout, max_batch=3, window=16, max_seq=256, kv_bucket=64)
    assert len(calls) == 2


def test_the_unconditional_row_sees_its_own_upper_panel(model, small_layout):
    """uncond_upper_codes replaces the upper panel in the CFG row only: its cache is the one a request
    with that panel as its own upper panel leaves in its unconditional row; at cfg 1 (no guidance)
    the image does not depend on it; guided, it does; and giving upper_codes again changes nothing."""
    import torch

    lay = small_layout
    rng = np.random.default_rng(3)
    upper, empty = rng.integers(0, lay.codebook_size, (4, 8)), np.zeros((4, 8), dtype=np.int64)
    ids = lay.encode_prompt("a canny map of a star")

    def req(rid, **kw):
        return Request(rid, ids, 64, 64, seed=7, task="control:canny", sjd=False, top_k=1, **kw)

    engine = Engine(model, lay, max_batch=2, window=4, kv_bucket=64)
    guided = _job(engine, req("guided", upper_codes=upper, uncond_upper_codes=empty))
    plain = _job(engine, req("plain", upper_codes=empty))
    engine._prefill([(0, guided), (1, plain)])
    m = len(guided.context) - len(ids) - 1  # the unconditional rows' prefilled slots
    assert m == 3 + 4 * 9 - 1
    for layer in model.layers:
        c = layer.attention.kv_cache
        torch.testing.assert_close(c.k[2, :, :m], c.k[3, :, :m], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c.v[2, :, :m], c.v[3, :, :m], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(c.k[0, :, len(ids):len(ids) + m], c.k[2, :, :m])  # the cond row has its own map
    model.clear_cache()

    def codes(*reqs):
        out = {r.id: r for r in Engine(model, lay, max_batch=2, window=4, kv_bucket=64).generate(reqs)}
        assert all(r.error is None for r in out.values()), [r.error for r in out.values()]
        return {k: r.codes for k, r in out.items()}

    off = codes(req("a", upper_codes=upper, cfg=1.0), req("b", upper_codes=upper, uncond_upper_codes=empty, cfg=1.0))
    np.testing.assert_array_equal(off["a"], off["b"])
    on = codes(req("a", upper_codes=upper), req("b", upper_codes=upper, uncond_upper_codes=empty),
               req("c", upper_codes=upper, uncond_upper_codes=upper))
    np.testing.assert_array_equal(on["a"], on["c"])
    assert not np.array_equal(on["a"][4:], on["b"][4:])  # greedy, so any difference is the guidance's
    np.testing.assert_array_equal(on["b"][:4], upper)  # the conditional upper panel is the one kept
