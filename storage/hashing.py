"""Content hashes of dataset files: xxh3-128 for new files, sha256 where a publisher needs it.

    python -c "from storage.hashing import hash_bytes; print(hash_bytes(b'panel'))"

A shard's hash exists to catch damage (a flipped bit, a truncated copy, a file replaced by
another), not to resist an attacker: xxh3-128 (the `xxhash` package) runs at ~25 GB/s on one
core, so a writer hashes what it wrote and a reader what it maps without slowing either
(bench/storage.py). Manifests written before it record sha256 only; those still verify, at
sha256's speed. `sha256` of any file stays available for publishing
(`panelforge datasets show --sha256`).
"""
from __future__ import annotations

import hashlib
import os

import pyarrow as pa
import xxhash

FAST = "xxh3_128"  # what new manifest entries record
ALGORITHMS = (FAST, "sha256")  # what an entry may record, preferred first
_CHUNK = 8 << 20


def hash_bytes(data, algorithm: str = FAST) -> str:
    """Hex digest of a bytes-like object (a pyarrow Buffer, a memory map's view) without copying it."""
    view = memoryview(data)
    if algorithm == FAST:
        return xxhash.xxh3_128_hexdigest(view)
    if algorithm == "sha256":
        return hashlib.sha256(view).hexdigest()
    raise ValueError(f"unknown hash algorithm {algorithm!r}; expected one of {ALGORITHMS}")


def recorded(entry: dict) -> tuple[str, str]:
    """(algorithm, hex digest) that a manifest entry records: xxh3_128 when present, else sha256."""
    for algorithm in ALGORITHMS:
        if entry.get(algorithm):
            return algorithm, entry[algorithm]
    raise KeyError(f"manifest entry for {entry.get('file')!r} records no content hash ({', '.join(ALGORITHMS)})")


def hash_local(path: str, algorithm: str = FAST) -> tuple[str, int]:
    """(digest, size) of a local file, read through a memory map (no copy into Python)."""
    with pa.memory_map(path, "r") as f:
        buf = f.read_buffer()
        return hash_bytes(buf, algorithm), buf.size


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a local file (weights a manifest or a decoder's panelforge.json names):
    the one helper for it, read by `hashlib.file_digest` in chunks, never whole into memory."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hash_stream(stream, algorithm: str = FAST) -> tuple[str, int]:
    """(digest, size) of a pyarrow input stream (object stores), read in 8 MiB chunks."""
    hasher = xxhash.xxh3_128() if algorithm == FAST else hashlib.new(algorithm)
    size = 0
    while chunk := stream.read(_CHUNK):
        hasher.update(chunk)
        size += len(chunk)
    return hasher.hexdigest(), size
