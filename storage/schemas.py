"""Arrow schemas of PanelForge datasets (DESIGN.md, "Datasets on disk").

    python -c "from storage.schemas import SCHEMAS; print(SCHEMAS['panels'])"

A dataset's kind names its row schema. Images are stored encoded (PNG/JPEG/WebP bytes);
`params` and `sampling` are JSON strings so that new parameters never change the schema.
"""
from __future__ import annotations

import pyarrow as pa

# Bump when a schema below changes incompatibly; readers refuse other versions.
SCHEMA_VERSION = 1

PANELS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # stable across reruns
        pa.field("task", pa.string(), nullable=False),  # t2i, control:canny, dense:depth, edit, subject, pair
        pa.field("prompt", pa.string(), nullable=False),  # the rendered task prompt
        pa.field("caption", pa.string()),  # the user caption / instruction it was rendered from
        pa.field("width", pa.int32(), nullable=False),  # the whole (dual-)panel image
        pa.field("height", pa.int32(), nullable=False),
        pa.field("upper", pa.binary(), nullable=False),  # encoded image; the whole image for t2i
        pa.field("lower", pa.binary()),  # encoded image; null for single panels
        pa.field("source", pa.string()),
        pa.field("params", pa.string()),  # JSON: thresholds, seeds, ...
    ]
)

GENERATED = pa.schema(
    list(PANELS)
    + [
        pa.field("seed", pa.int64()),
        pa.field("sampling", pa.string()),  # JSON: cfg, temperature, top_k, sjd window
        pa.field("model_fingerprint", pa.string()),
        pa.field("sjd_steps", pa.int32()),  # decode steps taken (== tokens when SJD is off)
        pa.field("sjd_acceptance", pa.float32()),  # mean tokens accepted per step
        pa.field("seconds", pa.float32()),
        pa.field("score", pa.float32()),  # verifier score (best-of-N), null when none ran
    ]
)

TOKENS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("bucket", pa.string(), nullable=False),  # "{width}x{height}" of the whole image
        pa.field("grid_h", pa.int32(), nullable=False),  # code rows
        pa.field("grid_w", pa.int32(), nullable=False),  # codes per row
        pa.field("tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_start", pa.int32(), nullable=False),  # first supervised position
    ]
)

REJECTS = pa.schema(
    [
        pa.field("input_ref", pa.string(), nullable=False),  # file path, row id, ...
        pa.field("stage", pa.string(), nullable=False),  # read, annotate, compose, tokenize, ...
        pa.field("reason", pa.string(), nullable=False),  # short machine-readable reason
        pa.field("detail", pa.string()),  # human-readable detail
    ]
)

SCHEMAS: dict[str, pa.Schema] = {"panels": PANELS, "generated": GENERATED, "tokens": TOKENS}
