"""The object-store path against a real S3-compatible server (moto in server mode) on 127.0.0.1.

The server runs in its own process, started here and stopped by its pid; pyarrow's S3 client
talks HTTP to it exactly as to AWS. Credentials come from the environment only.
"""
from __future__ import annotations


import pyarrow.fs as pafs
import pytest

from helpers import moto_s3, token_rows  # noqa: E402

from storage import ChecksumError, DatasetWriter, ManifestError, open_dataset  # noqa: E402

SECRET = "s3-test-secret-value"


@pytest.fixture(scope="module")
def s3_server():
    with moto_s3("panelforge-test", SECRET) as fs:
        yield fs


def test_s3_write_resume_read_verify(s3_server):
    uri = "s3://panelforge-test/datasets/tokens"
    w = DatasetWriter(uri, "tokens", meta={"layout_fingerprint": "f"})
    w.write_unit("00000", token_rows(0, 50, 32), rejects=[{"input_ref": "x", "stage": "read", "reason": "corrupt"}])
    # A new writer resumes from the manifest in the bucket.
    w = DatasetWriter(uri, "tokens", meta={"layout_fingerprint": "f"})
    assert w.done_units == {"00000"}
    w.write_unit("00001", token_rows(1, 50, 32))
    manifest = w.finalize()
    assert manifest["uri"] == uri and SECRET not in str(manifest)

    ds = open_dataset(uri, verify=True)
    assert len(ds) == 100 and ds[75]["id"] == "u001-r025"
    assert ds.take([99, 0]).column("id").to_pylist() == ["u001-r049", "u000-r000"]
    assert ds.reject_counts() == {"corrupt": 1}
    assert sorted(i.base_name for i in s3_server.get_file_info(pafs.FileSelector("panelforge-test/datasets/tokens/shards"))) == [
        "00000.arrow",
        "00001.arrow",
    ]


def test_s3_bad_manifest_and_checksum(s3_server):
    uri = "s3://panelforge-test/datasets/bad"
    w = DatasetWriter(uri, "tokens")
    w.write_unit("00000", token_rows(0, 10))
    w.finalize()
    with s3_server.open_output_stream("panelforge-test/datasets/bad/shards/00000.arrow") as f:
        f.write(b"not the shard that was written")
    with pytest.raises(ChecksumError, match=r"s3://panelforge-test/datasets/bad/shards/00000.arrow"):
        open_dataset(uri, verify=True)
    with s3_server.open_output_stream("panelforge-test/datasets/bad/manifest.json") as f:
        f.write(b'{"format": "panelforge-dat')
    with pytest.raises(ManifestError, match=r"s3://panelforge-test/datasets/bad/manifest.json: truncated"):
        open_dataset(uri)
    with pytest.raises(ManifestError):
        DatasetWriter(uri, "tokens")
