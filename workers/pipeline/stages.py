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
from workers.pipeline.training import TrainingJob
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


def train_stage(ctx: StageContext) -> dict[str, Any]:
    """Train the crosscoder in an actor on ``spec.training.num_gpus``, checkpointing to and resuming from storage."""
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
    job = TrainingJob(
        prefix_a=extracted["a"]["prefix"],
        prefix_b=extracted["b"]["prefix"],
        train_key=aligned["train_key"],
        n_train=aligned["n_train"],
        heldout_key=aligned["heldout_key"],
        n_heldout=aligned["n_heldout"],
        out_prefix=ctx.key("crosscoder"),
        model=model,
        train=recipe,
        batch_size=t.batch_size,
        seed=spec.seed,
        scratch_dir=str(ctx.work_dir / "train"),
    )
    group = actors.reserve(
        [_bundle(1.0, t.num_gpus)],
        what="the training actor",
        timeout_s=PLACEMENT_TIMEOUT_S,
        check_cancelled=ctx.check_cancelled,
        fail_fast=actors.started_local_ray(),
    )
    worker = {"train": None}
    try:
        worker["train"] = actors.TrainingActor.options(
            name=actors.actor_name(ctx.audit_id, "train", ctx.attempt),
            num_cpus=1,
            num_gpus=t.num_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0),
        ).remote(ctx.store_url, ctx.store_settings, 1)

        def on_progress(latest: dict[str, dict[str, float]]) -> None:
            step = latest.get("train", {})
            if step:
                counters = {k: v for k, v in step.items() if k != "step"}
                ctx.report_progress(step["step"] / resolved.steps, training_step=step["step"], **counters)

        outcome = actors.wait_all(
            {"train": worker["train"].run.remote(job)},
            labels={"train": "training the crosscoder"},
            check_cancelled=ctx.check_cancelled,
            actors=worker,
            on_progress=on_progress,
        )["train"]
    finally:
        actors.stop({k: v for k, v in worker.items() if v is not None})
        remove_placement_group(group)
    heldout = outcome["heldout"]
    ctx.report_progress(
        1.0,
        force=True,
        training_step=outcome["steps"],
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
        "seed": spec.seed,
        "device": recipe.device,
        **outcome,
    }
