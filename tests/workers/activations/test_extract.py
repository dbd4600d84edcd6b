"""Specification of the extract stage: exact activations without pads, cache hits, crash resume, cancellation,
token budgets and errors that fail before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from dfc.lm.hooks import LayerSpecError, iter_document_activations
from tests.fixtures.tiny_models import TINY_CORPUS
from workers.activations import extract as extract_module
from workers.activations.corpus import CorpusSpec
from workers.activations.extract import (
    ExtractionCancelled,
    ExtractionProgress,
    ExtractionRequest,
    extract,
    extraction_prefix,
    read_texts,
)
from workers.activations.loading import ModelLoadError, load_model
from workers.activations.shards import MANIFEST, ShardData, ShardReader, entry_name, shard_name
from workers.storage import LocalStore, ObjectStore, StorageUnreachable

ROOT = Path(__file__).resolve().parents[3]
LAYER = 1
TOKENS_PER_SHARD = 64
# Twenty documents of varied length (a few tokens to a few dozen), so shards hold several whole documents.
TEXTS = TINY_CORPUS + [f"{b} {a}" for a, b in zip(TINY_CORPUS, reversed(TINY_CORPUS), strict=True)][:9] + ["Hi."]


@pytest.fixture
def corpus(tmp_path: Path) -> CorpusSpec:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return CorpusSpec.files(path)


def make_request(model: Path | str, corpus: CorpusSpec, **options: Any) -> ExtractionRequest:
    settings: dict[str, Any] = {"layer": LAYER, "device_map": None, "tokens_per_shard": TOKENS_PER_SHARD}
    return ExtractionRequest(model=str(model), revision=None, corpus=corpus, **{**settings, **options})


def stored_docs(store: ObjectStore, prefix: str) -> dict[int, list[ShardData]]:
    """Every shard split back into documents; a document stored twice shows up as two copies."""
    found: dict[int, list[ShardData]] = {}
    for shard in ShardReader(store, prefix):  # verifies every checksum
        for doc_id in shard.doc_ids.unique().tolist():
            rows = shard.doc_ids == doc_id
            found.setdefault(doc_id, []).append(
                ShardData.from_tensors({k: t[rows] for k, t in shard.tensors().items()})
            )
    return found


def assert_every_document_once(store: ObjectStore, prefix: str, n_docs: int = len(TEXTS)) -> None:
    manifest = ShardReader(store, prefix).manifest
    assert [e.index for e in manifest.shards] == list(range(len(manifest.shards)))  # none missing or repeated
    found = stored_docs(store, prefix)
    assert sorted(found) == list(range(n_docs))
    assert all(len(copies) == 1 for copies in found.values())
    texts: dict[int, str] = {}
    for entry in manifest.shards:
        shard_texts = read_texts(store, prefix, entry.index)
        assert set(shard_texts) == entry.doc_ids
        texts.update(shard_texts)
    assert texts == dict(enumerate(TEXTS[:n_docs]))
    assert not [k for k in store.list(f"{prefix}/texts-") if int(k[-11:-6]) >= len(manifest.shards)]


@pytest.mark.parametrize(("arch", "width"), [("llama", 64), ("qwen3", 96)])
def test_stored_activations_equal_a_direct_capture_and_hold_no_pads(
    tiny_models: Mapping[str, Path], object_store: ObjectStore, corpus: CorpusSpec, arch: str, width: int
) -> None:
    result = extract(make_request(tiny_models[arch], corpus), object_store)
    assert not result.cached
    assert len(result.manifest.shards) > 2
    assert result.manifest.d_model == width and result.manifest.metadata["hidden_size"] == width
    assert_every_document_once(object_store, result.prefix)

    # The reference: the full model (not truncated), other batch shapes, fp32.
    loaded = load_model(tiny_models[arch], device_map=None)
    tokenizer = loaded.tokenizer
    direct = list(iter_document_activations(loaded.model, tokenizer, TEXTS, LAYER, batch_size=3))
    stored = {doc_id: copies[0] for doc_id, copies in stored_docs(object_store, result.prefix).items()}
    for doc_id, text in enumerate(TEXTS):
        enc = tokenizer(text, return_offsets_mapping=True)
        got, want = stored[doc_id], direct[doc_id]
        assert got.activations.dtype == torch.bfloat16
        torch.testing.assert_close(got.activations.float(), want.activations.float(), rtol=2e-2, atol=2e-2)
        assert got.token_ids.tolist() == enc["input_ids"]
        assert got.offsets.tolist() == [list(o) for o in enc["offset_mapping"]]
        assert got.positions.tolist() == list(range(len(enc["input_ids"])))
        assert got.special_mask.tolist() == [i in tokenizer.all_special_ids for i in enc["input_ids"]]
    n_real = sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert result.manifest.n_tokens == n_real  # so not a single pad position was stored
    assert all(tokenizer.pad_token_id not in d.token_ids.tolist() for d in stored.values())
    meta = result.manifest.metadata
    assert (meta["layer_index"], meta["n_layers"], meta["n_loaded_layers"]) == (LAYER, loaded.n_layers, LAYER + 1)
    assert meta["tokenizer"]["vocab_size"] == len(tokenizer)
    assert meta["tokenizer"]["pad_token_id"] == tokenizer.pad_token_id
    assert meta["revision"].startswith("local-") and meta["corpus"]["description"] == corpus.describe()


def test_a_second_request_is_a_cache_hit_that_loads_no_model(
    tiny_models: Mapping[str, Path], local_store: LocalStore, corpus: CorpusSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = make_request(tiny_models["llama"], corpus)
    first = extract(request, local_store)

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cache hit must not load the model")

    monkeypatch.setattr(extract_module, "load_model", no_loading)
    again = extract(make_request(tiny_models["llama"], corpus, layer=-5, batch_size=2), local_store)
    assert again.cached and again.manifest == first.manifest
    assert extraction_prefix(request) == first.prefix == again.prefix


def test_the_key_changes_with_the_model_files_and_with_what_is_stored(
    tiny_models: Mapping[str, Path], tmp_path: Path, corpus: CorpusSpec
) -> None:
    copy = Path(shutil.copytree(tiny_models["llama"], tmp_path / "llama"))
    before = extraction_prefix(make_request(copy, corpus))
    assert extraction_prefix(make_request(copy, corpus, batch_size=1, tokens_per_shard=7)) == before
    assert extraction_prefix(make_request(copy, corpus, max_length=16)) != before
    assert extraction_prefix(make_request(copy, corpus, max_tokens=50)) != before
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert extraction_prefix(make_request(copy, corpus)) != before


CHILD = """
import json, sys, time
from workers.activations.corpus import CorpusSpec
from workers.activations.extract import extract
from workers.storage import LocalStore
from tests.workers.activations.test_extract import make_request
spec = json.loads(sys.argv[1])
store = LocalStore(spec["root"])
original = store.put_bytes
def put_bytes(key, data):
    original(key, data)
    if key.endswith(spec["freeze_after"]):  # hold still, so the SIGKILL lands mid-shard
        time.sleep(600)
store.put_bytes = put_bytes
extract(make_request(spec["model"], CorpusSpec.files(spec["corpus"])), store)
"""


def test_a_killed_extraction_resumes_without_missing_or_duplicate_documents(
    tiny_models: Mapping[str, Path], tmp_path: Path, corpus: CorpusSpec
) -> None:
    store = LocalStore(tmp_path / "store")
    request = make_request(tiny_models["llama"], corpus)
    prefix = extraction_prefix(request)
    spec = {
        "root": str(store.root),
        "model": request.model,
        "corpus": corpus.paths[0],
        "freeze_after": f"/{shard_name(1)}",
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(spec)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    try:
        deadline = time.monotonic() + 60
        while not store.exists(f"{prefix}/{shard_name(1)}"):  # shard 0 committed, shard 1 not yet
            assert child.poll() is None and time.monotonic() < deadline, "the child never wrote shard 1"
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    assert store.exists(f"{prefix}/{entry_name(0)}")
    assert not store.exists(f"{prefix}/{entry_name(1)}") and not store.exists(f"{prefix}/{MANIFEST}")

    resumed = extract(request, store)
    assert resumed.resumed_shards == 1 and not resumed.cached
    assert_every_document_once(store, prefix)
    fresh = extract(request, LocalStore(tmp_path / "fresh"))
    assert resumed.manifest.n_tokens == fresh.manifest.n_tokens
    a, b = stored_docs(store, prefix), stored_docs(LocalStore(tmp_path / "fresh"), prefix)
    for doc_id in a:
        torch.testing.assert_close(a[doc_id][0].activations.float(), b[doc_id][0].activations.float())


def test_should_stop_cancels_keeping_committed_shards_and_a_rerun_completes(
    tiny_models: Mapping[str, Path], local_store: LocalStore, corpus: CorpusSpec
) -> None:
    request = make_request(tiny_models["qwen3"], corpus)
    prefix = extraction_prefix(request)
    seen: list[ExtractionProgress] = []
    with pytest.raises(ExtractionCancelled, match="rerun to resume"):
        extract(request, local_store, progress=seen.append, should_stop=lambda: seen[-1].shards_done >= 2)
    assert seen[0] == ExtractionProgress(0, 0, 0, None)
    assert [p.shards_done for p in seen] == [0, 1, 2]
    assert not local_store.exists(f"{prefix}/{MANIFEST}")
    assert local_store.exists(f"{prefix}/{entry_name(1)}")
    assert not local_store.exists(f"{prefix}/{shard_name(2)}")  # nothing partial flushed

    local_store.put_bytes(f"{prefix}/texts-00042.jsonl", b"{}\n")  # as if a crash left texts without a shard
    again: list[ExtractionProgress] = []
    result = extract(request, local_store, progress=again.append)
    assert result.resumed_shards == 2
    assert again[0] == seen[-1]
    assert again[-1] == ExtractionProgress(len(TEXTS), result.manifest.n_tokens, len(result.manifest.shards), None)
    assert_every_document_once(local_store, result.prefix)


def test_the_token_budget_stops_at_the_document_that_reaches_it(
    tiny_models: Mapping[str, Path], local_store: LocalStore, corpus: CorpusSpec
) -> None:
    budget = 100
    result = extract(make_request(tiny_models["llama"], corpus, max_tokens=budget), local_store)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    n_docs = next(i + 1 for i in range(len(TEXTS)) if sum(lengths[: i + 1]) >= budget)
    assert result.manifest.n_docs == n_docs < len(TEXTS)
    assert result.manifest.n_tokens == sum(lengths[:n_docs])
    assert result.manifest.n_tokens - lengths[n_docs - 1] < budget <= result.manifest.n_tokens
    assert result.manifest.metadata["max_tokens"] == budget and result.manifest.metadata["budget_reached"]
    assert_every_document_once(local_store, result.prefix, n_docs)


def test_a_chat_template_text_is_stored_as_the_model_saw_it_with_one_bos(
    tiny_models: Mapping[str, Path], tmp_path: Path, local_store: LocalStore
) -> None:
    model = Path(shutil.copytree(tiny_models["llama"], tmp_path / "llama-chat"))
    config_path = model / "tokenizer_config.json"
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": template}))
    path = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
    path.write_text(json.dumps({"messages": turns}) + "\n" + json.dumps({"text": TEXTS[0]}) + "\n")
    result = extract(make_request(model, CorpusSpec.files(path, chat_format="template")), local_store)
    texts = read_texts(local_store, result.prefix, 0)
    assert texts == {0: "[user] Capital of France?\n[assistant] Paris.\n", 1: TEXTS[0]}
    chat = stored_docs(local_store, result.prefix)[0][0]
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert chat.token_ids.tolist().count(tokenizer.bos_token_id) == 1 and chat.token_ids[0] == tokenizer.bos_token_id
    assert "".join(texts[0][s:e] for s, e in chat.offsets.tolist()) == texts[0]


def test_a_missing_model_or_layer_fails_naming_it_and_writes_nothing(
    tiny_models: Mapping[str, Path], local_store: LocalStore, corpus: CorpusSpec, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model"):
        extract(make_request(missing, corpus), local_store)
    with pytest.raises(ModelLoadError, match="dfc-test/no-such-model"):  # the suite runs with the hub offline
        extract(make_request("dfc-test/no-such-model", corpus), local_store)
    with pytest.raises(LayerSpecError, match=r"layer 99 is out of range.*6 layers") as info:
        extract(make_request(tiny_models["llama"], corpus, layer=99), local_store)
    assert str(tiny_models["llama"]) in str(info.value)
    assert list(local_store.list()) == []


def test_an_unreachable_store_fails_before_any_model_loads(
    tiny_models: Mapping[str, Path], corpus: CorpusSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.storage.s3 import S3Store

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the store must be checked before the model is touched")

    monkeypatch.setattr(extract_module, "load_model", no_loading)
    monkeypatch.setattr(extract_module, "resolve_key", no_loading)
    dead = S3Store(
        "bucket", endpoint_url="http://127.0.0.1:9", access_key="a", secret_key="b", connect_timeout=0.5, max_attempts=1
    )
    with pytest.raises(StorageUnreachable):
        extract(make_request(tiny_models["llama"], corpus), dead)
