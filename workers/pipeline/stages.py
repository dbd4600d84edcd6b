"""The first three stages of an audit, run by the driver on Ray: extract (both models in parallel), align, train.

Each returns its manifest; what it computed is already in storage when it returns. The analyse, steer and
publish stages live in ``workers/analysis/analyse.py``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dfc.config import CrosscoderConfig
from dfc.trainer import TrainConfig
from workers.activations.extract import ExtractionRequest
from workers.pipeline import actors
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
    """Both models' activations, extracted in parallel by one actor per model, reserved together."""
    spec = ctx.spec
    models = {"a": spec.model_a, "b": spec.model_b}
    group = actors.reserve(
        [_bundle(m.resources.num_cpus, m.resources.num_gpus) for m in models.values()],
        what="the two extraction actors",
        timeout_s=PLACEMENT_TIMEOUT_S,
        check_cancelled=ctx.check_cancelled,
        fail_fast=actors.started_local_ray(),
    )
    workers: dict[str, Any] = {}
    try:
        for index, (side, model) in enumerate(models.items()):
            workers[side] = actors.ExtractionActor.options(
                name=actors.actor_name(ctx.audit_id, f"extract-{side}", ctx.attempt),
                num_cpus=model.resources.num_cpus,
                num_gpus=model.resources.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            ).remote(ctx.store_url, ctx.store_settings, model.resources.num_cpus)
        labels = {side: f"extracting model {side.upper()} ({m.id})" for side, m in models.items()}
        # One document budget for both models (see actors.budget_documents), then both extract in parallel.
        requests = {side: _extraction_request(spec, m) for side, m in models.items()}
        n_docs = actors.wait_all(
            {"a": workers["a"].budget_documents.remote(requests["a"])},
            labels=labels,
            check_cancelled=ctx.check_cancelled,
        )["a"]
        corpus = dataclasses.replace(spec.corpus, max_docs=n_docs)
        requests = {side: dataclasses.replace(r, corpus=corpus, max_tokens=None) for side, r in requests.items()}
        calls = {side: workers[side].run.remote(request) for side, request in requests.items()}

        def on_progress(latest: dict[str, dict[str, float]]) -> None:
            tokens = {side: latest.get(side, {}).get("tokens", 0.0) for side in models}
            done = sum(min(1.0, n / spec.token_budget) for n in tokens.values()) / len(models)
            ctx.report_progress(done, tokens_extracted_a=tokens["a"], tokens_extracted_b=tokens["b"])

        results = actors.wait_all(
            calls, labels=labels, check_cancelled=ctx.check_cancelled, actors=workers, on_progress=on_progress
        )
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


def _parallel_runs(num_gpus: float, wanted: int) -> int:
    """How many training actors the cluster can hold at once (one CPU, and ``num_gpus``, each)."""
    total = actors.cluster_totals()
    fit = int(total.get("CPU", 1.0) // 1.0)
    if num_gpus > 0:
        fit = min(fit, int(total.get("GPU", 0.0) // num_gpus))
    return max(1, min(wanted, fit))


def train_stage(ctx: StageContext) -> dict[str, Any]:
    """Train ``training.seeds`` crosscoders on the same pairs, as many at once as the cluster holds (one actor each,
    on ``training.num_gpus``), each checkpointing to and resuming from storage; finished seeds are kept on resume."""
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
    parallel = _parallel_runs(t.num_gpus, len(pending))
    group = (
        actors.reserve(
            [_bundle(1.0, t.num_gpus)] * parallel,
            what=f"{parallel} training actor{'s' if parallel > 1 else ''}",
            timeout_s=PLACEMENT_TIMEOUT_S,
            check_cancelled=ctx.check_cancelled,
            fail_fast=actors.started_local_ray(),
        )
        if pending
        else None
    )
    workers: dict[str, Any] = {}
    try:
        for slot in range(parallel if pending else 0):
            workers[f"train-{slot}"] = actors.TrainingActor.options(
                name=actors.actor_name(ctx.audit_id, f"train-{slot}", ctx.attempt),
                num_cpus=1,
                num_gpus=t.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=slot),
            ).remote(ctx.store_url, ctx.store_settings, 1)
        total_steps = resolved.steps * t.seeds
        for start in range(0, len(pending), parallel):  # waves of at most `parallel` seeds, one per actor
            wave = pending[start : start + parallel]
            running = {f"train-{slot}": run for slot, run in enumerate(wave)}

            def on_progress(latest: dict[str, dict[str, float]], running: dict[str, int] = running) -> None:
                steps = {running[name]: step["step"] for name, step in latest.items() if step and name in running}
                if not steps:
                    return
                done = sum(int(o["steps"]) for o in outcomes.values()) + sum(steps.values())
                first = latest[min(name for name in latest if name in running and latest[name])]
                counters = {k: v for k, v in first.items() if k != "step"}  # the first running seed's losses
                ctx.report_progress(done / total_steps, training_step=min(steps.values()),
                                    training_seeds_done=len(outcomes), **counters)  # fmt: skip

            results = actors.wait_all(
                {name: workers[name].run.remote(jobs[run]) for name, run in running.items()},
                labels={name: f"training the crosscoder of seed {spec.seed + run}" for name, run in running.items()},
                check_cancelled=ctx.check_cancelled,
                actors={name: workers[name] for name in running},
                on_progress=on_progress,
            )
            outcomes.update({running[name]: outcome for name, outcome in results.items()})
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
        "lr": t.lr,
        "device": recipe.device,
        **{k: v for k, v in first.items() if k != "run"},  # the first seed's outcome, as a one-seed audit records it
        "runs": runs,
    }
