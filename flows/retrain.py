"""Prefect flow: the whole pipeline end to end (the main job, and `make demo`).

    panelforge retrain --config configs/tiny.yaml
    panelforge demo                       # the same with configs/tiny.yaml
    python -m flows.retrain configs/tiny.yaml train.stages.0.steps=5

build panels -> pre-tokenize -> train every stage -> generate pairs with the last stage's
export -> evaluate them. Each step is a subflow over resumable datasets and checkpoints, so a
rerun after a crash redoes nothing that finished: committed work units are skipped, finished
training stages are skipped and an interrupted one resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.build_panels import build_panels
from flows.evaluate import evaluate
from flows.generate import generate
from flows.pretokenize import pretokenize
from flows.train import train
from tasks.config import Override, PipelineConfig, run_config
from tasks.ray_jobs import ray_started


@flow(name="retrain", log_prints=True)
def retrain(config_path: str | None = None, overrides: list[Override] | None = None,
            config: PipelineConfig | None = None) -> dict:
    """Run (or finish) every step of the pipeline for one config; returns where the outputs are.

    `config` is the typed settings of the run (what the CLI passes); deployments may give
    `config_path` and KEY=VALUE `overrides` instead. The config is read once, here, checked for
    every step, and the same settings go to every step: an edit of the YAML mid-run changes nothing.
    """
    cfg = run_config(config, config_path, overrides, "retrain")
    log = get_run_logger()
    t0 = time.time()
    timings: dict[str, float] = {}

    def step(name: str, fn, *args, **kwargs):
        t = time.time()
        out = fn(*args, **kwargs)
        timings[name] = round(time.time() - t, 1)
        log.info("retrain: %s done in %.0f s", name, timings[name])
        return out

    with ray_started(cfg.ray):  # one Ray for every step's job, not one start per job
        panels = step("build-panels", build_panels, config=cfg)
        tokens = step("pretokenize", pretokenize, config=cfg)
        trained = step("train", train, config=cfg)
        # Generation and evaluation use the model this run just trained.
        with_model = cfg.model_copy(update={
            "models": cfg.models.model_copy(update={"decoder_path": trained["export"]})})
        generated = step("generate", generate, config=with_model)
        evaluation = step("evaluate", evaluate, config=with_model, generated_uri=generated["uri"])

    summary = {
        "config": cfg._source,
        "overrides": cfg._overrides,
        "panels": panels["dataset"],
        "panels_contact_sheet": panels["contact_sheet"],
        "tokens": tokens.get("dataset") or tokens.get("uri"),
        "checkpoint": trained["export"],
        "loss_curve": trained["loss_curve"],
        "final_loss": trained["final_loss"],
        "generated": generated["uri"],
        "pairs": generated["rows"],
        "figures": evaluation.get("table"),
        "contact_sheet": evaluation["contact_sheet"],
        "report": evaluation["report"],
        "seconds": round(time.time() - t0, 1),
        "step_seconds": timings,
    }
    if "://" not in cfg.workdir:
        out = Path(cfg.workdir) / "retrain.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        summary["summary_file"] = str(out)
    create_markdown_artifact(
        "\n".join([
            f"# Retrain: {cfg.name}",
            "",
            f"- panels: `{summary['panels']}` (contact sheet `{summary['panels_contact_sheet']}`)",
            f"- tokens: `{summary['tokens']}`",
            f"- checkpoint: `{summary['checkpoint']}` (final loss {summary['final_loss']:.4f}; "
            f"loss curve `{summary['loss_curve']}`)",
            f"- generated: `{summary['generated']}` ({summary['pairs']} pairs)",
            f"- report: `{summary['report']}`; contact sheet `{summary['contact_sheet']}`",
            f"- time: {summary['seconds']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})",
        ]),
        key="retrain-summary",
        description="where the outputs of this run are",
    )
    log.info("retrain: finished in %.0f s; contact sheet %s; report %s", summary["seconds"],
             summary["contact_sheet"], summary["report"])
    return summary


if __name__ == "__main__":  # the CLI's subcommand: the same validation, exit status 2 on a bad config
    from flows.cli import main

    sys.exit(main(["retrain", "--config", sys.argv[1] if len(sys.argv) > 1 else "configs/tiny.yaml", *sys.argv[2:]]))
