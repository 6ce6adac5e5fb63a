"""The evaluate flow on a generated dataset: figures, table artifact, report: pytest -q tests/flows/test_evaluate.py"""
import importlib.util
from pathlib import Path

import pytest


def _helpers():
    """tests/tasks/test_evaluate.py's dataset writer (test folders are not packages)."""
    path = Path(__file__).parents[1] / "tasks" / "test_evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_flow_publishes_the_figures_and_the_report(tmp_path, ray_local, prefect_harness):
    from prefect.client.orchestration import get_client

    from flows.evaluate import evaluate

    h = _helpers()
    cfg = h._config(tmp_path, count=10)
    uri = h.write_generated(tmp_path, cfg, "generated")  # the config's own generate output
    over = [f"workdir={tmp_path}", "evaluate.workers=1"]
    summary = evaluate("configs/tiny.yaml", over)
    assert summary["uri"] == uri and summary["rows"] == 10
    assert Path(summary["report"]).is_file() and Path(summary["contact_sheet"]).is_file()
    fig = {(r["figure"], r["task"]): r for r in summary["table"]}
    assert fig[("canny_f1", "control:canny")]["generated"] == 1.0

    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts() if a.key in ("evaluate-figures", "evaluate-report")}
    assert "canny_f1" in arts["evaluate-figures"].data and "control:depth" in arts["evaluate-figures"].data
    assert "data:image/jpeg;base64," in arts["evaluate-report"].data and summary["report"] in arts["evaluate-report"].data
