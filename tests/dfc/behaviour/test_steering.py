"""Specification of steering: an additive hook that always comes off, KL and log-prob effects, sweeps, and
carrying a steering vector across models through shared features (SCIENCE.md §8–9)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfc.behaviour.steering import (
    FeatureGate,
    Steering,
    SteeringError,
    greedy_continuations,
    greedy_generations,
    logprob_change,
    next_token_kl,
    steer,
    steering_sweep,
)
from dfc.behaviour.transfer import contrast_vector, transfer_steering_vector
from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.lm.hooks import capture_activations, find_decoder_layers

PROMPTS = ["The quick brown fox jumps over", "Paris is the capital of"]


@pytest.fixture(scope="module")
def llama(tiny_models):
    path = tiny_models["llama"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def _hook_count(model) -> int:
    return sum(len(block._forward_hooks) for block in find_decoder_layers(model).layers)


def test_steering_changes_outputs_and_comes_off_even_after_an_error(llama):
    model, tok = llama
    base = _logits(model, tok, PROMPTS[0])
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="boom"), steer(model, 1, direction, alpha=4.0, scale=1.0):
        assert not torch.allclose(_logits(model, tok, PROMPTS[0]), base, atol=1e-3)
        raise RuntimeError("boom")
    assert _hook_count(model) == 0
    assert torch.equal(_logits(model, tok, PROMPTS[0]), base)


def test_zero_alpha_gives_zero_kl_and_nonzero_alpha_a_positive_one(llama):
    model, tok = llama
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    assert next_token_kl(model, tok, PROMPTS, Steering(2, direction, 0.0, 3.0)) == pytest.approx(0.0, abs=1e-7)
    assert next_token_kl(model, tok, PROMPTS, Steering(2, direction, 2.0, 3.0)) > 1e-4


@pytest.mark.parametrize(
    "alpha,scale,bad",
    [(math.nan, 1.0, None), (math.inf, 1.0, None), (1.0, math.nan, None), (1.0, 1.0, 0)],
)
def test_non_finite_steering_is_rejected_before_running(llama, alpha, scale, bad):
    model, _ = llama
    direction = torch.ones(model.config.hidden_size)
    if bad is not None:
        direction[bad] = math.nan
    with pytest.raises(SteeringError), steer(model, 1, direction, alpha, scale):
        pytest.fail("the with-block must not run")
    assert _hook_count(model) == 0


def test_overflowing_steering_names_the_coefficient(llama):
    model, tok = llama
    huge = torch.full((model.config.hidden_size,), 3e38)
    with pytest.raises(SteeringError, match=r"α=10.0 produced non-finite activations"), steer(model, 0, huge, 10.0):
        _logits(model, tok, PROMPTS[0])
    assert _hook_count(model) == 0


def test_adding_a_tokens_unembedding_direction_raises_its_log_probability(llama):
    model, tok = llama
    target = tok(" fox", add_special_tokens=False)["input_ids"][0]
    direction = model.get_output_embeddings().weight[target].detach()
    last = len(find_decoder_layers(model).layers) - 1
    change = logprob_change(model, tok, PROMPTS, [target], Steering(last, direction, 5.0, 1.0))
    assert change.mean > 0.5
    assert logprob_change(model, tok, PROMPTS, [target], Steering(last, direction, -5.0, 1.0)).mean < -0.5


def test_sweep_records_kl_logprob_and_side_by_side_continuations(llama):
    model, tok = llama
    target = tok(" fox", add_special_tokens=False)["input_ids"][0]
    direction = model.get_output_embeddings().weight[target].detach()
    last = len(find_decoder_layers(model).layers) - 1
    sweep = steering_sweep(
        model, tok, last, direction, s_max=2.0, alphas=[0.0, 3.0],
        feature_prompts=PROMPTS[:1], neutral_prompts=PROMPTS[1:], promoted_token_ids=[target],
        probe_prompts=PROMPTS, max_new_tokens=4,
    )  # fmt: skip
    zero, strong = sweep.points
    assert zero.kl_feature == pytest.approx(0.0, abs=1e-7) and zero.continuations == sweep.unsteered
    assert strong.kl_feature > 0 and strong.promoted_logprob_change > 0
    assert sweep.unsteered == greedy_continuations(model, tok, PROMPTS, 4)  # greedy is deterministic
    assert json.loads(json.dumps(sweep.to_dict()))["points"][1]["alpha"] == 3.0
    # Every box of the report can say what was generated, token by token, even when the text is empty.
    for text, tokens in zip(strong.continuations, strong.continuation_tokens, strict=True):
        assert 1 <= len(tokens) <= 4
        special = set(tok.all_special_tokens)
        assert "".join(t for t in tokens if t not in special).strip() == text.strip()
    assert len(sweep.unsteered_tokens) == len(PROMPTS)


def test_a_generation_that_ends_at_once_keeps_its_end_token(llama):
    model, tok = llama
    eos = tok.eos_token_id
    direction = model.get_output_embeddings().weight[eos].detach()
    last = len(find_decoder_layers(model).layers) - 1
    forced = Steering(last, direction, 1.0, 50.0)
    (generation,) = greedy_generations(model, tok, PROMPTS[:1], 3, forced)
    assert generation.text == "" and generation.tokens[0] == tok.eos_token


def _hand_built_dfc() -> tuple[Crosscoder, list[int]]:
    """A DFC whose shared features have random decoders and non-trivial normalisation scales."""
    g = torch.Generator().manual_seed(0)
    model = Crosscoder(CrosscoderConfig(d_a=64, d_b=48, n_features=40, k=2, a_only=4, b_only=4))
    with torch.no_grad():
        model.w_dec_a.copy_(torch.randn(model.w_dec_a.shape, generator=g))
        model.w_dec_b.copy_(torch.randn(model.w_dec_b.shape, generator=g))
        model.scale_a.fill_(0.5)
        model.scale_b.fill_(4.0)
    return model, list(model.config.shared)


@pytest.mark.parametrize("source", ["a", "b"])
def test_transfer_builds_the_vector_from_the_planted_shared_features(source):
    model, shared = _hand_built_dfc()
    planted = [shared[3], shared[17]]
    mine, theirs = (model.w_dec_a, model.w_dec_b) if source == "a" else (model.w_dec_b, model.w_dec_a)
    own_scale, other_scale = (model.scale_a, model.scale_b) if source == "a" else (model.scale_b, model.scale_a)
    offset = 0 if source == "a" else model.b_offset
    other_offset = model.b_offset if source == "a" else 0
    with torch.no_grad():
        # Raw-scale v: a 3:2 mix of the two planted features' source decoders.
        v = (3 * mine[planted[0] - offset] + 2 * mine[planted[1] - offset]) / own_scale
        result = transfer_steering_vector(model, v, n=2, source=source)
    assert sorted(result.features.tolist()) == sorted(planted)
    assert float(result.vector.norm()) == pytest.approx(float(v.norm()), rel=1e-5)
    with torch.no_grad():
        rows = torch.stack([theirs[f - other_offset] for f in result.features.tolist()]) / other_scale
    expected = (result.weights[:, None] * rows).sum(0)
    assert torch.nn.functional.cosine_similarity(result.vector, expected, dim=0) > 0.9999
    assert result.weights[0] >= result.weights[1] > 0


def test_transfer_rejects_a_vector_of_the_wrong_width():
    model, _ = _hand_built_dfc()
    with pytest.raises(ValueError, match="dimensions"):
        transfer_steering_vector(model, torch.ones(5))


def test_gated_steering_acts_only_where_the_feature_fires(llama):
    model, tok = llama
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    base = _logits(model, tok, PROMPTS[0])
    silent = FeatureGate(torch.zeros(model.config.hidden_size), bias=-1.0, threshold=0.0)
    with steer(model, 1, direction, -3.0, gate=silent):
        assert torch.equal(_logits(model, tok, PROMPTS[0]), base)
    always_one = FeatureGate(torch.zeros(model.config.hidden_size), bias=1.0, threshold=0.5)
    with steer(model, 1, direction, -3.0, gate=always_one):
        gated = _logits(model, tok, PROMPTS[0])
    with steer(model, 1, direction, -3.0, scale=1.0):
        torch.testing.assert_close(gated, _logits(model, tok, PROMPTS[0]))


def test_only_exclusive_features_can_be_gated():
    model, shared = _hand_built_dfc()
    b_only = model.config.b_only_features.start
    gate = FeatureGate.of(model, b_only)
    torch.testing.assert_close(gate.encoder, model.w_enc_b[b_only - model.b_offset].detach() * 4.0)
    with pytest.raises(ValueError, match="not exclusive"):
        FeatureGate.of(model, shared[0])


def test_a_contrast_vector_is_the_difference_of_mean_activations_over_non_special_tokens(llama):
    model, tok = llama
    layer = 1
    pos, neg = ["I love this, it is wonderful"], ["I hate this, it is awful", "Terrible and sad"]
    v = contrast_vector(model, tok, layer, pos, neg)

    def tokens(prompts):  # every non-special token's activation, BOS run but left out
        rows = []
        for p in prompts:
            ids = torch.tensor(tok(p)["input_ids"])
            acts = capture_activations(model, ids[None], None, layer).activations[0]
            rows.append(acts[~torch.isin(ids, torch.tensor(tok.all_special_ids))])
        return torch.cat(rows)

    assert tok("x")["input_ids"][0] in tok.all_special_ids  # the prompts do start with a special token
    assert torch.allclose(v, tokens(pos).mean(0) - tokens(neg).mean(0), atol=1e-5)
    assert torch.allclose(contrast_vector(model, tok, layer, neg, pos), -v, atol=1e-6)
    assert float(contrast_vector(model, tok, layer, pos, pos).abs().max()) == 0.0
    with pytest.raises(ValueError, match="positive and negative"):
        contrast_vector(model, tok, layer, pos, [])
