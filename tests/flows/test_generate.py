"""`panelforge generate --config configs/tiny.yaml` on CPU: pairs, contact sheet, artifacts."""
from __future__ import annotations

import json

import cv2
import pytest

from gen_fixtures import write_tiny_models  # noqa: E402

from storage import open_dataset  # noqa: E402


@pytest.mark.slow
def test_cli_generate_writes_pairs_contact_sheet_and_artifacts(tmp_path, ray_local, prefect_harness, capsys):
    from prefect.client.orchestration import get_client

    from flows.cli import main

    dec, movq, tok = write_tiny_models(tmp_path / "models")
    over = [f"workdir={tmp_path / 'out'}", f"models.decoder_path={dec}", f"models.movqgan_path={movq}",
            f"models.tokenizer_path={tok}", "generate.inputs.count=4", "generate.inputs.size=64x64",
            "generate.inputs.tasks=[t2i, control:canny, edit, pair]", "generate.workers=1", "generate.top_k=64",
            "generate.sjd_window=4", "generate.pairs_per_unit=2"]
    assert main(["generate", "--config", "configs/tiny.yaml", *over]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.rindex("}") + 1])
    assert summary["rows"] == 4 and summary["pairs"] == 4 and summary["rejects"] == {}
    assert summary["rows_per_task"] == {"t2i": 1, "control:canny": 1, "edit": 1, "pair": 1}
    ds = open_dataset(summary["dataset"], verify=True)
    assert ds.kind == "generated" and len(ds) == 4
    row = next(r for r in ds.table().to_pylist() if r["task"] == "control:canny")
    assert row["lower"] and row["score"] is not None and json.loads(row["params"])["best_of"] == 2
    sheet = cv2.imread(summary["contact_sheet"])
    assert sheet is not None and sheet.shape[0] >= 256 and f"contact sheet: {summary['contact_sheet']}" in out

    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts()
                if a.key in ("generate-progress", "generate-statistics", "generate-contact-sheet")}
    assert arts["generate-progress"].data == 100.0 and "4/4 pairs" in arts["generate-progress"].description
    assert "pairs/hour" in arts["generate-progress"].description and "ETA" in arts["generate-progress"].description
    stats = arts["generate-statistics"].data
    assert "pairs written" in stats and "SJD tokens per step" in stats
    assert "data:image/jpeg;base64," in arts["generate-contact-sheet"].data
