"""Prefect flow: build the dual-panel dataset of a config (pipeline step 1).

    panelforge build-panels --config configs/tiny.yaml
    python -m flows.build_panels configs/tiny.yaml panels.source.count=32

Runs the Ray Data job of tasks/panels/job.py inside a Prefect task (retried on transient failures;
a retry resumes: committed units are skipped), then publishes a table artifact (rows per task,
rejects per reason, rows in = rows out + rejects) and a markdown artifact with a contact sheet of
sample panels, also saved as contact_sheet.png in the dataset's folder.
"""
from __future__ import annotations

import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.artifacts import contact_sheet_task, image_markdown, job_progress, units_fraction
from flows.retry import retry_transient
from tasks.panels.job import run_build
from tasks.config import Override, PipelineConfig, run_config


@task(name="build-panels-job", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def build_panels_job(cfg: PipelineConfig) -> dict:
    progress = job_progress("build-panels-progress", "panels", fraction=units_fraction, line=lambda s: (
        f"{s['units_done']}/{s['units_total']} units, {s['rows_out']} rows, {s['rejects']} rejects this run "
        f"({s['rows_per_s']:.1f} rows/s)"))
    summary = run_build(cfg, progress=progress)
    progress.finish()
    return summary


def _publish(summary: dict) -> None:
    rows = [{"kind": "task", "name": t, "rows": n} for t, n in sorted(summary["rows_per_task"].items())]
    rows += [{"kind": "reject", "name": r, "rows": n} for r, n in sorted(summary["rejects_per_reason"].items())]
    rows += [{"kind": "total", "name": "rows in", "rows": summary["rows_in"]},
             {"kind": "total", "name": "rows out", "rows": summary["rows_out"]},
             {"kind": "total", "name": "rejects", "rows": summary["rejects"]}]
    create_table_artifact(rows, key="panels-rows", description=(
        f"{summary['dataset']}: {summary['rows_in']} rows in = {summary['rows_out']} panels + "
        f"{summary['rejects']} rejects ({'balanced' if summary['balanced'] else 'NOT BALANCED'})"))
    tasks = ", ".join(f"{t} {n}" for t, n in sorted(summary["rows_per_task"].items()))
    md = [
        f"# Panels: {summary['dataset']}",
        "",
        f"Source {summary['source']}: {summary['rows_in']} rows in, {summary['rows_out']} panels, "
        f"{summary['rejects']} rejects; units {summary['units_run']} run, {summary['units_skipped']} already done.",
        "",
        f"Rows per task: {tasks or '(none)'}",
        "",
        *image_markdown("Contact sheet (upper over lower; a magenta line where the halves meet)",
                        summary["contact_sheet"]),
    ]
    create_markdown_artifact("\n".join(md), key="panels-contact-sheet", description="sample panels")


@flow(name="build-panels", log_prints=True)
def build_panels(config_path: str | None = None, overrides: list[Override] | None = None,
                 config: PipelineConfig | None = None) -> dict:
    """Build (or finish) the panels dataset; returns its summary, with the contact sheet's path.

    `config` is the typed settings of the run (what the CLI passes: validated before the flow run
    exists, shown and validated in the Prefect UI); deployments may give `config_path` and KEY=VALUE
    `overrides` instead, read once here. Either way the stage's preflight runs before Ray starts.
    """
    cfg = run_config(config, config_path, overrides, "build-panels")
    summary = build_panels_job(cfg)
    summary["contact_sheet"] = contact_sheet_task(summary["dataset"], cfg.panels.contact_sheet)
    _publish(summary)
    get_run_logger().info("panels: %d rows in = %d panels + %d rejects; contact sheet %s", summary["rows_in"],
                          summary["rows_out"], summary["rejects"], summary["contact_sheet"])
    return summary


if __name__ == "__main__":  # the CLI's subcommand: the same validation, exit status 2 on a bad config
    from flows.cli import main

    sys.exit(main(["build-panels", "--config", sys.argv[1] if len(sys.argv) > 1 else "configs/tiny.yaml", *sys.argv[2:]]))
