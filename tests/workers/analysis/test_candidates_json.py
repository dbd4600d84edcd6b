"""Ranking candidates survive the trip through storage with what the ranking needs to judge them."""

from __future__ import annotations

import json

import torch

from dfc.analysis.features import feature_statistics
from dfc.analysis.ranking import rank_features
from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.metrics import latent_scaling
from workers.analysis.data import candidates_from_json, candidates_to_json


def test_cross_space_marks_survive_storage_so_the_stored_ranking_uses_the_same_thresholds() -> None:
    config = CrosscoderConfig(d_a=12, d_b=20, n_features=40, k=6, architecture="dfc", a_only=0.1, b_only=0.1)
    model = Crosscoder(config)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 12, generator=gen), torch.randn(64, 20, generator=gen)) for _ in range(4)]
    feats = [*config.b_only_features, *config.shared[:3]]
    stats = feature_statistics(model, batches, feats)
    ls = latent_scaling(model, batches, feats)
    stored = json.loads(json.dumps(candidates_to_json(feats, stats, ls)))
    _, stats2, ls2 = candidates_from_json(stored)
    assert ls2.same_space is not None and ls2.same_space.tolist() == ls.same_space.tolist()
    assert ls2.same_space.tolist() == [f not in set(config.b_only_features) for f in feats]
    before = {r.feature: (r.nu_eps_max, r.nu_r_max) for r in rank_features(feats, stats, latent_scaling=ls).features}
    after = {r.feature: (r.nu_eps_max, r.nu_r_max) for r in rank_features(feats, stats2, latent_scaling=ls2).features}
    assert before == after
