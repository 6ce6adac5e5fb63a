"""The retrain flow killed during training (SIGKILL, in stage 3) and rerun: it resumes there,
redoes none of the finished work, and ends with the same outputs as an uninterrupted run.

    .venv/bin/python -m pytest -q tests/flows/test_retrain.py

The kill point is an event: the killed run stops itself right after stage 3 saved step 2
(tests/flows/retrain_stop.py) and says so in a file; the test kills it then.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
HERE = Path(__file__).resolve().parent
CONFIG = str(ROOT / "configs" / "tiny.yaml")
KILL_STAGE, KILL_AFTER = "stage-3", 2  # kill once stage 3 has checkpointed step 2 of 16


def small(workdir: Path) -> list[str]:
    """configs/tiny.yaml cut down to seconds a step: 48 panels over the three stage sizes, a few
    training steps per stage (in-process, workers=0), four generated pairs at 64 px."""
    return [
        f"workdir={workdir}",
        "panels.source.count=48", "panels.rows_per_unit=16", "tokenize.rows_per_unit=16",
        "train.workers=0", "train.checkpoint_every=2", "train.keep_checkpoints=20",
        *(f"train.stages.{i}.{k}={v}" for i in range(3) for k, v in
          (("steps", 16 if i == 2 else 4), ("global_batch", 4), ("micro_batch", 2))),
        "generate.inputs.count=4", "generate.inputs.size=64x64", "generate.best_of=1", "generate.pairs_per_unit=2",
    ]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generated_rows(uri: str) -> list[dict]:
    from storage.dataset import open_dataset

    ds = open_dataset(uri, verify=True)
    rows = [ds[i] for i in range(len(ds))]
    for r in rows:
        r.pop("seconds")  # wall time: the only column that may differ
    return sorted(rows, key=lambda r: r["id"])


def outputs(summary: dict) -> dict:
    """What a run produced, free of paths and timings."""
    run = Path(summary["checkpoint"]).parents[1]
    stages = {p.parent.name: json.loads(p.read_text()) for p in sorted(run.glob("stage-*/summary.json"))}
    return {
        "losses": {s: v["losses"] for s, v in stages.items()},
        "export": digest(Path(summary["checkpoint"]) / "model.safetensors"),
        "generated": generated_rows(summary["generated"]),
        "figures": summary["figures"],
    }


def _checkpointed(run: Path) -> Path | None:
    p = run / KILL_STAGE / "ckpt" / f"step-{KILL_AFTER:07d}" / "trainer.json"
    return p if p.is_file() else None


@pytest.mark.slow
def test_retrain_killed_in_stage_3_resumes_there_and_matches_an_uninterrupted_run(tmp_path, prefect_harness,
                                                                                   ray_local):
    from prefect.settings import PREFECT_API_URL

    from flows.retrain import retrain

    # The uninterrupted run.
    whole = retrain(CONFIG, small(tmp_path / "whole"))

    # The same run in a process of its own (sharing the test's Prefect API), SIGKILLed in stage 3.
    work = tmp_path / "killed"
    stopped = tmp_path / "stopped"
    env = dict(os.environ, PREFECT_API_URL=str(PREFECT_API_URL.value()), PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}",
               PF_STOP_AFTER=f"{KILL_STAGE}:{KILL_AFTER}", PF_STOP_FILE=str(stopped))
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", "import retrain_stop; retrain_stop.main()", CONFIG, *small(work)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    run = work / "runs" / "demo"
    deadline = time.time() + 600
    try:
        while not stopped.exists():  # the run waits there, stage 3 unfinished, until killed
            assert proc.poll() is None, f"the run ended before stage 3 checkpointed: {(tmp_path / 'killed.log').read_text()[-3000:]}"
            assert time.time() < deadline, "stage 3 never checkpointed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow and everything it started (Ray's processes)
        proc.wait()
    assert _checkpointed(run) is not None and not (run / KILL_STAGE / "summary.json").exists()

    # What the killed run had finished, to check that the rerun leaves it alone.
    panels, tokens = work / "panels" / "manifest.json", work / "tokens" / "manifest.json"
    done_files = {p: p.stat().st_mtime_ns for p in (panels, tokens, run / "stage-1" / "summary.json",
                                                    run / "stage-2" / "summary.json")}
    ckpts = sorted((run / KILL_STAGE / "ckpt").glob("step-*/trainer.json"))
    killed_at = json.loads(ckpts[-1].read_text())
    assert killed_at["step"] >= KILL_AFTER

    again = retrain(CONFIG, small(work))

    for p, mtime in done_files.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was redone"
    stage3 = json.loads((run / KILL_STAGE / "summary.json").read_text())
    # The steps before the checkpoint come from it, not from new computation: their timings
    # (tokens/s) are the killed run's own, bit for bit.
    assert stage3["history"][:killed_at["step"]] == killed_at["history"]
    assert len(stage3["history"]) == 16
    assert outputs(again) == outputs(whole)
