"""Benchmark: MoVQGAN-270M encoding, the batched path vs the release's per-image fp32 loop.

    python -m bench.tokenize --device cpu                 # CPU: few images, a few minutes
    python -m bench.tokenize --device cuda --compile      # GPU: bf16, channels-last, compiled, one CUDA graph per bucket
    python -m bench.tokenize --e2e                        # CPU: the whole pre-tokenize job vs the encoder alone (tiny)
    python -m bench.tokenize --e2e --e2e-ray              # the same through the Ray Data stages (decode -> encode)

Random weights (speed does not depend on them). For each size: images/s of (a) a plain loop that
encodes one image at a time in fp32, NCHW, as the release's pre_tokenize.py does, and (b) the
project's path, `MoVQGAN.prepare(device)` then `encode(images, batch_size)` (bf16 autocast and
channels-last on CUDA; with --compile on CUDA static shapes and one CUDA graph per bucket shape,
mode reduce-overhead), the ratio b/a and the achieved TFLOP/s from
the counted encoder FLOPs (model.movqgan.encoder_flops: 0.89 / 3.72 / 8.94 TFLOP per image at
256 / 512 / 768 px). Imports only model/ (and, with --e2e, the tasks that run the job on CPU),
so it runs on a GPU machine that has torch alone. Prints a table and writes bench/results/.
Entry point for other scripts (bench.gpu): bench_encoder(device, sizes, preset, compile, plan) -> rows.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import save_result
from model.movqgan import MoVQGAN, encoder_flops

RESULTS = Path(__file__).resolve().parent / "results"
# images per size for (loop, batched) and the batch size; CPU keeps the run to a few minutes.
PLAN = {
    "cpu": {256: (2, 4, 4), 512: (1, 2, 2), 768: (1, 1, 1)},  # ~35 TFLOP in all
    "cuda": {256: (64, 512, 64), 512: (32, 256, 32), 768: (16, 128, 16)},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm(model: MoVQGAN, images: np.ndarray, batch: int) -> None:
    """GPU: a full batch (cudnn plans, compilation). CPU: one small image (a full one costs minutes)."""
    model.encode(images[:batch] if model.device.type == "cuda" else images[:1, :64, :64], batch_size=batch)
    _sync(model.device)


def time_loop(model: MoVQGAN, images: np.ndarray) -> tuple[float, float]:
    """The release's way: one image at a time, fp32, NCHW. Returns (wall, process CPU) seconds."""
    _warm(model, images, 1)
    t, c = time.perf_counter(), time.process_time()
    for img in images:
        model.encode(img[None])
    _sync(model.device)
    return time.perf_counter() - t, time.process_time() - c


def time_batched(model: MoVQGAN, images: np.ndarray, batch: int) -> tuple[float, float]:
    _warm(model, images, batch)
    t, c = time.perf_counter(), time.process_time()
    model.encode(images, batch_size=batch)
    _sync(model.device)
    return time.perf_counter() - t, time.process_time() - c


def bench_encoder(device: str, sizes: list[int], preset: str, compile: bool, plan: dict) -> list[dict]:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # the loop is the release's plain fp32
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    rows = []
    for size in sizes:
        n_loop, n_batched, batch = plan[size]
        rng = np.random.default_rng(size)
        images = rng.integers(0, 256, (max(n_loop, n_batched), size, size, 3), dtype=np.uint8)
        flops = encoder_flops(preset, size, size)
        model = MoVQGAN(preset).prepare(dev, amp=False, channels_last=False)
        loop_s, loop_cpu = time_loop(model, images[:n_loop])
        model.prepare(dev, compile=compile)  # the project's path: bf16 + channels-last on CUDA
        peak = None
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        batched_s, batched_cpu = time_batched(model, images[:n_batched], batch)
        if dev.type == "cuda":
            peak = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        loop_ips, batched_ips = n_loop / loop_s, n_batched / batched_s
        row = {"size": size, "loop_images": n_loop, "loop_img_s": round(loop_ips, 3),
               "loop_tflops": round(loop_ips * flops / 1e12, 3),
               "batched_images": n_batched, "batch": batch, "batched_img_s": round(batched_ips, 3),
               "batched_tflops": round(batched_ips * flops / 1e12, 3), "ratio": round(batched_ips / loop_ips, 2),
               "tflop_per_image": round(flops / 1e12, 3), "peak_gib": peak, "cuda_graphs": model.static_batches,
               # CPU seconds of this process: on a shared CPU machine, less noisy than wall time
               "loop_cpu_s_per_img": round(loop_cpu / n_loop, 2), "batched_cpu_s_per_img": round(batched_cpu / n_batched, 2)}
        rows.append(row)
        print(f"{size:>4} px | loop {loop_ips:8.3f} img/s ({row['loop_tflops']:.3f} TFLOP/s) | batched "
              f"{batched_ips:8.3f} img/s ({row['batched_tflops']:.3f} TFLOP/s, batch {batch}) | x{row['ratio']}",
              flush=True)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_e2e(count: int, size: int, use_ray: bool = False) -> dict:
    """The tiny pre-tokenize job (decode + encode + tokenize + write; in one process, or through
    the Ray Data stages with use_ray) vs the encoder alone on the same, already-decoded images with
    the same batch size."""
    from model.movqgan import TINY_ASSET, load_movqgan
    from storage import open_dataset
    from tasks.panels.job import run_build
    from tasks.config import load_config
    from tasks.panels.compose import decode_panel
    from tasks.tokenize.job import run_tokenize

    with tempfile.TemporaryDirectory() as tmp:
        over = [f"workdir={tmp}", f"panels.source.count={count}", f"panels.rows_per_unit={count}",
                f"panels.stage_size={size}", f"panels.stage_sizes=[{size}]", "panels.tasks={t2i: 1.0}",
                "tokenize.rows_per_unit=32"]
        cfg = load_config("configs/tiny.yaml", over)
        run_build(cfg, use_ray=False)
        t = time.perf_counter()
        s = run_tokenize(cfg, use_ray=use_ray)
        job_s = time.perf_counter() - t
        rows = open_dataset(cfg.dataset_uri("panels")).table(columns=["upper"]).column("upper").to_pylist()
        images = np.stack([decode_panel(b) for b in rows])
        model = load_movqgan(TINY_ASSET, "tiny")
        model.encode(images[:8], batch_size=cfg.tokenize.batch_size)
        t = time.perf_counter()
        model.encode(images, batch_size=cfg.tokenize.batch_size)
        enc_s = time.perf_counter() - t
    return {"images": count, "size": size, "ray": use_ray, "job_img_s": round(count / job_s, 2),
            "encoder_img_s": round(count / enc_s, 2), "job_over_encoder": round(enc_s / job_s, 3),
            "job_seconds": round(job_s, 2), "encoder_seconds": round(enc_s, 2), "stages": s["throughput"]}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="MoVQGAN encoding benchmark")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768])
    ap.add_argument("--preset", default="270m")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--images", type=int, nargs=3, metavar=("LOOP", "BATCHED", "BATCH"), default=None,
                    help="override the plan for every size")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--e2e", action="store_true", help="the tiny job vs the encoder alone (CPU), instead")
    ap.add_argument("--e2e-images", type=int, default=64)
    ap.add_argument("--e2e-ray", action="store_true", help="the job through the Ray Data stages")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    env = {"device": a.device, "load_avg": [round(x, 1) for x in __import__("os").getloadavg()], "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else None}
    if a.e2e:
        result = {"bench": "tokenize-e2e", **env, "e2e": bench_e2e(a.e2e_images, 128, a.e2e_ray)}
        print(json.dumps(result["e2e"], indent=1))
        name = f"tokenize-e2e{'-ray' if a.e2e_ray else ''}-cpu.json"
    else:
        kind = "cuda" if a.device.startswith("cuda") else "cpu"
        plan = {s: tuple(a.images) if a.images else PLAN[kind].get(s, PLAN[kind][768]) for s in a.sizes}
        rows = bench_encoder(a.device, a.sizes, a.preset, a.compile, plan)
        result = {"bench": "tokenize-encoder", **env, "preset": a.preset, "compile": a.compile, "rows": rows}
        name = f"tokenize-{kind}{'-compiled' if a.compile else ''}.json"
    out = Path(a.out) if a.out else RESULTS / name
    save_result(result, out)


if __name__ == "__main__":
    main(sys.argv[1:])
