"""The registry of scorers and depth estimators that a config may name (generate.scorer,
generate.depth_estimator): the project's own names plus entry points of installed packages.

    python -m tasks.plugins          # lists every name a config may use, and where each comes from

A config never names code to import: `package.module:factory` is refused by the config's
validation (tasks/config.py). A package adds a scorer or an estimator by declaring an entry point,
which the operator chose to install:

    [project.entry-points."panelforge.scorers"]
    clip_score = "mypkg.scorers:clip_factory"          # factory(cfg) -> Scorer (tasks/generate/verify.py)

    [project.entry-points."panelforge.depth_estimators"]
    depth_anything = "mypkg.depth:factory"             # factory(cfg) -> fn(uint8 image) -> depth
"""
from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from collections.abc import Callable

SCORER_GROUP = "panelforge.scorers"
ESTIMATOR_GROUP = "panelforge.depth_estimators"

# The project's own scorers (tasks/generate/verify.py): "auto" is canny F1, plus depth RMSE when an
# estimator is configured; "none" turns verification off.
BUILTIN_SCORERS = ("auto", "none", "canny_f1", "depth_rmse")
BUILTIN_ESTIMATORS: tuple[str, ...] = ()  # none ship: depth models are large and local (docs/bulk.md)


def _declared(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def scorer_names() -> list[str]:
    """Every name generate.scorer may list (comma-separated): built-ins, then entry points."""
    return [*BUILTIN_SCORERS, *sorted(set(_declared(SCORER_GROUP)) - set(BUILTIN_SCORERS))]


def estimator_names() -> list[str]:
    """Every name generate.depth_estimator may take."""
    return [*BUILTIN_ESTIMATORS, *sorted(set(_declared(ESTIMATOR_GROUP)) - set(BUILTIN_ESTIMATORS))]


def _unknown(what: str, field: str, name: str, known: list[str], group: str) -> str:
    hint = "" if ":" not in name else " (a config names no code to import)"
    return (f"{field}: {name!r} is not a registered {what}{hint}; known: {', '.join(known) or '(none)'}; "
            f"an installed package adds one with an entry point in the {group!r} group")


def scorer_problem(value: str) -> str | None:
    """Why generate.scorer cannot be used, or None."""
    names = [s.strip() for s in str(value).split(",") if s.strip()]
    if not names:
        return "generate.scorer: empty; use 'auto', 'none' or a registered scorer name"
    known = scorer_names()
    for name in names:
        if name not in known:
            return _unknown("scorer", "generate.scorer", name, known, SCORER_GROUP)
    return None


def estimator_problem(value: str | None) -> str | None:
    """Why generate.depth_estimator cannot be used, or None."""
    if value is None:
        return None
    known = estimator_names()
    if value not in known:
        return _unknown("depth estimator", "generate.depth_estimator", value, known, ESTIMATOR_GROUP)
    return None


def load_scorer_factory(name: str) -> Callable:
    """The factory of a scorer declared by an installed package (factory(cfg) -> Scorer)."""
    ep = _declared(SCORER_GROUP).get(name)
    if ep is None:
        raise ValueError(_unknown("scorer", "generate.scorer", name, scorer_names(), SCORER_GROUP))
    return ep.load()


def load_estimator_factory(name: str) -> Callable:
    """The factory of a depth estimator declared by an installed package (factory(cfg) -> fn)."""
    ep = _declared(ESTIMATOR_GROUP).get(name)
    if ep is None:
        raise ValueError(_unknown("depth estimator", "generate.depth_estimator", name, estimator_names(),
                                  ESTIMATOR_GROUP))
    return ep.load()


def main() -> None:
    for title, group, builtins in (("scorers", SCORER_GROUP, BUILTIN_SCORERS),
                                   ("depth estimators", ESTIMATOR_GROUP, BUILTIN_ESTIMATORS)):
        print(f"{title} ({group}):")
        for name in builtins:
            print(f"  {name:<20} built in")
        for name, ep in sorted(_declared(group).items()):
            print(f"  {name:<20} {ep.value} ({ep.dist.name if ep.dist else 'entry point'})")


if __name__ == "__main__":
    main()
