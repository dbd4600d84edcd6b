"""The extract stage: stream a corpus through one model, capture the residual stream at one layer, and write
activation shards to object storage under a cache key that every audit against the same model reuses (the
request and its key: `workers/activations/request.py`).

Texts: per shard, `texts-NNNNN.jsonl` holds one line `{"doc_id", "source", "text", "n_dropped"}` per document,
written *before* the shard, so every committed shard has its texts. `text` is the exact string the model was
fed (the rendered text the offsets index into): equal to `Document.text` with chat_format="plain", the chat
template's output with "template". Texts are always stored, since they cost well under 1% of the activations
and the alignment stage then needs only the store, not the corpus.

Shards: planned before any is extracted (`workers/activations/plan.py`): shard `i` holds the documents of block
`i`, batched on their own, so the stored bytes do not depend on how many replicas extract the blocks or in which
order. `plan_extraction` (once per prefix) stores the plan and clears crash leftovers; `extract_block` (any
number of workers, one block each at a time) commits one shard; `finish_extraction` writes the manifest.
`extract` runs the three in one process.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from itertools import islice
from typing import Any, NamedTuple

import torch

from dfc.lm.hooks import DocumentActivations, iter_document_activations
from workers.activations.corpus import CorpusError, CorpusSpec, Document, iter_documents, render_for_model
from workers.activations.loading import LoadedModel, ModelLoadError, _load_tokenizer, load_model
from workers.activations.plan import Block, ShardPlan, blocks_of_entries, cut_blocks, read_plan, store_plan
from workers.activations.request import (
    ExtractionKey,
    ExtractionRequest,
    extraction_prefix,
    resolve_key,
    torch_dtype,
)
from workers.activations.shards import (
    MANIFEST,
    Manifest,
    ShardData,
    ShardEntry,
    commit_shard,
    entry_name,
    scan_prefix,
    write_manifest,
)
from workers.storage import ObjectNotFound, ObjectStore, StorageError

__all__ = [  # the request and its key live in request.py; callers keep importing them from here
    "TEXTS_NAME",
    "DocumentCursor",
    "ExtractionCancelled",
    "ExtractionKey",
    "ExtractionPlan",
    "ExtractionProgress",
    "ExtractionRequest",
    "ExtractionResult",
    "document_token_counts",
    "extract",
    "extract_block",
    "extraction_prefix",
    "finish_extraction",
    "load_for_extraction",
    "load_tokenizer",
    "plan_extraction",
    "read_texts",
    "resolve_key",
    "torch_dtype",
]

log = logging.getLogger(__name__)

TEXTS_NAME = "texts-{index:05d}.jsonl"
"""Name (within the prefix) of the rendered texts of shard `index`."""
_TEXTS_RE = re.compile(r"/texts-(\d{5,})\.jsonl$")
_COUNT_CHUNK = 256


class ExtractionCancelled(Exception):  # noqa: N818 - names the outcome, as callers read it
    """`should_stop()` asked to stop; committed shards are kept and a rerun resumes from them."""


class ExtractionProgress(NamedTuple):
    """Committed work so far (what survives a crash)."""

    docs_done: int
    tokens_done: int
    shards_done: int
    tokens_budget: int | None


@dataclass(frozen=True)
class ExtractionPlan:
    """A request's shards as planned, and what storage held when the plan was made."""

    key: ExtractionKey
    shards: ShardPlan
    committed: tuple[ShardEntry, ...]
    """Shards committed before (by an earlier run, or another worker), kept and never rewritten."""
    complete: bool
    """True when the manifest exists: nothing is left to do."""

    @property
    def pending(self) -> tuple[Block, ...]:
        """The blocks still to extract, in index order."""
        done = {e.index for e in self.committed}
        return tuple(b for b in self.shards.blocks if b.index not in done)


@dataclass(frozen=True)
class ExtractionResult:
    """The finished activations of a request."""

    key: ExtractionKey
    manifest: Manifest
    cached: bool
    """True when a complete manifest already existed and nothing was computed."""
    resumed_shards: int = 0
    """Shards committed by an earlier, interrupted run and kept."""

    @property
    def prefix(self) -> str:
        return self.key.prefix


def read_texts(store: ObjectStore, prefix: str, shard_index: int) -> dict[int, str]:
    """The texts (as the model saw them; offsets index into them) of the documents in one shard, by doc id."""
    data = store.get_bytes(f"{prefix}/{TEXTS_NAME.format(index=shard_index)}")
    return {(row := json.loads(line))["doc_id"]: row["text"] for line in data.decode().splitlines() if line}


def _adds_bos(tokenizer: Any) -> bool:
    return tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]


def _model_text(doc: Document, tokenizer: Any, request: ExtractionRequest, adds_bos: bool) -> str:
    """The string fed to the model; a template's own BOS is dropped when the tokenizer adds one anyway."""
    text = render_for_model(doc, tokenizer, chat_format=request.corpus.chat_format)
    bos = getattr(tokenizer, "bos_token", None)
    if text != doc.text and adds_bos and bos and text.startswith(bos):
        text = text[len(bos) :]  # one BOS, as in deployment, and add_special_tokens stays one setting
    return text


def load_tokenizer(request: ExtractionRequest, key: ExtractionKey) -> Any:
    """The model's tokenizer alone (no weights), as `load_model` would load it."""
    return _load_tokenizer(key.model_id, key.load_revision, None, key.model_id in request.trusted)


def document_token_counts(request: ExtractionRequest, tokenizer: Any) -> Generator[int, None, None]:
    """Each document's token count in this model, as extraction stores it (rendered, truncated to `max_length`)."""
    adds_bos = _adds_bos(tokenizer)
    docs = iter_documents(request.corpus)
    with closing(docs):
        while chunk := [_model_text(doc, tokenizer, request, adds_bos) for doc in islice(docs, _COUNT_CHUNK)]:
            for ids in tokenizer(chunk, add_special_tokens=True)["input_ids"]:
                yield min(len(ids), request.max_length)


def _metadata(
    request: ExtractionRequest, key: ExtractionKey, loaded: LoadedModel, shards: ShardPlan
) -> dict[str, Any]:
    """What the manifest records about how its activations were made (nothing about who made them)."""
    tok = loaded.tokenizer
    return {
        "stage": "extract",
        "model": request.model,
        "model_id": key.model_id,
        "revision_requested": request.revision,
        "revision": key.revision,
        "layer": request.layer,
        "layer_index": key.layer_index,
        "n_layers": loaded.n_layers,
        "n_loaded_layers": loaded.n_loaded_layers,
        "hidden_size": loaded.hidden_size,
        "model_dtype": str(loaded.dtype).removeprefix("torch."),
        "tokenizer": {
            "class": type(tok).__name__,
            "vocab_size": len(tok),
            **{f"{name}_token_id": getattr(tok, f"{name}_token_id") for name in ("bos", "eos", "pad", "unk")},
            "all_special_ids": sorted(tok.all_special_ids),
        },
        "corpus": {
            "key": key.corpus_key,
            "hash": key.corpus_key.partition("-")[0],  # the key is the content hash plus suffixes
            "description": request.corpus.describe(),
            "chat_format": request.corpus.chat_format,
            "spec": request.corpus.to_dict(),
        },
        "max_length": request.max_length,
        "max_tokens": request.max_tokens,
        "budget_reached": shards.budget_reached,
        "tokens_per_shard": shards.tokens_per_shard,
        "texts": TEXTS_NAME,
    }


def _document_part(doc_id: int, acts: DocumentActivations) -> ShardData:
    """One document's tensors in their stored dtypes (bf16 now, so a pending shard takes half the memory)."""
    n = int(acts.token_ids.shape[0])
    return ShardData(
        activations=acts.activations.to("cpu", torch.bfloat16),
        token_ids=acts.token_ids.to(torch.int32),
        doc_ids=torch.full((n,), doc_id, dtype=torch.int64),
        offsets=acts.offsets.to(torch.int32),
        positions=torch.arange(n, dtype=torch.int32),
        special_mask=acts.special_mask.to(torch.bool),
    )


class DocumentCursor:
    """A corpus's documents by id range, read forward from one open stream (reopened only to go back), so a
    worker handed blocks in order reads the corpus once."""

    def __init__(self, corpus: CorpusSpec) -> None:
        self.corpus = corpus
        self._docs: Iterator[Document] | None = None
        self._next = 0

    def take(self, start: int, end: int) -> list[Document]:
        """Documents `start … end-1`; `CorpusError` if the corpus ends before `end`."""
        if self._docs is None or start < self._next:
            self.close()
            self._docs, self._next = iter_documents(self.corpus), 0
        taken: list[Document] = []
        while self._next < end and (doc := next(self._docs, None)) is not None:
            self._next = doc.doc_id + 1
            if doc.doc_id >= start:
                taken.append(doc)
        if len(taken) != end - start:
            raise CorpusError(
                f"corpus {self.corpus.describe()} ended at document {self._next}, before document {end - 1} that "
                "its shard plan was cut from: the corpus changed since; delete the prefix's plan.json and shards "
                "and extract again"
            )
        return taken

    def close(self) -> None:
        if isinstance(self._docs, Generator):
            self._docs.close()
        self._docs = None


def _plan_shards(request: ExtractionRequest, key: ExtractionKey) -> ShardPlan:
    tokenizer = load_tokenizer(request, key)
    counts = document_token_counts(request, tokenizer)
    with closing(counts):
        return cut_blocks(counts, tokens_per_shard=request.tokens_per_shard, max_tokens=request.max_tokens)


def plan_extraction(request: ExtractionRequest, store: ObjectStore) -> ExtractionPlan:
    """Plan (or read the stored plan of) the request's shards and clear what a crash left uncommitted.

    Loads only the tokenizer, and nothing on a cache hit. Run it once per prefix before any `extract_block`:
    it deletes shards and texts without a committed entry, which would include a running worker's.
    """
    store.check()  # an unusable store must fail before minutes of tokenizing or model loading
    key = resolve_key(request)
    try:
        manifest = Manifest.from_json(store.get_json(f"{key.prefix}/{MANIFEST}"))
    except ObjectNotFound:
        manifest = None
    if manifest is not None:
        stored = read_plan(store, key.prefix)
        shards = stored or ShardPlan(
            request.tokens_per_shard, blocks_of_entries(manifest.shards), bool(manifest.metadata.get("budget_reached"))
        )
        return ExtractionPlan(key, shards, manifest.shards, complete=True)
    shards = read_plan(store, key.prefix)
    if shards is None:
        shards = store_plan(store, key.prefix, _plan_shards(request, key))
    if shards.tokens_per_shard != request.tokens_per_shard:
        log.info("%s keeps the shard plan it was cut by (%d tokens per shard)", key.prefix, shards.tokens_per_shard)
    if not shards.blocks:
        raise CorpusError(f"corpus {request.corpus.describe()} has no documents to extract")
    blocks = shards.blocks
    resume = scan_prefix(store, key.prefix, keep=lambda e: e.index < len(blocks) and blocks[e.index].matches(e))
    kept = {e.index for e in resume.committed}
    # Texts of shards a crash never committed would otherwise linger next to the rewritten ones.
    for stale in store.list(f"{key.prefix}/texts-"):
        if (m := _TEXTS_RE.search(stale)) and int(m[1]) not in kept:
            store.delete(stale)
    return ExtractionPlan(key, shards, tuple(sorted(resume.committed, key=lambda e: e.index)), complete=False)


def load_for_extraction(request: ExtractionRequest, key: ExtractionKey) -> LoadedModel:
    """The model, loaded up to the hooked layer, with the fast tokenizer that character offsets need."""
    loaded = load_model(
        key.model_id,
        revision=key.load_revision,
        device_map=request.device_map,
        max_memory=request.max_memory,
        dtype=torch_dtype(request.dtype),
        trusted_models=request.trusted,
        up_to_layer=key.layer_index,
    )
    if not getattr(loaded.tokenizer, "is_fast", False):
        raise ModelLoadError(
            f"model '{request.model}' has a slow tokenizer ({type(loaded.tokenizer).__name__}); extraction "
            "needs a fast one for character offsets (ship tokenizer.json with the model)"
        )
    return loaded


def extract_block(
    request: ExtractionRequest,
    key: ExtractionKey,
    block: Block,
    loaded: LoadedModel,
    store: ObjectStore,
    *,
    documents: DocumentCursor | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ShardEntry:
    """Extract one planned block and commit it as shard `block.index`: texts first, then shard and entry.

    A block committed already is returned as it is, never rewritten. The block is batched on its own, so its
    bytes are the same whichever worker extracts it. `should_stop` is asked once per document; when it returns
    True nothing of the block is committed and `ExtractionCancelled` is raised.
    """
    entry_key = f"{key.prefix}/{entry_name(block.index)}"
    if store.exists(entry_key):
        return ShardEntry.from_json(store.get_json(entry_key))
    cursor = documents or DocumentCursor(request.corpus)
    try:
        docs = cursor.take(block.start, block.end)
    finally:
        if documents is None:
            cursor.close()
    tokenizer = loaded.tokenizer
    adds_bos = _adds_bos(tokenizer)
    texts = [_model_text(doc, tokenizer, request, adds_bos) for doc in docs]
    stream = iter_document_activations(
        loaded.model,
        tokenizer,
        texts,
        key.layer_index,
        batch_size=request.batch_size,
        max_tokens_per_batch=request.max_tokens_per_batch,
        max_length=request.max_length,
    )
    parts: list[ShardData] = []
    rows: list[str] = []
    with closing(stream):
        for doc, text, acts in zip(docs, texts, stream, strict=True):
            if should_stop is not None and should_stop():
                raise ExtractionCancelled(
                    f"extraction of '{request.model}' layer {key.layer_index} was cancelled; the shards committed "
                    f"under {store.url}/{key.prefix} are kept: rerun to resume"
                )
            row = {"doc_id": doc.doc_id, "source": doc.source, "text": text, "n_dropped": acts.n_dropped}
            rows.append(json.dumps(row, ensure_ascii=False) + "\n")
            parts.append(_document_part(doc.doc_id, acts))
    store.put_bytes(f"{key.prefix}/{TEXTS_NAME.format(index=block.index)}", "".join(rows).encode())
    entry = commit_shard(store, key.prefix, block.index, ShardData.concat(parts), dtype=torch.bfloat16)
    if entry.n_tokens != block.n_tokens:
        log.warning(
            "shard %d of %s holds %d tokens, its plan counted %d: the tokenizer counts differently in batches",
            block.index, key.prefix, entry.n_tokens, block.n_tokens,
        )  # fmt: skip
    return entry


def finish_extraction(
    request: ExtractionRequest, plan: ExtractionPlan, loaded: LoadedModel, store: ObjectStore
) -> Manifest:
    """Write the manifest of a prefix whose planned shards are all committed (once; a repeat returns it)."""
    prefix = plan.key.prefix
    if plan.complete:
        return Manifest.from_json(store.get_json(f"{prefix}/{MANIFEST}"))
    entries = []
    for block in plan.shards.blocks:
        try:
            entries.append(ShardEntry.from_json(store.get_json(f"{prefix}/{entry_name(block.index)}")))
        except ObjectNotFound:
            raise StorageError(
                f"shard {block.index} of {store.url}/{prefix} is not committed; extract its block "
                "(rerun the extraction) before writing the manifest"
            ) from None
    return write_manifest(
        store, prefix, entries, dtype=torch.bfloat16, metadata=_metadata(request, plan.key, loaded, plan.shards)
    )


def extract(
    request: ExtractionRequest,
    store: ObjectStore,
    *,
    progress: Callable[[ExtractionProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ExtractionResult:
    """Extract `request`'s activations into `store`, or return the cached ones; resume an interrupted run.

    One process does what the pipeline's replicas share: plan, extract every pending block in order, finish.
    `progress` is called at the start and after each committed shard; `should_stop` once per document, and
    when it returns True the uncommitted documents are dropped and `ExtractionCancelled` is raised.
    """
    plan = plan_extraction(request, store)
    if plan.complete:
        log.info("cache hit: activations are complete at %s", plan.key.prefix)
        manifest = Manifest.from_json(store.get_json(f"{plan.key.prefix}/{MANIFEST}"))
        return ExtractionResult(plan.key, manifest, cached=True)
    entries = {e.index: e for e in plan.committed}

    def report() -> None:
        if progress is not None:
            docs = sum(len(e.doc_ids) for e in entries.values())
            tokens = sum(e.n_tokens for e in entries.values())
            progress(ExtractionProgress(docs, tokens, len(entries), request.max_tokens))

    report()
    if entries:
        log.info("resuming %s: %d shards committed", plan.key.prefix, len(entries))
    loaded = load_for_extraction(request, plan.key)
    documents = DocumentCursor(request.corpus)
    with closing(documents):
        for block in plan.pending:
            entries[block.index] = extract_block(
                request, plan.key, block, loaded, store, documents=documents, should_stop=should_stop
            )
            report()
    manifest = finish_extraction(request, plan, loaded, store)
    log.info("extracted %d tokens of %d documents into %s", manifest.n_tokens, manifest.n_docs, plan.key.prefix)
    return ExtractionResult(plan.key, manifest, cached=False, resumed_shards=len(plan.committed))
