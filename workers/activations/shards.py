"""Activation shards: safetensors files of residual-stream activations with their tokens, in object storage.

Layout under a prefix: `shard-00000.safetensors`, then its entry `shard-00000.json` (checksum, counts,
documents), …, and `manifest.json` last. A shard without an entry is a crash leftover and is ignored; a
prefix without a manifest is unfinished. Readers verify each shard's sha256 before using it.

Two ways to write: `ShardWriter` cuts shards from a stream of documents (one writer per prefix), while
`scan_prefix` + `commit_shard` + `write_manifest` let several workers commit shards of known indices
concurrently (extraction replicas): the scan, which deletes crash leftovers, runs once before they start.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import quote, unquote

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from workers.storage import ObjectNotFound, ObjectStore, StorageError, validate_key

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "dfc-activations"
FORMAT_VERSION = 1
_SHARD_RE = re.compile(r"shard-(\d{5,})\.safetensors")
_ENTRY_RE = re.compile(r"shard-(\d{5,})\.json")


class CorruptShardError(StorageError):
    """A shard's bytes do not match the checksum recorded when it was written."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(
            f"shard {key} is corrupt: sha256 expected {expected}, got {actual}; delete the shard and its "
            "entry (.json) and rerun extraction to rewrite it"
        )
        self.key, self.expected, self.actual = key, expected, actual


class ManifestNotFoundError(ObjectNotFound):
    """The prefix has no manifest: extraction has not finished there (or never ran)."""


def shard_name(index: int) -> str:
    """File name of shard `index` within its prefix."""
    return f"shard-{index:05d}.safetensors"


def entry_name(index: int) -> str:
    """File name of the entry that commits shard `index`."""
    return f"shard-{index:05d}.json"


def _escape_segment(segment: str) -> str:
    # Percent-encode everything unusual, then any '-' that could merge with the '--' separator.
    s = quote(segment, safe="")
    chars = list(s)
    for i, c in enumerate(chars):
        if c == "-" and (i == 0 or i == len(s) - 1 or s[i - 1] == "-" or s[i + 1] == "-"):
            chars[i] = "%2D"
    return "".join(chars)


def model_key(model_id: str, revision: str) -> str:
    """`model@revision` as one key-safe path segment; `/` becomes `--`, and `parse_model_key` undoes it."""
    name = "--".join(_escape_segment(part) for part in model_id.split("/"))
    if name in (".", ".."):
        name = name.replace(".", "%2E")
    return f"{name}@{quote(revision, safe='')}"


def parse_model_key(key: str) -> tuple[str, str]:
    """Recover `(model_id, revision)` from a `model_key` segment."""
    name, _, revision = key.rpartition("@")
    return "/".join(unquote(part) for part in name.split("--")), unquote(revision)


def activation_prefix(model_id: str, revision: str, layer: int | str, corpus_hash: str) -> str:
    """The cache prefix of DESIGN.md: `activations/{model@rev}/{layer}/{corpus-hash}`."""
    layer_seg, corpus_seg = quote(str(layer), safe=""), quote(corpus_hash, safe="")
    return f"activations/{model_key(model_id, revision)}/{layer_seg}/{corpus_seg}"


@dataclass(frozen=True)
class ShardData:
    """The tensors of one shard (or of a batch of whole documents on its way into one)."""

    activations: torch.Tensor
    """(n_tokens, d_model) residual-stream activations, stored as bf16."""
    token_ids: torch.Tensor
    """(n_tokens,) token ids, int32 or int64."""
    doc_ids: torch.Tensor
    """(n_tokens,) int64 id of the corpus document each token belongs to."""
    offsets: torch.Tensor
    """(n_tokens, 2) int32 character start/end of each token in its document."""
    positions: torch.Tensor | None = None
    """(n_tokens,) index of each token within its document."""
    special_mask: torch.Tensor | None = None
    """(n_tokens,) bool, true for BOS/EOS/padding and other special tokens."""

    @property
    def n_tokens(self) -> int:
        return int(self.activations.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by name, optional ones only when present."""
        items = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: t for name, t in items.items() if t is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ShardData:
        return cls(**{f.name: tensors.get(f.name) for f in fields(cls)})

    def validate(self) -> None:
        """Raise `ValueError` naming the tensor whose shape does not fit the others."""
        n = self.n_tokens
        if self.activations.ndim != 2 or not self.activations.is_floating_point():
            raise ValueError(
                f"activations must be a float (n_tokens, d_model) tensor, got {self.activations.shape}"
            )
        expected = {
            "token_ids": (n,),
            "doc_ids": (n,),
            "offsets": (n, 2),
            "positions": (n,),
            "special_mask": (n,),
        }
        for name, t in self.tensors().items():
            if name != "activations" and tuple(t.shape) != expected[name]:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected[name]}")
            if name != "activations" and (t.is_floating_point() or t.is_complex()):
                raise ValueError(f"{name} must be an integer or bool tensor, got {t.dtype}")

    def normalised(self, dtype: torch.dtype) -> ShardData:
        """Cast to the stored dtypes, contiguous and on the CPU, as safetensors needs."""
        want = {
            "activations": dtype,
            "doc_ids": torch.int64,
            "offsets": torch.int32,
            "special_mask": torch.bool,
        }
        return ShardData.from_tensors(
            {
                name: t.detach().to("cpu", want.get(name, t.dtype)).contiguous()
                for name, t in self.tensors().items()
            }
        )

    @staticmethod
    def concat(parts: list[ShardData]) -> ShardData:
        names = parts[0].tensors().keys()
        return ShardData.from_tensors({name: torch.cat([p.tensors()[name] for p in parts]) for name in names})


def _runs(ids: Iterable[int]) -> list[list[int]]:
    """Compress ids into sorted half-open `[start, end)` runs (documents are usually consecutive)."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return runs


@dataclass(frozen=True)
class ShardEntry:
    """What commits one shard: its checksum, sizes and which documents it holds."""

    index: int
    key: str
    sha256: str
    n_bytes: int
    n_tokens: int
    d_model: int
    tensors: tuple[str, ...]
    doc_runs: tuple[tuple[int, int], ...]
    """Documents in the shard as half-open `(start, end)` id ranges."""

    @property
    def doc_ids(self) -> frozenset[int]:
        return frozenset(i for start, end in self.doc_runs for i in range(start, end))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShardEntry:
        return cls(
            **{**obj, "tensors": tuple(obj["tensors"]), "doc_runs": tuple(tuple(r) for r in obj["doc_runs"])}
        )


@dataclass(frozen=True)
class Manifest:
    """The commit record of a finished prefix: every shard, totals and the caller's metadata."""

    d_model: int
    dtype: str
    n_tokens: int
    n_docs: int
    shards: tuple[ShardEntry, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            **asdict(self),
            "n_shards": len(self.shards),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Manifest:
        if obj.get("format") != FORMAT or obj.get("version") != FORMAT_VERSION:
            raise StorageError(f"unsupported activation manifest {obj.get('format')} v{obj.get('version')}")
        return cls(
            d_model=obj["d_model"],
            dtype=obj["dtype"],
            n_tokens=obj["n_tokens"],
            n_docs=obj["n_docs"],
            shards=tuple(ShardEntry.from_json(e) for e in obj["shards"]),
            metadata=obj.get("metadata", {}),
        )


@dataclass(frozen=True)
class ResumeState:
    """What a writer found on its prefix when it opened: committed work the caller must not redo."""

    committed: tuple[ShardEntry, ...]
    done_docs: frozenset[int]
    next_index: int
    complete: bool
    """True when the manifest exists: nothing is left to write."""
    discarded: tuple[str, ...]
    """Keys removed because no valid entry committed them (leftovers of a crash)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scan_prefix(
    store: ObjectStore, prefix: str, *, verify: bool = True, keep: Callable[[ShardEntry], bool] | None = None
) -> ResumeState:
    """Find the committed shards under `prefix`; delete entries that do not match their shard (or that `keep`
    rejects) and shards without an entry. Run it while no writer works on the prefix: it deletes their
    uncommitted shards."""
    prefix = validate_key(prefix.strip("/"))
    try:
        manifest = Manifest.from_json(store.get_json(f"{prefix}/{MANIFEST}"))
    except ObjectNotFound:
        manifest = None
    if manifest is not None:
        done = frozenset().union(*(e.doc_ids for e in manifest.shards))
        last = max((e.index for e in manifest.shards), default=-1)
        return ResumeState(manifest.shards, done, last + 1, True, ())
    names = [k.rpartition("/")[2] for k in store.list(f"{prefix}/shard-")]
    shards = {int(m[1]) for n in names if (m := _SHARD_RE.fullmatch(n))}
    entries = sorted(int(m[1]) for n in names if (m := _ENTRY_RE.fullmatch(n)))
    committed, discarded = [], []
    for index in entries:
        entry = ShardEntry.from_json(store.get_json(f"{prefix}/{entry_name(index)}"))
        valid = (
            index in shards
            and (keep is None or keep(entry))
            and (not verify or _sha256(store.get_bytes(f"{prefix}/{entry.key}")) == entry.sha256)
        )
        if valid:
            committed.append(entry)
            shards.discard(index)
        else:
            discarded.append(f"{prefix}/{entry_name(index)}")  # entry first: never a dangling commit
    discarded += [f"{prefix}/{shard_name(i)}" for i in sorted(shards)]
    for key in discarded:
        log.warning("discarding uncommitted or damaged %s in %s", key, store.url)
        store.delete(key)
    done = frozenset().union(*(e.doc_ids for e in committed))
    last = max((e.index for e in committed), default=-1)
    return ResumeState(tuple(committed), done, last + 1, False, tuple(discarded))


def _entry(index: int, shard: ShardData, data: bytes) -> ShardEntry:
    return ShardEntry(
        index=index,
        key=shard_name(index),
        sha256=_sha256(data),
        n_bytes=len(data),
        n_tokens=shard.n_tokens,
        d_model=int(shard.activations.shape[1]),
        tensors=tuple(shard.tensors()),
        doc_runs=tuple((a, b) for a, b in _runs(shard.doc_ids.tolist())),
    )


def commit_shard(
    store: ObjectStore, prefix: str, index: int, shard: ShardData, *, dtype: torch.dtype = torch.bfloat16
) -> ShardEntry:
    """Write `shard` as shard `index` under `prefix`, then commit it with its entry (a conditional put).

    No scan and no deletion, so workers writing different indices never disturb each other. If the entry
    exists already, the committed shard is kept as it is and its entry returned; its bytes must be the ones
    this call would have written, else `StorageError` (two writers produced different shards for one index).
    """
    prefix = validate_key(prefix.strip("/"))
    entry_key = f"{prefix}/{entry_name(index)}"
    shard.validate()
    normalised = shard.normalised(dtype)
    data = save_safetensors(normalised.tensors(), metadata={"format": "pt"})
    entry = _entry(index, normalised, data)
    existing = ShardEntry.from_json(store.get_json(entry_key)) if store.exists(entry_key) else None
    if existing is None:
        # Shard first, entry second: an entry only ever points at a complete shard.
        store.put_bytes(f"{prefix}/{entry.key}", data)
        if store.put_json(entry_key, entry.to_json(), if_absent=True):
            return entry
        existing = ShardEntry.from_json(store.get_json(entry_key))
    if existing != entry:
        raise StorageError(
            f"{store.url}/{entry_key} was committed by another writer with other contents (sha256 "
            f"{existing.sha256[:12]}…, not {entry.sha256[:12]}…); only one extraction of a model, layer and "
            "corpus may run at a time: delete the prefix and extract again"
        )
    log.info("shard %d under %s was committed already; kept as it is", index, prefix)
    return existing


def write_manifest(
    store: ObjectStore,
    prefix: str,
    entries: Sequence[ShardEntry],
    *,
    dtype: torch.dtype = torch.bfloat16,
    metadata: dict[str, Any] | None = None,
) -> Manifest:
    """Commit the manifest listing `entries` in index order (a conditional put); if a manifest with the same
    shards exists already, return it. The last write of a prefix: readers see all of it or none."""
    prefix = validate_key(prefix.strip("/"))
    if not entries:
        raise ValueError(f"no activations were written under {prefix}; add documents before finish()")
    shards = tuple(sorted(entries, key=lambda e: e.index))
    first = shards[0]
    odd = [e.index for e in shards if (e.d_model, e.tensors) != (first.d_model, first.tensors)]
    if odd:
        raise ValueError(
            f"shards {odd[:5]} under {prefix} have other widths or tensors than shard {first.index} "
            f"(d_model {first.d_model}, {first.tensors}); they come from different models"
        )
    manifest = Manifest(
        d_model=first.d_model,
        dtype=str(dtype).removeprefix("torch."),
        n_tokens=sum(e.n_tokens for e in shards),
        n_docs=len(frozenset().union(*(e.doc_ids for e in shards))),
        shards=shards,
        metadata=dict(metadata or {}),
    )
    if not store.put_json(f"{prefix}/{MANIFEST}", manifest.to_json(), if_absent=True):
        existing = Manifest.from_json(store.get_json(f"{prefix}/{MANIFEST}"))
        if existing.shards != manifest.shards:
            raise StorageError(
                f"{store.url}/{prefix}/{MANIFEST} was written by another writer with "
                "other shards; only one writer may work on a prefix at a time"
            )
        return existing
    return manifest


class ShardWriter:
    """Write whole documents into shards under `prefix`, resuming whatever a previous writer committed.

    Open it, skip the documents in `resume.done_docs`, `add` the rest (each call carries whole
    documents), then `finish(metadata)` to write the manifest. One writer per prefix at a time.
    """

    def __init__(
        self,
        store: ObjectStore,
        prefix: str,
        *,
        tokens_per_shard: int = 1 << 16,
        dtype: torch.dtype = torch.bfloat16,
        verify_existing: bool = True,
    ) -> None:
        self.store, self.prefix = store, validate_key(prefix.strip("/"))
        self.tokens_per_shard, self.dtype = tokens_per_shard, dtype
        self.resume = scan_prefix(store, self.prefix, verify=verify_existing)
        self._entries = list(self.resume.committed)
        self._done = set(self.resume.done_docs)
        self._next = self.resume.next_index
        self._buffer: list[ShardData] = []
        self._buffered = 0

    @property
    def done_docs(self) -> frozenset[int]:
        """Documents already in committed shards (from before this writer opened, or flushed since)."""
        return frozenset(self._done)

    @property
    def entries(self) -> tuple[ShardEntry, ...]:
        return tuple(self._entries)

    def _check_new_docs(self, batch: ShardData) -> None:
        clash = self._done.intersection(batch.doc_ids.unique().tolist())
        if clash:
            raise ValueError(
                f"documents {sorted(clash)[:5]} are already in committed shards; skip writer.done_docs "
                "and pass each document whole in one add()"
            )

    def add(self, batch: ShardData) -> ShardEntry | None:
        """Buffer whole documents; write a shard once `tokens_per_shard` is reached and return its entry."""
        self._check_writable()
        batch.validate()
        self._check_new_docs(batch)
        if self._buffer and batch.tensors().keys() != self._buffer[0].tensors().keys():
            raise ValueError(
                f"every batch must carry the same tensors as the first: {list(self._buffer[0].tensors())}"
            )
        self._buffer.append(batch.normalised(self.dtype))
        self._buffered += batch.n_tokens
        return self.flush() if self._buffered >= self.tokens_per_shard else None

    def flush(self) -> ShardEntry | None:
        """Write the buffered documents as one shard, then its entry; return the entry (None if empty)."""
        if not self._buffer:
            return None
        shard = ShardData.concat(self._buffer)
        self._buffer, self._buffered = [], 0
        return self._write(shard)

    def write_shard(self, shard: ShardData) -> ShardEntry:
        """Write `shard` as one shard of its own (after flushing anything buffered); return its entry."""
        self._check_writable()
        shard.validate()
        self._check_new_docs(shard)
        self.flush()
        return self._write(shard.normalised(self.dtype))

    def _check_writable(self) -> None:
        if self.resume.complete:
            raise StorageError(
                f"{self.store.url}/{self.prefix} is complete (manifest.json exists); read it with ShardReader"
            )

    def _write(self, shard: ShardData) -> ShardEntry:
        first = self._entries[0] if self._entries else None
        if first and (shard.activations.shape[1] != first.d_model or tuple(shard.tensors()) != first.tensors):
            raise ValueError(
                f"shard has d_model {shard.activations.shape[1]} and tensors {tuple(shard.tensors())}, but "
                f"earlier shards have {first.d_model} and {first.tensors}"
            )
        index = self._next
        if self.store.exists(f"{self.prefix}/{entry_name(index)}"):
            raise StorageError(
                f"another writer committed {entry_name(index)} under {self.store.url}/{self.prefix}; "
                "only one writer may work on a prefix at a time"
            )
        entry = commit_shard(self.store, self.prefix, index, shard, dtype=self.dtype)
        self._entries.append(entry)
        self._done.update(entry.doc_ids)
        self._next = index + 1
        return entry

    def finish(self, metadata: dict[str, Any] | None = None) -> Manifest:
        """Flush, then commit the manifest (conditional put); on a finished prefix, return its manifest."""
        if self.resume.complete:
            return Manifest.from_json(self.store.get_json(self._key(MANIFEST)))
        self.flush()
        return write_manifest(self.store, self.prefix, self._entries, dtype=self.dtype, metadata=metadata)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"


class ShardReader:
    """Read a finished prefix: the manifest, then shards by index, each verified against its checksum."""

    def __init__(self, store: ObjectStore, prefix: str, *, verify: bool = True) -> None:
        self.store, self.prefix, self.verify = store, validate_key(prefix.strip("/")), verify
        try:
            self.manifest = Manifest.from_json(store.get_json(f"{self.prefix}/{MANIFEST}"))
        except ObjectNotFound:
            raise ManifestNotFoundError(
                f"no {MANIFEST} under {store.url}/{self.prefix}: these activations are not complete "
                "(extraction is still running or crashed; rerun it to resume) or were never extracted"
            ) from None

    def __len__(self) -> int:
        return len(self.manifest.shards)

    def load(self, i: int) -> ShardData:
        """Load the `i`-th shard of the manifest, verifying its sha256 first."""
        entry = self.manifest.shards[i]
        key = f"{self.prefix}/{entry.key}"
        data = self.store.get_bytes(key)
        if self.verify and (actual := _sha256(data)) != entry.sha256:
            raise CorruptShardError(f"{self.store.url}/{key}", entry.sha256, actual)
        return ShardData.from_tensors(load_safetensors(data))

    def __iter__(self) -> Iterator[ShardData]:
        for i in range(len(self)):
            yield self.load(i)
