"""Behavioural divergence (dfc/behaviour/divergence.py): text probabilities that do not depend on how a tokenizer
splits the text, removal screens of what a feature makes its model say, and the divergence component of the ranking."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfc.analysis.ranking import RankingWeights, rank_features
from dfc.behaviour.divergence import LOGPROB_FLOOR, continuation_logprob, score_under, screen_removal, token_texts
from dfc.behaviour.steering import Steering
from tests.dfc.analysis.test_features import _stats_for_ranking

CONTEXT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def pair(tiny_models):
    """Tiny models with three kinds of tokenizer: byte-level BPE, metaspace BPE, unigram."""
    return {
        arch: (AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval(),
               AutoTokenizer.from_pretrained(tiny_models[arch]))
        for arch in ("llama", "mistral", "gemma3")
    }  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
def test_the_probabilities_of_every_next_character_sum_to_one_however_the_tokenizer_splits(pair, arch):
    model, tok = pair[arch]
    texts = token_texts(tok).texts
    firsts = sorted({text[0] for text in texts if text})
    total = sum(math.exp(continuation_logprob(model, tok, CONTEXT, c)) for c in firsts)
    # What is missing is at most the chance of a token that adds no text (a special one: end of text) right
    # after the context's last token.
    with torch.no_grad():
        ids = torch.tensor([tok(CONTEXT)["input_ids"]])
        p = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    silent = float(sum(p[t] for t, text in enumerate(texts) if not text))
    assert 1.0 - silent - 1e-3 < total <= 1.0 + 1e-4 and silent < 0.5


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
def test_a_longer_continuation_is_never_more_likely_than_its_prefix(pair, arch):
    model, tok = pair[arch]
    scores = [continuation_logprob(model, tok, CONTEXT, text) for text in (" t", " th", " the", " the lazy")]
    assert all(LOGPROB_FLOOR <= s <= 0 for s in scores)
    assert scores == sorted(scores, reverse=True)


def test_a_screen_names_what_removal_takes_away_and_is_zero_against_its_own_model(pair):
    (model, tok), (other, other_tok) = pair["mistral"], pair["llama"]
    layer, d = 1, torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    prompts = [torch.tensor(tok(text)["input_ids"]) for text in (CONTEXT, "Paris is the capital of")]
    screen = screen_removal(model, tok, prompts, Steering(layer, d, -1.0, 8.0), top_k=3)
    assert screen.n_contexts == 2 and 0 < len(screen.continuations) <= 6 and screen.kl > 0
    for prompt, text in zip(prompts, (CONTEXT, "Paris is the capital of"), strict=True):
        ours = [c for c in screen.continuations if c.context == tok.decode(prompt.tolist(), skip_special_tokens=True)]
        assert ours and [c.gain for c in ours] == sorted((c.gain for c in ours), reverse=True)
        assert all(c.gain > 0 for c in ours) and ours[0].context.strip() == text
    assert screen.divergence() is None  # not asked of the other model yet
    assert score_under(model, tok, screen).divergence() == pytest.approx(0.0, abs=1e-9)
    against = score_under(other, other_tok, screen)
    expected = sum(c.gain * (c.logprob_owner - c.logprob_other) for c in against.continuations) / 2
    assert against.divergence() == pytest.approx(expected) and against.divergence() != 0
    assert type(screen).from_dict(against.to_dict()) == against


def test_divergence_lifts_a_weaker_feature_and_negative_divergence_counts_as_none():
    stats = _stats_for_ranking()
    plain = rank_features([0, 1], stats)
    assert plain.top(1) == [0] and plain.features[0].divergence is None
    lifted = rank_features([0, 1], stats, divergence={1: 4.0, 0: -2.0}, weights=RankingWeights(divergence=2.0))
    assert lifted.top(1) == [1]
    one, zero = (next(f for f in lifted.features if f.feature == i) for i in (1, 0))
    assert one.divergence == pytest.approx(1.0) and one.divergence_nats == pytest.approx(4.0)
    assert zero.divergence == 0.0 and zero.divergence_nats == pytest.approx(-2.0)
    assert one.score == pytest.approx(one.strength + 0.5 * one.frequency + 2.0)


def test_token_texts_belong_to_their_tokenizer_object_and_go_with_it(tiny_models):
    from dfc.behaviour import divergence

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    texts = token_texts(tok)
    assert token_texts(tok) is texts and len(texts.texts) == len(tok)
    held = len(divergence._TEXTS)
    del tok, texts
    gc.collect()
    # Gone with it: a later tokenizer that happens to get the same id() is never read with these texts.
    assert len(divergence._TEXTS) == held - 1
