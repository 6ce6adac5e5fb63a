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

from tasks.config import load_config
from tasks.requests import RequestError, derive_seed, expand_inputs, parse_size


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
    with pytest.raises(RequestError, match="expected file, panels or shapes"):
        expand_inputs(_cfg(tmp_path, {"kind": "webcam"}))
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
