"""What an extraction is asked for, and where its activations live: the request, its revision pinned to a commit,
its layer resolved and its cache key, all from the model's config alone (no weights are read).

Key: `activations/{model@commit}/{layer}/{corpus-key}-len{max_length}[-max{max_tokens}]`. Truncation length
and token budget change which tokens are stored, so they are part of the key; batch sizes, devices, shard sizes
and the number of replicas are not.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from huggingface_hub import hf_hub_download, model_info
from transformers import AutoConfig, PretrainedConfig

from dfc.lm.hooks import LayerSpec, LayerSpecError, resolve_layer
from workers.activations.corpus import CorpusSpec, corpus_key
from workers.activations.loading import (
    TRUSTED_MODELS_ENV,
    ModelLoadError,
    _read_config_dict,
    layer_count_attribute,
    needs_remote_code,
    trusted_models_from_env,
)
from workers.activations.shards import activation_prefix

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_HASHED_FILE_LIMIT = 64 << 20


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
    """Target tokens per shard; shards hold whole documents, so they end slightly above it. A prefix keeps the
    plan it was first cut by (`plan.json`), so a resumed extraction ignores a changed value."""
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
