"""Ranking exclusive features for an auditor: strong, common, truly exclusive, and causally effective first.

A diff surfaces many exclusive features, few of which matter (SCIENCE.md §10). The score is a weighted sum
of components that each lie in [0, 1], minus a penalty for failing Latent Scaling, so every feature's
place can be explained by its components. Failing features are marked and pushed down, never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from dfc.analysis.features import FeatureStats
from dfc.metrics import LatentScaling


@dataclass(frozen=True)
class RankingWeights:
    """How much each piece of evidence counts; a weight of 0 switches a component off."""

    strength: float = 1.0
    """Weight of activation strength, normalised by the strongest candidate."""
    strength_statistic: Literal["max", "mean"] = "max"
    """Which activation statistic measures strength."""
    frequency: float = 0.5
    """Weight of log-frequency, mapped so ``frequency_floor`` → 0 and 1 (fires on every token) → 1."""
    frequency_floor: float = 1e-6
    """Frequencies below this count as this; a feature that fired even once on 1M tokens still scores > 0."""
    steering: float = 1.0
    """Weight of the measured steering effect, normalised by the largest one; unmeasured features get 0."""
    divergence: float = 2.0
    """Weight of the behavioural divergence from the other model (``dfc.behaviour.divergence``: how much the feature
    moves its model toward text the other would not write), normalised by the largest; negative or unmeasured → 0.
    The heaviest weight: it is what separates a new behaviour from a new encoding of a shared one."""
    stability: float = 1.0
    """Weight of a finding's stability across crosscoder seeds (``dfc.analysis.stability``: the share of seeds whose
    dictionary has it); features of a one-seed audit have none and get 0."""
    latent_scaling_penalty: float = 1.0
    """Subtracted from the score of a feature that fails the "truly exclusive" Latent Scaling test."""
    nu_eps_max: float = 0.2
    """Latent Scaling ``ν_ε`` must be below this to pass (Minder et al.; SCIENCE.md §6), where the other model
    has a decoder for the feature (the paper's same-space projection)."""
    nu_r_max: float = 0.5
    """Latent Scaling ``ν_r`` must be below this to pass, where the other model has a decoder for the feature."""
    nu_eps_max_cross: float = 1.0
    """``ν_ε`` threshold for a feature the other model has no decoder for (a DFC's exclusive features): there
    ``β`` is a centred regression slope of the other model's error on the feature, which also picks up the
    context the feature fires in, so it reads higher than the projection. Below 1: the other model's
    unexplained residual moves with the feature less than the owner's does (see README, Latent Scaling)."""
    nu_r_max_cross: float | None = None
    """``ν_r`` threshold for such a feature; None: not tested (its denominator vanishes for a cleanly
    exclusive feature, so large values mean nothing there)."""

    def thresholds(self, same_space: bool) -> tuple[float, float | None]:
        """The ``(ν_ε, ν_r)`` thresholds for a feature; a None threshold is not tested."""
        return (self.nu_eps_max, self.nu_r_max) if same_space else (self.nu_eps_max_cross, self.nu_r_max_cross)


@dataclass(frozen=True)
class RankedFeature:
    """One feature's place in the ranking and why."""

    feature: int
    rank: int
    """1 = most worth an auditor's attention."""
    score: float
    strength: float
    frequency: float
    steering: float | None
    """None when not measured."""
    divergence: float | None
    """Normalised divergence component (None when not measured)."""
    divergence_nats: float | None
    """The raw divergence in nats per context (None when not measured)."""
    passes_latent_scaling: bool | None
    """None when Latent Scaling was not computed for it."""
    nu_eps: float | None
    nu_r: float | None
    nu_eps_max: float | None = None
    """The ``ν_ε`` threshold this feature was held to (None: Latent Scaling not computed)."""
    nu_r_max: float | None = None
    """The ``ν_r`` threshold it was held to (None: not tested, or not computed)."""
    stability: float | None = None
    """Share of the ensemble's seeds that have this feature (None: one seed, not measured)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FeatureRanking:
    """Features in score order, with the weights that produced it."""

    features: list[RankedFeature]
    weights: RankingWeights

    def rank_of(self, feature: int) -> int:
        """1-based rank of a feature."""
        for entry in self.features:
            if entry.feature == feature:
                return entry.rank
        raise KeyError(f"feature {feature} was not ranked")

    def top(self, n: int) -> list[int]:
        """The ``n`` best features."""
        return [entry.feature for entry in self.features[:n]]

    def to_dict(self) -> dict[str, Any]:
        return {"weights": asdict(self.weights), "features": [f.to_dict() for f in self.features]}


def _lookup(values: Mapping[int, float] | None, feature: int) -> float | None:
    if values is None or feature not in values:
        return None
    value = float(values[feature])
    return value if math.isfinite(value) else None


def _latent_scaling_table(
    ls: LatentScaling | None,
) -> tuple[dict[int, float], dict[int, float], dict[int, bool]] | None:
    if ls is None:
        return None
    feats = ls.features.tolist()
    same = ls.same_space.tolist() if ls.same_space is not None else [True] * len(feats)
    return (
        dict(zip(feats, ls.nu_eps.tolist(), strict=True)),
        dict(zip(feats, ls.nu_r.tolist(), strict=True)),
        dict(zip(feats, same, strict=True)),
    )


def rank_features(
    features: Sequence[int] | Tensor,
    stats: FeatureStats,
    *,
    latent_scaling: LatentScaling | None = None,
    steering_effect: Mapping[int, float] | None = None,
    divergence: Mapping[int, float] | None = None,
    stability: Mapping[int, float] | None = None,
    weights: RankingWeights = RankingWeights(),
) -> FeatureRanking:
    """Score and sort ``features``; each result carries its score and every component.

    ``score = w_s·strength + w_f·frequency + w_st·steering + w_d·divergence + w_sb·stability
    − w_ls·[fails Latent Scaling]``,
    where strength is the max (or mean) activation over the strongest candidate's, frequency is log-scaled
    between ``frequency_floor`` and 1, steering is a magnitude (e.g. next-token KL when removed) over the
    largest one measured, and divergence (``dfc.behaviour.divergence``, nats) is its positive part over the largest.
    Stability (a share of seeds, already in [0, 1]) counts only for features given one.
    Latent Scaling passes when ``ν_ε`` and ``ν_r`` are below the thresholds ``RankingWeights.thresholds`` gives
    the feature (same-space or cross-space); a feature with no ``ν_ε`` (or a non-finite one) is neither
    penalised nor passed. Features that never fired come last whatever their score: there is nothing to show an
    auditor.
    """
    feats = [int(f) for f in torch.as_tensor(features, dtype=torch.long).reshape(-1).tolist()]
    rows = [stats.index(f) for f in feats]
    raw_strength = (stats.max if weights.strength_statistic == "max" else stats.mean)[rows].double()
    strength = raw_strength / raw_strength.max().clamp_min(1e-12) if rows else raw_strength
    floor = weights.frequency_floor
    freq = stats.frequency[rows].clamp(min=floor, max=1.0)
    frequency = (freq.log() - math.log(floor)) / -math.log(floor)
    frequency[stats.count[rows] == 0] = 0.0  # a feature that never fired has no frequency to speak of
    measured = {f: v for f in feats if (v := _lookup(steering_effect, f)) is not None}
    largest = max((abs(v) for v in measured.values()), default=0.0)
    diverging = {f: v for f in feats if (v := _lookup(divergence, f)) is not None}
    most = max((max(v, 0.0) for v in diverging.values()), default=0.0)
    table = _latent_scaling_table(latent_scaling)
    scored: list[tuple[float, int, dict[str, Any]]] = []
    for i, f in enumerate(feats):
        steer = abs(measured[f]) / largest if f in measured and largest > 0 else (0.0 if f in measured else None)
        div = (max(diverging[f], 0.0) / most if most > 0 else 0.0) if f in diverging else None
        fired = int(stats.count[rows[i]]) > 0
        # Latent Scaling of a feature that never fired is 0/0, not evidence of exclusivity.
        nu_eps = _lookup(table[0], f) if table and fired else None
        nu_r = _lookup(table[1], f) if table and fired else None
        eps_max, r_max = weights.thresholds(table[2].get(f, True)) if table else (None, None)
        passes = (
            None
            if nu_eps is None or eps_max is None
            else nu_eps < eps_max and (r_max is None or (nu_r is not None and nu_r < r_max))
        )
        score = (
            weights.strength * float(strength[i])
            + weights.frequency * float(frequency[i])
            + weights.steering * (steer or 0.0)
            + weights.divergence * (div or 0.0)
            + weights.stability * (_lookup(stability, f) or 0.0)
            - weights.latent_scaling_penalty * (passes is False)
        )
        parts = {
            "strength": float(strength[i]), "frequency": float(frequency[i]), "steering": steer,
            "divergence": div, "divergence_nats": diverging.get(f),
            "passes_latent_scaling": passes, "nu_eps": nu_eps, "nu_r": nu_r,
            "nu_eps_max": eps_max if nu_eps is not None else None, "nu_r_max": r_max if nu_eps is not None else None,
            "stability": _lookup(stability, f),
        }  # fmt: skip
        scored.append((not fired, -score, f, parts))
    scored.sort(key=lambda item: item[:3])  # ties by feature index keep the order deterministic
    ranked = [RankedFeature(feature=f, rank=r + 1, score=-s, **parts) for r, (_, s, f, parts) in enumerate(scored)]
    return FeatureRanking(ranked, weights)


def rank_by_relative_norm(relative_norm: Tensor, *, toward: Literal["a", "b"] = "b") -> Tensor:
    """Features ordered the standard-crosscoder way: most B-exclusive (lowest ``R``) first, or most A-exclusive."""
    return torch.argsort(relative_norm, descending=toward == "a", stable=True)
