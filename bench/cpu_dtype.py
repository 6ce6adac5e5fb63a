"""A decoder's SJD decode step on this CPU with its weights in bf16 and in float32, side by side.

    .venv/bin/python -m bench.cpu_dtype                          # the shipped tiny decoder, 2 threads
    .venv/bin/python -m bench.cpu_dtype --decoder PATH --threads 8 --steps 40

`generate` loads the decoder in float32 on a CPU whose oneDNN has no bf16 kernels
(model.hf_checkpoint.generation_dtype): there a bf16 matmul is emulated. This measures what that
choice is worth here: the engine's step (8 slots, window 16, classifier-free guidance: 16 rows of
the cache) at five context lengths along a 128 px image, each dtype timed on the same slots, plus
a bare linear of the step's shape. Printed and saved to bench/results/cpu-dtype.json.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from bench import save_result
from bench.generate import BenchLayout, image_tokens, time_engine
from model.engine import Engine
from model.hf_checkpoint import cpu_has_fast_bf16, generation_dtype, load_decoder


def linear_ms(dtype: torch.dtype, rows: int, dim: int, out: int, reps: int = 50) -> float:
    x, w = torch.randn(rows, dim, dtype=dtype), torch.randn(out, dim, dtype=dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.nn.functional.linear(x, w)
    return (time.perf_counter() - t0) / reps * 1e3


def run(opts) -> dict:
    torch.set_num_threads(opts.threads)
    layout = BenchLayout("tiny")
    n_img = image_tokens(opts.size)
    contexts = [64 + int(n_img * f) for f in (0.0, 0.25, 0.5, 0.75, 0.95)]
    contexts = (contexts * opts.batch)[:opts.batch]
    res = {"decoder": opts.decoder, "cpu": platform.processor() or platform.machine(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_kernels": cpu_has_fast_bf16(),
           "generate_loads": str(generation_dtype("cpu") or "the checkpoint's dtype"),
           "threads": opts.threads, "batch": opts.batch, "window": opts.window, "contexts": contexts,
           "steps": opts.steps, "torch": torch.__version__, "runs": {}}
    for dtype in (torch.bfloat16, torch.float32):
        model, _ = load_decoder(opts.decoder, dtype=dtype)
        a = model.args
        engine = Engine(model, layout, max_batch=opts.batch, window=opts.window, kv_bucket=64)
        ms, gained = time_engine(engine, layout, contexts, opts.size, True, opts.window, opts.steps,
                                 torch.device("cpu"))
        rows = 2 * opts.batch * opts.window  # the step's tokens: both guidance branches, the window
        row = {"step_ms": round(ms, 2), "tokens_per_step": round(gained, 2),
               "linear_ms": round(linear_ms(dtype, rows, a.dim, a.dim * 4), 3),
               "linear_shape": [rows, a.dim, a.dim * 4]}
        res["runs"][str(dtype).removeprefix("torch.")] = row
        print(f"{dtype}: {row}", flush=True)
        del engine, model
    bf, f32 = res["runs"]["bfloat16"], res["runs"]["float32"]
    res["step_bf16_over_float32"] = round(bf["step_ms"] / f32["step_ms"], 2)
    res["linear_bf16_over_float32"] = round(bf["linear_ms"] / f32["linear_ms"], 2)
    print(f"bf16 / float32: step {res['step_bf16_over_float32']}x, linear {res['linear_bf16_over_float32']}x "
          f"({res['cpu_capability']}, bf16 kernels: {res['bf16_kernels']})")
    res["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decoder", default="assets/decoder-tiny", help="a transformers-format decoder folder")
    ap.add_argument("--size", type=int, default=128, help="image side in px (default 128)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per dtype")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/cpu-dtype.json")
    opts = ap.parse_args(argv)
    save_result(run(opts), opts.out)


if __name__ == "__main__":
    main()
