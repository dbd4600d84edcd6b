"""Specification of the trainer: schedules, normalisation, AuxK, checkpoint/resume, determinism, bad input."""

import math

import pytest
import torch

from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.trainer import TrainConfig, Trainer, geometric_median, train

D_A, D_B = 16, 24


def paired_batches(n: int, batch: int = 256, seed: int = 1):
    """Two 'models' that see the same sparse latent through different random maps."""
    g = torch.Generator().manual_seed(seed)
    map_a = torch.randn(60, D_A, generator=torch.Generator().manual_seed(0)) * 3
    map_b = torch.randn(60, D_B, generator=torch.Generator().manual_seed(1))
    for _ in range(n):
        z = (torch.rand(batch, 60, generator=g) < 0.06).float() * torch.rand(batch, 60, generator=g)
        yield z @ map_a + 5.0, z @ map_b


def model(arch: str = "dfc", **kw) -> Crosscoder:
    return Crosscoder(CrosscoderConfig(d_a=D_A, d_b=D_B, n_features=128, k=6, architecture=arch, **kw))


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 40, "lr": 3e-3, "dead_after_tokens": 2000, "log_every": 0, **kw})


@pytest.mark.parametrize("arch", ["standard", "dsf", "dfc"])
def test_training_learns_to_reconstruct_both_models(arch):
    result = train(model(arch), paired_batches(150), config(steps=150))
    first, last = result.history[0], result.history[-1]
    assert last.fvu_a < 0.5 * first.fvu_a and last.fvu_b < 0.5 * first.fvu_b
    assert last.l0 == pytest.approx(6, abs=0.01)
    assert result.steps == 150 and result.tokens == sum(m.tokens for m in result.history)


def test_normalisation_sets_each_models_median_norm_to_sqrt_mean_width():
    m = model()
    x_a, x_b = next(paired_batches(1, batch=2048))
    Trainer(m, config()).initialise(x_a, x_b)
    target = math.sqrt((D_A + D_B) / 2)
    n_a, n_b = m.normalize(x_a, x_b)
    assert float(n_a.norm(dim=1).median()) == pytest.approx(target, rel=1e-3)
    assert float(n_b.norm(dim=1).median()) == pytest.approx(target, rel=1e-3)
    # The scale is stored with the model so raw-scale directions can be recovered.
    d_a_raw, _ = m.decoder_directions(0, raw_scale=True)
    d_a_norm, _ = m.decoder_directions(0, raw_scale=False)
    torch.testing.assert_close(d_a_raw * m.scale_a, d_a_norm)


def test_outlier_tokens_are_dropped_from_the_loss():
    m = model()
    x_a, x_b = next(paired_batches(1))
    x_a[3] *= 50.0  # one token with a 50× norm (Qwen-like first-token outlier)
    trainer = Trainer(m, config())
    metrics = trainer.step(x_a, x_b)
    assert metrics.tokens == x_a.shape[0] - 1


def test_decoder_bias_starts_at_the_geometric_median_of_the_first_batch():
    m = model()
    x_a, x_b = next(paired_batches(1))
    trainer = Trainer(m, config())
    trainer.initialise(x_a, x_b)
    n_a, _ = trainer._normalised_inliers(x_a, x_b)
    torch.testing.assert_close(m.b_dec_a.detach(), geometric_median(n_a), atol=1e-4, rtol=1e-4)
    assert m.decoder_norms().a[:10].sub(0.4).abs().max() < 1e-5


def test_geometric_median_ignores_outliers_that_move_the_mean():
    points = torch.cat([torch.randn(99, 3) * 0.01, torch.tensor([[1000.0, 1000.0, 1000.0]])])
    assert geometric_median(points).norm() < 0.1
    assert points.mean(0).norm() > 10


def test_schedules_warm_up_anneal_k_and_decay():
    trainer = Trainer(model(), TrainConfig(steps=100, lr=1e-3, warmup_steps=10, k_anneal_from=30, k_anneal_steps=20))
    assert trainer.lr_at(0) == pytest.approx(1e-4)
    assert trainer.lr_at(50) == pytest.approx(1e-3)
    assert trainer.lr_at(90) == pytest.approx(0.5e-3)
    assert trainer.k_at(0) == 30 and trainer.k_at(10) == 18 and trainer.k_at(20) == 6 and trainer.k_at(99) == 6


def test_auxk_gives_dead_features_gradient():
    m = model()
    trainer = Trainer(m, config(dead_after_tokens=1))
    x_a, x_b = next(paired_batches(1))
    trainer.step(x_a, x_b)  # every feature that did not fire is now dead
    dead = trainer.tokens_since_fired >= 1
    assert dead.any()
    metrics = trainer.step(*next(paired_batches(1, seed=5)))
    assert metrics.aux_loss > 0
    assert metrics.dead_fraction == pytest.approx(float(dead.float().mean()))


def test_inference_thresholds_are_learned_and_give_about_k_active_features():
    m = model()
    train(m, paired_batches(200), config(steps=200, threshold_start_step=50, threshold_beta=0.9))
    assert float(m.thresholds[0]) > 0
    x_a, x_b = m.normalize(*next(paired_batches(1, batch=2048, seed=9)))
    features = m.encode(x_a, x_b, use_thresholds=True)
    assert 3 <= features.l0 <= 12


def test_resumed_run_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    full = train(model(), paired_batches(30), config(steps=30)).model
    ckpt = tmp_path / "ckpt"
    first = train(model(), paired_batches(12), config(steps=30), checkpoint_dir=ckpt)
    assert first.steps == 12  # the data ran out: a crash stand-in, with the checkpoint at step 12
    resumed = train(model(), paired_batches(30), config(steps=30), checkpoint_dir=ckpt)
    assert resumed.steps == 30
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_same_seed_same_weights_different_seed_different_weights():
    a = train(model(), paired_batches(10), config(steps=10, seed=3)).model
    b = train(model(), paired_batches(10), config(steps=10, seed=3)).model
    c = train(model(), paired_batches(10), config(steps=10, seed=4)).model
    assert torch.equal(a.w_enc_a, b.w_enc_a)
    assert not torch.equal(a.w_enc_a, c.w_enc_a)


def test_empty_iterator_is_a_clear_error():
    with pytest.raises(ValueError, match="yielded no batches"):
        train(model(), iter([]), config())


def test_non_finite_activations_are_rejected_before_the_step():
    m = model()
    x_a, x_b = next(paired_batches(1))
    x_b[7, 2] = float("nan")
    before = m.w_enc_b.detach().clone()
    with pytest.raises(ValueError, match=r"batch 0: model B activations contain non-finite values in 1 token"):
        train(m, iter([(x_a, x_b)]), config())
    assert torch.equal(before, m.w_enc_b.detach())


@pytest.mark.parametrize(
    "batch,match",
    [
        (
            (torch.randn(8, D_B), torch.randn(8, D_B)),
            r"model A activations have shape \(8, 24\), expected \(tokens, 16\)",
        ),
        ((torch.randn(8, D_A), torch.randn(9, D_B)), "8 tokens for A but 9 for B"),
    ],
)
def test_malformed_batches_are_rejected_with_shapes_named(batch, match):
    with pytest.raises(ValueError, match=match):
        train(model(), iter([batch]), config())


def test_resume_refuses_a_checkpoint_of_another_architecture(tmp_path):
    train(model("dfc"), paired_batches(3), config(steps=3), checkpoint_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="different crosscoder config"):
        train(model("standard"), paired_batches(3), config(steps=3), checkpoint_dir=tmp_path / "c")
