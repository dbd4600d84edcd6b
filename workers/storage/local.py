"""`LocalStore`: the `ObjectStore` on a local folder, the embedded default (atomic writes, same key layout)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from workers.storage.base import (
    InvalidKeyError,
    MiB,
    ObjectNotFound,
    ObjectStore,
    StorageAuthError,
    StorageUnreachable,
    validate_key,
)

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


