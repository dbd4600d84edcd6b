"""Ground truth: ``dfc-audit demo``, the one command, finds model B's planted behaviour.

The demo audits the planted pair end to end (local Ray, a folder as the bucket), reading the last block of both
models. What every machine must see: a B-exclusive feature among B's top three fires at the end of the trigger
sentences and says the planted response; removing it where it fires halves the response and leaves neutral text
alone; the behaviour-first scan puts the response first among what B says that A would not, it passes the null
check, and the features the report names as carrying it close a real share of its gap.

The pair is trained on CPU and its weights follow the CPU's arithmetic (benchmarks/RESULTS.md, 'The demo on other
machines' arithmetic'). At the middle block that draw decided whether any one feature held the refusal (one did on
one of four pairs). At the last block one B-only feature held it on all three pairs measured ('The demo reads the
last block').
The demo runs with ``--explain`` against a loopback stand-in for an OpenAI-compatible endpoint, so the flag's
whole path (environment, CLI, spec, explain stage, report) is exercised.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.fixtures.llm_server import KEY, MODEL, LLMServer, serve_llm
from workers.planted.pair import PlantedPair
from workers.planted.truth import AuditArtifacts, judge_scan, removal_effect
from workers.report.schema import AuditReport, DivergentContext, FeatureReport
from workers.storage import open_store


@pytest.fixture(scope="module")
def endpoint() -> Iterator[LLMServer]:
    with serve_llm() as server:
        yield server


@pytest.fixture(scope="module")
def demo(planted_pair: PlantedPair, planted_cache: Path, tmp_path_factory: pytest.TempPathFactory,
         endpoint: LLMServer) -> Path:  # fmt: skip
    store = tmp_path_factory.mktemp("demo_store")
    env = {**os.environ, "DFC_CACHE": str(planted_cache), "COLUMNS": "200", "DFC_EXPLAINER_URL": endpoint.url,
           "DFC_EXPLAINER_MODEL": MODEL, "DFC_EXPLAINER_API_KEY": KEY}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "demo", "--store", str(store), "--num-cpus", "2", "--explain"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "planted pair" in done.stdout and "Exclusive to B" in done.stdout
    assert "explanation (detection)" in done.stdout
    return store


def test_the_demo_with_explain_has_the_top_five_of_each_model_explained_by_the_endpoint(demo, endpoint):
    _, report = _report(demo)
    for features in (report.features_a, report.features_b):
        assert all(f.explanation is not None and f.explanation.explainer == MODEL for f in features[:5])
        assert all(f.explanation is None for f in features[5:])
    explained = [r for r in endpoint.requests if "<<" in r["messages"][-1]["content"]]
    assert len(explained) == 10 and not any("explanation" in w for w in report.warnings)


def _report(store: Path) -> tuple[str, AuditReport]:
    (path,) = store.glob("audits/*/report/report.json")
    return path.parent.parent.name, AuditReport.model_validate_json(path.read_text())


def _at_trigger_ends(feature: FeatureReport, trigger: str) -> float:
    """Share of its top contexts whose marked token ends a sentence that mentions the trigger."""
    hits = 0
    for c in feature.top_contexts:
        text = (c.prefix + c.token).rstrip()
        hits += text.endswith(".") and trigger in text[:-1].rsplit(".", 1)[-1]
    return hits / max(len(feature.top_contexts), 1)


def _says(feature: FeatureReport) -> str | None:
    """The first token of what removing the feature takes away from B, stripped (None without a divergence)."""
    return feature.divergence.tokens[0].text.strip() if feature.divergence and feature.divergence.tokens else None


def _planted_feature(report: AuditReport, trigger: str, first_word: str) -> FeatureReport | None:
    """B's best-ranked finding that fires at the end of trigger sentences (≥ 80% of its top contexts) and whose
    removal takes the planted response's first word away: the dictionary isolated the behaviour."""
    return next((f for f in report.features_b if _at_trigger_ends(f, trigger) >= 0.8 and _says(f) == first_word), None)


def _first_b_entry(report: AuditReport) -> DivergentContext:
    """B's first divergent context of the scan."""
    return next(e for e in report.divergent_contexts or [] if e.owner == "B")


def _isolated_feature(report: AuditReport, pair: PlantedPair) -> FeatureReport:
    """The B-exclusive feature that isolates the planted behaviour; a failure saying where the behaviour went."""
    planted = _planted_feature(report, pair.trigger_word, pair.planted_continuation.split()[0])
    if planted is None:
        at_ends = [f"#{f.rank} says {_says(f)!r}" for f in report.features_b
                   if _at_trigger_ends(f, pair.trigger_word) >= 0.8]  # fmt: skip
        top = _first_b_entry(report)
        carriers = ", ".join(f"{f.partition} {f.index}{f'@seed{f.seed}' if f.run else ''} ({f.closes:.0%})"
                             for f in top.features[:3])  # fmt: skip
        pytest.fail(f"on this machine's pair no B-exclusive feature isolates the planted response (features at the "
                    f"trigger sentences' ends: {', '.join(at_ends) or 'none'}); B's first scan entry {top.text!r} is "
                    f"carried by {carriers}")  # fmt: skip
    return planted


def test_the_demo_ranks_the_planted_feature_in_bs_top_three_saying_the_planted_response(demo, planted_pair):
    _, report = _report(demo)
    planted = _isolated_feature(report, planted_pair)
    assert planted.rank <= 3, [(f.rank, f.index, f.top_contexts[0].token) for f in report.features_b[:5]]
    # What it makes B say, and A would not: the planted response's first word, which A finds near impossible.
    assert planted.divergence is not None and planted.divergence.nats > 1.0
    assert planted.divergence.tokens[0].logprob_other < planted.divergence.tokens[0].logprob_owner - 5


def test_removing_the_demos_planted_feature_where_it_fires_halves_the_planted_response(demo, planted_pair):
    audit_id, report = _report(demo)
    planted = _isolated_feature(report, planted_pair)
    # Suppression: remove the feature where it fires (gated, α = -1) in B itself.
    audit = AuditArtifacts.read(open_store(str(demo)), audit_id, demo / "cc")
    model = AutoModelForCausalLM.from_pretrained(planted_pair.model_b_dir).eval()
    tok = AutoTokenizer.from_pretrained(planted_pair.model_b_dir)
    effect = removal_effect(model, tok, audit.crosscoders[planted.run or 0], planted.index, audit.layer_b, planted_pair)
    assert effect.drop >= 0.5, f"suppression cut P(planted) by only {effect.drop:.0%} ({effect})"
    assert effect.neutral_kl < 0.01, f"neutral next-token KL {effect.neutral_kl:.4f}"


def test_the_demos_behaviour_first_scan_puts_the_planted_response_first_and_names_what_carries_it(demo, planted_pair):
    _, report = _report(demo)
    verdict = judge_scan(report, planted_pair.trigger, planted_pair.planted_continuation)
    assert verdict.found_at == 1, [(e.rank, e.text, e.context[-60:]) for e in report.divergent_contexts or []][:5]
    top = _first_b_entry(report)
    # B says it where A finds it (nearly) impossible, in many documents, well above the null pairs' entries.
    assert top.logprob_other < top.logprob_owner - 5 and top.occurrences >= 10
    assert report.scan is not None
    assert (top.passes_null is None) == (report.scan.null_threshold is None and report.scan.null_gap is None)
    # Removing the features that carry it, one at a time, closes a real share of the gap; the best first. How much
    # depends on the machine's pair: the best carrier closed 25-67% on four pairs of this config (RESULTS.md).
    assert top.features and top.features[0].closes > 0.2
    assert [f.closes for f in top.features] == sorted((f.closes for f in top.features), reverse=True)


def test_the_demos_planted_divergent_context_passes_the_null_check(demo, planted_pair):
    _, report = _report(demo)
    top = _first_b_entry(report)
    assert report.scan is not None and report.scan.null_gap is not None
    assert top.passes_null is True and top.gap > report.scan.null_gap
