"""The dataset contract: atomic units, resumable writer, mmap reader, rejects, lineage."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from helpers import token_rows  # noqa: E402

from storage import (  # noqa: E402
    DatasetMismatchError,
    DatasetWriter,
    StorageError,
    open_dataset,
    write_shard,
)


def _write(path, units=range(4), n=10, **kw):
    w = DatasetWriter(path, "tokens", config={"rows_per_unit": n}, meta={"layout_fingerprint": "abc"}, **kw)
    for u in units:
        if f"{u:05d}" not in w.done_units:
            w.write_unit(f"{u:05d}", token_rows(u, n), rejects=[{"input_ref": f"in-{u}", "stage": "read", "reason": "corrupt", "detail": "x"}] if u % 2 else None)
    return w


def test_write_read_round_trip(tmp_path):
    w = _write(tmp_path / "ds")
    manifest = w.finalize(rows_in=44)
    assert manifest["status"] == "complete"
    ds = open_dataset(tmp_path / "ds", verify=True)
    assert ds.kind == "tokens" and len(ds) == 40 and ds.meta == {"layout_fingerprint": "abc"}
    assert ds[0]["id"] == "u000-r000"
    assert ds[25]["id"] == "u002-r005" and ds[25]["tokens"][0] == 2005
    assert ds[-1]["id"] == "u003-r009"
    assert ds.take([39, 0, 15]).column("id").to_pylist() == ["u003-r009", "u000-r000", "u001-r005"]
    ids = [i for b in ds.iter_batches(batch_size=3, columns=["id"]) for i in b.column("id").to_pylist()]
    assert ids == ds.table(columns=["id"]).column("id").to_pylist() and len(set(ids)) == 40
    assert max(len(b) for b in ds.iter_batches(batch_size=3)) == 3
    assert ds.rows_per_task() == {"t2i": 24, "edit": 16}
    assert ds.reject_counts() == {"corrupt": 2}
    rejects = ds.rejects()
    assert rejects.column("input_ref").to_pylist() == ["in-1", "in-3"]
    with pytest.raises(IndexError):
        ds[40]
    summary = ds.summary()
    assert summary["rows"] == 40 and summary["shards"] == 4 and summary["rejects"] == 2


def test_shards_are_memory_mapped(tmp_path):
    w = DatasetWriter(tmp_path / "ds", "tokens")
    w.write_unit("00000", token_rows(0, 2000, length=1000))  # 8 MB of token ids
    ds = open_dataset(tmp_path / "ds")
    before = pa.total_allocated_bytes()
    table = ds.shard_table(0)
    assert table.nbytes > 8_000_000
    # Zero-copy: the token values stay in the mapped file, not in Arrow's heap.
    assert pa.total_allocated_bytes() - before < 1_000_000
    assert table.column("tokens")[1999].as_py()[999] == 1999 + 999


def test_partition_is_deterministic_and_complete(tmp_path):
    _write(tmp_path / "ds", n=7).finalize()
    ds = open_dataset(tmp_path / "ds")
    parts = [ds.partition(r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(28))
    assert parts == [ds.partition(r, 3) for r in range(3)]
    even = [ds.partition(r, 3, drop_uneven=True) for r in range(3)]
    assert {len(p) for p in even} == {9}
    with pytest.raises(ValueError):
        ds.partition(3, 3)


def test_rerun_skips_done_units_and_never_duplicates(tmp_path):
    path = tmp_path / "ds"
    _write(path, units=[0, 1])
    mtime = (path / "shards" / "00000.arrow").stat().st_mtime_ns
    w = _write(path, units=range(4))  # resumes: units 0 and 1 are skipped
    assert w.done_units == {"00000", "00001", "00002", "00003"}
    assert (path / "shards" / "00000.arrow").stat().st_mtime_ns == mtime
    w.write_unit("00002", token_rows(2, 10))  # committing a unit again replaces it
    w.finalize()
    ds = open_dataset(path, verify=True)
    ids = ds.table(columns=["id"]).column("id").to_pylist()
    assert len(ids) == 40 == len(set(ids))


def test_rows_follow_unit_order_not_commit_order(tmp_path):
    # Parallel workers finish units in any order; global row indices must not depend on it.
    names = ["128x128-00000", "64x64-00001", "96x96-00000", "64x64-00000"]
    w = DatasetWriter(tmp_path / "a", "tokens")
    infos = {n: write_shard(tmp_path / "a", n, token_rows(i, 3), kind="tokens") for i, n in enumerate(names)}
    for n in names:  # committed in this (timing) order
        w.commit(infos[n])
    w.finalize()
    ds = open_dataset(tmp_path / "a", verify=True)
    assert ds.manifest["units"] == ["64x64-00000", "64x64-00001", "96x96-00000", "128x128-00000"]
    assert [ds[i]["id"] for i in (0, 3, 6, 9)] == ["u003-r000", "u001-r000", "u002-r000", "u000-r000"]


def test_rerun_of_a_complete_dataset_rewrites_nothing(tmp_path):
    path = tmp_path / "ds"
    _write(path).finalize(rows_in=44)
    before = (path / "manifest.json").read_bytes()
    mtime = (path / "manifest.json").stat().st_mtime_ns
    manifest = _write(path).finalize(rows_in=0)  # every unit done: nothing to write
    assert manifest["summary"] == {"rows_in": 44} and manifest["status"] == "complete"
    assert (path / "manifest.json").read_bytes() == before
    assert (path / "manifest.json").stat().st_mtime_ns == mtime


def test_worker_writes_driver_commits(tmp_path):
    path = tmp_path / "ds"
    w = DatasetWriter(path, "tokens")
    info = write_shard(path, "00007", token_rows(7, 5), kind="tokens")
    assert open_dataset(path).manifest["units"] == []  # not visible until committed
    json.dumps(info)  # small and JSON-able: travels back from a Ray worker
    w.commit(info)
    assert len(open_dataset(path)) == 5


def test_unit_with_only_rejects_is_done(tmp_path):
    w = DatasetWriter(tmp_path / "ds", "panels")
    w.write_unit("00000", None, rejects=[{"input_ref": "a.jpg", "stage": "read", "reason": "zero-byte"}])
    assert w.done_units == {"00000"}
    ds = open_dataset(tmp_path / "ds")
    assert len(ds) == 0 and ds.reject_counts() == {"zero-byte": 1}
    assert ds.table().num_rows == 0 and ds.take([]).num_rows == 0


def test_resume_with_other_meta_or_kind_is_refused(tmp_path):
    path = tmp_path / "ds"
    _write(path, units=[0])
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(DatasetMismatchError, match="layout_fingerprint"):
        DatasetWriter(path, "tokens", config={"rows_per_unit": 10}, meta={"layout_fingerprint": "other"})
    with pytest.raises(DatasetMismatchError, match="'tokens' dataset, not 'panels'"):
        DatasetWriter(path, "panels")
    with pytest.raises(DatasetMismatchError, match="rows_per_unit"):
        DatasetWriter(path, "tokens", config={"rows_per_unit": 5}, meta={"layout_fingerprint": "abc"})
    assert (path / "manifest.json").read_bytes() == before
    w = DatasetWriter(path, "tokens", meta={"layout_fingerprint": "other"}, overwrite=True)
    assert w.done_units == set() and not (path / "shards" / "00000.arrow").exists()


def test_schema_is_enforced(tmp_path):
    w = DatasetWriter(tmp_path / "ds", "tokens")
    bad = token_rows(0, 3).drop_columns(["loss_start"])
    with pytest.raises(StorageError, match="missing columns \\['loss_start'\\]"):
        w.write_unit("00000", bad)
    with pytest.raises(ValueError, match="work unit name"):
        w.write_unit("../escape", token_rows(0, 3))
    with pytest.raises(StorageError, match="lacks 'reason'"):
        w.write_unit("00001", None, rejects=[{"input_ref": "x", "stage": "read"}])
    # int64 columns are conformed to the schema's int32
    t = token_rows(0, 2).set_column(3, "grid_h", pa.array([8, 8], pa.int64()))
    w.write_unit("00002", t)
    assert open_dataset(tmp_path / "ds").shard_table(0).schema.field("grid_h").type == pa.int32()


def test_lineage_and_code_version(tmp_path):
    _write(tmp_path / "a", units=[0]).finalize()
    src = open_dataset(tmp_path / "a")
    w = DatasetWriter(tmp_path / "b", "tokens", inputs=[src.manifest])
    w.write_unit("00000", token_rows(0, 2))
    ds = open_dataset(tmp_path / "b")
    (entry,) = ds.manifest["inputs"]
    assert entry["kind"] == "tokens" and entry["rows"] == 10 and entry["uri"] == str(tmp_path / "a")
    assert ds.manifest["code_version"].startswith("panelforge ")


def test_code_version_names_the_commit_and_changed_files(tmp_path):
    """A dataset made by code that differs from its commit says so (".dirty"); untracked files
    (a workdir inside the checkout) do not count."""
    import subprocess

    from storage.manifest import code_version

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "one")
    commit = git("rev-parse", "--short", "HEAD")
    code_version = code_version.__wrapped__  # not the per-process cache: this checkout changes under it
    assert code_version(tmp_path).endswith(f"+g{commit}")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "new.txt").write_text("untracked")
    assert code_version(tmp_path).endswith(f"+g{commit}")
    # Another size: git's index trusts a same-size file whose mtime falls in the second it last looked.
    (tmp_path / "a.py").write_text("x = 20\n")
    assert code_version(tmp_path).endswith(f"+g{commit}.dirty")
    outside = tmp_path.parent / f"{tmp_path.name}-not-a-checkout"  # pytest's tmp folders are in no checkout
    outside.mkdir()
    assert code_version(outside).startswith("panelforge ") and "+g" not in code_version(outside)


def test_stale_temporaries_are_cleaned(tmp_path):
    _write(tmp_path / "ds", units=[0])
    stale = tmp_path / "ds" / "shards" / ".00001.arrow.deadbeef.tmp"
    stale.write_bytes(b"half a shard")
    _write(tmp_path / "ds", units=[0, 1])
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path / "ds" / "shards")) == ["00000.arrow", "00001.arrow"]
