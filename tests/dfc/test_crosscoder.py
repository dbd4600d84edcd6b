"""Specification of the crosscoder family: partitions, sparse kernels, persistence, bad input."""

import dataclasses

import pytest
import torch

from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.dense_reference import DenseReference
from dfc.sparse import SparseFeatures, batch_topk

ARCHS = ["standard", "dsf", "dfc"]


def make(arch: str = "dfc", d_a: int = 24, d_b: int = 40, n_features: int = 200, k: int = 6, **kw) -> Crosscoder:
    torch.manual_seed(0)
    model = Crosscoder(CrosscoderConfig(d_a=d_a, d_b=d_b, n_features=n_features, k=k, architecture=arch, **kw))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.1)
        model.b_dec_a.normal_()
        model.b_dec_b.normal_()
    return model


def test_dfc_partitions_add_up_and_are_disjoint():
    c = CrosscoderConfig(d_a=8, d_b=8, n_features=1000, k=4, a_only=0.03, b_only=25)
    assert (c.n_a_only, c.n_b_only, c.n_shared) == (30, 25, 945)
    assert set(c.a_only_features).isdisjoint(c.features_b)
    assert set(c.b_only_features).isdisjoint(c.features_a)
    assert set(c.features_a) | set(c.features_b) == set(range(1000))


def test_a_exclusive_feature_has_no_parameter_touching_b():
    model = make("dfc")
    c = model.config
    # B's encoder and decoder have rows only for B's features: A-only features are not in them.
    assert model.w_enc_b.shape[0] == model.w_dec_b.shape[0] == len(c.features_b) == c.n_shared + c.n_b_only
    assert model.w_enc_a.shape[0] == model.w_dec_a.shape[0] == c.n_a_only + c.n_shared


def test_a_exclusive_feature_never_reconstructs_b():
    model = make("dfc")
    c = model.config
    rows = torch.arange(5)
    cols = torch.tensor(list(c.a_only_features)[:5])
    features = SparseFeatures(rows, cols, torch.full((5,), 3.0), 5, c.n_features)
    recon_a, recon_b = model.decode(features)
    assert torch.equal(recon_b, model.b_dec_b.detach().expand(5, -1))
    assert not torch.allclose(recon_a, model.b_dec_a.detach().expand(5, -1))


def test_b_exclusive_features_never_read_model_a():
    model = make("dfc")
    c = model.config
    x_b = torch.randn(16, c.d_b)
    pre1 = model.pre_activations(torch.randn(16, c.d_a), x_b)
    pre2 = model.pre_activations(torch.randn(16, c.d_a) * 10, x_b)
    b_only = slice(c.b_only_features.start, c.b_only_features.stop)
    assert torch.equal(pre1[:, b_only], pre2[:, b_only])
    shared = slice(c.shared.start, c.shared.stop)
    assert not torch.equal(pre1[:, shared], pre2[:, shared])


def test_relative_decoder_norm_is_exactly_one_and_zero_on_dfc_partitions():
    model = make("dfc")
    rel = model.decoder_norms().relative
    c = model.config
    assert torch.all(rel[c.a_only_features.start : c.a_only_features.stop] == 1)
    assert torch.all(rel[c.b_only_features.start : c.b_only_features.stop] == 0)
    assert torch.all((rel[c.shared.start : c.shared.stop] > 0) & (rel[c.shared.start : c.shared.stop] < 1))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("widths", [(32, 32), (24, 40)])
def test_sparse_step_matches_dense_masked_reference(arch, widths):
    model = make(arch, d_a=widths[0], d_b=widths[1])
    reference = DenseReference(model)
    x_a, x_b = torch.randn(64, widths[0]), torch.randn(64, widths[1])
    out = model(x_a, x_b, k=6)
    out.loss.backward()
    ref = reference(x_a, x_b, 6)
    (ref.loss_a + ref.loss_b).backward()
    torch.testing.assert_close(out.loss_a, ref.loss_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss_b, ref.loss_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.features.to_dense(), ref.dense_features.detach(), rtol=1e-5, atol=1e-6)
    c = model.config
    fa, fb = c.features_a, c.features_b
    torch.testing.assert_close(
        model.w_enc_a.grad, reference.w_enc.grad[0, : c.d_a, fa.start : fa.stop].T, atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        model.w_enc_b.grad, reference.w_enc.grad[1, : c.d_b, fb.start : fb.stop].T, atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(model.b_enc.grad, reference.b_enc.grad, atol=1e-5, rtol=1e-4)
    grad_dec_a = reference.w_dec.grad[0, fa.start : fa.stop, : c.d_a].clone()
    grad_dec_b = reference.w_dec.grad[1, fb.start : fb.stop, : c.d_b]
    if c.ties_decoders:  # the tied rows collect gradient from both models
        tied = slice(c.n_a_only, c.n_a_only + c.n_designated)
        grad_dec_a[tied] += grad_dec_b[: c.n_designated]
        grad_dec_b = grad_dec_b[c.n_designated :]
    torch.testing.assert_close(model.w_dec_a.grad, grad_dec_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.w_dec_b.grad, grad_dec_b, atol=1e-5, rtol=1e-4)


def test_dsf_ties_designated_decoders_when_widths_match():
    model = make("dsf", d_a=32, d_b=32)
    c = model.config
    tied = slice(c.shared.start, c.shared.start + c.n_designated)
    assert c.n_designated == 20 and c.ties_decoders
    torch.testing.assert_close(model.w_dec_a[tied], model.decoder_b()[: c.n_designated])
    assert model.decoder_norms().relative[tied].sub(0.5).abs().max() < 1e-6


def test_dsf_with_different_widths_keeps_designated_features_out_of_the_free_budget():
    model = make("dsf", d_a=24, d_b=40, k=10)
    c = model.config
    assert not c.ties_decoders
    free, designated = model._k_budgets(10, 100)
    assert free + designated == 1000
    # A designated feature gets `designated_k_multiplier` times the per-feature budget of a free one.
    per_designated = designated / c.n_designated
    per_free = free / (c.n_features - c.n_designated)
    assert per_designated / per_free == pytest.approx(c.designated_k_multiplier, rel=0.05)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_topk_keeps_k_times_batch_entries(arch):
    model = make(arch, k=7)
    out = model(torch.randn(50, 24), torch.randn(50, 40))
    assert out.features.rows.numel() == 350
    assert out.features.l0 == pytest.approx(7.0)


@pytest.mark.parametrize("shape,n_keep", [((300, 500), 900), ((64, 8192), 2048), ((10, 10), 100), ((1000, 64), 5000)])
def test_batch_topk_is_exact(shape, n_keep):
    scores = torch.rand(shape).relu()
    picked = batch_topk(scores, n_keep)
    expected = scores.reshape(-1).topk(n_keep).indices
    assert set(picked.tolist()) == set(expected.tolist())


def test_inference_thresholds_required_and_used():
    model = make("dfc")
    x_a, x_b = torch.randn(32, 24), torch.randn(32, 40)
    with pytest.raises(RuntimeError, match="thresholds"):
        model.encode(x_a, x_b, use_thresholds=True)
    model.thresholds.fill_(0.5)
    features = model.encode(x_a, x_b, use_thresholds=True)
    scores = model.scores(x_a, x_b).scores
    assert features.rows.numel() == int((scores > 0.5).sum())


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_round_trip_is_exact(tmp_path, arch):
    model = make(arch, metadata={"model_a": "x/y@abc"})
    model.set_scales(3.0, 7.0)
    model.thresholds.fill_(0.25)
    model.save_pretrained(tmp_path / "cc")
    loaded = Crosscoder.from_pretrained(tmp_path / "cc")
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x_a, x_b = torch.randn(8, 24), torch.randn(8, 40)
    assert torch.equal(model(x_a, x_b).recon_b, loaded(x_a, x_b).recon_b)


def test_load_missing_directory_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        Crosscoder.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": 200}, "k=200 must be smaller"),
        ({"a_only": 150, "b_only": 60}, "exceed the dictionary"),
        ({"d_a": 0}, "d_a must be a positive integer"),
        ({"a_only": 2.5}, "a_only=2.5"),
        ({"architecture": "sae"}, "sae"),
    ],
)
def test_bad_configs_are_rejected_with_the_value_named(kwargs, match):
    base = {"d_a": 8, "d_b": 8, "n_features": 200, "k": 4, "architecture": "dfc"}
    with pytest.raises(ValueError, match=match):
        CrosscoderConfig(**{**base, **kwargs})


def test_mismatched_widths_are_rejected_at_the_boundary():
    model = make("dfc")
    with pytest.raises(ValueError, match=r"do not match.*d_a=24, d_b=40"):
        model(torch.randn(4, 40), torch.randn(4, 24))


def test_config_round_trips_through_json():
    c = CrosscoderConfig(d_a=8, d_b=12, n_features=64, k=4, architecture="dsf", model_names=("llama", "qwen"))
    assert CrosscoderConfig.from_dict(dataclasses.asdict(c) | {"architecture": "dsf"}) == c
    with pytest.raises(ValueError, match="unknown crosscoder config fields"):
        CrosscoderConfig.from_dict({**c.to_dict(), "bogus": 1})
