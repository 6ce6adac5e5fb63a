"""The decode step compiles for CUDA, checked from a CPU: the traced graph holds nothing known to break
triton codegen, inductor's CPU code equals eager, and a compile failure never takes a job down.

    .venv/bin/python -m pytest -q tests/model/test_step_compile.py
    .venv/bin/python -m pytest -q -m slow tests/model/test_step_compile.py   # + inductor on CPU (minutes)

CI has no GPU. The two crashes of the first CUDA run (../shared/GPU.md) were both visible in the
graph before any kernel was generated: an argmax (inductor cannot split its reduction for triton)
and a 64-bit constant in index arithmetic (triton keeps indices in int32). docs/generate.md,
"What breaks triton", keeps the list and the reasons.
"""
import logging

import numpy as np
import pytest
import torch

from model.engine import Engine, Request, advance

pytestmark = pytest.mark.usefixtures("one_thread")

INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1
# aten ops that inductor's triton backend cannot compile on the step's shapes, and why.
FORBIDDEN_OPS = {
    "aten.argmax": "inductor splits a reduction over 16k codes across blocks; argmax/argmin splits are "
                   "'NYI TritonSplitDimKernel reductions' (use a max over a masked arange, or a count)",
    "aten.argmin": "as argmax",
}


def triton_hazards(gm: torch.fx.GraphModule) -> list[str]:
    """What in an aten-level graph breaks triton: forbidden ops, integer constants outside int32."""
    found = []

    def walk(value, node):
        if isinstance(value, (list, tuple)):
            for v in value:
                walk(v, node)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v, node)
        elif isinstance(value, int) and not isinstance(value, bool) and not INT32_MIN <= value <= INT32_MAX:
            found.append(f"{node.format_node()}: integer constant {value} outside int32 (triton keeps "
                         f"indices in int32: 'Scalar {value} is out of range for type int32')")

    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = str(node.target)
            if name.startswith("aten.slice."):  # its end 2^63 - 1 means "to the end": no arithmetic
                continue
            for op, why in FORBIDDEN_OPS.items():
                if name.startswith(op + "."):
                    found.append(f"{node.format_node()}: {why}")
            walk(node.args, node)
            walk(node.kwargs, node)
        elif node.op == "get_attr":
            t = getattr(gm, node.target, None)
            integer = isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dtype != torch.bool
            if integer and t.numel() and (int(t.min()) < INT32_MIN or int(t.max()) > INT32_MAX):
                found.append(f"{node.target}: an int64 tensor constant outside int32")
    return found


def capturing_backend(graphs: list):
    """A torch.compile backend that keeps each aten graph (what inductor would lower) and runs it."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep)


@pytest.fixture
def model(engine_model):
    return engine_model


def requests(lay):
    return [Request(f"r{i}", lay.encode_prompt("compile"), 32, 64, seed=i, sjd=i != 1,
                    drafts=("pac", "above", "above+carry", "uniform", "pac+above")[i]) for i in range(5)]


def test_the_hazard_check_catches_the_first_cuda_runs_crashes():
    """The check is not vacuous: both crashes of the first GPU run (the former sampling code) show."""
    graphs = []

    def former(probs, index):
        last = (probs > 0).to(torch.int64).cumsum(-1).argmax(-1)  # the former sample()'s last id
        return last + (index.long() + -0x40A7B892E31B1A47).sum()  # the former counter_uniform's _M1

    torch._dynamo.reset()
    torch.compile(former, backend=capturing_backend(graphs), fullgraph=True)(torch.rand(2, 8), torch.arange(4))
    found = "\n".join(h for g in graphs for h in triton_hazards(g))
    assert "argmax" in found and "-4658895280553007687" in found, found


@pytest.mark.parametrize("tree", [(0, 0), (2, 2)], ids=["no-tree", "tree2x2"])
def test_the_engine_step_has_no_triton_hazards_and_matches_eager(model, small_layout, tree):
    """Both halves of the step through torch.compile (the aten graphs inductor lowers) give eager's
    images and hold no triton hazard; with a draft tree too (its forward takes the tree's cache
    slots and mask, its advance() the candidates and the recursive rejection)."""
    kw = {"max_batch": 2, "window": 4, "kv_bucket": 64, "tree_siblings": tree[0], "tree_branch": tree[1]}
    eager = {r.id: r.codes for r in Engine(model, small_layout, **kw).generate(requests(small_layout))}
    model.clear_cache()
    graphs = []
    torch._dynamo.reset()
    engine = Engine(model, small_layout, compile=True, compile_backend=capturing_backend(graphs), **kw)
    for r in engine.generate(requests(small_layout)):
        np.testing.assert_array_equal(r.codes, eager[r.id])
    assert engine.compile_mode == "full"
    names = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("addmm" in n or "mm" in n for n in names) and any("cumsum" in n for n in names)  # both halves
    hazards = [h for g in graphs for h in triton_hazards(g)]
    assert not hazards, "\n".join(hazards)


def failing_backend(fail_on: str):
    """A backend whose compile raises for advance()'s graph (the one without attention) or for any."""
    def backend(gm, example_inputs):
        is_forward = "scaled_dot_product_attention" in str(gm.graph)
        if fail_on == "any" or not is_forward:
            raise RuntimeError("NYI TritonSplitDimKernel reductions (forced by the test)")
        return gm.forward
    return backend


@pytest.mark.parametrize("fail_on, mode", [("advance", "forward"), ("any", "eager")])
def test_a_compile_failure_falls_back_with_one_warning(model, small_layout, caplog, fail_on, mode):
    """Compile errors surface at the first call (compile is lazy): the first step falls back, the
    job goes on with the same images, compile_mode says what ran."""
    eager = {r.id: r.codes for r in Engine(model, small_layout, max_batch=2, window=4, kv_bucket=64)
             .generate(requests(small_layout))}
    model.clear_cache()
    torch._dynamo.reset()
    engine = Engine(model, small_layout, max_batch=2, window=4, kv_bucket=64, compile=True,
                    compile_backend=failing_backend(fail_on))
    assert engine.compile_mode == "full"
    with caplog.at_level(logging.WARNING, logger="model.engine"):
        for r in engine.generate(requests(small_layout)):
            np.testing.assert_array_equal(r.codes, eager[r.id])
    assert engine.compile_mode == mode
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1, [w.getMessage() for w in warnings]
    msg = warnings[0].getMessage()
    assert "NYI TritonSplitDimKernel reductions" in msg and f"compile_mode={mode!r}" in msg
    assert ("advance" in msg) == (mode == "forward")


@pytest.mark.slow
def test_inductor_compiles_advance_on_cpu_like_eager(model, small_layout):
    """advance() through inductor's C++ backend (the codegen path shared with triton up to the kernels)
    gives eager's integers bit for bit: tokens, positions, drafts, the image so far. q holds
    probabilities (softmax reductions in another order): equal to float32 rounding."""
    from model.engine import _Job

    reqs = requests(small_layout)
    engine = Engine(model, small_layout, max_batch=len(reqs), window=8, kv_bucket=64)
    new = []
    for b, r in enumerate(reqs):
        ctx, rows, cols = engine.check(r)
        engine.jobs[b] = _Job(r, ctx, rows, cols, 0.0)
        new.append((b, engine.jobs[b]))
    engine._prefill(new)
    for _ in range(3):
        engine.step()
    torch._dynamo.reset()
    compiled = torch.compile(advance, backend="inductor", fullgraph=True, dynamic=False)
    s = engine.state
    for trial in range(2):
        logits = 3 * torch.randn(2 * len(reqs), 8, small_layout.codebook_size + 2, generator=torch.Generator().manual_seed(trial))
        got, want = compiled(logits, s, engine.consts), advance(logits, s, engine.consts)
        assert_same_slots(got, want)
        s = want


@pytest.mark.slow
def test_inductor_compiles_tree_advance_on_cpu_like_eager(model, small_layout):
    """tree_advance() (a draft tree: candidates without replacement, recursive rejection, the path,
    the K/V source) through inductor's C++ backend gives eager's integers bit for bit, q to float32
    rounding, on a mid-image state."""
    from model.engine import _Job, tree_advance

    reqs = requests(small_layout)
    engine = Engine(model, small_layout, max_batch=len(reqs), window=8, kv_bucket=64, tree_siblings=2, tree_branch=3)
    for b, r in enumerate(reqs):
        ctx, rows, cols = engine.check(r)
        engine.jobs[b] = _Job(r, ctx, rows, cols, 0.0)
    engine._prefill([(b, engine.jobs[b]) for b in range(len(reqs))])
    for _ in range(3):
        engine.step()
    torch._dynamo.reset()

    def tree_step(logits, s, c):
        return tree_advance(logits, s, c, 2, 3)

    compiled = torch.compile(tree_step, backend="inductor", fullgraph=True, dynamic=False)
    s = engine.state
    for trial in range(2):
        logits = 3 * torch.randn(2 * len(reqs), engine.nodes, small_layout.codebook_size + 2,
                                 generator=torch.Generator().manual_seed(trial))
        (got, got_from), (want, want_from) = compiled(logits, s, engine.consts), tree_step(logits, s, engine.consts)
        assert torch.equal(got_from, want_from)
        assert_same_slots(got, want)
        s = want


def assert_same_slots(got, want):
    """Compiled against eager slot states: integers bit for bit, q (float) to float32 rounding."""
    for name, a, b in zip(want._fields, got, want):
        if name == "q":
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(a, b), name
