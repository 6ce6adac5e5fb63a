"""Every config error before anything starts: pytest -q tests/flows/test_bad_config.py

Each bad config goes through the CLI's main() in-process: exit status 2, one line on stderr that
names the config file and the field, no traceback, nothing written under the working folder and
no flow called (so no Prefect flow run created and no Ray started). Two cases run the real
`panelforge` console script end to end, and one checks Prefect's database itself: a URI with a
secret in it never reaches it.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import moto_s3

from flows.cli import FLOWS, main
from tasks.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"

# (id, command, overrides, field the one line must name). "{tmp}" is the test's own folder, in
# which `made/` holds what a case needs: a file where a folder belongs, a folder with no
# config.json, a file of the wrong kind.
CASES = [
    ("negative source count", "build-panels", ["panels.source.count=-5"], "panels.source.count"),
    ("zero pairs per unit", "generate", ["generate.pairs_per_unit=0"], "generate.pairs_per_unit"),
    ("best_of -1", "generate", ["generate.best_of=-1"], "generate.best_of"),
    ("zero count per prompt", "generate", ["generate.count_per_prompt=0"], "generate.count_per_prompt"),
    ("zero max_batch", "generate", ["generate.max_batch=0"], "generate.max_batch"),
    ("zero generate workers", "generate", ["generate.workers=0"], "generate.workers"),
    ("zero top_k", "generate", ["generate.top_k=0"], "generate.top_k"),
    ("zero tokenize workers", "pretokenize", ["tokenize.workers=0"], "tokenize.workers"),
    ("zero tokenize batch", "pretokenize", ["tokenize.batch_size=0"], "tokenize.batch_size"),
    ("negative panels workers", "build-panels", ["panels.workers=-1"], "panels.workers"),
    ("zero rows per unit", "build-panels", ["panels.rows_per_unit=0"], "panels.rows_per_unit"),
    ("zero evaluate rows per unit", "evaluate", ["evaluate.rows_per_unit=0"], "evaluate.rows_per_unit"),
    ("zero stage steps", "train", ["train.stages.0.steps=0"], "train.stages.0.steps"),
    ("zero ray cpus", "retrain", ["ray.num_cpus=0"], "ray.num_cpus"),
    ("no training stages", "train", ["train.stages=[]"], "train.stages"),
    ("missing model file", "generate", ["models.movqgan_path={tmp}/made/missing.safetensors"], "models.movqgan_path"),
    ("model file of the wrong kind", "pretokenize", ["models.movqgan_path={tmp}/made/weights.bin"], "models.movqgan_path"),
    ("decoder folder without config.json", "generate", ["models.decoder_path={tmp}/made/empty"], "models.decoder_path"),
    ("missing init_from", "train", ["train.init_from={tmp}/made/missing"], "train.init_from"),
    ("hf tokenizer without a path", "pretokenize", ["models.tokenizer=hf"], "models.tokenizer_path"),
    ("unknown tokenizer kind", "pretokenize", ["models.tokenizer=sentencepiece"], "models.tokenizer"),
    ("missing depth model", "build-panels", ["panels.depth_model={tmp}/made/missing"], "panels.depth_model"),
    ("workdir under a file", "build-panels", ["workdir={tmp}/made/weights.bin/out"], "workdir"),
    ("workdir is a file", "pretokenize", ["workdir={tmp}/made/weights.bin"], "workdir"),
    ("workdir scheme", "build-panels", ["workdir=gs://bucket/x"], "workdir"),
    ("s3 workdir without bucket", "build-panels", ["workdir=s3:///x"], "workdir"),
    ("secret in the workdir", "build-panels", [f"workdir=s3://AKIAEXAMPLE:{SECRET}@bucket/x"], "workdir"),
    ("secret in the rewrite endpoint", "generate",
     [f"generate.rewrite.endpoint=http://user:{SECRET}@127.0.0.1:9/v1"], "generate.rewrite.endpoint"),
    ("folder source without its path", "build-panels", ["panels.source={kind: folder}"], "panels.source.path"),
    ("folder source path missing", "build-panels", ["panels.source={kind: folder, path: {tmp}/made/none}"],
     "panels.source.path"),
    ("edits source without its path", "build-panels", ["panels.source={kind: edits}"], "panels.source.path"),
    ("generated source without its uri", "build-panels", ["panels.source={kind: generated}"], "panels.source.uri"),
    ("unknown source kind", "build-panels", ["panels.source={kind: webcam}"], "panels.source.kind"),
    ("shapes source option", "build-panels", ["panels.source={kind: shapes, aspect: round}"], "panels.source.aspect"),
    ("webdataset source without its path", "build-panels", ["panels.source={kind: webdataset}"], "panels.source.path"),
    ("parquet shards missing", "build-panels", ["panels.source={kind: parquet, path: '{tmp}/made/none/{0..9}.parquet'}"],
     "panels.source.path"),
    ("override value not YAML", "build-panels", ["panels.source={kind: folder, path: /a/{b}"], "panels.source"),
    ("file inputs without a path", "generate", ["generate.inputs={kind: file}"], "generate.inputs.path"),
    ("file inputs count 0", "generate", ["generate.inputs={kind: file, path: /tmp, count: 0}"], "generate.inputs.count"),
    ("file inputs missing", "generate", ["generate.inputs={kind: file, path: {tmp}/made/none.jsonl}"],
     "generate.inputs.path"),
    ("scorer as module:factory", "generate", ["generate.scorer=os:system"], "generate.scorer"),
    ("estimator as module:factory", "evaluate", ["generate.depth_estimator=tasks.generate.verify:to_gray"],
     "generate.depth_estimator"),
    ("unknown scorer name", "generate", ["generate.scorer=clip"], "generate.scorer"),
    ("the demo too", "demo", ["generate.best_of=0"], "generate.best_of"),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def guarded(tmp_path, monkeypatch):
    """A working folder with the files the cases need; every flow replaced by a tripwire."""
    monkeypatch.chdir(ROOT)  # configs/tiny.yaml names its assets relative to the repository
    made = tmp_path / "made"
    (made / "empty").mkdir(parents=True)
    (made / "weights.bin").write_bytes(b"\0" * 16)
    called = []
    # Import every flow module before patching any: flows.retrain binds `train` and the others at
    # import, and must never bind a tripwire that outlives this test.
    modules = [(__import__(module, fromlist=[func]), func) for module, func, _ in FLOWS.values()]
    for mod, func in modules:
        monkeypatch.setattr(mod, func, lambda *a, **k: called.append((a, k)) or {})
    return tmp_path, called


@pytest.mark.parametrize("name,command,overrides,field", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_refused_before_anything_starts(name, command, overrides, field, guarded, capsys):
    tmp, called = guarded
    work = tmp / "work"
    over = [o.replace("{tmp}", str(tmp)) for o in overrides]
    if not any(o.startswith("workdir=") for o in over):
        over.append(f"workdir={work}")
    before = _tree(tmp)
    argv = [command, *over] if command == "demo" else [command, "--config", TINY, *over]
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 30  # nothing heavy ran (a generous bound for a loaded machine)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("panelforge: error: ") and "tiny.yaml" in lines[0]
    assert f": {field}:" in lines[0], lines[0]  # the field's own label, not only the echoed override
    assert "Traceback" not in out + err
    assert SECRET not in out + err
    assert called == []  # no flow called: no flow run, no Ray
    assert _tree(tmp) == before and not work.exists()


def test_bad_field_in_the_file_names_the_file(guarded, capsys):
    tmp, called = guarded
    bad = tmp / "bad.yaml"
    bad.write_text(f"workdir: {tmp / 'work'}\ngenerate:\n  best_of: -1\n")
    assert main(["generate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}: generate.best_of:" in err
    assert called == [] and not (tmp / "work").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere; the file-in-the-way cases cover root")
def test_unwritable_workdir(guarded, capsys):
    tmp, called = guarded
    locked = tmp / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert main(["build-panels", "--config", TINY, f"workdir={locked}/work"]) == 2
        err = capsys.readouterr().err
        assert ": workdir:" in err and "not writable" in err
    finally:
        locked.chmod(0o700)
    assert called == []


def test_missing_bucket_is_refused_with_what_to_do(guarded, capsys):
    """pyarrow would say 'enable allow_bucket_creation', an option PanelForge does not have."""
    _, called = guarded
    with moto_s3(secret=SECRET):  # no bucket made: the workdir names one that does not exist
        assert main(["build-panels", "--config", TINY, "workdir=s3://no-such-bucket/run"]) == 2
        err = capsys.readouterr().err
        assert "workdir: bucket 'no-such-bucket' does not exist; create it" in err
        assert "allow_bucket_creation" not in err and SECRET not in err
    assert called == []


@pytest.mark.parametrize("argv", [
    ["generate", "--config", TINY, "generate.best_of=-1"],
    ["build-panels", "--config", TINY, f"workdir=s3://AKIAEXAMPLE:{SECRET}@bucket/x"],
], ids=["best_of", "secret"])
def test_console_script_end_to_end(argv, tmp_path):
    """The installed `panelforge` command in its own process, with its own Prefect home: exit 2,
    one line, and Prefect never started (no database created)."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    run = subprocess.run([str(Path(sys.executable).with_name("panelforge")), *argv], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr and SECRET not in run.stdout + run.stderr
    assert lines[0].startswith("panelforge: error: ") and "tiny.yaml" in lines[0]
    assert list(home.iterdir()) == []  # no database, no logs: Prefect was never started


def test_refused_secret_never_reaches_prefects_database(prefect_harness, monkeypatch, capsys):
    """Against the test harness's real database: a refused secret URI creates no flow run and its
    secret is nowhere in the database files, while a run of a good config stores its typed settings
    (the control that shows the database does record what a flow run is given)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    import flows.build_panels

    @flow(name="build-panels")
    def fake_build_panels(config_path: str | None = None, overrides: list[str] | None = None,
                          config: PipelineConfig | None = None) -> dict:
        return {"workdir": config.workdir, "source": config._source, "overrides": config._overrides}

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(flows.build_panels, "build_panels", fake_build_panels)
    with get_client(sync_client=True) as client:
        runs_before = {r.id for r in client.read_flow_runs()}

    assert main(["build-panels", "--config", TINY, f"workdir=s3://AKIAEXAMPLE:{SECRET}@bucket/x"]) == 2
    assert SECRET not in capsys.readouterr().err
    marker = "/tmp/panelforge-typed-params-marker"
    assert main(["build-panels", "--config", TINY, f"workdir={marker}", "panels.source.count=7"]) == 0
    # The flow got the CLI's own PipelineConfig: where it was read from travels with it.
    assert f'"source": "{TINY}"' in capsys.readouterr().out

    with get_client(sync_client=True) as client:
        new = [r for r in client.read_flow_runs() if r.id not in runs_before]
    assert len(new) == 1  # the good config's run only
    params = new[0].parameters
    assert "overrides" not in params or not params["overrides"]  # the typed settings, not strings
    assert params["config"]["workdir"] == marker and params["config"]["panels"]["source"]["count"] == 7

    db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]  # the db and its WAL
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(FULL)")
    finally:
        con.close()
    blob = b"".join(p.read_bytes() for p in files)
    assert marker.encode() in blob  # the control: what a run is given is in these files
    assert SECRET.encode() not in blob and b"AKIAEXAMPLE" not in blob


def test_good_config_reaches_the_flow_as_typed_settings(guarded):
    """The control of the table above: the same path with a good config calls the flow, once,
    with the validated settings (not the config path and the override strings)."""
    from tasks.config import PipelineConfig

    tmp, called = guarded
    assert main(["generate", "--config", TINY, f"workdir={tmp / 'work'}", "generate.best_of=3"]) == 0
    assert len(called) == 1
    args, kwargs = called[0]
    assert args == () and set(kwargs) == {"config"} and isinstance(kwargs["config"], PipelineConfig)
    assert kwargs["config"].generate.best_of == 3 and kwargs["config"].workdir == str(tmp / "work")


def _db_bytes() -> bytes:
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(FULL)")
    finally:
        con.close()
    return b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))


def test_deployment_run_with_a_secret_is_refused_by_the_server(prefect_harness):
    """A deployment's run is created by the server, before any flow code runs: the flows'
    parameter schema (typed settings and overrides) makes the server itself refuse a URI with
    credentials, so it is never stored; a clean run of the same deployment is accepted."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.utilities.callables import parameter_schema

    from flows.build_panels import build_panels

    schema = parameter_schema(build_panels).model_dump_for_openapi()
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(build_panels)
        dep = client.create_deployment(flow_id=flow_id, name="secret-check", parameter_openapi_schema=schema,
                                       enforce_parameter_schema=True)
        before = {r.id for r in client.read_flow_runs()}
        for params in ({"overrides": [f"workdir=s3://AKIAEXAMPLE:{SECRET}@bucket/x"]},
                       {"overrides": [f"panels.source={{kind: generated, uri: s3://k:{SECRET}@b/g}}"]},
                       {"config": {"workdir": f"s3://AKIAEXAMPLE:{SECRET}@bucket/x"}},
                       {"config": {"generate": {"rewrite": {"endpoint": f"http://u:{SECRET}@127.0.0.1:9/v1"}}}},
                       {"config": {"generate": {"best_of": -1}}}):
            with pytest.raises(PrefectHTTPStatusError, match="Validation failed"):
                client.create_flow_run_from_deployment(dep, parameters=params)
        good = client.create_flow_run_from_deployment(dep, parameters={"overrides": ["panels.source.count=9"]})
        new = {r.id for r in client.read_flow_runs()} - before
        client.delete_flow_run(good.id)  # never picked up by a worker: leave no scheduled run behind
    assert new == {good.id}
    assert SECRET.encode() not in _db_bytes()
