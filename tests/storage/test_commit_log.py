"""Commits in constant time: an fsynced commit log, folded into manifest.json; torn appends.

    .venv/bin/python -m pytest -q tests/storage/test_commit_log.py
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from helpers import token_rows  # noqa: E402

import storage.dataset as dataset_module  # noqa: E402
from storage import DatasetWriter, open_dataset, read_manifest, resolve  # noqa: E402


def _log(path: Path) -> Path:
    return path / json.loads((path / "manifest.json").read_text())["log"]


def test_commit_appends_one_line_and_leaves_manifest_json_alone(tmp_path):
    path = tmp_path / "ds"
    w = DatasetWriter(path, "tokens")
    before = (path / "manifest.json").read_bytes()
    for u in range(3):
        w.write_unit(f"{u:05d}", token_rows(u, 4))
    assert (path / "manifest.json").read_bytes() == before  # a commit does not rewrite it
    lines = _log(path).read_bytes().splitlines()
    assert [json.loads(x)["unit"] for x in lines] == ["00000", "00001", "00002"]
    ds = open_dataset(path)  # readers apply the log
    assert ds.manifest["units"] == ["00000", "00001", "00002"] and len(ds) == 12
    assert ds.manifest["status"] == "writing"
    w.finalize(rows=12)  # folded: manifest.json alone says everything, the log is gone
    m = json.loads((path / "manifest.json").read_text())
    assert m["status"] == "complete" and m["units"] == ["00000", "00001", "00002"] and m["summary"] == {"rows": 12}
    assert not _log(path).exists() and not list(path.glob("commits-*.jsonl"))
    assert read_manifest(resolve(path))["units"] == m["units"]


def test_log_is_folded_when_it_grows_as_long_as_the_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, "COMPACT_MIN", 4)
    path = tmp_path / "ds"
    w = DatasetWriter(path, "tokens")
    for u in range(10):
        w.commit({"unit": f"{u:05d}", "shard": None, "rejects": None})
        listed = json.loads((path / "manifest.json").read_text())["units"]
        # manifest.json alone is a consistent, older state: a prefix of the commits
        assert listed == [f"{k:05d}" for k in range(len(listed))]
        assert open_dataset(path).manifest["units"] == [f"{k:05d}" for k in range(u + 1)]
    # folds after 4 commits (4 units), then after 4 more (8 units): amortised O(1) per commit
    assert json.loads((path / "manifest.json").read_text())["units"] == [f"{k:05d}" for k in range(8)]
    assert len(list(path.glob("commits-*.jsonl"))) == 1


def test_a_crash_at_any_byte_of_a_commit_leaves_the_dataset_readable_and_resumable(tmp_path):
    path = tmp_path / "ds"
    w = DatasetWriter(path, "tokens", config={"n": 5})
    for u in range(3):
        w.write_unit(f"{u:05d}", token_rows(u, 5))
    w.close()
    log = _log(path)
    body = log.read_bytes()
    start = body.rindex(b"\n", 0, len(body) - 1) + 1  # the last record: unit 00002
    assert json.loads(body[start:])["unit"] == "00002"
    for cut in range(start, len(body) + 1):
        trial = tmp_path / f"cut{cut}"
        shutil.copytree(path, trial)
        (trial / log.name).write_bytes(body[:cut])  # the process died after writing `cut` bytes
        ds = open_dataset(trial)
        committed = cut == len(body)  # the record counts once its newline is written
        assert ds.manifest["units"] == ["00000", "00001", "00002"][: 3 if committed else 2], cut
        ds.verify()
        assert len(ds) == (15 if committed else 10)
        # resumable: the rerun redoes the unit whose commit was torn, and appends after no torn line
        w2 = DatasetWriter(trial, "tokens", config={"n": 5})
        assert w2.done_units == set(ds.manifest["units"])
        for u in range(4):
            if f"{u:05d}" not in w2.done_units:
                w2.write_unit(f"{u:05d}", token_rows(u, 5))
        w2.finalize()
        ids = open_dataset(trial, verify=True).table(columns=["id"]).column("id").to_pylist()
        assert sorted(ids) == sorted(f"u{u:03d}-r{i:03d}" for u in range(4) for i in range(5)), cut
        shutil.rmtree(trial)


def test_a_crash_between_folding_and_deleting_the_old_log(tmp_path):
    # The new manifest.json is written, the old log not yet deleted: it is stale (no manifest
    # names it), so its records are not applied twice and the next writer deletes it.
    path = tmp_path / "ds"
    w = DatasetWriter(path, "tokens")
    w.write_unit("00000", token_rows(0, 3))
    w.close()
    old = _log(path)
    kept = old.read_bytes()
    w = DatasetWriter(path, "tokens")  # opening folds the log
    assert not old.exists()
    old.write_bytes(kept)  # as if the crash came before the delete
    assert open_dataset(path).manifest["units"] == ["00000"]
    w.write_unit("00001", token_rows(1, 3))
    w.close()
    DatasetWriter(path, "tokens")
    assert not old.exists()
    assert open_dataset(path, verify=True).manifest["units"] == ["00000", "00001"]


def test_a_complete_dataset_committed_to_again_is_writing_until_finalized(tmp_path):
    path = tmp_path / "ds"
    w = DatasetWriter(path, "tokens")
    w.write_unit("00000", token_rows(0, 3))
    w.finalize()
    w = DatasetWriter(path, "tokens")
    w.write_unit("00001", token_rows(1, 3))
    assert open_dataset(path).manifest["status"] == "writing"
    assert w.finalize()["status"] == "complete"
    assert open_dataset(path).manifest["units"] == ["00000", "00001"]


def test_a_manifest_of_an_older_release_is_resumed(tmp_path):
    # Written before the commit log existed: no "log" field, entries with sha256 only.
    path = tmp_path / "ds"
    w = DatasetWriter(path, "tokens")
    w.write_unit("00000", token_rows(0, 3))
    w.finalize()
    m = json.loads((path / "manifest.json").read_text())
    del m["log"]
    m["status"] = "writing"
    (path / "manifest.json").write_text(json.dumps(m))
    w = DatasetWriter(path, "tokens")
    w.write_unit("00001", token_rows(1, 3))
    assert open_dataset(path).manifest["units"] == ["00000", "00001"]
