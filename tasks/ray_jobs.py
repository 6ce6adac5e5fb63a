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
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


@contextmanager
def ray_started(cfg: Any = None) -> Iterator[None]:
    """Use the running Ray (a test session's, a job's), else start one: local or cfg.address.

    `cfg` is a tasks.config.RayConfig (or None for the defaults). RAY_ADDRESS in the environment
    also selects a cluster. Ray started here is shut down on exit.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if cfg is None:
        from tasks.config import RayConfig

        cfg = RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("connected to the Ray cluster at %s", address)
    else:
        ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=cfg.include_dashboard,
            object_store_memory=cfg.object_store_mb * 2**20,
            log_to_driver=True,
        )
        log.info("started Ray in-process with %s CPUs", cfg.num_cpus)
    try:
        yield
    finally:
        ray.shutdown()


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
