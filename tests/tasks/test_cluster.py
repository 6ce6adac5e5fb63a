"""The job on a 3-node Ray cluster on 127.0.0.1; one worker node is killed mid-job.

    .venv/bin/python -m pytest -q tests/tasks/test_cluster.py

The kill point is an event, not a time: node a's worker stops when its second unit begins
(tests/tasks/kill_points.py); the other nodes' workers hold at their second unit until it has,
so node a cannot be left without work. The job cannot finish while that unit is stopped, so the
test kills node a (once the driver has committed node a's first unit) with work left, whatever
the machine's load, and the stopped unit must be redone on another node.

Every process of the cluster runs with this test's own RAY_TMPDIR, so its `ray start` address
file and sessions never meet another Ray on the machine (a session's in-process Ray, a
colleague's test), and the test stops exactly those processes, by pid, never with `ray stop`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gen_fixtures import write_config, write_tiny_models  # noqa: E402
from test_generate_kill import processes_with_env  # noqa: E402

from storage import open_dataset  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.generate.job import output_uri  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RAY = str(Path(sys.executable).parent / "ray")
NODE = re.compile(r"unit (\S+) committed \(node ([0-9a-f]+),")


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def raylet_of(env_value: str, resource: str) -> tuple[int, str]:
    """(pid, node id) of the raylet started with this custom resource in this test's cluster."""
    for pid in processes_with_env("RAY_TMPDIR", env_value):
        args = _cmdline(pid)
        if args and args[0].endswith("/raylet") and any(f"{resource},1" in a for a in args):
            node = next(m.group(1) for a in args if (m := re.search(r"--node-id=([0-9a-f]+)", a)))
            return pid, node
    raise AssertionError(f"no raylet with resource {resource}")


@pytest.mark.slow
def test_job_spreads_over_three_nodes_and_survives_losing_one(tmp_path, free_port):
    models = write_tiny_models(tmp_path / "models")
    shapes = {"kind": "shapes", "count": 12, "seed": 40, "tasks": ["t2i", "control:canny"], "size": "64x64"}
    cfg_path = write_config(tmp_path, models, {"inputs": shapes, "pairs_per_unit": 1, "workers": 3})
    uri = output_uri(load_config(cfg_path))
    ray_tmp = f"/tmp/pfc{os.getpid()}"
    port = free_port()
    stop_file = tmp_path / "node-a-stopped"
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=f"{REPO}{os.pathsep}{HERE}", RAY_DISABLE_USAGE_STATS="1",
               PF_STOP_FILE=str(stop_file), PF_HOLD_AT_UNIT="2")  # workers of the head and node b
    env.pop("RAY_ADDRESS", None)
    env_a = dict(env, PF_STOP_AT_UNIT="2")  # node a's workers: stop at their second unit
    del env_a["PF_HOLD_AT_UNIT"]
    common = ["--node-ip-address=127.0.0.1", "--object-store-memory=78643200", "--disable-usage-stats"]
    address = f"127.0.0.1:{port}"
    log = tmp_path / "job.log"
    try:
        # The head has a spare CPU, so an actor lost with its node has somewhere to restart.
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                        "--resources={\"pf_head\": 1}", *common], env=env, check=True, capture_output=True, timeout=180)
        for n in ("a", "b"):  # one after the other: a raylet must register within 30 s, even on a busy machine
            for attempt in range(2):
                r = subprocess.run([RAY, "start", f"--address={address}", "--num-cpus=1",
                                    f"--resources={{\"pf_node_{n}\": 1}}", *common], env=env_a if n == "a" else env,
                                   capture_output=True,
                                   text=True, timeout=180)
                if r.returncode == 0:
                    break
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        victim_pid, victim_node = raylet_of(ray_tmp, "pf_node_a")

        with open(log, "w") as out:
            job = subprocess.Popen([sys.executable, "-m", "kill_points", "--config", str(cfg_path)], cwd=REPO,
                                   env=dict(env, RAY_ADDRESS=address), stdout=out, stderr=subprocess.STDOUT)
            deadline = time.time() + 300
            killed_after: set[str] = set()
            while job.poll() is None and time.time() < deadline:
                units_by_node: dict[str, list[str]] = {}
                for unit, node in NODE.findall(log.read_text()):
                    units_by_node.setdefault(node, []).append(unit)
                # node a's worker is stopped in its second unit (the job cannot end before the kill)
                if not killed_after and stop_file.exists() and victim_node in units_by_node and len(units_by_node) >= 3:
                    os.kill(victim_pid, signal.SIGKILL)  # node a is gone, with its actor
                    killed_after = {u for us in units_by_node.values() for u in us}
                time.sleep(0.3)
            if job.poll() is None:  # past the deadline: stop it, and say why below
                job.kill()
            rc = job.wait()
        text = log.read_text()
        assert killed_after, ("node a never stopped in its second unit with units of all three nodes committed "
                              "(were the workers spread one per node?):\n" + text[-3000:])
        assert rc == 0, text[-3000:]
    finally:
        for pid in processes_with_env("RAY_TMPDIR", ray_tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)

    nodes = {node for _, node in NODE.findall(text)}
    assert len(nodes) == 3  # the work spread over all three nodes
    assert len(killed_after) < 12  # node a died mid-job, with units left to do
    stopped = stop_file.read_text()
    redone = [n for u, n in NODE.findall(text) if u == stopped]
    assert len(redone) == 1 and redone[0] != victim_node, redone  # redone once, by a surviving node
    summary = json.loads(text[text.rindex("\n{") + 1 :])
    assert summary["units"] == 12 and summary["rows"] == 12
    ds = open_dataset(uri, verify=True)
    ids = ds.table(["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(f"shapes-{40 + i}-{t}#0" for i, t in enumerate(["t2i", "control:canny"] * 6))
    assert len(set(ids)) == 12 and ds.manifest["status"] == "complete"
