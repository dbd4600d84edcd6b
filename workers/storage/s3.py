"""`S3Store`: the `ObjectStore` on any S3-compatible server (AWS, MinIO, SeaweedFS, Ceph, R2) via boto3."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import boto3
import botocore.exceptions as bce
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from workers.storage.base import (
    BucketNotFound,
    MiB,
    ObjectNotFound,
    ObjectStore,
    StorageAuthError,
    StorageError,
    StorageUnreachable,
    validate_key,
)

_UNREACHABLE = (
    bce.EndpointConnectionError,
    bce.ConnectTimeoutError,
    bce.ReadTimeoutError,
    bce.ConnectionClosedError,
    bce.ProxyConnectionError,
    bce.SSLError,
)
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
    "403",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_CONDITIONAL_UNSUPPORTED = {"NotImplemented", "501", "InvalidArgument", "InvalidRequest"}


class S3Store(ObjectStore):
    """A bucket (and optional key prefix) on any S3-compatible server, through boto3.

    Credentials come from `access_key`/`secret_key` when given, else boto3's usual chain (environment,
    profile, instance role). `conditional_put` chooses how `put_if_absent` works: "native" sends
    `If-None-Match: *` (AWS S3, MinIO, SeaweedFS, R2 honour it); "emulate" checks then writes, which is
    only safe with one writer per key; "auto" tries native and falls back to emulate if the server
    rejects the header as unsupported.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 4,
        page_size: int = 1000,
        conditional_put: Literal["auto", "native", "emulate"] = "auto",
    ) -> None:
        if not bucket:
            raise StorageError("no bucket given; use a storage URL of the form s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.endpoint_url = endpoint_url
        self.page_size = page_size
        self.conditional_put = conditional_put
        self._access_key = access_key
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=session_token,
            profile_name=profile,
        )
        config = Config(
            signature_version="s3v4",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # Self-hosted servers rarely have wildcard DNS for virtual-host buckets.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        self.client = session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region or session.region_name or "us-east-1",
            config=config,
        )
        """The boto3 client, for operations this class does not wrap."""

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint_url={self.endpoint_url!r})"

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def _endpoint(self) -> str:
        return self.endpoint_url or self.client.meta.endpoint_url

    def _error(self, exc: Exception, key: str | None = None) -> StorageError:
        """Map a botocore/boto3 failure to the `StorageError` a person can act on."""
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
            return self._error(exc.__context__, key)
        if isinstance(exc, _UNREACHABLE):
            return StorageUnreachable(
                f"cannot reach the S3 endpoint {self._endpoint} for {self.url}: {exc}. "
                "Check the storage URL / endpoint_url and that the server is up and reachable from here."
            )
        if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
            return StorageAuthError(
                f"no usable S3 credentials for {self.url}: set access_key and secret_key, or "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an AWS profile."
            )
        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            what = f"object {key!r} in {self.url}" if key else self.url
            if code == "NoSuchBucket":
                return BucketNotFound(
                    f"bucket {self.bucket!r} does not exist at {self._endpoint}; create it "
                    f"(e.g. `aws s3 mb s3://{self.bucket} --endpoint-url {self._endpoint}`) or fix the URL."
                )
            if code in _NOT_FOUND_CODES:
                return ObjectNotFound(f"no {what}")
            if code in _AUTH_CODES:
                # The access key id is not a secret and tells the reader which identity was used.
                who = (
                    f"access key {self._access_key!r}" if self._access_key else "boto3's default credentials"
                )
                return StorageAuthError(
                    f"S3 at {self._endpoint} refused access to {what} ({code}) for {who}: check "
                    "access_key / secret_key (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and that "
                    "this key may use the bucket."
                )
            return StorageError(f"S3 request for {what} failed: {code} {err.get('Message', '')}".strip())
        return StorageError(f"S3 request for {self.url} failed: {exc}")

    def put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        try:
            if len(data) >= self.transfer.multipart_threshold:
                self.client.upload_fileobj(io.BytesIO(data), self.bucket, full, Config=self.transfer)
            else:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data)
        except (bce.BotoCoreError, bce.ClientError, S3UploadFailedError) as e:
            raise self._error(e, key) from e

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except (bce.BotoCoreError, bce.ClientError) as e:
            raise self._error(e, key) from e

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except (bce.BotoCoreError, bce.ClientError) as e:
            err = self._error(e, key)
            if isinstance(err, ObjectNotFound):
                return False
            raise err from e

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_key(prefix, allow_empty=True)
        base = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base + prefix, PaginationConfig={"PageSize": self.page_size}
        )
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    # Some servers list folder markers; they are not objects of this layout.
                    if not obj["Key"].endswith("/"):
                        yield obj["Key"][len(base) :]
        except (bce.BotoCoreError, bce.ClientError) as e:
            raise self._error(e) from e

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (bce.BotoCoreError, bce.ClientError) as e:
            err = self._error(e, key)
            if not isinstance(err, ObjectNotFound):
                raise err from e

    def put_if_absent(self, key: str, data: bytes) -> bool:
        full = self._key(key)
        if self.conditional_put == "emulate":
            return self._put_if_absent_emulated(key, data)
        for _ in range(5):
            try:
                self.client.put_object(Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*")
                return True
            except bce.ClientError as e:
                err = e.response.get("Error", {})
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = str(err.get("Code", ""))
                if code == "PreconditionFailed" or status == 412:
                    return False
                if code == "ConditionalRequestConflict":
                    continue  # AWS: a racing conditional write is in flight; retry to learn who won
                if self.conditional_put == "auto" and code in _CONDITIONAL_UNSUPPORTED:
                    self.conditional_put = "emulate"
                    return self._put_if_absent_emulated(key, data)
                raise self._error(e, key) from e
            except bce.BotoCoreError as e:
                raise self._error(e, key) from e
        return False

    def _put_if_absent_emulated(self, key: str, data: bytes) -> bool:
        # Check-then-write is racy; the pipeline keeps one writer per key, which makes it sufficient.
        if self.exists(key):
            return False
        self.put_bytes(key, data)
        return True

    def upload_file(self, key: str, path: Path) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)
        except (bce.BotoCoreError, bce.ClientError, S3UploadFailedError) as e:
            raise self._error(e, key) from e

    def download_file(self, key: str, path: Path) -> None:
        # boto3 downloads to a temporary name and renames it, so `path` is replaced atomically.
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(path), Config=self.transfer)
        except (bce.BotoCoreError, bce.ClientError) as e:
            raise self._error(e, key) from e

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
            )
        except (bce.BotoCoreError, bce.ClientError) as e:
            raise self._error(e, key) from e

    def check(self) -> None:
        # A one-key listing exercises endpoint, credentials and bucket in one cheap request, and unlike
        # HEAD it returns an error code that tells those failures apart.
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (bce.BotoCoreError, bce.ClientError) as e:
            raise self._error(e) from e
