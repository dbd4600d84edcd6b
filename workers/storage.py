"""Object storage: one key layout over a local folder (the embedded default) or any S3-compatible bucket.

The interface, its errors and the local folder live here; the boto3 implementation is in
`workers/s3_store.py` (re-exported as `workers.storage.S3Store`) so a purely local run never imports boto3.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

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


# Temporary files live under one reserved folder in the root so `list` can skip them and a crash
# never leaves half-written objects next to real ones.
_STAGING = ".staging"


class LocalStore(ObjectStore):
    """A local folder with the bucket's key layout; writes are atomic (temp file + `os.replace`).

    As on any filesystem, a key cannot also be the folder of other keys (`a` and `a/b`), which S3 allows.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.split("/", 1)[0] == _STAGING:
            raise InvalidKeyError(f"storage key {key!r} uses the reserved folder {_STAGING!r}")
        path = self.root / key
        # Belt and braces: a symlinked folder inside the root must not lead outside it either.
        if not path.resolve().is_relative_to(self.root):
            raise InvalidKeyError(f"storage key {key!r} resolves outside the store root {self.root}")
        return path

    def _staged(self, write: Callable[[BinaryIO], object]) -> Path:
        """Create a temp file in the staging folder, fill it with `write(file)`, fsync, return its path."""
        staging = self.root / _STAGING
        staging.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=staging, prefix="obj-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._staged(lambda f: f.write(data))
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_key(prefix, allow_empty=True)
        # Only walk the deepest folder the prefix names; the rest of the prefix filters file names.
        folder = prefix.rpartition("/")[0]
        start = self.root / folder if folder else self.root
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            if rel == ".":
                dirnames[:] = [d for d in dirnames if d != _STAGING]
                rel = ""
            for name in filenames:
                key = f"{rel}/{name}" if rel else name
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop folders the delete left empty, so the tree mirrors what a bucket would list.
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._staged(lambda f: f.write(data))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # link() fails if the target exists and publishes a complete file in one step.
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:
            # Filesystems without hard links: O_EXCL still guarantees a single winner, but a reader
            # could briefly see a partial file, so hard links are preferred above.
            try:
                with open(path, "xb") as f:
                    f.write(data)
                return True
            except FileExistsError:
                return False
        finally:
            tmp.unlink(missing_ok=True)

    def upload_file(self, key: str, path: Path) -> None:
        dest = self._path(key)
        with open(path, "rb") as src:
            tmp = self._staged(lambda f: shutil.copyfileobj(src, f, 4 * MiB))
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)

    def download_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(f"no object {key!r} in {self.url}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        # A local file needs no signature; the URL never expires.
        return self._path(key).as_uri()

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageUnreachable(f"cannot create the storage folder {self.root}: {e}") from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageAuthError(f"the storage folder {self.root} is not writable by this user")


def open_store(url: str | Path, **settings: Any) -> ObjectStore:
    """Open `file:///path` or a plain path as a `LocalStore`, `s3://bucket/prefix` as an `S3Store`.

    `settings` are passed to `S3Store` (endpoint_url, region, access_key, …); a local store takes none,
    so they are ignored there, letting one configuration serve both kinds of URL.
    """
    if isinstance(url, Path):
        return LocalStore(url)
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        from workers.s3_store import S3Store

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
        from workers.s3_store import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
