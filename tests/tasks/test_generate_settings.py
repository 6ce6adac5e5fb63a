"""The bulk job's engine settings (issue 13): generate.quantize / compile resolved per device,
int4 on a CPU refused before anything runs, the settings in every row and in the manifest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from storage import open_dataset
from tasks.config import ConfigError, load_config
from tasks.generate.job import engine_settings, run_generate
from tasks.generate.requests import RequestError

ROOT = Path(__file__).resolve().parents[2]
# The shipped models (configs/tiny.yaml), kept small: two pairs of 64 px, one from text, one image to image.
SMALL = ["generate.inputs={kind: shapes, count: 2, seed: 5, size: 64x64, tasks: [t2i, edit]}", "generate.best_of=1",
         "generate.top_k=64", "generate.sjd_window=4", "generate.workers=1", "generate.pairs_per_unit=2",
         "generate.max_batch=2"]


def gen(**kw):
    return SimpleNamespace(**{"quantize": "auto", "compile": "auto", **kw})


def test_auto_resolves_per_device_and_int4_on_a_cpu_names_the_field():
    assert engine_settings(gen(), "cuda").to_dict() == {"device": "cuda", "quantize": "int4", "compile": "full"}
    assert engine_settings(gen(), "cpu").to_dict() == {"device": "cpu", "quantize": "none", "compile": "eager"}
    assert engine_settings(gen(quantize="int8", compile=True), "cpu").compile == "full"
    assert engine_settings(gen(quantize="int8", compile=False), "cuda").to_dict() == \
        {"device": "cuda", "quantize": "int8", "compile": "eager"}
    assert engine_settings(gen(compile="eager"), "cuda").compile == "eager"
    with pytest.raises(ConfigError, match=r"^generate\.quantize: int4 needs a CUDA GPU.*int8, none or auto$"):
        engine_settings(gen(quantize="int4"), "cpu")
    with pytest.raises(ConfigError, match=r"generate\.quantize.*'int3'"):
        load_config(ROOT / "configs/tiny.yaml", ["generate.quantize=int3"])


def test_int4_on_a_cpu_is_one_line_before_prefect_or_ray_and_writes_nothing(tmp_path):
    work = tmp_path / "work"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "generate", "--config", "configs/tiny.yaml",
                           "generate.quantize=int4", f"workdir={work}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("panelforge: error: generate.quantize: int4"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and not proc.stdout.strip()
    assert not work.exists()  # no dataset, no rewrite cache, nothing


@pytest.mark.slow
def test_cli_int8_rows_name_their_settings_and_a_resume_with_others_is_refused(tmp_path, ray_local,
                                                                                prefect_harness, capsys):
    from flows.cli import main

    over = [f"workdir={tmp_path / 'out'}", "generate.quantize=int8", *SMALL]
    assert main(["generate", "--config", "configs/tiny.yaml", *over]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[: out.rindex("}") + 1])
    ds = open_dataset(summary["dataset"], verify=True)
    rows = ds.table().to_pylist()
    assert len(rows) == 2 and {r["task"] for r in rows} == {"t2i", "edit"}
    for r in rows:
        params = json.loads(r["params"])
        assert params["quantize"] == "int8" and params["compile"] == "eager", params
    assert ds.manifest["config"]["generate"]["quantize"] == "int8"
    assert ds.manifest["config"]["generate"]["compile"] == "eager"

    # The same dataset with other settings: refused, naming the field, nothing rewritten.
    before = json.dumps(ds.manifest, sort_keys=True)
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"workdir={tmp_path / 'out'}", "generate.quantize=none", *SMALL])
    with pytest.raises(RequestError, match=r"generated with generate\.quantize 'int8' \(this run: 'none'\); rerun "
                                          r"with those settings to resume it, or write to another generate\.output"):
        run_generate(cfg)
    assert json.dumps(open_dataset(summary["dataset"]).manifest, sort_keys=True) == before
    # `auto` on this CPU is `none`; `int8` given again resumes (nothing left to do).
    again = run_generate(load_config(ROOT / "configs/tiny.yaml", over))
    assert again["units_this_run"] == 0 and again["rows"] == 2
