"""Behavioural divergence (dfc/behaviour/divergence.py): removal screens of what a feature makes its model say, scored
under another model, and the divergence component of the ranking. Text scoring itself: tests/dfc/lm/test_scoring.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfc.analysis.ranking import RankingWeights, rank_features
from dfc.behaviour.divergence import score_under, screen_removal
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
