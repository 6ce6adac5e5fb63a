"""Kill test: the job SIGKILLed mid-way (driver, its Ray and actors), rerun: every pair exactly once.

    .venv/bin/python -m pytest -q tests/tasks/test_generate_kill.py

The kill point is an event: the job's one worker stops when its fourth unit begins
(tests/tasks/kill_points.py) and says so in a file; once the driver has committed two units
(Ray Data hands a result to the driver when the next one is ready, so two or three), the test
kills the job, with five units left whatever the machine's load.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gen_fixtures import write_config, write_tiny_models  # noqa: E402

from storage import StorageError, open_dataset  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.generate.job import output_uri, run_generate  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def processes_with_env(key: str, value: str) -> list[int]:
    """Pids whose environment holds key=value: the processes this test started, and only those."""
    pids, needle = [], f"{key}={value}".encode()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if needle in Path(f"/proc/{d}/environ").read_bytes().split(b"\0"):
                    pids.append(int(d))
            except OSError:
                continue
    return pids


def committed_units(uri: str) -> list[str]:
    try:
        return [u for u in open_dataset(uri, check=False).manifest["units"] if u.startswith("g")]
    except StorageError:  # not created yet
        return []


@pytest.mark.slow
def test_killed_job_rerun_gives_every_pair_exactly_once(tmp_path, ray_local):
    models = write_tiny_models(tmp_path / "models")
    shapes = {"kind": "shapes", "count": 8, "seed": 11, "tasks": ["t2i", "control:canny"], "size": "64x64"}
    cfg_path = write_config(tmp_path, models, {"inputs": shapes, "pairs_per_unit": 1}, ray={"num_cpus": 1})
    cfg = load_config(cfg_path)
    uri = output_uri(cfg)
    ray_tmp = f"/tmp/pfk{os.getpid()}"  # the child's own Ray temp root: its Ray is private to it
    stop_file = tmp_path / "stopped"
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=f"{REPO}{os.pathsep}{HERE}", PF_STOP_FILE=str(stop_file),
               PF_STOP_AT_UNIT="4")
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "kill_points", "--config", str(cfg_path)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        # the worker is stopped in its fourth unit, and the driver has committed two of the first three
        while not (stop_file.exists() and len(committed_units(uri)) >= 2) and time.time() < deadline:
            assert proc.poll() is None, "the job ended before its kill point: " + (tmp_path / "job.log").read_text()[-2000:]
            time.sleep(0.1)
        assert time.time() < deadline, "the job never reached its kill point: " + (tmp_path / "job.log").read_text()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every process of its session
        proc.wait(timeout=30)
    finally:
        for pid in processes_with_env("RAY_TMPDIR", ray_tmp):  # anything that escaped the group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    done_before = committed_units(uri)
    assert len(done_before) in (2, 3)  # the fourth unit was stopped before it could be written
    before = open_dataset(uri).manifest
    assert before["status"] == "writing"
    sha_before = {e["unit"]: e["xxh3_128"] for e in before["shards"]}

    summary = run_generate(cfg)  # the rerun (in this process's Ray)
    assert summary["units_this_run"] == 8 - len(done_before)
    ds = open_dataset(uri, verify=True)
    ids = ds.table(["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(f"shapes-{11 + i}-{t}#0" for i, t in enumerate(["t2i", "control:canny"] * 4))
    assert len(ids) == len(set(ids)) == 8 and ds.manifest["status"] == "complete"
    # the units finished before the kill were not redone: their shard entries are unchanged
    shards = {e["unit"]: e["xxh3_128"] for e in ds.manifest["shards"]}
    assert all(shards[u] == sha_before[u] for u in done_before)
