"""Running map-style work units on Ray Data, in-process or on a cluster.

    python -c "from tasks.ray_jobs import ray_started; import ray
with ray_started(): print(ray.cluster_resources())"

A job lists deterministic work units (small dicts), and `map_units` runs an actor class over
them on a Ray Data actor pool: one actor per worker loads its model once, each call handles one
unit (reads its inputs, writes its shard with storage.write_shard) and returns a small dict.
Results stream back to the driver as units finish, so the driver can commit them to the
manifest and report progress; the data itself never travels through the driver.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

log = logging.getLogger(__name__)


LOOPBACK = "127.0.0.1"


@contextmanager
def ray_started(cfg: Any = None) -> Iterator[None]:
    """Use the running Ray (a test session's, a job's), else start one: local or cfg.address.

    `cfg` is a tasks.config.RayConfig (or None for the defaults). RAY_ADDRESS in the environment
    also selects a cluster. Ray started here is shut down on exit.

    Ray runs with token authentication (RAY_AUTH_MODE=token) unless the environment says
    otherwise: a cluster's token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token (docs/deployments.md); Ray started in-process gets a fresh token of its own
    (start_local_ray) and every port it opens is on 127.0.0.1.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if cfg is None:
        from tasks.config import RayConfig

        cfg = RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        use_token_auth()
        # A head kept on loopback (docs/deployments.md): without _loopback_node Ray would dial
        # the host's address instead, where nothing listens.
        on_loopback = address.rsplit(":", 1)[0].strip("[]") in ("127.0.0.1", "localhost", "::1")
        with _loopback_node() if on_loopback else nullcontext():
            ray.init(address=address, log_to_driver=True)
        log.info("connected to the Ray cluster at %s", address)
        restore = None
    else:
        restore = start_local_ray(
            num_cpus=cfg.num_cpus,
            include_dashboard=cfg.include_dashboard,
            object_store_memory=cfg.object_store_mb * 2**20,
        )
        log.info("started Ray in-process with %s CPUs on %s", cfg.num_cpus, LOOPBACK)
    try:
        yield
    finally:
        ray.shutdown()
        if restore:
            restore()


def use_token_auth() -> bool:
    """Turn on Ray's token authentication for this process and its children (RAY_AUTH_MODE=token)
    unless the environment already chose a mode; True when it is on.

    Ray reads the mode once per process, so a process that touched Ray's config before this
    call is told to read it again.
    """
    from ray._raylet import AuthenticationMode, Config, get_authentication_mode

    mode = os.environ.setdefault("RAY_AUTH_MODE", "token").lower()
    if mode == "token" and get_authentication_mode() != AuthenticationMode.TOKEN:
        Config.initialize("")
    if mode != "token":
        log.warning("RAY_AUTH_MODE=%s: Ray runs without authentication; anyone who reaches its "
                    "ports can run code as this user (docs/deployments.md)", mode)
    return mode == "token"


@contextmanager
def _loopback_node() -> Iterator[None]:
    """While this lasts, Ray keeps 127.0.0.1 as this node's (and a bootstrap address's) IP.

    Ray 2.60 replaces a loopback address given to ray.init (`_node_ip_address="127.0.0.1"`,
    `address="127.0.0.1:6379"`) by the host's address (services.resolve_ip_for_localhost), and
    then a node it starts listens on all interfaces. Its own switch for "local Ray only"
    (ray_constants.ENABLE_RAY_CLUSTER, which the RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER variable sets
    when ray is first imported) turns that off. It is put back afterwards, so that
    `ray start --address` in a child process of this one still works.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def start_local_ray(**init_kwargs: Any):
    """ray.init() for a single-node Ray in this process, every listener on 127.0.0.1, with a token.

    Returns a callable that puts back what this changed in os.environ (call it after
    ray.shutdown()). With the node's address kept at 127.0.0.1 (_loopback_node), the GCS, the
    raylet, the agents, the autoscaler monitor and every worker bind their ports there (Ray binds
    all interfaces for any other node address). A node started here cannot be joined by other
    machines: a cluster is started with `ray start` (docs/deployments.md).
    """
    import secrets

    import ray
    from ray._raylet import AuthenticationTokenLoader

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "GLOO_SOCKET_IFNAME")}

    def restore() -> None:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        AuthenticationTokenLoader.instance().reset_cache()

    if use_token_auth() and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        # A token for this instance only, in the environment its processes inherit (readable by
        # this user alone, /proc/<pid>/environ), instead of Ray's default of writing one to
        # ~/.ray/auth_token with the umask's permissions.
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
        AuthenticationTokenLoader.instance().reset_cache()
    # The workers inherit this: gloo (Ray Train's CPU process groups) then listens on loopback
    # instead of the address the host name resolves to.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    init_kwargs.setdefault("dashboard_host", LOOPBACK)
    init_kwargs.setdefault("log_to_driver", True)
    try:
        with _loopback_node():
            ray.init(_node_ip_address=LOOPBACK, **init_kwargs)
    except BaseException:
        restore()
        raise
    node_ip = ray._private.worker._global_node.node_ip_address
    if node_ip != LOOPBACK:
        ray.shutdown()
        restore()
        raise RuntimeError(f"Ray started on {node_ip}, not {LOOPBACK}: its ports would be open to the "
                           "network. Set ray.address to a cluster started as docs/deployments.md says.")
    return restore


class _UnitRunner:
    """Adapts a user actor (unit dict -> result dict) to Ray Data batches of JSON strings."""

    def __init__(self, actor_cls: type, args: tuple, kwargs: dict):
        self.actor = actor_cls(*args, **kwargs)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        results = [json.dumps(self.actor(json.loads(u)), default=str) for u in batch["unit"]]
        return {"result": np.array(results, dtype=object)}


def map_units(
    units: Sequence[dict],
    actor_cls: type,
    actor_args: tuple = (),
    actor_kwargs: dict | None = None,
    num_workers: int = 2,
    num_gpus: float = 0,
    num_cpus: float = 1,
    ray_remote_args: dict | None = None,
) -> Iterator[dict]:
    """Run actor_cls(*args, **kwargs)(unit) for each unit on a pool; yield results as they finish.

    Units and results are JSON-able dicts. Ray Data restarts actors that die and retries their
    unit, so unit handlers must be idempotent (write_shard is: same unit, same files).
    ray_remote_args (e.g. {"resources": {...}}) go to the actors as they are.
    """
    if not units:
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    items = [{"unit": json.dumps(u, default=str)} for u in units]
    workers = max(1, min(num_workers, len(items)))
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _UnitRunner,
        fn_constructor_args=(actor_cls, tuple(actor_args), dict(actor_kwargs or {})),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        **(ray_remote_args or {}),
    )
    for row in dataset.iter_rows():
        yield json.loads(row["result"])
