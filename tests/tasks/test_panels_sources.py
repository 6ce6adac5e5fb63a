"""Sources beyond shapes: edit triplets, subject pairs (jsonl, parquet), captions tables, a depth
model from a local folder: pytest -q tests/tasks/test_panels_sources.py"""
import json

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.panels.annotators import pose_available
from tasks.panels.job import PanelMaker
from tasks.config import PanelsConfig
from tasks.panels.compose import Reject, decode_panel
from tasks.shapes.scenes import edit_pair, subject_pair
from tasks.panels.sources import SourceError, open_source


def _write(path, img):
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def _rows(maker):
    out = []
    for item in maker.source.rows(0, len(maker.source)):
        try:
            out.append(maker.make(item))
        except Reject as r:
            out.append(r.row(item.get("ref", item["id"])))
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_edit_triplets_become_edit_panels(tmp_path, fmt):
    records = []
    for seed in range(3):
        pair = edit_pair(seed, 160, 96)
        _write(tmp_path / f"src{seed}.png", pair.source.image)
        _write(tmp_path / f"tgt{seed}.png", pair.target.image)
        records.append({"source": f"src{seed}.png", "target": f"tgt{seed}.png", "instruction": pair.instruction,
                        "caption": pair.source.caption})
    records.append({"source": "src0.png", "target": "gone.png", "instruction": "x", "caption": "y"})
    records.append({"source": "src0.png", "target": "tgt0.png", "instruction": "", "caption": "y"})
    records.append({"source": "src0.png", "instruction": "x", "caption": "y"})  # no target column
    table_path = tmp_path / f"edits.{fmt}"
    if fmt == "jsonl":
        table_path.write_text("\n".join(json.dumps(r) for r in records))
    else:
        pq.write_table(pa.Table.from_pylist(records), table_path)
    maker = PanelMaker(PanelsConfig(source={"kind": "edits", "path": str(table_path)}, stage_size=128).model_dump())
    assert maker.mix == {"edit": 1.0}  # an edits source makes edit panels only
    rows = _rows(maker)
    for r, rec in zip(rows[:3], records):
        assert r["task"] == "edit" and r["prompt"].endswith(rec["instruction"]) and r["caption"] == rec["caption"]
        up, lo = decode_panel(r["upper"]), decode_panel(r["lower"])
        assert up.shape == lo.shape and (r["width"], r["height"]) == (up.shape[1], 2 * up.shape[0])
        assert not np.array_equal(up, lo)
    assert [r["reason"] for r in rows[3:]] == ["unreadable_path", "empty_instruction", "bad_row"]
    assert "gone.png" in rows[3]["detail"]


def test_subject_pairs_become_subject_panels(tmp_path):
    lines = []
    for seed in range(2):
        p = subject_pair(seed, 128, 128)
        _write(tmp_path / f"subj{seed}.png", p.subject.image)
        _write(tmp_path / f"scene{seed}.png", p.scene.image)
        lines.append(json.dumps({"subject_image": f"subj{seed}.png", "image": f"scene{seed}.png",
                                 "subject": p.description, "caption": p.scene.caption}))
    (tmp_path / "subjects.jsonl").write_text("\n".join(lines))
    maker = PanelMaker(PanelsConfig(source={"kind": "subjects", "path": str(tmp_path / "subjects.jsonl")},
                                    stage_size=64).model_dump())
    rows = _rows(maker)
    assert [r["task"] for r in rows] == ["subject", "subject"]
    assert f"displays: {subject_pair(0, 8, 8).description}, while" in rows[0]["prompt"]


def test_captions_csv_and_bad_source_specs(tmp_path):
    img = np.full((100, 100, 3), 200, np.uint8)
    cv2.circle(img, (50, 50), 30, (10, 10, 10), -1)
    _write(tmp_path / "a.png", img)
    (tmp_path / "captions.csv").write_text("file,caption\na.png,a black disc\n")
    src = open_source({"kind": "folder", "path": str(tmp_path)})
    assert len(src) == 1 and src.rows(0, 1)[0]["caption"] == "a black disc"
    with pytest.raises(SourceError, match="not a folder"):
        open_source({"kind": "folder", "path": str(tmp_path / "nope")})
    with pytest.raises(SourceError, match="expected shapes, folder"):
        open_source({"kind": "laion"})
    with pytest.raises(SourceError, match="unknown options"):
        open_source({"kind": "shapes", "count": 3, "colour": "red"})


@pytest.mark.skipif(pose_available(), reason="mediapipe is installed: pose is not dropped")
def test_pose_without_mediapipe_is_dropped_cleanly(tmp_path, caplog):
    _write(tmp_path / "a.png", np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "a.txt").write_text("a person")
    pc = PanelsConfig(source={"kind": "folder", "path": str(tmp_path)}, tasks={"control:pose": 1, "t2i": 1},
                      stage_size=64)
    maker = PanelMaker(pc.model_dump())
    assert maker.mix == {"t2i": 1.0}
    assert "control:pose" in caplog.text and "pip install .[pose]" in caplog.text


@pytest.mark.slow
def test_depth_from_a_local_transformers_model(tmp_path):
    """A tiny random Depth Anything written in the real format, loaded offline from its folder."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            patch_size=14, image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, fusion_hidden_size=16, head_hidden_size=8,
                              neck_hidden_sizes=[8, 16, 32, 32], reassemble_hidden_size=32)
    DepthAnythingForDepthEstimation(cfg).save_pretrained(tmp_path / "depth")
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=False, ensure_multiple_of=14
                      ).save_pretrained(tmp_path / "depth")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        img = np.full((96, 96, 3), 60 * i, np.uint8)
        cv2.rectangle(img, (20, 20), (70, 70), (255, 255, 255), -1)
        _write(photos / f"p{i}.png", img)
        (photos / f"p{i}.txt").write_text(f"photo {i}")
    pc = PanelsConfig(source={"kind": "folder", "path": str(photos)}, stage_size=64,
                      tasks={"control:depth": 1, "dense:depth": 1}, depth_model=str(tmp_path / "depth"),
                      depth_device="cpu")
    rows = _rows(PanelMaker(pc.model_dump()))
    assert {r["task"] for r in rows} == {"control:depth", "dense:depth"}
    for r in rows:
        depth = decode_panel(r["upper"] if r["task"] == "control:depth" else r["lower"])
        assert depth.shape[:2] == (48, 32) and depth.max() == 255 and depth.min() == 0  # min-max scaled map
        assert json.loads(r["params"])["depth_model"] == str(tmp_path / "depth")
        assert "<depth map>" in r["prompt"]
