"""Specification of the audit spec (the one source of truth for parameters) and the audit record."""

import pydantic
import pytest

from workers.pipeline.status import STAGES, AuditState, AuditStore, overall_progress
from workers.spec import MAX_TOKEN_BUDGET, AuditSpec

BASE = {"model_a": {"id": "meta-llama/Llama-3.1-8B-Instruct"}, "model_b": {"id": "Qwen/Qwen3-8B"}}


def test_defaults_follow_the_paper_at_paper_scale():
    spec = AuditSpec.model_validate(BASE)
    resolved = spec.resolve(d_a=4096, d_b=4096, paired_tokens=100_000_000)
    assert (resolved.n_features, resolved.k) == (131_072, 200)
    assert resolved.steps == 97_657  # two epochs of 100M pairs at batch 2048 (paper: 100k steps)
    assert resolved.dead_after_tokens == 10_000_000
    assert spec.crosscoder.a_only == spec.crosscoder.b_only == 0.05 and spec.training.lr == 1e-4


def test_defaults_scale_down_for_tiny_models_and_budgets():
    resolved = AuditSpec.model_validate(BASE).resolve(d_a=64, d_b=96, paired_tokens=50_000)
    assert resolved.n_features == 32 * 96 and resolved.k == 12
    assert resolved.steps == 49 and resolved.dead_after_tokens < 50_000 * 2


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_b": {"id": "meta-llama/Llama-3.1-8B-Instruct"}}, "are the same model"),
        ({"model_b": {"id": "not a model id!"}}, "neither a Hugging Face id"),
        ({"token_budget": 0}, "greater than or equal to 1000"),
        ({"token_budget": 10**15}, f"less than or equal to {MAX_TOKEN_BUDGET}"),
        ({"surprise": True}, "Extra inputs are not permitted"),
        ({"steering": {"alphas": [float("nan")]}}, "finite number"),
        ({"steering": {"alphas": [2000.0]}}, "must be finite and"),
        ({"training": {"lr": float("inf")}}, "training.lr\n.*finite number"),
        ({"crosscoder": {"a_only": 0.45, "b_only": 0.45}}, "at least 10% of the dictionary shared"),
        ({"model_a": {"id": "a/b", "revision": "has space"}}, "not a branch, tag or commit: it contains a space"),
        ({"model_a": {"id": "a/b", "revision": "../../x"}}, "it contains '..'.*40-character commit hash"),
        ({"corpus": {"kind": "web"}}, "'builtin', 'files', 'hf' or 'mix'"),
    ],
)
def test_bad_specs_are_rejected_with_a_message_that_says_what_to_fix(change, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        AuditSpec.model_validate({**BASE, **change})


def test_the_same_spec_has_the_same_fingerprint_and_a_different_one_does_not():
    a = AuditSpec.model_validate(BASE)
    b = AuditSpec.model_validate({**BASE, "model_a": {"id": "meta-llama/Llama-3.1-8B-Instruct", "revision": "main"}})
    c = AuditSpec.model_validate({**BASE, "seed": 1})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_spec_round_trips_through_json():
    spec = AuditSpec.model_validate({**BASE, "corpus": {"kind": "builtin", "max_docs": 10}, "labels": {"team": "x"}})
    assert AuditSpec.model_validate_json(spec.model_dump_json()) == spec


def test_audit_record_lives_in_the_store_and_survives_a_new_reader(object_store):
    spec = AuditSpec.model_validate(BASE)
    created = AuditStore(object_store).create(spec, idempotency_key="k1")
    fresh = AuditStore(object_store)  # e.g. a restarted API process
    assert fresh.spec(created.id) == spec
    assert fresh.status(created.id).state is AuditState.QUEUED
    fresh.update(created.id, state=AuditState.TRAINING, stage=AuditState.TRAINING, counters={"training_step": 5})
    assert AuditStore(object_store).status(created.id).counters == {"training_step": 5}
    assert created.id in list(fresh.ids())
    with pytest.raises(FileExistsError):
        fresh.create(spec, audit_id=created.id)  # spec.json is immutable
    assert not fresh.cancel_requested(created.id)
    fresh.request_cancel(created.id)
    assert fresh.cancel_requested(created.id)
    with pytest.raises(KeyError, match="no audit"):
        fresh.status("nope")


def test_overall_progress_is_monotone_through_the_stages():
    points = [overall_progress(stage, f) for stage in STAGES for f in (0.0, 0.5, 1.0)]
    assert points == sorted(points) and points[0] == 0.0 and points[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("revision", ["main", "v1.0", "refs/pr/1", "feature/x", "release-2024.01", "a" * 40])
def test_branch_tag_and_commit_revisions_are_accepted(revision):
    assert AuditSpec.model_validate({**BASE, "model_b": {"id": "Qwen/Qwen3-8B", "revision": revision}})


@pytest.mark.parametrize(
    "revision",
    ["", "../../x", "v1/../x", "a..b", "/main", "main/", "a//b", "main\x00", "main\n", "a\u202eb", "x~1", "x^",
     "x:y", "x?", "x*", "x[0]", "x\\y", ".hidden", "a/.b", "x.lock", "x.", "@", "a@{1}", "x" * 256],
)
def test_revisions_that_are_not_branch_tag_or_commit_names_are_refused_before_anything_runs(revision):
    with pytest.raises(pydantic.ValidationError, match=r"model_b\.revision\n.*is not a branch, tag or commit"):
        AuditSpec.model_validate({**BASE, "model_b": {"id": "Qwen/Qwen3-8B", "revision": revision}})
