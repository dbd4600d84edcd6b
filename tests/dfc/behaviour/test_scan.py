"""Behaviour-first scan (dfc/behaviour/scan.py): what one model says at aligned positions that the other would not,
found without any dictionary feature, deduplicated by continuation and document, and attributed to vectors that
carry it. Run on tiny random models with two kinds of tokenizer (byte-level BPE, metaspace BPE)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfc.behaviour.attribution import attribute
from dfc.behaviour.scan import (
    Prediction,
    ScanDocument,
    attach_contexts,
    complete_words,
    divergent_contexts,
    documents_saying,
    owner_predictions,
    salience,
    scan_documents,
    score_exact,
    screen_under_other,
    select_for_exact,
)
from dfc.behaviour.steering import steer
from dfc.lm.scoring import LOGPROB_FLOOR, continuation_logprob, score_text, token_texts
from tests.fixtures.tiny_models import TINY_CORPUS

PLANTED = " capital"


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def pair(tiny_models):
    """Tiny Llama (byte-level BPE) and Mistral (metaspace BPE, sliding-window attention)."""
    return {arch: load(tiny_models[arch]) for arch in ("llama", "mistral")}


def run_scan(owner, other, texts, *, n: int, min_prob: float = 0.0, exact_owner: bool = False):
    """The pipeline's order, one model at a time: predict, screen, choose, decode, score exactly."""
    (om, ot), (xm, xt) = owner, other
    docs = scan_documents(texts, ot, xt)
    screened = screen_under_other(xm, xt, docs, owner_predictions(om, ot, docs, min_prob=min_prob))
    scored = score_exact(xm, xt, attach_contexts(ot, docs, select_for_exact(screened, n)), as_owner=False)
    return docs, screened, score_exact(om, ot, scored, as_owner=True) if exact_owner else scored


@contextmanager
def boosted(model, token: int, logit: float = 20.0) -> Iterator[None]:
    """The model with ``logit`` added to one token's logit everywhere: it says that token whatever the context."""

    def boost(_module, _args, output):
        output = output.clone()
        output[..., token] += logit
        return output

    handle = model.lm_head.register_forward_hook(boost)
    try:
        yield
    finally:
        handle.remove()


def test_a_model_scanned_against_itself_has_no_gap_and_reports_nothing(pair):
    model = pair["llama"]
    _, screened, scored = run_scan(model, model, TINY_CORPUS[:4], n=30, exact_owner=True)
    assert len(scored) == 30 and all(p.owner_exact for p in scored)
    assert all(abs(p.gap) < 1e-6 for p in scored)
    assert divergent_contexts(scored, max_entries=10) == []
    # With its own token's log-probability as the owner side (one tokenization of the text) the gap errs low.
    _, _, own_side = run_scan(model, model, TINY_CORPUS[:4], n=30)
    assert all(p.gap < 1e-6 for p in own_side) and divergent_contexts(own_side) == []
    # Screened at its own aligned positions (every content token), the first step covers the token itself.
    assert all(p.owner_position == p.other_position for p in screened)
    assert all(s >= math.log(pr) - 1e-5 for p in screened for s, pr in zip(p.screen_logprobs, p.probs, strict=True))


def test_the_screen_never_falls_below_the_exact_scorers_direct_estimate(pair):
    """Every tokenization starts with a token spelling the text or a prefix of it, so their summed probability
    bounds the direct sum from above. The first token alone does not bound the exact score (other tokenizations
    and token healing add mass), so the screen is only an estimate of it."""
    (xm, xt) = pair["llama"]
    docs, _, scored = run_scan(pair["mistral"], pair["llama"], TINY_CORPUS[:6], n=40)
    checked = 0
    for p in scored:
        if xt(p.context)["input_ids"] != docs[p.doc].other_ids[: p.other_position + 1].tolist():
            continue  # the scorer re-tokenises the context; the bound is for the same tokens
        for text, screen, spells in zip(p.texts, p.screen_logprobs, p.other_spells, strict=True):
            if text is not None and spells:
                assert score_text(xm, xt, p.context, text).direct <= screen + 1e-6
                checked += 1
    assert checked >= 60


def test_the_exact_gap_is_the_owner_weighted_log_probability_gap(pair):
    ot, (xm, xt) = pair["mistral"][1], pair["llama"]
    docs, _, scored = run_scan(pair["mistral"], pair["llama"], TINY_CORPUS[:5], n=12)
    for p in scored:
        ids = docs[p.doc].owner_ids[: p.owner_position + 1].tolist()
        assert p.context == ot.decode(ids, skip_special_tokens=True)
        # Without the owner pass the owner side is its own token's log-probability.
        assert p.logprob_owner == pytest.approx([max(math.log(q), LOGPROB_FLOOR) for q in p.probs])
        other = [continuation_logprob(xm, xt, p.context, t) for t in p.texts]
        parts = zip(p.probs, p.logprob_owner, other, p.other_spells, strict=True)
        expected = sum(q * (lo - lx) * spells for q, lo, lx, spells in parts)
        assert p.gap == pytest.approx(expected, abs=1e-6)  # batched and single forward passes differ by ~1e-9
        assert p.rough_gap <= p.gap + 1e-6 or any(s < x for s, x in zip(p.screen_logprobs, other, strict=True))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_one_padded_forward_reads_each_document_as_if_it_ran_alone(pair, arch):
    model, tok = pair[arch]
    docs = scan_documents(TINY_CORPUS, tok, tok)
    assert len({len(d.owner_ids) for d in docs}) > 3  # really padded
    batched = owner_predictions(model, tok, docs, min_prob=0.0, batch_size=8)
    alone = owner_predictions(model, tok, docs, min_prob=0.0, batch_size=1)
    assert [(p.doc, p.owner_position, p.token_ids) for p in batched] == [
        (p.doc, p.owner_position, p.token_ids) for p in alone
    ]
    for b, a in zip(batched, alone, strict=True):
        assert b.probs == pytest.approx(a.probs, abs=1e-5)


def scored_prediction(doc: int, position: int, text: str | None, gap: float, spells: bool = True) -> Prediction:
    """A context whose most divergent text is ``text`` (gap ``gap``), beside a text both models agree on."""
    return Prediction(doc, position, position, (1, 2), (text, " and"), (0.5, 0.5), (0.0, -1.0),
                      context=f"doc {doc} at {position}", logprob_other=(-2 * gap, -1.0),
                      other_spells=(spells, True))  # fmt: skip


def test_contexts_group_by_text_keep_one_per_document_and_sum_their_gaps():
    predictions = [
        scored_prediction(0, 3, " yes", 2.0),
        scored_prediction(0, 7, "\t yes", 1.0),  # same group (spacing aside) and document as above, smaller gap
        scored_prediction(1, 2, " yes ", 3.0),
        scored_prediction(2, 5, " no", 4.5),
        scored_prediction(3, 1, " yes", -1.0),  # the other model prefers it: never reported
        scored_prediction(4, 4, None, 0.5),
        scored_prediction(5, 9, " Yes", 9.0, spells=False),  # unreadable by the other tokenizer: no gap
        scored_prediction(6, 2, "yes", 0.75),  # the end of a word ("ey|es"), not the word " yes"
        scored_prediction(7, 2, " Yes", 0.6),  # a sentence's first word, not the same token as " yes"
    ]
    assert predictions[6].gap == 0.0
    entries = divergent_contexts(predictions, max_entries=10)
    assert [(e.text, e.score) for e in entries] == [(" yes ", 5.0), (" no", 4.5), ("yes", 0.75), (" Yes", 0.6),
                                                    (None, 0.5)]  # fmt: skip
    yes = entries[0]
    assert (yes.n_documents, yes.n_occurrences, yes.gap, yes.prediction.doc) == (2, 3, 3.0, 1)
    assert [(e.doc, e.owner_position, e.gap) for e in yes.examples] == [(0, 3, 2.0)]
    assert (yes.prob_owner, yes.logprob_owner, yes.logprob_other) == (0.5, 0.0, -6.0)
    assert len(divergent_contexts(predictions, max_entries=2)) == 2


def test_a_word_the_owner_always_says_is_found_across_tokenizers(pair):
    (om, ot), other = pair["mistral"], pair["llama"]
    token = ot.convert_tokens_to_ids("▁capital")
    with boosted(om, token):
        _, _, scored = run_scan(pair["mistral"], other, TINY_CORPUS, n=20, min_prob=0.05)
    entries = divergent_contexts(scored, max_entries=5)
    assert len(entries) == 1  # every context says the planted word first
    top = entries[0]
    assert top.text == PLANTED and top.prob_owner > 0.99
    assert top.logprob_other < top.logprob_owner - 3 and top.gap > 3
    best = {p.doc: max(q.gap for q in scored if q.doc == p.doc) for p in scored}
    assert (top.n_occurrences, top.n_documents) == (20, len(best)) and len(best) > 1
    assert top.score == pytest.approx(sum(best.values())) and top.gap == max(best.values())
    # Unplanted, the owner is never that sure of anything: nothing reaches the exact score.
    _, quiet, _ = run_scan(pair["mistral"], other, TINY_CORPUS, n=20, min_prob=0.05)
    assert quiet == []


@pytest.fixture(scope="module")
def peaked(tiny_models):
    """A Llama with trained-model-like peaked next-token distributions (large logit scale), its own copy."""
    model, tok = load(tiny_models["llama"])
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model, tok


def test_removing_the_planted_direction_closes_the_gap_and_random_directions_do_not(peaked):
    model, tok = peaked
    layer = 3
    token = tok.convert_tokens_to_ids("Ġcapital")
    unembed = model.lm_head.weight[token].detach()
    planted = 2.0 * unembed / unembed.norm()
    generator = torch.Generator().manual_seed(0)
    randoms = [torch.randn(planted.shape, generator=generator) for _ in range(4)]
    candidates = [("planted", planted), ("zero", torch.zeros_like(planted))]
    candidates += [(f"random {i}", 2.0 * r / r.norm()) for i, r in enumerate(randoms)]
    with steer(model, layer, planted, 1.0):  # the owner: the same model, with the direction added everywhere
        docs = scan_documents(TINY_CORPUS[:4], tok, tok)
        predictions = owner_predictions(model, tok, docs)
    screened = screen_under_other(model, tok, docs, predictions)
    scored = score_exact(model, tok, attach_contexts(tok, docs, select_for_exact(screened, 8)), as_owner=False)
    top = divergent_contexts(scored, max_entries=1)[0]
    assert top.text == PLANTED and top.gap > 3
    p = top.prediction
    with steer(model, layer, planted, 1.0):
        found = attribute(model, tok, layer, top, candidates,
                          context_ids=docs[p.doc].owner_ids[: p.owner_position + 1], batch_size=4)  # fmt: skip
    closes = {a.key: a.closes for a in found}
    assert found[0].key == "planted" and closes["planted"] > 0.5
    assert closes["zero"] == pytest.approx(0.0, abs=1e-5)
    assert all(abs(closes[f"random {i}"]) < 0.5 * closes["planted"] for i in range(4))
    assert found[0].gap_before == pytest.approx(top.gap, rel=1e-4)


def test_results_serialise_to_json_and_predictions_round_trip(pair):
    model, tok = pair["mistral"]
    token = tok.convert_tokens_to_ids("▁capital")
    with boosted(model, token):
        _, _, scored = run_scan(pair["mistral"], pair["llama"], TINY_CORPUS[:3], n=4, min_prob=0.05)
        top = divergent_contexts(scored)[0]
        found = attribute(model, tok, 1, top, [(7, torch.randn(model.config.hidden_size))])
    for p in scored:
        assert Prediction.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    data = json.loads(json.dumps(top.to_dict()))
    assert data["text"] == PLANTED and data["prediction"]["gap"] == pytest.approx(top.gap)
    assert json.loads(json.dumps(found[0].to_dict()))["key"] == 7


def test_each_stage_says_which_stage_must_run_first(pair):
    model, tok = pair["llama"]
    docs = scan_documents(TINY_CORPUS[:2], tok, tok)
    predictions = owner_predictions(model, tok, docs, min_prob=0.0)
    with pytest.raises(ValueError, match="screen_under_other"):
        select_for_exact(predictions, 3)
    with pytest.raises(ValueError, match="attach_contexts"):
        score_exact(model, tok, predictions[:1], as_owner=False)
    bad = ScanDocument(0, docs[0].owner_ids, docs[0].other_ids, torch.tensor([[0, 99]]))
    with pytest.raises(ValueError, match="outside"):
        owner_predictions(model, tok, [bad])
    scored = score_exact(model, tok, attach_contexts(tok, docs, predictions[:1]), as_owner=True)
    scored = score_exact(model, tok, scored, as_owner=False)
    with pytest.raises(ValueError, match="positive gap"):
        attribute(model, tok, 0, scored[0], [("x", torch.zeros(model.config.hidden_size))])


def _said(doc: int, text: str, p: float, screen: float, other: float | None = None) -> Prediction:
    """A prediction of one text with the owner's probability ``p`` and the other's screen (and exact) log-prob."""
    return Prediction(doc=doc, owner_position=3, other_position=3, token_ids=(7,), texts=(text,), probs=(p,),
                      logprob_owner=(math.log(p),), context=f"document {doc}", screen_logprobs=(screen,),
                      logprob_other=None if other is None else (other,), other_spells=(True,))  # fmt: skip


def test_a_text_said_in_many_documents_is_scored_exactly_though_each_context_screens_below_the_top():
    loud = [_said(d, " at", 1.0, -2.0) for d in range(30)]  # rough gap 2 each, 60 in all
    recurring = [_said(100 + d, " Ich", 1.0, -1.0) for d in range(100)]  # rough gap 1 each, 100 in all
    chosen = select_for_exact(loud + recurring, 16, per_text=8)
    assert len(chosen) == 16
    assert sum(p.texts == (" Ich",) for p in chosen) == 8 and sum(p.texts == (" at",) for p in chosen) == 8
    saying = documents_saying(loud + recurring)
    assert {k: len(v) for k, v in saying.items()} == {(False, " at"): 30, (False, " Ich"): 100}
    assert saying[(False, " Ich")][100] == pytest.approx(recurring[0].rough_gap) == pytest.approx(1.0)


def test_a_groups_score_extrapolates_to_every_document_the_screen_has_it_in_by_the_exact_to_rough_ratio():
    scored = [_said(d, " Ich", 0.5, -1.0, -18.0) for d in range(4)]  # exact gap 0.5 · (log 0.5 + 18) each
    (entry,) = divergent_contexts(scored)
    one = 0.5 * (math.log(0.5) + 18.0)
    assert entry.score == pytest.approx(4 * one) and entry.n_documents == 4
    rough = scored[0].rough_gap  # 0.5 · (log 0.5 + 1): the screen underestimates this text in every document
    assert rough is not None and rough < one / 10
    (entry,) = divergent_contexts(scored, documents={(False, " Ich"): dict.fromkeys(range(170), rough)})
    assert entry.score == pytest.approx(170 * one) and entry.n_documents == 170 and entry.n_occurrences == 4


def test_a_text_said_everywhere_that_diverges_once_is_not_scaled_to_every_document():
    once = _said(0, ".", 0.9, -6.0, -6.0)  # exactly scored because its rough gap was the largest
    everywhere = {d: 0.01 for d in range(1, 960)} | {0: once.rough_gap or 0.0}  # tiny rough gaps elsewhere
    planted = [_said(1000 + d, " Sorry,", 0.9, -4.0, -18.0) for d in range(8)]
    entries = divergent_contexts([once, *planted], documents={(False, "."): everywhere,
                                                              (False, " Sorry,"): {1000 + d: 0.9 * (math.log(0.9) + 4)
                                                                                   for d in range(60)}})  # fmt: skip
    assert [e.text for e in entries] == [" Sorry,", "."]
    full_stop = entries[1]
    assert full_stop.n_documents == 960  # said in every document, but its score is its one gap plus the rest's
    assert full_stop.score == pytest.approx(once.gap + (once.gap / once.rough_gap) * 959 * 0.01)
    assert full_stop.score < 0.05 * once.gap * 960  # what the mean exact gap times the count made of it
    # Scored for another text the screen saw there: its exact gap gives no ratio for ".", so nothing is extrapolated.
    elsewhere = dataclasses.replace(once, texts=(".", " The"), probs=(0.5, 0.5), logprob_owner=(-0.7, -0.7),
                                    screen_logprobs=(-0.8, -9.0), logprob_other=(-12.0, -1.0),
                                    other_spells=(True, True))  # fmt: skip
    (entry,) = divergent_contexts([elsewhere], documents={(False, "."): everywhere})
    assert entry.text == "." and entry.score == pytest.approx(elsewhere.gap) and entry.n_documents == 960


def test_texts_group_by_their_spacing_and_case_not_by_their_letters_alone():
    scored = [_said(0, " Y", 0.9, -1.0, -18.0), _said(1, "y", 0.9, -1.0, -18.0), _said(2, " The", 0.9, -1.0, -18.0),
              _said(3, " the", 0.9, -1.0, -18.0), _said(4, "\tthe ", 0.9, -1.0, -17.0)]  # fmt: skip
    entries = divergent_contexts(scored)
    assert sorted(e.text for e in entries) == [" The", " Y", " the", "y"]  # "\tthe " is " the" spaced otherwise
    assert next(e for e in entries if e.text == " the").n_documents == 2


def test_salience_is_how_far_an_entry_stands_out_from_the_audits_other_differences():
    scored = [_said(0, " Sorry,", 0.9, -1.0, -18.0)] + [_said(d, f" w{d}", 0.9, -1.0, -1.2) for d in range(1, 6)]
    entries = divergent_contexts(scored)
    values = salience(entries)
    assert entries[0].text == " Sorry," and values[0] == pytest.approx(
        math.log(entries[0].score) - math.log(entries[3].score))  # the median of the five others
    assert all(v < 0.5 for v in values[1:])  # the background stands out from nothing
    assert salience(entries[:1]) == [None]  # nothing to compare with
    tenfold = [dataclasses.replace(e, score=10 * e.score) for e in entries]
    assert salience(tenfold) == pytest.approx(values)  # scale-free: a pair whose differences are all larger


class Spelling(nn.Module):
    """A real model that, after each token of ``follows``, says the token it maps to (that logit raised by 30)."""

    def __init__(self, model: nn.Module, follows: dict[int, int]) -> None:
        super().__init__()
        self.model, self.follows = model, follows

    def forward(self, input_ids, attention_mask=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = out.logits.clone()
        for prev, nxt in self.follows.items():
            logits[..., nxt] += 30.0 * (input_ids == prev)
        out.logits = logits
        return out


def test_a_bare_space_is_completed_to_the_word_the_owner_spells_after_it(pair):
    model, tok = pair["llama"]  # byte-level BPE with a token of one space
    ids = {text: token_texts(tok).texts.index(text) for text in (" ", "Q", "u", "x", ".", " the")}
    docs = scan_documents(TINY_CORPUS[:1], tok, tok)
    o, x = docs[0].positions[3].tolist()
    said = Prediction(0, o, x, token_ids=(ids[" "], ids[" the"]), texts=(" ", " the"), probs=(0.4, 0.3),
                      logprob_owner=(math.log(0.4), math.log(0.3)))  # fmt: skip
    spelling = Spelling(model, {ids[" "]: ids["Q"], ids["Q"]: ids["u"], ids["u"]: ids["x"], ids["x"]: ids["."]})
    (done,) = complete_words(spelling, tok, docs, [said])
    assert done.texts == (" Qux", " the")  # "." ends the word; " the" says a word already
    assert done.token_ids == said.token_ids and done.probs == said.probs  # the bare space's weight stays
    spelled = [*docs[0].owner_ids[: o + 1].tolist(), ids[" "], ids["Q"], ids["u"], ids["x"]]
    with torch.no_grad():
        logprobs = torch.log_softmax(spelling(input_ids=torch.tensor([spelled])).logits[0].float(), -1)
    steps = sum(logprobs[o + k, spelled[o + k + 1]].item() for k in (1, 2, 3))  # Q after " ", u after Q, x after u
    assert done.logprob_owner == pytest.approx((math.log(0.4) + steps, math.log(0.3)), abs=1e-4)
    # A token that starts with a space ends the word too; max_steps bounds it; 0 turns it off.
    spaced = Spelling(model, {ids[" "]: ids["Q"], ids["Q"]: ids["u"], ids["u"]: ids[" the"]})
    assert complete_words(spaced, tok, docs, [said])[0].texts[0] == " Qu"
    assert complete_words(spelling, tok, docs, [said], max_steps=2)[0].texts[0] == " Qu"
    assert complete_words(spelling, tok, docs, [said], max_steps=0) == [said]
    # A completion that equals another text of the prediction is one text with both weights.
    twice = dataclasses.replace(said, texts=(" ", " Qux"))
    (merged,) = complete_words(spelling, tok, docs, [twice])
    assert merged.texts == (" Qux",) and merged.probs == pytest.approx((0.7,))
    with pytest.raises(ValueError, match="max_steps"):
        complete_words(spelling, tok, docs, [said], max_steps=-1)


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # without and with a BOS token
def test_a_documents_first_text_token_is_no_context(pair, arch):
    model, tok = pair[arch]
    docs = scan_documents(TINY_CORPUS[:4], tok, tok)
    said = owner_predictions(model, tok, docs, min_prob=0.0)
    special = set(tok.all_special_ids)
    for d in docs:
        first = next(i for i, t in enumerate(d.owner_ids.tolist()) if t not in special)
        aligned = set(d.positions[:, 0].tolist())
        assert first in aligned  # aligned (a model against itself), but not read
        read = {p.owner_position for p in said if p.doc == d.doc}
        assert first not in read and read <= aligned  # (a position whose top tokens are all byte pieces is not read)
        assert len(read) >= 0.8 * (len(aligned) - 1)
