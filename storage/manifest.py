"""manifest.json: what a dataset holds, how it was made, and what it was made from.

    python -c "from storage.manifest import read_manifest; from storage.uri import resolve; \
print(read_manifest(resolve('out/tiny/panels'))['kind'])"

The manifest is the dataset's single source of truth: a shard that is not listed in it does not
exist for readers, so a crash between writing a shard and listing it loses nothing but that
unit's work. It is replaced atomically (temp name + rename locally; one PUT on object stores).
"""
from __future__ import annotations

import functools
import hashlib
import json
import posixpath
import subprocess
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from storage.errors import DatasetNotFoundError, ManifestError
from storage.schemas import SCHEMA_VERSION
from storage.uri import Location

MANIFEST = "manifest.json"
FORMAT = "panelforge-dataset"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@functools.cache
def code_version() -> str:
    """'panelforge 0.1.0+g<commit>' when run from a git checkout, else the package version."""
    try:
        version = metadata.version("panelforge")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"panelforge {version}" + (f"+g{commit}" if commit else "")


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
    """A file named by a manifest must lie inside the dataset's root."""
    norm = posixpath.normpath(name)
    if name.startswith("/") or norm.startswith("..") or "\\" in name or ":" in name:
        raise ManifestError(
            f"{manifest_path}: names a file outside the dataset's root: {name!r}; "
            "refusing to read or write it"
        )
    return loc.join(norm)


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
        for key in ("unit", "file", "rows", "bytes", "sha256"):
            if key not in entry:
                raise ManifestError(f"{path}: shard entry {entry!r} lacks {key!r}")
    return manifest


def read_manifest(loc: Location) -> dict:
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


def write_manifest(loc: Location, manifest: dict) -> None:
    """Replace manifest.json atomically: readers see the old one or the new one, never half."""
    manifest["updated"] = now()
    body = json.dumps(manifest, indent=1, sort_keys=True).encode()
    target = loc.join(MANIFEST)
    if loc.local:
        tmp = loc.join(f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
        with loc.fs.open_output_stream(tmp) as f:
            f.write(body)
        loc.fs.move(tmp, target)  # rename(2): atomic on one filesystem
    else:
        with loc.fs.open_output_stream(target) as f:  # an object PUT is atomic
            f.write(body)
