"""Helpers for the training tests: a small tokens dataset in the real format (storage's
DatasetWriter, TOKENS schema, the layout's meta) and the tiny 3-stage config.

Grids are learnable, not noise: a background code with one rectangle of a colour code that
the caption names, so the loss falls within a few steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
# Small enough for 2 CPU cores: ~0.4M parameters besides the 1604-row embedding and head.
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=128, max_seq_len=512)
SIZES = {"64x64": 24, "96x96": 24, "128x128": 16, "160x64": 8}  # bucket -> rows


def tokens_table(layout, bucket: str, n: int, seed: int, prefix: str = "", task: str = "t2i") -> pa.Table:
    """n rows of one bucket: a coloured square on a grey grid. task only labels the rows (the prompt is
    t2i's): a dual-panel task makes the trainer read the grid as two panels (train.supervise)."""
    from model.prompts import render_prompt
    from storage import TOKENS

    w, h = (int(v) for v in bucket.split("x"))
    rows, cols = h // layout.patch, w // layout.patch
    rng = np.random.default_rng(seed)
    out = {f.name: [] for f in TOKENS}
    for i in range(n):
        c = int(rng.integers(len(COLORS)))
        grid = np.full((rows, cols), 7, dtype=np.int64)
        r0, c0 = int(rng.integers(rows // 2)), int(rng.integers(cols // 2))
        grid[r0:r0 + rows // 2, c0:c0 + cols // 2] = 100 + 10 * c
        ids, loss_start = layout.encode_sample(render_prompt("t2i", w, h, f"a {COLORS[c]} square"), grid)
        for k, v in (("id", f"{prefix}{bucket}-{i}"), ("task", task), ("bucket", bucket), ("grid_h", rows),
                     ("grid_w", cols), ("tokens", ids), ("loss_start", loss_start)):
            out[k].append(v)
    return pa.table(out, schema=TOKENS)


MOVQGAN_RECORD = {"preset": "tiny", "weights": "movqgan-tiny.safetensors", "sha256": "ab" * 32}


def write_tokens(uri: Path, layout, sizes: dict[str, int] = SIZES, meta: dict | None = None, task: str = "t2i") -> str:
    from storage import DatasetWriter

    # What tasks/tokenize/job.py records: the layout and the MoVQGAN whose codes the rows hold.
    meta = meta if meta is not None else {**layout.meta(), "movqgan": MOVQGAN_RECORD}
    w = DatasetWriter(uri, kind="tokens", config={"test": True}, meta=meta)
    for k, (bucket, n) in enumerate(sizes.items()):
        w.write_unit(f"u{k}", tokens_table(layout, bucket, n, seed=k, task=task))
    w.finalize()
    return str(uri)


STAGES = [
    {"name": "stage-1", "px": 64, "buckets": ["64x64", "160x64"], "lr": 3e-3, "warmup_steps": 2, "steps": 6,
     "global_batch": 8, "micro_batch": 2},
    {"name": "stage-2", "px": 96, "lr": 1e-3, "steps": 6, "decay": "linear", "global_batch": 8, "micro_batch": 4},
    {"name": "stage-3", "px": 128, "lr": 1e-3, "steps": 4, "global_batch": 4, "micro_batch": 2},
]


def tiny_config(workdir: Path, **train) -> Path:
    """configs/tiny.yaml's models with the tiny training above; returns the YAML path."""
    data = {"name": "train-test", "workdir": str(workdir),
            "models": {"movqgan_preset": "tiny", "tokenizer": "shapes", "decoder_preset": "tiny"},
            "train": {"workers": 2, "run": "t", "model_overrides": TINY, "checkpoint_every": 2, "stages": STAGES,
                      "loss_chunk": 256, **train}}
    path = workdir / "config.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
