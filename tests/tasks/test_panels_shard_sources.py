"""webdataset tar shards and Parquet files as panels sources, broken members included (issue 17).

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/tasks/test_panels_shard_sources.py

Every input row ends as one panel or one reject with its reason (rows in = rows out + rejects), a
rerun after an interruption finishes only the remaining units, and the same input gives the same
rows with the same tasks wherever it is built.
"""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage import open_dataset
from tasks.panels.job import run_build
from tasks.config import load_config
from tasks.panels.sources import SourceError, expand_braces, open_source

import test_s3  # its fixture: moto on 127.0.0.1, started and stopped by its pid

s3_server = test_s3.s3_server


def photo(seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    a = np.zeros((120, 160, 3), np.uint8)
    a[:] = rng.integers(40, 200, 3)
    a[30:90, 40:120] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]], cut: int | None = None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(raw if cut is None else raw[:cut])


def txt(s: str) -> bytes:
    return s.encode()


# key -> expected outcome (a reject reason, or "ok"); 00003.tar of the brace range does not exist.
WDS_EXPECTED = {
    "00000.tar/k0": "ok", "00000.tar/k1": "ok", "00000.tar/k2": "missing_caption", "00000.tar/k3": "missing_image",
    "00000.tar/k4": "corrupt_image", "00000.tar/k5": "bad_caption", "00000.tar/k6": "empty_caption",
    "00001.tar/k7": "ok", "00001.tar/k8": "missing_caption",
    "00002.tar/k9": "ok", "00002.tar/k10": "ok", "00002.tar/k11": "truncated_member",
    "00002.tar#truncated_shard": "truncated_shard", "00003.tar#missing_shard": "missing_shard",
}


def make_shards(root):
    root.mkdir()
    write_tar(root / "00000.tar", [
        ("k0.jpg", photo(0)), ("k0.txt", txt("a grey box on a plain wall")),
        ("k1.png", photo(1, "PNG")), ("k1.json", json.dumps({"caption": "a box, captioned in json", "url": "x"}).encode()),
        ("k2.jpg", photo(2)),
        ("k3.txt", txt("a caption without its image")),
        ("k4.jpg", b"\xff\xd8\xff\xe0 not a jpeg at all" * 10), ("k4.txt", txt("broken bytes")),
        ("k5.jpg", photo(5)), ("k5.json", b"{not json"),
        ("k6.jpg", photo(6)), ("k6.txt", txt("   \n")),
    ])
    write_tar(root / "00001.tar", [("k7.jpg", photo(7)), ("k7.txt", txt("a seventh box")),
                                   ("k8.jpg", photo(8)), ("k8.json", json.dumps({"caption": None}).encode())])
    members = [("k9.jpg", photo(9)), ("k9.txt", txt("a ninth box")), ("k10.jpg", photo(10)),
               ("k10.txt", txt("a tenth box")), ("k11.txt", txt("the last one")), ("k11.jpg", photo(11))]
    write_tar(root / "00002.tar", members)
    size = (root / "00002.tar").stat().st_size
    # Cut inside k11.jpg's data: the copy stopped half way (the listing sees its header, not its end).
    cut = size - 1024 - len(photo(11)) // 2 - 512
    write_tar(root / "00002.tar", members, cut=cut)
    return str(root / "{00000..00003}.tar")


def _cfg(tmp_path, source: dict, out: str = "out", rows_per_unit: int = 4):
    return load_config("configs/tiny.yaml", [
        f"workdir={tmp_path / out}", "panels.stage_size=64", "panels.stage_sizes=null",
        f"panels.rows_per_unit={rows_per_unit}", f"panels.source={json.dumps(source)}",
        "panels.tasks={t2i: 1, control:canny: 1, dense:hed: 1}",
    ])


def _check_accounting(summary, expected: dict):
    assert summary["rows_in"] == len(expected) and summary["balanced"]
    assert summary["rows_out"] + summary["rejects"] == summary["rows_in"]
    ds = open_dataset(summary["dataset"], verify=True)
    rows = {r["id"]: r for r in ds.table(["id", "task", "caption"]).to_pylist()}
    rejects = ds.rejects().to_pylist()
    assert set(rows) == {k for k, v in expected.items() if v == "ok"}
    assert len(rejects) == sum(v != "ok" for v in expected.values())
    return rows, rejects


def test_webdataset_shards_with_broken_members(tmp_path):
    assert expand_braces("s3://b/p/{00008..00011}.tar") == [f"s3://b/p/000{n:02d}.tar" for n in (8, 9, 10, 11)]
    pattern = make_shards(tmp_path / "shards")
    src = open_source({"kind": "webdataset", "path": pattern})
    assert len(src) == len(WDS_EXPECTED)
    summary = run_build(_cfg(tmp_path, {"kind": "webdataset", "path": pattern}), use_ray=False)
    rows, rejects = _check_accounting(summary, WDS_EXPECTED)
    assert rows["00000.tar/k1"]["caption"] == "a box, captioned in json"
    assert rows["00000.tar/k0"]["caption"] == "a grey box on a plain wall"
    # Each reject names its sample (shard:key) or its shard, with the reason expected for it.
    got = {r["input_ref"].rsplit("/", 1)[-1]: r for r in rejects}
    want = {(k.split("#")[0] if "#" in k else k.replace("/", ":")): v for k, v in WDS_EXPECTED.items() if v != "ok"}
    assert {ref: r["reason"] for ref, r in got.items()} == want
    assert "00003.tar" in got["00003.tar"]["detail"] and "k11.jpg" in got["00002.tar:k11"]["detail"]
    assert "after 3 samples" in got["00002.tar"]["detail"]
    # A folder of shards lists the same samples (minus the missing one of the range).
    assert len(open_source({"kind": "webdataset", "path": str(tmp_path / "shards")})) == len(WDS_EXPECTED) - 1


def test_webdataset_resume_and_unit_determinism(tmp_path):
    pattern = make_shards(tmp_path / "shards")
    cfg = _cfg(tmp_path, {"kind": "webdataset", "path": pattern}, rows_per_unit=3)

    class Stop(Exception):
        pass

    def stop_after_two(state):
        if state["units_done"] == 2:
            raise Stop

    with pytest.raises(Stop):
        run_build(cfg, progress=stop_after_two, use_ray=False)
    summary = run_build(cfg, use_ray=False)
    assert summary["units_skipped"] == 2 and summary["units_run"] == summary["units_total"] - 2
    rows, _ = _check_accounting(summary, WDS_EXPECTED)
    fresh = run_build(_cfg(tmp_path, {"kind": "webdataset", "path": pattern}, out="again", rows_per_unit=3),
                      use_ray=False)
    again = {r["id"]: r for r in open_dataset(fresh["dataset"]).table(["id", "task", "caption"]).to_pylist()}
    assert again == rows  # same ids, same task per row, same captions


def _hf_image(data: bytes | None, path: str | None = None):
    return {"bytes": data, "path": path}


PQ_EXPECTED = {
    "a.parquet#0": "ok", "a.parquet#1": "ok", "a.parquet#2": "missing_image", "a.parquet#3": "corrupt_image",
    "a.parquet#4": "missing_caption", "b.parquet#0": "ok", "b.parquet#1": "missing_image",
    "b.parquet#2": "empty_caption", "c.parquet#unreadable_shard": "unreadable_shard",
}


def make_parquet(root):
    root.mkdir()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature
    a = pa.table({
        "picture": pa.array([_hf_image(photo(20), "p20.jpg"), _hf_image(photo(21, "PNG")), None,
                             _hf_image(b"garbage" * 20), _hf_image(photo(24))], type=image_type),
        "alt_text": ["a box in parquet", "a png box", "no image", "broken image", None],
    })
    pq.write_table(a, root / "a.parquet", row_group_size=2)
    b = pa.table({  # plain binary works too; a path-only image (not embedded) is a reject that says so
        "picture": pa.array([_hf_image(photo(30)), _hf_image(None, "/elsewhere/p31.jpg"), _hf_image(photo(32))],
                            type=image_type),
        "alt_text": ["a box from the second file", "path only", "  "],
    })
    pq.write_table(b, root / "b.parquet")
    (root / "c.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    return str(root)


def test_parquet_with_image_bytes_and_broken_rows(tmp_path):
    folder = make_parquet(tmp_path / "pq")
    spec = {"kind": "parquet", "path": folder, "image_column": "picture", "caption_column": "alt_text"}
    summary = run_build(_cfg(tmp_path, spec, rows_per_unit=3), use_ray=False)
    rows, rejects = _check_accounting(summary, PQ_EXPECTED)
    assert rows["a.parquet#0"]["caption"] == "a box in parquet" and rows["b.parquet#0"]["caption"].startswith("a box")
    got = {r["input_ref"].rsplit("/", 1)[-1]: r["reason"] for r in rejects}
    assert got == {k.replace("#", " row ") if "unreadable" not in k else k.split("#")[0]: v
                   for k, v in PQ_EXPECTED.items() if v != "ok"}
    assert any("path only" in r["detail"] and "embedded" in r["detail"] for r in rejects)
    # Resume: a rerun skips every unit; the same rows come back.
    again = run_build(_cfg(tmp_path, spec, rows_per_unit=3), use_ray=False)
    assert again["units_run"] == 0 and again["rows_out"] == summary["rows_out"]


def test_parquet_and_webdataset_bad_specs_say_what_to_do(tmp_path):
    folder = make_parquet(tmp_path / "pq")
    (tmp_path / "pq" / "c.parquet").unlink()
    with pytest.raises(SourceError, match=r"image_column='photo' not among its columns \['picture', 'alt_text'\]"):
        open_source({"kind": "parquet", "path": folder, "image_column": "photo", "caption_column": "alt_text"})
    with pytest.raises(SourceError, match="caption_column=None"):
        open_source({"kind": "parquet", "path": folder, "image_column": "picture"})
    with pytest.raises(SourceError, match="no such file or folder"):
        open_source({"kind": "webdataset", "path": str(tmp_path / "nope")})
    with pytest.raises(SourceError, match="unknown options"):
        open_source({"kind": "webdataset", "path": folder, "colour": 1})
    with pytest.raises(SourceError, match="without .tar files"):
        open_source({"kind": "webdataset", "path": folder})


@pytest.mark.slow
def test_webdataset_through_the_ray_job(tmp_path, ray_local):
    """The same shards on Ray Data actors: the same rows and rejects as in one process."""
    pattern = make_shards(tmp_path / "shards")
    summary = run_build(_cfg(tmp_path, {"kind": "webdataset", "path": pattern}, rows_per_unit=5))
    rows, _ = _check_accounting(summary, WDS_EXPECTED)
    local = run_build(_cfg(tmp_path, {"kind": "webdataset", "path": pattern}, out="local", rows_per_unit=5),
                      use_ray=False)
    assert {r["id"]: r for r in open_dataset(local["dataset"]).table(["id", "task", "caption"]).to_pylist()} == rows


def test_a_tar_member_too_large_to_hold_is_a_reject_not_a_read(tmp_path, monkeypatch):
    import tasks.panels.sources

    monkeypatch.setattr(tasks.panels.sources, "MAX_MEMBER_BYTES", 500)  # instead of writing a 256 MiB member
    write_tar(tmp_path / "big.tar", [("a.jpg", photo(1)), ("a.txt", txt("big")), ("b.jpg", b"x" * 100),
                                     ("b.txt", txt("small"))])
    rows = open_source({"kind": "webdataset", "path": str(tmp_path / "big.tar")}).rows(0, 2)
    assert rows[0]["error"][0] == "too_large" and "a.jpg" in rows[0]["error"][1] and "image" not in rows[0]
    assert "error" not in rows[1] and rows[1]["image"] == b"x" * 100 and rows[1]["caption"] == "small"


def test_shards_on_an_object_store(tmp_path, s3_server):
    """The same sources over s3:// (moto on 127.0.0.1, started and stopped by tests/storage/test_s3.py's
    fixture): a brace range with a missing shard, a Parquet folder."""
    make_shards(tmp_path / "shards")
    pq_folder = make_parquet(tmp_path / "pq")
    for name in ("00000.tar", "00001.tar"):
        with s3_server.open_output_stream(f"panelforge-test/wds/{name}") as f:
            f.write((tmp_path / "shards" / name).read_bytes())
    for name in ("a.parquet", "b.parquet"):
        with s3_server.open_output_stream(f"panelforge-test/pq/{name}") as f:
            f.write((tmp_path / "pq" / name).read_bytes())
    del pq_folder

    src = open_source({"kind": "webdataset", "path": "s3://panelforge-test/wds/{00000..00002}.tar"})
    rows = src.rows(0, len(src))
    assert [r["id"] for r in rows] == [k for k in WDS_EXPECTED if k.startswith(("00000", "00001"))] + [
        "00002.tar#missing_shard"]
    outcome = {r["id"]: (r["error"][0] if r.get("error") else "ok") for r in rows}
    assert outcome["00000.tar/k3"] == "missing_image" and outcome["00002.tar#missing_shard"] == "missing_shard"
    assert rows[0]["image"] == photo(0) and rows[0]["caption"] == "a grey box on a plain wall"
    assert rows[1]["caption"] == "a box, captioned in json"

    src = open_source({"kind": "parquet", "path": "s3://panelforge-test/pq", "image_column": "picture",
                       "caption_column": "alt_text"})
    rows = src.rows(0, len(src))
    assert len(rows) == 8 and rows[0]["image"] == photo(20) and rows[5]["caption"] == "a box from the second file"
    assert rows[2]["error"][0] == "missing_image" and rows[6]["error"][0] == "missing_image"
