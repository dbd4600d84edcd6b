"""Specification of activation shards: exact round trips, commit order, crash resume and corruption checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from workers.activations.shards import (
    CorruptShardError,
    ManifestNotFoundError,
    ShardData,
    ShardReader,
    ShardWriter,
    activation_prefix,
    entry_name,
    model_key,
    parse_model_key,
    shard_name,
)
from workers.storage import LocalStore, ObjectStore, StorageError

ROOT = Path(__file__).resolve().parents[3]
D_MODEL = 16
N_DOCS = 24
TOKENS_PER_SHARD = 20
PREFIX = "activations/tiny@main/3/abc123"


def make_doc(doc_id: int) -> ShardData:
    """A deterministic document of 3–9 tokens whose values encode its id, so reads can be checked exactly."""
    n = 3 + (doc_id * 5) % 7
    gen = torch.Generator().manual_seed(doc_id)
    pos = torch.arange(n, dtype=torch.int32)
    return ShardData(
        activations=torch.randn(n, D_MODEL, generator=gen).to(torch.bfloat16),
        token_ids=pos.long() + 100 * doc_id,
        doc_ids=torch.full((n,), doc_id, dtype=torch.int64),
        offsets=torch.stack([pos * 4, pos * 4 + 3], dim=1),
        positions=pos,
        special_mask=pos == 0,
    )


def write_corpus(store: ObjectStore, prefix: str = PREFIX) -> ShardWriter:
    """What an extraction loop does: skip committed documents, add the rest, commit the manifest."""
    writer = ShardWriter(store, prefix, tokens_per_shard=TOKENS_PER_SHARD)
    for doc_id in range(N_DOCS):
        if doc_id not in writer.done_docs:
            writer.add(make_doc(doc_id))
    writer.finish({"model": "tiny", "layer": 3})
    return writer


def docs_by_id(reader: ShardReader) -> dict[int, list[ShardData]]:
    """Split every shard back into documents, keeping duplicates so a test can see them."""
    found: dict[int, list[ShardData]] = {}
    for shard in reader:
        for doc_id in shard.doc_ids.unique().tolist():
            rows = shard.doc_ids == doc_id
            found.setdefault(doc_id, []).append(
                ShardData.from_tensors({k: t[rows] for k, t in shard.tensors().items()})
            )
    return found


def assert_complete_and_exact(store: ObjectStore, prefix: str = PREFIX) -> ShardReader:
    reader = ShardReader(store, prefix)
    indices = [e.index for e in reader.manifest.shards]
    assert indices == sorted(set(indices))  # each shard listed once, in order
    found = docs_by_id(reader)
    assert sorted(found) == list(range(N_DOCS))
    for doc_id, copies in found.items():
        assert len(copies) == 1, f"document {doc_id} stored {len(copies)} times"
        expected, got = make_doc(doc_id).tensors(), copies[0].tensors()
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name].dtype == expected[name].dtype or name == "token_ids", name
            assert torch.equal(got[name].to(expected[name].dtype), expected[name]), name
    return reader


def test_round_trip_is_exact_in_bf16(object_store: ObjectStore) -> None:
    write_corpus(object_store)
    reader = assert_complete_and_exact(object_store)
    m = reader.manifest
    assert (m.d_model, m.dtype, m.n_docs) == (D_MODEL, "bfloat16", N_DOCS)
    assert m.n_tokens == sum(make_doc(d).n_tokens for d in range(N_DOCS))
    assert m.metadata == {"model": "tiny", "layer": 3}
    assert next(iter(reader)).activations.dtype == torch.bfloat16


def test_shards_hold_whole_documents_near_the_target_size(local_store: LocalStore) -> None:
    reader = assert_complete_and_exact(write_corpus(local_store).store)
    assert len(reader) > 3
    for entry in reader.manifest.shards[:-1]:
        assert TOKENS_PER_SHARD <= entry.n_tokens < TOKENS_PER_SHARD + 10  # one document may overshoot


def test_each_entry_follows_its_shard_and_the_manifest_comes_last(local_store: LocalStore) -> None:
    writes: list[str] = []
    put_bytes, put_if_absent = local_store.put_bytes, local_store.put_if_absent

    def record_put(key: str, data: bytes) -> None:
        put_bytes(key, data)
        writes.append(key.rpartition("/")[2])

    def record_put_if_absent(key: str, data: bytes) -> bool:
        written = put_if_absent(key, data)
        writes.append(key.rpartition("/")[2])
        return written

    local_store.put_bytes, local_store.put_if_absent = record_put, record_put_if_absent  # type: ignore[method-assign]
    n_shards = len(write_corpus(local_store).entries)
    expected = [name for i in range(n_shards) for name in (shard_name(i), entry_name(i))] + ["manifest.json"]
    assert writes == expected


def test_a_reader_before_the_manifest_gets_a_clear_error(object_store: ObjectStore) -> None:
    writer = ShardWriter(object_store, PREFIX, tokens_per_shard=TOKENS_PER_SHARD)
    for doc_id in range(N_DOCS):
        writer.add(make_doc(doc_id))
    with pytest.raises(ManifestNotFoundError, match="not complete") as caught:
        ShardReader(object_store, PREFIX)
    assert PREFIX in str(caught.value) and "rerun" in str(caught.value)
    writer.finish()
    assert len(ShardReader(object_store, PREFIX)) == len(writer.entries)


def test_a_flipped_byte_in_storage_is_detected_on_read(object_store: ObjectStore) -> None:
    write_corpus(object_store)
    key = f"{PREFIX}/{shard_name(1)}"
    data = bytearray(object_store.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    object_store.put_bytes(key, bytes(data))
    reader = ShardReader(object_store, PREFIX)
    reader.load(0)
    with pytest.raises(CorruptShardError) as caught:
        reader.load(1)
    err = caught.value
    assert key in str(err) and err.expected in str(err) and err.actual in str(err)
    assert err.expected == reader.manifest.shards[1].sha256 != err.actual


def test_resume_rewrites_a_committed_shard_that_no_longer_matches_its_checksum(
    local_store: LocalStore,
) -> None:
    writer = ShardWriter(local_store, PREFIX, tokens_per_shard=TOKENS_PER_SHARD)
    for doc_id in range(12):
        writer.add(make_doc(doc_id))
    damaged = local_store.root / PREFIX / shard_name(0)
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    resumed = ShardWriter(local_store, PREFIX, tokens_per_shard=TOKENS_PER_SHARD)
    assert f"{PREFIX}/{entry_name(0)}" in resumed.resume.discarded
    assert not resumed.done_docs & writer.entries[0].doc_ids
    write_corpus(local_store)
    assert_complete_and_exact(local_store)


def test_a_finished_prefix_resumes_as_complete_and_accepts_no_more(object_store: ObjectStore) -> None:
    first = write_corpus(object_store)
    again = ShardWriter(object_store, PREFIX)
    assert again.resume.complete and again.done_docs == frozenset(range(N_DOCS))
    with pytest.raises(StorageError, match="complete"):
        again.add(make_doc(0))
    assert again.finish().shards == tuple(first.entries)


def test_a_document_already_committed_is_refused(local_store: LocalStore) -> None:
    writer = ShardWriter(local_store, PREFIX, tokens_per_shard=4)
    writer.add(make_doc(5))
    with pytest.raises(ValueError, match=r"already in committed shards"):
        writer.add(make_doc(5))


def test_inconsistent_shapes_are_refused_at_the_boundary(local_store: LocalStore) -> None:
    doc = make_doc(1)
    bad = ShardData.from_tensors({**doc.tensors(), "offsets": doc.offsets[:, :1]})
    with pytest.raises(ValueError, match="offsets"):
        ShardWriter(local_store, PREFIX).add(bad)


# The child freezes right after the write named on its command line, so the SIGKILL lands exactly there.
CHILD = """
import json, sys, time
from tests.workers.activations.test_shards import write_corpus
from workers.storage import open_store
spec = json.loads(sys.argv[1])
store = open_store(spec["url"], **spec["settings"])
for method in ("put_bytes", "put_if_absent"):
    def wrapped(key, data, _orig=getattr(store, method)):
        result = _orig(key, data)
        if key.endswith(spec["freeze_after"]):
            print("FROZEN", flush=True)
            time.sleep(600)
        return result
    setattr(store, method, wrapped)
write_corpus(store)
print("FINISHED", flush=True)
"""


def _reopen_spec(store: ObjectStore, request: pytest.FixtureRequest) -> dict[str, Any]:
    if isinstance(store, LocalStore):
        return {"url": store.url, "settings": {}}
    server = request.getfixturevalue("s3_server")
    settings = {"endpoint_url": server.endpoint_url, "access_key": server.access_key}
    return {"url": store.url, "settings": {**settings, "secret_key": server.secret_key}}


@pytest.mark.parametrize(
    ("crash", "freeze_after", "committed"),
    [("between_shards", entry_name(2), 3), ("mid_shard", shard_name(2), 2)],
)
def test_a_writer_killed_with_sigkill_resumes_without_missing_or_duplicate_documents(
    object_store: ObjectStore, request: pytest.FixtureRequest, crash: str, freeze_after: str, committed: int
) -> None:
    spec = {**_reopen_spec(object_store, request), "freeze_after": freeze_after}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "FROZEN"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert not object_store.exists(f"{PREFIX}/manifest.json")

    resumed = ShardWriter(object_store, PREFIX, tokens_per_shard=TOKENS_PER_SHARD)
    assert [e.index for e in resumed.resume.committed] == list(range(committed))
    expected_discarded = (f"{PREFIX}/{shard_name(2)}",) if crash == "mid_shard" else ()
    assert resumed.resume.discarded == expected_discarded
    assert resumed.done_docs == frozenset().union(*(e.doc_ids for e in resumed.resume.committed))

    write_corpus(object_store)
    reader = assert_complete_and_exact(object_store)
    assert [e.index for e in reader.manifest.shards] == list(range(len(reader)))  # no gap, no repeat


@pytest.mark.parametrize(
    "model_id",
    [
        "meta-llama/Llama-3.1-8B-Instruct",
        "Qwen/Qwen3-8B",
        "a--b/c",
        "-x/y-",
        "org/na@me%2F",
        "/abs/path/m",
        "..",
    ],
)
def test_model_ids_become_one_key_segment_and_back(model_id: str) -> None:
    segment = model_key(model_id, "refs/pr/1")
    assert "/" not in segment and segment not in (".", "..")
    assert parse_model_key(segment) == (model_id, "refs/pr/1")


def test_activation_prefix_follows_the_design_layout() -> None:
    prefix = activation_prefix("meta-llama/Llama-3.1-8B", "0123abc", 12, "c0ffee")
    assert prefix == "activations/meta-llama--Llama-3.1-8B@0123abc/12/c0ffee"
