"""Code grids the transformer decoder generates, kept as codes (no pictures): a pool for training
a MoVQGAN decoder half on generated codes as well as real ones (train_movqgan --keep-codes).

    python -m tasks.assets.generated_codes --out out/gen-codes.safetensors \
        generate.inputs.count=768 generate.inputs.seed=30000

The pairs come from `generate.inputs` exactly as `panelforge generate` expands them (the config's
tasks, prompts, sizes and sampling: cfg per task, min-p, SJD), one sample each, through the same
engine the job builds, on this machine, without Ray or a dataset. Seeds apart from the evaluation's
sets keep the pool from holding the codes those sets will be judged on.

Written: a safetensors file with one int32 tensor per grid shape, `codes_<rows>x<cols>` [n, rows,
cols], and in its metadata the pairs' ids and tasks (JSON), the config's overrides and the decoder
and MoVQGAN that made them.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def generate_codes(cfg, progress_every: int = 32) -> tuple[dict[str, np.ndarray], list[dict]]:
    """{codes_<r>x<c>: int32 [n, r, c]} and, in the same order per shape, each grid's pair id and task."""
    from tasks.generate.job import load_parts, pair_requests, preflight
    from tasks.generate.requests import RequestError, expand_inputs, no_valid_rows_message

    settings = preflight(cfg)
    if settings is None:
        raise RequestError("generated_codes runs in-process: unset ray.address / RAY_ADDRESS")
    expanded = expand_inputs(cfg)
    if not expanded.pairs:
        raise RequestError(no_valid_rows_message(expanded))
    parts = load_parts(cfg, settings=settings)
    requests, task_of = [], {}
    for p in expanded.pairs:
        for req in pair_requests(p, parts.layout, parts.movqgan, cfg.generate, 1):
            requests.append(req)
            task_of[req.id] = p.task
    grids: dict[str, list[np.ndarray]] = {}
    rows: dict[str, list[dict]] = {}
    failed, t0 = [], time.perf_counter()
    for i, r in enumerate(parts.engine.generate(iter(requests)), 1):
        if r.error is not None:
            failed.append(f"{r.id}: {r.error}")
        else:
            codes = np.asarray(r.codes, np.int32)
            key = f"codes_{codes.shape[0]}x{codes.shape[1]}"
            grids.setdefault(key, []).append(codes)
            rows.setdefault(key, []).append({"id": r.id, "task": task_of[r.id]})
        if i % progress_every == 0 or i == len(requests):
            log.info("%d / %d grids, %.0f s", i, len(requests), time.perf_counter() - t0)
    if failed:
        raise RequestError(f"{len(failed)} of {len(requests)} requests failed, first: {failed[0]}")
    order = sorted(grids)
    return {k: np.stack(grids[k]) for k in order}, [row for k in order for row in rows[k]]


def main(argv: list[str] | None = None) -> None:
    from safetensors.numpy import save_file

    from tasks.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--out", required=True, help="the .safetensors file to write")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE, as panelforge generate takes them")
    a = ap.parse_args(argv)
    if not a.out.endswith(".safetensors"):
        ap.error(f"--out {a.out}: write a .safetensors file")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(a.config, a.overrides)
    t0 = time.perf_counter()
    tensors, rows = generate_codes(cfg)
    meta = {"made_by": "tasks/assets/generated_codes.py", "config": a.config,
            "overrides": json.dumps(cfg._overrides), "decoder": str(cfg.models.decoder_path),
            "movqgan": str(cfg.models.movqgan_path), "rows": json.dumps(rows)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, a.out, metadata=meta)
    print(json.dumps({"out": a.out, "grids": {k: list(v.shape) for k, v in tensors.items()},
                      "seconds": round(time.perf_counter() - t0)}))


if __name__ == "__main__":
    main()
