"""A writer killed with SIGKILL at random points: after a rerun, every row exactly once.

Each round starts a writer process on the same dataset, kills it after a random delay, and
checks that what is visible is consistent (the manifest parses, every listed shard verifies).
A final run completes the dataset, which must hold exactly the expected rows, each once.
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from storage import open_dataset

UNITS = 30
ROWS = 400
LENGTH = 400  # ~640 KB a shard, so kills land inside writes as well as between them

WRITER = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from helpers import token_rows
from storage import DatasetWriter
token_rows(0, 2)  # warm pyarrow up so the kill window covers the writes
w = DatasetWriter(sys.argv[1], "tokens", config={{"rows_per_unit": {ROWS}}})
print("ready", flush=True)
for u in range({UNITS}):
    unit = f"{{u:05d}}"
    if unit not in w.done_units:
        w.write_unit(unit, token_rows(u, {ROWS}, {LENGTH}))
        print("unit", flush=True)
w.finalize()
print("done", flush=True)
"""


def _start(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigkill_at_random_points_then_rerun(tmp_path):
    path = tmp_path / "ds"
    rng = random.Random(1234)
    kills, progress = 0, []
    while kills < 24:
        done = len(open_dataset(path).manifest["units"]) if (path / "manifest.json").exists() else 0
        proc = _start(path)
        # Let the writer commit a random number of units, then kill it at a random moment
        # inside the next one (one unit's write time, measured as it runs).
        wait_units = rng.randrange(0, 4) if done < UNITS - 4 else 0
        t = time.perf_counter()
        unit_time = 0.02
        for _ in range(wait_units):
            assert proc.stdout.readline().strip() == "unit"
            unit_time, t = time.perf_counter() - t, time.perf_counter()
        time.sleep(rng.uniform(0, 1.5 * unit_time))
        if proc.poll() is not None:  # finished before the kill: start over on a new dataset
            path = tmp_path / f"ds{kills}"
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        ds = open_dataset(path)  # the visible state is always consistent
        ds.verify()
        ids = ds.table(columns=["id"]).column("id").to_pylist()
        assert len(ids) == len(set(ids)) == len(ds.manifest["units"]) * ROWS
        progress.append(len(ds.manifest["units"]))

    proc = _start(path)
    out, _ = proc.communicate(timeout=120)
    assert out.strip().endswith("done") and proc.returncode == 0
    ds = open_dataset(path, verify=True)
    assert ds.manifest["status"] == "complete"
    ids = ds.table(columns=["id"]).column("id").to_pylist()
    expected = [f"u{u:03d}-r{i:03d}" for u in range(UNITS) for i in range(ROWS)]
    assert sorted(ids) == sorted(expected)  # every row, each once
    assert not [p for p in (path / "shards").iterdir() if p.name.endswith(".tmp")]
    assert kills >= 20 and len(set(progress)) > 3, progress  # kills landed at many points
