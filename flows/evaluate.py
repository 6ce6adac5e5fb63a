"""Prefect flow: evaluate a generated dataset (pipeline step 5, issue 8).

    panelforge evaluate --config configs/tiny.yaml
    python -m flows.evaluate configs/tiny.yaml [KEY=VALUE ...]

Scores every generated pair with the Ray job of tasks/evaluate/job.py (control fidelity in the style
of the paper's Table 5, caption agreement on shapes, each beside an unconditioned floor), then
publishes the figures as a table artifact and report.md (with its sheets) as a markdown
artifact; report.md and the PNGs are written next to the generated dataset.
"""
from __future__ import annotations

import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.artifacts import image_markdown, job_progress, units_fraction
from flows.retry import retry_transient
from storage.uri import has_credentials
from tasks.config import ConfigError, Override, PathOrURI, PipelineConfig, run_config
from tasks.evaluate.job import run_evaluate


@task(name="evaluate-job", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def evaluate_job(cfg: PipelineConfig, generated_uri: str | None) -> dict:
    progress = job_progress("evaluate-progress", "evaluate", fraction=units_fraction,
                            line=lambda s: f"{s['units_done']}/{s['units_total']} units, {s['records']} figures")
    summary = run_evaluate(cfg, generated_uri, progress=progress)
    progress.finish()
    return summary


def _publish(summary: dict) -> None:
    create_table_artifact(summary["table"], key="evaluate-figures", description=(
        f"{summary['uri']}: each figure beside its unconditioned floor ({summary['rows']} rows)"))
    md = [f"# Evaluation: {summary['uri']}", "",
          "| figure | task | rows | generated | ± se | floor | better |", "|---|---|---:|---:|---:|---:|---|"]
    md += [f"| {r['figure']} | {r['task']} | {r['rows']} | {r['generated']} | {r['se']} | {r['floor']} | {r['better']} |"
           for r in summary["table"]]
    md += ["", f"Report: `{summary['report']}`", ""]
    for name, path in [("contact sheet", summary["contact_sheet"]), *summary["sheets"].items()]:
        md += image_markdown(name, path)
    create_markdown_artifact("\n".join(md), key="evaluate-report", description="evaluation report")


@flow(name="evaluate", log_prints=True)
def evaluate(config_path: str | None = None, overrides: list[Override] | None = None,
             generated_uri: PathOrURI | None = None, config: PipelineConfig | None = None) -> dict:
    """Evaluate the config's generated dataset (or `generated_uri`); returns the figures and the
    paths of report.md ("report") and the contact sheet ("contact_sheet").

    `config` is the typed settings of the run (what the CLI passes: validated before the flow run
    exists, shown and validated in the Prefect UI); deployments may give `config_path` and KEY=VALUE
    `overrides` instead, read once here. Either way the stage's preflight runs before Ray starts.
    """
    if generated_uri and has_credentials(generated_uri):
        raise ConfigError("generated_uri: a URI with credentials in it (user:secret@); put keys in the environment")
    cfg = run_config(config, config_path, overrides, "evaluate")  # a bad config fails here, before Ray starts
    summary = evaluate_job(cfg, generated_uri)
    _publish(summary)
    logger = get_run_logger()
    for r in summary["table"]:
        logger.info("evaluate: %s %s: %s +- %s (floor %s, %s is better)", r["figure"], r["task"], r["generated"],
                    r["se"], r["floor"], r["better"])
    logger.info("evaluate: report %s; contact sheet %s", summary["report"], summary["contact_sheet"])
    return summary


if __name__ == "__main__":  # the CLI's subcommand: the same validation, exit status 2 on a bad config
    from flows.cli import main

    sys.exit(main(["evaluate", "--config", sys.argv[1] if len(sys.argv) > 1 else "configs/tiny.yaml", *sys.argv[2:]]))
