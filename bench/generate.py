"""Benchmark: decode steps along an image's context, seconds per image, bulk images per hour.

    python -m bench.generate --preset tiny                 # CPU: the tiny preset, 256 px, a few minutes
    python -m bench.generate --device cuda --preset 7b     # one H100: every setup at 768 px
    python -m bench.generate --device cuda --preset 2b --setups static,int4
    python -m bench.generate acceptance                    # SJD tokens per step of assets/decoder-tiny
    python -m bench.generate acceptance --drafts pac --tree 0x0 2x3 --equal-nodes --out /tmp/tree.json

Random weights at the real sizes (speed does not depend on them). For each setup, ms per decode
step (both CFG branches) at contexts along the image, then seconds per image integrated over
the image's positions, peak memory, and the bandwidth floor of REFERENCE.md (weights + the KV
cache read once per step, at --bandwidth bytes/s) beside each:
- reference: the release's way, transformers' Chameleon with its dynamic cache, batch 1, the
  conditional and unconditional branches as two forwards per token;
- static: the engine (model/engine.py), static cache, one request, SJD off, compiled on CUDA;
- int4 (CUDA) / int8 (CPU): the same, weight-only quantized (model/quantize.py);
- int4-sjd: the same with SJD (window 16); seconds per image at the SJD acceptance measured by
  `acceptance` (random weights accept nothing useful), unless --acceptance gives one;
- bulk: the largest batch that fits (Engine.fit_batch), rows spread along the image as in steady
  continuous batching; images per hour at that acceptance.
Imports model/ only (and transformers for the reference loop), so it runs on a GPU machine with
torch alone; `acceptance` builds the job's own requests (tasks/) and runs on a CPU. Prints a table
and writes bench/results/generate-<preset>-<device>.json (acceptance: generate-sjd-acceptance-tiny.json).
"""
from __future__ import annotations

import argparse
import collections
import gc
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench import save_result
from model import sampling as S
from model.decoder import Decoder, ModelArgs
from model.engine import DEFAULT_PREFILL_TOKENS, Engine, Request, _Job, advance, window_probs
from model.quantize import quantize_decoder, weight_bytes
from model.sjd import CARRY_TAU, DEFAULT_DRAFTS, DRAFT_KINDS, above_in_window, continue_window, is_pac, parse_tree

RESULTS = Path(__file__).resolve().parent / "results"
ACCEPTANCE = RESULTS / "generate-sjd-acceptance-tiny.json"  # written by `python -m bench.generate acceptance`
# draft trees' acceptance (docs/generate.md, "Draft tree"): `acceptance --tree ... --out` this file
TREE_ACCEPTANCE = RESULTS / "generate-sjd-acceptance-tree-tiny.json"


class BenchLayout:
    """The ids the engine needs. Release presets: the release's ids (REFERENCE.md); the size-token
    ids there are unknown, any non-code ids serve for timing. tiny: the tiny MoVQGAN's 1024 codes."""

    patch = 8

    def __init__(self, preset: str):
        if preset == "tiny":
            self.bos, self.turn_end, self.image_start, self.image_end, self.row_end = 1, 2, 3, 4, 5
            self.size_base, self.code_offset, self.codebook_size = 100, 512, 1024
        else:
            self.bos, self.turn_end = 151643, 151671
            self.image_start, self.image_end, self.row_end = 151665, 151666, 151670
            self.size_base, self.code_offset, self.codebook_size = 151700, 155000, 16384
        self.vocab_size = 1536 if preset == "tiny" else 171385
        self.fingerprint = f"bench-{preset}"

    def image_prefix(self, height_px, width_px):
        return [self.image_start, self.size_base + height_px // 32, self.size_base + width_px // 32]

    def parse_image(self, ids):
        a = np.asarray(ids)
        rows, cols = (int(a[1]) - self.size_base) * 4, (int(a[2]) - self.size_base) * 4
        return a[3:3 + rows * (cols + 1)].reshape(rows, cols + 1)[:, :-1] - self.code_offset


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def image_tokens(size: int) -> int:
    rows = cols = size // 8
    return rows * (cols + 1) + 1


def kv_bytes_per_token(args: ModelArgs, elem: int) -> int:
    return args.n_layers * 2 * args.n_kv_heads * args.head_dim * elem


def build_model(args: ModelArgs, device, dtype) -> Decoder:
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # never hold the 7B in fp32
    try:
        with torch.device(device):
            model = Decoder(args)
    finally:
        torch.set_default_dtype(before)
    return model.to(dtype).eval()


def engine_weight_bytes(model: Decoder, engine: Engine) -> int:
    return weight_bytes(model.layers) + engine.head.numel() * engine.head.element_size()


def place(engine: Engine, layout, contexts: list[int], width: int, sjd: bool, window: int):
    """Put one request per slot with its last context token at position contexts[slot]."""
    for b, c in enumerate(contexts):
        prompt = [layout.bos] + [7 + (i % 50) for i in range(max(c - 4, 1))] + [layout.turn_end]
        r = Request(f"s{b}", prompt, 32, width, seed=b, sjd=sjd, window=window)
        ctx, rows, cols = engine.check(r)
        engine.jobs[b] = _Job(r, ctx, rows, cols, time.perf_counter())
    engine._prefill([(b, engine.jobs[b]) for b in range(len(contexts))])


def time_engine(engine: Engine, layout, contexts, width, sjd, window, steps, device):
    place(engine, layout, contexts, width, sjd, window)
    for _ in range(3):  # warm-up (compiles and records the CUDA graph of this kv bucket)
        engine.step()
    pos0 = engine.pos.clone()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    ms = (time.perf_counter() - t0) / steps * 1e3
    gained = float((engine.pos - pos0).float().mean()) / steps
    for b in range(engine.max_batch):
        engine.jobs[b] = None
        engine.active[b] = False
    return ms, gained


def integrate(contexts, ms, start: int, n_tokens: int, tokens_per_step: float) -> float:
    """Seconds for an image: step time interpolated along positions start..start+n_tokens."""
    pos = np.linspace(start, start + n_tokens, 64)
    step_ms = np.interp(pos, contexts, ms)
    return float(step_ms.mean() * n_tokens / tokens_per_step / 1e3)


def reference_times(args: ModelArgs, contexts, steps, device, dtype, uncond_offset: int, top_k: int):
    """The release's loop: transformers Chameleon, DynamicCache, cond and uncond as two batch-1 forwards."""
    import transformers

    from model.hf_checkpoint import args_to_hf_config

    cfg = transformers.ChameleonConfig(**{k: v for k, v in args_to_hf_config(args, dtype).items()
                                          if k not in ("architectures", "model_type", "torch_dtype")})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.ChameleonForConditionalGeneration(cfg).to(dtype).eval()
    finally:
        torch.set_default_dtype(before)
    out = []
    for c in contexts:
        ids = torch.randint(0, 1000, (1, c), device=device)
        with torch.no_grad():
            cond = model(input_ids=ids, use_cache=True)
            unc = model(input_ids=ids[:, min(uncond_offset, c - 4):], use_cache=True)
            kv_c, kv_u = cond.past_key_values, unc.past_key_values
            tok = ids[:, -1:]

            def one():
                nonlocal tok
                lc = model(input_ids=tok, past_key_values=kv_c, use_cache=True).logits[:, -1]
                lu = model(input_ids=tok, past_key_values=kv_u, use_cache=True).logits[:, -1]
                g = lu + 4.0 * (lc - lu)
                v, i = torch.topk(g, top_k)
                tok = i.gather(-1, torch.multinomial(torch.softmax(v.float(), -1), 1))

            for _ in range(2):
                one()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                one()
            sync(device)
        out.append((time.perf_counter() - t0) / steps * 1e3)
        del kv_c, kv_u, cond, unc
    del model
    return out


def free_memory(device) -> int:
    """Bytes free for the engine's cache and workspace: the GPU's free memory, or the host's available."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 * 2**30


def copy_bandwidth(device) -> float:
    n = (1 << 28) if device.type == "cuda" else (1 << 26)
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    sync(device)
    return 2 * a.numel() * 4 * 5 / (time.perf_counter() - t0)


def run(opts) -> dict:
    device = torch.device(opts.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    layout = BenchLayout(opts.preset)
    args = ModelArgs.from_name(opts.preset, vocab_size=layout.vocab_size)
    size = opts.size or (256 if opts.preset == "tiny" else 768)
    n_img = image_tokens(size)
    prompt_len = 64
    top = prompt_len + n_img
    contexts = [int(c) for c in opts.contexts.split(",")] if opts.contexts else \
        sorted({prompt_len, *(int(top * f) for f in (0.25, 0.5, 0.75)), top - 8})
    bw = opts.bandwidth or (3.35e12 if cuda else copy_bandwidth(device))
    kv_tok = kv_bytes_per_token(args, torch.finfo(dtype).bits // 8)
    quant = "int4" if cuda else "int8"
    setups = opts.setups.split(",")
    compile_mode = "eager" if opts.no_compile else (opts.compile or ("full" if cuda else "eager"))
    siblings, branch = tree = parse_tree(opts.tree)
    tree_name = f"{siblings}x{branch}"
    acceptance_from = "--acceptance"
    if opts.acceptance is None and ({"int4-sjd", "int8-sjd", "bulk"} & set(setups)):
        path = TREE_ACCEPTANCE if siblings else ACCEPTANCE
        opts.acceptance = measured_acceptance(opts.window, tree=tree_name, path=path)
        acceptance_from = f"measured: {path.name}"
    res = {"preset": opts.preset, "device": str(device), "device_name": torch.cuda.get_device_name(device)
           if cuda else platform.processor() or platform.machine(), "torch": torch.__version__,
           "image_px": size, "image_tokens": n_img, "contexts": contexts, "bandwidth_Bps": bw,
           "copy_bandwidth_Bps": copy_bandwidth(device), "acceptance_tokens_per_step": opts.acceptance,
           "acceptance_from": acceptance_from, "window": opts.window, "tree": tree_name, "compile": compile_mode,
           "setups": {}}
    print(f"# {opts.preset} on {res['device_name']}: {size} px ({n_img} image tokens), contexts {contexts}")

    def floor_ms(wbytes, c, rows=2):
        return (wbytes + rows * c * kv_tok) / bw * 1e3

    def record(name, ms, wbytes, extra=None, tokens_per_step=1.0, rows=2):
        floor = [floor_ms(wbytes, c, rows) for c in contexts]
        s_img = integrate(contexts, ms, prompt_len, n_img, tokens_per_step)
        s_floor = integrate(contexts, floor, prompt_len, n_img, tokens_per_step)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        res["setups"][name] = {"ms_per_step": ms, "floor_ms_per_step": floor, "s_per_image": s_img,
                               "floor_s_per_image": s_floor, "tokens_per_step": tokens_per_step,
                               "weight_bytes": wbytes, "peak_gib": peak, **(extra or {})}
        cells = " ".join(f"{m:8.2f}/{f:.2f}" for m, f in zip(ms, floor))
        print(f"{name:10s} ms/step (floor) {cells} | s/image {s_img:9.1f} (floor {s_floor:.1f})"
              + (f" | peak {peak:.1f} GiB" if peak else ""))

    def fresh_model(q: str | None = None):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        m = build_model(args, device, dtype)
        if q:
            quantize_decoder(m, q)
        return m

    if "reference" in setups:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        try:
            ms = reference_times(args, contexts, opts.steps, device, dtype, prompt_len, min(4096, layout.codebook_size))
            wb = (args.n_layers * (4 * args.dim * args.dim + 3 * args.dim * args.intermediate_size)
                  + args.vocab_size * args.dim) * (torch.finfo(dtype).bits // 8)
            record("reference", ms, wb)
        except ImportError as e:
            print(f"reference: skipped ({e})")
    for name, q, sjd in (("static", None, False), (quant, quant, False), (f"{quant}-sjd", quant, True)):
        if name.replace(quant, "int4") not in setups and name not in setups:
            continue
        model = fresh_model(q)
        if opts.freezing and cuda and q:
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True  # REFERENCE.md: int4 + compile needs it to beat bf16
        engine = Engine(model, layout, max_batch=1, device=device, compile=compile_mode == "full",
                        window=opts.window if sjd else 1, kv_bucket=opts.kv_bucket, prefill_tokens=opts.prefill_tokens,
                        **(tree_kwargs(tree) if sjd else {}))
        times = [time_engine(engine, layout, [c], size, sjd, opts.window, opts.steps, device) for c in contexts]
        ms = [t[0] for t in times]
        tps = opts.acceptance if sjd else 1.0
        record(name, ms, engine_weight_bytes(model, engine), {"random_weight_tokens_per_step":
                                                               float(np.mean([t[1] for t in times])),
                                                               "compile_mode": engine.compile_mode}, tps)
        del engine, model
        model = None
    if "bulk" in setups:
        model = fresh_model(quant)
        nodes = opts.window + siblings * branch  # tokens per row and step (the window and the draft tree)
        max_seq = min(args.max_seq_len, top + nodes + 4 * (size // 8 + 1) + 8)
        # The engine's own answer (GPU.md: a second chooser here disagreed with the engine's check)
        batch = opts.max_batch or min(64 if cuda else 8, Engine.fit_batch(
            model, max_seq=max_seq, free_bytes=free_memory(device), window=nodes,
            n_local=layout.codebook_size + 2, prefill_tokens=opts.prefill_tokens))
        if batch < 1:
            raise RuntimeError(f"bulk: not one slot of {max_seq} positions fits the free memory (Engine.fit_batch)")
        engine = Engine(model, layout, max_batch=batch, device=device, compile=compile_mode == "full",
                        window=opts.window, kv_bucket=opts.kv_bucket, max_seq=max_seq,
                        prefill_tokens=opts.prefill_tokens, **tree_kwargs(tree))
        spread = [prompt_len + int(n_img * (i + 0.5) / batch) for i in range(batch)]
        ms, _ = time_engine(engine, layout, spread, size, True, opts.window, opts.steps, device)
        steps_per_image = n_img / opts.acceptance
        per_hour = batch * 3600 / (steps_per_image * ms / 1e3)
        floor = floor_ms(engine_weight_bytes(model, engine), np.mean(spread), rows=2 * batch)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        res["setups"]["bulk"] = {"batch": batch, "batch_from": "--max-batch" if opts.max_batch else "Engine.fit_batch",
                                 "compile_mode": engine.compile_mode, "ms_per_step": ms, "floor_ms_per_step": floor,
                                 "images_per_hour": per_hour, "floor_images_per_hour":
                                 batch * 3600 / (steps_per_image * floor / 1e3), "peak_gib": peak}
        print(f"bulk       batch {batch}: {ms:.2f} ms/step (floor {floor:.2f}) -> {per_hour:.0f} images/hour "
              f"at {opts.acceptance} tokens/step" + (f" | peak {peak:.1f} GiB" if peak else ""))
    return res


# --- SJD acceptance, measured on the shipped tiny decoder -------------------------------------------

FROM_TEXT = ("t2i", "pair")  # the whole image sampled; every other task is image-to-image
TASKS = ("t2i", "pair", "control:canny", "control:depth", "control:hed", "dense:depth", "edit", "subject")


def acceptance(opts) -> dict:
    """SJD tokens per step of the shipped tiny decoder on the job's own requests: the shapes
    source's prompts of every task, upper panels MoVQGAN-encoded, sampling as configured (cfg,
    temperature, top-k, min-p), for from-text (t2i, pair) and image-to-image tasks, at each window and
    draft kind. The job's request path lives in tasks/ (CPU only: the GPU bench reads the result)."""
    import dataclasses

    model, layout, gen, groups, base = acceptance_requests(opts)
    kinds = opts.drafts or list(DRAFT_KINDS)
    trees = [parse_tree(t) for t in (getattr(opts, "tree", None) or ["0x0"])]
    out = {"model": str(opts.checkpoint), "model_sha256": fingerprint(opts.checkpoint), "config": opts.config,
           "overrides": list(getattr(opts, "set", [])), "size": opts.size, "cfg": gen.cfg,
           "cfg_by_task": dict(gen.cfg_by_task), "map_guidance": list(gen.map_guidance),
           "temperature": gen.temperature, "top_k": min(gen.top_k, layout.codebook_size), "min_p": gen.min_p, "draft_kinds": kinds,
           "default_draft": DEFAULT_DRAFTS if DEFAULT_DRAFTS in kinds else kinds[0], "tasks": {g: sorted({p.task for p in ps}) for g, ps in groups.items()},
           "requests": {g: len(r) for g, r in base.items()}, "runs": [],
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch_threads": torch.get_num_threads(),
           "trees": [f"{a}x{b}" for a, b in trees]}
    print(f"# {opts.checkpoint}: {out['requests']} requests of {opts.size} px, cfg {gen.cfg} (by task: {out['cfg_by_task']}), "
          f"top-k {out['top_k']}, min-p {gen.min_p}", flush=True)
    taus = getattr(opts, "carry_tau", None) or [CARRY_TAU]
    min_ps = getattr(opts, "min_p", None) or [gen.min_p]  # side by side: the config's and others'
    out["min_p_runs"] = min_ps
    plan = [(w, k, t, tau) for w, t in tree_plan(opts.window, trees, getattr(opts, "equal_nodes", False))
            for k in kinds for tau in (taus if t[0] else [CARRY_TAU])] + [(1, None, (0, 0), CARRY_TAU)]
    for group, requests in base.items():
        for (window, kind, tree, tau), min_p in itertools.product(plan, min_ps):
            sjd = kind is not None
            reqs = [dataclasses.replace(r, sjd=sjd, window=window, drafts=kind or r.drafts, min_p=min_p)
                    for r in requests]
            model.clear_cache()
            engine = Engine(model, layout, max_batch=opts.max_batch, window=window, kv_bucket=64,
                            tree_siblings=tree[0], tree_branch=tree[1], tree_carry_tau=tau)
            gains = count_gains(engine)
            t0 = time.perf_counter()
            results = list(engine.generate(iter(reqs)))
            secs = time.perf_counter() - t0
            bad = [r.error for r in results if r.error]
            if bad:
                raise RuntimeError(f"acceptance: engine errors {bad[:3]}")
            steps, tokens = sum(r.steps for r in results), sum(r.tokens for r in results)
            n_steps = sum(gains.values())
            row = {"group": group, "sjd": sjd, "window": window, "drafts": kind, "tree": f"{tree[0]}x{tree[1]}",
                   "min_p": min_p,
                   "nodes": engine.nodes, "images": len(results),
                   "tokens_per_step": round(tokens / steps, 3), "steps_per_image": round(steps / len(results), 2),
                   "one_token_steps": round(gains[1] / n_steps, 3),
                   "steps_of_7_or_more": round(sum(c for g, c in gains.items() if g >= 7) / n_steps, 3),
                   "engine_steps": engine.steps_run, "seconds": round(secs, 2)}
            if tree[0]:  # steps that gained 2+ tokens through a sibling branch (its K/V moved)
                row["sibling_steps"] = round(gains.sibling / n_steps, 3)
                row["carry_tau"] = tau  # the carry-over after a drawn first token (None: the plain mean)
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
    if opts.cost_rounds and any(t[0] for t in trees):
        model.clear_cache()
        out["tree_step_cost"] = {}
        for w in opts.tree_cost_window:
            model.clear_cache()
            out["tree_step_cost"][f"window {w}"] = cost = tree_step_cost(model, layout, base["t2i"], w, trees,
                                                                         opts.max_batch, opts.cost_rounds, taus)
            print(json.dumps(cost), flush=True)
    elif opts.cost_rounds:
        model.clear_cache()
        out["step_cost"] = step_cost(model, layout, base["t2i"], kinds, max(opts.window), opts.max_batch,
                                     opts.cost_rounds)
        print(json.dumps(out["step_cost"]), flush=True)
    return out


def fingerprint(folder) -> str:
    """sha256 of a decoder folder's weights (model.safetensors): which decoder a result is of (the
    assets' fingerprints in assets/ are the same digests)."""
    import hashlib

    h = hashlib.sha256()
    with open(Path(folder) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def acceptance_requests(opts):
    """The shipped decoder and the job's own requests that `acceptance` runs (opts: checkpoint, config,
    n pairs per task, size) -> (model, layout, the config's generate section, {group: pairs},
    {group: requests}), groups "t2i" (from text) and "i2i" (image to image)."""
    from model.hf_checkpoint import generation_dtype, load_decoder
    from model.layout import Layout
    from model.movqgan import load_movqgan
    from tasks.config import load_config
    from tasks.generate.job import pair_requests
    from tasks.generate.requests import expand_inputs

    cfg = load_config(opts.config, [*getattr(opts, "set", []), f"models.decoder_path={opts.checkpoint}",
                                    f"generate.inputs={{kind: shapes, count: {opts.n * len(TASKS)}, seed: 4242, "
                                    f"size: {opts.size}, tasks: [{', '.join(TASKS)}]}}"])
    gen, m = cfg.generate, cfg.models
    layout = Layout.from_config(m)
    model, _ = load_decoder(m.decoder_path, dtype=generation_dtype("cpu"))  # as the job loads it here
    movq = load_movqgan(m.movqgan_path, m.movqgan_preset)
    pairs = expand_inputs(cfg).pairs
    groups = {"t2i": [p for p in pairs if p.task in FROM_TEXT], "i2i": [p for p in pairs if p.task not in FROM_TEXT]}
    base = {g: [r for p in ps for r in pair_requests(p, layout, movq, gen)] for g, ps in groups.items()}
    return model, layout, gen, groups, base


def tree_plan(windows, trees, equal_nodes: bool) -> list[tuple[int, tuple[int, int]]]:
    """(window, tree) runs: every tree at every window; with equal_nodes also each tree at the
    window that makes its node count (window + S * m) the plain window's, so that the CPU forward
    costs about the same (runs a tree does not fit are left out)."""
    plan = [(w, t) for w in windows for t in trees if t[1] <= w - 1]
    if equal_nodes:
        plan += [(w - a * b, (a, b)) for w in windows for a, b in trees
                 if a and b <= w - a * b - 1 and (w - a * b, (a, b)) not in plan]
    return plan


def count_gains(engine: Engine) -> collections.Counter:
    """Count, over the engine's steps, how many tokens each active slot gained (a histogram filled as
    the engine runs): where the steps go, e.g. how many gain only the one token a rejection gives."""
    gains = collections.Counter()
    gains.sibling = 0  # steps that gained 2+ tokens on a draft tree's sibling branch
    step = engine.step

    def counted():
        before, active = engine.state.pos.clone(), engine.state.active.clone()
        step()
        gains.update((engine.state.pos - before)[active].tolist())
        if engine.tree[0]:
            gains.sibling += int((engine.last_kv_from != 1)[active].sum())

    engine.step = counted
    return gains


def step_cost(model, layout, requests, kinds, window: int, batch: int, rounds: int) -> dict:
    """What the draft kinds cost a step: ms of the forward and of advance() (the sampling half, the
    only part a kind changes) on one mid-image state of `batch` slots, each kind timed on the same
    logits in interleaved rounds (so load on a shared CPU hits every kind alike); medians, and each
    kind's extra step time over "uniform" as a fraction of a whole uniform step. advance() runs
    every kind's ops for every row (a kind only selects), so the kinds cost alike; what the "pac"
    kinds added to every step is timed too: the carry-over's former draw (sampling.sample of p)
    against continue_window + above_in_window, on the same tensors."""
    import dataclasses

    engine = Engine(model, layout, max_batch=batch, window=window, kv_bucket=64)
    for b in range(batch):
        r = dataclasses.replace(requests[b % len(requests)], id=f"cost{b}", window=window, sjd=True)
        ctx, rows, cols = engine.check(r)
        engine.jobs[b] = _Job(r, ctx, rows, cols, time.perf_counter())
    engine._prefill([(b, engine.jobs[b]) for b in range(batch)])
    for _ in range(3):  # drafts and q as in the middle of an image
        engine.step()
    base = engine.state
    times = {k: [] for k in ["forward", *kinds, "former_draw", "pac_ops"]}
    u = torch.rand(base.drafts.shape, generator=torch.Generator().manual_seed(0))
    every = torch.ones_like(base.active)
    with torch.no_grad():
        for _ in range(rounds):
            t0 = time.perf_counter()
            logits = engine.window_logits()
            times["forward"].append(time.perf_counter() - t0)
            for k in kinds:
                state = base._replace(draft_kind=torch.full_like(base.draft_kind, DRAFT_KINDS.index(k)))
                t0 = time.perf_counter()
                advance(logits, state, engine.consts)
                times[k].append(time.perf_counter() - t0)
            p = window_probs(logits, base)
            t0 = time.perf_counter()
            S.sample(p, u)
            times["former_draw"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            continue_window(p, base.drafts, base.q, u, u, is_pac(base.draft_kind) | every)
            above_in_window(base.drafts, every[:, None].expand_as(base.drafts), base.cols + 1, base.drafts,
                            every[:, None].expand_as(base.drafts))
            times["pac_ops"].append(time.perf_counter() - t0)
    ms = {k: round(float(np.median(v)) * 1e3, 3) for k, v in times.items()}
    ref = ms.get("uniform", ms[kinds[0]])
    step = ms["forward"] + ref
    return {"batch": batch, "window": window, "rounds": rounds, "forward_ms": ms["forward"],
            "advance_ms": {k: ms[k] for k in kinds},
            "extra_vs_uniform": {k: round((ms[k] - ref) / step, 4) for k in kinds},
            "carry_draw_ms": {"former (sample of p)": ms["former_draw"], "now (continue_window + above_in_window)":
                              ms["pac_ops"]},
            "pac_ops_added_fraction_of_step": round((ms["pac_ops"] - ms["former_draw"]) / step, 4)}


def tree_step_cost(model, layout, requests, window: int, trees, batch: int, rounds: int,
                   taus=(CARRY_TAU,)) -> dict:
    """What a draft tree costs a step, side by side: for the plain window, each tree at that window
    (with each carry-over of taus, Engine tree_carry_tau, when there are several), and each tree at
    the window of equal node count (window - S * m), ms of the forward, of advance() and of the K/V
    move (Engine.move_tree_kv), on one mid-image state of `batch` slots per setup, in interleaved
    rounds (load on a shared CPU hits every setup alike); medians, and each step's time relative to
    the plain window's."""
    import copy
    import dataclasses

    setups = [(window, (0, 0), CARRY_TAU)] + [(w, t, tau) for t in trees if t[0]
                                              for w in (window, window - t[0] * t[1]) if t[1] <= w - 1
                                              for tau in (taus if w == window else taus[-1:])]
    engines = {}
    for w, t, tau in setups:
        m = copy.deepcopy(model)  # each engine owns its cache
        engine = Engine(m, layout, max_batch=batch, window=w, kv_bucket=64, tree_siblings=t[0], tree_branch=t[1],
                        tree_carry_tau=tau)
        for b in range(batch):
            r = dataclasses.replace(requests[b % len(requests)], id=f"cost{b}", window=w, sjd=True, drafts="pac")
            ctx, rows, cols = engine.check(r)
            engine.jobs[b] = _Job(r, ctx, rows, cols, time.perf_counter())
        engine._prefill([(b, engine.jobs[b]) for b in range(batch)])
        for _ in range(3):  # drafts and q as in the middle of an image
            engine.step()
        engines[f"w{w}+{t[0]}x{t[1]}" + (f" carry {tau}" if t[0] and len(taus) > 1 else "")] = engine
    times = {k: {"forward": [], "advance": [], "kv_move": []} for k in engines}
    with torch.no_grad():
        for _ in range(rounds):
            for name, engine in engines.items():
                state = engine.state
                t0 = time.perf_counter()
                logits = engine.window_logits()
                t1 = time.perf_counter()
                got = engine._advance(logits, state, engine.consts)
                t2 = time.perf_counter()
                if engine.tree[0]:
                    engine.move_tree_kv(state, got[1])
                t3 = time.perf_counter()
                for part, dt in (("forward", t1 - t0), ("advance", t2 - t1), ("kv_move", t3 - t2)):
                    times[name][part].append(dt)
    out = {"batch": batch, "rounds": rounds, "setups": {}}
    for name, engine in engines.items():
        ms = {k: round(float(np.median(v)) * 1e3, 3) for k, v in times[name].items()}
        ms["step"] = round(sum(ms.values()), 3)
        ms["nodes"] = engine.nodes
        out["setups"][name] = ms
    ref = out["setups"][f"w{window}+0x0"]["step"]
    for ms in out["setups"].values():
        ms["vs_plain_window"] = round(ms["step"] / ref, 4)
    return out


def tree_kwargs(tree: tuple[int, int]) -> dict:
    return {"tree_siblings": tree[0], "tree_branch": tree[1]}


def measured_acceptance(window: int = 16, group: str = "t2i", drafts: str | None = None,
                        path: Path = ACCEPTANCE, tree: str = "0x0") -> float:
    """SJD tokens per step from `python -m bench.generate acceptance` (the default draft kind unless
    named); the per-image and bulk figures use it instead of an assumed value."""
    if not path.is_file():
        raise LookupError(f"{path}: no measured SJD acceptance; run `python -m bench.generate acceptance` "
                          "or pass --acceptance")
    res = json.loads(path.read_text())
    drafts = drafts or res.get("default_draft")
    min_p = res.get("min_p", 0.0)  # the config's sampling (files before min-p: 0); other values ran beside it
    rows = [row for row in res.get("runs", []) if row["sjd"] and row["group"] == group and row["window"] == window
            and row["drafts"] == drafts and row.get("tree", "0x0") == tree and row.get("min_p", 0.0) == min_p]
    # a tree run with the engine's carry-over if there is one (rows before carry_tau had the plain mean)
    rows.sort(key=lambda row: row.get("carry_tau", CARRY_TAU) != CARRY_TAU)
    if rows:
        return float(rows[0]["tokens_per_step"])
    at_min_p = f" at min-p {min_p}" if min_p else ""
    raise LookupError(f"{path}: no {group} run at window {window} with {drafts} drafts and tree {tree}{at_min_p}; rerun "
                      f"`python -m bench.generate acceptance --window {window} --tree {tree} --out {path}` or pass "
                      f"--acceptance")


def carry_tau(text: str) -> float | None:
    """--carry-tau's values: a positive number, or "none" (the plain mean)."""
    return None if text.lower() == "none" else float(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.generate")
    p.add_argument("--preset", default="tiny", choices=["tiny", "2b", "7b"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, help="image side in px (default 256 for tiny, else 768)")
    p.add_argument("--contexts", help="comma-separated positions (default: 5 along the image)")
    p.add_argument("--setups", default="reference,static,int4,int4-sjd,bulk")
    p.add_argument("--steps", type=int, default=10, help="timed steps per point")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--acceptance", type=float, help="SJD tokens per step for s/image and images/hour (default: "
                   f"measured, t2i at the window, from {ACCEPTANCE.relative_to(RESULTS.parent.parent)})")
    p.add_argument("--tree", default="0x0", help="draft tree SIBLINGSxBRANCH of the SJD and bulk setups (Engine "
                   f"tree_siblings / tree_branch); its tokens per step from {TREE_ACCEPTANCE.name} unless --acceptance")
    p.add_argument("--kv-bucket", type=int, default=512)
    p.add_argument("--prefill-tokens", type=int, default=DEFAULT_PREFILL_TOKENS, help="tokens per prefill forward")
    p.add_argument("--max-batch", type=int, help="bulk batch (default: as many as fit, Engine.fit_batch)")
    p.add_argument("--bandwidth", type=float, help="bytes/s for the floor (default: H100 3.35e12 on CUDA, "
                                                   "a measured copy on CPU)")
    p.add_argument("--compile", default=None, choices=["full", "eager"],
                   help="compile the engine's step (default: full on CUDA, eager on a CPU); full falls back to "
                        "the compiled forward with an eager advance(), then eager: the JSON says what ran")
    p.add_argument("--no-compile", action="store_true", help="same as --compile eager")
    p.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    p.add_argument("--freezing", action="store_true", default=True)
    return p


def options(**kw) -> argparse.Namespace:
    """The command's options as a namespace: its defaults, with kw over them (bench/gpu.py's way in)."""
    opts = parser().parse_args([])
    for k, v in kw.items():
        if not hasattr(opts, k):
            raise TypeError(f"bench.generate has no option {k!r}")
        setattr(opts, k, v)
    return opts


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "acceptance":
        p = argparse.ArgumentParser(prog="python -m bench.generate acceptance")
        p.add_argument("--checkpoint", default="assets/decoder-tiny",
                       help="a trained decoder folder (model/hf_checkpoint.py format) of the shapes layout")
        p.add_argument("--config", default="configs/tiny.yaml", help="models, sampling (cfg, top-k) and prompts")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a config override, as the CLI takes them (e.g. 'generate.cfg_by_task={}'); repeatable")
        p.add_argument("--n", type=int, default=8, help="pairs per task (every task of the shapes source)")
        p.add_argument("--size", default="64x64")
        p.add_argument("--window", type=int, nargs="+", default=[8, 16, 32])
        p.add_argument("--drafts", nargs="+", help="draft kinds (default: every one of model.sjd.DRAFT_KINDS)")
        p.add_argument("--max-batch", type=int, default=16)
        p.add_argument("--cost-rounds", type=int, default=30, help="interleaved rounds timing each kind's "
                                                                    "advance() (0: skip)")
        p.add_argument("--tree", nargs="+", default=["0x0"],
                       help="draft trees SIBLINGSxBRANCH (Engine tree_siblings / tree_branch), each run at every "
                            "window; 0x0: none (the default)")
        p.add_argument("--carry-tau", type=carry_tau, nargs="+", default=[CARRY_TAU],
                       help=f"the draft tree's carry-over after a drawn first token (Engine tree_carry_tau): a "
                            f"similarity temperature, or none for the plain mean; each tree runs with each "
                            f"(default {CARRY_TAU})")
        p.add_argument("--equal-nodes", action="store_true",
                       help="also run each tree at the window of equal node count (window - S*m)")
        p.add_argument("--tree-cost-window", type=int, nargs="+", default=[16, 32],
                       help="the plain windows the trees' step cost is timed against (each tree at that window "
                            "and at the window of equal node count)")
        p.add_argument("--min-p", type=float, nargs="+",
                       help="min-p values each run is repeated at, side by side (default: the config's "
                            "generate.min_p); the per-image figures read the config's")
        p.add_argument("--out", default=str(ACCEPTANCE))
        p.add_argument("--threads", type=int, default=1, help="torch threads (the figure is tokens per step; on "
                                                              "a shared CPU, more threads only contend)")
        opts = p.parse_args(argv[1:])
        torch.set_num_threads(opts.threads)
        res = acceptance(opts)
        out = Path(opts.out)
    else:
        opts = parser().parse_args(argv)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        try:
            res = run(opts)
        except LookupError as e:  # no measured acceptance to read
            sys.exit(f"bench.generate: {e}")
        out = RESULTS / f"generate-{opts.preset}-{torch.device(opts.device).type}.json"
    save_result(res, out)


if __name__ == "__main__":
    main()
