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


def test_swap_upper_gives_each_row_the_next_rows_map():
    from tasks.assets.heldout_loss import swap_upper

    # prompt | upper span (start..lower) | lower panel; rows 0-2 share an upper length, row 3 is alone
    rows = [([1, 2, 10, 11, 12, 20, 21], 2), ([3, 4, 13, 14, 15, 22, 23], 2), ([5, 6, 16, 17, 18, 24], 2),
            ([7, 19, 19, 25], 1)]
    lowers = [5, 5, 5, 3]
    got = swap_upper(rows, lowers)
    assert got == [([1, 2, 13, 14, 15, 20, 21], 5), ([3, 4, 16, 17, 18, 22, 23], 5),
                   ([5, 6, 10, 11, 12, 24], 5)]


def test_swap_maps_measures_the_lower_panel_under_another_map(tmp_path):
    """--swap-maps: lower_other_map is the held-out loss of exactly swap_upper's rows, and map_worth
    its excess over the row's own map."""
    from tasks.assets.heldout_loss import heldout_loss, swap_upper

    dec, _, _ = write_tiny_models(tmp_path / "models")
    model, _ = load_decoder(dec, dtype=torch.float32)
    rng = np.random.default_rng(1)
    vocab = model.output.out_features
    n_rows, start, lower = 4, 5, 5 + 3 + 2 * 5  # grid 4x4: two upper rows of 4 codes + row end
    rows = [rng.integers(0, vocab, 30).tolist() for _ in range(n_rows)]
    w = DatasetWriter(tmp_path / "tokens", "tokens", meta={"layout_fingerprint": "test"})
    w.write_unit("00000", pa.table({
        "id": [f"r{i}" for i in range(n_rows)], "task": ["edit"] * n_rows, "bucket": ["64x64"] * n_rows,
        "grid_h": [4] * n_rows, "grid_w": [4] * n_rows, "tokens": rows, "loss_start": [start] * n_rows}))
    w.finalize()

    result = main(["--tokens", str(tmp_path / "tokens"), "--decoder", dec, "--swap-maps",
                   "--out", str(tmp_path / "loss.json")])
    edit = result["decoders"][dec]["by_task"]["edit"]
    want, k = heldout_loss(model, swap_upper([(r, start) for r in rows], [lower] * n_rows))
    assert edit["lower_other_map"]["supervised_tokens"] == k == edit["lower"]["supervised_tokens"] == n_rows * (30 - lower)
    assert abs(edit["lower_other_map"]["loss"] - want) < 1e-3
    assert edit["map_worth"] == pytest.approx(edit["lower_other_map"]["loss"] - edit["lower"]["loss"], abs=1e-3)
    assert edit["lower_other_map"]["loss"] != edit["lower"]["loss"]  # the rows' own maps differ from the others'
    assert "--swap-maps" in result["command"]


def test_swap_maps_without_panels_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--tokens", str(tmp_path / "tokens"), "--decoder", str(tmp_path / "dec"), "--swap-maps",
              "--no-panels", "--out", str(tmp_path / "loss.json")])
    assert e.value.code == 2
    assert "--swap-maps measures the lower panel: it cannot go with --no-panels" in capsys.readouterr().err
    assert not (tmp_path / "loss.json").exists()
