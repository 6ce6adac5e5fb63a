"""Which failures can heal by themselves: a lost node, a dead actor, a reset connection, a timeout.

    python -c "from tasks.failures import is_transient; print(is_transient(ConnectionResetError()))"

The flows' job tasks retry only these (flows/retry.py); a job that reruns its remaining units
after a failure can ask the same question. A config, permission, missing-bucket or bad-input
error is the same on every try.
"""
from __future__ import annotations


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
