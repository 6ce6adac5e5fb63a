"""tasks/assets/panel_attention: the recomputed attention weights are the layer's, and the figures
count the right codes."""
from __future__ import annotations

import json

import pyarrow as pa
import torch
from gen_fixtures import write_tiny_models

from model.hf_checkpoint import load_decoder
from storage import DatasetWriter
from tasks.assets.panel_attention import attention_weights, main


def test_recomputed_weights_give_the_layers_output(tmp_path):
    dec, _, _ = write_tiny_models(tmp_path / "models")
    model, _ = load_decoder(dec, dtype=torch.float32)
    model.eval()
    seen = []
    for layer in model.layers:
        attn = layer.attention
        attn.register_forward_hook(lambda m, args, out: seen.append((m, args, out)))
    ids = torch.randint(0, model.output.out_features, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids)
        for m, (x, cos, sin, *_), out in seen:
            p = attention_weights(m, x, cos, sin)
            assert p.shape == (2, m.n_heads, 21, 21)
            assert torch.allclose(p.sum(-1), torch.ones(2, m.n_heads, 21)) and float(p.triu(1).abs().max()) == 0
            _, _, v = m.projections(x)
            v = v.view(2, 21, m.n_kv_heads, m.head_dim).transpose(1, 2)
            y = (p @ v.repeat_interleave(m.n_heads // m.n_kv_heads, dim=1)).transpose(1, 2).reshape(2, 21, -1)
            assert torch.allclose(m.wo(y), out, atol=1e-5)
    assert len(seen) == len(model.layers)


def test_codes_equal_to_the_upper_panel_are_counted_at_the_same_place(tmp_path):
    dec, _, _ = write_tiny_models(tmp_path / "models")
    vocab = load_decoder(dec, dtype=torch.float32)[0].output.out_features
    # a 4 x 2 grid (two panels of 2 rows x 2 codes, a row end after each row) after 4 prefix tokens
    # and 3 image-prefix tokens; the edit row copies its upper panel, the canny row copies nothing
    prefix, end = [1, 2, 3, 4, 5, 6, 7], [9]
    upper = [11, 12, 8, 13, 14, 8]
    rows = {"edit": prefix + upper + upper + end,
            "control:canny": prefix + upper + [15, 16, 8, 15, 16, 8] + end,
            "t2i": prefix + upper + end}
    assert max(max(r) for r in rows.values()) < vocab
    w = DatasetWriter(tmp_path / "tokens", "tokens", meta={"layout_fingerprint": "test"})
    w.write_unit("00000", pa.table({
        "id": list(rows), "task": list(rows), "bucket": ["32x16"] * 3, "grid_h": [4, 4, 2], "grid_w": [2] * 3,
        "tokens": list(rows.values()), "loss_start": [4] * 3}))
    w.finalize()
    out = tmp_path / "attn.json"
    got = main(["--tokens", str(tmp_path / "tokens"), "--decoder", dec, "--out", str(out)])
    assert set(got["tasks"]) == {"edit", "control:canny"}  # t2i has one panel
    edit, canny = got["tasks"]["edit"], got["tasks"]["control:canny"]
    assert edit["codes"] == canny["codes"] == 4
    assert edit["codes_equal_to_upper"] == 1.0 and edit["loss_where_different"] is None
    assert canny["codes_equal_to_upper"] == 0.0 and canny["loss_where_equal"] is None
    assert len(edit["upper_same_place"]) == len(edit["row_above"]) == len(load_decoder(dec)[0].layers)
    assert all(0 <= d["attention"] <= 1 for d in edit["upper_same_place"] + edit["row_above"])
    assert json.loads(out.read_text())["tasks"]["edit"]["codes"] == 4


def test_no_rows_is_refused(tmp_path, capsys):
    import pytest

    out = tmp_path / "attn.json"
    with pytest.raises(SystemExit) as e:
        main(["--tokens", str(tmp_path / "none"), "--decoder", str(tmp_path / "none"), "--rows", "0", "--out", str(out)])
    assert e.value.code == 2 and "--rows 0: measure at least one row" in capsys.readouterr().err
    assert not out.exists()
