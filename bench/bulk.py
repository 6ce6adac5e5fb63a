"""Bulk-job overhead: pairs/hour of the whole generation job against the engine's own images/hour.

    .venv/bin/python -m bench.bulk                       # CPU: tiny preset, 128 px, 32 pairs
    .venv/bin/python -m bench.bulk --pairs 64 --size 128x128 --unit 32

In one run, on the same requests (same prompts, sizes, seeds, upper panels):
- engine: model/engine.py alone, every request streamed through one continuous batch, codes
  only (nothing decoded, scored or written): its images/hour;
- job: the job's path for the same pairs: expand the inputs (tasks/generate/requests.py), split them in
  units, and per unit the actor's work (tasks/generate.GenerateWorker: MoVQGAN-encode the upper
  panels, the engine, MoVQGAN-decode, canny F1 verify, PNG-encode, write the shard) plus the
  driver's commit, then finalize: pairs/hour.
The engine side runs before and after the job and the mean is used (this machine is shared).
Ray's scheduling is not in the job side (the bench runs where Ray may be absent, DESIGN.md "GPU
paths"); the Ray job's own start-up is a constant (tests/tasks/test_generate_job.py runs it).
Random weights (speed does not depend on them), written in the real formats to a temp folder.
Prints the figures and writes bench/results/bulk-<device>.json. Goal: overhead under 10%.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench import save_result


def write_models(folder: Path, preset: str) -> tuple[str, str]:
    from model.decoder import Decoder, ModelArgs
    from model.hf_checkpoint import save_decoder
    from model.layout import Layout
    from model.movqgan import MoVQGAN, save_movqgan

    torch.manual_seed(0)
    layout = Layout.shapes()
    save_decoder(Decoder(ModelArgs.from_name(preset, vocab_size=layout.vocab_size)), folder / "decoder",
                 meta={"preset": preset, "layout": layout.meta()})
    save_movqgan(MoVQGAN.from_preset("tiny"), folder / "movqgan.safetensors")
    return str(folder / "decoder"), str(folder / "movqgan.safetensors")


def engine_side(worker, pairs) -> dict:
    """The engine alone on the requests the job makes (built before the clock starts)."""
    from tasks.generate.job import pair_requests

    gen, parts = worker.cfg.generate, worker.parts
    reqs = [r for p in pairs for r in pair_requests(p, parts.layout, parts.movqgan, gen)]
    t0 = time.perf_counter()
    results = list(parts.engine.generate(iter(reqs)))
    s = time.perf_counter() - t0
    assert all(r.error is None for r in results), [r.error for r in results if r.error]
    return {"images": len(results), "seconds": round(s, 3), "images_per_hour": round(3600 * len(results) / s, 1)}


def job_side(cfg, worker) -> dict:
    from storage import DatasetWriter
    from tasks.generate.job import EngineSettings, job_config, make_units, output_uri, reconcile
    from tasks.generate.requests import expand_inputs

    t0 = time.perf_counter()
    pairs = expand_inputs(cfg).pairs
    units = make_units(pairs, cfg.generate.pairs_per_unit)
    settings = EngineSettings(worker.parts.device, worker.parts.quantize, worker.parts.engine.compile_mode)
    writer = DatasetWriter(output_uri(cfg), kind="generated", config=job_config(cfg, settings), overwrite=True)
    parts: dict[str, float] = {}
    for u in units:
        out = worker(u)
        writer.commit(out["info"])
        for k in ("prep_s", "generate_s", "decode_s", "verify_s", "write_s"):
            parts[k] = parts.get(k, 0.0) + out["stats"][k]
    reconcile(writer, {u["unit"] for u in units})
    writer.finalize()
    s = time.perf_counter() - t0
    return {"pairs": len(pairs), "units": len(units), "seconds": round(s, 3),
            "pairs_per_hour": round(3600 * len(pairs) / s, 1), "breakdown_s": {k: round(v, 3) for k, v in parts.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--size", default="128x128")
    ap.add_argument("--unit", type=int, default=32, help="pairs per work unit")
    ap.add_argument("--max-batch", default="auto", help="the engine's batch: auto = Engine.fit_batch on CUDA, 8 on CPU")
    ap.add_argument("--tasks", default="t2i,control:canny")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from tasks.config import load_config
    from tasks.generate.job import GenerateWorker, load_parts, output_uri

    work = Path(tempfile.mkdtemp(prefix="panelforge-bulk-"))
    try:
        dec, movq = write_models(work / "models", args.preset)
        tasks = "[" + ", ".join(args.tasks.split(",")) + "]"
        cfg = load_config("configs/tiny.yaml", [
            f"workdir={work / 'out'}", f"models.decoder_path={dec}", f"models.movqgan_path={movq}",
            "models.decoder_preset=" + args.preset, f"generate.inputs={{kind: shapes, count: {args.pairs}, seed: 7, "
            f"size: {args.size}, tasks: {tasks}}}", "generate.best_of=1", f"generate.pairs_per_unit={args.unit}",
            f"generate.max_batch={args.max_batch}"])
        worker = GenerateWorker(cfg.model_dump(), output_uri(cfg), parts=load_parts(cfg))
        from tasks.generate.requests import expand_inputs

        pairs = expand_inputs(cfg).pairs
        device = worker.parts.device
        load_before = os.getloadavg()
        engine_side(worker, pairs[: worker.parts.engine.max_batch])  # warm-up (first-call allocations, compile on CUDA)
        e1 = engine_side(worker, pairs)
        print(f"engine: {e1['images']} images in {e1['seconds']:.1f} s = {e1['images_per_hour']:.0f} images/hour")
        job = job_side(cfg, worker)
        print(f"job:    {job['pairs']} pairs in {job['seconds']:.1f} s = {job['pairs_per_hour']:.0f} pairs/hour "
              f"({job['units']} units; {job['breakdown_s']})")
        e2 = engine_side(worker, pairs)
        print(f"engine: {e2['images']} images in {e2['seconds']:.1f} s = {e2['images_per_hour']:.0f} images/hour")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    engine_rate = (e1["images_per_hour"] + e2["images_per_hour"]) / 2
    overhead = 1 - job["pairs_per_hour"] / engine_rate
    print(f"job overhead: {100 * overhead:.1f}% of the engine's images/hour (goal < 10%)")
    result = {
        "bench": "bulk", "device": device, "preset": args.preset, "size": args.size, "pairs": args.pairs,
        "tasks": args.tasks.split(","), "pairs_per_unit": args.unit, "max_batch": worker.parts.engine.max_batch,
        "engine": [e1, e2], "engine_images_per_hour": round(engine_rate, 1), "job": job,
        "overhead": round(overhead, 4), "goal": 0.10, "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out or f"bench/results/bulk-{device}.json")
    save_result(result, out)


if __name__ == "__main__":
    main()
