"""Small builders shared by the storage tests."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def token_rows(unit: int, n: int, length: int = 16) -> pa.Table:
    """n deterministic TOKENS rows for work unit `unit`; ids are unique across units.

    Row i of unit u holds the ids u*1000 + i + k for k in range(length).
    """
    base = unit * 1000 + np.arange(n, dtype=np.int32)[:, None] + np.arange(length, dtype=np.int32)[None, :]
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * length)
    return pa.table(
        {
            "id": [f"u{unit:03d}-r{i:03d}" for i in range(n)],
            "task": ["t2i" if i % 3 else "edit" for i in range(n)],
            "bucket": ["64x64"] * n,
            "grid_h": pa.array(np.full(n, 8, np.int32)),
            "grid_w": pa.array(np.full(n, 8, np.int32)),
            "tokens": pa.ListArray.from_arrays(offsets, pa.array(base.ravel())),
            "loss_start": pa.array(np.full(n, 3, np.int32)),
        }
    )
