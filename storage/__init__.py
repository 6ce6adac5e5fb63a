"""PanelForge storage: Arrow IPC shard datasets with manifests (DESIGN.md, "Datasets on disk")."""
from storage.dataset import (
    Dataset,
    DatasetWriter,
    open_dataset,
    rehash,
    rejects_table,
    write_shard,
)
from storage.errors import (
    ChecksumError,
    DatasetMismatchError,
    DatasetNotFoundError,
    ManifestError,
    StorageError,
    UnsupportedURIError,
)
from storage.hashing import FAST as HASH_ALGORITHM
from storage.manifest import lineage_entry, read_manifest
from storage.repair import repair
from storage.schemas import GENERATED, PANELS, REJECTS, SCHEMA_VERSION, SCHEMAS, TOKENS
from storage.uri import resolve

__all__ = [
    "GENERATED",
    "HASH_ALGORITHM",
    "PANELS",
    "REJECTS",
    "SCHEMAS",
    "SCHEMA_VERSION",
    "TOKENS",
    "ChecksumError",
    "Dataset",
    "DatasetMismatchError",
    "DatasetNotFoundError",
    "DatasetWriter",
    "ManifestError",
    "StorageError",
    "UnsupportedURIError",
    "lineage_entry",
    "open_dataset",
    "read_manifest",
    "rehash",
    "rejects_table",
    "repair",
    "resolve",
    "write_shard",
]
