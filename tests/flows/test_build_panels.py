"""The build-panels flow end to end on the shapes source: pytest -q tests/flows/test_build_panels.py"""
import cv2
import pytest

from storage import open_dataset


@pytest.mark.slow
def test_flow_builds_every_task_with_artifacts_and_contact_sheet(tmp_path, ray_local, prefect_harness):
    from prefect.client.orchestration import get_client

    from flows.build_panels import build_panels

    over = [f"workdir={tmp_path}", "panels.source.count=40", "panels.rows_per_unit=10", "panels.stage_size=64"]
    summary = build_panels("configs/tiny.yaml", over)
    assert summary["rows_in"] == 40 and summary["rows_out"] == 40 and summary["rejects"] == 0 and summary["balanced"]
    want = {"t2i", "control:canny", "control:depth", "control:hed", "dense:depth", "dense:canny", "edit", "subject"}
    assert set(summary["rows_per_task"]) == want
    ds = open_dataset(summary["dataset"], verify=True)
    assert ds.manifest["status"] == "complete" and ds.rows_per_task() == summary["rows_per_task"]
    sheet = cv2.imread(summary["contact_sheet"])
    assert summary["contact_sheet"].startswith(str(tmp_path)) and sheet is not None
    assert sheet.shape[0] >= 256 and sheet.shape[1] >= 512  # tiles of 256 px, one per task first

    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts() if a.key in ("panels-rows", "panels-contact-sheet")}
    table = arts["panels-rows"].data
    assert "edit" in table and "rows in" in table and "40" in table
    md = arts["panels-contact-sheet"].data
    assert "data:image/jpeg;base64," in md and summary["contact_sheet"] in md

    # The CLI's call, run again: every unit is already done, nothing is redone.
    again = build_panels(config_path="configs/tiny.yaml", overrides=over)
    assert again["units_run"] == 0 and again["units_skipped"] == 4 and again["rows_out"] == 40
