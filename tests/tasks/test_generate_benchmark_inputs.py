"""A benchmark prompt file through the whole generate job, as it comes (issue 17).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/tasks/test_generate_benchmark_inputs.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_requests import geneval_rows, write_jsonl

from storage import open_dataset
from tasks.config import load_config
from tasks.generate.job import run_generate
from tasks.generate.requests import RequestError

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, inputs: dict):
    return load_config(ROOT / "configs/tiny.yaml", [
        f"workdir={tmp_path / 'work'}", f"generate.inputs={json.dumps(inputs)}", "generate.size=64x64",
        "generate.best_of=1", "generate.workers=1", "generate.pairs_per_unit=2", "generate.top_k=64",
        "generate.sjd_window=4", "ray.num_cpus=2",
    ])


def test_a_geneval_file_of_553_rows_runs_as_it_comes_with_count_4(tmp_path, ray_local):
    f = write_jsonl(tmp_path / "evaluation_metadata.jsonl", geneval_rows(553))
    summary = run_generate(_cfg(tmp_path, {"kind": "file", "path": str(f), "count": 4}))
    assert summary["pairs"] == 4 and summary["rows"] == 4 and summary["request_summary"]["rejected_rows"] == 0
    ds = open_dataset(summary["uri"], verify=True)
    rows = sorted(ds.table(["id", "task", "caption", "params"]).to_pylist(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == [f"evaluation_metadata.jsonl:{i}#0" for i in range(4)]
    assert {r["task"] for r in rows} == {"t2i"}
    expected = geneval_rows(4)
    for row, want in zip(rows, expected):
        params = json.loads(row["params"])
        assert row["caption"] == want["prompt"]
        assert params["fields"] == {k: v for k, v in want.items() if k != "prompt"}  # tag, include, exclude


def test_a_job_whose_every_row_is_rejected_fails_once_with_the_rejects(tmp_path, monkeypatch):
    import tasks.ray_jobs

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start for a job that cannot run")

    monkeypatch.setattr(tasks.ray_jobs, "ray_started", no_ray)
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a red circle", "task": "control:canny"}, {"prompt": " "}])
    with pytest.raises(RequestError) as e:
        run_generate(_cfg(tmp_path, {"kind": "file", "path": str(f)}))
    msg = str(e.value)
    assert "p.jsonl:0: missing_upper: task 'control:canny' needs an upper image" in msg
    assert "p.jsonl:1: empty_prompt" in msg

    # The flow's task does not retry such an error (one message, not three tracebacks); a lost
    # connection it does (flows/retry.py).
    from types import SimpleNamespace

    from prefect.states import Failed

    from flows.retry import retry_transient

    run = SimpleNamespace(name="generate-job-0")
    assert retry_transient(None, run, Failed(data=e.value)) is False
    assert retry_transient(None, run, Failed(data=ConnectionResetError("connection reset"))) is True
