"""Two evaluated runs side by side: is the new one better, worse, or within noise, figure by figure?

    panelforge compare out/a/generated --vs out/b/generated
    panelforge compare runA-seed2000 runA-seed3000 --vs runB-seed2000 runB-seed3000 --json cmp.json

Each side is one or more generated datasets that `panelforge evaluate` has scored (it writes every
row's figures to figures.jsonl beside report.md). For each (figure, task) the rows both sides
scored (same id: the same input, e.g. the same generate.inputs seed) are compared pair by pair:
the mean difference NEW - BASE and its standard error sd(d)/sqrt(n). Pairing takes away the part of
the spread that comes from the inputs (some scenes are harder than others), so it separates two
runs on fewer rows than comparing their means. Where the two sides share no row the means are
compared unpaired (Welch's error, sqrt(var_a/n_a + var_b/n_b)).

A figure is called better or worse when the difference is at least `--sigmas` (default 2)
standard errors in the direction the figure prefers; otherwise "within noise". With a dozen
figures at 2 errors, about one in twenty such calls is chance: read the whole table, not one line.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict

# Only the standard library at import: flows/cli.py builds `panelforge compare`'s parser from
# add_arguments() for every command, so numpy, OpenCV and the figures load when a comparison runs.


def load_figures(uri: str) -> list[dict]:
    """The per-row figures an evaluation wrote beside a generated dataset."""
    import pyarrow.fs as pafs

    from storage import resolve
    from tasks.evaluate.report import FIGURES

    loc = resolve(uri)
    path = loc.join(FIGURES)
    if loc.fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(
            f"{loc.display(FIGURES)}: not found; run `panelforge evaluate` on {uri} first "
            "(evaluations before figures.jsonl existed wrote only report.md)")
    with loc.fs.open_input_stream(path) as f:
        data = f.read()
    out = []
    for n, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.append({"id": str(rec["id"]), "task": str(rec["task"]), "metric": str(rec["metric"]),
                        "value": float(rec["value"])})
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{loc.display(FIGURES)} line {n}: not a figure record ({type(e).__name__}: {e})") from None
    return out


def _side(uris: list[str]) -> dict[tuple[str, str], dict[str, float]]:
    """(metric, task) -> {row id: value} over one side's datasets; a row scored twice is an error."""
    out: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for uri in uris:
        for r in load_figures(uri):
            group = out[(r["metric"], r["task"])]
            if r["id"] in group:
                raise ValueError(f"row {r['id']} ({r['metric']}) appears twice on one side (again in {uri}): "
                                 "give each evaluated dataset once, and datasets of different inputs")
            group[r["id"]] = r["value"]
    return out


def compare(base: list[str], new: list[str], sigmas: float = 2.0) -> list[dict]:
    """One row per (figure, task) that both sides have: means, NEW - BASE, its error and a verdict."""
    from tasks.evaluate.figures import METRICS
    from tasks.evaluate.job import mean_se

    if sigmas <= 0:
        raise ValueError(f"sigmas {sigmas}: must be > 0")
    a, b = _side(base), _side(new)
    order = list(METRICS)
    rows = []
    for key in sorted(set(a) & set(b), key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[1])):
        metric, task = key
        shared = sorted(set(a[key]) & set(b[key]))
        (mean_a, se_a), (mean_b, se_b) = mean_se(list(a[key].values())), mean_se(list(b[key].values()))
        if len(shared) > 1:
            diff, se = mean_se([b[key][i] - a[key][i] for i in shared])
        else:
            diff = mean_b - mean_a
            se = None if se_a is None or se_b is None else math.sqrt(se_a ** 2 + se_b ** 2)
        better = METRICS.get(metric, ("", "higher"))[1]
        sign = 1 if better == "higher" else -1
        if not se:
            verdict = "same" if diff == 0 else "too few rows"
        elif sign * diff >= sigmas * se:
            verdict = "better"
        elif sign * diff <= -sigmas * se:
            verdict = "worse"
        else:
            verdict = "within noise"
        rows.append({"figure": metric, "task": task, "rows_base": len(a[key]), "rows_new": len(b[key]),
                     "paired": len(shared) if len(shared) > 1 else 0,
                     "base": round(mean_a, 4), "new": round(mean_b, 4),
                     "diff": round(diff, 4), "se": None if se is None else round(se, 4),
                     "better": better, "verdict": verdict})
    if not rows:
        raise ValueError("the two sides share no figure of any task: are they evaluations of the same kind of rows?")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'figure':15s} {'task':14s} {'rows':>9s} {'base':>7s} {'new':>7s} {'new-base':>9s} {'± se':>7s}  verdict"]
    for r in rows:
        n = f"{r['paired']}p" if r["paired"] else f"{r['rows_base']}/{r['rows_new']}"
        se = "-" if r["se"] is None else f"{r['se']:.4f}"
        lines.append(f"{r['figure']:15s} {r['task']:14s} {n:>9s} {r['base']:7.4f} {r['new']:7.4f} "
                     f"{r['diff']:+9.4f} {se:>7s}  {r['verdict']} ({r['better']} is better)")
    return "\n".join(lines)


def add_arguments(ap) -> None:
    """The command's arguments (this module's CLI and `panelforge compare` share them)."""
    ap.add_argument("base", nargs="+", help="the evaluated generated dataset(s) of the base run")
    ap.add_argument("--vs", nargs="+", required=True, metavar="NEW", help="the evaluated generated dataset(s) of the new run")
    ap.add_argument("--sigmas", type=float, default=2.0, help="standard errors a difference needs to count (default 2)")
    ap.add_argument("--json", metavar="PATH", help="also save the table as JSON")


def run(args) -> int:
    """The command: the table printed (and saved with --json); a bad input is one line on stderr and
    exit status 2."""
    import sys

    try:
        rows = compare(args.base, args.vs, args.sigmas)
    except (FileNotFoundError, ValueError) as e:
        print(f"panelforge: error: {e}", file=sys.stderr)
        return 2
    if args.json:  # saved before printing, so a reader that stops early (`| head`) loses nothing
        with open(args.json, "w") as f:
            json.dump({"base": args.base, "new": args.vs, "sigmas": args.sigmas, "rows": rows}, f, indent=1)
            f.write("\n")
    print(format_table(rows))
    if args.json:
        print(f"saved {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tasks.evaluate.compare", description=__doc__.splitlines()[0])
    add_arguments(ap)
    from tasks import quiet_broken_pipe

    return quiet_broken_pipe(run, ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
