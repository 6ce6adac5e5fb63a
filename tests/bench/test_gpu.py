"""`python -m bench.gpu --device cpu --preset tiny --quick`: the GPU command kept from rotting on a
CPU, on what a bare GPU machine has (no Ray, Prefect, pydantic, tasks/); its time budgets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Imported by the command (or its worker process) only at the peril of the GPU machine, which lacks them.
ABSENT_ON_A_GPU_MACHINE = ("ray", "prefect", "pydantic", "tasks", "flows", "storage")

BLOCKER = f'''
import importlib.abc, sys
BLOCKED = {ABSENT_ON_A_GPU_MACHINE!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not on a bare GPU machine (bench.gpu must not import it)")
sys.meta_path.insert(0, Block())
'''


@pytest.mark.slow
def test_quick_cpu_run_exits_0_prints_its_table_and_writes_json(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)  # in the worker process too (spawned)
    out = tmp_path / "gpu-cpu.json"
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "CUDA_VISIBLE_DEVICES": ""}
    # Budgets scaled up: this test is about the command, not about this shared machine's speed.
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--preset", "tiny", "--quick",
                           "--budget-scale", "6", "--total", "900", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    names = ["correctness", "reference", "static", "int4", "int4-sjd", "bulk", "train", "tokenize"]
    assert list(res["parts"]) == names
    failed = {k: v.get("detail") for k, v in res["parts"].items() if v["status"] != "ok"}
    assert not failed, failed
    assert res["parts"]["correctness"]["identical"] and res["parts"]["correctness"]["int8_runs"]
    assert res["parts"]["correctness"]["tree_identical"]
    assert res["parts"]["bulk"]["batch_from"] == "Engine.fit_batch"
    table = proc.stdout[proc.stdout.index("# bench.gpu on"):]
    for name in names:
        assert f"\n{name:<12} ok " in table, table
    assert res["parts"]["static"]["x_reference"] > 0


def test_a_part_past_its_budget_is_stopped_and_the_next_gets_a_fresh_worker():
    from bench.gpu import Runner, make_plan, table

    plan = make_plan("cpu", "tiny", quick=True)
    runner = Runner()
    try:
        slow = runner.run("correctness", plan, budget=0.05)  # builds two engines: far more than 50 ms
        assert slow["status"] == "skipped" and slow["detail"] == "past its 0.05 s budget"
        assert runner.proc is None  # the worker was killed, not left running the part
        fine = runner.run("tokenize", plan, budget=300)
        assert fine["status"] == "ok", fine
    finally:
        runner.stop()
    text = table({"correctness": {**slow, "budget_s": 0.05}, "tokenize": {**fine, "budget_s": 300}})
    assert "correctness  skipped" in text and "past its 0.05 s budget" in text and "tokenize     ok" in text
