"""The shard plan of an extraction: which consecutive documents go into which shard, fixed before any is extracted.

Shards are cut from each document's token count in the model's own tokenizer: a shard closes at the document
that brings it to `tokens_per_shard` tokens, so it holds whole documents and ends slightly above the target. The
plan depends on the corpus, the tokenizer, `max_length`, `max_tokens` and `tokens_per_shard` only, never on how
many workers extract it or how fast, so shard `i` holds the same documents (and, each block being batched on its
own, the same bytes) whichever replica writes it. The plan is stored as `plan.json` next to the shards, written
once, so a resumed extraction keeps the blocks that earlier shards were cut by.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from workers.activations.shards import ShardEntry
from workers.storage import ObjectNotFound, ObjectStore, StorageError

PLAN = "plan.json"
"""Name (within the prefix) of the stored plan."""
PLAN_FORMAT = "dfc-shard-plan"
PLAN_VERSION = 1


class Block(NamedTuple):
    """Documents `start … end-1` (corpus ids), written as shard `index`."""

    index: int
    start: int
    end: int
    n_tokens: int
    """Tokens the block's documents hold (each truncated to `max_length`)."""

    @property
    def n_docs(self) -> int:
        return self.end - self.start

    def matches(self, entry: ShardEntry) -> bool:
        """Whether a committed shard holds exactly this block's documents."""
        return entry.index == self.index and entry.doc_runs == ((self.start, self.end),)


@dataclass(frozen=True)
class ShardPlan:
    """Every shard of a prefix, in order, and why the corpus ended where it did."""

    tokens_per_shard: int
    blocks: tuple[Block, ...]
    budget_reached: bool
    """True when `max_tokens` ended the corpus early (at the document that reached it, kept whole)."""

    @property
    def n_docs(self) -> int:
        return self.blocks[-1].end if self.blocks else 0

    @property
    def n_tokens(self) -> int:
        return sum(b.n_tokens for b in self.blocks)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "tokens_per_shard": self.tokens_per_shard,
            "budget_reached": self.budget_reached,
            "n_docs": self.n_docs,
            "n_tokens": self.n_tokens,
            "blocks": [[b.start, b.end, b.n_tokens] for b in self.blocks],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShardPlan:
        if obj.get("format") != PLAN_FORMAT or obj.get("version") != PLAN_VERSION:
            raise StorageError(
                f"unsupported shard plan {obj.get('format')} v{obj.get('version')}; delete {PLAN} and the "
                "shards next to it and extract again"
            )
        blocks = tuple(Block(i, start, end, n) for i, (start, end, n) in enumerate(obj["blocks"]))
        return cls(obj["tokens_per_shard"], blocks, bool(obj["budget_reached"]))


def cut_blocks(token_counts: Iterable[int], *, tokens_per_shard: int, max_tokens: int | None = None) -> ShardPlan:
    """Cut consecutive documents (their token counts, in corpus order) into blocks of about `tokens_per_shard`
    tokens; stop at the document that brings the total to `max_tokens`, kept whole."""
    blocks: list[Block] = []
    start = pending = total = 0
    doc = -1
    for doc, n in enumerate(token_counts):
        pending += n
        total += n
        budget_reached = max_tokens is not None and total >= max_tokens
        if pending >= tokens_per_shard or budget_reached:
            blocks.append(Block(len(blocks), start, doc + 1, pending))
            start, pending = doc + 1, 0
        if budget_reached:
            return ShardPlan(tokens_per_shard, tuple(blocks), True)
    if doc + 1 > start:
        blocks.append(Block(len(blocks), start, doc + 1, pending))
    return ShardPlan(tokens_per_shard, tuple(blocks), False)


def blocks_of_entries(entries: Iterable[ShardEntry]) -> tuple[Block, ...]:
    """The blocks of shards that hold one run of consecutive documents each (a finished prefix without a plan)."""
    blocks = []
    for entry in sorted(entries, key=lambda e: e.index):
        first, last = entry.doc_runs[0][0], entry.doc_runs[-1][1]
        blocks.append(Block(entry.index, first, last, entry.n_tokens))
    return tuple(blocks)


def read_plan(store: ObjectStore, prefix: str) -> ShardPlan | None:
    """The plan stored under `prefix`, or None."""
    try:
        return ShardPlan.from_json(store.get_json(f"{prefix}/{PLAN}"))
    except ObjectNotFound:
        return None


def store_plan(store: ObjectStore, prefix: str, plan: ShardPlan) -> ShardPlan:
    """Store `plan` unless a plan is stored already (a conditional put); return the one that is."""
    if store.put_json(f"{prefix}/{PLAN}", plan.to_json(), if_absent=True):
        return plan
    stored = read_plan(store, prefix)
    if stored is None:  # deleted between the two calls: try once more
        return store_plan(store, prefix, plan)
    return stored
