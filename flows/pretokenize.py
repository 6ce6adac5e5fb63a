"""Prefect flow: pre-tokenize the panels of a config into tokens/ (pipeline step 2).

    python -m flows.pretokenize configs/tiny.yaml
    python -m flows.pretokenize configs/tiny.yaml tokenize.workers=1 tokenize.rows_per_unit=32

Runs the Ray Data job of tasks/tokenize/job.py inside a Prefect task (retried on transient failures;
a retry resumes: committed units are skipped), then publishes a table artifact (samples and
tokens per resolution bucket, rejects per reason) and a markdown artifact with the throughput and
where the actors spent their time (decoding panels, encoding, writing shards).
"""
from __future__ import annotations

import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.artifacts import job_progress, units_fraction
from flows.retry import retry_transient
from tasks.config import Override, PipelineConfig, run_config
from tasks.tokenize.job import run_tokenize


@task(name="pretokenize-job", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def pretokenize_job(cfg: PipelineConfig) -> dict:
    progress = job_progress("pretokenize-progress", "tokens", fraction=units_fraction, line=lambda s: (
        f"{s['units_done']}/{s['units_total']} units, {s['rows_out']} rows, {s['rejects']} rejects this run "
        f"({s['rows_per_s']:.2f} rows/s)"))
    summary = run_tokenize(cfg, progress=progress)
    progress.finish()
    return summary


def _publish(summary: dict) -> None:
    rows = [{"bucket": b["bucket"], "samples": b["samples"], "tokens": b["tokens"], "mean_len": b["mean_len"],
             "max_len": b["max_len"]} for b in summary["buckets"]]
    rows.append({"bucket": "total", "samples": summary["rows_out"], "tokens": summary["tokens"], "mean_len": None,
                 "max_len": None})
    rows += [{"bucket": f"reject: {r}", "samples": n, "tokens": None, "mean_len": None, "max_len": None}
             for r, n in sorted(summary["rejects_per_reason"].items())]
    create_table_artifact(rows, key="tokens-per-bucket", description=(
        f"{summary['dataset']}: {summary['rows_in']} panels = {summary['rows_out']} samples + "
        f"{summary['rejects']} rejects; layout {summary['fingerprint']}"))
    t = summary["throughput"]
    busy = t["decode_s"] + t["encode_s"] + t["write_s"]
    share = (lambda x: f"{100 * x / busy:.0f}%") if busy else (lambda x: "-")
    md = [
        f"# Tokens: {summary['dataset']}",
        "",
        f"{summary['rows_out']} samples, {summary['tokens']} tokens, {summary['rejects']} rejects; units "
        f"{summary['units_run']} run, {summary['units_skipped']} already done; {summary['seconds']} s.",
        "",
        f"Throughput this run: {t['rows_per_s']} samples/s, {t['tokens_per_s']} tokens/s.",
        "",
        "| stage (actor seconds, summed) | seconds | share |",
        "| --- | --- | --- |",
        *(f"| {k} | {t[k + '_s']} | {share(t[k + '_s'])} |" for k in ("decode", "encode", "write")),
    ]
    create_markdown_artifact("\n".join(md), key="tokens-throughput", description="pre-tokenization throughput")


@flow(name="pretokenize", log_prints=True)
def pretokenize(config_path: str | None = None, overrides: list[Override] | None = None,
                config: PipelineConfig | None = None) -> dict:
    """Tokenize (or finish tokenizing) the panels dataset; returns the summary.

    `config` is the typed settings of the run (what the CLI passes: validated before the flow run
    exists, shown and validated in the Prefect UI); deployments may give `config_path` and KEY=VALUE
    `overrides` instead, read once here. Either way the stage's preflight runs before Ray starts.
    """
    summary = pretokenize_job(run_config(config, config_path, overrides, "pretokenize"))
    _publish(summary)
    get_run_logger().info("tokens: %d panels = %d samples + %d rejects, %d tokens, layout %s", summary["rows_in"],
                          summary["rows_out"], summary["rejects"], summary["tokens"], summary["fingerprint"])
    return summary


if __name__ == "__main__":  # the CLI's subcommand: the same validation, exit status 2 on a bad config
    from flows.cli import main

    sys.exit(main(["pretokenize", "--config", sys.argv[1] if len(sys.argv) > 1 else "configs/tiny.yaml", *sys.argv[2:]]))
