"""Datasets stay inside their folder: symbolic links planted in a dataset are refused by reads,
verify, overwrite, the temp clean-up and repair, and nothing outside the folder is touched.

    .venv/bin/python -m pytest -q tests/storage/test_links.py
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import token_rows  # noqa: E402

from storage import ChecksumError, DatasetWriter, StorageError, open_dataset, repair  # noqa: E402


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "ds"
    w = DatasetWriter(path, "tokens")
    for u in range(2):
        w.write_unit(f"{u:05d}", token_rows(u, 5), rejects=[{"input_ref": f"x{u}", "stage": "read", "reason": "bad"}])
    w.finalize()
    return path


def _outside(tmp_path: Path) -> Path:
    """A folder beside the dataset holding files a link could reach."""
    out = tmp_path / "elsewhere"
    out.mkdir(exist_ok=True)
    (out / "secret.txt").write_text("not the dataset's")
    (out / ".keep.arrow.0123.tmp").write_text("someone else's temp file")
    return out


def test_a_shard_linked_to_a_file_outside(dataset, tmp_path):
    out = _outside(tmp_path)
    shard = dataset / "shards" / "00001.arrow"
    shutil.copy(shard, out / "00001.arrow")  # even the very same bytes: a link out is refused
    (out / "00001.arrow").write_bytes((out / "00001.arrow").read_bytes() + b"outside")  # tell them apart
    outside_bytes = (out / "00001.arrow").read_bytes()
    shard.unlink()
    shard.symlink_to(out / "00001.arrow")
    ds = open_dataset(dataset)
    assert ds[0]["id"] == "u000-r000"
    with pytest.raises(StorageError, match=r"shards/00001.arrow: is a symbolic link.*outside the dataset's folder"):
        ds[5]
    with pytest.raises(StorageError, match="00001.arrow: is a symbolic link"):
        open_dataset(dataset, check=False).table()  # opting out of the hash check does not open links
    with pytest.raises(ChecksumError, match="00001.arrow: is a symbolic link"):
        ds.verify()
    with pytest.raises(StorageError, match="symbolic link"):
        DatasetWriter(dataset, "tokens", overwrite=True)
    assert (out / "00001.arrow").exists() and shard.is_symlink()  # nothing deleted
    report = repair(dataset)
    assert [(d["unit"], d["file"]) for d in report["dropped"]] == [("00001", "shards/00001.arrow")]
    # the rerun writes a real file where the link was, and never writes through it
    w = DatasetWriter(dataset, "tokens")
    w.write_unit("00001", token_rows(1, 5))
    w.finalize()
    assert not shard.is_symlink() and open_dataset(dataset, verify=True).table().num_rows == 10
    assert (out / "00001.arrow").read_bytes() == outside_bytes  # the write did not go through the link
    assert (out / "secret.txt").read_text() == "not the dataset's"


def test_a_shard_linked_to_another_shard_of_the_dataset(dataset):
    shard = dataset / "shards" / "00001.arrow"
    shard.unlink()
    shard.symlink_to(dataset / "shards" / "00000.arrow")
    with pytest.raises(StorageError, match=r"00001.arrow: is a symbolic link.*to another file in it"):
        open_dataset(dataset, check=False).table()
    with pytest.raises(ChecksumError, match="symbolic link"):
        open_dataset(dataset, verify=True)


def test_rejects_linked_outside(dataset, tmp_path):
    out = _outside(tmp_path)
    rej = dataset / "rejects" / "00000.arrow"
    rej.unlink()
    rej.symlink_to(out / "secret.txt")
    with pytest.raises(StorageError, match=r"rejects/00000.arrow: is a symbolic link"):
        open_dataset(dataset).rejects()


def test_shards_folder_linked_elsewhere(dataset, tmp_path):
    out = _outside(tmp_path)
    for p in (dataset / "shards").iterdir():
        shutil.copy(p, out / p.name)
    shutil.rmtree(dataset / "shards")
    (dataset / "shards").symlink_to(out, target_is_directory=True)
    before = sorted(os.listdir(out))
    with pytest.raises(StorageError, match=r"ds/shards/00000.arrow: is a symbolic link, or lies under one"):
        open_dataset(dataset)[0]
    with pytest.raises(ChecksumError, match="symbolic link"):
        open_dataset(dataset).verify()
    # A writer refuses before its temp clean-up or any write could reach the other folder,
    with pytest.raises(StorageError, match=r"ds/shards: is a symbolic link.*outside the dataset's folder"):
        DatasetWriter(dataset, "tokens")
    # an overwrite deletes nothing there,
    with pytest.raises(StorageError, match="symbolic link"):
        DatasetWriter(dataset, "tokens", overwrite=True)
    # and repair leaves it to a person (no rerun can fix a folder link).
    with pytest.raises(StorageError, match=r"ds/shards: is a symbolic link"):
        repair(dataset)
    assert sorted(os.listdir(out)) == before
    assert (out / ".keep.arrow.0123.tmp").read_text() == "someone else's temp file"
    assert json.loads((dataset / "manifest.json").read_text())["status"] == "complete"


def test_commit_log_linked_elsewhere(tmp_path):
    out = _outside(tmp_path)
    path = tmp_path / "ds"
    w = DatasetWriter(path, "tokens")
    w.write_unit("00000", token_rows(0, 2))
    w.close()
    log = path / json.loads((path / "manifest.json").read_text())["log"]
    shutil.move(log, out / "log.jsonl")
    log.symlink_to(out / "log.jsonl")
    with pytest.raises(StorageError, match=r"commits-.*\.jsonl: is a symbolic link"):
        open_dataset(path)
