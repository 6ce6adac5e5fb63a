"""The whole job on Ray with the real engine: every pair once, resumable, errors before models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gen_fixtures import write_config, write_prompts, write_tiny_models  # noqa: E402

from storage import open_dataset  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.generate.job import output_uri, run_generate  # noqa: E402
from tasks.generate.requests import RequestError  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("job-models"))


def ids_once(uri: str) -> list[str]:
    """Every pair id of a generated dataset: rows plus rejects (pairs that failed the filter)."""
    ds = open_dataset(uri, verify=True)
    ids = ds.table(["id"]).column("id").to_pylist()
    rej = ds.rejects()
    ids += [r for r, st in zip(rej.column("input_ref").to_pylist(), rej.column("stage").to_pylist()) if st != "request"]
    return ids


def test_job_writes_every_pair_once_and_a_rerun_does_nothing(tmp_path, models, ray_local):
    shapes = {"kind": "shapes", "count": 5, "seed": 2, "tasks": ["t2i", "control:canny", "edit", "control:pose"],
              "size": "64x64"}
    cfg = load_config(write_config(tmp_path, models, {"inputs": shapes, "pairs_per_unit": 2, "best_of": 2}))
    seen = []
    summary = run_generate(cfg, progress=seen.append)
    expected = ["shapes-2-t2i#0", "shapes-3-control:canny#0", "shapes-4-edit#0", "shapes-6-t2i#0"]
    assert sorted(ids_once(summary["uri"])) == sorted(expected)
    assert summary["rows"] + sum(v for k, v in summary["rejects"].items() if k != "missing_upper") == 4
    assert summary["rejects"].get("missing_upper") == 1  # the pose row, rejected before any model
    assert summary["units"] == 2 and summary["units_this_run"] == 2 and summary["samples_this_run"] == 5
    assert seen[0]["done_pairs"] == 0 and seen[-1]["done_pairs"] == 4 and seen[-1]["pairs_per_hour"] > 0
    assert summary["acceptance"] is not None and summary["acceptance"] >= 1.0  # SJD: >= 1 token per step

    ds = open_dataset(summary["uri"])
    assert ds.manifest["status"] == "complete" and ds.reject_counts()["missing_upper"] == 1
    again = run_generate(cfg)
    assert again["units_this_run"] == 0 and again["pairs_this_run"] == 0
    assert sorted(ids_once(summary["uri"])) == sorted(expected)


def test_bad_inputs_and_models_fail_before_ray_or_any_model(tmp_path, models, monkeypatch):
    import tasks.ray_jobs

    def no_ray(*a, **k):
        raise AssertionError("Ray must not start for a job that cannot run")

    monkeypatch.setattr(tasks.ray_jobs, "ray_started", no_ray)
    bad = write_prompts(tmp_path / "bad.jsonl", [{"prompt": "x", "task": "sculpt"}, {"prompt": "", "task": "t2i"}])
    cfg = load_config(write_config(tmp_path, models, {"inputs": {"kind": "file", "path": str(bad)}}))
    with pytest.raises(RequestError, match="no valid input rows.*unknown_task: 1.*empty_prompt: 1"):
        run_generate(cfg)
    good = write_prompts(tmp_path / "good.jsonl", [{"prompt": "a red circle", "task": "t2i"}])
    cfg = load_config(write_config(tmp_path, (str(tmp_path / "nope"),) + tuple(models[1:]),
                                   {"inputs": {"kind": "file", "path": str(good)}}))
    with pytest.raises(RequestError, match="decoder_path"):
        run_generate(cfg)
    assert not Path(output_uri(cfg)).exists()
    # A decoder whose tokens came from another MoVQGAN: its codes would decode to noise.
    import shutil

    other = tmp_path / "decoder-other"
    shutil.copytree(models[0], other)
    meta = json.loads((other / "panelforge.json").read_text())
    meta["movqgan"] = {"preset": "tiny", "weights": "movqgan-old.safetensors", "sha256": "0" * 64}
    (other / "panelforge.json").write_text(json.dumps(meta))
    cfg = load_config(write_config(tmp_path, (str(other),) + tuple(models[1:]), {"inputs": {"kind": "file", "path": str(good)}}))
    with pytest.raises(RequestError, match="codes of MoVQGAN 'movqgan-old.safetensors'.*another"):
        run_generate(cfg)
    assert not Path(output_uri(cfg)).exists()
    from storage.hashing import file_sha256

    meta["movqgan"]["sha256"] = file_sha256(models[1])  # the right one: accepted
    (other / "panelforge.json").write_text(json.dumps(meta))
    from tasks.generate.job import check_models

    check_models(cfg)
