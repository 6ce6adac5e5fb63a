"""Evaluation of generated pairs: the shape detector's measured accuracy, the figures of a perfect and
of an unconditioned "generator" against their floors, the report files, the Ray path.

    .venv/bin/python -m pytest -q tests/tasks/test_evaluate.py
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from storage import GENERATED, DatasetWriter, open_dataset
from tasks.shapes import scenes as shapes
from tasks.config import load_config
from tasks.evaluate.job import partners, run_evaluate
from tasks.generate.requests import expand_inputs, png_bytes
from tasks.shapes.detector import agreement, asked_shapes, detect_shapes

TASKS = ["t2i", "control:canny", "control:depth", "dense:depth", "dense:canny"]


def _config(tmp_path: Path, count: int = 20, size: str = "128x128"):
    return load_config("configs/tiny.yaml", [
        f"workdir={tmp_path}", f"generate.inputs={{kind: shapes, count: {count}, seed: 0, tasks: {json.dumps(TASKS)}}}",
        f"generate.size={size}", "evaluate.rows_per_unit=8", "evaluate.workers=1"])


def _truth_panel(pair, seed_shift: int = 0) -> np.ndarray:
    """What a perfect model would draw for a pair: the scene itself, or its map for dense tasks.
    seed_shift != 0 draws ANOTHER scene: a sample that ignores its input."""
    from tasks.panels.annotators import canny

    seed = int(pair.source.split(":")[1]) + seed_shift
    dual = pair.task != "t2i"
    scene = shapes.render_scene(seed, pair.width, pair.height // 2 if dual else pair.height)
    if pair.task == "dense:depth":
        return np.repeat(scene.depth_vis[..., None], 3, axis=2)
    if pair.task == "dense:canny":
        return np.repeat(canny(scene.image)[..., None], 3, axis=2)
    return scene.image


def write_generated(tmp_path: Path, cfg, name: str, seed_shift: int = 0) -> str:
    """A GENERATED dataset built as tasks/generate/job.py writes its rows, with the pictures of a
    perfect generator (seed_shift=0) or of one that ignores its inputs."""
    pairs = expand_inputs(cfg).pairs
    rows = []
    for p in pairs:
        picture = png_bytes(_truth_panel(p, seed_shift))
        rows.append({
            "id": p.id, "task": p.task, "prompt": p.prompt, "caption": p.caption, "width": p.width,
            "height": p.height, "upper": p.upper if p.upper is not None else picture,
            "lower": picture if p.task != "t2i" else None, "source": f"generated:{p.source}",
            "params": json.dumps(dict(p.params, pair_seed=p.seed)), "seed": p.seed, "sampling": "{}",
            "model_fingerprint": "oracle" if not seed_shift else "unconditioned", "sjd_steps": 1,
            "sjd_acceptance": 1.0, "seconds": 0.0, "score": None,
        })
    uri = str(tmp_path / name)
    w = DatasetWriter(uri, kind="generated", config={}, inputs=[], meta={})
    half = len(rows) // 2
    w.write_unit("a", pa.Table.from_pylist(rows[:half], schema=GENERATED))
    w.write_unit("b", pa.Table.from_pylist(rows[half:], schema=GENERATED))
    w.finalize()
    return uri


def _by(table: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["figure"], r["task"]): r for r in table}


@pytest.mark.parametrize("size", [(128, 128), (128, 64), (64, 64)])
def test_detector_finds_asked_colour_and_shape_on_rendered_scenes(size):
    """The detector is the ruler of caption agreement: measured on 100 rendered scenes per size
    (the renderer knows the truth), it must find >= 98% of colours and >= 95% of colour+shape
    (measured 100% and about 99%), and report almost no colour that is not there."""
    asked_total = colour_hits = shape_hits = false_colours = 0
    for seed in range(7000, 7100):
        scene = shapes.render_scene(seed, *size)
        asked = asked_shapes(scene.caption)
        assert sorted(asked) == sorted((s["colour"], s["kind"]) for s in scene.shapes), scene.caption
        found = detect_shapes(scene.image)
        colour, shape = agreement(found, asked)
        asked_total += len(asked)
        colour_hits += colour * len(asked)
        shape_hits += shape * len(asked)
        false_colours += len({d.colour for d in found} - {c for c, _ in asked})
    assert colour_hits / asked_total >= 0.98
    assert shape_hits / asked_total >= 0.95
    assert false_colours <= 2
    # and it is not saying yes to everything: a scene's caption against another scene's picture
    other = [agreement(detect_shapes(shapes.render_scene(s + 1, *size).image),
                       asked_shapes(shapes.render_scene(s, *size).caption))[1] for s in range(7000, 7040)]
    assert np.mean(other) < 0.3


def test_partners_pair_rows_of_the_same_task_never_themselves():
    ids = ["d", "a", "c", "b", "e", "f"]
    tasks = ["t2i", "t2i", "control:canny", "t2i", "dense:depth", "edit"]
    got = partners(ids, tasks)
    # t2i by id: a -> b -> d -> a; the lone control row takes the next scene picture (d);
    # lone dense/edit rows have no floor
    assert got == [1, 3, 0, 0, None, None]


def test_perfect_generator_beats_the_floor_and_report_is_written(tmp_path):
    cfg = _config(tmp_path)
    uri = write_generated(tmp_path, cfg, "oracle")
    summary = run_evaluate(cfg, uri, use_ray=False)
    fig = _by(summary["table"])
    assert summary["rows"] == 20 and not summary["errors"]
    canny = fig[("canny_f1", "control:canny")]
    assert canny["rows"] == 4 and canny["generated"] == 1.0 and canny["floor"] < 0.3
    assert fig[("canny_f1", "dense:canny")]["generated"] == 1.0
    depth = fig[("depth_rmse", "control:depth")]
    assert depth["rows"] == 4 and depth["generated"] < 0.05 and depth["floor"] > 4 * depth["generated"]
    assert fig[("depth_rmse", "dense:depth")]["generated"] == 0.0
    t2i = fig[("caption_shape", "t2i")]
    assert t2i["rows"] == 4 and t2i["generated"] >= 0.9 and t2i["floor"] < 0.5
    assert fig[("caption_colour", "t2i")]["generated"] == 1.0
    assert ("caption_shape", "control:canny") in fig  # control rows' lower panels are scored too

    report = Path(summary["report"])
    assert report.parent == Path(uri) and report.name == "report.md"
    text = report.read_text()
    assert "| canny_f1 | control:canny | 4 | 1.000 |" in text and "0.49 (7B, real photos)" in text
    assert "| control:canny | 4 | not recorded |" in text  # these stand-in rows record no sampling
    assert "## Asked shapes by kind (t2i, 4 rows)" in text  # the perfect generator draws what was asked
    kinds = [line for line in text.splitlines() if line.startswith("| all |")]
    assert len(kinds) == 1 and float(kinds[0].split("|")[3]) >= 0.9
    for name in ("contact_sheet.png", "eval_control.png", "eval_captions.png"):
        assert f"]({name})" in text
        img = cv2.imread(str(Path(uri) / name))
        assert img is not None and img.shape[0] >= 160 and img.shape[1] >= 320
    assert summary["contact_sheet"] == str(Path(uri) / "contact_sheet.png")
    open_dataset(uri, verify=True)  # the report files beside the shards leave the dataset intact


def test_the_report_says_how_each_tasks_rows_were_drawn():
    """report.md's sampling table: each task's distinct `sampling` records with their row counts."""
    import pyarrow as pa

    from tasks.evaluate.report import sampling_lines

    class Rows:
        def table(self, columns):
            four = json.dumps({"cfg": 4.0, "min_p": 0.3})
            two = json.dumps({"cfg": 2.0, "min_p": 0.3, "map_guidance": "empty"})
            return pa.table({"task": ["t2i", "control:canny", "t2i", "control:canny", "edit", "dense:depth"],
                             "sampling": [four, two, four, four, "{}", "not json"]}).select(columns)

    lines = sampling_lines(Rows())
    assert "| control:canny | 1 | cfg 2.0, map_guidance empty, min_p 0.3 |" in lines
    assert "| control:canny | 1 | cfg 4.0, min_p 0.3 |" in lines and "| t2i | 2 | cfg 4.0, min_p 0.3 |" in lines
    assert "| edit | 1 | not recorded |" in lines and "| dense:depth | 1 | unreadable |" in lines


def test_unconditioned_generator_scores_at_the_floor(tmp_path):
    """Pictures of other scenes: each figure falls to about its floor."""
    cfg = _config(tmp_path)
    fig = _by(run_evaluate(cfg, write_generated(tmp_path, cfg, "unconditioned", seed_shift=1000), use_ray=False)["table"])
    canny = fig[("canny_f1", "control:canny")]
    assert canny["generated"] < 0.3 and abs(canny["generated"] - canny["floor"]) < 0.15
    depth = fig[("depth_rmse", "control:depth")]
    assert depth["generated"] > 0.1
    assert fig[("caption_shape", "t2i")]["generated"] < 0.5


def test_rows_without_truth_are_left_out_not_guessed(tmp_path):
    """A control:depth row that is not a shapes scene (no seed to re-render) and no depth estimator
    configured: no depth figure for it, and the other figures still come out."""
    cfg = _config(tmp_path, count=10)
    uri = write_generated(tmp_path, cfg, "mixed")
    ds = open_dataset(uri)
    table = ds.table().to_pylist()
    for r in table:
        r["source"] = "generated:prompts.jsonl:3"
    out = str(tmp_path / "no-seed")
    w = DatasetWriter(out, kind="generated", config={}, inputs=[], meta={})
    w.write_unit("a", pa.Table.from_pylist(table, schema=GENERATED))
    w.finalize()
    fig = _by(run_evaluate(cfg, out, use_ray=False)["table"])
    assert not any(k[0] == "depth_rmse" for k in fig)
    assert fig[("canny_f1", "control:canny")]["generated"] == 1.0


def test_a_panels_dataset_is_refused_with_the_reason(tmp_path):
    w = DatasetWriter(str(tmp_path / "panels"), kind="panels", config={}, inputs=[], meta={})
    w.finalize()
    with pytest.raises(ValueError, match="evaluate needs a generated dataset"):
        run_evaluate(_config(tmp_path), str(tmp_path / "panels"), use_ray=False)


def test_ray_job_gives_the_same_figures(tmp_path, ray_local):
    cfg = _config(tmp_path, count=10)
    uri = write_generated(tmp_path, cfg, "oracle")
    local = run_evaluate(cfg, uri, use_ray=False)["table"]
    assert run_evaluate(cfg, uri, use_ray=True)["table"] == local


def test_rows_written_by_the_generate_worker_get_every_figure(tmp_path):
    """The real GenerateWorker's rows (stand-in engine, random tiny MoVQGAN): their source names the
    shapes seed and the re-rendered scene reproduces the given maps, so every figure is computed;
    a model that ignores its input scores at its floor."""
    from gen_fixtures import StandInEngine, engine_types, write_config, write_tiny_models

    from model.layout import Layout
    from model.movqgan import load_movqgan
    from tasks.generate.job import GenerateWorker, Parts, make_units, output_uri

    models = write_tiny_models(tmp_path / "models")
    inputs = {"kind": "shapes", "count": 8, "seed": 3, "tasks": TASKS[:4], "size": "64x64"}
    cfg = load_config(write_config(tmp_path, models, {"inputs": inputs, "scorer": "none"}))
    engine_types()
    movq = load_movqgan(models[1], "tiny")
    worker = GenerateWorker(cfg.model_dump(), output_uri(cfg),
                            parts=Parts(StandInEngine(movq.n_embed), Layout.from_config(cfg.models), movq, "fp"))
    w = DatasetWriter(output_uri(cfg), kind="generated")
    for u in make_units(expand_inputs(cfg).pairs, 4):
        w.commit(worker(u)["info"])
    w.finalize()
    summary = run_evaluate(cfg, use_ray=False)
    assert summary["rows"] == 8 and not summary["errors"]
    fig = _by(summary["table"])
    for key in [("canny_f1", "control:canny"), ("depth_rmse", "control:depth"), ("depth_rmse", "dense:depth"),
                ("caption_shape", "t2i"), ("caption_colour", "control:canny")]:
        assert fig[key]["rows"] == 2 and fig[key]["floor"] is not None, key
    assert fig[("caption_shape", "t2i")]["generated"] == 0.0  # random codes draw no palette shapes
    assert abs(fig[("depth_rmse", "control:depth")]["generated"] - fig[("depth_rmse", "control:depth")]["floor"]) < 0.1


def test_standard_errors_and_per_row_figures_are_written(tmp_path):
    """report.md and the table give each mean its standard error; figures.jsonl holds every row's
    figures, from which the table's means and errors are recomputed here."""
    cfg = _config(tmp_path)
    uri = write_generated(tmp_path, cfg, "unconditioned", seed_shift=1000)
    summary = run_evaluate(cfg, uri, use_ray=False)
    lines = Path(summary["figures"]).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert Path(summary["figures"]).parent == Path(uri) and len(records) >= 20
    for row in summary["table"]:
        values = np.array([r["value"] for r in records if (r["metric"], r["task"]) == (row["figure"], row["task"])])
        assert len(values) == row["rows"] == 4
        assert row["generated"] == pytest.approx(values.mean(), abs=1e-4)
        assert row["se"] == pytest.approx(values.std(ddof=1) / 2, abs=1e-4)
    depth = _by(summary["table"])[("depth_rmse", "control:depth")]
    assert depth["se"] > 0 and depth["floor_se"] > 0
    text = Path(summary["report"]).read_text()
    assert f"| depth_rmse | control:depth | 4 | {depth['generated']:.3f} | {depth['se']:.3f} |" in text


def _figures(path: Path, rows: list[tuple[str, str, str, float]]) -> str:
    path.mkdir(parents=True)
    (path / "figures.jsonl").write_text("".join(
        json.dumps({"id": i, "task": t, "metric": m, "value": v, "floor": None}) + "\n" for i, t, m, v in rows))
    return str(path)


def test_compare_pairs_rows_of_the_same_input(tmp_path):
    """Evaluations of an unconditioned and a perfect generator on the same inputs: the perfect one
    is better on the figures that measure conditioning, and a run against itself is the same."""
    from tasks.evaluate.compare import compare

    cfg = _config(tmp_path)
    good = write_generated(tmp_path, cfg, "oracle")
    bad = write_generated(tmp_path, cfg, "unconditioned", seed_shift=1000)
    run_evaluate(cfg, good, use_ray=False)
    run_evaluate(cfg, bad, use_ray=False)
    rows = {(r["figure"], r["task"]): r for r in compare([bad], [good])}
    canny = rows[("canny_f1", "control:canny")]
    assert canny["paired"] == 4 and canny["diff"] > 0.5 and canny["verdict"] == "better"
    assert rows[("depth_rmse", "dense:depth")]["diff"] < 0 and rows[("depth_rmse", "dense:depth")]["verdict"] == "better"
    assert compare([good], [bad])[0]["verdict"] == "worse"
    same = compare([good], [good])
    assert all(r["diff"] == 0 and r["verdict"] in ("same", "within noise") for r in same)


def test_compare_arithmetic_paired_and_unpaired(tmp_path):
    from tasks.evaluate.compare import compare

    base = _figures(tmp_path / "a", [("r1", "t2i", "caption_shape", 0.0), ("r2", "t2i", "caption_shape", 0.5),
                                     ("r3", "t2i", "caption_shape", 1.0)])
    new = _figures(tmp_path / "b", [("r1", "t2i", "caption_shape", 0.5), ("r2", "t2i", "caption_shape", 0.5),
                                    ("r3", "t2i", "caption_shape", 1.0)])
    (row,) = compare([base], [new])
    d = np.array([0.5, 0.0, 0.0])
    assert row["paired"] == 3 and row["diff"] == pytest.approx(d.mean(), abs=1e-4)
    assert row["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3), abs=1e-4)
    assert row["verdict"] == "within noise"  # 0.167 against an error of 0.167
    other = _figures(tmp_path / "c", [("s1", "t2i", "caption_shape", 1.0), ("s2", "t2i", "caption_shape", 0.5)])
    (row,) = compare([base], [other])  # no shared row: Welch's error
    va, vb = np.array([0.0, 0.5, 1.0]), np.array([1.0, 0.5])
    assert row["paired"] == 0 and row["diff"] == pytest.approx(vb.mean() - va.mean(), abs=1e-4)
    assert row["se"] == pytest.approx(np.sqrt(va.var(ddof=1) / 3 + vb.var(ddof=1) / 2), abs=1e-4)
    base_depth = _figures(tmp_path / "d", [(f"r{k}", "dense:depth", "depth_rmse", 0.3 + 0.01 * k) for k in range(8)])
    new_depth = _figures(tmp_path / "e", [(f"r{k}", "dense:depth", "depth_rmse", 0.2 + 0.012 * k) for k in range(8)])
    assert compare([base_depth], [new_depth])[0]["verdict"] == "better"  # a lower RMSE is better
    assert compare([new_depth], [base_depth])[0]["verdict"] == "worse"


def test_compare_refuses_bad_inputs_with_the_reason(tmp_path, capsys):
    from flows.cli import main
    from tasks.evaluate.compare import compare

    a = _figures(tmp_path / "a", [("r1", "t2i", "caption_shape", 0.0), ("r2", "t2i", "caption_shape", 1.0)])
    with pytest.raises(FileNotFoundError, match="run `panelforge evaluate`"):
        compare([a], [str(tmp_path / "never-evaluated")])
    with pytest.raises(ValueError, match="r1 .* appears twice on one side"):
        compare([a, a], [a])
    other = _figures(tmp_path / "b", [("r1", "dense:depth", "depth_rmse", 0.2)])
    with pytest.raises(ValueError, match="share no figure"):
        compare([a], [other])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "figures.jsonl").write_text('{"id": "r1", "task": "t2i"}\n')
    with pytest.raises(ValueError, match="line 1: not a figure record"):
        compare([a], [str(tmp_path / "bad")])
    assert main(["compare", a, "--vs", str(tmp_path / "bad")]) == 2
    assert "line 1: not a figure record" in capsys.readouterr().err
    assert main(["compare", a, "--vs", a, "--json", str(tmp_path / "cmp.json")]) == 0
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["rows"][0]["verdict"] == "same" and saved["rows"][0]["paired"] == 2
    with pytest.raises(ValueError, match="sigmas"):
        compare([a], [a], sigmas=0)


def test_edge_precision_and_recall_split_canny_f1(tmp_path):
    """tasks.evaluate.edges: a perfect generator's edges are the map's, exactly; another scene's
    are mostly not, even within a pixel; a negative tolerance or a panels dataset is refused with
    the reason."""
    from tasks.evaluate.edges import edge_agreement, main

    cfg = _config(tmp_path)
    perfect = edge_agreement(write_generated(tmp_path, cfg, "oracle"))
    assert perfect["rows"] == 4
    assert perfect["exact"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert perfect["within_tolerance"]["f1"] == 1.0 and perfect["edge_pixels_generated_per_map_pixel"] == 1.0
    other = edge_agreement(write_generated(tmp_path, cfg, "unconditioned", seed_shift=1000))
    assert other["exact"]["f1"] <= other["within_tolerance"]["f1"] < 0.15
    with pytest.raises(ValueError, match="tolerance must be 0 or more"):
        edge_agreement(str(tmp_path / "oracle"), tolerance=-1)
    w = DatasetWriter(str(tmp_path / "panels"), kind="panels", config={}, inputs=[], meta={})
    w.finalize()
    with pytest.raises(ValueError, match="edges needs a generated dataset"):
        edge_agreement(str(tmp_path / "panels"))
    assert main([str(tmp_path / "panels")]) == 2  # one line on stderr, no traceback
    out = tmp_path / "edges.json"
    assert main([str(tmp_path / "oracle"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["exact"]["f1"] == 1.0


def test_edge_counts_pool_pictures_and_count_a_pixel_off_only_within_the_tolerance():
    """The counts edge_agreement and bench.eval_ceiling pool: an outline drawn one pixel to the right
    is all missed exactly and all found within a pixel; a picture with no edges adds only to the map's."""
    from tasks.evaluate.edges import add_counts, new_counts, pooled

    edges_map = np.zeros((16, 16), bool)
    edges_map[4:12, 5] = True  # a vertical edge, 8 pixels
    shifted = np.roll(edges_map, 1, axis=1)
    n = new_counts()
    add_counts(n, shifted, edges_map)
    add_counts(n, np.zeros_like(edges_map), edges_map)  # a second picture where nothing is drawn
    got = pooled(n)
    assert got["exact"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert got["within_tolerance"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667}
    assert got["edge_pixels_generated_per_map_pixel"] == 0.5
    n0 = new_counts()
    add_counts(n0, shifted, edges_map, tolerance=0)
    assert pooled(n0)["within_tolerance"]["f1"] == 0.0


def test_the_ceilings_outline_mask_holds_the_pixels_near_a_region_boundary():
    from bench.eval_ceiling import outline_mask

    labels = np.zeros((20, 20), np.int32)
    labels[5:15, 5:15] = 1  # a square shape on the background
    mask = outline_mask(labels, width=2)
    assert mask[5, 10] and mask[3, 10] and mask[10, 16]  # on the outline, and 2 px off it either side
    assert not mask[10, 10] and not mask[0, 0] and not mask[10, 18]  # inside, in a corner, 3+ px away
    assert not outline_mask(np.zeros((8, 8), np.int32)).any()  # plain background: no outline


def _one_shape(kind: str, colour: str) -> np.ndarray:
    bg = shapes.sample_background(np.random.default_rng(0), colour="grey", texture="plain")
    spec = {"seed": 0, "background": bg, "shapes": [
        {"kind": kind, "colour": colour, "size_word": "large", "r": 0.3, "row": 1, "col": 1,
         "cx": 0.5, "cy": 0.5, "z": 0.4}]}
    return shapes.render_spec(spec, 128, 128).image


def test_kind_counts_split_an_asked_shape_into_drawn_other_kind_and_missing():
    """tasks.evaluate.kinds: a red circle asked of a picture of a red circle is drawn; a red star
    asked of it is there in colour only, drawn as a circle; a blue one's colour is missing."""
    from tasks.evaluate.kinds import KindCounts

    n = KindCounts()
    n.add(_one_shape("circle", "red"), [("red", "circle")])
    n.add(_one_shape("circle", "red"), [("red", "star"), ("blue", "circle")])
    t = n.table()
    assert t["circle"] == {"asked": 2, "drawn": 0.5, "colour_only": 0.0, "colour_missing": 0.5, "drawn_as": {}}
    assert t["star"] == {"asked": 1, "drawn": 0.0, "colour_only": 1.0, "colour_missing": 0.0,
                         "drawn_as": {"circle": 1}}
    assert t["all"] == {"asked": 3, "drawn": round(1 / 3, 4)} and "square" not in t


def test_kind_agreement_of_a_perfect_and_an_unconditioned_generator(tmp_path, capsys):
    """A perfect generator's t2i rows draw (almost) every asked shape, one that ignores its captions
    few; --through judges the rows' scenes through a MoVQGAN as well; a task whose picture does not
    show the scene, or a dataset without such rows, is refused with the reason."""
    from tasks.evaluate.kinds import kind_agreement, main

    cfg = _config(tmp_path, count=40)
    oracle = write_generated(tmp_path, cfg, "oracle")
    perfect = kind_agreement([oracle], through="assets/movqgan-tiny.safetensors")
    sheet = tmp_path / "misses.png"
    other = kind_agreement([write_generated(tmp_path, cfg, "unconditioned", seed_shift=1000)], sheet=str(sheet),
                           sheet_rows=3)
    assert other["sheet"] == {"path": str(sheet), "rows": 3, "kind": None}  # it misses in more than 3 rows
    drawn = cv2.imread(str(sheet))
    assert drawn.shape[0] > 3 * 128 and drawn.shape[1] >= 2 * 128  # three rows of scene | generated
    assert perfect["rows"] == other["rows"] == 8  # the t2i rows of 40 over five tasks
    assert perfect["generated"]["all"]["drawn"] >= 0.95 and other["generated"]["all"]["drawn"] < 0.3
    assert perfect["through"]["rows"] == 8
    assert 0.3 < perfect["through"]["kinds"]["all"]["drawn"] <= 1.0
    both = kind_agreement([oracle], tasks=("t2i", "control:canny"))
    assert both["rows"] == 16 and both["generated"]["all"]["asked"] > perfect["generated"]["all"]["asked"]
    with pytest.raises(ValueError, match="do not show the caption's scene"):
        kind_agreement([oracle], tasks=("dense:depth",))
    with pytest.raises(ValueError, match="sheet kind 'blob'"):
        kind_agreement([oracle], sheet=str(sheet), sheet_kind="blob")
    w = DatasetWriter(str(tmp_path / "empty"), kind="generated", config={}, inputs=[], meta={})
    w.finalize()
    with pytest.raises(ValueError, match="no t2i rows whose caption asks for shapes"):
        kind_agreement([str(tmp_path / "empty")])
    assert main([oracle, "--tasks", "dense:canny"]) == 2
    assert "do not show" in capsys.readouterr().err
    assert main([oracle, "--through", str(tmp_path / "missing.safetensors")]) == 2
    assert "MoVQGAN checkpoint not found" in capsys.readouterr().err
    panels = DatasetWriter(str(tmp_path / "panels"), kind="panels", config={}, inputs=[], meta={})
    panels.finalize()
    assert main([str(tmp_path / "panels")]) == 2
    assert "kinds needs a generated dataset" in capsys.readouterr().err
    out = tmp_path / "kinds.json"
    assert main([oracle, "--json", str(out)]) == 0
    assert "asked shapes" in capsys.readouterr().out
    assert json.loads(out.read_text())["generated"]["all"]["drawn"] == perfect["generated"]["all"]["drawn"]


def test_the_ceilings_reference_degradations_lose_more_edges_as_they_lose_more_decibels():
    """bench.eval_ceiling's yardstick: harsher JPEG or resampling costs both PSNR and canny F1."""
    from bench.eval_ceiling import psnr, reference_figures

    images = [shapes.render_scene(s, 128, 64).image for s in range(5000, 5008)]
    assert psnr(images[0], images[0]) == float("inf")
    ref = reference_figures(images)
    for better, worse in (("jpeg q90", "jpeg q60"), ("2x down, bicubic up", "4x down, bicubic up")):
        assert ref[better]["canny_f1"] > ref[worse]["canny_f1"] and ref[better]["panel_psnr_db"] > ref[worse]["panel_psnr_db"]
    assert all(0 < r["canny_f1"] < 1 and 20 < r["panel_psnr_db"] < 60 for r in ref.values())


def test_the_ceilings_paired_difference_is_per_scene():
    """bench.eval_ceiling --vs: the difference paired by scene, with its standard error and counts."""
    import pytest

    from bench.eval_ceiling import paired_difference

    d = paired_difference([0.5, 0.6, 0.7, 0.4], [0.4, 0.6, 0.5, 0.5])
    assert d == {"difference": 0.05, "se": pytest.approx(0.0645, abs=1e-4), "higher": 2, "lower": 1}
    # a constant shift is told apart exactly, however different the scenes are from each other
    assert paired_difference([0.1, 0.9, 0.5], [0.09, 0.89, 0.49])["se"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="two scenes or more"):
        paired_difference([0.5], [0.4])


def test_the_ceiling_refuses_a_missing_movqgan_before_any_work(tmp_path, capsys):
    """bench.eval_ceiling loads every MoVQGAN it is given first: a wrong --vs or --codes-vs path is
    refused with its reason and exit 2, before the scenes are scored, and nothing is written."""
    import pytest

    from bench.eval_ceiling import main

    out = tmp_path / "ceiling.json"
    for flag in ("--vs", "--codes-vs", "--movqgan"):
        with pytest.raises(SystemExit) as e:
            main([flag, str(tmp_path / "missing.safetensors"), "--out", str(out)])
        assert e.value.code == 2 and "missing.safetensors: MoVQGAN checkpoint not found" in capsys.readouterr().err
    assert not out.exists()
