"""Arrow IPC shard datasets: an atomic, resumable writer and a memory-mapped reader.

    python -m storage.dataset out/tiny/panels      # prints the dataset's summary

A dataset is a folder (or object-store prefix) holding `manifest.json`, `shards/<unit>.arrow`
and `rejects/<unit>.arrow`. Work is done in deterministic *units* (e.g. "00017" or "bucket-256x256-3"):
a unit's shard and its rejects are written under temporary names, renamed when complete, and
only then listed in the manifest, which is itself replaced atomically. A unit listed in the
manifest is done; anything else is redone by a rerun, which overwrites the same file names, so
a row is never duplicated however often a job crashes.

Workers of a distributed job call `write_shard` themselves and send the small info dict back to
the driver, which alone calls `DatasetWriter.commit` (one writer of the manifest per dataset).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import queue
import re
import sys
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from storage.errors import ChecksumError, DatasetMismatchError, DatasetNotFoundError, StorageError
from storage.manifest import (
    FORMAT,
    check_member,
    code_version,
    lineage_entry,
    now,
    read_manifest,
    write_manifest,
)
from storage.schemas import REJECTS, SCHEMA_VERSION, SCHEMAS
from storage.uri import Location, resolve

_UNIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")
_HASH_CHUNK = 8 << 20


def unit_order(unit: str) -> list:
    """Sort key of unit names, numbers compared as numbers: "64x64-00001" < "96x96-00000" <
    "128x128-00000" (the stages' order), "g9" < "g10"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", unit) if part]


def _check_unit(unit: str) -> str:
    if not isinstance(unit, str) or not _UNIT.match(unit) or ".." in unit:
        raise ValueError(
            f"work unit name {unit!r}: use 1-200 characters from [A-Za-z0-9._=-], starting with a "
            "letter or digit (it becomes a file name)"
        )
    return unit


def _location(where: str | os.PathLike | Location) -> Location:
    return where if isinstance(where, Location) else resolve(where)


def _conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    if table.schema.equals(schema, check_metadata=False):
        return table
    missing = [n for n in schema.names if n not in table.schema.names]
    if missing:
        raise StorageError(f"{what}: missing columns {missing}; expected {schema.names}")
    extra = [n for n in table.schema.names if n not in schema.names]
    if extra:
        raise StorageError(f"{what}: unexpected columns {extra}; expected {schema.names}")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise StorageError(f"{what}: columns do not match the {what.split()[0]} schema: {e}") from None


def rejects_table(rejects: pa.Table | Iterable[dict] | None) -> pa.Table | None:
    """Rejected inputs as a REJECTS table: {input_ref, stage, reason, detail} each."""
    if rejects is None:
        return None
    if isinstance(rejects, pa.Table):
        return _conform(rejects, REJECTS, "rejects table")
    rows = list(rejects)
    for row in rows:
        for key in ("input_ref", "stage", "reason"):
            if not row.get(key):
                raise StorageError(f"reject {row!r} lacks {key!r}; each reject needs input_ref, stage, reason")
    return pa.Table.from_pylist(
        [{"input_ref": str(r["input_ref"]), "stage": r["stage"], "reason": r["reason"],
          "detail": None if r.get("detail") is None else str(r["detail"])} for r in rows],
        schema=REJECTS,
    )


class _HashingFile:
    """A write-only file that forwards every write and feeds it to sha256 on another thread.

    hashlib releases the GIL on large inputs, so the hash overlaps the IPC writer's own work
    (bench/storage.py). The buffers the writer hands over are views of the table being written,
    which outlives the writer, so queuing them without a copy is safe.
    """

    def __init__(self, sink):
        self.sink = sink
        self.hasher = hashlib.sha256()
        self.size = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._hash, daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        while (data := self._queue.get()) is not None:
            self.hasher.update(data)

    def write(self, data) -> int:
        self.sink.write(data)
        self._queue.put(data)
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        self.size += n
        return n

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self.hasher.hexdigest()

    # the file protocol pyarrow.PythonFile asks of a write-only stream
    closed = False

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


def _ipc_into(sink, table: pa.Table) -> dict:
    out = _HashingFile(sink)
    try:
        with pa.ipc.new_file(pa.PythonFile(out, mode="w"), table.schema) as writer:
            writer.write_table(table)
    finally:
        digest = out.hexdigest()
    return {"bytes": out.size, "sha256": digest}


def _put(loc: Location, rel: str, table: pa.Table) -> dict:
    """Write table as an Arrow IPC file at rel, atomically, with its sha256."""
    final = loc.join(rel)
    if loc.local:
        tmp = final.rsplit("/", 1)[0] + f"/.{rel.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            entry = _ipc_into(f, table)
        os.replace(tmp, final)  # the unit's file appears whole or not at all
    else:
        with loc.fs.open_output_stream(final) as f:  # an object appears when its upload completes
            entry = _ipc_into(f, table)
    return {"file": rel, **entry}


def write_shard(
    where: str | os.PathLike | Location,
    unit: str,
    table: pa.Table | None,
    rejects: pa.Table | Iterable[dict] | None = None,
    kind: str | None = None,
) -> dict:
    """Write one unit's shard (and rejects) from any process; returns the info dict to commit.

    `kind` picks the schema to conform the table to (panels, tokens, generated); when None the
    table's own schema is kept.
    """
    loc = _location(where)
    _check_unit(unit)
    info: dict[str, Any] = {"unit": unit, "shard": None, "rejects": None}
    if table is not None and table.num_rows:
        if kind is not None:
            table = _conform(table, SCHEMAS[kind], f"{kind} shard of unit {unit!r}")
        entry = _put(loc, f"shards/{unit}.arrow", table)
        entry.update(unit=unit, rows=table.num_rows)
        if "task" in table.column_names:
            entry["rows_per_task"] = dict(Counter(table.column("task").to_pylist()))
        info["shard"] = entry
    rej = rejects_table(rejects)
    if rej is not None and rej.num_rows:
        entry = _put(loc, f"rejects/{unit}.arrow", rej)
        entry.update(unit=unit, rows=rej.num_rows, reasons=dict(Counter(rej.column("reason").to_pylist())))
        info["rejects"] = entry
    return info


def _diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k)]


class DatasetWriter:
    """Creates a dataset, or resumes one made with the same kind, config and meta.

    The manifest is written by this object only. An existing manifest that is unreadable is an
    error, never overwritten; `overwrite=True` starts afresh deliberately.
    """

    def __init__(
        self,
        uri: str | os.PathLike,
        kind: str,
        *,
        config: dict | None = None,
        inputs: Sequence[dict] = (),
        meta: dict | None = None,
        overwrite: bool = False,
    ):
        if kind not in SCHEMAS:
            raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(SCHEMAS)}")
        self.loc = _location(uri)
        self.kind = kind
        config = json.loads(json.dumps(config or {}, default=str))
        meta = json.loads(json.dumps(meta or {}, default=str))
        try:
            existing = read_manifest(self.loc)
        except DatasetNotFoundError:
            existing = None
        if existing is not None and overwrite:
            self._remove(existing)
            existing = None
        if existing is not None:
            where = self.loc.display("manifest.json")
            if existing["kind"] != kind:
                raise DatasetMismatchError(f"{where}: holds a {existing['kind']!r} dataset, not {kind!r}")
            for name, want in (("meta", meta), ("config", config)):
                changed = _diff(existing.get(name, {}), want)
                if changed:
                    raise DatasetMismatchError(
                        f"{where}: was made with another {name} (differs in {changed}); write to a new "
                        "location, or start it afresh deliberately ("  # in the words of a PanelForge config:
                        + {"panels": "panels.overwrite=true", "tokens": "tokenize.overwrite=true",
                           "generated": "delete it, or choose another generate.output"}.get(kind, "overwrite=True") + ")"
                    )
            self.manifest = existing
        else:
            self.loc.fs.create_dir(self.loc.path, recursive=True)
            self.manifest = {
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "kind": kind,
                "uri": self.loc.uri,
                "status": "writing",
                "created": now(),
                "code_version": code_version(),
                "config": config,
                "meta": meta,
                "inputs": [lineage_entry(m) for m in inputs],
                "columns": {f.name: str(f.type) for f in SCHEMAS[kind]},
                "units": [],
                "shards": [],
                "rejects": [],
            }
        for sub in ("shards", "rejects"):
            self.loc.fs.create_dir(self.loc.join(sub), recursive=True)
        self._clean_temporaries()
        # A complete dataset opened again (a rerun) stays as it is until a unit is committed:
        # a rerun with nothing left to do rewrites nothing.
        if self.manifest.get("status") != "complete":
            self.manifest["status"] = "writing"
            write_manifest(self.loc, self.manifest)

    @property
    def done_units(self) -> set[str]:
        return set(self.manifest["units"])

    def write_unit(self, unit: str, table: pa.Table | None, rejects=None) -> dict:
        info = write_shard(self.loc, unit, table, rejects, kind=self.kind)
        self.commit(info)
        return info

    def commit(self, info: dict) -> None:
        """List a unit written by write_shard. Committing a unit again replaces it (no duplicates)."""
        unit = _check_unit(info["unit"])
        self.manifest["status"] = "writing"
        for key in ("shards", "rejects"):
            self.manifest[key] = [e for e in self.manifest[key] if e["unit"] != unit]
        if info.get("shard"):
            self.manifest["shards"].append(info["shard"])
        if info.get("rejects"):
            self.manifest["rejects"].append(info["rejects"])
        if unit not in self.manifest["units"]:
            self.manifest["units"].append(unit)
        # Listed in unit order, not commit order: parallel workers finish units in any order, and
        # a global row index (what training batches are drawn by) must not depend on timing.
        for key in ("shards", "rejects"):
            self.manifest[key].sort(key=lambda e: unit_order(e["unit"]))
        self.manifest["units"].sort(key=unit_order)
        write_manifest(self.loc, self.manifest)

    def finalize(self, **summary: Any) -> dict:
        """Mark the dataset complete; extra keyword values go to the manifest's summary. A dataset
        that was complete when opened and got no new unit is left untouched (its summary is the
        run's that made it)."""
        if self.manifest.get("status") == "complete":
            return self.manifest
        self.manifest["status"] = "complete"
        self.manifest["summary"] = json.loads(json.dumps(summary, default=str))
        write_manifest(self.loc, self.manifest)
        return self.manifest

    def _remove(self, manifest: dict) -> None:
        for entry in manifest["shards"] + manifest["rejects"]:
            path = check_member(self.loc, entry["file"], self.loc.display("manifest.json"))
            if self.loc.fs.get_file_info(path).type != pafs.FileType.NotFound:
                self.loc.fs.delete_file(path)
        self.loc.fs.delete_file(self.loc.join("manifest.json"))

    def _clean_temporaries(self) -> None:
        if not self.loc.local:
            return  # object stores have no half-written objects to clean
        for sub in ("shards", "rejects", ""):
            folder = self.loc.join(sub) if sub else self.loc.path
            for name in os.listdir(folder):
                if name.startswith(".") and name.endswith(".tmp"):
                    os.remove(os.path.join(folder, name))


class Dataset:
    """Reads a dataset: memory-mapped local shards, random access, batches, partitions."""

    def __init__(self, loc: Location, manifest: dict):
        self.loc = loc
        self.manifest = manifest
        self.kind: str = manifest["kind"]
        self.meta: dict = manifest.get("meta", {})
        self.shards: list[dict] = manifest["shards"]
        self._ends = list(np.cumsum([s["rows"] for s in self.shards], dtype=np.int64))
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        # Memory maps cost address space, not memory: keep them all; remote shards are read
        # whole, so keep only a few.
        self._cache_size = len(self.shards) if loc.local else 4

    @property
    def uri(self) -> str:
        return self.loc.uri

    @property
    def schema(self) -> pa.Schema:
        return SCHEMAS[self.kind]

    def __len__(self) -> int:
        return int(self._ends[-1]) if self._ends else 0

    def shard_table(self, i: int) -> pa.Table:
        table = self._cache.get(i)
        if table is not None:
            self._cache.move_to_end(i)
            return table
        entry = self.shards[i]
        path = check_member(self.loc, entry["file"], self.loc.display("manifest.json"))
        try:
            if self.loc.local:
                source = pa.memory_map(path, "r")
            else:
                source = self.loc.fs.open_input_file(path)
            table = pa.ipc.open_file(source).read_all()
        except FileNotFoundError:
            raise StorageError(f"{self.loc.display(entry['file'])}: listed in the manifest but missing") from None
        except pa.ArrowInvalid as e:
            raise ChecksumError(f"{self.loc.display(entry['file'])}: not a readable Arrow file ({e})") from None
        if table.num_rows != entry["rows"]:
            raise ChecksumError(
                f"{self.loc.display(entry['file'])}: holds {table.num_rows} rows, manifest says {entry['rows']}"
            )
        self._cache[i] = table
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return table

    def _locate(self, index: int) -> tuple[int, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"row {index} out of range for {self.uri} ({n} rows)")
        shard = bisect.bisect_right(self._ends, index)
        start = self._ends[shard - 1] if shard else 0
        return shard, int(index - start)

    def __getitem__(self, index: int) -> dict:
        shard, local = self._locate(index)
        return self.shard_table(shard).slice(local, 1).to_pylist()[0]

    def take(self, indices: Sequence[int], columns: Sequence[str] | None = None) -> pa.Table:
        """Rows by global index, in the order given."""
        idx = np.asarray(indices, dtype=np.int64)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {self.uri} ({n} rows)")
        idx = np.where(idx < 0, idx + n, idx)
        shard_of = np.searchsorted(np.asarray(self._ends), idx, side="right")
        parts, order = [], []
        for shard in np.unique(shard_of):
            pick = np.nonzero(shard_of == shard)[0]
            start = self._ends[shard - 1] if shard else 0
            table = self.shard_table(int(shard))
            if columns is not None:
                table = table.select(list(columns))
            parts.append(table.take(pa.array(idx[pick] - start)))
            order.append(pick)
        if not parts:
            schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
            return schema.empty_table()
        table = pa.concat_tables(parts)
        return table.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))

    def iter_batches(self, batch_size: int = 1024, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Every row once, in order, as record batches of at most batch_size rows."""
        for i in range(len(self.shards)):
            table = self.shard_table(i)
            if columns is not None:
                table = table.select(list(columns))
            yield from table.to_batches(max_chunksize=batch_size)

    def table(self, columns: Sequence[str] | None = None) -> pa.Table:
        tables = [self.shard_table(i) for i in range(len(self.shards))]
        if columns is not None:
            tables = [t.select(list(columns)) for t in tables]
        if not tables:
            return self.schema.empty_table() if columns is None else self.schema.empty_table().select(list(columns))
        return pa.concat_tables(tables)

    def partition(self, rank: int, world_size: int, drop_uneven: bool = False) -> list[int]:
        """Global row indices of one of world_size workers: rank, rank + world_size, ...

        Interleaved, so each worker sees every bucket and shard; deterministic. With drop_uneven,
        every worker gets the same count (what synchronous data-parallel training needs).
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        n = len(self)
        if drop_uneven:
            n -= n % world_size
        return list(range(rank, n, world_size))

    def rejects(self) -> pa.Table:
        tables = []
        for entry in self.manifest["rejects"]:
            path = check_member(self.loc, entry["file"], self.loc.display("manifest.json"))
            with self.loc.fs.open_input_file(path) as f:
                tables.append(pa.ipc.open_file(f).read_all())
        return pa.concat_tables(tables) if tables else REJECTS.empty_table()

    def reject_counts(self) -> dict[str, int]:
        total: Counter = Counter()
        for entry in self.manifest["rejects"]:
            total.update(entry.get("reasons", {}))
        return dict(total)

    def rows_per_task(self) -> dict[str, int]:
        total: Counter = Counter()
        for entry in self.shards:
            total.update(entry.get("rows_per_task", {}))
        return dict(total)

    def verify(self) -> int:
        """Recompute every file's sha256; raises ChecksumError naming the first bad file."""
        checked = 0
        for entry in self.shards + self.manifest["rejects"]:
            path = check_member(self.loc, entry["file"], self.loc.display("manifest.json"))
            hasher = hashlib.sha256()
            try:
                with self.loc.fs.open_input_stream(path) as f:
                    while chunk := f.read(_HASH_CHUNK):
                        hasher.update(chunk)
            except FileNotFoundError:
                raise ChecksumError(f"{self.loc.display(entry['file'])}: listed in the manifest but missing") from None
            if hasher.hexdigest() != entry["sha256"]:
                raise ChecksumError(
                    f"{self.loc.display(entry['file'])}: sha256 {hasher.hexdigest()[:16]}... does not match "
                    f"the manifest's {entry['sha256'][:16]}...; the shard is corrupt: rerun the job "
                    "after deleting it"
                )
            checked += 1
        return checked

    def summary(self) -> dict:
        return {
            "uri": self.uri,
            "kind": self.kind,
            "status": self.manifest["status"],
            "rows": len(self),
            "bytes": sum(s["bytes"] for s in self.shards),
            "shards": len(self.shards),
            "rows_per_task": self.rows_per_task(),
            "rejects": sum(e["rows"] for e in self.manifest["rejects"]),
            "rejects_per_reason": self.reject_counts(),
            "code_version": self.manifest.get("code_version"),
            "meta": self.meta,
            "inputs": self.manifest.get("inputs", []),
        }


def open_dataset(uri: str | os.PathLike, verify: bool = False) -> Dataset:
    loc = resolve(uri)
    ds = Dataset(loc, read_manifest(loc))
    if verify:
        ds.verify()
    return ds


if __name__ == "__main__":
    print(json.dumps(open_dataset(sys.argv[1]).summary(), indent=2))
