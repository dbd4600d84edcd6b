"""Ray actors and tasks of the audit pipeline, and the driver-side helpers that reserve resources and wait on them.

Workers get keys, small configs and the store's URL, never tensors: each reopens the store itself, so large data
moves between a worker and the bucket directly and never through the Ray object store. Every worker's work is
committed to storage piece by piece (shards, checkpoints), so when Ray restarts a dead worker and retries its
call, the call resumes instead of starting over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from dfc.distributed import free_port, process_group
from dfc.trainer import StepMetrics
from workers.activations.extract import (
    DocumentCursor,
    ExtractionKey,
    ExtractionPlan,
    ExtractionRequest,
    document_token_counts,
    extract_block,
    finish_extraction,
    load_for_extraction,
    load_tokenizer,
    resolve_key,
)
from workers.activations.loading import LoadedModel
from workers.activations.pairing import align_activations, stored_texts
from workers.activations.plan import Block
from workers.activations.shards import ShardEntry
from workers.pipeline.training import TrainingJob, run_training, split_pairs
from workers.storage import open_store

log = logging.getLogger(__name__)

_LOCAL_OBJECT_STORE = 512 * 1024 * 1024  # large data goes through the bucket, not the Ray object store
_local_instance = False  # whether this process started its own Ray (then shortfalls fail at once)
RESTARTS = 3
"""How often Ray restarts a worker that died (OOM kill, lost node) and retries its call."""
_MESSAGE_LIMIT = 1500


RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
"""Where Ray (2.60) logs its token-authentication notices."""


class _AuthEnabledNotice(logging.Filter):
    """Drops the warning Ray logs on every ``ray.init`` that starts a local instance, that token authentication is
    on (its default: nothing for the user to do); any other notice of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def quiet_ray_auth_notice() -> None:
    """Keep Ray's "Token authentication is enabled" warning off the terminal (idempotent)."""
    logger = logging.getLogger(RAY_AUTH_LOGGER)
    if not any(isinstance(f, _AuthEnabledNotice) for f in logger.filters):
        logger.addFilter(_AuthEnabledNotice())


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster this process runs in (a Ray job, or ``RAY_ADDRESS``), or start a small local instance."""
    global _local_instance
    if ray.is_initialized():
        return
    quiet_ray_auth_notice()
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    # address="local": never attach to someone else's `ray start` cluster on a shared machine by accident.
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count() or 2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        object_store_memory=_LOCAL_OBJECT_STORE,
    )
    _local_instance = True


def started_local_ray() -> bool:
    """Whether :func:`ensure_ray` started a local instance here (a fixed size: resource shortfalls are final)."""
    return _local_instance


def cluster_totals() -> dict[str, float]:
    """The Ray cluster's total resources (what a placement group could ever get, busy or not)."""
    return {name: float(value) for name, value in ray.cluster_resources().items()}


def actor_name(audit_id: str, role: str, attempt: int) -> str:
    """The Ray name of one of an audit's actors; the attempt keeps a quick retry clear of a dying predecessor."""
    return f"dfc-{audit_id}-{role}-{attempt}"


class _Worker:
    """Holds the reopened store and the latest progress, which a second thread serves from ``progress()``."""

    def __init__(self, store_url: str, store_settings: Mapping[str, Any], num_cpus: float) -> None:
        # Ray's CPU reservation, not the machine's core count: more threads than reserved cores thrash.
        torch.set_num_threads(max(1, int(num_cpus)))
        self.store = open_store(store_url, **store_settings)
        self.latest: dict[str, float] = {}

    def progress(self) -> dict[str, float]:
        """The counters of the running call (empty before it reports)."""
        return dict(self.latest)


def budget_documents(request: ExtractionRequest) -> int:
    """How many of the corpus' first documents hold ``request.max_tokens`` tokens of this model (at least one).

    Both models must read the same documents for their tokens to be paired, but a token budget applied by each
    model's own tokenizer stops them at different documents; the reference model's count fixes one document
    budget for both. Only the tokenizer is loaded, and documents are counted as extraction stores them
    (truncated to ``max_length``).
    """
    key = resolve_key(request)  # a missing model or a disallowed remote-code one fails here, before the weights
    counts = document_token_counts(request, load_tokenizer(request, key))
    total, n_docs = 0, 0
    with contextlib.closing(counts):
        for n in counts:
            total, n_docs = total + n, n_docs + 1
            if request.max_tokens is not None and total >= request.max_tokens:
                break
    return max(1, n_docs)


def extraction_summary(key: ExtractionKey, shards: Sequence[ShardEntry]) -> dict[str, Any]:
    """What the extract manifest records about one model's finished activations."""
    return {
        "prefix": key.prefix,
        "model_id": key.model_id,
        "revision": key.revision,
        "layer_index": key.layer_index,
        "d_model": shards[0].d_model,
        "n_tokens": sum(e.n_tokens for e in shards),
        "n_docs": len(frozenset().union(*(e.doc_ids for e in shards))),
        "n_shards": len(shards),
    }


class ExtractionWorker(_Worker):
    """One replica of a model's extraction: loads the model once, then extracts the blocks the driver hands it.

    Blocks come one call at a time, so a replica that dies leaves at most one block unfinished; Ray restarts it
    and retries that call, or the driver gives the block to another replica. A committed block is never redone.
    """

    def __init__(self, store_url: str, store_settings: Mapping[str, Any], num_cpus: float) -> None:
        super().__init__(store_url, store_settings, num_cpus)
        self._loaded: tuple[str, LoadedModel] | None = None
        self._documents: tuple[str, DocumentCursor] | None = None
        self._first_call = True

    def _model(self, request: ExtractionRequest, key: ExtractionKey) -> LoadedModel:
        if self._loaded is None or self._loaded[0] != key.prefix:
            self._loaded = None  # free the old model before loading another
            self._loaded = (key.prefix, load_for_extraction(request, key))
        return self._loaded[1]

    def _cursor(self, request: ExtractionRequest, key: ExtractionKey) -> DocumentCursor:
        if self._documents is None or self._documents[0] != key.prefix:
            if self._documents is not None:
                self._documents[1].close()
            self._documents = (key.prefix, DocumentCursor(request.corpus))
        return self._documents[1]

    def _kept_after_restart(self, prefix: str) -> int | None:
        """On a restarted replica's first call: how many shards were committed (and are kept) when it came back."""
        first, self._first_call = self._first_call, False
        context = ray.get_runtime_context()
        if not first or context.get_actor_id() is None or not context.was_current_actor_reconstructed:
            return None
        return sum(1 for key in self.store.list(f"{prefix}/shard-") if key.endswith(".json"))

    def extract_block(self, request: ExtractionRequest, key: ExtractionKey, block: Block) -> dict[str, Any]:
        """Extract one planned block into shard ``block.index`` (or find it committed) and say what it holds."""
        kept = self._kept_after_restart(key.prefix)
        entry = extract_block(request, key, block, self._model(request, key), self.store,
                              documents=self._cursor(request, key))  # fmt: skip
        self.latest = {"shard": entry.index, "tokens": entry.n_tokens}
        return {"index": entry.index, "n_tokens": entry.n_tokens, "kept_after_restart": kept}

    def finish(self, request: ExtractionRequest, plan: ExtractionPlan) -> dict[str, Any]:
        """Write the manifest once every block is committed, and return the summary the extract manifest records."""
        kept = self._kept_after_restart(plan.key.prefix)
        manifest = finish_extraction(request, plan, self._model(request, plan.key), self.store)
        return {**extraction_summary(plan.key, manifest.shards), "kept_after_restart": kept}


class TrainingWorker(_Worker):
    """Trains a crosscoder from stored paired activations, checkpointing to storage: alone, or as one data-parallel
    worker of a run whose rank 0 the driver asked for a :meth:`rendezvous` address."""

    def rendezvous(self) -> str:
        """``host:port`` on this actor's node where this worker, as rank 0, will gather the run's workers."""
        return f"{ray.util.get_node_ip_address()}:{free_port()}"

    def run(
        self, job: TrainingJob, rank: int = 0, workers: int = 1, address: str | None = None
    ) -> dict[str, Any] | None:
        """Train (resuming from the stored checkpoint) and return the outcome the train manifest records (rank 0;
        the other workers of a data-parallel run return ``None``)."""

        def on_step(m: StepMetrics) -> None:
            self.latest = {
                "step": m.step + 1,
                "loss": m.loss,
                "fve_a": 1.0 - m.fvu_a,
                "fve_b": 1.0 - m.fvu_b,
                "l0": m.l0,
                "dead_fraction": m.dead_fraction,
            }

        if workers == 1:
            outcome = run_training(job, self.store, progress=on_step)
            return outcome.to_dict() if outcome is not None else None
        if address is None:
            raise ValueError("a data-parallel training worker needs rank 0's rendezvous address")
        # A dead peer surfaces here as the backend's error ("Connection closed by peer …" from gloo).
        with process_group(address, rank, workers, job.train.device) as parallel:
            outcome = run_training(job, self.store, progress=on_step, parallel=parallel)
        return outcome.to_dict() if outcome is not None else None


def gang_options(workers: int) -> dict[str, Any]:
    """Ray options of the actors of a training run of ``workers`` data-parallel workers.

    A worker that Ray restarted alone could not rejoin its group, so data-parallel workers are never restarted
    one by one: the run fails as a whole, and a rerun resumes it from its stored checkpoint.
    """
    return {} if workers == 1 else {"max_restarts": 0, "max_task_retries": 0}


# max_concurrency=2: `progress()` is answered on a second thread while `run()` works on the first.
_ACTOR_OPTIONS: dict[str, Any] = {"max_restarts": RESTARTS, "max_task_retries": RESTARTS, "max_concurrency": 2}
ExtractionActor = ray.remote(**_ACTOR_OPTIONS)(ExtractionWorker)
TrainingActor = ray.remote(**_ACTOR_OPTIONS)(TrainingWorker)


@ray.remote(num_cpus=1, max_retries=RESTARTS)
def align_task(
    store_url: str, store_settings: Mapping[str, Any], prefix_a: str, prefix_b: str, out_prefix: str, min_train: int
) -> dict[str, Any]:
    """Pair the two models' tokens, hold out a tail for evaluation, and return what the align manifest records."""
    torch.set_num_threads(1)
    store = open_store(store_url, **store_settings)
    texts = stored_texts(store, prefix_a)
    result = align_activations(store, prefix_a, prefix_b, texts.__getitem__, out_prefix)
    split = split_pairs(store, result.pairs_key, out_prefix, min_train=min_train)
    return {
        "prefix_a": prefix_a,
        "prefix_b": prefix_b,
        "pairs_key": result.pairs_key,
        "n_pairs": result.n_pairs,
        "sequences": result.sequences,
        "aligned_sequence_fraction": result.aligned_sequence_fraction,
        "kept_token_fraction": result.kept_token_fraction,
        "failures": result.failures,
        **split._asdict(),
    }


class ResourcesUnavailable(RuntimeError):  # noqa: N818 - names the condition, as callers read it
    """The Ray cluster cannot (or not in time) provide the resources a stage asked for."""


class WorkerFailed(RuntimeError):  # noqa: N818 - names the outcome, as callers read it
    """A worker's call failed; ``kind`` names the underlying error class, the message says what failed and why."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind

    @classmethod
    def of(cls, label: str, exc: BaseException) -> WorkerFailed:
        """The failure of ``label``'s call, from the exception ``ray.get`` raised."""
        cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
        if isinstance(cause, RayActorError):
            first = (str(cause).strip().splitlines() or ["no reason given"])[0][:300]
            message = (
                f"{label}: its Ray worker died and was not restarted ({first}); check the worker's memory and "
                "GPU limits in the Ray logs, then run the audit again: it resumes from the last committed work"
            )
        else:
            message = f"{label}: {cause}"
        if len(message) > _MESSAGE_LIMIT:
            message = message[: _MESSAGE_LIMIT - 1] + "…"
        return cls(message, type(cause).__name__)


def _describe(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{value:g} {name}" for name, value in sorted(resources.items())) or "nothing"


def reserve(
    bundles: list[dict[str, float]],
    *,
    what: str,
    timeout_s: float,
    check_cancelled: Callable[[], None],
    fail_fast: bool = False,
    poll_s: float = 0.5,
) -> PlacementGroup:
    """Reserve ``bundles`` together (a "PACK" placement group) or raise ``ResourcesUnavailable`` naming the shortfall.

    ``fail_fast`` refuses at once when the cluster's totals are too small (right for a local instance, which
    never grows); otherwise an autoscaler may still add nodes, so the wait lasts up to ``timeout_s``.
    """
    bundles = [{name: float(value) for name, value in bundle.items() if value > 0} for bundle in bundles]
    need: dict[str, float] = {}
    for bundle in bundles:
        for name, value in bundle.items():
            need[name] = need.get(name, 0.0) + value
    have = ray.cluster_resources()
    have = {name: have.get(name, 0.0) for name in sorted({"CPU", "GPU", *need})}

    def shortfall(prefix: str) -> ResourcesUnavailable:
        return ResourcesUnavailable(
            f"{prefix}{what} need {_describe(need)} at once, and the Ray cluster has {_describe(have)} in total; "
            "lower the models' resources (num_gpus, num_cpus) in the spec, or add nodes to the cluster"
        )

    if fail_fast and any(value > have.get(name, 0.0) for name, value in need.items()):
        raise shortfall("")
    group = placement_group(bundles, strategy="PACK")
    ready = group.ready()
    deadline = time.monotonic() + timeout_s
    try:
        while not ray.wait([ready], timeout=poll_s)[0]:
            check_cancelled()
            if time.monotonic() > deadline:
                raise shortfall(f"waited {timeout_s:.0f} s for resources (other work may hold them): ")
    except BaseException:
        remove_placement_group(group)
        raise
    return group


def wait_all(
    refs: Mapping[str, ray.ObjectRef],
    *,
    labels: Mapping[str, str],
    check_cancelled: Callable[[], None],
    actors: Mapping[str, Any] | None = None,
    on_progress: Callable[[dict[str, dict[str, float]]], None] | None = None,
    poll_s: float = 0.5,
) -> dict[str, Any]:
    """Wait for every call in ``refs``, checking cancellation and relaying ``actors``' progress every ``poll_s``.

    Returns the results by name; a failed call raises ``WorkerFailed`` naming ``labels[name]``. Progress is
    polled without blocking, so an actor that is being restarted never stalls the loop.
    """
    pending, results = dict(refs), {}
    polls: dict[str, ray.ObjectRef] = {}
    latest: dict[str, dict[str, float]] = {}
    while pending:
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=poll_s)
        for name, ref in list(pending.items()):
            if ref in ready:
                try:
                    results[name] = ray.get(ref)
                except RayError as exc:
                    log.warning("%s failed: %s", labels.get(name, name), exc)  # the remote traceback, for operators
                    raise WorkerFailed.of(labels.get(name, name), exc) from None
                del pending[name]
        check_cancelled()
        if on_progress is None or not actors:
            continue
        for name, actor in actors.items():
            if name in polls and ray.wait([polls[name]], timeout=0)[0]:
                # A failed poll means the actor is restarting; the retried call reports again.
                with contextlib.suppress(RayError):
                    latest[name] = ray.get(polls.pop(name))
            if name not in polls and name in pending:
                polls[name] = actor.progress.remote()
        on_progress(latest)
    return results


def stop(actors: Mapping[str, Any], tasks: Mapping[str, ray.ObjectRef] | None = None) -> None:
    """Kill ``actors`` for good and cancel ``tasks``; what they committed to storage stays."""
    for actor in actors.values():
        ray.kill(actor, no_restart=True)
    for ref in (tasks or {}).values():
        with contextlib.suppress(RayError, TypeError, ValueError):  # it finished already
            ray.cancel(ref, force=True)
