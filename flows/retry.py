"""Which failures a flow's job task retries: only those that can heal by themselves.

    @task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)

A lost node, a dead actor, a reset connection or a timeout may be gone on the next try (and a
retry resumes: committed work units are skipped). A config, permission, missing-bucket or
bad-input error is the same on every try: the task fails at once with its message instead of
repeating it after minutes of retries.
"""
from __future__ import annotations

import logging

from tasks.failures import is_transient

log = logging.getLogger(__name__)


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry the task only when its failure is transient."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the state carries no result to read: decide on what reading it raised
        exc = e
    retry = isinstance(exc, BaseException) and is_transient(exc)
    if not retry:
        log.info("%s: not retried (%s is not a transient failure)", task_run.name, type(exc).__name__)
    return retry
