"""Session-wide fixtures: one small in-process Ray and one Prefect test harness per session.

    .venv/bin/python -m pytest -q
"""
from __future__ import annotations

import os
import secrets
import socket

# Before anything imports prefect, ray or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Ray with token authentication, as the project runs it: one token for the session, shared by
# its in-process Ray and the clusters that tests start with `ray start` (they inherit it).
os.environ.setdefault("RAY_AUTH_MODE", "token")
if not os.environ.get("RAY_AUTH_TOKEN_PATH"):
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def free_port():
    """A function that returns a port free on 127.0.0.1 right now, for a server a test starts itself."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray for the whole session (ENVIRONMENT.md: small object store, no dashboard),
    started as the flows start theirs: on 127.0.0.1, with token authentication."""
    import ray

    from tasks.ray_jobs import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20)
    yield ray
    # Shut down at the end of the session only (pytest_sessionfinish below).


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One Prefect test harness (a temporary database and API) for the whole session."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
