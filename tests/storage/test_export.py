"""Exported datasets read with no PanelForge code: duckdb over the Parquet files (issue 17).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/storage/test_export.py
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage import PANELS, DatasetWriter, StorageError, open_dataset
from storage.export import export_dataset

from .helpers import token_rows

duckdb = pytest.importorskip("duckdb")  # in the test extras (pyproject.toml)


def png(seed: int, h: int = 32, w: int = 64) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def panel_rows(unit: int, n: int) -> pa.Table:
    rows = []
    for i in range(n):
        seed = unit * 100 + i
        dual = i % 2 == 1
        rows.append({"id": f"u{unit}-{i}", "task": "control:canny" if dual else "t2i", "prompt": f"prompt {seed}",
                     "caption": f"caption {seed}", "width": 64, "height": 64 if dual else 32,
                     "upper": png(seed), "lower": png(seed + 50) if dual else None, "source": "test",
                     "params": json.dumps({"seed": seed})})
    return pa.Table.from_pylist(rows, schema=PANELS)


def make_panels(root, units=(3, 4)) -> str:
    w = DatasetWriter(root, "panels", config={"test": 1}, meta={"fingerprint": "abc123"})
    for u, n in enumerate(units):
        rejects = [{"input_ref": f"file{u}.jpg", "stage": "read", "reason": "corrupt_image", "detail": "bad bytes"}]
        w.write_unit(f"{u:05d}", panel_rows(u, n), rejects)
    w.finalize()
    return str(root)


def test_duckdb_reads_an_exported_panels_dataset(tmp_path):
    src = make_panels(tmp_path / "panels")
    out = tmp_path / "export"
    summary = export_dataset(src, str(out))
    assert summary["rows"] == 7 and summary["rejects"] == 2 and summary["files"] == 2

    con = duckdb.connect()
    data = str(out / "data" / "*.parquet")
    assert con.execute(f"SELECT count(*) FROM '{data}'").fetchone()[0] == 7
    per_task = dict(con.execute(f"SELECT task, count(*) FROM '{data}' GROUP BY task ORDER BY task").fetchall())
    assert per_task == {"control:canny": 3, "t2i": 4}
    # Images in the Hugging Face Image layout: a struct {bytes, path}; the bytes are the PNG as stored.
    got = con.execute(f"SELECT id, upper.bytes, lower.bytes, lower IS NULL FROM '{data}' ORDER BY id").fetchall()
    ds = open_dataset(src)
    want = {r["id"]: r for r in ds.table().to_pylist()}
    for rid, upper, lower, lower_null in got:
        assert bytes(upper) == want[rid]["upper"]
        assert lower_null == (want[rid]["lower"] is None)
        if lower is not None:
            assert bytes(lower) == want[rid]["lower"]
    assert np.asarray(Image.open(io.BytesIO(bytes(got[0][1])))).shape == (32, 64, 3)
    seed = con.execute(f"SELECT json_extract(params, '$.seed')::INT FROM '{data}' WHERE id = 'u1-2'").fetchone()[0]
    assert seed == 102
    reasons = con.execute(f"SELECT reason, count(*) FROM '{out / 'rejects.parquet'}' GROUP BY reason").fetchall()
    assert reasons == [("corrupt_image", 2)]

    # zstd, the kind and fingerprint in each file's metadata, the datasets Image feature declared.
    f = pq.ParquetFile(out / "data" / "00000.parquet")
    assert f.metadata.row_group(0).column(0).compression == "ZSTD"
    meta = f.schema_arrow.metadata
    assert meta[b"panelforge.kind"] == b"panels" and meta[b"panelforge.fingerprint"] == b"abc123"
    assert json.loads(meta[b"huggingface"])["info"]["features"]["upper"] == {"_type": "Image"}
    assert json.loads((out / "manifest.json").read_text())["exported_from"] == ds.uri

    # A rerun writes the same files again; another folder with other files in it is refused.
    assert export_dataset(src, str(out))["rows"] == 7
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StorageError, match="not a PanelForge export"):
        export_dataset(src, str(tmp_path / "busy"))
    with pytest.raises(StorageError, match="another folder"):
        export_dataset(src, src)


def test_tokens_export_and_row_group_size(tmp_path):
    w = DatasetWriter(tmp_path / "tokens", "tokens", config={}, meta={})
    w.write_unit("00000", token_rows(0, 400, length=256))
    w.finalize()
    out = tmp_path / "tok-export"
    export_dataset(str(tmp_path / "tokens"), str(out), row_group_mb=0.1)  # ~100 KiB per group
    f = pq.ParquetFile(out / "data" / "00000.parquet")
    assert f.metadata.num_rows == 400 and f.metadata.num_row_groups > 1
    con = duckdb.connect()
    length, first = con.execute(f"SELECT len(tokens), tokens[1] FROM '{out}/data/*.parquet' WHERE id = 'u000-r005'").fetchone()
    assert (length, first) == (256, 5)


def test_the_cli_exports(tmp_path, capsys):
    from flows.cli import main

    src = make_panels(tmp_path / "panels", units=(2,))
    assert main(["datasets", "export", src, "--format", "parquet", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 2
    assert main(["datasets", "export", str(tmp_path / "nothing"), "--format", "parquet", str(tmp_path / "o2")]) == 2
