"""Job inputs: prompt files, panels datasets and the shapes source, validated before any model."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.config import ConfigError, load_config
from tasks.generate.requests import RequestError, derive_seed, expand_inputs, parse_size


def _cfg(tmp_path: Path, inputs: dict, **gen):
    overrides = [f"generate.inputs={json.dumps(inputs)}", f"workdir={tmp_path / 'w'}"]
    overrides += [f"generate.{k}={json.dumps(v)}" for k, v in gen.items()]
    return load_config(None, overrides)


def _img(path: Path, size=(100, 80), colour=(200, 30, 30)) -> Path:
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:] = colour
    a[20:50, 30:70] = 255
    Image.fromarray(a).save(path)
    return path


def test_jsonl_rows_expand_and_every_bad_row_is_rejected_with_its_reason(tmp_path):
    _img(tmp_path / "edges.png")
    _img(tmp_path / "photo.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [
        {"id": "a", "prompt": "a red circle", "task": "t2i", "size": "64x96", "count": 3},
        {"id": "b", "prompt": "a blue star", "task": "control:canny", "upper": "edges.png", "seed": 7},
        {"id": "c", "prompt": "a cat", "task": "control:canny", "control_source": "photo.jpg", "width": 128, "height": 128},
        {"id": "d", "prompt": "make it green", "task": "edit", "instruction": "make it green", "upper": "photo.jpg"},
        {"id": "e", "prompt": "x", "task": "styletransfer"},
        {"id": "f", "prompt": "", "task": "t2i"},
        {"id": "g", "prompt": "y", "task": "control:depth"},
        {"id": "h", "prompt": "y", "task": "control:canny", "upper": "nope.png"},
        {"id": "i", "prompt": "y", "task": "t2i", "size": "100x64"},
        {"id": "j", "prompt": "y", "task": "t2i", "size": "99999x64"},
        {"id": "k", "prompt": "y", "task": "t2i", "count": 0},
        {"id": "l", "prompt": "y", "task": "t2i", "count": 10**9},
        {"id": "m", "prompt": "y", "task": "control:canny", "upper": "broken.png"},
        {"id": "a", "prompt": "dup", "task": "t2i"},
        {"id": "n", "prompt": "y", "task": "edit", "upper": "photo.jpg"},
        {"id": "o", "prompt": "y", "task": "t2i", "upper": "photo.jpg"},
        {"id": "p", "prompt": "y", "task": "t2i", "size": "wide"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json", "[1, 2]"]
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(lines) + "\n")
    ex = expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(f)}, size="64x64"))

    assert ex.rows == len(lines)
    by_ref = {r["input_ref"]: r["reason"] for r in ex.rejects}
    assert by_ref == {
        "prompts.jsonl:4": "unknown_task", "prompts.jsonl:5": "empty_prompt", "prompts.jsonl:6": "missing_upper",
        "prompts.jsonl:7": "missing_upper", "prompts.jsonl:8": "bad_size", "prompts.jsonl:9": "bad_size",
        "prompts.jsonl:10": "bad_count", "prompts.jsonl:11": "bad_count", "prompts.jsonl:12": "bad_upper",
        "prompts.jsonl:13": "duplicate_id", "prompts.jsonl:14": "malformed_row",
        "prompts.jsonl:15": "unexpected_upper", "prompts.jsonl:16": "malformed_row",
        "prompts.jsonl:17": "malformed_row", "prompts.jsonl:18": "malformed_row",
    }
    # every reject says where and what: the row reference and a human-readable detail
    assert all(r["detail"] and r["stage"] == "request" for r in ex.rejects)
    assert "nope.png" in next(r["detail"] for r in ex.rejects if r["input_ref"] == "prompts.jsonl:7")

    ids = [p.id for p in ex.pairs]
    assert ids == ["a#0", "a#1", "a#2", "b#0", "c#0", "d#0"]
    a0, a1 = ex.pairs[0], ex.pairs[1]
    assert (a0.width, a0.height, a0.upper) == (64, 96, None)
    assert a0.prompt.startswith("Generate an image of 64x96") and a0.prompt.endswith("a red circle")
    assert a0.seed == derive_seed(0, "a", 0) and a1.seed == derive_seed(0, "a", 1) and a0.seed != a1.seed
    b = ex.pairs[3]
    assert b.seed == 7 and "<canny edge map>" in b.prompt
    up = np.asarray(Image.open(io.BytesIO(b.upper)))
    assert up.shape == (32, 64, 3)  # the upper panel at (width, height/2)
    c = ex.pairs[4]
    edges = np.asarray(Image.open(io.BytesIO(c.upper)))
    assert edges.shape == (64, 128, 3) and set(np.unique(edges)) <= {0, 255} and edges.max() == 255
    assert ex.pairs[5].prompt.endswith("make it green")


def test_csv_and_parquet_inputs_and_defaults(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("id,prompt,task,size\nx,a red circle,t2i,64x64\ny,,t2i,64x64\n")
    ex = expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(f)}, count_per_prompt=2))
    assert [p.id for p in ex.pairs] == ["x#0", "x#1"] and [r["reason"] for r in ex.rejects] == ["empty_prompt"]

    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (0, 0, 0)).save(buf, format="PNG")
    t = pa.table({"prompt": ["a blue square", "a cat"], "task": ["dense:depth", "t2i"], "upper": [buf.getvalue(), None]})
    pq.write_table(t, tmp_path / "p.parquet")
    ex = expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(tmp_path / "p.parquet")}, size="64x64"))
    assert [p.id for p in ex.pairs] == ["p.parquet:0#0", "p.parquet:1#0"]
    assert ex.pairs[0].upper is not None and ex.pairs[1].upper is None


def test_job_level_errors_are_raised_before_anything_runs(tmp_path):
    with pytest.raises(RequestError, match="not found"):
        expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(tmp_path / "missing.jsonl")}))
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(RequestError, match="unsupported"):
        expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(tmp_path / "p.txt")}))
    # an unknown kind is a config error now, before any job (tasks/config.py)
    with pytest.raises(ConfigError, match="generate.inputs.kind: 'webcam' is not a source kind"):
        _cfg(tmp_path, {"kind": "webcam"})
    f = tmp_path / "many.jsonl"
    f.write_text(json.dumps({"prompt": "x", "task": "t2i", "count": 50}) + "\n")
    with pytest.raises(RequestError, match="max_pairs"):
        expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(f)}, size="64x64", max_pairs=10))


def test_shapes_source_gives_every_task_a_real_upper_panel_and_is_deterministic(tmp_path):
    tasks = ["t2i", "control:canny", "control:depth", "dense:depth", "edit", "subject", "pair", "control:hed", "control:pose"]
    cfg = _cfg(tmp_path, {"kind": "shapes", "count": 9, "seed": 3, "tasks": tasks, "size": "64x64"})
    ex = expand_inputs(cfg)
    assert [p.task for p in ex.pairs] == tasks[:-1]
    assert [r["reason"] for r in ex.rejects] == ["missing_upper"]  # pose maps need people and a model
    for p in ex.pairs:
        assert (p.upper is None) == (p.task in ("t2i", "pair"))
    again = expand_inputs(cfg)
    assert [(p.id, p.seed, p.prompt, p.upper) for p in again.pairs] == [(p.id, p.seed, p.prompt, p.upper) for p in ex.pairs]


def test_parse_size():
    assert parse_size("512x256") == (512, 256) and parse_size([64, 32]) == (64, 32)
    with pytest.raises(ValueError):
        parse_size("big")


# ---------------------------------------------------------------- benchmark prompt files (issue 17)

GENEVAL_CLASSES = ["bench", "cow", "bicycle", "clock", "carrot", "suitcase", "fork", "surfboard", "dog", "umbrella"]
GENEVAL_COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]


def geneval_rows(n: int) -> list[dict]:
    """Rows in the shape of GenEval's prompts/evaluation_metadata.jsonl: {tag, include, exclude?, prompt}."""
    rows = []
    for i in range(n):
        a, b = GENEVAL_CLASSES[i % 10], GENEVAL_CLASSES[(i * 3 + 1) % 10]
        colour, k = GENEVAL_COLOURS[i % 10], 2 + i % 3
        kind = ("single_object", "two_object", "counting", "colors", "position")[i % 5]
        if kind == "single_object":
            rows.append({"tag": kind, "include": [{"class": a, "count": 1}], "prompt": f"a photo of a {a}"})
        elif kind == "two_object":
            rows.append({"tag": kind, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                         "prompt": f"a photo of a {a} and a {b}"})
        elif kind == "counting":
            rows.append({"tag": kind, "include": [{"class": a, "count": k}], "exclude": [{"class": a, "count": k + 1}],
                         "prompt": f"a photo of {k} {a}s"})
        elif kind == "colors":
            rows.append({"tag": kind, "include": [{"class": a, "count": 1, "color": colour}],
                         "prompt": f"a photo of a {colour} {a}"})
        else:
            rows.append({"tag": kind, "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": ["left of", 0]}],
                         "prompt": f"a photo of a {a} left of a {b}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_geneval_file_runs_as_it_comes_and_count_takes_its_first_rows(tmp_path):
    f = write_jsonl(tmp_path / "evaluation_metadata.jsonl", geneval_rows(553))
    ex = expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(f), "count": 4}, size="64x64"))
    assert ex.rows == 4 and not ex.rejects
    assert [p.id for p in ex.pairs] == [f"evaluation_metadata.jsonl:{i}#0" for i in range(4)]
    assert {p.task for p in ex.pairs} == {"t2i"}  # generate.task's default
    # Every field the job does not use is kept for the evaluator.
    assert ex.pairs[2].params["fields"] == {"tag": "counting", "include": [{"class": "bicycle", "count": 4}],
                                            "exclude": [{"class": "bicycle", "count": 5}]}
    assert ex.pairs[0].params["fields"] == {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}
    everything = expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(f)}, size="64x64", task="t2i"))
    assert everything.rows == 553 and len(everything.pairs) == 553
    # Another default task applies to rows that name none.
    dense = expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(f), "count": 2}, size="64x64", task="pair"))
    assert [r["reason"] for r in dense.rejects] == ["malformed_row"] * 2 and "instruction" in dense.rejects[0]["detail"]
    with pytest.raises(ConfigError, match="generate.inputs.count"):  # refused with the config, before any job
        _cfg(tmp_path, {"kind": "file", "path": str(f), "count": 0})


def test_a_prompt_too_long_for_the_context_is_rejected_with_the_positions_it_needs(tmp_path):
    import re

    rows = [{"prompt": "a red circle"}, {"prompt": ("a red circle " * 1000)[:12000]},
            {"prompt": "a blue square", "size": "2048x2048"}]
    f = write_jsonl(tmp_path / "p.jsonl", rows)
    ex = expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(f)}, size="64x64"))
    assert [p.row_id for p in ex.pairs] == ["p.jsonl:0", "p.jsonl:1"]  # 12,000 characters fit 10,240 positions
    detail = ex.rejects[0]["detail"]
    assert ex.rejects[0]["reason"] == "too_long" and ex.rejects[0]["input_ref"] == "p.jsonl:2"
    need, holds = map(int, re.search(r"need (\d+) positions.*tokenize.max_seq holds (\d+)", detail).groups())
    assert holds == 10240 and need > 256 * 257  # a 2048x2048 image alone is 256 rows of 256 codes + row ends
    # With a decoder folder named, its own context length counts (read from config.json, no weights).
    dec = tmp_path / "decoder"
    dec.mkdir()
    (dec / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    cfg = _cfg(tmp_path, {"kind": "file", "path": str(f)}, size="64x64")
    cfg.models.decoder_path = str(dec)
    ex = expand_inputs(cfg)
    assert [p.row_id for p in ex.pairs] == ["p.jsonl:0"]
    reasons = {r["input_ref"]: (r["reason"], r["detail"]) for r in ex.rejects}
    assert reasons["p.jsonl:1"][0] == reasons["p.jsonl:2"][0] == "too_long"
    need, holds = map(int, re.search(r"need (\d+) positions.*holds (\d+)", reasons["p.jsonl:1"][1]).groups())
    assert holds == 1024 and need > holds and "config.json" in reasons["p.jsonl:1"][1]
    # The count is the engine's (model/engine.py): prompt ids + 3 + rows * (cols + 1) + 1 + the SJD window.
    from model.layout import Layout
    from model.prompts import render_prompt

    prompt_ids = Layout.from_config(cfg.models).encode_prompt(render_prompt("t2i", 2048, 2048, caption="a blue square"))
    need = int(re.search(r"need (\d+) positions", reasons["p.jsonl:2"][1]).group(1))
    assert need == len(prompt_ids) + 3 + 256 * 257 + 1 + cfg.generate.sjd_window


def test_dpg_bench_csv_and_prompt_folder(tmp_path):
    # dpg_bench.csv: one row per question, the prompt repeated for each of an item's questions.
    header = "item_id,text,keywords,proposition_id,dependency,category_broad,category_detailed,tuple,question_natural_language\n"
    body = (
        "a1,a red bench in a park,,1,0,entity,whole,entity - whole (bench),Is there a bench?\n"
        "a1,a red bench in a park,,2,1,attribute,color,attribute - color (bench red),Is the bench red?\n"
        "a1,a red bench in a park,,3,0,entity,whole,entity - whole (park),Is there a park?\n"
        "b2,two dogs on a sofa,,1,0,entity,whole,entity - whole (dog),Are there dogs?\n"
    )
    f = tmp_path / "dpg_bench.csv"
    f.write_text(header + body)
    ex = expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(f)}, size="64x64"))
    assert ex.rows == 2 and [p.id for p in ex.pairs] == ["a1#0", "b2#0"]
    assert ex.pairs[0].caption == "a red bench in a park"
    fields = ex.pairs[0].params["fields"]
    assert fields["question_natural_language"] == ["Is there a bench?", "Is the bench red?", "Is there a park?"]
    assert fields["proposition_id"] == ["1", "2", "3"] and fields["category_broad"] == ["entity", "attribute", "entity"]
    assert "text" not in fields and "item_id" not in fields  # what the job read is not repeated
    one = expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(f), "count": 1}, size="64x64"))
    assert [p.id for p in one.pairs] == ["a1#0"]
    # DPG-Bench's prompts/ folder: <item_id>.txt per prompt.
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "b2.txt").write_text("two dogs on a sofa\n")
    (folder / "a1.txt").write_text("a red bench in a park")
    ex = expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(folder)}, size="64x64"))
    assert [(p.id, p.caption) for p in ex.pairs] == [("a1#0", "a red bench in a park"), ("b2#0", "two dogs on a sofa")]


def test_a_job_whose_every_row_is_rejected_says_which_and_why(tmp_path):
    from tasks.generate.requests import no_valid_rows_message

    rows = [{"prompt": ""}] * 3 + [{"prompt": "x", "task": "sculpt"}] * 4
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    ex = expand_inputs(_cfg(tmp_path, {"kind": "file", "path": str(f)}, size="64x64"))
    msg = no_valid_rows_message(ex, first=5)
    assert msg.splitlines()[0] == "generate: no valid input rows (empty_prompt: 3, unknown_task: 4) among 7 rows read; the first rejects:"
    assert "  bad.jsonl:0: empty_prompt: column 'prompt'" in msg and "  bad.jsonl:3: unknown_task:" in msg
    assert "bad.jsonl:5" not in msg and "... and 2 more" in msg
