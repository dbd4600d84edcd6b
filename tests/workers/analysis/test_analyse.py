"""Specification of the analyse, steer and publish stages on a real (tiny) audit (the ``audit`` fixture of this
package's conftest: every stage on a local Ray, a local folder standing in for the bucket)."""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dfc.analysis.explain import one_line
from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from tests.fixtures.llm_server import KEY, MODEL, LLMServer, serve_llm
from tests.workers.analysis.conftest import ALPHAS, STEERED, Audit, make_spec
from workers.activations.extract import read_texts
from workers.activations.shards import ShardReader
from workers.analysis.analyse import analyse_stage, dfc_weights, partition
from workers.analysis.data import OrderedPairs, load_crosscoder, locate_tokens, select_pairs
from workers.pipeline import run as pipeline
from workers.pipeline.context import AuditCancelled, StageContext
from workers.pipeline.run import run_audit
from workers.pipeline.status import AuditState, AuditStore
from workers.report.build import build_report
from workers.report.schema import AuditReport
from workers.spec import AuditSpec


def test_the_report_validates_and_ranks_each_models_features_with_their_score_components(audit):
    report = audit.report()
    spec = audit.json("spec.json")
    assert report.audit_id == audit.id and report.model_b.id == spec["model_b"]["id"]
    assert (report.model_a.hidden_size, report.model_b.hidden_size) == (64, 96)
    assert report.model_a.architecture == "LlamaForCausalLM" and report.model_b.architecture == "Qwen3ForCausalLM"
    assert report.crosscoder.n_b_only == 26 and report.training.tokens > 0 and report.alignment.pairs > 1000
    trained = audit.json("stages/train.json")
    assert report.training.fve_b == pytest.approx(trained["heldout"]["fve_b"])
    for owner, features in (("A", report.features_a), ("B", report.features_b)):
        # top_features (6) per seed, the three seeds' matched findings reported once
        assert 0 < len(features) <= 6 * 3 and [f.rank for f in features] == list(range(1, len(features) + 1))
        partition = range(0, 26) if owner == "A" else range(230, 256)
        for f in features:
            assert f.index in partition and f.top_contexts and f.promoted_tokens and f.suppressed_tokens
            total = sum(f.score_weights[name] * value for name, value in f.score_components.items())
            assert total == pytest.approx(f.score, abs=1e-9)  # the breakdown explains the score
            assert f.checks.nu_eps is not None and f.stats.max_activation >= f.top_contexts[0].activation - 1e-6
    assert report.shared_summary.n_shared == 204 and sum(report.shared_summary.relative_norm_histogram.counts) == 204


def test_every_context_marks_a_token_that_occurs_in_its_stored_document(audit):
    report = audit.report()
    extracted = audit.json("stages/extract.json")
    checked = 0
    for owner, features in (("a", report.features_a), ("b", report.features_b)):
        prefix = extracted[owner]["prefix"]
        texts: dict[int, str] = {}
        for entry in ShardReader(audit.store, prefix).manifest.shards:
            texts.update(read_texts(audit.store, prefix, entry.index))
        for context in (c for f in features for c in f.top_contexts + f.weak_contexts):
            window = context.prefix + context.token + context.suffix
            if "\ufffd" in window:
                continue  # a window cut inside a multi-byte character decodes to a replacement mark
            text = texts[int(context.doc_id)]
            assert context.token.strip() in text
            assert window.replace("<s>", "").replace("</s>", "") in text
            checked += 1
    assert checked >= 10


def key(report: AuditReport, f: Any) -> int:
    """A reported feature's ensemble key: what the stages' files name it by (its index in the first seed)."""
    return (f.run or 0) * report.crosscoder.n_features + f.index


def test_steering_screens_every_reported_feature_and_sweeps_the_final_top(audit):
    steering = audit.json("analysis/steering.json")
    report = audit.report()
    for side, features in (("a", report.features_a), ("b", report.features_b)):
        screens = steering["sides"][side]["screens"]
        # Every reported feature is screened: removal KL, what it makes its model say, the other model's view.
        assert set(screens) == {str(key(report, f)) for f in features}
        for f in features:
            screen = screens[str(key(report, f))]
            assert screen["effect_measure"] == "gated_removal_kl" and screen["kl"] >= 0  # DFC features are gated
            assert f.divergence is not None and f.divergence.removal_kl == pytest.approx(max(0.0, screen["kl"]))
            assert all(t.gain > 0 and t.logprob_owner <= 0 and t.logprob_other <= 0 for t in f.divergence.tokens)
            expected = sum(t.gain * (t.logprob_owner - t.logprob_other) for t in f.divergence.tokens)
            assert f.divergence.nats == pytest.approx(expected / f.divergence.contexts)
        # The sweeps go to the features that rank first once the screens are in.
        steered = steering["sides"][side]["features"]
        assert [r["feature"] for r in steered] == [key(report, f) for f in features[:STEERED]]
        for record in steered:
            assert [p["alpha"] for p in record["sweeps"]["additive"]["points"]] == ALPHAS
            assert [p["alpha"] for p in record["sweeps"]["gated"]["points"]] == ALPHAS  # DFC features are gated
            assert len(record["random_control"]["kl_feature"]) == len(ALPHAS)
            probes = record["sweeps"]["additive"]["probe_prompts"]
            assert probes[0] == "The capital of France is" and len(set(probes)) == len(probes) > 1
        for f in features[:STEERED]:
            assert [s.alpha for s in f.steering] == ALPHAS
            assert f.steering[0].continuations[0].prompt == "The capital of France is"
            # The generated tokens reach the report, so no box has to be empty without saying why.
            assert all(c.steered_tokens and c.unsteered_tokens for s in f.steering for c in s.continuations)
        assert all(not f.steering for f in features[STEERED:])
        # Both causal components are normalised by the largest value among the screened features.
        assert max(f.score_components["steering"] for f in features) == pytest.approx(1.0)
        most = max(features, key=lambda f: f.divergence.nats)
        assert most.divergence.nats <= 0 or most.score_components["divergence"] == pytest.approx(1.0)


def test_publish_writes_the_html_last_with_the_top_features_card(audit):
    report = audit.report()
    page = audit.store.get_bytes(audit.key("report/report.html")).decode()
    for f in (report.features_b[0], report.features_a[0]):  # a feature of another seed's card says which
        suffix = f"-run{f.run}" if f.run else ""
        assert f'id="feature-{f.owner.lower()}-{f.index}{suffix}"' in page
    order = [audit.puts.index(audit.key(name)) for name in
             ("analysis/features.json", "report/report.json", "report/report.html", "stages/publish.json")]
    assert order == sorted(order)
    assert audit.json("stages/publish.json")["report_html"] == audit.key("report/report.html")


def test_the_ordered_loader_yields_every_analysed_pair_once_in_corpus_order_with_its_activations(audit):
    extracted, aligned = audit.json("stages/extract.json"), audit.json("stages/align.json")
    pairs = select_pairs(audit.store, aligned, limit=aligned["n_heldout"] + 500)
    assert (pairs.n_heldout, pairs.n_train) == (aligned["n_heldout"], 500)
    stream = OrderedPairs(audit.store, extracted["a"]["prefix"], extracted["b"]["prefix"], pairs.a, pairs.b,
                          batch_size=256)  # fmt: skip
    batches = list(stream)
    assert len(batches) == len(stream)
    index_a = torch.cat([b.position_a for b in batches])
    assert torch.equal(index_a, pairs.a) and torch.equal(torch.cat([b.position_b for b in batches]), pairs.b)
    probe = [0, len(index_a) // 2, len(index_a) - 1]
    for side, x in (("a", torch.cat([b.x_a for b in batches])), ("b", torch.cat([b.x_b for b in batches]))):
        indices = [int((pairs.a if side == "a" else pairs.b)[i]) for i in probe]
        located = locate_tokens(audit.store, extracted[side]["prefix"], indices, with_activations=True)
        for i, g in zip(probe, indices, strict=True):
            assert torch.equal(x[i], located[g].activations[located[g].position])
    assert torch.equal(torch.cat([b.document for b in batches])[probe], torch.tensor(
        [located[g].doc_id for g in indices]))  # fmt: skip


def copy_manifests(audit: Audit, spec: AuditSpec, stages: list[str]) -> str:
    """A new audit of ``spec`` whose listed stages are already done (their manifests point at ``audit``'s data)."""
    audits = AuditStore(audit.store)
    new_id = audits.create(spec).id
    for stage in stages:
        audit.store.put_json(f"audits/{new_id}/stages/{stage}.json", audit.json(f"stages/{stage}.json"))
    return new_id


def test_a_spec_without_steering_publishes_a_report_with_no_steering_results(audit, tiny_models, tmp_path):
    spec = make_spec(tiny_models, steering=False)
    new_id = copy_manifests(audit, spec, ["extract", "align", "train", "analyse"])

    status = run_audit(new_id, str(audit.root), work_dir=tmp_path)

    assert status.state is AuditState.SUCCEEDED, status.error
    assert audit.store.get_json(f"audits/{new_id}/stages/steer.json")["skipped"] is True
    report = AuditReport.model_validate_json(audit.store.get_bytes(f"audits/{new_id}/report/report.json"))
    assert report.features_b and all(not f.steering and not f.promoted_tokens for f in report.features_b)
    assert any("steering was not run" in w for w in report.warnings)


def test_cancelling_during_analysis_raises_and_writes_no_analysis(audit, tiny_models, tmp_path):
    new_id = copy_manifests(audit, make_spec(tiny_models), [])
    audits = AuditStore(audit.store)
    outputs = {stage: audit.json(f"stages/{stage}.json") for stage in ("extract", "align", "train")}
    ctx = StageContext(new_id, audits.spec(new_id), audit.store, audits, tmp_path, outputs=outputs)
    ctx.begin(AuditState.ANALYSING)
    batches = []

    def cancel_after_the_first_batch(fraction: float, **counters: float) -> None:
        batches.append(fraction)
        audits.request_cancel(new_id)

    ctx.report_progress = cancel_after_the_first_batch  # type: ignore[method-assign]
    with pytest.raises(AuditCancelled, match="cancelled during analysing"):
        analyse_stage(ctx)
    assert len(batches) == 1 and not audit.store.exists(f"audits/{new_id}/analysis/features.json")
    assert json.loads(audit.store.get_bytes(f"audits/{new_id}/cancel.json"))["requested_at"]


@pytest.mark.parametrize("architecture", ["standard", "dsf"])
def test_without_partitions_exclusive_features_are_read_off_relative_decoder_norms(architecture):
    # Unequal widths keep DSF's designated block (features 0-1) untied, so its norms can lean to one model.
    cc = Crosscoder(CrosscoderConfig(d_a=8, d_b=6, n_features=16, k=2, architecture=architecture,
                                     designated_shared=2))  # fmt: skip
    with torch.no_grad():
        cc.w_dec_a.fill_(1.0)
        cc.w_dec_b.fill_(1.0)
        for f in (0, 4):
            cc.w_dec_b[f].mul_(0.01)  # relative norm ≈ 0.99: leans to A
        cc.w_dec_a[5].mul_(0.01)  # ≈ 0.01: leans to B
        cc.w_dec_a[6].mul_(0.5)  # 0.5·√8 / (0.5·√8 + √6) ≈ 0.37: balanced enough to count as shared
    parts = partition(cc)
    assert parts["a"] == ([4] if architecture == "dsf" else [0, 4]) and parts["b"] == [5]
    assert parts["shared"] == [f for f in range(16) if f not in parts["a"] + parts["b"]]


def test_a_standard_crosscoder_audit_ranks_features_by_relative_norm_and_builds_a_valid_report(
    audit, tiny_models, tmp_path
):
    spec = make_spec(tiny_models, architecture="standard")
    new_id = copy_manifests(audit, spec, ["extract", "align"])

    # Publishing is left out: a model without exclusive features breaks report/plots.py's log-scaled scatter.
    status = run_audit(new_id, str(audit.root), work_dir=tmp_path, stop_after="steer")

    assert status.error is None and status.state is AuditState.STEERING
    outputs = {s: audit.store.get_json(f"audits/{new_id}/stages/{s}.json") for s in pipeline.STAGE_NAMES[:5]}
    analysis = audit.store.get_json(outputs["analyse"]["features_json"])
    steering = audit.store.get_json(outputs["steer"]["steering_json"])
    report = build_report(new_id, spec, AuditStore(audit.store).status(new_id), outputs, analysis, steering,
                          dfc_weights(spec.ranking))  # fmt: skip
    assert report.crosscoder.architecture == "standard" and report.crosscoder.n_shared == 256
    assert all(r["relative_norm"] > 0.8 for r in analysis["features"]["a"])
    assert all(r["relative_norm"] < 0.2 for r in analysis["features"]["b"])
    assert len(report.features_a) == min(6, analysis["fired"]["a"]) and any("relative decoder norms" in w
                                                                            for w in report.warnings)  # fmt: skip
    n_exclusive = analysis["exclusive"]["a"] + analysis["exclusive"]["b"]
    assert report.shared_summary.n_shared == 256 - n_exclusive


# ---------------------------------------------------------------------------------------------- explanations
def explained(audit: Audit, tiny_models: Any, tmp_path: Path, **explain: Any) -> tuple[str, AuditReport | None]:
    """A copy of ``audit`` with explanations asked for, run from the explain stage on; its id and report."""
    spec = AuditSpec.model_validate({**make_spec(tiny_models).model_dump(), "explain": {"enabled": True, **explain}})
    new_id = copy_manifests(audit, spec, ["extract", "align", "train", "analyse", "steer"])
    status = run_audit(new_id, str(audit.root), work_dir=tmp_path)
    assert status.state is AuditState.SUCCEEDED, status.error  # the endpoint never fails an audit
    return new_id, AuditReport.model_validate_json(audit.store.get_bytes(f"audits/{new_id}/report/report.json"))


@pytest.fixture
def endpoint(monkeypatch) -> Iterator[LLMServer]:
    with serve_llm() as server:
        monkeypatch.setenv("DFC_EXPLAINER_URL", server.url)
        monkeypatch.setenv("DFC_EXPLAINER_MODEL", MODEL)
        monkeypatch.setenv("DFC_EXPLAINER_API_KEY", KEY)
        yield server


def test_an_audit_that_did_not_ask_has_no_explanations_and_no_word_about_them(audit):
    assert audit.json("stages/explain.json")["skipped"] is True
    report = audit.report()
    assert all(f.explanation is None for f in report.features_a + report.features_b)
    assert not any("explanation" in w for w in report.warnings)


def test_the_top_features_are_explained_from_their_contexts_judged_and_shown_in_the_report(
    audit, tiny_models, tmp_path, endpoint
):
    new_id, report = explained(audit, tiny_models, tmp_path, top_n=2)

    page = audit.store.get_bytes(f"audits/{new_id}/report/report.html").decode()
    pool = audit.store.get_json(f"audits/{new_id}/stages/analyse.json")
    pool = audit.store.get_json(pool["features_json"])["neutral_pool"]
    judged = [r["messages"][-1]["content"] for r in endpoint.requests if "numbered text excerpts" in
              r["messages"][-1]["content"]]  # fmt: skip
    checked = 0
    for features in (report.features_a, report.features_b):
        for f in features[:2]:
            e = f.explanation
            assert e is not None and e.explainer == MODEL
            # The stand-in names the token marked most often, so it must be one the feature fired on.
            assert e.text.removeprefix('fires on the token "').removesuffix('"') in {
                c.token.strip() for c in f.top_contexts}
            assert html.escape(e.text) in page
            quiet = sum(key(report, f) not in p["fired"] for p in pool)  # openings it does not fire in: random contexts
            if quiet < 2:  # too few to judge against
                assert e.detection_score is None and e.detection_contexts is None
                continue
            assert 0 <= e.detection_score <= 1 and e.detection_contexts == len(f.top_contexts) + min(quiet, 10)
            # Its judge was shown every one of its top contexts, unmarked.
            ask = next(p for p in judged if json.dumps(e.text) in p)
            assert all(one_line(c.prefix + c.token + c.suffix) in ask for c in f.top_contexts)
            checked += 1
        assert all(f.explanation is None for f in features[2:])
    asked = len(endpoint.requests)
    assert checked >= 2 and asked == 4 + checked
    assert not any("explanation" in w for w in report.warnings)
    assert all(h["Authorization"] == f"Bearer {KEY}" for h in endpoint.headers)
    manifest = audit.store.get_json(f"audits/{new_id}/stages/explain.json")
    assert (manifest["explained_a"], manifest["explained_b"], manifest["failed"]) == (2, 2, 0)

    # Resumed after a crash past the explanations: nothing is asked twice, the report says the same.
    for stage in ("explain", "publish"):
        audit.store.delete(f"audits/{new_id}/stages/{stage}.json")
    assert run_audit(new_id, str(audit.root), work_dir=tmp_path).state is AuditState.SUCCEEDED
    again = AuditReport.model_validate_json(audit.store.get_bytes(f"audits/{new_id}/report/report.json"))
    assert len(endpoint.requests) == asked
    assert [f.explanation for f in again.features_b] == [f.explanation for f in report.features_b]


def test_a_refused_key_stops_at_the_first_request_and_the_report_says_why(audit, tiny_models, tmp_path, endpoint,
                                                                           monkeypatch):  # fmt: skip
    monkeypatch.setenv("DFC_EXPLAINER_API_KEY", "sk-wrong-key-000")

    _, report = explained(audit, tiny_models, tmp_path)

    assert len(endpoint.requests) == 1
    assert all(f.explanation is None for f in report.features_a + report.features_b)
    assert any("explanations are incomplete" in w and "DFC_EXPLAINER_API_KEY" in w for w in report.warnings)


def test_an_endpoint_answering_nothing_is_given_up_on_after_three_features(audit, tiny_models, tmp_path, endpoint):
    endpoint.blank = True

    new_id, report = explained(audit, tiny_models, tmp_path)

    assert len(endpoint.requests) == 3 * 2  # each feature: the question and one correction
    assert any("stopped asking the explainer after 3 of" in w for w in report.warnings)
    assert audit.store.get_json(f"audits/{new_id}/stages/explain.json")["failed"] == 3


def test_explanations_asked_of_a_deployment_without_an_endpoint_leave_a_warning(audit, tiny_models, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    monkeypatch.delenv("DFC_EXPLAINER_URL", raising=False)

    _, report = explained(audit, tiny_models, tmp_path)

    assert any("explanations were asked for but not written: no explainer endpoint" in w for w in report.warnings)


# ---------------------------------------------------------------------------------------------- steering transfer
def transferred(audit: Audit, tiny_models: Any, tmp_path: Path, transfer: dict[str, Any]) -> tuple[str, AuditReport]:
    """A copy of ``audit`` given a steering vector to carry across, run from the steer stage on; its id and report."""
    tree = make_spec(tiny_models).model_dump()
    tree["steering"] |= {"transfer": transfer, "top_n": 1}
    new_id = copy_manifests(audit, AuditSpec.model_validate(tree), ["extract", "align", "train", "analyse"])
    status = run_audit(new_id, str(audit.root), work_dir=tmp_path)
    assert status.state is AuditState.SUCCEEDED, status.error
    return new_id, AuditReport.model_validate_json(audit.store.get_bytes(f"audits/{new_id}/report/report.json"))


def test_a_contrast_vector_of_a_is_carried_to_b_through_shared_features_and_reported(audit, tiny_models, tmp_path):
    transfer = {"name": "politeness", "positive": ["Thank you so much, that is very kind.", "Please, after you."],
                "negative": ["Move. Now.", "I do not care what you want."], "coefficient": 4.0, "n_features": 5}
    new_id, report = transferred(audit, tiny_models, tmp_path, transfer)

    t = report.steering_transfer
    assert t is not None and (t.source, t.target, t.vector_name) == ("A", "B", "politeness")
    cc = load_crosscoder(audit.store, audit.json("stages/train.json")["final_prefix"], tmp_path / "cc")
    shared = set(cc.config.shared)
    assert len(t.components) == 5 and {c.feature for c in t.components} <= shared
    weights = [c.weight for c in t.components]
    assert weights == sorted(weights, reverse=True) and weights[0] > 0
    assert (t.source_coefficient, t.target_coefficient) == (4.0, 4.0)
    assert [c.prompt for c in t.continuations] == ["The capital of France is"]  # the spec's probe prompts
    assert all(c.steered_tokens and c.unsteered_tokens for c in t.continuations)
    assert "random direction of the same norm" in t.notes and "own vector from the same contrasting" in t.notes
    page = audit.store.get_bytes(f"audits/{new_id}/report/report.html").decode()
    assert 'id="transfer"' in page and html.escape("“politeness” from A to B") in page


def test_a_vector_of_the_wrong_width_is_a_warning_and_the_audit_stands(audit, tiny_models, tmp_path):
    _, report = transferred(audit, tiny_models, tmp_path, {"name": "x", "vector": [1.0] * 5})

    assert report.steering_transfer is None and report.features_b[0].steering
    assert any("'x' was not carried from A to B" in w and "5 dimensions" in w for w in report.warnings)
