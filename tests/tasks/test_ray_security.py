"""Ray as the project starts it: every listener on loopback, and a client without the token refused.

    .venv/bin/python -m pytest -q tests/tasks/test_ray_security.py

The listeners come from /proc: every process in this test process's tree (the session's Ray
from tasks.ray_jobs.start_local_ray: GCS, raylet, agents, monitor, Ray Data and Ray Train
workers), each socket inode it holds matched against its network namespace's TCP tables. The
one documented exception (docs/deployments.md, "What listens where") is torch.distributed's
rendezvous store in rank 0 of a Ray Train job, which torch binds to all interfaces.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tasks.ray_jobs import LOOPBACK, map_units

REPO = Path(__file__).resolve().parents[2]


def process_tree(root: int) -> list[int]:
    """root and all its descendants (from each process's parent pid in /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _tcp_listeners_by_inode(pid: int) -> dict[int, tuple[str, int]]:
    """Listening TCP sockets of pid's network namespace: inode -> (address, port)."""
    found = {}
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_addr, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found[int(fields[9])] = (socket.inet_ntop(family, raw), int(hex_port, 16))
    return found


def tcp_listeners(root: int) -> list[dict]:
    """Every TCP listener held by a process of root's tree: pid, command, address, port."""
    out = []
    for pid in process_tree(root):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        inodes = set()
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
        table = _tcp_listeners_by_inode(pid)
        out += [{"pid": pid, "command": command[:120], "address": table[i][0], "port": table[i][1]}
                for i in inodes if i in table]
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class ListenersSeen:
    """A Ray Data actor that reports the listeners of the whole tree while the pool is up."""

    def __init__(self, driver_pid: int):
        self.driver_pid = driver_pid

    def __call__(self, unit: dict) -> dict:
        return {"unit": unit["i"], "pid": os.getpid(), "listeners": tcp_listeners(self.driver_pid)}


def _train_loop(config: dict) -> None:
    import torch
    import torch.distributed as dist

    total = torch.ones(1)
    dist.all_reduce(total)  # gloo's pairs are connected now
    if dist.get_rank() == 0:
        Path(config["out"]).write_text(json.dumps({
            "sum": total.item(), "master_port": int(os.environ["MASTER_PORT"]), "pid": os.getpid(),
            "listeners": tcp_listeners(config["driver_pid"])}))
    dist.barrier()


@pytest.mark.slow
def test_a_ray_data_and_a_ray_train_job_listen_only_on_loopback(ray_local, tmp_path):
    from ray._raylet import AuthenticationMode, get_authentication_mode
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    node = ray_local._private.worker._global_node
    assert node.node_ip_address == LOOPBACK
    assert get_authentication_mode() == AuthenticationMode.TOKEN
    driver = os.getpid()

    results = list(map_units([{"i": i} for i in range(4)], ListenersSeen, actor_args=(driver,), num_workers=2))
    data_seen = [entry for r in results for entry in r["listeners"]]
    assert {r["pid"] for r in results} and all(r["pid"] != driver for r in results)

    out = tmp_path / "train.json"
    TorchTrainer(_train_loop, train_loop_config={"out": str(out), "driver_pid": driver},
                 torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray-train"), name="listeners")).fit()
    train = json.loads(out.read_text())
    assert train["sum"] == 2.0  # the two ranks talked over gloo

    seen = data_seen + train["listeners"] + tcp_listeners(driver)
    # Not a vacuous check: the GCS, the raylet and the workers' servers were all seen.
    gcs_port = int(node.gcs_address.rsplit(":", 1)[1])
    assert any(e["port"] == gcs_port and "gcs_server" in e["command"] for e in seen), seen
    assert any("raylet" in e["command"] for e in seen) and any("RayTrainWorker" in e["command"] for e in seen)
    assert len({e["pid"] for e in seen}) >= 6, seen

    # torch.distributed's TCPStore (rank 0, MASTER_PORT): all interfaces in torch 2.13, documented.
    exempt = {(train["pid"], train["master_port"])}
    open_to_the_network = [e for e in seen if not is_loopback(e["address"]) and (e["pid"], e["port"]) not in exempt]
    assert not open_to_the_network, json.dumps(open_to_the_network, indent=1)
    # gloo's own listeners (each rank's pairs) are on loopback too
    gloo = [e for e in train["listeners"] if "RayTrainWorker" in e["command"] and (e["pid"], e["port"]) not in exempt]
    assert gloo and all(is_loopback(e["address"]) for e in gloo)


_CLIENT = textwrap.dedent("""
    import sys
    from ray._raylet import GcsClient
    client = GcsClient(address=sys.argv[1])
    print("keys:", len(client.internal_kv_keys(b"", None, timeout=30)))
""")


def _gcs_client(gcs_address: str, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", _CLIENT, gcs_address], env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_client_without_the_token_is_refused(ray_local, tmp_path):
    gcs = ray_local._private.worker._global_node.gcs_address
    assert gcs.startswith(f"{LOOPBACK}:")
    home = str(tmp_path)  # no ~/.ray/auth_token to fall back on

    wrong = _gcs_client(gcs, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32, RAY_AUTH_TOKEN_PATH=None, HOME=home)
    assert wrong.returncode != 0 and "InvalidAuthToken" in wrong.stderr, wrong.stderr[-2000:]
    none = _gcs_client(gcs, RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN=None, RAY_AUTH_TOKEN_PATH=None, HOME=home)
    assert none.returncode != 0 and "InvalidAuthToken" in none.stderr, none.stderr[-2000:]
    # The same client with the session's token gets in: the refusals above are about the token.
    right = _gcs_client(gcs, HOME=home)
    assert right.returncode == 0 and right.stdout.startswith("keys:"), right.stderr[-2000:]


def test_ray_started_in_process_makes_its_own_token_and_leaves_no_trace(tmp_path):
    """tasks.ray_jobs.ray_started, as a flow run uses it, in a fresh process without any token."""
    code = textwrap.dedent("""
        import json, os
        from ray._raylet import AuthenticationMode, get_authentication_mode
        from tasks.config import RayConfig
        from tasks.ray_jobs import ray_started
        import ray
        with ray_started(RayConfig(num_cpus=1, object_store_mb=80)):
            inside = {"node": ray._private.worker._global_node.node_ip_address,
                      "token": bool(os.environ.get("RAY_AUTH_TOKEN")),
                      "token_mode": get_authentication_mode() == AuthenticationMode.TOKEN,
                      "sum": ray.get(ray.remote(lambda: 1 + 1).remote())}
        print(json.dumps({"inside": inside, "after": [k for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE",
              "GLOO_SOCKET_IFNAME") if k in os.environ]}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "GLOO_"))}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["inside"] == {"node": LOOPBACK, "token": True, "token_mode": True, "sum": 2}
    assert report["after"] == []  # the instance's token left with it
    assert not (tmp_path / ".ray" / "auth_token").exists()  # and never touched ~/.ray
