"""map_units runs an actor pool over work units and streams results back."""
from __future__ import annotations

import os

from tasks.ray_jobs import map_units, ray_started


class Square:
    def __init__(self, offset: int):
        self.offset = offset
        self.pid = os.getpid()

    def __call__(self, unit: dict) -> dict:
        return {"unit": unit["i"], "value": unit["i"] ** 2 + self.offset, "pid": self.pid}


def test_map_units_on_an_actor_pool(ray_local):
    with ray_started():  # reuses the session's Ray
        results = list(map_units([{"i": i} for i in range(8)], Square, actor_args=(1,), num_workers=2))
    assert sorted(r["unit"] for r in results) == list(range(8))
    assert all(r["value"] == r["unit"] ** 2 + 1 for r in results)
    assert all(r["pid"] != os.getpid() for r in results)  # ran in actors, not the driver
    assert list(map_units([], Square)) == []
