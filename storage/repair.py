"""Repair a damaged dataset: drop from the manifest every unit whose files are missing or corrupt.

    python -m storage.repair out/tiny/panels       # the same as `panelforge datasets repair DIR`

Each unit's files (its shard and its rejects) are re-hashed against the manifest. A unit with a
missing, truncated, changed or symlinked file is no longer committed after the repair; its
files are left where they are (the rerun writes the same names over them). The job that made
the dataset, rerun with the same config, then redoes exactly those units, and with
deterministic units the result is byte for byte the dataset an uninterrupted run writes.
"""
from __future__ import annotations

import json
import os
import sys

from storage.dataset import _compact, _header_of, _location, _units_of, file_problem
from storage.manifest import MANIFEST, inside_root, read_manifest


def repair(uri: str | os.PathLike) -> dict:
    """Check every file of a dataset; uncommit the units with a bad one. Returns a report:
    {"uri", "units", "files", "dropped": [{"unit", "file", "problem"}, ...]}.

    Raises StorageError when the damage is not a unit's (an unreadable manifest, `shards/` linked
    out of the dataset's folder): that needs a person, not a rerun.
    """
    loc = _location(uri)
    manifest = read_manifest(loc)
    for sub in ("shards", "rejects"):
        if loc.fs.get_file_info(loc.join(sub)).type.name != "NotFound":
            inside_root(loc, sub)
    dropped, files = [], 0
    for key in ("shards", "rejects"):
        for entry in manifest[key]:
            files += 1
            problem = file_problem(loc, entry)
            if problem:
                dropped.append({"unit": entry["unit"], "file": entry["file"], "problem": problem})
    report = {"uri": loc.uri, "units": len(manifest["units"]), "files": files, "dropped": dropped}
    if dropped:
        units = _units_of(manifest)
        for bad in {d["unit"] for d in dropped}:
            units.pop(bad, None)
        header = _header_of(manifest)
        header["status"] = "writing"  # not complete any more: a rerun has units to do
        header.pop("summary", None)
        _compact(loc, header, units)
    return report


def describe(report: dict) -> str:
    lines = [f"{report['uri']}: checked {report['files']} files of {report['units']} units"]
    if not report["dropped"]:
        lines.append("every file matches the manifest: nothing to repair")
        return "\n".join(lines)
    units = sorted({d["unit"] for d in report["dropped"]})
    for d in report["dropped"]:
        lines.append(f"  dropped unit {d['unit']}: {d['file']}: {d['problem']}")
    lines.append(f"{len(units)} unit(s) dropped from {MANIFEST}; rerun the job that made the dataset "
                 "(same config): it redoes exactly these units")
    return "\n".join(lines)


if __name__ == "__main__":
    result = repair(sys.argv[1])
    print(describe(result) if "--json" not in sys.argv else json.dumps(result, indent=1))
