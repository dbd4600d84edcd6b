"""Scoring text across tokenizers (dfc/lm/scoring.py): the canonical tokenization is never lost to the search
budget, the search agrees with brute-force enumeration of every tokenization, and each estimate is a distribution
over the next character. Run on the real production tokenizers (Qwen BPE, Mistral SentencePiece, Tekken) with
random tiny models of their vocabularies, on the planted pair's two tokenizers and on tiny models of three
tokenizer kinds."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dfc.lm import scoring
from dfc.lm.scoring import (
    LOGPROB_FLOOR,
    PRUNE,
    Forwards,
    continuation_logprob,
    prefix_probability,
    score_text,
    token_texts,
)

CONTEXTS = (
    "The quick brown fox jumps over",
    "In the morning, the green park was full of",
    "Yesterday the workers repaired the",
    "def add(a, b):\n    return",
    "Paris is the capital of",
    "She said that the doctor",
)
WORDS = (" the lazy dog", " people", " wooden bridge", " a + b", " France", " was", " seventeen", " x1")
SHORT = (" th", " and", "ing", " 12", "ab", " of")


def random_lm(vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A random one-block Llama over a vocabulary, with peaked next-token distributions (large logit scale) so
    that paths differ by orders of magnitude, as in a trained model."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.fixture(scope="module")
def scored(tiny_models, planted_pair, qwen_tokenizer, mistral_tokenizer, tekken_tokenizer):
    """(model, tokenizer) by name: three tiny trained-shape models, the planted pair, three production tokenizers."""
    out = {
        arch: (AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval(),
               AutoTokenizer.from_pretrained(tiny_models[arch]))
        for arch in ("llama", "mistral", "gemma3")
    }  # fmt: skip
    for side, path in (("planted_a", planted_pair.model_a_dir), ("planted_b", planted_pair.model_b_dir)):
        out[side] = (AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    for i, (name, tok) in enumerate((("qwen", qwen_tokenizer), ("mistral_spm", mistral_tokenizer),
                                     ("tekken", tekken_tokenizer))):  # fmt: skip
        out[name] = (random_lm(len(tok), seed=i), tok)
    return out


NAMES = ("llama", "mistral", "gemma3", "planted_a", "planted_b", "qwen", "mistral_spm", "tekken")


@torch.no_grad()
def plain_probs(model, ids: list[int]) -> torch.Tensor:
    """Next-token probabilities of one unpadded sequence: the reference the batched search is held to."""
    return torch.softmax(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float(), -1)


def brute_force(model, ids: list[int], text: str, vocab) -> float:
    """P(generated text after ``ids`` starts with ``text``), every tokenization enumerated, nothing pruned."""
    p = plain_probs(model, ids)
    total = float(p[vocab.starting_with(text)].sum()) if vocab.starting_with(text) else 0.0
    for token, rest in vocab.strict_prefixes(text):
        total += float(p[token]) * brute_force(model, [*ids, token], rest, vocab)
    return total


def canonical_logprob(model, tok, context: str, text: str) -> float | None:
    """log p of the tokens the tokenizer itself gives ``text`` after ``context`` (None if it splits elsewhere)."""
    ids, full = tok(context)["input_ids"], tok(context + text)["input_ids"]
    if full[: len(ids)] != ids or token_texts(tok).spell(full[len(ids) :]) != text:
        return None  # split elsewhere, or spelled with a token of no text (<unk>): no canonical tokens
    total = 0.0
    for i in range(len(ids), len(full)):
        total += math.log(float(plain_probs(model, full[:i])[full[i]]))
    return total


def cases(tok) -> Iterator[tuple[str, str]]:
    """Contexts with continuations: fixed words, and the text of tokens the model itself ranks first."""
    for context in CONTEXTS:
        for word in WORDS:
            yield context, word


@pytest.mark.parametrize("name", NAMES)
def test_a_text_is_never_scored_below_its_canonical_tokens(scored, name):
    model, tok = scored[name]
    checked = informative = 0
    for context, text in cases(tok):
        canonical = canonical_logprob(model, tok, context, text)
        if canonical is None:
            continue
        for budget in (0, 1, scoring.SEARCH_BUDGET):
            got = score_text(model, tok, context, text, budget=budget)
            assert got.logprob >= max(canonical, LOGPROB_FLOOR) - 1e-4, (name, context, text, budget, got, canonical)
            assert got.canonical == pytest.approx(max(canonical, LOGPROB_FLOOR), abs=1e-4)
        checked += 1
        informative += canonical > LOGPROB_FLOOR
    # Enough cases were compared, and enough of them above the floor, where the floor cannot hide a loss.
    assert checked >= len(CONTEXTS) * 4 and informative >= len(CONTEXTS)


@pytest.mark.parametrize("name", NAMES)
def test_the_models_own_likeliest_tokens_score_at_least_their_probability(scored, name):
    model, tok = scored[name]
    vocab = token_texts(tok)
    for context in CONTEXTS:
        ids = tok(context)["input_ids"]
        p = plain_probs(model, ids)
        for token in p.topk(3).indices.tolist():
            text = vocab.texts[token]
            if not text:
                continue
            floor = max(math.log(float(p[token])), LOGPROB_FLOOR)
            assert continuation_logprob(model, tok, context, text) >= floor - 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_the_search_equals_brute_force_enumeration_of_every_tokenization(scored, name):
    model, tok = scored[name]
    vocab = token_texts(tok)
    compared = 0
    for context in CONTEXTS[:3]:
        ids = tok(context)["input_ids"]
        for text in SHORT:
            exact = brute_force(model, ids, text, vocab)
            full = prefix_probability(Forwards(model), ids, text, vocab, budget=10_000)
            # Branches below PRUNE are the only difference; there are at most 2^(len-1) of them.
            slack = PRUNE * 2 ** len(text) + 1e-6 * exact
            assert full.probability == pytest.approx(exact, abs=slack), (context, text)
            small = prefix_probability(Forwards(model), ids, text, vocab, budget=1)
            assert small.probability <= exact + slack
            full_ids = tok(context + text)["input_ids"]
            if full_ids[: len(ids)] == ids and vocab.spell(full_ids[len(ids) :]) == text:
                canon = prefix_probability(Forwards(model), ids, text, vocab, canonical=full_ids[len(ids) :], budget=0)
                assert canon.canonical is not None and canon.canonical <= canon.probability <= exact + slack
            compared += 1
    assert compared == 3 * len(SHORT)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma3", "planted_b"])
def test_each_estimate_is_a_distribution_over_the_next_character(scored, name):
    model, tok = scored[name]
    vocab = token_texts(tok)
    context = CONTEXTS[0]
    firsts = sorted({text[0] for text in vocab.texts if text})
    scores = [score_text(model, tok, context, c, budget=200) for c in firsts]
    ids = tok(context)["input_ids"]
    p = plain_probs(model, ids)
    # What is missing is at most the chance of a token that adds no text (a special one: end of text).
    silent = float(sum(p[t] for t, text in enumerate(vocab.texts) if not text))
    direct = sum(math.exp(s.direct) for s in scores)
    assert 1.0 - silent - 1e-3 < direct <= 1.0 + 1e-4 and silent < 0.5
    healed = [s.healed for s in scores]
    if all(h is not None for h in healed):
        assert 1.0 - silent - 1e-3 < sum(math.exp(h) for h in healed) <= 1.0 + 1e-4
    assert all(s.logprob >= max(s.direct, s.healed or LOGPROB_FLOOR) for s in scores)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma3"])
def test_a_longer_continuation_is_never_more_likely_than_its_prefix(scored, name):
    model, tok = scored[name]
    scores = [continuation_logprob(model, tok, CONTEXTS[0], text) for text in (" t", " th", " the", " the lazy")]
    assert all(LOGPROB_FLOOR <= s <= 0 for s in scores)
    assert scores == sorted(scores, reverse=True)


def test_batched_forwards_read_each_prefix_as_if_it_ran_alone(scored):
    model, tok = scored["gemma3"]
    prefixes = [tok(c)["input_ids"] for c in CONTEXTS]
    forwards = Forwards(model, batch_size=4)
    forwards.prepare(prefixes)
    assert forwards.calls == 2 and forwards.rows == len(CONTEXTS)
    for prefix in prefixes:
        assert torch.allclose(forwards(prefix), plain_probs(model, prefix), atol=1e-5)
    forwards.prepare(prefixes)
    assert forwards.calls == 2  # cached: nothing is computed twice


def test_a_large_vocabulary_batches_fewer_rows_per_pass(scored, monkeypatch):
    model, tok = scored["qwen"]
    prefixes = [tok(c)["input_ids"] for c in CONTEXTS]
    width = max(map(len, prefixes))
    monkeypatch.setattr(scoring, "MAX_LOGITS", 2 * width * model.config.vocab_size)
    forwards = Forwards(model, batch_size=8)
    forwards.prepare(prefixes)
    assert forwards.calls == math.ceil(len(prefixes) / 2)


def test_token_texts_belong_to_their_tokenizer_object_and_go_with_it(tiny_models):
    import gc

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    texts = token_texts(tok)
    assert token_texts(tok) is texts and len(texts.texts) == len(tok)
    held = len(scoring._TEXTS)
    del tok, texts
    gc.collect()
    # Gone with it: a later tokenizer that happens to get the same id() is never read with these texts.
    assert len(scoring._TEXTS) == held - 1
