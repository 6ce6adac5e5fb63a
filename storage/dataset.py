"""Arrow IPC shard datasets: an atomic, resumable writer and a memory-mapped reader.

    python -m storage.dataset out/tiny/panels      # prints the dataset's summary

A dataset is a folder (or object-store prefix) holding `manifest.json`, `shards/<unit>.arrow`
and `rejects/<unit>.arrow`. Work is done in deterministic *units* (e.g. "00017" or "bucket-256x256-3"):
a unit's shard and its rejects are written under temporary names, renamed when complete, and
only then committed (one line appended to the manifest's commit log: storage/manifest.py). A
committed unit is done; anything else is redone by a rerun, which overwrites the same file
names, so a row is never duplicated however often a job crashes. Readers check each file's
content hash the first time a process opens it; `panelforge datasets repair` drops the units
whose files are missing or damaged, and the job's rerun redoes them (storage/repair.py).

Workers of a distributed job call `write_shard` themselves and send the small info dict back to
the driver, which alone calls `DatasetWriter.commit` (one writer of the manifest per dataset).
"""
from __future__ import annotations

import bisect
import json
import os
import re
import sys
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from storage.errors import (
    ChecksumError,
    DatasetMismatchError,
    DatasetNotFoundError,
    StorageError,
)
from storage.hashing import FAST, hash_bytes, hash_local, hash_stream, recorded
from storage.manifest import (
    FORMAT,
    MANIFEST,
    apply_records,
    check_entry,
    check_member,
    code_version,
    inside_root,
    lineage_entry,
    member_path,
    now,
    read_base,
    read_log,
    read_manifest,
    with_units,
    write_manifest,
)
from storage.schemas import REJECTS, SCHEMA_VERSION, SCHEMAS
from storage.uri import Location, resolve

_UNIT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")


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


def _schema_metadata(kind: str | None, meta: dict | None, what: str) -> dict[bytes, bytes]:
    """What an outside tool (duckdb, polars, Spark) needs to know of a file without the manifest."""
    out = {b"panelforge.table": what.encode(), b"panelforge.schema_version": str(SCHEMA_VERSION).encode()}
    if kind:
        out[b"panelforge.kind"] = kind.encode()
    # tokens datasets record their layout's fingerprint in meta (tasks/tokenize/job.py: layout.meta())
    fingerprint = (meta or {}).get("layout_fingerprint") or (meta or {}).get("fingerprint")
    if fingerprint:
        out[b"panelforge.layout_fingerprint"] = str(fingerprint).encode()
    return out


def _ipc_bytes(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _put(loc: Location, rel: str, table: pa.Table) -> dict:
    """Write table as an Arrow IPC file at rel, atomically, with its content hash.

    Locally pyarrow writes the file natively, as a bare pyarrow user would, and the hash is
    taken of the written bytes through a memory map (they are in the page cache): nothing goes
    through a Python file object. The file is fsynced before its rename and the folder after it,
    so that a commit record (fsynced later) never names bytes a power cut could lose. On object
    stores the file is built in memory, hashed, and sent in one PUT.
    """
    final = loc.join(rel)
    if loc.local:
        folder, name = rel.rsplit("/", 1)
        tmp = inside_root(loc, folder) + f"/.{name}.{uuid.uuid4().hex}.tmp"
        with pa.OSFile(tmp, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
        # The bytes on disk before any commit record can name them; the hash of the page-cache
        # copy runs meanwhile (fsync and xxhash both release the GIL).
        with ThreadPoolExecutor(1) as pool:
            synced = pool.submit(_fsync, tmp)
            digest, size = hash_local(tmp)
            synced.result()
        os.replace(tmp, final)  # the unit's file appears whole or not at all
        _fsync(os.path.dirname(final))  # and its name
    else:
        buf = _ipc_bytes(table)
        digest, size = hash_bytes(buf), buf.size
        with loc.fs.open_output_stream(final) as f:  # an object appears when its upload completes
            f.write(buf)
    return {"file": rel, "bytes": size, FAST: digest}


_META_CACHE: dict[str, tuple[tuple, dict]] = {}


def _dataset_meta(loc: Location) -> dict:
    """The meta of the dataset a worker writes into (its manifest.json, re-read only when it changes)."""
    info = loc.fs.get_file_info(loc.join(MANIFEST))
    if info.type == pafs.FileType.NotFound:
        return {}
    key = (info.size, info.mtime_ns)
    cached = _META_CACHE.get(loc.uri)
    if cached is None or cached[0] != key:
        try:
            meta = read_base(loc).get("meta", {})
        except StorageError:
            meta = {}
        _META_CACHE[loc.uri] = cached = (key, meta)
    return cached[1]


def write_shard(
    where: str | os.PathLike | Location,
    unit: str,
    table: pa.Table | None,
    rejects: pa.Table | Iterable[dict] | None = None,
    kind: str | None = None,
    meta: dict | None = None,
) -> dict:
    """Write one unit's shard (and rejects) from any process; returns the info dict to commit.

    `kind` picks the schema to conform the table to (panels, tokens, generated); when None the
    table's own schema is kept. Each file's Arrow schema metadata records the kind, the schema
    version and the layout fingerprint (from `meta`, else the dataset's manifest), so tools that
    read the files without PanelForge can tell what they hold.
    """
    loc = _location(where)
    _check_unit(unit)
    info: dict[str, Any] = {"unit": unit, "shard": None, "rejects": None}
    if meta is None:
        meta = _dataset_meta(loc)
    if table is not None and table.num_rows:
        if kind is not None:
            table = _conform(table, SCHEMAS[kind], f"{kind} shard of unit {unit!r}")
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **_schema_metadata(kind, meta, "rows")})
        entry = _put(loc, f"shards/{unit}.arrow", table)
        entry.update(unit=unit, rows=table.num_rows)
        if "task" in table.column_names:
            entry["rows_per_task"] = dict(Counter(table.column("task").to_pylist()))
        info["shard"] = entry
    rej = rejects_table(rejects)
    if rej is not None and rej.num_rows:
        rej = rej.replace_schema_metadata(_schema_metadata(kind, meta, "rejects"))
        entry = _put(loc, f"rejects/{unit}.arrow", rej)
        entry.update(unit=unit, rows=rej.num_rows, reasons=dict(Counter(rej.column("reason").to_pylist())))
        info["rejects"] = entry
    return info


def _diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k)]


COMPACT_MIN = 1024  # a commit log is folded into manifest.json once it has this many records
_LOG_GLOB = re.compile(r"^commits-[0-9a-f]{12}\.jsonl$")


def _new_log_name() -> str:
    return f"commits-{uuid.uuid4().hex[:12]}.jsonl"


def _units_of(manifest: dict) -> dict[str, dict]:
    units = {u: {"shard": None, "rejects": None} for u in manifest["units"]}
    for key, single in (("shards", "shard"), ("rejects", "rejects")):
        for entry in manifest[key]:
            units.setdefault(entry["unit"], {"shard": None, "rejects": None})[single] = entry
    return units


def _header_of(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("units", "shards", "rejects")}


def _compact(loc: Location, header: dict, units: dict[str, dict]) -> dict:
    """Write manifest.json listing every unit, naming a new (empty) commit log, then delete the
    logs it replaces: a crash between the two leaves a stale log that no manifest names, which
    the next writer deletes."""
    manifest = with_units(header, units)
    if loc.local:
        manifest["log"] = _new_log_name()
    write_manifest(loc, manifest)
    if loc.local:
        _delete_stale_logs(loc, keep=manifest["log"])
    return manifest


def _delete_stale_logs(loc: Location, keep: str | None) -> None:
    for name in os.listdir(inside_root(loc, "")):
        if _LOG_GLOB.match(name) and name != keep:
            os.remove(inside_root(loc, name))


class DatasetWriter:
    """Creates a dataset, or resumes one made with the same kind, config and meta.

    The manifest is written by this object only. An existing manifest that is unreadable is an
    error, never overwritten; `overwrite=True` starts afresh deliberately. A commit costs the
    same at any size of dataset: on local disks it appends one fsynced line to the commit log
    (storage/manifest.py); on object stores, which cannot append, it rewrites manifest.json.
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
            base = read_base(self.loc)
        except DatasetNotFoundError:
            base = None
        records, log_exists = [], False
        if base is not None and base.get("log"):
            check_member(self.loc, base["log"], self.loc.display(MANIFEST))
            try:
                records, _ = read_log(self.loc, base["log"])
                log_exists = self.loc.local
            except FileNotFoundError:
                pass
        existing = None if base is None else apply_records(base, records)
        if existing is not None and overwrite:
            self._remove(existing)
            existing = None
        if existing is not None:
            where = self.loc.display(MANIFEST)
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
            self._header = _header_of(existing)
            self._units = _units_of(existing)
        else:
            self.loc.fs.create_dir(self.loc.path, recursive=True)
            self._header = {
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
            }
            self._units = {}
        for sub in ("shards", "rejects"):
            self.loc.fs.create_dir(self.loc.join(sub), recursive=True)
            inside_root(self.loc, sub)  # `shards/` linked elsewhere: refuse before writing into it
        self._clean_temporaries()
        self._log_fd: int | None = None
        self._log_records = 0
        self._folded_units = len(self._units)  # what manifest.json lists
        self._cache: tuple[dict, frozenset] | None = None
        # A complete dataset opened again (a rerun) stays as it is until a unit is committed:
        # a rerun with nothing left to do rewrites nothing. Otherwise fold the log of the last
        # run into manifest.json, so that this run appends to a fresh log (never after a torn line).
        if existing is None or log_exists:
            self._header["log"] = _compact(self.loc, self._header, self._units).get("log")

    # -- the committed state -------------------------------------------------------------------
    def _state(self) -> tuple[dict, frozenset]:
        if self._cache is None:
            self._cache = (with_units(self._header, self._units), frozenset(self._units))
        return self._cache

    @property
    def manifest(self) -> dict:
        """The committed state, as read_manifest returns it (built when asked, not per commit)."""
        return self._state()[0]

    @property
    def done_units(self) -> frozenset[str]:
        """The units committed so far (a snapshot: later commits do not change it)."""
        return self._state()[1]

    def write_unit(self, unit: str, table: pa.Table | None, rejects=None) -> dict:
        info = write_shard(self.loc, unit, table, rejects, kind=self.kind, meta=self._header.get("meta"))
        self.commit(info)
        return info

    def commit(self, info: dict) -> None:
        """List a unit written by write_shard. Committing a unit again replaces it (no duplicates).

        Constant time: one appended, fsynced line; the log is folded into manifest.json only
        when it has as many records as manifest.json lists units (so folding costs O(1) per
        commit on average, and the log never outgrows the manifest)."""
        unit = _check_unit(info["unit"])
        where = self.loc.display(MANIFEST)
        record = {"unit": unit, "shard": info.get("shard") or None, "rejects": info.get("rejects") or None}
        for key in ("shard", "rejects"):
            if record[key] is not None:
                check_member(self.loc, check_entry(record[key], where)["file"], where)
        self._units[unit] = {"shard": record["shard"], "rejects": record["rejects"]}
        self._header["status"] = "writing"
        self._cache = None
        if not self.loc.local or not self._header.get("log"):  # no log named yet (a manifest of an older release)
            self._fold()
        if not self.loc.local:
            return
        if self._log_fd is None:
            self._log_fd = os.open(inside_root(self.loc, self._header["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            _fsync(self.loc.path)  # the new log's name, durable before its first record counts
        line = memoryview(json.dumps(record, separators=(",", ":"), sort_keys=True).encode() + b"\n")
        while line:
            line = line[os.write(self._log_fd, line):]
        os.fsync(self._log_fd)  # the newline is the commit point
        self._log_records += 1
        if self._log_records >= max(COMPACT_MIN, self._folded_units):
            self._fold()

    def _fold(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        self._header["log"] = _compact(self.loc, self._header, self._units).get("log")
        self._log_records = 0
        self._folded_units = len(self._units)

    def finalize(self, **summary: Any) -> dict:
        """Mark the dataset complete; extra keyword values go to the manifest's summary. A dataset
        that was complete when opened and got no new unit is left untouched (its summary is the
        run's that made it)."""
        if self._header.get("status") == "complete":
            return self.manifest
        self._header["status"] = "complete"
        self._header["summary"] = json.loads(json.dumps(summary, default=str))
        self._cache = None
        self._fold()
        return self.manifest

    def close(self) -> None:
        """Close the commit log (what is committed stays committed; finalize is separate)."""
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _remove(self, manifest: dict) -> None:
        where = self.loc.display(MANIFEST)
        # Every path first: a link out of the dataset refuses the overwrite before anything goes.
        paths = [member_path(self.loc, e["file"], where) for e in manifest["shards"] + manifest["rejects"]]
        for path in paths:
            if self.loc.fs.get_file_info(path).type != pafs.FileType.NotFound:
                self.loc.fs.delete_file(path)
        if self.loc.local:
            _delete_stale_logs(self.loc, keep=None)
        self.loc.fs.delete_file(self.loc.join(MANIFEST))

    def _clean_temporaries(self) -> None:
        if not self.loc.local:
            return  # object stores have no half-written objects to clean
        for sub in ("shards", "rejects", ""):
            folder = inside_root(self.loc, sub)
            for name in os.listdir(folder):
                if name.startswith(".") and name.endswith(".tmp"):
                    os.remove(os.path.join(folder, name))  # a link itself, never what it points to


def _fsync(path: str) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Files this process has hashed and found intact: (path, inode, size, mtime, digest). A file
# replaced or rewritten since has another key and is checked again.
_VERIFIED: set[tuple] = set()


def _verified_key(path: str, entry: dict) -> tuple:
    st = os.stat(path)
    return (path, st.st_ino, st.st_size, st.st_mtime_ns, recorded(entry))


def repair_hint(loc: Location) -> str:
    return (f"run `panelforge datasets repair {loc.uri}` (it drops the damaged units from the manifest), "
            "then rerun the job that made the dataset: it redoes only those units")


def _content_problem(entry: dict, buf) -> str | None:
    size = memoryview(buf).nbytes
    if size != entry["bytes"]:
        return f"is {size:,} bytes, the manifest says {entry['bytes']:,}: the file is truncated or was replaced"
    algorithm, want = recorded(entry)
    got = hash_bytes(buf, algorithm)
    if got != want:
        return (f"{algorithm} {got[:16]}... does not match the manifest's {want[:16]}...: "
                "the file is corrupt or was changed")
    return None


def rehash(where: str | os.PathLike | Location, entry: dict) -> dict | None:
    """The entry with the size and hash of the file as it is now, or None when it still matches
    (a driver re-committing a file that a zombie worker replaced after its commit)."""
    loc = _location(where)
    path = member_path(loc, entry["file"], loc.display(MANIFEST))
    if loc.local:
        digest, size = hash_local(path)
    else:
        with loc.fs.open_input_stream(path) as f:
            digest, size = hash_stream(f)
    if entry.get(FAST) == digest and entry["bytes"] == size:
        return None
    fresh = {k: v for k, v in entry.items() if k != "sha256"}
    fresh.update({FAST: digest, "bytes": size})
    return fresh


def file_problem(loc: Location, entry: dict) -> str | None:
    """What is wrong with one file of a manifest (missing, a link out, damaged), or None."""
    try:
        path = member_path(loc, entry["file"], loc.display(MANIFEST))
    except StorageError as e:
        return str(e).split(": ", 1)[-1]
    try:
        if loc.local:
            with pa.memory_map(path, "r") as f:
                return _content_problem(entry, f.read_buffer())
        with loc.fs.open_input_file(path) as f:
            return _content_problem(entry, f.read_buffer())
    except FileNotFoundError:
        return "listed in the manifest but missing"


class Dataset:
    """Reads a dataset: memory-mapped local shards, random access, batches, partitions."""

    def __init__(self, loc: Location, manifest: dict, check: bool = True):
        self.loc = loc
        self.check = check
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

    def _map(self, entry: dict) -> tuple[pa.Buffer, tuple | None]:
        """One file's bytes (memory-mapped locally) and its key in _VERIFIED (None: remote)."""
        path = member_path(self.loc, entry["file"], self.loc.display(MANIFEST))
        try:
            if self.loc.local:
                return pa.memory_map(path, "r").read_buffer(), _verified_key(path, entry)
            with self.loc.fs.open_input_file(path) as f:
                return f.read_buffer(), None
        except FileNotFoundError:
            raise ChecksumError(f"{self.loc.display(entry['file'])}: listed in the manifest but missing; "
                                + repair_hint(self.loc)) from None

    def _check(self, entry: dict, buf: pa.Buffer, key: tuple | None) -> None:
        """With `check`, compare the bytes' hash with the manifest's, once per file and process."""
        if self.check and (key is None or key not in _VERIFIED):
            problem = _content_problem(entry, buf)
            if problem:
                raise ChecksumError(f"{self.loc.display(entry['file'])}: {problem}; " + repair_hint(self.loc))
            if key is not None:
                _VERIFIED.add(key)

    def _read(self, entry: dict, checked: pa.Buffer | None = None) -> pa.Table:
        """One file of the dataset, memory-mapped locally; with `check`, its content hash is
        compared with the manifest's the first time this process opens it. `checked`: the
        file's bytes, already mapped and checked (_check_shard), read without mapping again."""
        buf = checked
        if buf is None:
            buf, key = self._map(entry)
            self._check(entry, buf, key)
        try:
            return pa.ipc.open_file(buf).read_all()
        except pa.ArrowInvalid as e:
            raise ChecksumError(f"{self.loc.display(entry['file'])}: not a readable Arrow file ({e}); "
                                + repair_hint(self.loc)) from None

    def _check_shard(self, i: int) -> pa.Buffer:
        """Shard i's bytes, mapped and checked (for shard_table's `checked`)."""
        entry = self.shards[i]
        buf, key = self._map(entry)
        self._check(entry, buf, key)
        return buf

    def shard_table(self, i: int, checked: pa.Buffer | None = None) -> pa.Table:
        table = self._cache.get(i)
        if table is not None:
            self._cache.move_to_end(i)
            return table
        entry = self.shards[i]
        table = self._read(entry, checked)
        if table.num_rows != entry["rows"]:
            raise ChecksumError(
                f"{self.loc.display(entry['file'])}: holds {table.num_rows} rows, manifest says {entry['rows']}; "
                + repair_hint(self.loc)
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
        """Every row once, in order, as record batches of at most batch_size rows.

        With `check` on local shards, the next shard's hash is checked on a second thread while
        the caller works through this one's batches (xxhash releases the GIL), so the check
        costs the reader no time when there is a core to spare; no row of a shard is returned
        before its check has passed."""
        n = len(self.shards)
        ahead = self.check and self.loc.local and n > 1
        with ThreadPoolExecutor(1, thread_name_prefix="panelforge-check") if ahead else nullcontext() as pool:
            pending = None
            for i in range(n):
                # shard i's bytes as its check mapped them (its ChecksumError, if any, surfaces here)
                checked = pending.result() if pending is not None else None
                pending = pool.submit(self._check_shard, i + 1) if ahead and i + 1 < n else None
                table = self.shard_table(i, checked)
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
        tables = [self._read(entry) for entry in self.manifest["rejects"]]
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
        """Re-hash every file (shards and rejects); raises ChecksumError naming the first bad file."""
        checked = 0
        for entry in self.shards + self.manifest["rejects"]:
            problem = file_problem(self.loc, entry)
            if problem:
                raise ChecksumError(f"{self.loc.display(entry['file'])}: {problem}; " + repair_hint(self.loc))
            checked += 1
        return checked

    def sha256s(self) -> list[tuple[str, str]]:
        """(file, sha256) of every file, for publishing (`sha256sum -c` reads the same lines)."""
        out = []
        for entry in self.shards + self.manifest["rejects"]:
            path = member_path(self.loc, entry["file"], self.loc.display(MANIFEST))
            if self.loc.local:
                digest, _ = hash_local(path, "sha256")
            else:
                with self.loc.fs.open_input_stream(path) as f:
                    digest, _ = hash_stream(f, "sha256")
            out.append((entry["file"], digest))
        return out

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


def open_dataset(uri: str | os.PathLike, verify: bool = False, check: bool = True) -> Dataset:
    """Open a dataset for reading. With `check` (the default) each file's content hash is checked
    the first time this process reads it; `verify` re-hashes every file now."""
    loc = resolve(uri)
    ds = Dataset(loc, read_manifest(loc), check=check)
    if verify:
        ds.verify()
    return ds


if __name__ == "__main__":
    print(json.dumps(open_dataset(sys.argv[1]).summary(), indent=2))
