"""The synthetic-data loop: a generated/ dataset is a source for build_panels (DESIGN.md)."""
from __future__ import annotations

import pytest

from gen_fixtures import StandInEngine, engine_types, write_config, write_tiny_models  # noqa: E402

from storage import DatasetWriter, open_dataset  # noqa: E402
from tasks.panels.job import run_build  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.generate.job import GenerateWorker, Parts, make_units, output_uri  # noqa: E402
from tasks.generate.requests import expand_inputs  # noqa: E402


def test_generated_pairs_feed_build_panels(tmp_path):
    from model.layout import Layout
    from model.movqgan import load_movqgan

    models = write_tiny_models(tmp_path / "models")
    shapes = {"kind": "shapes", "count": 4, "seed": 5, "tasks": ["t2i", "control:canny", "edit", "pair"], "size": "64x64"}
    cfg = load_config(write_config(tmp_path, models, {"inputs": shapes}))
    engine_types()
    movq = load_movqgan(models[1], "tiny")
    worker = GenerateWorker(cfg.model_dump(), output_uri(cfg),
                            parts=Parts(StandInEngine(movq.n_embed), Layout.from_config(cfg.models), movq, "fp"))
    pairs = expand_inputs(cfg).pairs
    w = DatasetWriter(output_uri(cfg), kind="generated")
    for u in make_units(pairs, 2):
        w.commit(worker(u)["info"])
    w.finalize()
    generated = open_dataset(output_uri(cfg))
    assert len(generated) == 4

    pcfg = load_config(None, [f"workdir={tmp_path / 'loop'}", f"panels.source={{kind: generated, uri: {output_uri(cfg)}}}"])
    summary = run_build(pcfg, use_ray=False)
    assert summary["rows_out"] == 4 and summary["rejects"] == 0
    panels = open_dataset(summary["dataset"])
    got = panels.table().to_pylist()
    src = {r["id"]: r for r in generated.table().to_pylist()}
    assert sorted(r["id"] for r in got) == sorted(src)
    for r in got:
        s = src[r["id"]]
        assert (r["task"], r["prompt"], r["upper"], r["lower"]) == (s["task"], s["prompt"], s["upper"], s["lower"])
    assert panels.manifest["inputs"][0]["kind"] == "generated"  # lineage: the panels know their source
