"""generate's reconcile: a shard replaced after its commit (a zombie worker of a lost node) is
re-hashed and re-committed, so the dataset verifies; intact units are left alone.

    .venv/bin/python -m pytest -q tests/tasks/test_reconcile.py
"""
from __future__ import annotations

from helpers import token_rows  # noqa: E402

from storage import DatasetWriter, open_dataset, write_shard  # noqa: E402
from tasks.generate.job import reconcile  # noqa: E402


def test_reconcile_recommits_a_shard_rewritten_after_its_commit(tmp_path):
    path = tmp_path / "ds"
    w = DatasetWriter(path, "tokens")
    for u in range(3):
        w.write_unit(f"{u:05d}", token_rows(u, 4))
    write_shard(path, "00001", token_rows(1, 4, length=20), kind="tokens")  # the zombie's whole, other file
    assert reconcile(w, {"00000", "00001", "00002"}) == 1
    w.finalize()
    ds = open_dataset(path, verify=True)
    assert len(ds.shard_table(1).column("tokens")[0]) == 20
    assert reconcile(w, {"00000", "00001", "00002"}) == 0  # nothing changed since
