"""Benchmark: decode steps along an image's context, seconds per image, bulk images per hour.

    python -m bench.generate --preset tiny                 # CPU: the tiny preset, 256 px, a few minutes
    python -m bench.generate --device cuda --preset 7b     # one H100: every setup at 768 px
    python -m bench.generate --device cuda --preset 2b --setups static,int4
    python -m bench.generate acceptance --train-steps 400  # SJD acceptance on a briefly trained tiny model

Random weights at the real sizes (speed does not depend on them). For each setup, ms per decode
step (both CFG branches) at contexts along the image, then seconds per image integrated over
the image's positions, peak memory, and the bandwidth floor of REFERENCE.md (weights + the KV
cache read once per step, at --bandwidth bytes/s) beside each:
- reference: the release's way, transformers' Chameleon with its dynamic cache, batch 1, the
  conditional and unconditional branches as two forwards per token;
- static: the engine (model/engine.py), static cache, one request, SJD off, compiled on CUDA;
- int4 (CUDA) / int8 (CPU): the same, weight-only quantized (model/quantize.py);
- int4-sjd: the same with SJD (window 16); seconds per image use --acceptance tokens per step
  (random weights accept nothing useful; the figure comes from `acceptance` on a trained model);
- bulk: the largest batch that fits, rows spread along the image as in steady continuous
  batching; images per hour at that acceptance.
Imports model/ only (and transformers for the reference loop), so it runs on a GPU machine with
torch alone. Prints a table and writes bench/results/generate-<preset>-<device>.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model.decoder import Decoder, ModelArgs
from model.engine import Engine, Request, _Job
from model.quantize import quantize_decoder, weight_bytes

RESULTS = Path(__file__).resolve().parent / "results"


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
    res = {"preset": opts.preset, "device": str(device), "device_name": torch.cuda.get_device_name(device)
           if cuda else platform.processor() or platform.machine(), "torch": torch.__version__,
           "image_px": size, "image_tokens": n_img, "contexts": contexts, "bandwidth_Bps": bw,
           "copy_bandwidth_Bps": copy_bandwidth(device), "acceptance_tokens_per_step": opts.acceptance,
           "window": opts.window, "setups": {}}
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
        engine = Engine(model, layout, max_batch=1, device=device, compile=cuda and not opts.no_compile,
                        window=opts.window if sjd else 1, kv_bucket=opts.kv_bucket)
        times = [time_engine(engine, layout, [c], size, sjd, opts.window, opts.steps, device) for c in contexts]
        ms = [t[0] for t in times]
        tps = opts.acceptance if sjd else 1.0
        record(name, ms, engine_weight_bytes(model, engine), {"random_weight_tokens_per_step":
                                                               float(np.mean([t[1] for t in times]))}, tps)
        del engine, model
        model = None
    if "bulk" in setups:
        model = fresh_model(quant)
        free = (torch.cuda.mem_get_info(device)[0] if cuda else 8 * 2**30) - 4 * 2**30
        per_image = 2 * (top + opts.window) * kv_tok
        batch = opts.max_batch or max(1, min(64 if cuda else 8, int(free // per_image)))
        engine = Engine(model, layout, max_batch=batch, device=device, compile=cuda and not opts.no_compile,
                        window=opts.window, kv_bucket=opts.kv_bucket,
                        max_seq=min(args.max_seq_len, top + opts.window + 4 * (size // 8 + 1) + 8))
        spread = [prompt_len + int(n_img * (i + 0.5) / batch) for i in range(batch)]
        ms, _ = time_engine(engine, layout, spread, size, True, opts.window, opts.steps, device)
        steps_per_image = n_img / opts.acceptance
        per_hour = batch * 3600 / (steps_per_image * ms / 1e3)
        floor = floor_ms(engine_weight_bytes(model, engine), np.mean(spread), rows=2 * batch)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        res["setups"]["bulk"] = {"batch": batch, "ms_per_step": ms, "floor_ms_per_step": floor,
                                 "images_per_hour": per_hour, "floor_images_per_hour":
                                 batch * 3600 / (steps_per_image * floor / 1e3), "peak_gib": peak}
        print(f"bulk       batch {batch}: {ms:.2f} ms/step (floor {floor:.2f}) -> {per_hour:.0f} images/hour "
              f"at {opts.acceptance} tokens/step" + (f" | peak {peak:.1f} GiB" if peak else ""))
    return res


# --- SJD acceptance on a briefly trained tiny model ---------------------------------------------

def synthetic_grid(rng, rows, cols, n_codes, colour_bg, colour_fg):
    """A shapes-like code grid: a flat background and one rectangle, each colour a few code variants."""
    g = colour_bg * 4 + rng.integers(0, 4, (rows, cols))
    r0, c0 = rng.integers(0, rows // 2), rng.integers(0, cols // 2)
    r1, c1 = r0 + rng.integers(2, rows // 2 + 1), c0 + rng.integers(2, cols // 2 + 1)
    g[r0:r1, c0:c1] = colour_fg * 4 + rng.integers(0, 4, (r1 - r0, c1 - c0))
    return g % n_codes


def synthetic_sample(rng, layout, task: str, size: int = 64):
    """(prompt ids, grid) for t2i (the prompt names the colours) or a dual panel whose lower half is
    the upper half mirrored with the colours swapped (an image-to-image task with a right answer)."""
    bg, fg = rng.choice(16, 2, replace=False)
    rows = cols = size // 8
    if task == "t2i":
        grid = synthetic_grid(rng, rows, cols, layout.codebook_size, bg, fg)
    else:
        upper = synthetic_grid(rng, rows // 2, cols, layout.codebook_size, bg, fg)
        swap = np.where(upper // 4 == bg, fg * 4 + upper % 4, bg * 4 + upper % 4)
        grid = np.concatenate([upper, swap[:, ::-1]], 0)
    task_id = 10 if task == "t2i" else 11
    prompt = [layout.bos, task_id, 20 + int(bg), 40 + int(fg), layout.turn_end]
    return prompt, grid


def train_tiny(layout, steps: int, batch: int, seed: int = 0) -> Decoder:
    args = ModelArgs.from_name("tiny", vocab_size=layout.vocab_size, max_seq_len=256)
    torch.manual_seed(seed)
    model = Decoder(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        seqs, starts = [], []
        for i in range(batch):
            prompt, grid = synthetic_sample(rng, layout, "t2i" if i % 2 else "pair")
            if rng.random() < 0.1:  # CFG dropout: the image part alone
                prompt = []
            body = [*layout.image_prefix(64, 64)] + [int(x) for x in np.concatenate(
                [grid + layout.code_offset, np.full((grid.shape[0], 1), layout.row_end)], 1).reshape(-1)] + \
                [layout.image_end]
            seqs.append(prompt + body)
            starts.append(len(prompt))
        n = max(len(s) for s in seqs)
        tokens = torch.tensor([s + [0] * (n - len(s)) for s in seqs])
        labels = tokens.clone()
        for i, (s, st) in enumerate(zip(seqs, starts)):
            labels[i, :st + 1] = -100
            labels[i, len(s):] = -100
        lr = 1e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * (1 - step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    return model.eval()


def acceptance(opts) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    layout = BenchLayout("tiny")
    layout.size_base = 100
    if opts.checkpoint:
        from model.hf_checkpoint import load_decoder

        model, _ = load_decoder(opts.checkpoint)
        source = f"checkpoint {opts.checkpoint}"
    else:
        model = train_tiny(layout, opts.train_steps, opts.train_batch)
        source = f"tiny preset trained {opts.train_steps} steps x {opts.train_batch} on synthetic shape grids"
    rng = np.random.default_rng(123)
    out = {"model": source, "n": opts.n}
    for task in ("t2i", "i2i"):
        samples = [synthetic_sample(rng, layout, "t2i" if task == "t2i" else "pair") for _ in range(opts.n)]
        for sjd in (True, False):
            reqs = []
            for i, (prompt, grid) in enumerate(samples):
                upper = grid[:grid.shape[0] // 2] if task == "i2i" else None
                reqs.append(Request(f"{i}", prompt, 64, 64, upper_codes=upper, seed=i, cfg=opts.cfg,
                                    top_k=opts.top_k, sjd=sjd, window=opts.window))
            model.clear_cache()
            engine = Engine(model, layout, max_batch=16, window=opts.window if sjd else 1, kv_bucket=64,
                            max_seq=256)
            t0 = time.perf_counter()
            results = {r.id: r for r in engine.generate(reqs)}
            secs = time.perf_counter() - t0
            steps = sum(r.steps for r in results.values())
            tokens = sum(r.tokens for r in results.values())
            key = f"{task}-{'sjd' if sjd else 'plain'}"
            row = {"tokens_per_step": tokens / steps, "engine_steps": engine.steps_run, "seconds": secs}
            if task == "i2i":
                # quality: lower-panel codes whose colour (code // 4) matches the right answer
                acc = [float(np.mean(results[str(i)].codes[4:] // 4 == g[4:] // 4)) for i, (_, g) in
                       enumerate(samples)]
                row["lower_colour_accuracy"] = float(np.mean(acc))
                row["lower_colour_accuracy_stderr"] = float(np.std(acc) / math.sqrt(len(acc)))
            out[key] = row
            print(f"{key:10s} {json.dumps(row)}")
    return out


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "acceptance":
        p = argparse.ArgumentParser(prog="python -m bench.generate acceptance")
        p.add_argument("--checkpoint", help="a trained tiny decoder folder (model/hf_checkpoint.py format)")
        p.add_argument("--train-steps", type=int, default=400)
        p.add_argument("--train-batch", type=int, default=16)
        p.add_argument("--n", type=int, default=64, help="images per task and mode")
        p.add_argument("--window", type=int, default=16)
        p.add_argument("--cfg", type=float, default=4.0)
        p.add_argument("--top-k", type=int, default=4096)
        opts = p.parse_args(argv[1:])
        res = acceptance(opts)
        name = "generate-sjd-acceptance-tiny.json"
    else:
        p = argparse.ArgumentParser(prog="python -m bench.generate")
        p.add_argument("--preset", default="tiny", choices=["tiny", "2b", "7b"])
        p.add_argument("--device", default="cpu")
        p.add_argument("--size", type=int, help="image side in px (default 256 for tiny, else 768)")
        p.add_argument("--contexts", help="comma-separated positions (default: 5 along the image)")
        p.add_argument("--setups", default="reference,static,int4,int4-sjd,bulk")
        p.add_argument("--steps", type=int, default=10, help="timed steps per point")
        p.add_argument("--window", type=int, default=16)
        p.add_argument("--acceptance", type=float, default=2.0,
                       help="SJD tokens per step for s/image (docs/generate.md has the measured figure)")
        p.add_argument("--kv-bucket", type=int, default=512)
        p.add_argument("--max-batch", type=int, help="bulk batch (default: as many as fit)")
        p.add_argument("--bandwidth", type=float, help="bytes/s for the floor (default: H100 3.35e12 on CUDA, "
                                                       "a measured copy on CPU)")
        p.add_argument("--no-compile", action="store_true")
        p.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
        p.add_argument("--freezing", action="store_true", default=True)
        opts = p.parse_args(argv)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        res = run(opts)
        name = f"generate-{opts.preset}-{torch.device(opts.device).type}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(res, indent=2))
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
