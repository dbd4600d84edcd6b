"""Specification of the evaluation metrics: FVE, L0, dead fraction, relative norms, Latent Scaling."""

import pytest
import torch

from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.metrics import evaluate, latent_scaling, relative_decoder_norm

D = 8


def one_feature_dfc() -> tuple[Crosscoder, int]:
    """A DFC whose only live feature is B-only: it reads and writes B's first basis direction."""
    model = Crosscoder(CrosscoderConfig(d_a=D, d_b=D, n_features=16, k=2, a_only=2, b_only=2))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        j = model.config.b_only_features.start
        e0 = torch.zeros(D)
        e0[0] = 1.0
        model.w_enc_b[j - model.b_offset] = e0
        model.w_dec_b[j - model.b_offset] = e0
    return model, j


def batches(a_carries_it: bool, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        s = torch.rand(256, generator=g) * (torch.rand(256, generator=g) < 0.3)
        x_b = 0.01 * torch.randn(256, D, generator=g)
        x_b[:, 0] += s
        x_a = 0.01 * torch.randn(256, D, generator=g)
        if a_carries_it:
            x_a[:, 3] += s  # A has the same concept (another direction of its own space)
        yield x_a, x_b


@pytest.mark.parametrize("a_carries_it,expect_exclusive", [(False, True), (True, False)])
def test_latent_scaling_separates_truly_exclusive_from_shrunk_features(a_carries_it, expect_exclusive):
    model, j = one_feature_dfc()
    result = latent_scaling(model, batches(a_carries_it), [j], normalized=True)
    assert int(result.owner[0]) == 1
    assert float(result.beta_eps_b[0]) == pytest.approx(1.0, abs=0.05)  # the owner's error + own term is the feature
    if expect_exclusive:
        assert float(result.nu_eps[0]) < 0.2
    else:
        assert float(result.nu_eps[0]) == pytest.approx(1.0, abs=0.1)


def test_evaluate_fve_matches_a_direct_computation():
    model, _ = one_feature_dfc()
    data = list(batches(a_carries_it=False, n=3))
    ev = evaluate(model, data, normalized=True)
    x_a = torch.cat([a for a, _ in data])
    x_b = torch.cat([b for _, b in data])
    recon_b = torch.zeros_like(x_b)
    recon_b[:, 0] = x_b[:, 0].clamp_min(0) * (x_b[:, 0] > 0)
    fve_b = 1 - (x_b - recon_b).pow(2).sum() / (x_b - x_b.mean(0)).pow(2).sum()
    fve_a = 1 - x_a.pow(2).sum() / (x_a - x_a.mean(0)).pow(2).sum()
    assert ev.fve_b == pytest.approx(float(fve_b), abs=1e-4)
    assert ev.fve_a == pytest.approx(float(fve_a), abs=1e-4)
    assert ev.dead_fraction == pytest.approx(15 / 16)
    assert ev.tokens == 768


def test_relative_decoder_norm_of_a_standard_crosscoder_is_between_zero_and_one():
    model = Crosscoder(CrosscoderConfig(d_a=4, d_b=6, n_features=32, k=2, architecture="standard"))
    rel = relative_decoder_norm(model)
    assert rel.shape == (32,) and torch.all((rel > 0) & (rel < 1))


def test_evaluate_refuses_an_empty_stream():
    model, _ = one_feature_dfc()
    with pytest.raises(ValueError, match="no batches"):
        evaluate(model, [])


def test_latent_scaling_ignores_a_constant_offset_in_the_other_model():
    # A decoder bias in A is the same for every token; it must not read as A "carrying" the feature.
    model, j = one_feature_dfc()
    with torch.no_grad():
        model.b_dec_a.fill_(5.0)
    result = latent_scaling(model, batches(a_carries_it=False), [j], normalized=True)
    assert float(result.nu_r[0]) < 0.2 and float(result.nu_eps[0]) < 0.2


def test_a_feature_that_never_fired_has_no_latent_scaling_ratio():
    model, _ = one_feature_dfc()
    silent = model.config.b_only_features.start + 1
    result = latent_scaling(model, batches(a_carries_it=False), [silent], normalized=True)
    assert torch.isnan(result.nu_eps[0]) and torch.isnan(result.nu_r[0])
