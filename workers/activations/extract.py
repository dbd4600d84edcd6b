"""The extract stage: stream a corpus through one model, capture the residual stream at one layer, and write
activation shards to object storage under a cache key that every audit against the same model reuses.

Key: `activations/{model@commit}/{layer}/{corpus-key}-len{max_length}[-max{max_tokens}]`. Truncation length
and token budget change which tokens are stored, so they are part of the key; batch sizes and devices are not.

Texts: per shard, `texts-NNNNN.jsonl` holds one line `{"doc_id", "source", "text", "n_dropped"}` per document,
written *before* the shard, so every committed shard has its texts. `text` is the exact string the model was
fed (the rendered text the offsets index into): equal to `Document.text` with chat_format="plain", the chat
template's output with "template". Texts are always stored, since they cost well under 1% of the activations
and the alignment stage then needs only the store, not the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from huggingface_hub import hf_hub_download, model_info
from transformers import AutoConfig, PretrainedConfig

from dfc.lm.hooks import DocumentActivations, LayerSpec, LayerSpecError, iter_document_activations, resolve_layer
from workers.activations.corpus import CorpusSpec, Document, corpus_key, iter_documents, render_for_model
from workers.activations.loading import (
    TRUSTED_MODELS_ENV,
    LoadedModel,
    ModelLoadError,
    _read_config_dict,
    layer_count_attribute,
    load_model,
    needs_remote_code,
    trusted_models_from_env,
)
from workers.activations.shards import (
    Manifest,
    ShardData,
    ShardWriter,
    activation_prefix,
)
from workers.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

TEXTS_NAME = "texts-{index:05d}.jsonl"
"""Name (within the prefix) of the rendered texts of shard `index`."""
_TEXTS_RE = re.compile(r"/texts-(\d{5,})\.jsonl$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_HASHED_FILE_LIMIT = 64 << 20


class ExtractionCancelled(Exception):  # noqa: N818 - names the outcome, as callers read it
    """`should_stop()` asked to stop; committed shards are kept and a rerun resumes from them."""


@dataclass(frozen=True)
class ExtractionRequest:
    """What to extract: one model at one layer over one corpus, and how to run it."""

    model: str
    """Hugging Face id or local folder of a decoder-only causal LM."""
    revision: str | None
    """Branch, tag or commit of a hub model (None: "main"); pinned to a commit hash before use."""
    layer: LayerSpec
    """Decoder block whose output is captured: an index, a negative index, or "middle"."""
    corpus: CorpusSpec
    """The documents, in order; both models of an audit read the same ones."""
    device_map: str | dict[str, Any] | None = "auto"
    """Passed to transformers/accelerate; None loads on the CPU without a device map."""
    max_memory: dict[Any, str | int] | None = None
    """Per-device memory caps for `device_map="auto"`, e.g. {0: "20GiB", "cpu": "64GiB"}."""
    dtype: str | None = None
    """Weights dtype ("bfloat16", "float32", …); None: bf16 on GPU, fp32 on CPU. Activations are stored bf16."""
    batch_size: int = 8
    """Documents per forward pass at most."""
    max_tokens_per_batch: int = 8192
    """Padded tokens per forward pass at most (bounds memory)."""
    max_length: int = 1024
    """Tokens kept per document; the rest is dropped (counted per document in the texts file)."""
    tokens_per_shard: int = 65536
    """Target tokens per shard; shards hold whole documents, so they end slightly above it."""
    max_tokens: int | None = None
    """Token budget: stop at the document boundary where it is reached (None: the whole corpus)."""
    trusted_models: frozenset[str] | None = None
    """Model ids allowed to run custom code; None reads DFC_TRUSTED_MODELS."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_tokens_per_batch", "max_length", "tokens_per_shard", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"extraction {name}={value} must be at least 1")
        if self.max_length > self.max_tokens_per_batch:
            raise ValueError(
                f"extraction max_length={self.max_length} exceeds max_tokens_per_batch="
                f"{self.max_tokens_per_batch}; raise the batch budget or lower max_length"
            )
        torch_dtype(self.dtype)

    @property
    def trusted(self) -> frozenset[str]:
        return self.trusted_models if self.trusted_models is not None else frozenset(trusted_models_from_env())


class ExtractionKey(NamedTuple):
    """Where a request's activations live, resolved from the config alone (no weights loaded)."""

    model_id: str
    """The hub id, or the absolute path of a local folder."""
    revision: str
    """Commit hash (hub), "local-<hash of the folder's files>", or the requested name when offline."""
    load_revision: str | None
    """What `load_model` gets: the pinned commit for hub models, None for local folders."""
    layer_index: int
    corpus_key: str
    prefix: str


class ExtractionProgress(NamedTuple):
    """Committed work so far (what survives a crash)."""

    docs_done: int
    tokens_done: int
    shards_done: int
    tokens_budget: int | None


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


def torch_dtype(name: str | None) -> torch.dtype | None:
    """Parse a dtype name such as "bfloat16"; None stays None."""
    if name is None:
        return None
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {name!r} is not a torch floating dtype such as 'bfloat16' or 'float32'")
    return dtype


def local_revision(folder: Path) -> str:
    """`local-` + a short hash of a model folder: small files by content, weights by name, size and mtime.

    Hashing gigabytes of weights would make the cheap cache check slow; size and mtime change whenever a
    weight file is rewritten, so a retrained checkpoint never hits a stale cache (a copy may miss it).
    """
    sha = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        sha.update(path.name.encode() + b"\0")
        if path.suffix in _WEIGHT_SUFFIXES or stat.st_size > _HASHED_FILE_LIMIT:
            sha.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            sha.update(path.read_bytes())
    return f"local-{sha.hexdigest()[:12]}"


def resolve_revision(model: str, revision: str | None) -> str:
    """The commit hash of a hub model's `revision`: asked of the hub, else read from the local hub cache,
    else (offline, not cached) the requested name itself, which the config read then reports on."""
    try:
        sha = model_info(model, revision=revision).sha
        if sha:
            return sha
    except Exception as exc:  # offline, rate-limited, gated …: the config read below names real problems
        log.info("cannot ask the hub for %s@%s (%s); trying the local cache", model, revision, exc)
    try:
        cached = hf_hub_download(model, "config.json", revision=revision, local_files_only=True)
        return Path(cached).parent.name  # the snapshot folder is named by its commit hash
    except Exception:
        log.warning("cannot pin %s@%s to a commit (offline, not cached); keying by the name", model, revision)
        return revision or "main"


def _read_config(name: str, revision: str | None, trusted: frozenset[str]) -> PretrainedConfig:
    """The model's config under the loading policy (remote code only when trusted); no weights are read."""
    config_dict = _read_config_dict(name, revision, None)  # names a missing path or hub problem
    remote = needs_remote_code(config_dict)
    if remote and name not in trusted:
        raise ModelLoadError(f"model '{name}' needs trust_remote_code; add it to {TRUSTED_MODELS_ENV} to allow it")
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=remote)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the config of model '{name}': {exc}") from exc


def resolve_key(request: ExtractionRequest) -> ExtractionKey:
    """Pin the revision, resolve the layer and hash the corpus, reading only configs (no weights)."""
    folder = Path(request.model).expanduser()
    if folder.is_dir():
        model_id, revision, load_revision = str(folder.resolve()), local_revision(folder), None
    else:
        model_id = request.model
        revision = load_revision = resolve_revision(model_id, request.revision)
    counted = layer_count_attribute(_read_config(model_id, load_revision, request.trusted))
    if counted is None and not (isinstance(request.layer, int) and request.layer >= 0):
        raise LayerSpecError(
            f"model '{request.model}' does not state its layer count in its config: give a non-negative "
            f"layer index (checked once its blocks are loaded) instead of {request.layer!r}"
        )
    try:
        layer_index = int(request.layer) if counted is None else resolve_layer(request.layer, counted.num_hidden_layers)
    except LayerSpecError as exc:
        raise LayerSpecError(f"model '{request.model}': {exc}") from None
    data_key = f"{corpus_key(request.corpus)}-len{request.max_length}"
    if request.max_tokens is not None:
        data_key += f"-max{request.max_tokens}"
    return ExtractionKey(
        model_id=model_id,
        revision=revision,
        load_revision=load_revision,
        layer_index=layer_index,
        corpus_key=data_key,
        prefix=activation_prefix(model_id, revision, layer_index, data_key),
    )


def extraction_prefix(request: ExtractionRequest) -> str:
    """The storage prefix of a request's activations, without loading weights (for cheap cache checks)."""
    return resolve_key(request).prefix


def read_texts(store: ObjectStore, prefix: str, shard_index: int) -> dict[int, str]:
    """The texts (as the model saw them; offsets index into them) of the documents in one shard, by doc id."""
    data = store.get_bytes(f"{prefix}/{TEXTS_NAME.format(index=shard_index)}")
    return {(row := json.loads(line))["doc_id"]: row["text"] for line in data.decode().splitlines() if line}


def _model_text(doc: Document, tokenizer: Any, request: ExtractionRequest, adds_bos: bool) -> str:
    """The string fed to the model; a template's own BOS is dropped when the tokenizer adds one anyway."""
    text = render_for_model(doc, tokenizer, chat_format=request.corpus.chat_format)
    bos = getattr(tokenizer, "bos_token", None)
    if text != doc.text and adds_bos and bos and text.startswith(bos):
        text = text[len(bos) :]  # one BOS, as in deployment, and add_special_tokens stays one setting
    return text


def _metadata(
    request: ExtractionRequest, key: ExtractionKey, loaded: LoadedModel, budget_reached: bool
) -> dict[str, Any]:
    """What the manifest records about how its activations were made."""
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
        "budget_reached": budget_reached,
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


class _ShardBuilder:
    """Collects whole documents and commits them as the next shard: texts first, then shard and entry."""

    def __init__(self, store: ObjectStore, writer: ShardWriter) -> None:
        self.store, self.writer = store, writer
        self.next_index = writer.resume.next_index
        self.tokens_done = sum(e.n_tokens for e in writer.entries)
        self.parts: list[ShardData] = []
        self.rows: list[dict[str, Any]] = []
        self.pending_tokens = 0
        # Texts of shards a crash never committed would otherwise linger next to the rewritten ones.
        for stale in store.list(f"{writer.prefix}/texts-"):
            if (m := _TEXTS_RE.search(stale)) and int(m[1]) >= self.next_index:
                store.delete(stale)

    def add(self, part: ShardData, row: dict[str, Any]) -> None:
        self.parts.append(part)
        self.rows.append(row)
        self.pending_tokens += part.n_tokens

    def commit(self) -> bool:
        """Write the pending documents as one shard; return whether there was anything to write."""
        if not self.parts:
            return False
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.rows)
        self.store.put_bytes(f"{self.writer.prefix}/{TEXTS_NAME.format(index=self.next_index)}", lines.encode())
        entry = self.writer.write_shard(ShardData.concat(self.parts))
        if entry.index != self.next_index:
            raise StorageError(
                f"another writer is working on {self.store.url}/{self.writer.prefix}; "
                "run one extraction per prefix at a time"
            )
        self.next_index += 1
        self.tokens_done += entry.n_tokens
        self.parts, self.rows, self.pending_tokens = [], [], 0
        return True


def _stream(
    request: ExtractionRequest,
    key: ExtractionKey,
    loaded: LoadedModel,
    shards: _ShardBuilder,
    report: Callable[[], None],
    should_stop: Callable[[], bool] | None,
) -> bool:
    """Feed the documents not yet committed through the model into `shards`; return whether the budget ended it."""
    tokenizer, budget, done = loaded.tokenizer, request.max_tokens, shards.writer.done_docs
    if budget is not None and shards.tokens_done >= budget:
        return True
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    queue: deque[tuple[Document, str]] = deque()  # documents fed to the model, not yet seen coming out

    def model_texts(docs: Iterator[Document]) -> Iterator[str]:
        for doc in docs:
            if doc.doc_id not in done:
                queue.append((doc, _model_text(doc, tokenizer, request, adds_bos)))
                yield queue[-1][1]

    docs = iter_documents(request.corpus)
    stream = iter_document_activations(
        loaded.model,
        tokenizer,
        model_texts(docs),
        key.layer_index,
        batch_size=request.batch_size,
        max_tokens_per_batch=request.max_tokens_per_batch,
        max_length=request.max_length,
    )
    with closing(docs), closing(stream):
        for acts in stream:
            doc, text = queue.popleft()
            if should_stop is not None and should_stop():
                raise ExtractionCancelled(
                    f"extraction of '{request.model}' layer {key.layer_index} was cancelled with "
                    f"{len(shards.writer.entries)} shards committed under {shards.store.url}/{key.prefix}; "
                    "rerun to resume"
                )
            row = {"doc_id": doc.doc_id, "source": doc.source, "text": text, "n_dropped": acts.n_dropped}
            shards.add(_document_part(doc.doc_id, acts), row)
            if shards.pending_tokens >= request.tokens_per_shard and shards.commit():
                report()
            if budget is not None and shards.tokens_done + shards.pending_tokens >= budget:
                return True  # the document that reached the budget is kept whole
    return False


def extract(
    request: ExtractionRequest,
    store: ObjectStore,
    *,
    progress: Callable[[ExtractionProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ExtractionResult:
    """Extract `request`'s activations into `store`, or return the cached ones; resume an interrupted run.

    `progress` is called at the start and after each committed shard; `should_stop` once per document, and
    when it returns True the uncommitted documents are dropped and `ExtractionCancelled` is raised.
    """
    store.check()  # an unusable store must fail before minutes of model loading
    key = resolve_key(request)
    writer = ShardWriter(store, key.prefix, tokens_per_shard=request.tokens_per_shard, dtype=torch.bfloat16)
    if writer.resume.complete:
        log.info("cache hit: activations are complete at %s", key.prefix)
        return ExtractionResult(key, writer.finish(), cached=True)
    shards = _ShardBuilder(store, writer)

    def report() -> None:
        if progress is not None:
            docs, n_shards = len(writer.done_docs), len(writer.entries)
            progress(ExtractionProgress(docs, shards.tokens_done, n_shards, request.max_tokens))

    report()
    resumed = len(writer.resume.committed)
    if resumed:
        log.info("resuming %s: %d shards, %d tokens committed", key.prefix, resumed, shards.tokens_done)
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
    budget_reached = _stream(request, key, loaded, shards, report, should_stop)
    if shards.commit():
        report()
    manifest = writer.finish(_metadata(request, key, loaded, budget_reached))
    log.info("extracted %d tokens of %d documents into %s", manifest.n_tokens, manifest.n_docs, key.prefix)
    return ExtractionResult(key, manifest, cached=False, resumed_shards=resumed)
