"""Small builders shared by the storage tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa


def token_rows(unit: int, n: int, length: int = 16) -> pa.Table:
    """n deterministic TOKENS rows for work unit `unit`; ids are unique across units.

    Row i of unit u holds the ids u*1000 + i + k for k in range(length).
    """
    base = unit * 1000 + np.arange(n, dtype=np.int32)[:, None] + np.arange(length, dtype=np.int32)[None, :]
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * length)
    return pa.table(
        {
            "id": [f"u{unit:03d}-r{i:03d}" for i in range(n)],
            "task": ["t2i" if i % 3 else "edit" for i in range(n)],
            "bucket": ["64x64"] * n,
            "grid_h": pa.array(np.full(n, 8, np.int32)),
            "grid_w": pa.array(np.full(n, 8, np.int32)),
            "tokens": pa.ListArray.from_arrays(offsets, pa.array(base.ravel())),
            "loss_start": pa.array(np.full(n, 3, np.int32)),
        }
    )


@contextmanager
def moto_s3(bucket: str | None = None, secret: str = "s3-test-secret-value"):
    """A local S3-compatible server (moto in server mode) on 127.0.0.1, started here and stopped by
    its pid; the AWS_* variables point pyarrow at it while the block runs (credentials from the
    environment only, as in production). Yields a pyarrow S3FileSystem, with `bucket` created."""
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.time() + 60
        while True:  # the server is up when it accepts a connection
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("moto_server did not start within 60 s") from None
                time.sleep(0.2)
        os.environ.update(env)
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                               secret_key=secret, region="us-east-1", allow_bucket_creation=True)
        if bucket:
            fs.create_dir(bucket)
        yield fs
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
