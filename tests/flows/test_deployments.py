"""prefect.yaml against a real Prefect server and a Ray head on 127.0.0.1, as docs/deployments.md runs it.

    .venv/bin/python -m pytest -q tests/flows/test_deployments.py

Starts both (each with its own home/temp folder under a tmp dir; the Ray head with token
authentication, a token file of this test's own, and every listener on 127.0.0.1), creates the
process work pool, deploys build-panels and the nightly schedule example from prefect.yaml, waits
for the server's scheduler to create the nightly deployment's scheduled run, runs build-panels
through `prefect worker start --run-once` with RAY_ADDRESS pointing at the head, checks the run's
state through the server's API, the dataset it wrote and the head's listeners, then stops both by
pid. PREFECT_API_URL is set for the subprocesses only: this test session keeps its
prefect_test_harness.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
from test_ray_security import is_loopback, tcp_listeners  # noqa: E402

BIN = Path(sys.executable).parent
FLOW_FILES = {"build-panels", "build-panels-nightly", "pretokenize", "train", "generate", "evaluate", "retrain"}


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               RAY_AUTH_MODE="token", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT), **extra)
    return env


def _run(args: list[str], env: dict, timeout: float = 120) -> str:
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{out[-4000:]}"
    return out


def _api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=10) as r:
        data = r.read()
    return json.loads(data) if data else None


def _wait_for(what: str, probe, server: subprocess.Popen, log: Path, limit: float):
    """probe() until it returns something truthy, while the server lives; at most `limit` s."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        assert server.poll() is None, f"prefect server exited:\n{log.read_text()[-3000:]}"
        found = probe()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what}: nothing after {limit}s; server log:\n{log.read_text()[-4000:]}")


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, limit: float = 90) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        assert server.poll() is None, f"prefect server exited:\n{log.read_text()[-3000:]}"
        try:
            _api(url, "/health")
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {limit}s:\n{log.read_text()[-3000:]}")


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line names `marker` (this test's own Ray temp folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _stop_ray(temp_dir: str) -> None:
    """Stop only the Ray head this test started (`ray stop` would stop every Ray of the user)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = _pids_using(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while _pids_using(temp_dir) and time.monotonic() < end:
            time.sleep(0.2)


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_prefect_yaml_has_a_deployment_per_flow_with_its_parameters():
    """Every deployment points at a flow function that exists and accepts its parameters."""
    import importlib
    import inspect

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == FLOW_FILES
    nightly = deployments["build-panels-nightly"]["schedules"]
    assert nightly[0]["cron"] == "0 2 * * *"
    for name, d in deployments.items():
        assert d["work_pool"]["name"] == "local-pool"
        path, func = d["entrypoint"].split(":")
        assert path == f"flows/{path.split('/')[1]}" and path.endswith(".py")
        if name == "retrain" and not (ROOT / path).is_file():
            continue  # lands with the retrain flow (issue 8, lead)
        flow = getattr(importlib.import_module(path[:-3].replace("/", ".")), func)
        assert hasattr(flow, "deploy"), f"{d['entrypoint']} is not a Prefect flow"
        assert set(d["parameters"]) <= set(inspect.signature(flow.fn).parameters), name


@pytest.mark.slow
def test_deploy_and_run_through_a_worker_on_a_server_and_a_ray_head(tmp_path, free_port):
    short = tempfile.mkdtemp(prefix="pfr")  # Ray's socket paths must stay short
    prefect_home, work = tmp_path / "prefect-home", tmp_path / "work"
    api_port, ray_port = free_port(), free_port()
    url = f"http://127.0.0.1:{api_port}/api"
    # The cluster's token, as an operator hands it out (docs/deployments.md): a file only its user reads.
    token = tmp_path / "ray_auth_token"
    token.write_text(secrets.token_hex(16))
    token.chmod(0o600)
    env = _env(PREFECT_HOME=str(prefect_home), PREFECT_API_URL=url)
    server_log = tmp_path / "server.log"
    server = None
    try:
        with open(server_log, "w") as log:
            # The scheduler's loop shortened from 60 s, so the scheduled run shows up within the test.
            server = subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(api_port)],
                cwd=tmp_path, env=dict(env, PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2"), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        # A single-node head kept on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray would otherwise
        # replace 127.0.0.1 by the host's address), with token authentication.
        _run([str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ray_port),
              "--num-cpus", "1", "--include-dashboard=false", "--object-store-memory", "100000000",
              "--temp-dir", short, "--disable-usage-stats"],
             _env(RAY_AUTH_TOKEN_PATH=str(token), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"), timeout=90)
        _wait_healthy(url, server, server_log)

        _run([str(BIN / "prefect"), "work-pool", "create", "local-pool", "--type", "process"], env)
        out = _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "build-panels",
                    "--name", "build-panels-nightly"], env, timeout=180)
        assert "build-panels/build-panels" in out

        nightly = _api(url, "/deployments/name/build-panels/build-panels-nightly")
        assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
        # The server's scheduler creates the nightly runs (it failed on every loop with SQLAlchemy
        # 2.1: constraints.txt pins sqlalchemy<2.1).
        scheduled = _wait_for("the nightly deployment's scheduled runs", lambda: _api(url, "/flow_runs/filter", {
            "flow_runs": {"deployment_id": {"any_": [nightly["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}},
            "sort": "EXPECTED_START_TIME_ASC"}), server, server_log, limit=120)
        first = dt.datetime.fromisoformat(scheduled[0]["expected_start_time"].replace("Z", "+00:00"))
        now = dt.datetime.now(dt.timezone.utc)
        assert (first.hour, first.minute, first.second) == (2, 0, 0) and now < first <= now + dt.timedelta(days=1)
        assert scheduled[0]["parameters"] == nightly["parameters"] and scheduled[0]["auto_scheduled"]
        # Paused again (which drops its scheduled runs), so the worker below runs only build-panels.
        _api(url, f"/deployments/{nightly['id']}/pause_deployment", {})
        deployment = _api(url, "/deployments/name/build-panels/build-panels")
        assert deployment["work_pool_name"] == "local-pool"
        assert deployment["parameters"] == {"config_path": "configs/tiny.yaml", "overrides": []}

        overrides = [f"workdir={work}", "panels.source.count=6", "panels.rows_per_unit=3", "panels.workers=1",
                     "panels.stage_size=64", "panels.contact_sheet=4"]
        out = _run([str(BIN / "prefect"), "deployment", "run", "build-panels/build-panels",
                    "-p", "overrides=" + json.dumps(overrides)], env)
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
        worker = subprocess.run(
            [str(BIN / "prefect"), "worker", "start", "--pool", "local-pool", "--run-once"],
            cwd=ROOT, env=_env(PREFECT_HOME=str(prefect_home), PREFECT_API_URL=url,
                               RAY_ADDRESS=f"127.0.0.1:{ray_port}", RAY_AUTH_TOKEN_PATH=str(token)),
            capture_output=True, text=True, timeout=240)
        logs = worker.stdout + worker.stderr
        flow_run = _api(url, f"/flow_runs/{run_id}")
        assert flow_run["parameters"]["overrides"] == overrides
        state = flow_run["state"]
        assert state["type"] == "COMPLETED", f"flow run {state['type']}: {state.get('message')}\n{logs[-5000:]}"
        # Ray's own line: the flow run joined this head instead of starting Ray in its process.
        assert "Connecting to existing Ray cluster at address:" in logs and f":{ray_port}..." in logs, logs[-5000:]

        from storage import open_dataset

        ds = open_dataset(work / "panels", verify=True)
        assert len(ds) == 6 and ds.manifest["status"] == "complete"
        assert (work / "panels" / "contact_sheet.png").is_file()

        # Every listener of the head (GCS, raylet, agents, the workers that ran the job) on loopback.
        listeners = [e for root in _pids_using(short) for e in tcp_listeners(root)]
        assert any(e["port"] == ray_port and "gcs_server" in e["command"] for e in listeners), listeners
        assert not [e for e in listeners if not is_loopback(e["address"])], listeners
    finally:
        if server is not None:
            _stop_group(server)
        _stop_ray(short)
        assert not _pids_using(short), "a Ray process of this test is still running"
        shutil.rmtree(short, ignore_errors=True)
