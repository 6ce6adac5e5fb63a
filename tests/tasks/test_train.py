"""Staged training: bad input refused before compute, the bucket schedule, and a real 3-stage
Ray Train run (2 CPU workers, gloo) against the golden loss curve, killed in stage 2 and resumed.

    .venv/bin/python -m pytest -q tests/tasks/test_train.py
    PANELFORGE_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/tasks/test_train.py -k golden   # rewrite it
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import MOVQGAN_RECORD, STAGES, TINY, tiny_config, tokens_table, write_tokens  # noqa: E402

from model.layout import Layout  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.train import (StageSchedule, TrainError, bucket_index, draw_loss_curve, plan_training,  # noqa: E402
                         rank_index, train)

GOLDEN = Path(__file__).parents[1] / "golden" / "train_tiny_3stage.txt"


@pytest.fixture(scope="module")
def layout():
    return Layout.shapes()


def make(tmp_path, layout, sizes=None, meta=None, **train_kw):
    cfg = load_config(tiny_config(tmp_path, **train_kw))
    kw = {} if sizes is None else {"sizes": sizes}
    write_tokens(tmp_path / "tokens", layout, meta=meta, **kw)
    return cfg


# --- bad input: a clear error before any compute -------------------------------------------------

def test_dataset_of_another_layout(tmp_path, layout):
    cfg = make(tmp_path, layout, meta={**layout.meta(), "fingerprint": "0123456789abcdef"})
    with pytest.raises(TrainError, match=r"manifest.json: tokens made with layout 0123456789abcdef.*pretokenize"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


def test_sequence_longer_than_context(tmp_path, layout):
    cfg = make(tmp_path, layout, model_overrides={**TINY, "max_seq_len": 200})
    with pytest.raises(TrainError, match=r"row '128x128-0' \(bucket 128x128\) has \d+ tokens, more than the model's "
                                         r"context of 200.*never truncated"):
        train(cfg)


def test_stage_without_data(tmp_path, layout):
    cfg = make(tmp_path, layout, sizes={"64x64": 24, "160x64": 8})
    with pytest.raises(TrainError, match=r"train.stages\[1\] \(stage-2\): no rows .* fall in its buckets "
                                         r"\['64x128', '96x96', '128x64'\]"):
        train(cfg)


def test_stage_too_small_for_a_global_batch(tmp_path, layout):
    cfg = make(tmp_path, layout, sizes={"64x64": 24, "96x96": 6, "128x128": 16})
    with pytest.raises(TrainError, match=r"stage-2.*each of 2 workers needs 4 rows of one bucket"):
        train(cfg)


def test_checkpoint_of_another_preset(tmp_path, layout):
    import torch

    from model.decoder import Decoder, ModelArgs
    from model.hf_checkpoint import save_decoder

    cfg = make(tmp_path, layout)
    other = Decoder(ModelArgs.from_name("tiny", vocab_size=layout.vocab_size, **{**TINY, "dim": 32}))
    save_decoder(other, tmp_path / "other", {"preset": "tiny"}, dtype=torch.float32)
    with pytest.raises(TrainError, match=r"other: a checkpoint of another architecture \(differs in \['dim'\]"):
        train(load_config(tiny_config(tmp_path, init_from=str(tmp_path / "other"))))
    # A run folder whose checkpoints are of another architecture.
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"preset": "2b", "args": {"dim": 2048}, "layout_fingerprint": "x"}))
    with pytest.raises(TrainError, match=r"run.json: this run's checkpoints are of preset '2b'.*another train.run"):
        train(cfg)


def test_batch_that_does_not_divide(tmp_path, layout):
    cfg = make(tmp_path, layout)
    cfg.train.stages[0].global_batch = 6
    with pytest.raises(TrainError, match=r"global_batch 6 is not a multiple of micro_batch 2 x 2 workers"):
        plan_training(cfg)


# --- the schedule -------------------------------------------------------------------------------

def test_each_step_draws_one_bucket_on_every_rank(tmp_path, layout):
    from storage import open_dataset

    make(tmp_path, layout)
    ds = open_dataset(tmp_path / "tokens")
    buckets = ["64x64", "160x64"]
    row_buckets = ds.table(columns=["bucket"]).column("bucket").to_pylist()
    b_of, r_of = bucket_index(row_buckets, buckets), rank_index(ds, 2)
    sched = StageSchedule(b_of, r_of, 2, world=2, per_rank=4, seed=0, stage=0)
    assert sched.steps_per_epoch == 3 + 1  # 24 rows of 64x64 = 12 per rank; 8 of 160x64 = 4 per rank
    seen = []
    for step in range(sched.steps_per_epoch):
        picks = [sched.rows_for(step, r) for r in range(2)]
        assert picks[0][0] == picks[1][0]  # one bucket for the whole global batch
        for r, (b, rows) in enumerate(picks):
            assert len(rows) == 4 and {row_buckets[i] for i in rows} == {buckets[b]}
            assert set(rows) <= set(ds.partition(r, 2))
            seen += rows
    assert len(seen) == len(set(seen)) == 32  # an epoch uses every row once
    again = StageSchedule(b_of, r_of, 2, world=2, per_rank=4, seed=0, stage=0)
    assert [again.rows_for(s, 1) for s in range(9)] == [sched.rows_for(s, 1) for s in range(9)]
    other = StageSchedule(b_of, r_of, 2, world=2, per_rank=4, seed=1, stage=0)
    assert [other.rows_for(s, 0) for s in range(4)] != [sched.rows_for(s, 0) for s in range(4)]


def test_loss_curve_png(tmp_path):
    from PIL import Image

    path = draw_loss_curve([("stage-1", [7.0, 6.0, 5.5]), ("stage-2", [5.4, 5.0])], tmp_path / "loss.png")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (360, 640, 3)
    red = (img[..., 0] > 200) & (img[..., 1] < 80)  # stage-2 is drawn in red
    assert red.sum() > 50


# --- a real staged run on Ray Train ----------------------------------------------------------------

def read_golden() -> list[tuple[str, int, float]]:
    rows = []
    for line in GOLDEN.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            stage, step, loss = line.split()
            rows.append((stage, int(step), float(loss)))
    return rows


def losses(summary: dict) -> list[tuple[str, int, float]]:
    return [(s["stage"], i + 1, v) for s in summary["stages"] for i, v in enumerate(s["losses"])]


@pytest.mark.slow
def test_three_stages_golden_curve_then_kill_in_stage_2_and_resume(tmp_path, layout, ray_local):
    cfg = make(tmp_path, layout)
    summary = train(cfg)
    got = losses(summary)
    assert [s["stage"] for s in summary["stages"]] == ["stage-1", "stage-2", "stage-3"]
    assert len(got) == sum(s["steps"] for s in STAGES)
    if os.environ.get("PANELFORGE_REGEN_GOLDEN"):
        GOLDEN.write_text("# tests/tasks/test_train.py: tiny preset (train_fixtures.TINY), 3 stages, 2 CPU workers "
                          "(gloo), seed 0\n# stage step loss (cross-entropy on image tokens)\n"
                          + "".join(f"{s} {i} {v:.6f}\n" for s, i, v in got))
    # Tolerance: a rerun here is bit-identical (asserted below); another CPU's matmul kernels
    # (AVX2 vs AVX-512 summation order) move fp32 sums by ~1e-6 relative, which 16 Adam steps
    # amplify to ~1e-4. A real change (a batch from another bucket, a label shift, the lr of
    # one step) moves the loss by > 1e-2 within a step or two. 2e-3 sits between the two.
    golden = read_golden()
    assert [(s, i) for s, i, _ in golden] == [(s, i) for s, i, _ in got]
    for (s, i, want), (_, _, have) in zip(golden, got):
        assert have == pytest.approx(want, abs=2e-3), f"{s} step {i}: loss {have:.6f}, golden {want:.6f}"
    assert got[-1][2] < got[0][2] - 1.5  # it learns

    run = Path(summary["run_dir"])
    from model.hf_checkpoint import load_decoder

    model, meta = load_decoder(run / "stage-3" / "export")
    assert meta["preset"] == "tiny" and meta["layout_fingerprint"] == layout.fingerprint
    assert meta["stage"] == "stage-3" and model.args.dim == TINY["dim"]
    assert meta["movqgan"] == MOVQGAN_RECORD  # generate checks its MoVQGAN against this
    assert (run / "loss.png").stat().st_size > 1000
    events = list((run / "tb").rglob("events.out.tfevents.*"))
    assert {p.parent.name for p in events} == {"stage-1", "stage-2", "stage-3"}

    # Kill a worker (SIGKILL) after step 3 of stage 2 in a run that reuses stage 1; the newest
    # checkpoint is step 2 (checkpoint_every 2), so the rerun must recompute step 3 itself.
    run2 = tmp_path / "runs" / "r"
    run2.mkdir(parents=True)
    shutil.copytree(run / "stage-1", run2 / "stage-1")
    shutil.copy(run / "run.json", run2 / "run.json")
    before = (run2 / "stage-1" / "summary.json").stat().st_mtime_ns
    faulty = load_config(tiny_config(tmp_path, run="r", fault="stage-2:3"))
    with pytest.raises(TrainError, match="rerun to resume"):
        train(faulty)
    assert (run2 / "stage-2" / "ckpt" / "step-0000002" / "trainer.json").is_file()
    assert not (run2 / "stage-2" / "summary.json").exists()
    resumed = train(load_config(tiny_config(tmp_path, run="r")))
    assert resumed["ran"] == ["stage-2", "stage-3"]
    assert (run2 / "stage-1" / "summary.json").stat().st_mtime_ns == before  # a finished stage is not rerun
    assert losses(resumed) == got  # bit-identical: same batches, same CFG drops, same optimizer state
