"""Specification of the seed ensemble's findings and of the behaviour-first scan, on the package's real tiny audit
(three crosscoder seeds and the scan: the spec's defaults)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfc.lm.scoring import continuation_logprob
from tests.workers.analysis.conftest import Audit
from workers.analysis.analyse import partition
from workers.analysis.data import load_runs
from workers.report.html import render_html
from workers.report.terminal import feature_lines, scan_lines


@pytest.fixture(scope="module")
def crosscoders(audit: Audit, tmp_path_factory: pytest.TempPathFactory) -> dict:
    trained = audit.json("stages/train.json")
    return {r.run: r.crosscoder for r in load_runs(audit.store, trained, tmp_path_factory.mktemp("ensemble"))}


def test_three_seeds_are_trained_and_every_seed_contributes_findings(audit, crosscoders):
    report = audit.report()
    assert report.ensemble is not None and report.ensemble.runs == 3 and report.ensemble.seeds == [0, 1, 2]
    assert len(crosscoders) == 3
    assert report.ensemble.match_threshold >= 0.5  # the spec's floor, or the chance level when that is higher
    for features in (report.features_a, report.features_b):
        # Each seed's best findings are reported, so none is crowded out by another seed's.
        assert {f.run for f in features} == {0, 1, 2}
        assert all(f.seed == f.run for f in features)  # spec seed 0: run r trained with seed r


def test_every_finding_names_the_seeds_that_have_it_and_its_stability_counts_them(audit, crosscoders):
    report = audit.report()
    for owner, features in (("a", report.features_a), ("b", report.features_b)):
        claimed: set[tuple[int, int]] = set()
        for f in features:
            assert f.stability == pytest.approx(len(f.seeds) / 3)
            assert f.score_components["stability"] == f.stability and f.score_weights["stability"] == 1.0
            runs = [m.run for m in f.seeds]
            assert runs == sorted(set(runs)) and f.run in runs
            own = next(m for m in f.seeds if m.run == f.run)
            assert own.feature == f.index and own.cosine == 1.0
            for m in f.seeds:
                assert m.feature in partition(crosscoders[m.run])[owner]  # a match is in the same partition
                if m.run != f.run:  # the reported cosine is the two decoders' own
                    mine = crosscoders[f.run].decoder_directions(f.index, raw_scale=False)["ab".index(owner)]
                    theirs = crosscoders[m.run].decoder_directions(m.feature, raw_scale=False)["ab".index(owner)]
                    cosine = float(torch.nn.functional.cosine_similarity(mine, theirs, dim=0))
                    assert m.cosine == pytest.approx(cosine, abs=1e-5)
            # Deduplicated: findings matched across seeds are reported once, so no seed's feature is in two.
            assert not claimed & {(m.run, m.feature) for m in f.seeds}
            claimed |= {(m.run, m.feature) for m in f.seeds}


def test_one_seed_findings_are_marked_not_hidden_in_the_terminal_and_the_page(audit):
    report = audit.report()
    lines = feature_lines(report, "B", top=len(report.features_b))
    assert "seeds" in lines[1]
    for f, line in zip(report.features_b, lines[2:], strict=True):
        assert f.label in line and f.stability_text.split()[0] in line  # "1/3", "2/3" or "3/3"
    page = render_html(report)
    for f in report.features_b:  # the table row names its seeds beside the feature
        assert f'{f.label}</a> <span class="muted">{f.stability_text}</span>' in page or (
            f'<td>{f.label} <span class="muted">{f.stability_text}</span>' in page)


def test_the_scan_lists_what_each_model_says_that_the_other_would_not_best_first(audit):
    report = audit.report()
    assert report.scan is not None and report.divergent_contexts is not None
    scan = audit.json("analysis/scan.json")
    for owner in ("A", "B"):
        # Every aligned pair of the analysed text is screened; the top `contexts` are scored exactly.
        assert report.scan.contexts_screened[owner] == audit.json("stages/analyse.json")["analysed_pairs"]
        assert 0 < report.scan.contexts_scored[owner] <= audit.json("spec.json")["scan"]["contexts"]
        # Positions where a bare space was completed to a word: some of the screened ones at most.
        assert 0 <= scan["sides"][owner.lower()]["completed"] <= report.scan.contexts_screened[owner]
        entries = [e for e in report.divergent_contexts if e.owner == owner]
        assert len(entries) == len(scan["sides"][owner.lower()]["entries"]) > 0
        assert [e.rank for e in entries] == list(range(1, len(entries) + 1))
        assert [e.score for e in entries] == sorted((e.score for e in entries), reverse=True)
        texts = set()
        for e in entries:
            assert e.gap > 0 and e.score >= e.gap - 1e-9 and e.logprob_owner > e.logprob_other
            assert e.occurrences >= 1 + len(e.examples) and all(x.gap <= e.gap + 1e-9 for x in e.examples)
            said = e.text or ""  # compared as the scan groups texts: case kept, leading spaces one space
            key = (e.text is None, (" " if said != said.lstrip() else "") + said.strip())
            assert key not in texts  # deduplicated by what is said
            texts.add(key)


def test_a_divergent_context_is_scored_by_each_model_in_its_own_tokenizer(audit, tiny_models):
    report = audit.report()
    entry = next(e for e in report.divergent_contexts if e.owner == "B" and e.text is not None)
    scores = {}
    for side, arch in (("a", "llama"), ("b", "qwen3")):
        model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_models[arch])
        scores[side] = continuation_logprob(model, tokenizer, entry.context, entry.text)
    # B is the owner: its score is its text score after the context, A's is the other's, as the report says.
    assert entry.logprob_other == pytest.approx(scores["a"], abs=1e-4)
    assert entry.logprob_owner == pytest.approx(scores["b"], abs=1e-4)


def test_the_features_that_carry_a_divergent_context_are_real_features_of_its_owner_linked_when_reported(
    audit, crosscoders
):
    report = audit.report()
    attributed = 0
    for e in report.divergent_contexts:
        owner = e.owner.lower()
        reported = {(f.run or 0, f.index) for f in report.features(e.owner)}
        assert [f.closes for f in e.features] == sorted((f.closes for f in e.features), reverse=True)
        for link in e.features:
            parts = partition(crosscoders[link.run])
            where = "shared" if link.index in parts["shared"] else f"{e.owner}-only"
            assert link.index in parts[owner] or link.index in parts["shared"]  # it writes to the owner
            assert link.partition == where and link.seed == link.run and link.activation > 0
            assert link.reported == ((link.run, link.index) in reported)
            attributed += 1
    assert attributed > 0
    page = render_html(report)
    assert 'id="divergent"' in page and "What <span class=\"b\">B</span> says that A would not" in page
    lines = scan_lines(report, "B", top=3)
    assert lines[0].startswith("What B says that A would not") and len(lines) > 1


def test_of_the_findings_matched_across_seeds_the_best_screened_one_is_reported(audit):
    analysis = audit.json("analysis/features.json")
    steering = audit.json("analysis/steering.json")
    report = audit.report()
    for side in ("a", "b"):
        records = {r["key"]: r for r in analysis["features"][side]}
        screened = [e["feature"] for e in steering["sides"][side]["ranking"]]
        # Every seed's top findings were screened; the ranking keeps the first of each cluster.
        clusters = [records[k]["cluster"] for k in screened]
        assert len(clusters) == len(set(clusters))
        assert len(report.features(side.upper())) == len(screened) <= len(records)
        assert analysis["ensemble"][side]["findings"] == len({r["cluster"] for r in records.values()})
        all_ranked = sorted(records.values(), key=lambda r: -r["score"])  # the analysis' own (pre-screen) order
        assert {r["cluster"] for r in all_ranked} == set(clusters)  # no cluster is lost by the deduplication
