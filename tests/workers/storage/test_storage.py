"""Specification of the object stores; every behaviour test runs on a local folder and a real S3 server."""

from __future__ import annotations

import os
import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.s3 import S3Server
from workers.storage import (
    BucketNotFound,
    InvalidKeyError,
    LocalStore,
    ObjectNotFound,
    ObjectStore,
    StorageAuthError,
    StorageUnreachable,
    open_store,
)
from workers.storage.s3 import S3Store

MiB = 1024 * 1024


def test_bytes_and_json_round_trip_exactly(object_store: ObjectStore) -> None:
    payload = bytes(range(256)) * 33
    object_store.put_bytes("a/b/blob.bin", payload)
    object_store.put_json("a/meta.json", {"name": "x", "sizes": [1, 2, 3], "nested": {"ok": True}})
    assert object_store.get_bytes("a/b/blob.bin") == payload
    assert object_store.get_json("a/meta.json") == {"name": "x", "sizes": [1, 2, 3], "nested": {"ok": True}}


def test_put_replaces_the_previous_object(object_store: ObjectStore) -> None:
    object_store.put_bytes("k", b"old")
    object_store.put_bytes("k", b"new")
    assert object_store.get_bytes("k") == b"new"


def test_missing_key_raises_object_not_found_and_exists_is_false(object_store: ObjectStore) -> None:
    assert not object_store.exists("nope/x")
    with pytest.raises(ObjectNotFound, match="nope/x"):
        object_store.get_bytes("nope/x")


def test_delete_removes_and_is_idempotent(object_store: ObjectStore) -> None:
    object_store.put_bytes("d/x", b"1")
    object_store.delete("d/x")
    object_store.delete("d/x")
    assert not object_store.exists("d/x")
    assert list(object_store.list("d/")) == []


def test_list_is_a_sorted_string_prefix_match(object_store: ObjectStore) -> None:
    for key in ["a/b/2", "a/b/1", "a/bc", "a/c/d/e", "z"]:
        object_store.put_bytes(key, key.encode())
    assert list(object_store.list("a/b")) == ["a/b/1", "a/b/2", "a/bc"]
    assert list(object_store.list("a/b/")) == ["a/b/1", "a/b/2"]
    assert list(object_store.list()) == ["a/b/1", "a/b/2", "a/bc", "a/c/d/e", "z"]
    assert list(object_store.list("missing/")) == []


def test_list_pages_through_more_keys_than_one_page(s3_server: S3Server, local_store: LocalStore) -> None:
    s3 = s3_server.store("paging", page_size=3)
    pages: list[int] = []
    s3.client.meta.events.register("after-call.s3.ListObjectsV2", lambda **kw: pages.append(1))
    keys = [f"p/k{i:02d}" for i in range(11)]
    for store in (s3, local_store):
        for key in keys:
            store.put_bytes(key, b".")
        assert list(store.list("p/")) == keys
    assert len(pages) >= 4  # 11 keys at 3 per page cannot come back in fewer requests


def test_large_file_round_trips_through_multipart(s3_server: S3Server, tmp_path: Path) -> None:
    store = s3_server.store("multipart", multipart_threshold=1 * MiB, multipart_chunksize=5 * MiB)
    parts: list[int] = []
    store.client.meta.events.register("after-call.s3.UploadPart", lambda **kw: parts.append(1))
    data = os.urandom(11 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    store.upload_file("big/file.bin", src)
    store.put_bytes("big/bytes.bin", data)
    assert len(parts) >= 6  # 11 MiB in 5 MiB parts is 3 parts, for each of the two uploads
    out = tmp_path / "out" / "copy.bin"
    store.download_file("big/file.bin", out)
    assert out.read_bytes() == data
    assert store.get_bytes("big/bytes.bin") == data


def test_upload_and_download_local_files(object_store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(os.urandom(300_000))
    object_store.upload_file("files/in.bin", src)
    dest = tmp_path / "deep" / "out.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"stale")
    object_store.download_file("files/in.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out.bin"]  # no partial download left
    with pytest.raises(ObjectNotFound):
        object_store.download_file("files/absent.bin", tmp_path / "absent.bin")


def test_put_if_absent_refuses_the_second_writer(object_store: ObjectStore) -> None:
    assert object_store.put_if_absent("locks/manifest.json", b"first")
    assert not object_store.put_if_absent("locks/manifest.json", b"second")
    assert object_store.get_bytes("locks/manifest.json") == b"first"
    assert object_store.put_json("locks/j.json", {"v": 1}, if_absent=True)
    assert not object_store.put_json("locks/j.json", {"v": 2}, if_absent=True)
    assert object_store.get_json("locks/j.json") == {"v": 1}


def test_emulated_conditional_put_also_refuses_the_second_writer(s3_server: S3Server) -> None:
    store = s3_server.store("emulated", conditional_put="emulate")
    assert store.put_if_absent("k", b"first")
    assert not store.put_if_absent("k", b"second")
    assert store.get_bytes("k") == b"first"


def test_put_if_absent_has_exactly_one_winner_under_a_race(object_store: ObjectStore) -> None:
    results: dict[int, bool] = {}

    def attempt(i: int) -> None:
        results[i] = object_store.put_if_absent("race/key", f"writer-{i}".encode())

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results.items() if won]
    assert len(winners) == 1
    assert object_store.get_bytes("race/key") == f"writer-{winners[0]}".encode()


def test_presigned_url_is_fetchable_without_credentials(object_store: ObjectStore) -> None:
    object_store.put_bytes("share/report.html", b"<h1>report</h1>")
    url = object_store.presigned_url("share/report.html", expires_s=60)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"<h1>report</h1>"


@pytest.mark.parametrize("key", ["../x", "a/../../x", "a/./b", "/abs", "", "a\\..\\b"])
def test_keys_that_could_escape_the_root_are_rejected(object_store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        object_store.put_bytes(key, b"x")
    with pytest.raises(InvalidKeyError):
        object_store.get_bytes(key)


def test_local_store_never_follows_a_symlink_out_of_its_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalStore(tmp_path / "root")
    store.put_bytes("placeholder", b"")
    (store.root / "link").symlink_to(outside)
    with pytest.raises(InvalidKeyError):
        store.put_bytes("link/secret", b"x")
    assert list(outside.iterdir()) == []


def test_local_write_interrupted_midway_leaves_the_old_object_and_no_debris(
    local_store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    local_store.put_bytes("obj", b"complete old value")

    def crash(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        local_store.put_bytes("obj", b"new value that never lands")
    assert local_store.get_bytes("obj") == b"complete old value"
    assert list(local_store.list()) == ["obj"]
    assert list((local_store.root / ".staging").iterdir()) == []


def test_check_passes_on_a_healthy_store(object_store: ObjectStore) -> None:
    object_store.check()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_names_the_endpoint(s3_server: S3Server) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = s3_server.store(endpoint_url=endpoint, connect_timeout=0.5, max_attempts=1)
    with pytest.raises(StorageUnreachable) as caught:
        store.check()
    assert endpoint in str(caught.value)
    assert "URL" in str(caught.value)
    with pytest.raises(StorageUnreachable):
        store.get_bytes("any")


@pytest.mark.parametrize("which", ["secret", "access"])
def test_wrong_credentials_raise_auth_error_without_leaking_the_secret(
    s3_server: S3Server, which: str
) -> None:
    secret = "wrong-secret-d41d8cd98f00b204" if which == "secret" else s3_server.secret_key
    access = s3_server.access_key if which == "secret" else "no-such-access-key"
    store = s3_server.store(access_key=access, secret_key=secret, max_attempts=1)
    for call in (store.check, lambda: store.get_bytes("x"), lambda: store.put_bytes("x", b"1")):
        with pytest.raises(StorageAuthError) as caught:
            call()
        message = str(caught.value)
        assert secret not in message
        assert "secret_key" in message and access in message


def test_missing_bucket_names_the_bucket_and_says_to_create_it(s3_server: S3Server) -> None:
    store = S3Store(
        "no-such-bucket-dfc",
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        max_attempts=1,
    )
    with pytest.raises(BucketNotFound, match="no-such-bucket-dfc") as caught:
        store.check()
    assert "create" in str(caught.value)


def test_s3_store_prefix_isolates_keys(s3_server: S3Server) -> None:
    a, b = s3_server.store("iso/a"), s3_server.store("iso/b")
    a.put_bytes("k", b"A")
    assert not b.exists("k")
    assert list(s3_server.store("iso").list()) == ["a/k"]
    a.delete("k")


def test_open_store_picks_the_implementation_from_the_url(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    local = open_store(tmp_path.as_uri())
    assert isinstance(local, LocalStore) and local.root == tmp_path.resolve()
    s3 = open_store("s3://bucket-x/some/prefix/", endpoint_url="http://127.0.0.1:9", region="eu-west-1")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.url) == ("bucket-x", "some/prefix", "s3://bucket-x/some/prefix")
    with pytest.raises(Exception, match="unsupported storage URL"):
        open_store("ftp://host/x")
