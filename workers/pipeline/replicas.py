"""Data-parallel extraction on Ray: each model's planned shard blocks handed to its replicas, one block at a time.

The driver plans each model's shards once (``plan_task``: the plan is stored, crash leftovers cleared), reserves
every replica of both models in one placement group, then runs a work queue: an idle replica gets the next
block. A replica that Ray restarts redoes only the block it was on (Ray retries that call); one that is gone for
good hands its block back to the queue for the others. Committed blocks are never handed out again, and a
block's bytes do not depend on which replica extracts it, so the stored result is the same for any number of
replicas. When a model's blocks are all committed, one of its replicas writes the manifest.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayError

from workers.activations.extract import ExtractionPlan, ExtractionRequest, plan_extraction
from workers.activations.plan import Block
from workers.pipeline import actors
from workers.spec import Resources
from workers.storage import open_store

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1, max_retries=actors.RESTARTS)
def budget_task(request: ExtractionRequest) -> int:
    """:func:`actors.budget_documents` where the model's tokenizer can be read (a worker node)."""
    torch.set_num_threads(1)
    return actors.budget_documents(request)


@ray.remote(num_cpus=1, max_retries=actors.RESTARTS)
def plan_task(store_url: str, store_settings: Mapping[str, Any], request: ExtractionRequest) -> ExtractionPlan:
    """:func:`plan_extraction` on a worker: the one place per prefix that deletes what a crash left uncommitted."""
    torch.set_num_threads(1)
    return plan_extraction(request, open_store(store_url, **store_settings))


def replica_bundle(resources: Resources) -> dict[str, float]:
    """What one replica reserves."""
    return {"CPU": resources.num_cpus, "GPU": resources.num_gpus}


def replica_counts(
    resources: Mapping[str, Resources], blocks: Mapping[str, int], free: Mapping[str, float]
) -> dict[str, int]:
    """How many replicas each model gets: its fixed ``replicas``, or for ``"auto"`` as many as the ``free``
    resources hold once the fixed ones are served, taken in turns when both models ask for ``"auto"``.

    Every model gets at least one replica (the reservation then names a shortfall) and at most one per pending
    block (``blocks``; at least one, which writes the manifest).
    """
    caps = {side: max(1, blocks.get(side, 0)) for side in resources}
    counts = {side: 1 if r.replicas == "auto" else min(int(r.replicas), caps[side]) for side, r in resources.items()}
    left = dict(free)
    for side, r in resources.items():
        for name, value in replica_bundle(r).items():
            left[name] = left.get(name, 0.0) - value * counts[side]
    auto = [side for side, r in resources.items() if r.replicas == "auto"]
    grew = True
    while grew:  # one more replica per auto model per round, so two auto models share what is free
        grew = False
        for side in sorted(auto, key=lambda s: (counts[s], s)):
            need = {name: value for name, value in replica_bundle(resources[side]).items() if value > 0}
            if counts[side] < caps[side] and all(left.get(name, 0.0) >= value for name, value in need.items()):
                counts[side] += 1
                for name, value in need.items():
                    left[name] -= value
                grew = True
    return counts


@dataclass
class ReplicaSet:
    """One model's replicas, the blocks left for them, and what they have done."""

    label: str
    """Names the model in errors, e.g. "extracting model A (org/name)"."""
    request: ExtractionRequest
    plan: ExtractionPlan
    handles: list[Any]
    """The replicas' actor handles."""
    queue: deque[Block] = field(init=False)
    dead: set[int] = field(default_factory=set)
    tokens: int = field(init=False)
    """Tokens in committed shards so far (from before, and extracted since)."""
    summary: dict[str, Any] | None = None
    """The finished model's summary, once its manifest is written."""
    restarts: int = 0
    """Calls answered by a replica that Ray had restarted (it redid the block it was on)."""
    blocks_done: list[int] = field(init=False)
    """Blocks each replica extracted (a block found committed counts for whoever was handed it)."""
    resumed: int = field(init=False)
    """Shards found committed and kept: by the plan (an earlier attempt) or by a restarted replica."""

    def __post_init__(self) -> None:
        self.queue = deque(self.plan.pending)
        self.tokens = sum(e.n_tokens for e in self.plan.committed)
        self.resumed = len(self.plan.committed)
        self.blocks_done = [0] * len(self.handles)

    @property
    def total_tokens(self) -> int:
        return self.plan.shards.n_tokens

    def note(self, result: dict[str, Any]) -> None:
        kept = result.get("kept_after_restart")
        if kept is not None:
            self.restarts += 1
            self.resumed = max(self.resumed, int(kept))


_Call = tuple[ReplicaSet, int, Block | None]
"""A running call: whose replica, which one, and the block it extracts (None: it writes the manifest)."""


def _dispatch(sets: Mapping[str, ReplicaSet], running: dict[ray.ObjectRef, _Call]) -> None:
    """Give every idle live replica the next block of its model, or a finished model's manifest to write."""
    for replicas in sets.values():
        if replicas.summary is not None:
            continue
        busy = {index for (owner, index, _) in running.values() if owner is replicas}
        for index, handle in enumerate(replicas.handles):
            if index in busy or index in replicas.dead:
                continue
            if replicas.queue:
                block = replicas.queue.popleft()
                ref = handle.extract_block.remote(replicas.request, replicas.plan.key, block)
                running[ref] = (replicas, index, block)
                busy.add(index)
            elif not busy:  # every block committed: one replica writes the manifest
                running[handle.finish.remote(replicas.request, replicas.plan)] = (replicas, index, None)
                break


def run_replicas(
    sets: Mapping[str, ReplicaSet],
    *,
    check_cancelled: Callable[[], None],
    on_progress: Callable[[Mapping[str, ReplicaSet]], None],
    poll_s: float = 0.5,
) -> dict[str, dict[str, Any]]:
    """Extract every pending block of every model with its replicas, then write each manifest; return the
    summaries by model. A replica lost for good gives its block back; ``WorkerFailed`` when a model has none left
    or a call fails for another reason (a bad corpus, a full disk: it would fail on any replica)."""
    running: dict[ray.ObjectRef, _Call] = {}
    _dispatch(sets, running)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
        for ref in ready:
            replicas, index, block = running.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as exc:
                replicas.dead.add(index)
                what = f"block {block.index}" if block is not None else "the manifest"
                log.warning("%s: replica %d is gone (%s); %s goes to another replica", replicas.label, index, exc, what)
                if block is not None:
                    replicas.queue.appendleft(block)
                if len(replicas.dead) == len(replicas.handles):
                    raise actors.WorkerFailed.of(replicas.label, exc) from None
                continue
            except RayError as exc:
                log.warning("%s failed: %s", replicas.label, exc)  # the remote traceback, for operators
                raise actors.WorkerFailed.of(replicas.label, exc) from None
            replicas.note(result)
            if block is None:
                replicas.summary = result
            else:
                replicas.tokens += int(result["n_tokens"])
                replicas.blocks_done[index] += 1
        _dispatch(sets, running)
        check_cancelled()
        on_progress(sets)
    return {side: _summary(replicas) for side, replicas in sets.items()}


def _summary(replicas: ReplicaSet) -> dict[str, Any]:
    summary = {k: v for k, v in (replicas.summary or {}).items() if k != "kept_after_restart"}
    return {
        **summary,
        "cached": False,
        "resumed_shards": replicas.resumed,
        "replicas": len(replicas.handles),
        "replicas_lost": len(replicas.dead),
        "replica_restarts": replicas.restarts,
        "blocks_per_replica": replicas.blocks_done,
    }


def cached_summary(plan: ExtractionPlan) -> dict[str, Any]:
    """The summary of a model whose activations were complete before the stage started (no replica ran)."""
    return {
        **actors.extraction_summary(plan.key, plan.committed),
        "cached": True,
        "resumed_shards": 0,
        "replicas": 0,
        "replicas_lost": 0,
        "replica_restarts": 0,
        "blocks_per_replica": [],
    }
