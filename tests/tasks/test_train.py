"""Staged training: bad input refused before compute, the bucket schedule, and a real 3-stage
Ray Train run (2 CPU workers, gloo) against the golden loss curve, killed in stage 2 and resumed.

    .venv/bin/python -m pytest -q tests/tasks/test_train.py
    PANELFORGE_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/tasks/test_train.py -k golden   # rewrite it
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import moto_s3
from train_fixtures import (MOVQGAN_RECORD, STAGES, TINY, tiny_config, write_tokens)

from model.layout import Layout  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.train.curve import draw_loss_curve
from tasks.train.job import (StageSchedule, TrainError, bucket_index, plan_training,  # noqa: E402
                         rank_index, train)

GOLDEN = Path(__file__).parents[1] / "golden" / "train_tiny_3stage.txt"


@pytest.fixture(scope="module")
def layout():
    return Layout.shapes()


def make(tmp_path, layout, sizes=None, meta=None, task="t2i", **train_kw):
    cfg = load_config(tiny_config(tmp_path, **train_kw))
    kw = {} if sizes is None else {"sizes": sizes}
    write_tokens(tmp_path / "tokens", layout, meta=meta, task=task, **kw)
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
    faulty = load_config(tiny_config(tmp_path, run="r", fault="stage-2:3", max_failures=0))
    with pytest.raises(TrainError, match="rerun to resume"):
        train(faulty)
    assert (run2 / "stage-2" / "ckpt" / "step-0000002" / "trainer.json").is_file()
    assert not (run2 / "stage-2" / "summary.json").exists()
    resumed = train(load_config(tiny_config(tmp_path, run="r")))
    assert resumed["ran"] == ["stage-2", "stage-3"]
    assert (run2 / "stage-1" / "summary.json").stat().st_mtime_ns == before  # a finished stage is not rerun
    assert losses(resumed) == got  # bit-identical: same batches, same CFG drops, same optimizer state

    # A lost worker with the default failure budget: the worker announces itself after step 3 of
    # stage 2 (its pid in a file) and waits; the test SIGKILLs it there. Ray Train restarts the
    # workers by itself, they resume from the step-2 checkpoint, and the run completes without a
    # rerun, with the same losses as the run never interrupted.
    run3 = tmp_path / "runs" / "k"
    run3.mkdir(parents=True)
    shutil.copytree(run / "stage-1", run3 / "stage-1")
    shutil.copy(run / "run.json", run3 / "run.json")
    lost = load_config(tiny_config(tmp_path, run="k", fault="stage-2:3:announce"))
    assert lost.train.max_failures > 0  # the default
    killed = []
    killer = threading.Thread(target=kill_on_announce, args=(run3 / "fault-pid", killed), daemon=True)
    killer.start()
    survived = train(lost)
    killer.join(timeout=60)
    assert killed and killed[0] != os.getpid()
    assert survived["ran"] == ["stage-2", "stage-3"]
    assert losses(survived) == got


def kill_on_announce(pid_file: Path, killed: list, deadline_s: float = 900) -> None:
    """SIGKILL the process whose pid the worker wrote to pid_file (it waits there to be killed)."""
    end = time.time() + deadline_s
    while not pid_file.is_file() or not pid_file.read_text().strip():
        if time.time() > end:
            return
        time.sleep(0.1)  # waiting for the announcement; the worker does not move on until killed
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)


# --- survive: non-finite losses, planted pickles, an object-store workdir ---------------------------

def one_stage(steps: int, **kw) -> list[dict]:
    return [{**STAGES[0], "steps": steps, **kw}]


def test_nonfinite_losses_skip_the_step_then_stop_the_run(tmp_path, layout, monkeypatch):
    import torch

    import model.training as mt

    real_step, real_loss = mt.train_step, mt.chunked_loss
    bad, calls = {1, 3, 4}, []  # steps 2, 4 and 5 (0-based calls) see a NaN loss

    def nan_loss(*a, **kw):
        ce, z, n = real_loss(*a, **kw)
        return ce * float("nan"), z, n

    def step(model, optimizer, batches, lr, **kw):
        k = len(calls)
        calls.append(k)
        if k in bad:
            monkeypatch.setattr(mt, "chunked_loss", nan_loss)
        try:
            return real_step(model, optimizer, batches, lr, **kw)
        finally:
            monkeypatch.setattr(mt, "chunked_loss", real_loss)

    monkeypatch.setattr(mt, "train_step", step)
    cfg = make(tmp_path, layout, workers=0, stages=one_stage(8), max_nonfinite=2)
    with pytest.raises(TrainError, match=r"stage-1 step 5: 2 optimizer steps in a row with a non-finite loss.*"
                                         r"train.max_nonfinite 2.*resumes from the newest checkpoint"):
        train(cfg)
    assert len(calls) == 5  # stopped right there
    ckpt = tmp_path / "runs" / "t" / "stage-1" / "ckpt" / "step-0000004" / "trainer.json"
    history = json.loads(ckpt.read_text())["history"]
    assert [h.get("skipped", False) for h in history] == [False, True, False, True]
    assert history[1]["loss"] is None and all(h["loss"] > 0 for h in history if not h.get("skipped"))
    assert not (tmp_path / "runs" / "t" / "stage-1" / "summary.json").exists()
    del torch


def test_planted_pickle_in_the_run_folder_never_runs(tmp_path, layout):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    cfg = make(tmp_path, layout, workers=0, stages=one_stage(2))
    step = tmp_path / "runs" / "t" / "stage-1" / "ckpt" / "step-0999999"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(pickle.dumps(Boom()))  # torch.distributed.checkpoint's layout
    (step / "__0_0.distcp").write_bytes(b"\0" * 64)
    (step / "trainer.json").write_text(json.dumps({"format": 1, "step": 999999, "history": []}))
    with pytest.raises(TrainError, match=r"step-0999999: a checkpoint in torch.distributed.checkpoint's format.*"
                                         r"never loaded because unpickling"):
        train(cfg)
    assert not (tmp_path / "pwned").exists()


def test_object_store_workdir(tmp_path, layout, monkeypatch):
    import pyarrow.fs as pafs

    monkeypatch.chdir(tmp_path)  # a pathlib slip would make a local folder "s3:" here
    with moto_s3("pf-train") as fs:
        write_tokens("s3://pf-train/work/tokens", layout)
        cfg = load_config(tiny_config(tmp_path, workers=0, checkpoint_every=1,
                                      stages=[{**STAGES[0], "steps": 2}, {**STAGES[1], "steps": 2}]))
        cfg.workdir = "s3://pf-train/work"
        first = train(cfg, stages=[0])
        assert first["run_dir"] == "s3://pf-train/work/runs/t" and first["ran"] == ["stage-1"]
        second = train(cfg)  # stage 2 starts from stage 1's final checkpoint, read from the bucket
        assert second["ran"] == ["stage-2"]
        assert train(cfg)["ran"] == []  # done stages are found in the bucket
        files = {i.path.removeprefix("pf-train/work/runs/t/") for i in
                 fs.get_file_info(pafs.FileSelector("pf-train/work/runs/t", recursive=True))
                 if i.type == pafs.FileType.File}
        for stage in ("stage-1", "stage-2"):
            assert {f"{stage}/summary.json", f"{stage}/ckpt/step-0000002/trainer.json",
                    f"{stage}/ckpt/step-0000002/model.safetensors", f"{stage}/ckpt/step-0000002/optimizer.safetensors",
                    f"{stage}/export/model.safetensors", f"{stage}/export/config.json",
                    f"{stage}/export/panelforge.json"} <= files
            assert any(f.startswith(f"tb/{stage}/events.out.tfevents") for f in files)
        assert {"run.json", "loss.png"} <= files
        # The export in the bucket is the release format: copy it down and load it.
        local = tmp_path / "export"
        local.mkdir()
        pafs.copy_files("pf-train/work/runs/t/stage-2/export", str(local), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        from model.hf_checkpoint import load_decoder

        _, meta = load_decoder(local)
        assert meta["stage"] == "stage-2" and meta["final_loss"] == second["final_loss"]
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "runs").exists()


def test_packed_stage_learns_as_the_padded_one(tmp_path, layout):
    """train.pack: the same samples in rows of one length (attention inside each sample) give the
    padded run's losses: packing changes the shapes, not the math."""
    stages = one_stage(3, buckets=["64x64"])
    padded = train(make(tmp_path / "a", layout, workers=0, stages=stages))
    packed = train(make(tmp_path / "b", layout, workers=0, stages=stages, pack=True, pack_length=300))
    a, b = padded["stages"][0]["losses"], packed["stages"][0]["losses"]
    assert b == pytest.approx(a, rel=1e-4)
    ckpt = json.loads((tmp_path / "b" / "runs" / "t" / "stage-1" / "ckpt" / "step-0000002" / "trainer.json")
                      .read_text())
    assert ckpt["history"][0]["seq_tokens"] == json.loads(
        (tmp_path / "a" / "runs" / "t" / "stage-1" / "ckpt" / "step-0000002" / "trainer.json").read_text()
    )["history"][0]["seq_tokens"]


@pytest.mark.parametrize("task", ["edit", "t2i"])
def test_supervise_lower_leaves_out_the_upper_panel_of_dual_rows(tmp_path, layout, task):
    """train.supervise lower: a dual-panel row's loss starts at its lower panel (64x64 rows: 8 code
    rows, so the image start, two size tokens and 4 rows of 8 codes and a row end = 39 tokens fewer
    per row); a t2i row keeps all its image tokens. cfg_drop 0 keeps every row's context."""
    stages = one_stage(1, buckets=["64x64"])
    whole = train(make(tmp_path / "a", layout, task=task, workers=0, stages=stages, cfg_drop=0.0))
    lower = train(make(tmp_path / "b", layout, task=task, workers=0, stages=stages, cfg_drop=0.0,
                       supervise="lower"))

    def tokens(root):
        ckpt = root / "runs" / "t" / "stage-1" / "ckpt" / "step-0000001" / "trainer.json"
        return json.loads(ckpt.read_text())["history"][0]["tokens"]

    fewer = tokens(tmp_path / "a") - tokens(tmp_path / "b")
    assert fewer == (39 * 8 if task == "edit" else 0)
    a, b = whole["stages"][0]["losses"][0], lower["stages"][0]["losses"][0]
    assert (a != b) if task == "edit" else (a == b)


@pytest.mark.parametrize("grid_h, match", [(9, r"row 'u0-64x64-0' \(edit\): a dual-panel row with 9 code rows: expected an "
                                                r"even number.*train.supervise lower cannot find its lower panel"),
                                            (40, r"row 'u0-64x64-0' its lower panel \(train.supervise lower\) starts at \d+, "
                                                 r"outside 1\.\.\d+")])
def test_supervise_lower_refuses_a_row_without_a_lower_panel_before_any_compute(tmp_path, layout, grid_h, match):
    """A dual-panel row whose grid cannot be two panels (odd), or whose lower panel would start past
    its end: a TrainError naming the row at planning; with supervise image the same rows plan."""
    import pyarrow as pa

    from storage import DatasetWriter
    from train_fixtures import tokens_table

    table = tokens_table(layout, "64x64", 24, seed=0, prefix="u0-", task="edit")
    grid = table.column("grid_h").to_pylist()
    table = table.set_column(table.schema.get_field_index("grid_h"), "grid_h",
                             pa.array([grid_h] + grid[1:], type=table.schema.field("grid_h").type))
    for sub, supervise in (("a", "lower"), ("b", "image")):
        cfg = load_config(tiny_config(tmp_path / sub, workers=0, stages=one_stage(1, buckets=["64x64"]),
                                      supervise=supervise))
        w = DatasetWriter(tmp_path / sub / "tokens", kind="tokens", config={"test": True},
                          meta={**layout.meta(), "movqgan": MOVQGAN_RECORD})
        w.write_unit("u0", table)
        w.finalize()
        if supervise == "lower":
            with pytest.raises(TrainError, match=match):
                plan_training(cfg)
        else:
            assert plan_training(cfg).stages[0].steps == 1
