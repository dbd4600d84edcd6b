"""Specification of the ground-truth toy world and its scoring."""

import pytest
import torch

from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.toy import ToyConfig, ToyWorld, exclusive_labels, score

SMALL = ToyConfig(n_concepts=128, d_a=32, d_b=48, seed=3)


def test_exclusive_concepts_contribute_only_to_their_own_model():
    world = ToyWorld(SMALL)
    s = world.sample_with_coefficients(512, torch.Generator().manual_seed(0))
    only_a = s.coefficients.clone()
    only_a[:, world.b_only] = 0
    noise = 5 * SMALL.noise_std
    assert torch.allclose(s.x_a, only_a @ world.concepts_a, atol=noise)
    only_b = s.coefficients.clone()
    only_b[:, world.a_only] = 0
    assert torch.allclose(s.x_b, only_b @ world.concepts_b, atol=noise)
    assert s.coefficients[:, world.b_only].abs().sum() > 0  # B-only concepts do fire, just not in A


def test_world_matches_the_configured_statistics():
    world = ToyWorld(SMALL)
    s = world.sample_with_coefficients(8192, torch.Generator().manual_seed(1))
    assert (s.coefficients > 0).float().sum(1).mean() == pytest.approx(SMALL.k_target, rel=0.1)
    assert len(world.a_only) == len(world.b_only) == round(128 * 0.05 / 2)
    assert torch.allclose(world.concepts_a.norm(dim=1), torch.ones(128))
    assert float(world.concepts_b.norm(dim=1).median()) == pytest.approx(1.0, rel=1e-5)
    assert world.concepts_b.shape == (128, 48)


def _planted_dfc(world: ToyWorld, exact: bool) -> Crosscoder:
    """A DFC whose exclusive partitions hold the exclusive concepts (``exact``) or random directions."""
    n = len(world.a_only)
    model = Crosscoder(CrosscoderConfig(d_a=32, d_b=48, n_features=64, k=4, a_only=n, b_only=n))
    c = model.config
    with torch.no_grad():
        if exact:
            model.w_dec_a[: c.n_a_only] = world.concepts_a[world.a_only]
            model.w_dec_b[-c.n_b_only :] = world.concepts_b[world.b_only] * 3.0  # scale does not matter
        shared = world.shared[: c.n_shared]
        model.w_dec_a[c.n_a_only :] = world.concepts_a[shared]
        model.w_dec_b[: c.n_shared] = world.concepts_b[shared]
    return model


def test_score_counts_recovered_exclusive_and_shared_concepts():
    world = ToyWorld(SMALL)
    result = score(_planted_dfc(world, exact=True), world)
    assert result.exclusive_recall == 1.0
    assert result.fp_shared == result.fp_none == 0
    assert result.shared_recall == pytest.approx((64 - 2 * len(world.a_only)) / len(world.shared))


def test_random_exclusive_features_are_false_positives_of_the_no_concept_kind():
    world = ToyWorld(SMALL)
    result = score(_planted_dfc(world, exact=False), world)
    assert result.exclusive_recall == 0.0
    assert result.fp_none == result.n_labelled == 2 * len(world.a_only)
    assert result.fp_rate == 1.0


def test_standard_crosscoder_labels_by_relative_decoder_norm():
    model = Crosscoder(CrosscoderConfig(d_a=8, d_b=8, n_features=16, k=2, architecture="standard"))
    with torch.no_grad():
        model.w_dec_b[0] = 0.0  # feature 0 decodes only into A
        model.w_dec_a[1] *= 0.1  # feature 1 is mostly B
    label_a, label_b = exclusive_labels(model)
    assert label_a.nonzero().squeeze(1).tolist() == [0]
    assert label_b.nonzero().squeeze(1).tolist() == [1]


def _train_and_score(arch: str, world: ToyWorld, size: int, steps: int) -> float:
    from dfc.trainer import TrainConfig, train

    c = world.config
    model = Crosscoder(CrosscoderConfig(d_a=c.d_a, d_b=c.d_b, n_features=size, k=5, architecture=arch))
    config = TrainConfig(steps=steps, lr=3e-3, dead_after_tokens=20_000, aux_k=5, aux_alpha=0.5, log_every=0)
    train(model, world.batches(512, steps, seed=1), config)
    return score(model, world).exclusive_recall


def test_dfc_recovers_more_exclusive_concepts_than_a_standard_crosscoder_at_a_small_dictionary():
    # A ~30-second miniature of benchmarks/toy.py (same world and recipe): dictionary = ¼ of the concepts.
    world = ToyWorld(ToyConfig(n_concepts=512, d_a=64, d_b=64, rank_decay=0.001 * 2048 / 512, seed=0))
    dfc = _train_and_score("dfc", world, size=128, steps=1000)
    standard = _train_and_score("standard", world, size=128, steps=1000)
    assert dfc >= standard + 0.1, (dfc, standard)
