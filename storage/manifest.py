"""manifest.json: what a dataset holds, how it was made, and what it was made from.

    python -c "from storage.manifest import read_manifest; from storage.uri import resolve; \
print(read_manifest(resolve('out/tiny/panels'))['kind'])"

The manifest is the dataset's single source of truth: a shard that is not listed in it does not
exist for readers, so a crash between writing a shard and listing it loses nothing but that
unit's work. It is replaced atomically (temp name + rename locally; one PUT on object stores).

On local disks a commit does not rewrite it: the writer appends one JSON line per unit to the
commit log that manifest.json names (`"log": "commits-<id>.jsonl"`), and fsyncs it. A record
counts once its closing newline is written, so a crash at any byte of an append leaves the
units before it committed and that one not. `read_manifest` returns manifest.json with its log
applied; the writer folds the log into manifest.json (compaction) when it opens a dataset,
when the log has grown as long as the manifest, and when it finalizes the dataset.
manifest.json alone is therefore always a consistent, possibly older, state of the dataset.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import re
import subprocess
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from storage.errors import DatasetNotFoundError, ManifestError, StorageError
from storage.hashing import ALGORITHMS
from storage.schemas import SCHEMA_VERSION
from storage.uri import Location

MANIFEST = "manifest.json"
FORMAT = "panelforge-dataset"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@functools.cache
def code_version(root: str | os.PathLike | None = None) -> str:
    """'panelforge 0.1.0+g<commit>' when run from a git checkout ('...+g<commit>.dirty' when tracked
    files differ from that commit: the code that ran is not the commit's), else the package version.
    root: the checkout to ask (default: the one this module lives in)."""
    try:
        version = metadata.version("panelforge")
    except metadata.PackageNotFoundError:
        version = "unknown"
    cwd = Path(root) if root is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = commit and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                          capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"panelforge {version}" + (f"+g{commit}" if commit else "") + (".dirty" if dirty else "")


def digest(manifest: dict) -> str:
    """A short content hash of a manifest: names one exact version of a dataset in lineage."""
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(body).hexdigest()[:16]


def lineage_entry(manifest: dict, uri: str | None = None) -> dict:
    """What a derived dataset records of an input: enough to trace it, without its shard list."""
    return {
        "uri": uri or manifest.get("uri"),
        "kind": manifest.get("kind"),
        "rows": sum(s["rows"] for s in manifest.get("shards", [])),
        "digest": digest(manifest),
        "code_version": manifest.get("code_version"),
        "meta": manifest.get("meta", {}),
        "inputs": manifest.get("inputs", []),
    }


def check_member(loc: Location, name: str, manifest_path: str) -> str:
    """A file named by a manifest must lie inside the dataset's root by name; returns its path."""
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm.startswith("..") or "\\" in name or ":" in name or "\0" in name:
        raise ManifestError(
            f"{manifest_path}: names a file outside the dataset's root: {name!r}; "
            "refusing to read or write it"
        )
    return loc.join(norm)


def member_path(loc: Location, name: str, manifest_path: str) -> str:
    """check_member, and on local disks also no symbolic link on the way: what every access to
    a dataset's file goes through."""
    check_member(loc, name, manifest_path)
    return inside_root(loc, posixpath.normpath(name))


def inside_root(loc: Location, rel: str) -> str:
    """loc's path of rel, refused when a symbolic link on the way (the file itself, `shards/`)
    leads out of the dataset's folder or to another file in it: reads, verify, overwrite and the
    temp clean-up all go through here, so none of them touch a file outside the dataset."""
    path = loc.join(rel) if rel not in ("", ".") else loc.path
    if not loc.local:
        return path  # object stores have no links
    real = os.path.realpath(path)
    if real != path:
        root = os.path.realpath(loc.path)
        where = "outside the dataset's folder" if os.path.commonpath([root, real]) != root else "to another file in it"
        raise StorageError(
            f"{loc.display(rel)}: is a symbolic link, or lies under one, that leads {where} ({real}); "
            "a dataset's files must be its own: replace the link by the real file or folder (or "
            "rebuild the dataset); nothing was read, written or deleted"
        )
    return path


def validate(manifest: Any, path: str) -> dict:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a PanelForge manifest (no format={FORMAT!r})")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema version {version!r} is not supported (this code reads version "
            f"{SCHEMA_VERSION}); rebuild the dataset or use the matching PanelForge release"
        )
    for key in ("kind", "shards", "rejects", "status"):
        if key not in manifest:
            raise ManifestError(f"{path}: missing field {key!r}")
    for entry in manifest["shards"] + manifest["rejects"]:
        check_entry(entry, path)
    return manifest


def check_entry(entry: Any, path: str) -> dict:
    if not isinstance(entry, dict):
        raise ManifestError(f"{path}: shard entry {entry!r} is not an object")
    for key in ("unit", "file", "rows", "bytes"):
        if key not in entry:
            raise ManifestError(f"{path}: shard entry {entry!r} lacks {key!r}")
    if not any(entry.get(a) for a in ALGORITHMS):
        raise ManifestError(f"{path}: shard entry {entry!r} records no content hash ({' or '.join(ALGORITHMS)})")
    return entry


def read_base(loc: Location) -> dict:
    """manifest.json as it is on disk, validated, without its commit log."""
    path = loc.display(MANIFEST)
    info = loc.fs.get_file_info(loc.join(MANIFEST))
    if info.type == pafs.FileType.NotFound:
        raise DatasetNotFoundError(
            f"{path}: no manifest: {loc.uri} is not a PanelForge dataset (or nothing was written yet)"
        )
    with loc.fs.open_input_stream(loc.join(MANIFEST)) as f:
        raw = f.read()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: truncated or not JSON ({e}); the dataset was not touched") from None
    manifest = validate(manifest, path)
    for entry in manifest["shards"] + manifest["rejects"]:
        check_member(loc, entry["file"], path)
    return manifest


def read_log(loc: Location, name: str) -> tuple[list[dict], int]:
    """The complete records of a commit log and the byte length they span; a torn last line (a
    crash mid-append: no closing newline) is left out. Raises FileNotFoundError."""
    if not loc.local:
        return [], 0
    path = inside_root(loc, name)
    with open(path, "rb") as f:
        raw = f.read()
    records, end = [], 0
    where = loc.display(name)
    while (nl := raw.find(b"\n", end)) >= 0:
        try:
            record = json.loads(raw[end:nl])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{where}: byte {end}: a damaged commit record ({e}); the dataset was not touched") from None
        if not isinstance(record, dict) or not isinstance(record.get("unit"), str):
            raise ManifestError(f"{where}: byte {end}: a commit record without a unit")
        for key in ("shard", "rejects"):
            if record.get(key) is not None:
                check_member(loc, check_entry(record[key], where)["file"], where)
        records.append(record)
        end = nl + 1
    return records, end


def apply_records(manifest: dict, records: list[dict]) -> dict:
    """manifest with the log's records applied (a unit committed again replaces its entries)."""
    if not records:
        return manifest
    units = {u: {"shard": None, "rejects": None} for u in manifest["units"]}
    for key, single in (("shards", "shard"), ("rejects", "rejects")):
        for entry in manifest[key]:
            units.setdefault(entry["unit"], {"shard": None, "rejects": None})[single] = entry
    for record in records:
        units[record["unit"]] = {"shard": record.get("shard"), "rejects": record.get("rejects")}
    return with_units(manifest, units, status="writing")


def unit_order(unit: str) -> list:
    """Sort key of unit names, numbers compared as numbers: "64x64-00001" < "96x96-00000" <
    "128x128-00000" (the stages' order), "g9" < "g10"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", unit) if part]


def with_units(header: dict, units: dict[str, dict], status: str | None = None) -> dict:
    """A manifest of header's fields listing units ({unit: {"shard", "rejects"}}) in unit order.

    Unit order, not commit order: parallel workers finish units in any order, and a global row
    index (what training batches are drawn by) must not depend on timing."""
    order = sorted(units, key=unit_order)
    manifest = dict(header)
    manifest["units"] = order
    manifest["shards"] = [units[u]["shard"] for u in order if units[u]["shard"]]
    manifest["rejects"] = [units[u]["rejects"] for u in order if units[u]["rejects"]]
    if status is not None:
        manifest["status"] = status
    return manifest


def read_manifest(loc: Location) -> dict:
    """The dataset's committed state: manifest.json with its commit log applied."""
    for _ in range(20):
        base = read_base(loc)
        name = base.get("log")
        if not name:
            return base
        check_member(loc, name, loc.display(MANIFEST))
        try:
            records, _ = read_log(loc, name)
        except FileNotFoundError:
            # No commit since the last compaction, or a compaction replaced the log between our
            # two reads (then manifest.json names a new log: read again).
            if read_base(loc).get("log") == name:
                return base
            continue
        return apply_records(base, records)
    raise ManifestError(f"{loc.display(MANIFEST)}: kept changing while being read; is a writer compacting it in a loop?")


def write_manifest(loc: Location, manifest: dict) -> None:
    """Replace manifest.json atomically: readers see the old one or the new one, never half."""
    manifest["updated"] = now()
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    target = loc.join(MANIFEST)
    if loc.local:
        tmp = loc.join(f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())  # the log it replaces is deleted next: this must be on disk first
        os.replace(tmp, target)  # rename(2): atomic on one filesystem
    else:
        with loc.fs.open_output_stream(target) as f:  # an object PUT is atomic
            f.write(body)
