"""Evaluation of a generated/ dataset: control fidelity (paper Table 5) and caption agreement (issue 8).

    python -m tasks.evaluate.job --config configs/tiny.yaml [--uri out/tiny/generated] [KEY=VALUE ...]

Figures, each beside the same figure for an unconditioned floor (what chance gives):
- control:canny  canny F1 between the control map (upper panel) and canny of the generated lower
  panel (tasks/generate/verify.py canny_f1, the verifier's own); dense:canny the other way round.
- control:depth  depth RMSE (tasks/generate/verify.py depth_rmse: both maps scaled to [0, 1]) between the
  given depth map, which for shapes rows IS the scene's exact depth, and the depth of the
  generated picture. For shapes rows that depth comes from the scene's truth: the renderer
  re-draws the scene from its seed (tasks/shapes/scenes.py), the detector (tasks/shapes/detector.py) finds
  where each of the scene's colours lies in the generated picture and gives it that shape's z,
  the rest is the background plane; so the figure measures whether the shapes stand where the
  map puts them. Other rows use generate.depth_estimator when one is configured.
  dense:depth  RMSE between the generated depth map and the re-rendered scene's exact depth.
- t2i (and the lower panel of control rows)  caption agreement: the share of the shapes a caption
  asks for whose colour is present, and whose colour and kind are present (tasks/shapes/detector.py).
The floor pairs each row with the next row of the same task (rows sorted by id, cyclically; a
t2i or control row alone in its task takes the next other t2i/control row, its picture resized):
the control map or caption of one row against the picture generated for ANOTHER row, i.e. a
picture that is a plausible sample but not conditioned on this input.

The rows are scored by a Ray Data job (tasks/ray_jobs.map_units), units of evaluate.rows_per_unit
rows; only per-row figures travel back. The driver then writes report.md, the evaluation sheets
and the pairs' contact sheet next to the dataset (its folder, or its object-store prefix).
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Callable

import numpy as np

from tasks.evaluate.figures import METRICS, PAPER, RowScorer, shows_scene
from tasks.evaluate.report import write_report

log = logging.getLogger(__name__)


def output_uri(cfg) -> str:
    """The generated dataset a config evaluates (the one its generate step writes)."""
    from tasks.generate.job import output_uri as generated_uri

    return generated_uri(cfg)


def open_generated(uri: str, step: str = "evaluate"):
    """Open a GENERATED dataset (the generate step's output); any other kind is refused with the
    reason, naming the `step` that needs it."""
    from storage import open_dataset

    ds = open_dataset(uri)
    if ds.kind != "generated":
        raise ValueError(f"{uri}: a {ds.kind} dataset; {step} needs a generated dataset (the generate step's output)")
    return ds


# ---------------------------------------------------------------------------------------------
# The job


def partners(ids: list[str], tasks: list[str]) -> list[int | None]:
    """For each row, the row whose picture gives its floor: the next row of the same task (by id,
    cyclic); a row alone in its task whose picture shows a scene (t2i, control:*) takes the next
    other such row; None when there is none."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    groups: dict[str, list[int]] = defaultdict(list)
    for i in order:
        groups[tasks[i]].append(i)
    scenes = [i for i in order if shows_scene(tasks[i])]
    out: list[int | None] = [None] * len(ids)
    for members in groups.values():
        for k, i in enumerate(members):
            if len(members) > 1:
                out[i] = members[(k + 1) % len(members)]
            elif shows_scene(tasks[i]) and len(scenes) > 1:
                out[i] = scenes[(scenes.index(i) + 1) % len(scenes)]
    return out


def make_units(n_rows: int, partner: list[int | None], per_unit: int) -> list[dict]:
    if per_unit < 1:
        raise ValueError(f"evaluate.rows_per_unit {per_unit}: must be >= 1")
    return [{"unit": f"e{k:05d}", "rows": list(range(s, min(s + per_unit, n_rows))),
             "partners": [partner[i] for i in range(s, min(s + per_unit, n_rows))]}
            for k, s in enumerate(range(0, n_rows, per_unit))]


class EvaluateWorker:
    """Ray actor: scores one unit of rows (reads them and their partners from the dataset)."""

    def __init__(self, uri: str, cfg: dict):
        import cv2

        from storage import open_dataset
        from tasks.config import PipelineConfig
        from tasks.plugins import load_estimator_factory

        cv2.setNumThreads(1)  # the job's parallelism is the workers
        config = PipelineConfig.model_validate(cfg)
        self.ds = open_dataset(uri)
        estimator = (load_estimator_factory(config.generate.depth_estimator)(config)
                     if config.generate.depth_estimator else None)
        self.scorer = RowScorer(config.evaluate.model_dump(), estimator)

    def __call__(self, unit: dict) -> dict:
        t0 = time.perf_counter()
        wanted = sorted(set(unit["rows"]) | {p for p in unit["partners"] if p is not None})
        table = self.ds.take(wanted)
        rows = dict(zip(wanted, table.to_pylist()))
        records, errors = [], []
        for i, p in zip(unit["rows"], unit["partners"]):
            try:
                records += self.scorer(rows[i], rows[p] if p is not None else None)
            except Exception as e:  # noqa: BLE001 - one undecodable row is reported, not the job's end
                errors.append({"id": rows[i]["id"], "error": f"{type(e).__name__}: {e}"})
        return {"unit": unit["unit"], "records": records, "errors": errors, "seconds": time.perf_counter() - t0}


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n)); no error for one value."""
    x = np.asarray(values, dtype=np.float64)
    return float(x.mean()), (float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None)


def summarize(records: list[dict]) -> list[dict]:
    """One table row per (metric, task): mean of the generated figure and of the floor, each with
    its standard error (how far the mean would move on another draw of as many rows)."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["metric"], r["task"])].append(r)
    order = list(METRICS)
    table = []
    for (metric, task), rs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        floors = [r["floor"] for r in rs if r["floor"] is not None]
        value, se = mean_se([r["value"] for r in rs])
        floor, floor_se = mean_se(floors) if floors else (None, None)
        table.append({
            "figure": metric, "task": task, "rows": len(rs),
            "generated": round(value, 4), "se": _round(se),
            "floor": _round(floor), "floor_se": _round(floor_se),
            "better": METRICS[metric][1], "paper": PAPER.get((metric, task), ""),
        })
    return table


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def run_evaluate(cfg, uri: str | None = None, use_ray: bool = True,
                 progress: Callable[[dict], None] | None = None) -> dict:
    """Score every row of a generated dataset; write report.md and the sheets next to it.

    Returns a small summary: the table, the paths of report.md, the contact sheet and the
    evaluation sheets. use_ray=False runs the same units in this process, one after another.
    """
    t0 = time.perf_counter()
    uri = uri or output_uri(cfg)
    ds = open_generated(uri)
    index = ds.table(columns=["id", "task"])
    ids, tasks = index.column("id").to_pylist(), index.column("task").to_pylist()
    partner = partners(ids, tasks)
    units = make_units(len(ids), partner, cfg.evaluate.rows_per_unit)
    log.info("evaluate: %d rows of %s in %d units", len(ids), uri, len(units))

    def results():
        if not use_ray:
            worker = EvaluateWorker(uri, cfg.model_dump())
            for u in units:
                yield worker(u)
            return
        from tasks.ray_jobs import map_units, ray_started

        with ray_started(cfg.ray):
            yield from map_units(units, EvaluateWorker, actor_args=(uri, cfg.model_dump()),
                                 num_workers=cfg.evaluate.workers)

    records, errors, done = [], [], 0
    for res in results():
        records += res["records"]
        errors += res["errors"]
        done += 1
        log.info("evaluate: unit %s done (%d/%d), %d figures", res["unit"], done, len(units), len(records))
        if progress:
            progress({"units_done": done, "units_total": len(units), "records": len(records)})
    for e in errors:
        log.warning("evaluate: row %s could not be scored: %s", e["id"], e["error"])
    table = summarize(records)
    files = write_report(uri, ds, table, records, cfg, errors=len(errors))
    return {"uri": uri, "rows": len(ids), "rows_per_task": ds.rows_per_task(), "table": table,
            "errors": errors, "seconds": round(time.perf_counter() - t0, 2), **files}


def main() -> None:
    import argparse

    from tasks.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--uri", default=None, help="the generated dataset (default: the config's generate output)")
    ap.add_argument("--no-ray", action="store_true", help="score the rows in this process")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    summary = run_evaluate(load_config(args.config, args.overrides), args.uri, use_ray=not args.no_ray)
    for r in summary["table"]:
        print(f"{r['figure']:15s} {r['task']:14s} rows {r['rows']:4d}  generated {r['generated']:.4f} "
              f"+- {'-' if r['se'] is None else format(r['se'], '.4f')}  "
              f"floor {'-' if r['floor'] is None else format(r['floor'], '.4f')}  ({r['better']} is better)")
    print(f"report: {summary['report']}\ncontact sheet: {summary['contact_sheet']}")


if __name__ == "__main__":
    main()
