"""Specification of feature analysis: streaming statistics equal a dense computation, top contexts are the true
top activations capped per document, context windows mark the token, promoted tokens follow the unembedding,
the ranking orders features by its documented components, and exclusive features find their nearest shared."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dfc.analysis.features import PairedTokens, context_record, feature_statistics, nearest_shared, scan_features
from dfc.analysis.promoted import direct_logit_attribution, find_final_norm, steered_token_effects
from dfc.analysis.ranking import RankingWeights, rank_features
from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.metrics import LatentScaling, latent_scaling
from tests.fixtures.tiny_models import TINY_ARCHS, build_tiny_tokenizer


def _random_dfc(seed: int = 0) -> Crosscoder:
    model = Crosscoder(CrosscoderConfig(d_a=12, d_b=10, n_features=48, k=4, a_only=4, b_only=4))
    g = torch.Generator().manual_seed(seed)
    model.reset_parameters(generator=g)
    with torch.no_grad():
        model.b_enc.copy_(0.1 * torch.randn(48, generator=g))
        model.scale_a.fill_(0.7)
        model.scale_b.fill_(1.3)
    return model


def _batches(n_batches: int = 5, size: int = 64, docs_per_batch: int = 6, seed: int = 0) -> list[PairedTokens]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        doc = b * docs_per_batch + torch.randint(docs_per_batch, (size,), generator=g)
        pos = torch.arange(b * size, (b + 1) * size)  # unique per token across the stream
        out.append(PairedTokens(torch.randn(size, 12, generator=g), torch.randn(size, 10, generator=g), doc, pos, pos))
    return out


def _dense(model: Crosscoder, batches: list[PairedTokens]) -> torch.Tensor:
    """Reference activations, batch by batch exactly as the scan encodes them (BatchTopK per batch)."""
    with torch.no_grad():
        return torch.cat([model.encode(*model.normalize(b.x_a, b.x_b)).to_dense() for b in batches]).double()


def test_streaming_statistics_equal_a_dense_computation():
    model, batches = _random_dfc(), _batches()
    subset = [0, 3, 5, 20, 44, 47]
    stats = feature_statistics(model, batches, subset)
    acts = _dense(model, batches)[:, subset]
    fired = acts > 0
    assert stats.tokens == acts.shape[0]
    assert torch.equal(stats.count, fired.sum(0))
    torch.testing.assert_close(stats.frequency, fired.double().mean(0))
    torch.testing.assert_close(stats.max, acts.max(0).values)
    torch.testing.assert_close(stats.mean, acts.sum(0) / fired.sum(0).clamp_min(1))
    x_a, x_b = model.normalize(torch.cat([b.x_a for b in batches]), torch.cat([b.x_b for b in batches]))
    norms = model.decoder_norms()
    for name, x, dec in (("a", x_a, norms.a), ("b", x_b, norms.b)):
        total = (x.double() - x.double().mean(0)).pow(2).sum()
        expected = (acts.pow(2).sum(0) * dec[subset].double() ** 2) / total
        torch.testing.assert_close(getattr(stats, f"variance_share_{name}"), expected)
    assert float(stats.variance_share_a[-1]) == 0.0  # a B-only feature explains none of A


def _greedy_top(acts: torch.Tensor, docs: torch.Tensor, feature: int, n: int, per_doc: int) -> list[tuple[int, float]]:
    """Reference: strongest first, skipping any token whose document already has ``per_doc`` picks."""
    column = acts[:, feature]
    picked, counts = [], {}
    for row in torch.argsort(column, descending=True, stable=True).tolist():
        if column[row] <= 0 or len(picked) == n:
            break
        doc = int(docs[row])
        if counts.get(doc, 0) < per_doc:
            counts[doc] = counts.get(doc, 0) + 1
            picked.append((row, float(column[row])))
    return picked


@pytest.mark.parametrize("per_document", [1, 2])
def test_top_contexts_are_the_true_top_activations_capped_per_document(per_document):
    model, batches = _random_dfc(), _batches()
    acts, docs = _dense(model, batches), torch.cat([b.document for b in batches])
    features = (acts > 0).sum(0).topk(4).indices.tolist()  # features that fire often enough for the caps to bite
    scan = scan_features(model, batches, features, top_n=5, per_document=per_document, n_sample=4)
    for f in features:
        expected = _greedy_top(acts, docs, f, 5, per_document)
        got = scan.contexts.top.get(f, [])
        assert [r.position_a for r in got] == [row for row, _ in expected]  # positions are global rows here
        assert [r.activation for r in got] == pytest.approx([v for _, v in expected])
        per_doc_counts = torch.bincount(torch.tensor([r.document for r in got], dtype=torch.long))
        assert got and int(per_doc_counts.max()) <= per_document
        sample = scan.contexts.sample.get(f, [])
        top_rows = {r.position_a for r in got}
        assert len(sample) == min(4, int((acts[:, f] > 0).sum()) - len(got))
        assert all(r.position_a not in top_rows for r in sample)
        assert [r.activation for r in sample] == pytest.approx([float(acts[r.position_a, f]) for r in sample])


def test_context_record_marks_the_token_and_keeps_the_spaces():
    spec = TINY_ARCHS["mistral"]  # SentencePiece-style: spaces live inside tokens
    tok = build_tiny_tokenizer(spec.tokenizer, spec.vocab_size, adds_bos=False)
    text = "Shared features reconstruct both models; exclusive features belong to one model only."
    ids = tok(text)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    position = pieces.index("▁features")
    record = context_record(tok, ids, position, 2.5, before=3, after=2, document=7)
    assert record.token == " features" and record.prefix.endswith("Shared")
    assert record.prefix + record.token + record.suffix == tok.decode(ids[position - 3 : position + 3])
    assert record.marked().count("«") == 1 and record.activation == 2.5 and record.document == 7
    whole = context_record(tok, ids, position, 1.0, before=100, after=100)
    assert (whole.prefix + whole.token + whole.suffix).strip() == text


@pytest.mark.parametrize("arch,norm_name", [("llama", "norm"), ("gpt2", "ln_f")])
def test_direction_of_an_unembedding_row_promotes_that_token_first(tiny_models, arch, norm_name):
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    assert find_final_norm(model) is dict(model.base_model.named_children())[norm_name]
    for token in (5, 42, 77):
        direction = model.get_output_embeddings().weight[token].detach()
        effects = direct_logit_attribution(model, direction, k=3)
        assert effects.top_ids[0] == token
        assert direct_logit_attribution(model, -direction, k=3).bottom_ids[0] == token


def test_steered_token_effects_find_the_token_a_direction_adds(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    token = 42
    direction = model.get_output_embeddings().weight[token].detach()
    prompts = [torch.tensor([1, 20, 30, 40]), torch.tensor([1, 50, 60])]
    effects = steered_token_effects(model, None, model.config.num_hidden_layers - 1, direction, 1.0, prompts, alpha=8)
    assert effects.top_ids[0] == token and effects.top_values[0] > 0


def _stats_for_ranking():
    """Four features: 0 strong+frequent, 1 weak+rare, 2 strong+frequent but failing LS, 3 never fired."""
    from dfc.analysis.features import FeatureStats

    return FeatureStats(
        features=torch.tensor([0, 1, 2, 3]),
        tokens=100_000,
        count=torch.tensor([5_000, 3, 5_000, 0]),
        sum=torch.tensor([5_000 * 4.0, 3 * 0.5, 5_000 * 4.0, 0.0], dtype=torch.float64),
        max=torch.tensor([8.0, 0.8, 8.0, 0.0], dtype=torch.float64),
        variance_share_a=torch.zeros(4, dtype=torch.float64),
        variance_share_b=torch.zeros(4, dtype=torch.float64),
    )


def test_ranking_puts_strong_frequent_truly_exclusive_features_first_and_explains_why():
    stats = _stats_for_ranking()
    feats = torch.tensor([0, 1, 2, 3])
    nu = LatentScaling(
        feats, *[torch.zeros(4)] * 4, nu_r=torch.tensor([0.1, 0.1, 0.9, 0.1]),
        nu_eps=torch.tensor([0.05, 0.05, 0.6, 0.05]), owner=torch.ones(4, dtype=torch.long),
    )  # fmt: skip
    ranking = rank_features([0, 1, 2, 3], stats, latent_scaling=nu)
    assert ranking.top(1) == [0] and ranking.rank_of(1) > 1 and ranking.rank_of(2) > 1
    harsh = rank_features([0, 1, 2, 3], stats, latent_scaling=nu, weights=RankingWeights(latent_scaling_penalty=3))
    assert harsh.top(4) == [0, 1, 2, 3]  # failing LS is penalised below weak features, never dropped
    first, failing = ranking.features[0], next(f for f in ranking.features if f.feature == 2)
    assert first.passes_latent_scaling is True and failing.passes_latent_scaling is False
    weak = next(f for f in ranking.features if f.feature == 1)
    assert first.strength == pytest.approx(1.0) and weak.strength == pytest.approx(0.1)
    assert 0 < weak.frequency < first.frequency  # rare but non-zero still counts
    assert first.score == pytest.approx(first.strength + 0.5 * first.frequency)
    assert failing.score == pytest.approx(first.score - 1.0)
    never = next(f for f in ranking.features if f.feature == 3)
    assert never.frequency == 0.0 and never.rank == 4 and never.passes_latent_scaling is None  # dead: last
    assert ranking.to_dict()["features"][0]["nu_eps"] == pytest.approx(0.05)


def test_steering_effect_can_lift_a_weaker_feature_and_is_optional():
    stats = _stats_for_ranking()
    no_steering = rank_features([0, 1], stats)
    assert no_steering.features[0].steering is None and no_steering.top(1) == [0]
    lifted = rank_features([0, 1], stats, steering_effect={1: 3.0, 0: 0.1}, weights=RankingWeights(steering=2.0))
    assert lifted.top(1) == [1] and lifted.features[0].steering == pytest.approx(1.0)


def test_nearest_shared_feature_of_an_exclusive_feature():
    model = _random_dfc()
    c = model.config
    a_only, b_only = c.a_only_features.start, c.b_only_features.start
    twin_a, twin_b = c.shared.start + 5, c.shared.start + 11
    with torch.no_grad():
        model.w_dec_a[a_only] = 2 * model.w_dec_a[twin_a] + 0.01
        model.w_dec_b[b_only - model.b_offset] = 0.5 * model.w_dec_b[twin_b - model.b_offset] - 0.01
    result = nearest_shared(model, [a_only, b_only])
    assert result.shared.tolist() == [twin_a, twin_b] and result.side == ["a", "b"]
    assert float(result.cosine.min()) > 0.95


def test_cross_space_features_are_held_to_the_cross_space_thresholds_and_nu_r_is_not_tested_there():
    stats = _stats_for_ranking()
    feats = torch.tensor([0, 1, 2, 3])
    # Features 0 and 2 are equally strong and frequent; ν_r is huge for both (the vanishing-denominator case).
    nu_eps, nu_r = torch.tensor([0.5, 0.05, 1.5, 0.05]), torch.tensor([160.0, 0.1, 160.0, 0.1])
    common = dict(nu_r=nu_r, nu_eps=nu_eps, owner=torch.ones(4, dtype=torch.long))
    cross = LatentScaling(feats, *[torch.zeros(4)] * 4, **common, same_space=torch.zeros(4, dtype=torch.bool))
    same = LatentScaling(feats, *[torch.zeros(4)] * 4, **common, same_space=torch.ones(4, dtype=torch.bool))
    across = {f.feature: f for f in rank_features(feats, stats, latent_scaling=cross).features}
    within = {f.feature: f for f in rank_features(feats, stats, latent_scaling=same).features}
    # Across spaces: ν_ε 0.5 < 1.0 passes whatever ν_r says; ν_ε 1.5 fails; the thresholds used are recorded.
    assert across[0].passes_latent_scaling is True and across[2].passes_latent_scaling is False
    assert (across[0].nu_eps_max, across[0].nu_r_max) == (1.0, None)
    assert across[0].rank < across[2].rank
    # The same numbers in one space fail the paper's thresholds (ν_ε 0.5 ≥ 0.2, ν_r 160 ≥ 0.5).
    assert within[0].passes_latent_scaling is False and (within[0].nu_eps_max, within[0].nu_r_max) == (0.2, 0.5)
    strict = RankingWeights(nu_r_max_cross=0.5)
    assert (
        rank_features(feats, stats, latent_scaling=cross, weights=strict).features[0].passes_latent_scaling is not True
    )


def test_latent_scaling_marks_exclusive_dfc_features_as_cross_space_and_shared_ones_as_same_space():
    config = CrosscoderConfig(d_a=12, d_b=20, n_features=40, k=4, architecture="dfc", a_only=0.1, b_only=0.1)
    model = Crosscoder(config)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 12, generator=gen), torch.randn(64, 20, generator=gen)) for _ in range(4)]
    feats = [*config.a_only_features, *config.shared[:4], *config.b_only_features]
    ls = latent_scaling(model, batches, feats)
    exclusive = set(config.a_only_features) | set(config.b_only_features)
    assert ls.same_space is not None
    assert {f: bool(s) for f, s in zip(feats, ls.same_space.tolist(), strict=True)} == {
        f: f not in exclusive for f in feats
    }
