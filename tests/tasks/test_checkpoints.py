"""Training checkpoints: a round trip, complete or absent under a kill at each point of a save
and of pruning, and a planted pickle that never runs.

    .venv/bin/python -m pytest -q tests/tasks/test_checkpoints.py
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model.decoder import Decoder, ModelArgs
from model.training import build_optimizer, make_batch, train_step
from tasks.train import checkpoints
from tasks.train.checkpoints import MARKER, CheckpointError, Folder

ARGS = dict(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=64, max_seq_len=128)
ROOT = Path(__file__).parents[2]


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [make_batch([(torch.randint(5, 300, (40,), generator=g).tolist(), 10)])]


def trained(steps: int):
    torch.manual_seed(0)
    model = Decoder(ModelArgs.from_name("tiny", **ARGS))
    opt = build_optimizer(model, 1e-3)
    for s in range(steps):
        train_step(model, opt, batch(s), 1e-3)
    return model, opt


def test_round_trip_continues_exactly(tmp_path):
    model, opt = trained(2)
    ms, os_ = checkpoints.gather_state(model, opt)
    folder = checkpoints.save(Folder(tmp_path / "ckpt"), 2, ms, os_, {"step": 2, "history": []})
    assert sorted(p.name for p in Path(folder.path).iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                                   MARKER]
    # A fresh model and optimizer loaded from disk take the same next step as the original.
    torch.manual_seed(1)
    fresh = Decoder(ModelArgs.from_name("tiny", **ARGS))
    fresh_opt = build_optimizer(fresh, 1e-3)
    m, o, trainer = checkpoints.read(checkpoints.latest(Folder(tmp_path / "ckpt")))
    assert trainer["step"] == 2
    checkpoints.apply_state(fresh, fresh_opt, m, o)
    a = train_step(model, opt, batch(7), 1e-3)
    b = train_step(fresh, fresh_opt, batch(7), 1e-3)
    assert a["loss"] == b["loss"]
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


class Boom:
    """Unpickling this runs os.system: what an attacker with write access to the workdir plants."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def plant_dcp_checkpoint(step_dir: Path, target: Path) -> None:
    """A folder in torch.distributed.checkpoint's layout: trainer.json (format 1) and a pickled .metadata."""
    step_dir.mkdir(parents=True)
    (step_dir / ".metadata").write_bytes(pickle.dumps(Boom(target)))
    (step_dir / "__0_0.distcp").write_bytes(b"\0" * 64)
    (step_dir / MARKER).write_text('{"format": 1, "step": 9, "history": []}')


def test_planted_pickle_never_runs(tmp_path):
    target = tmp_path / "pwned"
    step = tmp_path / "ckpt" / "step-0000009"
    plant_dcp_checkpoint(step, target)
    assert checkpoints.latest(Folder(tmp_path / "ckpt")) == Folder(step)
    with pytest.raises(CheckpointError, match=r"step-0000009: a checkpoint in torch.distributed.checkpoint's "
                                              r"format.*never loaded because unpickling.*delete this folder"):
        checkpoints.read(Folder(step))
    assert not target.exists()
    # A .metadata planted beside a valid new-format checkpoint is refused too, and never read.
    model, opt = trained(1)
    ms, os_ = checkpoints.gather_state(model, opt)
    good = checkpoints.save(Folder(tmp_path / "ckpt2"), 1, ms, os_, {"step": 1, "history": []})
    Path(good.path, ".metadata").write_bytes(pickle.dumps(Boom(target)))
    with pytest.raises(CheckpointError, match="never loaded"):
        checkpoints.read(good)
    assert not target.exists()


# --- kills during a save and during pruning ------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, torch
    from tasks.train import checkpoints
    from tasks.train.checkpoints import Folder

    ckpt, stop_at = Folder(sys.argv[1]), sys.argv[2]

    def hook(point):
        if point == stop_at and step == 3:  # announce the point, then wait here for the test to kill us
            print(point, flush=True)
            sys.stdin.read()
            raise SystemExit("not killed")

    checkpoints.POINT_HOOK = hook
    model = {"w": torch.arange(12.0).reshape(3, 4)}
    optim = {"state": {"w": {"step": torch.tensor(1.0), "exp_avg": torch.ones(3, 4)}},
             "param_groups": [{"lr": 1e-3, "params": ["w"]}]}
    for step in (1, 2, 3):
        model["w"] = torch.arange(12.0).reshape(3, 4) + step
        checkpoints.save(ckpt, step, model, optim, {"step": step, "history": []}, keep=2)
    print("done", flush=True)
""")


def kill_at(tmp_path: Path, point: str) -> Folder:
    """Three saves (keep 2) in a child that announces `point` of the 3rd save on stdout and waits:
    the kill lands exactly there (no timing window)."""
    ckpt = Folder(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, ckpt.path, point], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline().strip()
        assert line == point, f"child ended without reaching {point} (said {line!r})"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return ckpt


@pytest.mark.parametrize("point", ["save:model-written", "save:tensors-written", "prune:marker-removed"])
def test_kill_leaves_checkpoints_complete_or_absent(tmp_path, point):
    ckpt = kill_at(tmp_path, point)
    steps = {s: f.is_file(MARKER) for s, f in checkpoints.step_folders(ckpt)}
    newest = checkpoints.latest(ckpt)
    if point.startswith("save:"):
        # Step 3 was being written: it exists without its marker and is not a checkpoint.
        assert steps == {1: True, 2: True, 3: False} and newest.name == "step-0000002"
    else:
        # Step 3 was complete before pruning began; step 1 lost its marker first, then the kill.
        assert steps == {1: False, 2: True, 3: True} and newest.name == "step-0000003"
        assert Path(ckpt.path, "step-0000001", "model.safetensors").is_file()  # tensors left, ignored
    model, optim, trainer = checkpoints.read(newest)
    assert torch.equal(model["w"], torch.arange(12.0).reshape(3, 4) + trainer["step"])
    assert optim["param_groups"][0]["params"] == ["w"] and optim["state"]["w"]["exp_avg"].shape == (3, 4)
    # The next save removes what the kill left: only the newest two complete checkpoints remain.
    checkpoints.save(ckpt, 4, {"w": torch.zeros(1)}, None, {"step": 4, "history": []}, keep=2)
    left = {s: f.is_file(MARKER) for s, f in checkpoints.step_folders(ckpt)}
    assert left == ({2: True, 4: True} if point.startswith("save:") else {3: True, 4: True})
