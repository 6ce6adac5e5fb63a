"""Dataset locations: local paths, file:// and s3:// URIs through pyarrow.fs.

    python -c "from storage.uri import resolve; print(resolve('out/tiny/panels'))"

Object-store credentials are never part of a URI: pyarrow's S3FileSystem reads them from the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN). The endpoint of an
S3-compatible store (MinIO, moto, Ceph) comes from AWS_ENDPOINT_URL, and the region from
AWS_DEFAULT_REGION, so the same config runs against AWS or a local store.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from storage.errors import UnsupportedURIError

SUPPORTED_SCHEMES = ("local paths", "file://", "s3://")

# scheme://user[:password]@host: the userinfo part of any URI (s3, http, ray, ...). Up to the last
# "@" of the URI, because secret keys hold "/", "+" and even "@": a path with an "@" in it is
# refused too, a price worth paying for never echoing a secret.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)\S*@")


def has_credentials(text: str) -> bool:
    """Whether a URI (or any text) carries a user or password in the `scheme://user:secret@host` form."""
    return bool(_USERINFO.search(str(text)))


def redact(text: str) -> str:
    """The text with the userinfo of every URI in it replaced by `***`, for error messages and logs."""
    return _USERINFO.sub(r"\1***@", str(text))


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # path inside fs, no trailing slash
    uri: str  # how to show it to a person (never holds credentials)
    local: bool

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def display(self, *parts: str) -> str:
        return "/".join([self.uri.rstrip("/"), *parts])


def _s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("PANELFORGE_S3_ENDPOINT")
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike) -> Location:
    """Map a dataset URI to (filesystem, path). Raises UnsupportedURIError for other schemes."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    # A one-letter scheme is a Windows drive, i.e. a local path.
    if scheme in ("", "file") or len(scheme) == 1:
        path = parsed.path if scheme == "file" else text
        absolute = str(Path(path).expanduser().resolve())
        return Location(pafs.LocalFileSystem(), absolute, absolute, True)
    if scheme == "s3":
        if "@" in parsed.netloc or has_credentials(text):
            # Do not echo the URI: it likely holds a secret.
            raise UnsupportedURIError(
                "s3 URI with credentials in it: put keys in AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or a Prefect Secret block), not in the URI"
            )
        if not parsed.netloc:
            raise UnsupportedURIError(f"{text}: an s3 URI needs a bucket (s3://bucket/prefix)")
        path = (parsed.netloc + parsed.path).rstrip("/")
        return Location(_s3_filesystem(), path, f"s3://{path}", False)
    raise UnsupportedURIError(
        f"{text}: unsupported URI scheme {scheme!r}; supported: {', '.join(SUPPORTED_SCHEMES)}"
    )
