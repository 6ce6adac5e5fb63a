"""Training throughput of the decoder: tokens/s, MFU and peak memory per sequence length.

    python -m bench.train                                   # GPU: 2b at 256/512/768 px, the best path (packed, AC auto, compiled)
    python -m bench.train --levers                          # each MFU lever added in turn (docs/train.md's table)
    python -m bench.train --preset tiny --px 64 96 128      # CPU: the tiny preset, fp32, DDP path (1 rank)

Imports model/ only (a GPU machine has no Ray or Prefect): the same train_step and
parallelize() that tasks/train/job.py runs under Ray Train. Sequences are synthetic samples of the
release's layout lengths (a prompt, then rows of w/8 codes + a row end), all image tokens
supervised; MFU = tokens/s x (6N + 12 L d s) / peak (REFERENCE.md; N without the input
embedding; s the sample's length, also when samples share a packed row; peak: the bf16
datasheet on known GPUs, a measured fp32 matmul rate on CPUs).

The setups (--setups, or --levers for all, cumulative, in this order):
    baseline   padded batches, full activation checkpointing, compile(dynamic=True): what
               GPU.md measured (19.1% / 23.1% MFU at 256 / 768 px on an H200)
    ac-auto    + activation checkpointing chosen from memory (none | selective | full)
    packed     + samples packed into rows of one length per stage, attention inside each sample
               (FlexAttention block mask on GPUs), compile(dynamic=False): one graph per stage
All setups share the chunked loss in the logits' dtype and fused AdamW on CUDA.
Entry point for other scripts (bench.gpu): run(preset=, pxs=, tokens_per_step=, steps=, warmup=,
compile=, setups=, device=) -> dict; setups default to packed on GPUs, ac-auto (padded) on CPUs.
Prints a table and writes bench/results/train-<device>-<preset>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench import save_result
from model.decoder import Decoder, ModelArgs
from model.training import (
    build_optimizer,
    choose_activation_checkpointing,
    flops_per_token,
    make_batch,
    make_packed_batches,
    parallelize,
    peak_flops,
    train_step,
)

PROMPT = 40  # tokens of a typical prompt turn
VOCAB_TINY = 1604  # the shapes layout's vocabulary (model/layout.py)
SETUPS = {
    "baseline": {"ac": "full", "pack": False, "dynamic": True},
    "ac-auto": {"ac": "auto", "pack": False, "dynamic": True},
    "packed": {"ac": "auto", "pack": True, "dynamic": False},
}


def seq_len(px: int, patch: int = 8) -> int:
    """Tokens of a square px image sample: prompt + image span (model/layout.py image_length) + turn end."""
    return PROMPT + 4 + (px // patch) * (px // patch + 1) + 1


def samples(n: int, length: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (length,), generator=g).tolist(), PROMPT) for _ in range(n)]


def pack_length(length: int, tokens_per_step: int, cuda: bool) -> int:
    """Row length of the packed setup, a multiple of 128 (FlexAttention's block): on GPUs whole
    samples up to about 8k positions a row, never more than one step's tokens; on CPUs one sample
    a row (an SDPA mask computes the whole row's attention, samples apart or not)."""
    per_row = max(1, min(8192, tokens_per_step) // (length - 1)) if cuda else 1
    return -(-per_row * (length - 1) // 128) * 128


def _ac(setup: dict, args: ModelArgs, device: torch.device, tokens: int) -> str:
    if setup["ac"] != "auto":
        return setup["ac"]
    if device.type != "cuda":
        return "none"
    with torch.device("meta"):
        n = sum(p.numel() for p in Decoder(args).parameters())
    return choose_activation_checkpointing(args, tokens, 1, torch.cuda.get_device_properties(device).total_memory, n)


def run(preset: str = "tiny", pxs: list[int] = (64, 96, 128), tokens_per_step: int = 2048, steps: int = 5,
        warmup: int = 1, compile: bool = True, setups: list[str] | None = None, device: str | None = None) -> dict:
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    setups = list(setups or (["packed"] if cuda else ["ac-auto"]))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    vocab = VOCAB_TINY if preset == "tiny" else None
    args = ModelArgs.from_name(preset, **({"vocab_size": vocab} if vocab else {}))
    peak, peak_how = peak_flops(dev)
    rows = []
    for px in pxs:
        length = seq_len(px)
        if length > args.max_seq_len:
            raise SystemExit(f"{px} px needs {length} tokens, more than {preset}'s context {args.max_seq_len}")
        batch = max(1, tokens_per_step // length)
        data = samples(batch, length, args.vocab_size, seed=px)
        for name in setups:
            setup = SETUPS[name]
            if setup["pack"]:
                row_len = pack_length(length, tokens_per_step, cuda)
                micro = make_packed_batches(data, row_len, rows_per_batch=-(-batch // (row_len // (length - 1))),
                                            device=dev)
            else:
                row_len = None
                micro = [make_batch(data, pad_multiple=64, device=dev)]
            shape = tuple(micro[0].inputs.shape)
            ac = _ac(setup, args, dev, shape[0] * shape[1])
            torch.manual_seed(0)
            with torch.device(dev):
                model = Decoder(args)
            model = parallelize(model, dev, mixed_precision=True, activation_checkpointing=ac,
                                compile=compile and cuda, compile_dynamic=setup["dynamic"])
            optimizer = build_optimizer(model, 1e-4)
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
            row = {"px": px, "setup": name, "activation_checkpointing": ac, "seq_len": length, "batch": batch,
                   "rows": f"{len(micro)}x{shape[0]}x{shape[1]}", "pack_len": row_len,
                   "step_s": round(dt, 4), "tokens_per_s": round(tps, 1),
                   "mfu": round(tps * flops_per_token(model, length) / peak, 4), "warmup_s": round(t_compile, 1),
                   "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                   "loss": round(m["loss"], 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model, optimizer
            if cuda:
                torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(0) if cuda else f"cpu x{torch.get_num_threads()} threads"
    return {"preset": preset, "device": name, "peak_flops": peak, "peak_from": peak_how, "compile": compile and cuda,
            "dtype": "bf16 (FSDP2 mixed precision)" if cuda else "fp32", "steps": steps, "warmup": warmup,
            "setups": list(setups), "torch": torch.__version__,
            "load_avg": [round(x, 1) for x in os.getloadavg()], "rows": rows}


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="2b" if cuda else "tiny")
    p.add_argument("--px", type=int, nargs="+", default=[256, 512, 768] if cuda else [64, 96, 128])
    p.add_argument("--tokens-per-step", type=int, default=18000 if cuda else 2048)
    p.add_argument("--steps", type=int, default=10 if cuda else 5)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--no-compile", action="store_true")
    # CPUs: padded (an SDPA mask cannot skip the blocks between samples, so packing costs
    # attention there); GPUs: packed (FlexAttention computes only the blocks inside samples).
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), default=["packed"] if cuda else ["ac-auto"])
    p.add_argument("--levers", action="store_true", help="every setup, in order (docs/train.md's table)")
    a = p.parse_args()
    setups = list(SETUPS) if a.levers else a.setups
    result = run(a.preset, a.px, a.tokens_per_step, a.steps, a.warmup, not a.no_compile, setups)
    suffix = "-levers" if a.levers else ""
    out = Path(__file__).parent / "results" / f"train-{'cuda' if cuda else 'cpu'}-{a.preset}{suffix}.json"
    save_result(result, out)
    print(f"{'px':>5} {'setup':>9} {'AC':>9} {'seq':>6} {'batch':>5} {'rows':>10} {'tok/s':>10} {'MFU':>7} {'peak GiB':>9}")
    for r in result["rows"]:
        print(f"{r['px']:>5} {r['setup']:>9} {r['activation_checkpointing']:>9} {r['seq_len']:>6} {r['batch']:>5} "
              f"{r['rows']:>10} {r['tokens_per_s']:>10.1f} {r['mfu']:>7.2%} "
              f"{r['peak_mem_gib'] if r['peak_mem_gib'] is not None else '-':>9}")
    print(f"device: {result['device']}; peak {result['peak_flops'] / 1e12:.2f} TFLOP/s ({result['peak_from']}) -> {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
