"""Prefect flow: generate image pairs in bulk (pipeline step 4).

    panelforge generate --config configs/tiny.yaml
    python -m flows.generate configs/tiny.yaml generate.best_of=2

Runs the resumable Ray job of tasks/generate/job.py inside a Prefect task (a retry resumes: finished
units are skipped), keeping a progress artifact up to date (done/total pairs, pairs/hour, ETA);
then publishes a contact sheet of pairs (markdown artifact, and contact_sheet.png in the
generated dataset's folder) and a table of acceptance and filter statistics.
"""
from __future__ import annotations

import json
import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.artifacts import contact_sheet_task, image_markdown, job_progress
from flows.retry import retry_transient
from tasks.config import Override, PipelineConfig, run_config
from tasks.generate.job import run_generate


def progress_line(snap: dict) -> str:
    eta = "-" if snap["eta_s"] is None else f"{snap['eta_s'] / 60:.1f} min"
    return (f"{snap['done_pairs']}/{snap['total_pairs']} pairs ({snap['done_units']}/{snap['total_units']} units), "
            f"{snap['pairs_per_hour']:.0f} pairs/hour, ETA {eta}, {snap['rejected']} rejected this run")


@task(name="generate-job", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def generate_job(cfg: PipelineConfig) -> dict:
    progress = job_progress("generate-progress", "generate", line=progress_line,
                            fraction=lambda s: s["done_pairs"] / max(s["total_pairs"], 1))
    summary = run_generate(cfg, progress=progress)
    progress.finish()
    return summary


def statistics_rows(summary: dict) -> list[dict]:
    """The acceptance and filter table: pairs asked, kept, rejected per reason, SJD acceptance."""
    rows = [
        {"statistic": "pairs requested", "value": summary["pairs"]},
        {"statistic": "pairs written", "value": summary["rows"]},
        {"statistic": "input rows rejected", "value": summary["request_summary"]["rejected_rows"]},
    ]
    rows += [{"statistic": f"rejected: {k}", "value": v} for k, v in sorted(summary["rejects"].items())]
    rows += [
        {"statistic": "acceptance rate (pairs kept / pairs generated this run)",
         "value": summary.get("kept_rate")},
        {"statistic": "samples generated this run (best-of-N)", "value": summary["samples_this_run"]},
        {"statistic": "SJD tokens per step", "value": summary["acceptance"]},
        {"statistic": "pairs/hour (this run, whole job)", "value": summary["pairs_per_hour"]},
        {"statistic": "prompts rewritten (calls, cached, failed)",
         "value": None if not summary["rewrite"] else json.dumps(summary["rewrite"])},
    ]
    return rows


@flow(name="generate", log_prints=True)
def generate(config_path: str | None = None, overrides: list[Override] | None = None,
             config: PipelineConfig | None = None) -> dict:
    """Generate (or finish generating) the pairs of a config; returns the job summary.

    `config` is the typed settings of the run (what the CLI passes: validated before the flow run
    exists, shown and validated in the Prefect UI); deployments may give `config_path` and KEY=VALUE
    `overrides` instead, read once here. Either way the stage's preflight runs before Ray starts.
    """
    cfg = run_config(config, config_path, overrides, "generate")
    summary = generate_job(cfg)
    summary["dataset"] = summary["uri"]
    summary["contact_sheet"] = contact_sheet_task(summary["uri"], cfg.generate.contact_sheet_pairs)
    create_table_artifact(statistics_rows(summary), key="generate-statistics",
                          description=f"{summary['uri']}: acceptance and filter statistics")
    md = [
        f"# Generated pairs: {summary['uri']}",
        "",
        f"{summary['rows']} pairs written of {summary['pairs']} requested; rejects {summary['rejects'] or 'none'}.",
        "",
        *image_markdown("Contact sheet (upper over lower)", summary["contact_sheet"]),
    ]
    create_markdown_artifact("\n".join(md), key="generate-contact-sheet", description="generated pairs")
    get_run_logger().info("generate: %d pairs in %s; contact sheet %s", summary["rows"], summary["uri"],
                          summary["contact_sheet"])
    return summary


if __name__ == "__main__":  # the CLI's subcommand: the same validation, exit status 2 on a bad config
    from flows.cli import main

    sys.exit(main(["generate", "--config", sys.argv[1] if len(sys.argv) > 1 else "configs/tiny.yaml", *sys.argv[2:]]))
