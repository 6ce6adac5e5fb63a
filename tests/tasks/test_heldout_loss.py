"""tasks.assets.heldout_loss: the held-out loss of a decoder equals cross-entropy computed
directly from its logits over the supervised positions (loss_start on), and a run writes one
figure per decoder, overall and per task kind."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from gen_fixtures import write_tiny_models

from model.hf_checkpoint import load_decoder
from storage import DatasetWriter
from tasks.assets.heldout_loss import main


def test_heldout_loss_is_the_cross_entropy_of_the_supervised_tokens(tmp_path):
    dec, _, _ = write_tiny_models(tmp_path / "models")
    model, _ = load_decoder(dec, dtype=torch.float32)
    vocab = model.output.out_features
    rng = np.random.default_rng(0)
    rows = [(rng.integers(0, vocab, n).tolist(), start) for n, start in ((40, 10), (25, 5), (33, 30))]
    w = DatasetWriter(tmp_path / "tokens", "tokens", meta={"layout_fingerprint": "test"})
    w.write_unit("00000", pa.table({
        "id": [f"r{i}" for i in range(3)], "task": ["t2i", "control:canny", "t2i"], "bucket": ["64x64"] * 3,
        "grid_h": [4] * 3, "grid_w": [4] * 3, "tokens": [ids for ids, _ in rows],
        "loss_start": [start for _, start in rows]}))
    w.finalize()

    out = tmp_path / "loss.json"
    result = main(["--tokens", str(tmp_path / "tokens"), "--decoder", dec, "--batch-size", "2", "--out", str(out)])

    ce, n = 0.0, 0
    per_task, lower = {}, None
    with torch.inference_mode():
        for (ids, start), task in zip(rows, ["t2i", "control:canny", "t2i"]):
            logits = model(torch.tensor([ids[:-1]]))[0].float()  # position t predicts token t+1
            target = torch.tensor(ids[1:])
            keep = torch.arange(len(ids) - 1) >= start - 1  # token j is supervised when j >= loss_start
            row_ce = float(F.cross_entropy(logits[keep], target[keep], reduction="sum"))
            ce, n = ce + row_ce, n + int(keep.sum())
            t_ce, t_n = per_task.get(task, (0.0, 0))
            per_task[task] = (t_ce + row_ce, t_n + int(keep.sum()))
            if task == "control:canny":  # its lower panel starts after the prefix and 2 rows of 4 codes + row end
                low = torch.arange(len(ids) - 1) >= start + 3 + 2 * 5 - 1
                up = keep & ~low
                lower = (float(F.cross_entropy(logits[low], target[low], reduction="sum")) / int(low.sum()),
                         int(low.sum()))
                upper = (float(F.cross_entropy(logits[up], target[up], reduction="sum")) / int(up.sum()), int(up.sum()))
    got = result["decoders"][dec]
    assert got["supervised_tokens"] == n == (40 - 10) + (25 - 5) + (33 - 30)
    assert abs(got["loss"] - ce / n) < 1e-3
    assert set(got["by_task"]) == {"t2i", "control:canny"}
    for task, (t_ce, t_n) in per_task.items():
        assert got["by_task"][task]["supervised_tokens"] == t_n
        assert abs(got["by_task"][task]["loss"] - t_ce / t_n) < 1e-3
    assert per_task["t2i"][0] / per_task["t2i"][1] != per_task["control:canny"][0] / per_task["control:canny"][1]
    assert json.loads(out.read_text())["decoders"][dec]["loss"] == got["loss"]
    canny = got["by_task"]["control:canny"]
    assert canny["lower"]["supervised_tokens"] == lower[1] == 25 - 18
    assert canny["upper"]["supervised_tokens"] == upper[1] == 18 - 5
    assert abs(canny["lower"]["loss"] - lower[0]) < 1e-3 and abs(canny["upper"]["loss"] - upper[0]) < 1e-3
    assert "lower" not in got["by_task"]["t2i"]  # one panel: no split


def test_an_odd_dual_grid_is_refused():
    from model.layout import lower_panel_start as lower_start

    assert lower_start(10, 16, 16) == 10 + 3 + 8 * 17
    with pytest.raises(ValueError, match="even number"):
        lower_start(10, 15, 16)
