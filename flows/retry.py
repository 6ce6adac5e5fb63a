"""Which failures a flow's job task retries: only those that can heal by themselves.

    @task(retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)

A lost node, a dead actor, a reset connection or a timeout may be gone on the next try (and a
retry resumes: committed work units are skipped). A config, permission, missing-bucket or
bad-input error is the same on every try: the task fails at once with its message instead of
repeating it after minutes of retries.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from ray import exceptions as rx
    except ImportError:  # Ray absent: nothing of Ray's can fail
        return tuple(types)
    for name in ("NodeDiedError", "ActorDiedError", "ActorUnavailableError", "RaySystemError", "WorkerCrashedError",
                 "ObjectLostError", "OwnerDiedError", "ObjectFetchTimedOutError", "GetTimeoutError",
                 "LocalRayletDiedError"):
        if isinstance(getattr(rx, name, None), type):
            types.append(getattr(rx, name))
    return tuple(types)


def is_transient(exc: BaseException | None) -> bool:
    """Whether an error (or one that caused it: Ray wraps a worker's error in a RayTaskError whose
    `cause` is the original) is of a kind that can heal by itself."""
    transient = _transient_types()
    seen: set[int] = set()
    while isinstance(exc, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, transient):
            return True
        # Explicit causes only: an error raised while handling a transient one (its __context__)
        # is an error of its own, e.g. a ConfigError raised on a failed connection.
        exc = getattr(exc, "cause", None) or exc.__cause__
    return False


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
