"""Pairing two models' activation shards: the alignment stage and the paired reader the trainer consumes.

The alignment stage walks both models' shards document by document, pairs token positions with
:func:`dfc.lm.align.align_offsets` (SCIENCE.md §5) and stores the paired index: one global token index
per model per pair. The reader turns that index back into ``(x_a, x_b)`` batches, shuffled (shard
order + a shuffle buffer), prefetched on a background thread, checksum-verified, with memory bounded
by the buffer and a few shards whatever the corpus size.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from dfc.lm.align import AlignmentSummary, AlignStatus, SequenceAlignment, align_offsets
from workers.activations.extract import read_texts
from workers.activations.shards import ShardData, ShardReader
from workers.storage import ObjectStore

log = logging.getLogger(__name__)

PAIRS_NAME = "pairs.safetensors"
SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class AlignmentResult:
    """What the alignment stage stored and measured."""

    pairs_key: str
    n_pairs: int
    sequences: int
    aligned_sequence_fraction: float
    kept_token_fraction: float
    failures: list[dict[str, Any]]
    """The first few sequences that did not align to the end, with where and why they stopped."""
    unpaired_documents: int = 0
    """Documents at the end of one model's stream that the other never reached (per-model token budgets)."""


def _shard_starts(reader: ShardReader) -> list[int]:
    starts, total = [], 0
    for entry in reader.manifest.shards:
        starts.append(total)
        total += entry.n_tokens
    return starts


def _iter_docs(reader: ShardReader) -> Iterator[tuple[int, int, ShardData, Tensor]]:
    """``(doc_id, global_start, shard, rows)`` for every document, in stored order."""
    starts = _shard_starts(reader)
    for i in range(len(reader)):
        shard = reader.load(i)
        doc_ids = shard.doc_ids
        boundaries = torch.nonzero(doc_ids[1:] != doc_ids[:-1]).squeeze(1) + 1
        edges = [0, *boundaries.tolist(), shard.n_tokens]
        for lo, hi in itertools.pairwise(edges):
            yield int(doc_ids[lo]), starts[i], shard, torch.arange(lo, hi)


def align_activations(
    store: ObjectStore,
    prefix_a: str,
    prefix_b: str,
    text_of: Callable[[int], str],
    out_prefix: str,
    *,
    max_window: int = 16,
    max_failures: int = 20,
) -> AlignmentResult:
    """Pair the token positions of two extracted models and store the paired index under ``out_prefix``.

    ``text_of(doc_id)`` returns the text both models' character offsets refer to. Both streams must
    hold the same documents in the same order; where a per-model token budget stopped one model a few
    documents earlier, the other's extra documents are left unpaired and counted.
    """
    reader_a, reader_b = ShardReader(store, prefix_a), ShardReader(store, prefix_b)
    docs_b = _iter_docs(reader_b)
    pairs_a: list[Tensor] = []
    pairs_b: list[Tensor] = []
    alignments: list[SequenceAlignment] = []
    failures: list[dict[str, Any]] = []
    unpaired = 0
    for doc_id, start_a, shard_a, rows_a in _iter_docs(reader_a):
        doc_b, start_b, shard_b, rows_b = next(docs_b, (None, 0, None, None))
        if doc_b is None:  # B's budget ran out first
            unpaired += 1
            continue
        if doc_b != doc_id or shard_b is None or rows_b is None:
            raise ValueError(
                f"document order differs between {prefix_a} and {prefix_b} (doc {doc_id} vs {doc_b}); "
                "both models must be extracted from the same corpus"
            )
        special_a = shard_a.special_mask[rows_a].tolist() if shard_a.special_mask is not None else None
        special_b = shard_b.special_mask[rows_b].tolist() if shard_b.special_mask is not None else None
        alignment = align_offsets(
            text_of(doc_id),
            shard_a.offsets[rows_a].tolist(),
            shard_b.offsets[rows_b].tolist(),
            special_a=special_a,
            special_b=special_b,
            max_window=max_window,
        )
        alignments.append(alignment)
        if alignment.status is AlignStatus.TRUNCATED and len(failures) < max_failures:
            failures.append({"doc_id": doc_id, "stopped_at_a": alignment.stopped_at_a, "why": alignment.first_mismatch})
        pairs_a.append(start_a + rows_a[alignment.positions_a])
        pairs_b.append(start_b + rows_b[alignment.positions_b])
    unpaired += sum(1 for _ in docs_b)  # A's budget ran out first
    a = torch.cat(pairs_a) if pairs_a else torch.empty(0, dtype=torch.long)
    b = torch.cat(pairs_b) if pairs_b else torch.empty(0, dtype=torch.long)
    if a.numel() == 0:
        raise ValueError(f"no token pairs between {prefix_a} and {prefix_b}: the tokenizers never agreed")
    summary = AlignmentSummary.of(alignments)
    pairs_key = f"{out_prefix.rstrip('/')}/{PAIRS_NAME}"
    store.put_bytes(pairs_key, save_safetensors({"a": a.contiguous(), "b": b.contiguous()}))
    result = AlignmentResult(
        pairs_key=pairs_key,
        n_pairs=int(a.numel()),
        sequences=summary.sequences,
        aligned_sequence_fraction=summary.aligned_sequence_fraction,
        kept_token_fraction=summary.kept_token_fraction,
        failures=failures,
        unpaired_documents=unpaired,
    )
    store.put_json(
        f"{out_prefix.rstrip('/')}/{SUMMARY_NAME}", asdict(result) | {"prefix_a": prefix_a, "prefix_b": prefix_b}
    )
    log.info(
        "aligned %d sequences: %.1f%% to the end, %d pairs (%.1f%% of tokens kept)",
        summary.sequences,
        100 * summary.aligned_sequence_fraction,
        result.n_pairs,
        100 * summary.kept_token_fraction,
    )
    return result


def stored_texts(store: ObjectStore, prefix: str) -> dict[int, str]:
    """Every document's text as the extraction stored it (what the offsets of ``prefix`` index into)."""
    reader = ShardReader(store, prefix, verify=False)
    texts: dict[int, str] = {}
    for entry in reader.manifest.shards:
        texts.update(read_texts(store, prefix, entry.index))
    return texts


def load_pairs(store: ObjectStore, pairs_key: str) -> tuple[Tensor, Tensor]:
    """The stored paired index: global token indices into model A's and model B's shards."""
    tensors = load_safetensors(store.get_bytes(pairs_key))
    return tensors["a"], tensors["b"]


class PairedRows(NamedTuple):
    """The pairs that fall in one of model A's shards, gathered from both models' shards."""

    x_a: Tensor
    x_b: Tensor
    doc_ids: Tensor
    """Document of each pair (from model A's shard)."""
    pairs: Tensor
    """Indices of these pairs in the paired index, in index (corpus) order."""


class ShardedPairs:
    """The paired index resolved against both models' shards, read one A shard at a time.

    Pairs are grouped by A shard once, up front (a stable sort keeps corpus order inside a shard),
    so reading a shard never scans the whole index; B shards come through a small LRU cache.
    """

    def __init__(
        self,
        store: ObjectStore,
        prefix_a: str,
        prefix_b: str,
        pairs_a: Tensor,
        pairs_b: Tensor,
        *,
        verify: bool = True,
        b_cache_shards: int = 3,
    ) -> None:
        self.reader_a = ShardReader(store, prefix_a, verify=verify)
        self.reader_b = ShardReader(store, prefix_b, verify=verify)
        self.pairs_a, self.pairs_b = pairs_a.long(), pairs_b.long()
        self.starts_a = torch.tensor([*_shard_starts(self.reader_a), self.reader_a.manifest.n_tokens])
        self.starts_b = torch.tensor([*_shard_starts(self.reader_b), self.reader_b.manifest.n_tokens])
        shard_of_a = torch.searchsorted(self.starts_a, self.pairs_a, right=True) - 1
        self.shard_of_b = torch.searchsorted(self.starts_b, self.pairs_b, right=True) - 1
        order = torch.sort(shard_of_a, stable=True).indices
        counts = torch.bincount(shard_of_a, minlength=len(self.reader_a))
        self.by_shard: tuple[Tensor, ...] = torch.split(order, counts.tolist())
        self.b_cache_shards = b_cache_shards
        self._cache: OrderedDict[int, Tensor] = OrderedDict()

    def _b_activations(self, j: int) -> Tensor:
        if j in self._cache:
            self._cache.move_to_end(j)
            return self._cache[j]
        self._cache[j] = self.reader_b.load(j).activations
        while len(self._cache) > self.b_cache_shards:
            self._cache.popitem(last=False)
        return self._cache[j]

    def rows(self, i: int) -> PairedRows | None:
        """Both models' activations of the pairs in A shard ``i`` (``None`` when it holds none)."""
        mine = self.by_shard[i]
        if mine.numel() == 0:
            return None
        shard = self.reader_a.load(i)
        local = self.pairs_a[mine] - self.starts_a[i]
        x_a = shard.activations[local]
        x_b = torch.empty(mine.numel(), self.reader_b.manifest.d_model, dtype=x_a.dtype)
        shard_b = self.shard_of_b[mine]
        for j in shard_b.unique().tolist():
            sel = shard_b == j
            x_b[sel] = self._b_activations(j)[self.pairs_b[mine][sel] - self.starts_b[j]]
        return PairedRows(x_a, x_b, shard.doc_ids[local].long(), mine)


class PairedActivations:
    """Iterable of raw ``(x_a, x_b)`` float32 batches for training, restartable and deterministic.

    Each epoch visits model A's shards in a seeded random order; for each, it loads the B shards
    its pairs point into (a small LRU cache), gathers the paired rows and feeds a shuffle buffer
    that emits full batches. A background thread prefetches the next units. Iterating again
    replays the same sequence, which is what the trainer's resume relies on.

    Data-parallel training gives each of ``workers`` readers its ``worker`` index: each then yields rows
    ``worker::workers`` of the batches one reader yields, so the data order does not depend on the number of
    workers (each reader still reads every shard).
    """

    def __init__(
        self,
        store: ObjectStore,
        prefix_a: str,
        prefix_b: str,
        pairs_key: str,
        *,
        batch_size: int = 4096,
        shuffle_buffer: int = 65536,
        seed: int = 0,
        prefetch: int = 2,
        epochs: int | None = None,
        verify: bool = True,
        b_cache_shards: int = 3,
        worker: int = 0,
        workers: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= worker < workers or batch_size % workers:
            raise ValueError(
                f"worker {worker} of {workers} cannot take an equal share of batches of {batch_size}; "
                "the batch size must be a multiple of the number of workers"
            )
        self.worker, self.workers = worker, workers
        self.index = ShardedPairs(store, prefix_a, prefix_b, *load_pairs(store, pairs_key), verify=verify,
                                  b_cache_shards=b_cache_shards)  # fmt: skip
        self.batch_size, self.shuffle_buffer = batch_size, max(shuffle_buffer, batch_size)
        self.seed, self.prefetch, self.epochs = seed, prefetch, epochs
        if self.n_pairs < batch_size:
            raise ValueError(f"only {self.n_pairs} token pairs, fewer than one batch of {batch_size}")

    @property
    def d_a(self) -> int:
        return self.index.reader_a.manifest.d_model

    @property
    def d_b(self) -> int:
        return self.index.reader_b.manifest.d_model

    @property
    def n_pairs(self) -> int:
        return len(self.index.pairs_a)

    def batches_per_epoch(self) -> int:
        return self.n_pairs // self.batch_size

    def _units(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Paired rows of one A shard at a time, shards in a seeded order per epoch."""
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            order = torch.randperm(len(self.index.by_shard), generator=torch.Generator().manual_seed(self.seed + epoch))
            for i in order.tolist():
                rows = self.index.rows(i)
                if rows is not None:
                    yield rows.x_a, rows.x_b
            epoch += 1

    def _prefetched(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Run :meth:`_units` on a daemon thread, at most ``prefetch`` units ahead."""
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for unit in self._units():
                    while not stop.is_set():
                        try:
                            q.put(unit, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as error:  # surfaced in the consumer, e.g. a corrupt shard
                q.put(error)

        thread = threading.Thread(target=produce, name="paired-activations-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self._batches(slice(self.worker, None, self.workers))

    def global_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The whole batches, every worker's rows (what one worker trains on)."""
        return self._batches(slice(None))

    def _batches(self, rows: slice) -> Iterator[tuple[Tensor, Tensor]]:
        """``rows`` of every batch."""
        g = torch.Generator().manual_seed(self.seed + 1_000_003)
        buf_a: list[Tensor] = []
        buf_b: list[Tensor] = []
        held = 0
        for x_a, x_b in self._prefetched():
            buf_a.append(x_a)
            buf_b.append(x_b)
            held += x_a.shape[0]
            if held < self.shuffle_buffer:
                continue
            all_a, all_b = torch.cat(buf_a), torch.cat(buf_b)
            perm = torch.randperm(held, generator=g)
            n_out = (held - self.shuffle_buffer // 2) // self.batch_size * self.batch_size
            for s in range(0, n_out, self.batch_size):
                idx = perm[s : s + self.batch_size][rows]
                yield all_a[idx].float(), all_b[idx].float()
            rest = perm[n_out:]
            buf_a, buf_b, held = [all_a[rest]], [all_b[rest]], int(rest.numel())
        if held >= self.batch_size:
            all_a, all_b = torch.cat(buf_a), torch.cat(buf_b)
            perm = torch.randperm(held, generator=g)
            for s in range(0, held - self.batch_size + 1, self.batch_size):
                idx = perm[s : s + self.batch_size][rows]
                yield all_a[idx].float(), all_b[idx].float()


def median_norms(batches: Iterator[tuple[Tensor, Tensor]], n_batches: int = 8) -> tuple[float, float]:
    """Median activation norm of each model over the first ``n_batches`` (for normalisation)."""
    norms_a, norms_b = [], []
    for i, (x_a, x_b) in enumerate(batches):
        if i >= n_batches:
            break
        norms_a.append(x_a.norm(dim=1))
        norms_b.append(x_b.norm(dim=1))
    if not norms_a:
        raise ValueError("no batches to estimate activation norms from")
    return float(torch.cat(norms_a).median()), float(torch.cat(norms_b).median())
