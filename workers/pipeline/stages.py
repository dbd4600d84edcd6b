"""The first three stages of an audit, run by the driver on Ray: extract (both models in parallel), align, train.

Each returns its manifest; what it computed is already in storage when it returns. The analyse, steer and
publish stages live in ``workers/analysis/analyse.py``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import ray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dfc.config import CrosscoderConfig
from dfc.trainer import TrainConfig
from workers.activations.extract import ExtractionRequest
from workers.pipeline import actors, replicas
from workers.pipeline.context import AuditCancelled, StageContext
from workers.pipeline.training import TrainingJob, outcome_key
from workers.spec import AuditSpec, ModelRef

PLACEMENT_TIMEOUT_S = float(os.environ.get("DFC_PLACEMENT_TIMEOUT_S", "600"))
"""How long a stage waits for the cluster to free (or an autoscaler to add) the resources it asked for."""


def _extraction_request(spec: AuditSpec, model: ModelRef) -> ExtractionRequest:
    on_gpu = model.resources.num_gpus > 0
    max_memory = model.resources.max_memory if on_gpu else None
    return ExtractionRequest(
        model=model.id,
        revision=model.revision,
        layer=model.layer,
        corpus=spec.corpus,
        device_map=model.device_map if on_gpu else None,
        # accelerate names GPUs by integer index; JSON keys are strings.
        max_memory={int(k) if k.isdigit() else k: v for k, v in max_memory.items()} if max_memory else None,
        dtype=model.dtype,
        max_length=spec.max_length,
        max_tokens_per_batch=max(8192, spec.max_length),
        # About 16 shards per budget (64Ki tokens at most): fine-grained progress and resume on small audits.
        tokens_per_shard=max(1024, min(65536, spec.token_budget // 16)),
        max_tokens=spec.token_budget,  # counted in model A's tokens by budget_documents, then replaced
    )


def _bundle(num_cpus: float, num_gpus: float) -> dict[str, float]:
    return {"CPU": num_cpus, "GPU": num_gpus}


def extract_stage(ctx: StageContext) -> dict[str, Any]:
    """Both models' activations, each extracted by its replicas (``resources.replicas``) working through its planned
    shard blocks, all replicas of both models reserved together (see ``workers/pipeline/replicas.py``)."""
    spec = ctx.spec
    models = {"a": spec.model_a, "b": spec.model_b}
    labels = {side: f"extracting model {side.upper()} ({m.id})" for side, m in models.items()}
    requests = {side: _extraction_request(spec, m) for side, m in models.items()}
    free = ray.available_resources()  # for "auto" replicas; taken before this stage's own tasks hold any
    # One document budget for both models (see actors.budget_documents), then each model's shard plan.
    n_docs = _wait_tasks({"a": replicas.budget_task.remote(requests["a"])}, labels, ctx)["a"]
    corpus = dataclasses.replace(spec.corpus, max_docs=n_docs)
    requests = {side: dataclasses.replace(r, corpus=corpus, max_tokens=None) for side, r in requests.items()}
    plans = _wait_tasks(
        {side: replicas.plan_task.remote(ctx.store_url, ctx.store_settings, r) for side, r in requests.items()},
        labels,
        ctx,
    )
    results = {side: replicas.cached_summary(plan) for side, plan in plans.items() if plan.complete}
    todo = {side: models[side].resources for side, plan in plans.items() if not plan.complete}
    counts = replicas.replica_counts(todo, {side: len(plans[side].pending) for side in todo}, free)
    slots = [(side, r) for side in todo for r in range(counts[side])]  # one placement bundle each
    # A cached model starts no replica but still reserves one, as before replicas: whether a spec fits the cluster
    # must not depend on whether another audit filled the cache.
    cached = [models[side].resources for side in results]
    group = actors.reserve(
        [replicas.replica_bundle(todo[side]) for side, _ in slots] + [replicas.replica_bundle(r) for r in cached],
        what=" and ".join(f"{counts.get(s, 1)} extraction replica(s) of model {s.upper()}" for s in models),
        timeout_s=PLACEMENT_TIMEOUT_S,
        check_cancelled=ctx.check_cancelled,
        fail_fast=actors.started_local_ray(),
    )
    workers: dict[str, Any] = {}
    try:
        handles: dict[str, list[Any]] = {side: [] for side in todo}
        for index, (side, r) in enumerate(slots):
            role = f"extract-{side}" if r == 0 else f"extract-{side}-{r}"  # replica 0 keeps the one-actor name
            workers[role] = actors.ExtractionActor.options(
                name=actors.actor_name(ctx.audit_id, role, ctx.attempt),
                num_cpus=todo[side].num_cpus,
                num_gpus=todo[side].num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            ).remote(ctx.store_url, ctx.store_settings, todo[side].num_cpus)
            handles[side].append(workers[role])
        sets = {side: replicas.ReplicaSet(labels[side], requests[side], plans[side], handles[side]) for side in todo}
        tokens = {side: float(results[side]["n_tokens"]) for side in results}

        def on_progress(sets: Mapping[str, replicas.ReplicaSet]) -> None:
            tokens.update({side: float(s.tokens) for side, s in sets.items()})
            done = sum(min(1.0, s.tokens / max(1, s.total_tokens)) for s in sets.values()) + len(results)
            ctx.report_progress(done / len(models), tokens_extracted_a=tokens["a"], tokens_extracted_b=tokens["b"])

        if sets:
            on_progress(sets)
            results.update(replicas.run_replicas(sets, check_cancelled=ctx.check_cancelled, on_progress=on_progress))
    finally:
        actors.stop(workers)
        remove_placement_group(group)
    ctx.report_progress(
        1.0, force=True, tokens_extracted_a=results["a"]["n_tokens"], tokens_extracted_b=results["b"]["n_tokens"]
    )
    return {
        "a": results["a"],
        "b": results["b"],
        "documents": n_docs,
        "token_budget": spec.token_budget,
        "max_length": spec.max_length,
    }


def _wait_tasks(refs: dict[str, Any], labels: dict[str, str], ctx: StageContext) -> dict[str, Any]:
    """Wait for the extract stage's CPU tasks (budget, plans); cancelling the audit cancels them."""
    try:
        return actors.wait_all(refs, labels=labels, check_cancelled=ctx.check_cancelled)
    except AuditCancelled:
        actors.stop({}, refs)
        raise


def align_stage(ctx: StageContext) -> dict[str, Any]:
    """Pair the two models' token positions (a CPU task) and split off a held-out tail."""
    extracted = ctx.outputs["extract"]
    call = actors.align_task.options(name=actors.actor_name(ctx.audit_id, "align", ctx.attempt)).remote(
        ctx.store_url,
        ctx.store_settings,
        extracted["a"]["prefix"],
        extracted["b"]["prefix"],
        ctx.key("alignment"),
        ctx.spec.training.batch_size,
    )
    try:
        result = actors.wait_all(
            {"align": call}, labels={"align": "aligning the two tokenizations"}, check_cancelled=ctx.check_cancelled
        )["align"]
    except AuditCancelled:
        actors.stop({}, {"align": call})
        raise
    ctx.report_progress(1.0, force=True, token_pairs=result["n_pairs"])
    return result


def run_prefix(ctx: StageContext, run: int) -> str:
    """Where run ``run`` of the seed ensemble keeps its checkpoints and final weights (one seed: ``crosscoder``)."""
    return ctx.key("crosscoder") if ctx.spec.training.seeds == 1 else ctx.key(f"crosscoder/seed-{run}")


def _parallel_runs(num_gpus: float, workers: int, wanted: int) -> int:
    """How many crosscoder runs the cluster can hold at once: each takes ``workers`` bundles of one CPU and
    ``num_gpus`` (the seed ensemble and data parallelism share this one placement)."""
    total = actors.cluster_totals()
    fit = int(total.get("CPU", 1.0) // workers)
    if num_gpus > 0:
        fit = min(fit, int(total.get("GPU", 0.0) // (num_gpus * workers)))
    return max(1, min(wanted, fit))


def _worker_role(slot: int, rank: int) -> str:
    """A training actor's role: ``train-{slot}`` for a run's rank 0 (the one-worker name), ``train-{slot}-{rank}``."""
    return f"train-{slot}" if rank == 0 else f"train-{slot}-{rank}"


def _training_calls(
    ctx: StageContext, workers: Mapping[str, Any], jobs: list[TrainingJob], wave: list[int], n_workers: int
) -> tuple[dict[str, Any], dict[str, str]]:
    """Start the runs of one wave (run ``wave[slot]`` on slot ``slot``'s workers); return the calls and their labels.

    A data-parallel run's workers meet at an address its rank 0 picks on its own node.
    """
    seed = ctx.spec.seed
    calls: dict[str, Any] = {}
    labels: dict[str, str] = {}
    if n_workers == 1:
        for slot, run in enumerate(wave):
            calls[_worker_role(slot, 0)] = workers[_worker_role(slot, 0)].run.remote(jobs[run])
            labels[_worker_role(slot, 0)] = f"training the crosscoder of seed {seed + run}"
        return calls, labels
    addresses = actors.wait_all(
        {str(slot): workers[_worker_role(slot, 0)].rendezvous.remote() for slot in range(len(wave))},
        labels={str(slot): f"starting the training workers of seed {seed + run}" for slot, run in enumerate(wave)},
        check_cancelled=ctx.check_cancelled,
    )
    for slot, run in enumerate(wave):
        for rank in range(n_workers):
            role = _worker_role(slot, rank)
            calls[role] = workers[role].run.remote(jobs[run], rank, n_workers, addresses[str(slot)])
            labels[role] = f"training the crosscoder of seed {seed + run} (worker {rank} of {n_workers})"
    return calls, labels


def train_stage(ctx: StageContext) -> dict[str, Any]:
    """Train ``training.seeds`` crosscoders on the same pairs, as many at once as the cluster holds
    (``training.workers`` data-parallel actors each, on ``training.num_gpus`` each), each checkpointing to and
    resuming from storage; finished seeds are kept on resume."""
    spec, extracted, aligned = ctx.spec, ctx.outputs["extract"], ctx.outputs["align"]
    d_a, d_b = extracted["a"]["d_model"], extracted["b"]["d_model"]
    resolved = spec.resolve(d_a, d_b, aligned["n_train"])
    model = CrosscoderConfig(
        d_a=d_a,
        d_b=d_b,
        n_features=resolved.n_features,
        k=resolved.k,
        architecture=spec.crosscoder.architecture,
        a_only=spec.crosscoder.a_only,
        b_only=spec.crosscoder.b_only,
        model_names=(spec.model_a.id, spec.model_b.id),
        metadata={"audit_id": ctx.audit_id, "prefix_a": extracted["a"]["prefix"], "prefix_b": extracted["b"]["prefix"]},
    )
    t = spec.training
    recipe = TrainConfig(
        steps=resolved.steps,
        lr=t.lr,
        aux_alpha=t.aux_alpha,
        aux_k=t.aux_k,
        exclusive_init_norm=t.exclusive_init_norm,
        dead_after_tokens=resolved.dead_after_tokens,
        seed=spec.seed,
        device="cuda" if t.num_gpus > 0 else "cpu",
        checkpoint_every=t.checkpoint_every,
    )
    jobs = [
        TrainingJob(
            prefix_a=extracted["a"]["prefix"],
            prefix_b=extracted["b"]["prefix"],
            train_key=aligned["train_key"],
            n_train=aligned["n_train"],
            heldout_key=aligned["heldout_key"],
            n_heldout=aligned["n_heldout"],
            out_prefix=run_prefix(ctx, run),
            model=model,
            train=dataclasses.replace(recipe, seed=spec.seed + run),
            batch_size=t.batch_size,
            seed=spec.seed + run,
            scratch_dir=str(ctx.work_dir / "train" / f"seed-{run}"),
        )
        for run in range(t.seeds)
    ]
    outcomes: dict[int, dict[str, Any]] = {}
    for run, job in enumerate(jobs):  # a resumed audit keeps the seeds that finished
        if ctx.store.exists(outcome_key(job.out_prefix)):
            outcomes[run] = ctx.store.get_json(outcome_key(job.out_prefix))
    pending = [run for run in range(t.seeds) if run not in outcomes]
    parallel = _parallel_runs(t.num_gpus, t.workers, len(pending))
    slots = range(parallel if pending else 0)
    runs_what = f"{parallel} training run{'s' if parallel > 1 else ''}"
    group = (
        actors.reserve(  # run `slot`'s worker `rank` takes bundle slot * workers + rank
            [_bundle(1.0, t.num_gpus)] * (parallel * t.workers),
            what=runs_what if t.workers == 1 else f"{runs_what} of {t.workers} data-parallel workers each",
            timeout_s=PLACEMENT_TIMEOUT_S,
            check_cancelled=ctx.check_cancelled,
            fail_fast=actors.started_local_ray(),
        )
        if pending
        else None
    )
    workers: dict[str, Any] = {}
    try:
        for slot in slots:
            for rank in range(t.workers):
                role = _worker_role(slot, rank)
                workers[role] = actors.TrainingActor.options(
                    name=actors.actor_name(ctx.audit_id, role, ctx.attempt),
                    num_cpus=1,
                    num_gpus=t.num_gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=slot * t.workers + rank
                    ),
                    **actors.gang_options(t.workers),
                ).remote(ctx.store_url, ctx.store_settings, 1)
        total_steps = resolved.steps * t.seeds
        for start in range(0, len(pending), parallel):  # waves of at most `parallel` seeds, one run per slot
            wave = pending[start : start + parallel]
            running = {_worker_role(slot, 0): run for slot, run in enumerate(wave)}  # rank 0 reports progress

            def on_progress(latest: dict[str, dict[str, float]], running: dict[str, int] = running) -> None:
                steps = {running[name]: step["step"] for name, step in latest.items() if step and name in running}
                if not steps:
                    return
                done = sum(int(o["steps"]) for o in outcomes.values()) + sum(steps.values())
                first = latest[min(name for name in latest if name in running and latest[name])]
                counters = {k: v for k, v in first.items() if k != "step"}  # the first running seed's losses
                ctx.report_progress(done / total_steps, training_step=min(steps.values()),
                                    training_seeds_done=len(outcomes), **counters)  # fmt: skip

            calls, labels = _training_calls(ctx, workers, jobs, wave, t.workers)
            results = actors.wait_all(
                calls,
                labels=labels,
                check_cancelled=ctx.check_cancelled,
                actors={name: workers[name] for name in running},
                on_progress=on_progress,
            )
            outcomes.update({running[name]: results[name] for name in running})
    finally:
        actors.stop(workers)
        if group is not None:
            remove_placement_group(group)
    runs = [{"run": run, "seed": spec.seed + run, **outcomes[run]} for run in range(t.seeds)]
    first = runs[0]
    heldout = first["heldout"]
    ctx.report_progress(
        1.0,
        force=True,
        training_step=first["steps"],
        training_seeds_done=len(runs),
        heldout_fve_a=heldout["fve_a"],
        heldout_fve_b=heldout["fve_b"],
        heldout_l0=heldout["l0"],
    )
    return {
        "resolved": resolved.model_dump(),
        "crosscoder": model.to_dict(),
        "n_a_only": model.n_a_only,
        "n_b_only": model.n_b_only,
        "n_shared": model.n_shared,
        "batch_size": t.batch_size,
        "workers": t.workers,
        "lr": t.lr,
        "device": recipe.device,
        **{k: v for k, v in first.items() if k != "run"},  # the first seed's outcome, as a one-seed audit records it
        "runs": runs,
    }
