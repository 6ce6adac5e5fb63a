"""Retry only what can heal: pytest -q tests/flows/test_retry.py

A transient failure (a lost node, a dead actor, a reset connection, a timeout) is retried by the
job tasks; a config, permission, missing-bucket or bad-input error fails at once, on the first
try, with its own message.
"""
from __future__ import annotations

import pytest
from ray import exceptions as rx

from tasks.failures import is_transient
from storage import DatasetNotFoundError, UnsupportedURIError
from tasks.config import ConfigError


def _caused(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize("exc", [
    rx.NodeDiedError("node 10.0.0.2 died"),
    rx.ActorDiedError(),
    rx.RaySystemError("raylet connection lost"),
    rx.WorkerCrashedError(),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("read timed out"),
    _caused(RuntimeError("Ray Data job failed"), rx.NodeDiedError("lost")),  # wrapped by a caller
    rx.RayTaskError("f", "tb", ConnectionResetError("reset")).as_instanceof_cause(),  # a worker's error
], ids=lambda e: type(e).__name__)
def test_transient_failures_are_retried(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", [
    ConfigError("tiny.yaml: generate.best_of: Input should be greater than or equal to 1"),
    PermissionError(13, "Permission denied", "/data/out"),
    FileNotFoundError(2, "No such file", "/models/movqgan.safetensors"),
    OSError("Bucket 'nope' not found"),
    UnsupportedURIError("s3 URI with credentials in it"),
    DatasetNotFoundError("no manifest"),
    KeyError("best_of"),
    ValueError("bad row"),
    rx.RayTaskError("f", "tb", ValueError("bad input")).as_instanceof_cause(),
], ids=lambda e: type(e).__name__)
def test_permanent_failures_are_not(exc):
    assert not is_transient(exc)


def test_an_error_raised_while_handling_a_transient_one_is_not_transient():
    try:
        try:
            raise ConnectionResetError("reset")
        except ConnectionResetError:
            raise ConfigError("workdir: bucket 'x' does not exist")  # from inside the handler: the point of the test
    except ConfigError as e:
        assert e.__context__ is not None and not is_transient(e)


def test_job_task_retries_transient_and_fails_permanent_at_once(prefect_harness):
    """A real Prefect task with the job tasks' policy (2 retries): a reset connection is retried
    and the task succeeds; a config error runs once and fails with its own message."""
    from prefect import flow, task

    from flows.retry import retry_transient

    calls = {"transient": 0, "permanent": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def flaky() -> str:
        calls["transient"] += 1
        if calls["transient"] == 1:
            raise ConnectionResetError(104, "Connection reset by peer")
        return "done"

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def misconfigured() -> str:
        calls["permanent"] += 1
        raise ConfigError("tiny.yaml: models.movqgan_path: /m.safetensors does not exist")

    @flow
    def job() -> str:
        return flaky()

    @flow
    def bad_job() -> str:
        return misconfigured()

    assert job() == "done" and calls["transient"] == 2
    with pytest.raises(ConfigError, match="models.movqgan_path"):
        bad_job()
    assert calls["permanent"] == 1
