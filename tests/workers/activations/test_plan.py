"""Specification of planned shards: blocks fixed before extraction, so the stored bytes depend neither on which
worker extracts a block nor in which order, a resumed prefix keeps its plan, and a committed shard is never
written again."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from tests.workers.activations.test_extract import TEXTS, assert_every_document_once, make_request
from workers.activations.corpus import CorpusSpec
from workers.activations.extract import (
    DocumentCursor,
    ExtractionCancelled,
    extract,
    extract_block,
    finish_extraction,
    load_for_extraction,
    plan_extraction,
)
from workers.activations.plan import PLAN, Block, cut_blocks
from workers.activations.shards import ShardData, commit_shard, entry_name, shard_name
from workers.storage import LocalStore, StorageError


@pytest.fixture
def corpus(tmp_path: Path) -> CorpusSpec:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return CorpusSpec.files(path)


def stored_files(store: LocalStore) -> dict[str, bytes]:
    """Every object in a local store by key, with its bytes."""
    return {str(p.relative_to(store.root)): p.read_bytes() for p in sorted(store.root.rglob("*")) if p.is_file()}


def test_blocks_close_at_the_document_that_reaches_the_target_and_at_the_budget() -> None:
    counts = [5, 3, 4, 9, 1, 1, 2]
    plan = cut_blocks(counts, tokens_per_shard=8)
    assert plan.blocks == (Block(0, 0, 2, 8), Block(1, 2, 4, 13), Block(2, 4, 7, 4))
    assert (plan.n_docs, plan.n_tokens, plan.budget_reached) == (7, 25, False)
    budgeted = cut_blocks(counts, tokens_per_shard=8, max_tokens=15)
    assert budgeted.blocks == (Block(0, 0, 2, 8), Block(1, 2, 4, 13))  # document 3 reaches 15 and is kept whole
    assert budgeted.budget_reached
    assert cut_blocks(iter(counts), tokens_per_shard=100).blocks == (Block(0, 0, 7, 25),)


def test_blocks_extracted_in_any_order_by_separate_workers_store_the_same_bytes(
    tiny_models: Mapping[str, Path], tmp_path: Path, corpus: CorpusSpec
) -> None:
    request = make_request(tiny_models["llama"], corpus, batch_size=3)
    one = LocalStore(tmp_path / "one")
    extract(request, one)

    many = LocalStore(tmp_path / "many")
    plan = plan_extraction(request, many)
    assert len(plan.pending) >= 4 and not plan.committed
    workers = [(load_for_extraction(request, plan.key), DocumentCursor(request.corpus)) for _ in range(2)]
    for turn, block in enumerate(reversed(plan.pending)):  # backwards, alternating: cursors reopen, batches differ
        loaded, documents = workers[turn % 2]
        extract_block(request, plan.key, block, loaded, many, documents=documents)
    finish_extraction(request, plan, workers[1][0], many)

    assert stored_files(many) == stored_files(one)  # shards, entries, texts, plan and manifest, byte for byte
    assert_every_document_once(many, plan.key.prefix)


def test_a_resumed_prefix_keeps_the_plan_it_was_cut_by(
    tiny_models: Mapping[str, Path], tmp_path: Path, corpus: CorpusSpec
) -> None:
    store = LocalStore(tmp_path / "store")
    request = make_request(tiny_models["llama"], corpus, tokens_per_shard=64)
    done: list[int] = []
    with pytest.raises(ExtractionCancelled):
        extract(request, store, progress=lambda p: done.append(p.shards_done), should_stop=lambda: done[-1] >= 2)

    resumed = extract(make_request(tiny_models["llama"], corpus, tokens_per_shard=40), store)
    assert resumed.resumed_shards == 2 and resumed.manifest.metadata["tokens_per_shard"] == 64
    fresh = LocalStore(tmp_path / "fresh")
    extract(request, fresh)
    assert stored_files(store) == stored_files(fresh)


def test_shards_cut_by_another_plan_are_discarded_and_the_prefix_completes_as_planned(
    tiny_models: Mapping[str, Path], tmp_path: Path, corpus: CorpusSpec
) -> None:
    store = LocalStore(tmp_path / "store")
    request = make_request(tiny_models["llama"], corpus, tokens_per_shard=64)
    done: list[int] = []
    with pytest.raises(ExtractionCancelled):
        extract(request, store, progress=lambda p: done.append(p.shards_done), should_stop=lambda: done[-1] >= 2)
    prefix = plan_extraction(request, store).key.prefix
    store.delete(f"{prefix}/{PLAN}")  # as an extraction from before planned shards left its prefix

    replanned = make_request(tiny_models["llama"], corpus, tokens_per_shard=40)
    plan = plan_extraction(replanned, store)
    # Both plans put documents 0-1 in shard 0, which is kept; shard 1 holds 2-4 but is planned as 2-3: discarded.
    assert [(e.index, e.doc_runs) for e in plan.committed] == [(0, ((0, 2),))]
    assert plan.shards.blocks[1][1:3] == (2, 4)
    assert not store.exists(f"{prefix}/{entry_name(1)}") and not store.exists(f"{prefix}/{shard_name(1)}")
    assert [k.rpartition("/")[2] for k in store.list(f"{prefix}/texts-")] == ["texts-00000.jsonl"]
    extract(replanned, store)
    fresh = LocalStore(tmp_path / "fresh")
    extract(replanned, fresh)
    assert stored_files(store) == stored_files(fresh)


def test_a_committed_shard_is_never_written_again(local_store: LocalStore) -> None:
    n = 4
    shard = ShardData(
        activations=torch.randn(n, 8, dtype=torch.bfloat16),
        token_ids=torch.arange(n, dtype=torch.int32),
        doc_ids=torch.zeros(n, dtype=torch.int64),
        offsets=torch.zeros(n, 2, dtype=torch.int32),
    )
    puts: list[str] = []
    put_bytes = local_store.put_bytes

    def counting_put(key: str, data: bytes) -> None:
        puts.append(key)
        put_bytes(key, data)

    local_store.put_bytes = counting_put  # type: ignore[method-assign]
    first = commit_shard(local_store, "p", 0, shard)
    again = commit_shard(local_store, "p", 0, shard)  # a retried call after a replica died past its commit
    assert again == first and puts == [f"p/{shard_name(0)}"]
    other = ShardData.from_tensors({**shard.tensors(), "activations": shard.activations + 1})
    with pytest.raises(StorageError, match="another writer"):
        commit_shard(local_store, "p", 0, other)
    assert puts == [f"p/{shard_name(0)}"]
