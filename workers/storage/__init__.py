"""Object storage: one key layout over a local folder (the embedded default) or any S3-compatible bucket.

`open_store` is the one place that chooses a backend; `base` is the interface both backends implement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from workers.storage.base import (
    BucketNotFound,
    InvalidKeyError,
    MiB,
    ObjectNotFound,
    ObjectStore,
    StorageAuthError,
    StorageError,
    StorageUnreachable,
    encode_json,
    validate_key,
)
from workers.storage.local import LocalStore

__all__ = [
    "BucketNotFound",
    "InvalidKeyError",
    "LocalStore",
    "MiB",
    "ObjectNotFound",
    "ObjectStore",
    "S3Store",
    "StorageAuthError",
    "StorageError",
    "StorageUnreachable",
    "encode_json",
    "open_store",
    "validate_key",
]


def open_store(url: str | Path, **settings: Any) -> ObjectStore:
    """Open `file:///path` or a plain path as a `LocalStore`, `s3://bucket/prefix` as an `S3Store`.

    `settings` are passed to `S3Store` (endpoint_url, region, access_key, …); a local store takes none,
    so they are ignored there, letting one configuration serve both kinds of URL.
    """
    if isinstance(url, Path):
        return LocalStore(url)
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        from workers.storage.s3 import S3Store

        return S3Store(parsed.netloc, unquote(parsed.path).strip("/"), **settings)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"file URL {url!r} names host {parsed.netloc!r}; use file:///absolute/path")
        return LocalStore(url2pathname(parsed.path))
    # One-letter schemes are Windows drive letters, i.e. plain paths.
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return LocalStore(url)
    raise StorageError(
        f"unsupported storage URL {url!r}: use s3://bucket/prefix, file:///path or a local folder path"
    )


def __getattr__(name: str) -> Any:
    # Lazy re-export: `from workers.storage import S3Store` works without importing boto3 up front.
    if name == "S3Store":
        from workers.storage.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
