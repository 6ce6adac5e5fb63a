"""Corruption found where data is read, repaired by a rerun; hashes old and new; file metadata.

    .venv/bin/python -m pytest -q tests/storage/test_integrity.py
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pytest

from helpers import token_rows  # noqa: E402

from flows.cli import main  # noqa: E402
from storage import ChecksumError, DatasetWriter, open_dataset, repair, write_shard  # noqa: E402


def _build(path, units=range(3), skip=()):
    """The job: deterministic units, resumable; returns the units it ran."""
    w = DatasetWriter(path, "tokens", config={"n": 6}, meta={"layout_fingerprint": "fp01"})
    ran = [f"{u:05d}" for u in units if f"{u:05d}" not in w.done_units]
    for unit in ran:
        u = int(unit)
        w.write_unit(unit, token_rows(u, 6), rejects=[{"input_ref": f"in-{u}", "stage": "read", "reason": "bad"}])
    w.finalize()
    return ran


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_shard_is_caught_by_the_reader_and_named(tmp_path):
    path = tmp_path / "ds"
    _build(path)
    _flip(path / "shards" / "00001.arrow")
    ds = open_dataset(path)
    assert ds[0]["id"] == "u000-r000"  # intact shards read as before
    with pytest.raises(ChecksumError, match=r"shards/00001.arrow: xxh3_128 .* does not match .*"
                                            r"panelforge datasets repair .*ds.*then rerun"):
        ds[6]
    with pytest.raises(ChecksumError, match="00001.arrow"):
        open_dataset(path).table()
    # A caller that opts out reads what is there (the damage is inside the token values).
    assert open_dataset(path, check=False).table().num_rows == 18


def test_batches_are_checked_ahead_and_none_of_a_damaged_shard_comes_out(tmp_path, monkeypatch):
    """iter_batches checks shard i+1 on a thread while shard i's batches go out: the damaged
    shard's error surfaces when the reader reaches it, after every row before it, and no row of
    it is returned."""
    import threading

    import storage.dataset as module

    path = tmp_path / "ds"
    _build(path)
    _flip(path / "shards" / "00001.arrow")
    monkeypatch.setattr(module, "_VERIFIED", set())
    threads = []
    real = module._content_problem
    monkeypatch.setattr(module, "_content_problem",
                        lambda e, b: threads.append((e["file"], threading.current_thread().name)) or real(e, b))
    seen = []
    with pytest.raises(ChecksumError, match=r"shards/00001.arrow: xxh3_128 .* does not match"):
        for batch in open_dataset(path).iter_batches(batch_size=4):
            seen += batch.column("id").to_pylist()
    assert seen == [f"u000-r{i:03d}" for i in range(6)]
    # The first shard is checked inline, the next on the check thread (which may start before
    # the first one's check ends: the order of the two is not fixed).
    checked = dict(threads)
    assert len(threads) == len(checked) == 2
    assert checked["shards/00000.arrow"] == threading.current_thread().name
    assert checked["shards/00001.arrow"].startswith("panelforge-check")
    # A reader that stops before the damaged shard never hears of it.
    monkeypatch.setattr(module, "_VERIFIED", set())
    first = next(open_dataset(path).iter_batches(batch_size=6))
    assert first.column("id").to_pylist() == seen


def test_the_check_costs_once_per_process_and_file(tmp_path, monkeypatch):
    import storage.dataset as module

    path = tmp_path / "ds"
    _build(path)
    calls = []
    real = module._content_problem
    monkeypatch.setattr(module, "_content_problem", lambda e, b: calls.append(e["file"]) or real(e, b))
    monkeypatch.setattr(module, "_VERIFIED", set())
    open_dataset(path).table()
    open_dataset(path).table()  # the same files again, unchanged: not re-hashed
    assert sorted(calls) == ["shards/00000.arrow", "shards/00001.arrow", "shards/00002.arrow"]
    _flip(path / "shards" / "00002.arrow")  # changed since: its key (size, mtime, inode) differs
    with pytest.raises(ChecksumError, match="00002.arrow"):
        open_dataset(path).table()


def test_repair_then_rerun_redoes_exactly_the_damaged_unit(tmp_path, capsys):
    path = tmp_path / "ds"
    assert _build(path) == ["00000", "00001", "00002"]
    whole = {p.name: p.read_bytes() for p in sorted((path / "shards").iterdir())}
    mtimes = {p.name: p.stat().st_mtime_ns for p in (path / "shards").iterdir()}
    _flip(path / "shards" / "00001.arrow")
    (path / "rejects" / "00002.arrow").unlink()

    assert main(["datasets", "repair", str(path)]) == 0
    out = capsys.readouterr().out
    assert "dropped unit 00001: shards/00001.arrow: xxh3_128" in out
    assert "dropped unit 00002: rejects/00002.arrow: listed in the manifest but missing" in out
    ds = open_dataset(path, verify=True)  # what is left is intact and readable
    assert ds.manifest["units"] == ["00000"] and ds.manifest["status"] == "writing"

    assert _build(path) == ["00001", "00002"]  # the rerun: only the dropped units
    ds = open_dataset(path, verify=True)
    assert ds.manifest["status"] == "complete" and len(ds) == 18
    assert {p.name: p.read_bytes() for p in sorted((path / "shards").iterdir())} == whole  # byte for byte
    assert (path / "shards" / "00000.arrow").stat().st_mtime_ns == mtimes["00000.arrow"]  # not recomputed
    assert main(["datasets", "repair", str(path)]) == 0
    assert "nothing to repair" in capsys.readouterr().out


def test_repair_report_as_data(tmp_path):
    path = tmp_path / "ds"
    _build(path)
    (path / "shards" / "00000.arrow").write_bytes(b"not arrow")
    report = repair(path)
    assert report["units"] == 3 and report["files"] == 6
    assert [(d["unit"], d["file"]) for d in report["dropped"]] == [("00000", "shards/00000.arrow")]
    assert "truncated or was replaced" in report["dropped"][0]["problem"]


def test_manifests_with_sha256_still_verify(tmp_path, capsys):
    # A dataset of an earlier release: entries record sha256 only.
    path = tmp_path / "ds"
    _build(path)
    m = json.loads((path / "manifest.json").read_text())
    for entry in m["shards"] + m["rejects"]:
        entry["sha256"] = hashlib.sha256((path / entry["file"]).read_bytes()).hexdigest()
        del entry["xxh3_128"]
    (path / "manifest.json").write_text(json.dumps(m))
    assert open_dataset(path, verify=True).table().num_rows == 18
    _flip(path / "shards" / "00000.arrow")
    with pytest.raises(ChecksumError, match=r"shards/00000.arrow: sha256 .* does not match"):
        open_dataset(path)[0]
    with pytest.raises(ChecksumError, match=r"shards/00000.arrow: sha256"):
        open_dataset(path, check=False).verify()


def test_sha256_for_publishing(tmp_path, capsys):
    path = tmp_path / "ds"
    _build(path)
    assert main(["datasets", "show", str(path), "--sha256"]) == 0
    out = capsys.readouterr().out
    want = hashlib.sha256((path / "shards" / "00001.arrow").read_bytes()).hexdigest()
    assert f"{want}  shards/00001.arrow" in out  # the `sha256sum -c` format


def test_each_file_says_what_it_holds(tmp_path):
    path = tmp_path / "ds"
    _build(path, units=[0])
    write_shard(path, "00009", token_rows(9, 2), kind="tokens")  # a worker: meta from the manifest
    for name, table in (("shards/00000.arrow", "rows"), ("rejects/00000.arrow", "rejects"), ("shards/00009.arrow", "rows")):
        meta = pa.ipc.open_file(str(path / name)).schema.metadata
        assert meta[b"panelforge.kind"] == b"tokens" and meta[b"panelforge.schema_version"] == b"1"
        assert meta[b"panelforge.layout_fingerprint"] == b"fp01" and meta[b"panelforge.table"] == table.encode()
