"""Prefect flow: train the decoder stage by stage on tokens/ (pipeline step 3; docs/train.md).

    python -m flows.train configs/tiny.yaml
    python -m flows.train configs/tiny.yaml train.workers=0     # in this process, without Ray

Checks the whole plan before any compute (tasks/train/job.py: layout fingerprint, context length,
stages without data, checkpoints of another preset), then runs each stage as its own Prefect
task, each a Ray Train job. A stage that finished (its summary.json exists) returns at once
when the flow is rerun; a stage that was interrupted resumes from its newest checkpoint.
Publishes a table artifact (one row per stage) and a markdown artifact with the loss curve.
"""
from __future__ import annotations

import base64
import sys

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.config import Override, PipelineConfig, run_config
from tasks.train.job import plan_training, read_run_file, stage_done, train as run_train


@task(name="train-stage", task_run_name="train {name}")
def train_stage(cfg: PipelineConfig, index: int, name: str) -> dict:
    summary = run_train(cfg, stages=[index])
    stage = summary["stages"][-1]
    get_run_logger().info("%s: %s, final loss %.4f, %.0f tokens/s, MFU %.3f -> %s", name,
                          "ran" if summary["ran"] else "already done", stage["final_loss"], stage["tokens_per_s"],
                          stage["mfu"], stage["export"])
    return {**stage, "ran": bool(summary["ran"]), "run_dir": summary["run_dir"]}


def _publish(run_dir: str, stages: list[dict]) -> None:
    create_table_artifact(
        [{"stage": s["stage"], "steps": s["steps"], "final_loss": round(s["final_loss"], 4),
          "tokens_per_s": round(s["tokens_per_s"]), "mfu": round(s["mfu"], 4), "ran_now": s["ran"],
          "export": s["export"]} for s in stages],
        key="train-stages", description=f"{run_dir}: one row per stage")
    png = read_run_file(run_dir, "loss.png")  # the run folder may be on an object store
    if png is not None:
        data = base64.b64encode(png).decode()
        create_markdown_artifact(
            f"# Loss curve: {run_dir}\n\n![loss curve](data:image/png;base64,{data})\n\n"
            f"TensorBoard: `tensorboard --logdir {run_dir}/tb`", key="train-loss-curve",
            description="cross-entropy on the image tokens per optimizer step, stages in order")


@flow(name="train", log_prints=True)
def train(config_path: str | None = None, overrides: list[Override] | None = None,
          config: PipelineConfig | None = None) -> dict:
    """Run (or finish) every stage of the config's training; returns the run's summary.

    `config` is the typed settings of the run (what the CLI passes: validated before the flow run
    exists, shown and validated in the Prefect UI); deployments may give `config_path` and KEY=VALUE
    `overrides` instead, read once here. Either way the stage's preflight runs before Ray starts.
    """
    cfg = run_config(config, config_path, overrides, "train")
    plan = plan_training(cfg)  # every bad-input error before any compute
    stages = [train_stage(cfg, s.index, s.name) for s in plan.stages]
    _publish(plan.run_dir, stages)
    summary = {"run_dir": plan.run_dir, "stages": stages, "final_loss": stages[-1]["final_loss"],
               "export": stages[-1]["export"], "loss_curve": f"{plan.run_dir}/loss.png",
               "ran": [s["stage"] for s in stages if s["ran"]],
               "done": [s.name for s in plan.stages if stage_done(plan.run_dir, s.name)]}
    get_run_logger().info("train: %d stages, final loss %.4f, export %s", len(stages), summary["final_loss"],
                          summary["export"])
    return summary


if __name__ == "__main__":  # the CLI's subcommand: the same validation, exit status 2 on a bad config
    from flows.cli import main

    sys.exit(main(["train", "--config", sys.argv[1] if len(sys.argv) > 1 else "configs/tiny.yaml", *sys.argv[2:]]))
