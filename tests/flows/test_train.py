"""The train flow: each stage a Prefect task, artifacts with the loss curve, a rerun that
skips finished stages, and bad input refused before any task runs.

    .venv/bin/python -m pytest -q tests/flows/test_train.py
"""
from __future__ import annotations

from pathlib import Path

import pytest

from train_fixtures import STAGES, tiny_config, write_tokens  # noqa: E402

from model.layout import Layout  # noqa: E402


@pytest.mark.slow
def test_train_flow_runs_stages_as_tasks_and_skips_them_on_rerun(tmp_path, prefect_harness):
    from prefect.artifacts import Artifact

    from flows.train import train

    # workers=0: the same loop in the flow's process (the Ray Train path: tests/tasks/test_train.py).
    cfg = tiny_config(tmp_path, workers=0, stages=STAGES[:2])
    write_tokens(tmp_path / "tokens", Layout.shapes())
    first = train(str(cfg))
    assert first["ran"] == ["stage-1", "stage-2"] and first["done"] == ["stage-1", "stage-2"]
    assert [len(s["losses"]) for s in first["stages"]] == [6, 6]
    assert Path(first["export"], "config.json").is_file() and Path(first["loss_curve"]).stat().st_size > 1000
    md = Artifact.get("train-loss-curve")
    assert md is not None and "data:image/png;base64," in md.data
    table = Artifact.get("train-stages")
    assert table is not None and "stage-2" in str(table.data)

    summary = Path(first["run_dir"], "stage-2", "summary.json")
    mtime = summary.stat().st_mtime_ns
    again = train(str(cfg))
    assert again["ran"] == [] and again["final_loss"] == first["final_loss"]
    assert summary.stat().st_mtime_ns == mtime


def test_train_flow_refuses_bad_input_before_any_stage(tmp_path, prefect_harness):
    from flows.train import train
    from tasks.train.job import TrainError

    cfg = tiny_config(tmp_path, workers=0)
    layout = Layout.shapes()
    write_tokens(tmp_path / "tokens", layout, meta={**layout.meta(), "fingerprint": "ffffffffffffffff"})
    with pytest.raises(TrainError, match="tokens made with layout ffffffffffffffff"):
        train(str(cfg))
    assert not (tmp_path / "runs" / "t" / "stage-1").exists()
