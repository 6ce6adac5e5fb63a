"""Bad datasets get a clear error that names the file, and nothing is overwritten."""
from __future__ import annotations

import json

import pytest

from helpers import token_rows  # noqa: E402

from storage import (  # noqa: E402
    ChecksumError,
    DatasetNotFoundError,
    DatasetWriter,
    ManifestError,
    UnsupportedURIError,
    open_dataset,
    resolve,
)


@pytest.fixture()
def dataset(tmp_path):
    path = tmp_path / "ds"
    w = DatasetWriter(path, "tokens")
    for u in range(2):
        w.write_unit(f"{u:05d}", token_rows(u, 5))
    w.finalize()
    return path


def _edit_manifest(path, change):
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_missing_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"empty/manifest.json: no manifest"):
        open_dataset(tmp_path / "empty")


def test_truncated_manifest_is_not_overwritten(dataset):
    body = (dataset / "manifest.json").read_bytes()
    (dataset / "manifest.json").write_bytes(body[: len(body) // 2])
    with pytest.raises(ManifestError, match=r"ds/manifest.json: truncated or not JSON"):
        open_dataset(dataset)
    with pytest.raises(ManifestError, match="truncated"):
        DatasetWriter(dataset, "tokens")  # a writer must not replace what it cannot read
    assert (dataset / "manifest.json").read_bytes() == body[: len(body) // 2]
    assert (dataset / "shards" / "00000.arrow").exists()


def test_unknown_schema_version(dataset):
    _edit_manifest(dataset, lambda m: m.update(schema_version=99))
    with pytest.raises(ManifestError, match=r"manifest.json: schema version 99 is not supported"):
        open_dataset(dataset)
    with pytest.raises(ManifestError):
        DatasetWriter(dataset, "tokens")


def test_not_a_panelforge_manifest(dataset):
    (dataset / "manifest.json").write_text("[1, 2, 3]")
    with pytest.raises(ManifestError, match="not a PanelForge manifest"):
        open_dataset(dataset)


@pytest.mark.parametrize("name", ["../outside.arrow", "/etc/passwd", "shards/../../x.arrow"])
def test_shard_outside_root(dataset, name):
    _edit_manifest(dataset, lambda m: m["shards"][0].update(file=name))
    with pytest.raises(ManifestError, match=r"manifest.json: names a file outside the dataset's root"):
        open_dataset(dataset)
    with pytest.raises(ManifestError, match="outside"):
        DatasetWriter(dataset, "tokens", overwrite=True)  # nothing outside the root is deleted


def test_checksum_mismatch_names_the_shard(dataset):
    shard = dataset / "shards" / "00001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = open_dataset(dataset)  # cheap open does not hash
    with pytest.raises(ChecksumError, match=r"shards/00001.arrow: xxh3_128 .* does not match.*datasets repair"):
        ds.verify()
    with pytest.raises(ChecksumError, match="00001.arrow"):
        open_dataset(dataset, verify=True)


def test_missing_shard_file(dataset):
    (dataset / "shards" / "00000.arrow").unlink()
    with pytest.raises(ChecksumError, match="00000.arrow: listed in the manifest but missing"):
        open_dataset(dataset).verify()


def test_truncated_shard_file(dataset):
    shard = dataset / "shards" / "00000.arrow"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ChecksumError, match="00000.arrow: not a readable Arrow file"):
        open_dataset(dataset, check=False)[0]  # a reader that opted out of the hash check
    with pytest.raises(ChecksumError, match="00000.arrow: is 100 bytes, the manifest says .*truncated"):
        open_dataset(dataset)[0]


@pytest.mark.parametrize("uri", ["gs://bucket/x", "hdfs://nn/x", "http://host/x"])
def test_unsupported_scheme(uri):
    with pytest.raises(UnsupportedURIError, match=r"unsupported URI scheme .* supported: local paths, file://, s3://"):
        open_dataset(uri)


def test_credentials_in_uri_are_refused_without_echoing_them():
    with pytest.raises(UnsupportedURIError) as e:
        resolve("s3://AKIAEXAMPLE:topsecret@bucket/x")
    assert "topsecret" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)


def test_file_uri(dataset):
    assert len(open_dataset(f"file://{dataset}")) == 10
