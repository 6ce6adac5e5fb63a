"""Static KV cache: preallocated per layer, one write position per sequence (row).

    python -c "from model.kv_cache import KVCache; c = KVCache(2, 4, 128, 16); print(c.k.shape)"

No reallocation while sampling, so the decode step has static shapes and can be captured by
torch.compile(mode="reduce-overhead") (Lumina-mGPT 2.0 paper, 4.3.2). Slot s of a row holds the
K/V of that row's position s. Which slots a query may read is derived from positions alone
(slot <= query position), so rolling back rejected speculative tokens is just feeding the next
step at an earlier position: the stale slots above it are masked, then overwritten.
"""
from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, max_batch: int, n_kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_batch(self) -> int:
        return self.k.shape[0]

    @property
    def max_seq(self) -> int:
        return self.k.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: torch.Tensor | None = None, kv_len: int | None = None):
        """Write k, v [b, H, T, D] at input_pos [b, T]; return the cache of those rows, [b, H, kv_len, D].

        rows: which cache rows the b sequences are (a prefill of one new request while the others
        are mid-image); None means all rows in order (the decode step, b == max_batch).
        kv_len: read only the first kv_len slots (the engine passes a bucket above the longest
        position, so that the step does not read the empty part of the cache).
        """
        all_rows = rows is None
        if all_rows:
            rows = torch.arange(k.shape[0], device=k.device)
        r = rows[:, None]
        # Advanced indices around a slice put their broadcast dims first: [b, T, H, D].
        self.k[r, :, input_pos] = k.transpose(1, 2).to(self.k.dtype)
        self.v[r, :, input_pos] = v.transpose(1, 2).to(self.v.dtype)
        n = self.max_seq if kv_len is None else kv_len
        if all_rows:
            kk, vv = self.k, self.v
        else:
            kk, vv = self.k[rows], self.v[rows]
        return kk[:, :, :n], vv[:, :, :n]

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor, n: int) -> None:
        """Copy n consecutive slots of each row: row r's slots src[r]..src[r]+n-1 onto dst[r]..dst[r]+n-1.

        src, dst [max_batch] (every row; a row that needs nothing copies onto itself): static
        shapes, so the move compiles. The ranges of one row must not overlap. A draft tree's
        accepted sibling branch (model/engine.py) is moved this way to the slots of its positions.
        """
        offs = torch.arange(n, device=src.device)
        r = torch.arange(self.max_batch, device=src.device)[:, None]
        s, d = src[:, None] + offs, dst[:, None] + offs
        self.k[r, :, d] = self.k[r, :, s]
        self.v[r, :, d] = self.v[r, :, s]
