"""A writer killed with SIGKILL at chosen points: after a rerun, every row exactly once.

    .venv/bin/python -m pytest -q tests/storage/test_crash.py

The writer announces each point of its work on stdout ("write 7": about to write unit 7's shard,
"commit 7": about to commit it, "finalize") and waits for the test's "go" before going on. The
test picks a point, lets the writer go, and kills it after a random delay: the kill lands inside
that step or, if the step was quicker, with the writer waiting at the next point, never beyond.
So every kill lands while work is left, and what the dataset must show after it is exact. The
kills inside a commit record at every byte are tests/storage/test_commit_log.py's.
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import open_dataset

UNITS = 50
KILLS = 24  # at units 0, 2, 4, ..., 46: each past the previous kill's furthest commit
ROWS = 400
LENGTH = 400  # ~640 KB a shard: a kill a few ms after "go" lands inside the write or the commit

WRITER = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from helpers import token_rows
from storage import DatasetWriter, write_shard

def point(name):
    print(name, flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(3)

token_rows(0, 2)  # warm pyarrow up
w = DatasetWriter(sys.argv[1], "tokens", config={{"rows_per_unit": {ROWS}}})
for u in range({UNITS}):
    unit = f"{{u:05d}}"
    if unit in w.done_units:
        continue
    point(f"write {{u}}")
    info = write_shard(sys.argv[1], unit, token_rows(u, {ROWS}, {LENGTH}), kind="tokens")
    point(f"commit {{u}}")
    w.commit(info)
point("finalize")
w.finalize()
print("done", flush=True)
"""


def _start(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, bufsize=1)


def _go(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _committed(path: Path) -> list[str]:
    ds = open_dataset(path)  # the visible state is always consistent: it parses, and
    ds.verify()  # every listed file is whole
    ids = ds.table(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(ds.manifest["units"]) * ROWS
    return ds.manifest["units"]


@pytest.mark.slow  # ~20 s quiet, a minute under load: make test runs it, make test-fast leaves it to test_commit_log.py
def test_sigkill_at_chosen_points_then_rerun(tmp_path):
    path = tmp_path / "ds"
    rng = random.Random(1234)
    landed = []  # (step, unit, units committed after the kill)
    for k in range(KILLS):
        # a step of unit 2k, never finalize: the kill always leaves work to do
        target = (rng.choice(["write", "commit"]), 2 * k)
        proc = _start(path)
        while True:
            line = proc.stdout.readline().strip()
            assert line and line != "finalize", f"the writer went past {target}: {line!r}"
            step, unit = line.split()
            _go(proc)
            if (step, int(unit)) == target:
                break
        time.sleep(rng.uniform(0, 0.004))
        assert proc.poll() is None  # waiting at the next point at the latest
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        units = _committed(path)
        step, u = target
        # everything before the target step is committed, nothing after it
        expected = [f"{k:05d}" for k in range(u)]
        assert units in ([*expected, f"{u:05d}"], expected) if step == "commit" else units == expected, (target, units)
        landed.append((step, u, len(units)))

    proc = _start(path)
    while (line := proc.stdout.readline().strip()) != "done":
        assert line, "the writer died"
        _go(proc)
    assert proc.wait(timeout=120) == 0
    ds = open_dataset(path, verify=True)
    assert ds.manifest["status"] == "complete"
    ids = ds.table(columns=["id"]).column("id").to_pylist()
    expected = [f"u{u:03d}-r{i:03d}" for u in range(UNITS) for i in range(ROWS)]
    assert sorted(ids) == sorted(expected)  # every row, each once
    assert not [p for p in (path / "shards").iterdir() if p.name.endswith(".tmp")]
    # the seed's choice of steps covers both (a new seed must too)
    assert {s for s, _, _ in landed} == {"write", "commit"}
