"""Training throughput of the decoder: tokens/s, MFU and peak memory per sequence length.

    python -m bench.train                                   # GPU: 2b at 256/512/768 px, bf16, compiled, FSDP2 (1 rank)
    python -m bench.train --preset tiny --px 64 96 128      # CPU: the tiny preset, fp32, DDP path (1 rank)

Imports model/ only (a GPU machine has no Ray or Prefect): the same train_step and
parallelize() that tasks/train.py runs under Ray Train. Sequences are synthetic samples of the
release's layout lengths (a prompt, then rows of w/8 codes + a row end), all image tokens
supervised; MFU = tokens/s x (6N + 12 L d s) / peak (REFERENCE.md; N without the input
embedding; peak: the bf16 datasheet on known GPUs, a measured fp32 matmul rate on CPUs).
Prints a table and writes bench/results/train-<device>-<preset>.json. Figures: docs/train.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.decoder import Decoder, ModelArgs
from model.training import build_optimizer, flops_per_token, make_batch, parallelize, peak_flops, train_step

PROMPT = 40  # tokens of a typical prompt turn
VOCAB_TINY = 1604  # the shapes layout's vocabulary (model/layout.py)


def seq_len(px: int, patch: int = 8) -> int:
    """Tokens of a square px image sample: prompt + image span (model/layout.py image_length) + turn end."""
    return PROMPT + 4 + (px // patch) * (px // patch + 1) + 1


def samples(n: int, length: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (length,), generator=g).tolist(), PROMPT) for _ in range(n)]


def run(preset: str, pxs: list[int], tokens_per_step: int, steps: int, warmup: int, compile: bool) -> dict:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    vocab = VOCAB_TINY if preset == "tiny" else None
    args = ModelArgs.from_name(preset, **({"vocab_size": vocab} if vocab else {}))
    with torch.device(device):
        model = Decoder(args)
    model = parallelize(model, device, mixed_precision=True, activation_checkpointing=cuda, compile=compile and cuda)
    optimizer = build_optimizer(model, 1e-4)
    peak, peak_how = peak_flops(device)
    rows = []
    for px in pxs:
        length = seq_len(px)
        if length > args.max_seq_len:
            raise SystemExit(f"{px} px needs {length} tokens, more than {preset}'s context {args.max_seq_len}")
        batch = max(1, tokens_per_step // length)
        micro = [make_batch(samples(batch, length, args.vocab_size, seed=px), pad_multiple=64, device=device)]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t_compile = time.perf_counter()
        for _ in range(warmup):
            train_step(model, optimizer, micro, 1e-4)
        if cuda:
            torch.cuda.synchronize()
        t_compile = time.perf_counter() - t_compile
        t0 = time.perf_counter()
        for _ in range(steps):
            m = train_step(model, optimizer, micro, 1e-4)
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        tps = m["seq_tokens"] / dt
        row = {"px": px, "seq_len": length, "batch": batch, "step_s": round(dt, 4), "tokens_per_s": round(tps, 1),
               "mfu": round(tps * flops_per_token(model, length) / peak, 4), "warmup_s": round(t_compile, 1),
               "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
               "loss": round(m["loss"], 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(0) if cuda else f"cpu x{torch.get_num_threads()} threads"
    return {"preset": preset, "device": name, "peak_flops": peak, "peak_from": peak_how, "compile": compile and cuda,
            "dtype": "bf16 (FSDP2 mixed precision)" if cuda else "fp32", "steps": steps, "warmup": warmup,
            "torch": torch.__version__, "rows": rows}


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="2b" if cuda else "tiny")
    p.add_argument("--px", type=int, nargs="+", default=[256, 512, 768] if cuda else [64, 96, 128])
    p.add_argument("--tokens-per-step", type=int, default=18000 if cuda else 2048)
    p.add_argument("--steps", type=int, default=10 if cuda else 5)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args()
    result = run(a.preset, a.px, a.tokens_per_step, a.steps, a.warmup, not a.no_compile)
    out = Path(__file__).parent / "results" / f"train-{'cuda' if cuda else 'cpu'}-{a.preset}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'px':>5} {'seq':>6} {'batch':>5} {'tok/s':>10} {'MFU':>7} {'peak GiB':>9}")
    for r in result["rows"]:
        print(f"{r['px']:>5} {r['seq_len']:>6} {r['batch']:>5} {r['tokens_per_s']:>10.1f} {r['mfu']:>7.2%} "
              f"{r['peak_mem_gib'] if r['peak_mem_gib'] is not None else '-':>9}")
    print(f"device: {result['device']}; peak {result['peak_flops'] / 1e12:.2f} TFLOP/s ({result['peak_from']}) -> {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
