"""Errors of the storage layer; each message names the file or URI concerned."""


class StorageError(Exception):
    """Base class of every storage error."""


class UnsupportedURIError(StorageError):
    pass


class DatasetNotFoundError(StorageError):
    pass


class ManifestError(StorageError):
    """A manifest that is truncated, of an unknown version, or inconsistent."""


class ChecksumError(StorageError):
    pass


class DatasetMismatchError(StorageError):
    """Resuming a dataset with another kind, schema or meta than it was made with."""
