"""Configs: YAML + overrides into typed models; errors name the file, the field, the expectation."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tasks.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.name and cfg.workdir


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["ray.num_cpus=1", "workdir=s3://bucket/run", "generate.sjd=false"])
    assert cfg.ray.num_cpus == 1 and cfg.generate.sjd is False
    assert cfg.dataset_uri("panels") == "s3://bucket/run/panels"


def test_unknown_field_names_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray:\n  num_cpu: 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: ray.num_cpu: Extra inputs are not permitted"):
        load_config(bad)


def test_wrong_type_says_what_was_expected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray:\n  object_store_mb: lots\n")
    with pytest.raises(ConfigError, match=r"ray.object_store_mb: Input should be a valid integer.*got 'lots'"):
        load_config(bad)


def test_bad_yaml_missing_file_and_bad_override(tmp_path):
    (tmp_path / "x.yaml").write_text("ray: [1,\n")
    with pytest.raises(ConfigError, match="x.yaml: not valid YAML"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.workers"])
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config(None, ["name=run1", "name.x=1"])


def test_overrides_index_lists(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  stages:\n    - {px: 64, steps: 3}\n    - {px: 96, steps: 3}\n")
    cfg = load_config(cfg_file, ["train.stages.1.steps=7"])
    assert [s.steps for s in cfg.train.stages] == [3, 7]
    with pytest.raises(ConfigError, match="'5' is not an index of a list of 2"):
        load_config(cfg_file, ["train.stages.5.steps=7"])


def _install_plugin(root: Path) -> None:
    """A package declaring a scorer and a depth estimator as entry points, as pip would install it
    (a module and its .dist-info on the path)."""
    (root / "pf_plugin_demo.py").write_text(
        "import numpy as np\n"
        "class Brightness:\n"
        "    name, higher_is_better = 'brightness', True\n"
        "    def applies(self, task): return task == 't2i'\n"
        "    def score(self, task, upper, lower, caption=''): return float(np.mean(lower))\n"
        "def scorer(cfg): return Brightness()\n"
        "def estimator(cfg): return lambda image: np.asarray(image, dtype=np.float32).mean(axis=-1)\n")
    info = root / "pf_plugin_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pf-plugin-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[panelforge.scorers]\nbrightness = pf_plugin_demo:scorer\n\n"
        "[panelforge.depth_estimators]\nmean_depth = pf_plugin_demo:estimator\n")


def test_scorers_come_from_the_registry_only(tmp_path, monkeypatch):
    from tasks.plugins import estimator_names, scorer_names
    from tasks.generate.verify import make_scorers

    # A module:factory names code to import: refused, even when the code exists.
    for override in ("generate.scorer=tasks.generate.verify:CannyF1", "generate.scorer=auto,os:system",
                     "generate.depth_estimator=tasks.generate.verify:to_gray"):
        with pytest.raises(ConfigError, match="not a registered .*a config names no code to import"):
            load_config(None, [override])
    assert "brightness" not in scorer_names()
    with pytest.raises(ConfigError, match="generate.scorer: 'brightness' is not a registered scorer"):
        load_config(None, ["generate.scorer=brightness"])

    # An installed package's entry points are the way in.
    _install_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "brightness" in scorer_names() and estimator_names() == ["mean_depth"]
    cfg = load_config(None, ["generate.scorer=canny_f1,brightness", "generate.depth_estimator=mean_depth"])
    assert [s.name for s in make_scorers(cfg)] == ["canny_f1", "brightness"]
    auto = make_scorers(load_config(None, ["generate.depth_estimator=mean_depth"]))
    assert [s.name for s in auto] == ["canny_f1", "depth_rmse"]


def test_check_config_refuses_what_the_stage_cannot_use(tmp_path):
    from tasks.config import STAGES, check_config

    cfg = load_config(ROOT / "configs/tiny.yaml", [f"workdir={tmp_path / 'w'}"])
    for stage in STAGES:
        assert check_config(cfg, stage) is cfg  # the shipped config passes every stage's preflight
    assert not (tmp_path / "w").exists()  # and the preflight wrote nothing
    (tmp_path / "f").write_text("x")
    bad = load_config(ROOT / "configs/tiny.yaml", [f"workdir={tmp_path / 'f'}", "models.movqgan_path=/none.pt",
                                                   "panels.source={kind: subjects, path: /none.jsonl}"])
    with pytest.raises(ConfigError) as e:
        check_config(bad, "retrain")
    lines = str(e.value).splitlines()  # every problem, one line each, naming file and field
    assert len(lines) == 3 and all(line.startswith(f"{ROOT / 'configs/tiny.yaml'} with overrides: ") for line in lines)
    assert [line.split(": ")[1] for line in lines] == ["workdir", "panels.source.path", "models.movqgan_path"]
    # train reads neither the source nor the MoVQGAN: with a good workdir, its preflight passes.
    check_config(bad.model_copy(update={"workdir": str(tmp_path / "w")}), "train")
    with pytest.raises(ConfigError, match="panels.source.path: /none.jsonl does not exist"):
        check_config(bad.model_copy(update={"workdir": str(tmp_path / "w")}), "build-panels")


@pytest.mark.parametrize("kind,option", [("panels", "panels.overwrite=true"), ("tokens", "tokenize.overwrite=true")])
def test_resume_refusal_names_an_option_that_exists(tmp_path, kind, option):
    """A dataset made with other settings is not resumed; the message says how to start afresh
    in the words of a config, and that option validates (there is no --overwrite flag)."""
    from storage import DatasetMismatchError, DatasetWriter

    DatasetWriter(tmp_path / kind, kind, meta={"layout_fingerprint": "a"})
    with pytest.raises(DatasetMismatchError) as e:
        DatasetWriter(tmp_path / kind, kind, meta={"layout_fingerprint": "b"})
    assert option in str(e.value) and "--overwrite" not in str(e.value)
    section, field = option.split("=")[0].split(".")
    assert getattr(getattr(load_config(None, [option]), section), field) is True


def test_sjd_drafts_take_the_engine_draft_kinds_and_reach_the_rows_params():
    from model.sjd import DRAFT_KINDS
    from tasks.generate.job import sampling_of

    for kind in DRAFT_KINDS:
        cfg = load_config(None, [f"generate.sjd_drafts={kind}"])
        assert sampling_of(cfg.generate, "t2i")["drafts"] == kind
    with pytest.raises(ConfigError, match="generate.sjd_drafts: 'left' is not a draft kind"):
        load_config(None, ["generate.sjd_drafts=left"])


def test_sjd_tree_is_checked_and_reaches_the_engine_and_the_rows_params():
    """generate.sjd_tree: SIBLINGSxBRANCH, checked against the window at load time (the engine's
    own rule); the default is none, the engine's default too."""
    import inspect

    from model.engine import Engine
    from model.sjd import DEFAULT_TREE, parse_tree
    from tasks.generate.job import sampling_of

    cfg = load_config(None, ["generate.sjd_tree=2x3"])
    assert parse_tree(cfg.generate.sjd_tree) == (2, 3) and sampling_of(cfg.generate, "t2i")["tree"] == "2x3"
    for bad, what in (("2x16", "1 <= branch <= window - 1 = 15"), ("two", "expected SIBLINGSxBRANCH")):
        with pytest.raises(ConfigError, match=f"generate.sjd_tree: .*{re.escape(what)}"):
            load_config(None, [f"generate.sjd_tree={bad}"])
    load_config(None, ["generate.sjd_window=32", "generate.sjd_tree=2x16"])  # fits a longer window
    params = inspect.signature(Engine).parameters
    assert parse_tree(load_config(None, []).generate.sjd_tree) == parse_tree(DEFAULT_TREE) == (
        params["tree_siblings"].default, params["tree_branch"].default)


def test_map_guidance_names_control_tasks_or_the_kind():
    gen = load_config(None, ["generate.map_guidance=[control:canny]"]).generate
    assert gen.guides_map("control:canny") and not gen.guides_map("control:depth") and not gen.guides_map("t2i")
    gen = load_config(None, ["generate.map_guidance=[control]"]).generate
    assert gen.guides_map("control:depth") and gen.guides_map("control:hed") and not gen.guides_map("dense:depth")
    assert not load_config(None, []).generate.guides_map("control:canny")  # off unless asked


def test_sjd_drafts_default_is_the_engines():
    from model.engine import Request
    from model.sjd import DEFAULT_DRAFTS

    assert load_config(None, []).generate.sjd_drafts == DEFAULT_DRAFTS == Request("r", [1], 32, 32).drafts


def test_cfg_by_task_resolves_task_then_kind_then_cfg_and_refuses_bad_entries():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["generate.cfg=5", "generate.cfg_by_task={control: 2, control:hed: 3}"])
    gen = cfg.generate
    assert (gen.cfg_for("control:hed"), gen.cfg_for("control:canny"), gen.cfg_for("t2i"), gen.cfg_for("edit")) == (3, 2, 5, 5)
    for override, message in (
        ("generate.cfg_by_task={contrl: 2}", r"generate.cfg_by_task: unknown task 'contrl'"),
        ("generate.cfg_by_task={control:sketch: 2}", r"task 'control:sketch': the map must be one of"),
        ("generate.cfg_by_task={t2i: 0.5}", r"generate.cfg_by_task.t2i: must be >= 1, 1 turns guidance off \(got 0.5\)"),
        ("generate.cfg=0.5", r"generate.cfg: must be >= 1"),
        ("generate.temperature=-1", r"generate.temperature: must be >= 0"),
        ("generate.min_p=1", r"generate.min_p: must be in \[0, 1\), 0 keeps every code \(got 1.0\)"),
        ("generate.min_p=-0.1", r"generate.min_p: must be in \[0, 1\)"),
        ("generate.map_guidance=[edit]", r"generate.map_guidance: 'edit' is not a control task"),
        ("generate.map_guidance=[canny]", r"generate.map_guidance: 'canny' is not a control task"),
        ("generate.map_guidance=[control:sketch]", r"'control:sketch' is not a control task.*control:canny"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(ROOT / "configs/tiny.yaml", [override])
