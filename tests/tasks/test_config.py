"""Configs: YAML + overrides into typed models; errors name the file, the field, the expectation."""
from __future__ import annotations

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
