"""The object-store interface every backend implements, its errors, and the rules for keys.

Backends (`local.py`, `s3.py`) import this module; only `workers.storage.open_store` knows them all.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


class StorageError(Exception):
    """Base of every storage failure; the message says what to do about it."""


class ObjectNotFound(StorageError, KeyError):  # noqa: N818 - names the condition, as callers read it
    """The key does not exist in the store."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class InvalidKeyError(StorageError, ValueError):
    """A key that is empty, absolute, or climbs out of the store with `..`."""


class StorageUnreachable(StorageError):  # noqa: N818 - names the condition, as callers read it
    """The storage endpoint did not answer (wrong URL, server down, network)."""


class StorageAuthError(StorageError):
    """Credentials are missing, wrong, or lack permission."""


class BucketNotFound(StorageError):  # noqa: N818 - names the condition, as callers read it
    """The bucket named in the storage URL does not exist."""


def validate_key(key: str, *, allow_empty: bool = False) -> str:
    """Return `key` if it is a relative, `/`-separated key that cannot escape the store root."""
    if not key:
        if allow_empty:
            return key
        raise InvalidKeyError("empty storage key")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidKeyError(f"storage key {key!r} must be relative, use '/' separators and no NUL bytes")
    if any(part in ("..", ".") for part in key.split("/")):
        raise InvalidKeyError(
            f"storage key {key!r} contains a '.' or '..' segment; keys may not leave the store"
        )
    return key


def encode_json(obj: Any) -> bytes:
    """Serialise the way every JSON object in the store is written (stable, human-readable)."""
    return json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"


class ObjectStore(ABC):
    """A flat key → bytes store; keys use `/` separators and the same layout in every implementation."""

    url: str
    """Where the store points, for messages and logs (`file:///…` or `s3://bucket/prefix`)."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write `data` at `key`, replacing any previous object; a reader sees old or new, never half."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Return the object at `key`; raise `ObjectNotFound` if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists at `key`."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield every key starting with `prefix` (a string prefix, as in S3), in lexicographic order."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write `data` only if nothing exists at `key`; return False (and write nothing) if it does."""

    @abstractmethod
    def upload_file(self, key: str, path: Path) -> None:
        """Copy a local file into the store at `key`."""

    @abstractmethod
    def download_file(self, key: str, path: Path) -> None:
        """Copy the object at `key` to a local file, replacing it atomically."""

    @abstractmethod
    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A URL from which the object can be fetched without credentials (until it expires)."""

    @abstractmethod
    def check(self) -> None:
        """Verify the store is reachable and usable with a cheap call; raise a `StorageError` if not."""

    def put_json(self, key: str, obj: Any, *, if_absent: bool = False) -> bool:
        """Write `obj` as JSON; with `if_absent`, only if `key` is free. Returns whether it was written."""
        data = encode_json(obj)
        if if_absent:
            return self.put_if_absent(key, data)
        self.put_bytes(key, data)
        return True

    def get_json(self, key: str) -> Any:
        """Read and parse the JSON object at `key`."""
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise StorageError(f"{self.url}: object {key!r} is not valid JSON ({e})") from e


