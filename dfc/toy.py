"""The ground-truth toy model of the DFC paper (appendix B.2; SCIENCE.md §7).

Two "models" see the same sparse concepts through different linear maps; a few concepts exist in
only one of them. Because the concepts are known, a crosscoder's exclusive features can be scored
exactly: how many exclusive concepts it recovers (recall) and how many features it wrongly calls
exclusive (false positives).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from dfc.config import Architecture
from dfc.crosscoder import Crosscoder


@dataclass(frozen=True)
class ToyConfig:
    """Parameters of the synthetic two-model world; defaults are a CPU-sized version of the paper's."""

    n_concepts: int = 512
    """Number of ground-truth concepts (paper: 2048)."""
    d_a: int = 64
    """Width of model A (paper: 256)."""
    d_b: int = 64
    """Width of model B; may differ from d_a."""
    exclusive_fraction: float = 0.05
    """Share of concepts that exist in only one model, split evenly between A and B."""
    map_std: float = 0.5
    """Std of the entries of the map A in ``c' = A c + b`` (paper: N(0, 0.25), read as a variance)."""
    offset_std: float = 0.1
    """Std of the offset b in ``c' = A c + b``."""
    corr_rank: int = 10
    """Rank of the low-rank part of the logit covariance ``L Lᵀ + I``."""
    corr_scale: float = 0.5
    """Entries of L are N(0, (corr_scale/√rank)²)."""
    rank_decay: float = 0.001
    """Activation probability is multiplied by ``exp(−rank_decay · rank)``."""
    k_target: float = 5.0
    """Expected number of active concepts per sample."""
    p_floor: float = 1e-4
    """Smallest activation probability."""
    noise_std: float = 0.01
    """Gaussian noise added to every sample."""
    seed: int = 0
    """Seed of the world (concepts, maps, exclusivity); sampling uses its own generator."""


class ToySample(NamedTuple):
    """A paired batch with the ground-truth concept coefficients that produced it."""

    x_a: Tensor
    x_b: Tensor
    coefficients: Tensor
    """``z_i · s_i`` per sample and concept (zero where the concept is inactive)."""


class ToyWorld:
    """Concept vectors of both models plus a sampler of paired activations."""

    def __init__(self, config: ToyConfig) -> None:
        self.config = c = config
        # Offset so the world never shares a random stream with a crosscoder initialised from the same seed.
        g = torch.Generator().manual_seed(1_000_003 * (c.seed + 1))
        self.concepts_a = _unit(torch.randn(c.n_concepts, c.d_a, generator=g))
        linear = torch.randn(c.d_b, c.d_a, generator=g) * c.map_std
        offset = torch.randn(c.d_b, generator=g) * c.offset_std
        mapped = self.concepts_a @ linear.T + offset
        # Rescaled to the original median norm (1, as the originals are unit vectors).
        self.concepts_b = mapped / mapped.norm(dim=1).median()
        n_excl = round(c.n_concepts * c.exclusive_fraction / 2)
        perm = torch.randperm(c.n_concepts, generator=g)
        self.a_only = perm[:n_excl].sort().values
        self.b_only = perm[n_excl : 2 * n_excl].sort().values
        shared = torch.ones(c.n_concepts, dtype=torch.bool)
        shared[self.a_only] = False
        shared[self.b_only] = False
        self.shared = shared.nonzero().squeeze(1)
        self.in_a = torch.ones(c.n_concepts)
        self.in_a[self.b_only] = 0
        self.in_b = torch.ones(c.n_concepts)
        self.in_b[self.a_only] = 0
        self.low_rank = torch.randn(c.n_concepts, c.corr_rank, generator=g) * (c.corr_scale / math.sqrt(c.corr_rank))
        self.decay = torch.exp(-c.rank_decay * torch.arange(c.n_concepts, dtype=torch.float32))
        self.prob_scale = self._calibrate(g)

    def _probabilities(self, batch: int, g: torch.Generator) -> Tensor:
        logits = torch.randn(batch, self.config.corr_rank, generator=g) @ self.low_rank.T
        logits += torch.randn(batch, self.config.n_concepts, generator=g)
        return torch.sigmoid(logits) * self.decay

    def _calibrate(self, g: torch.Generator) -> float:
        """Scale making the expected number of active concepts ``k_target``."""
        mean_active = float(self._probabilities(4096, g).sum(1).mean())
        return self.config.k_target / mean_active

    def sample_with_coefficients(self, batch: int, g: torch.Generator) -> ToySample:
        """``x = Σ z_i s_i c_i + noise`` for both models with the same ``z`` and ``s``."""
        c = self.config
        p = (self._probabilities(batch, g) * self.prob_scale).clamp(c.p_floor, 1.0)
        z = torch.bernoulli(p, generator=g)
        coeff = z * torch.rand(batch, c.n_concepts, generator=g)
        x_a = (coeff * self.in_a) @ self.concepts_a + torch.randn(batch, c.d_a, generator=g) * c.noise_std
        x_b = (coeff * self.in_b) @ self.concepts_b + torch.randn(batch, c.d_b, generator=g) * c.noise_std
        return ToySample(x_a, x_b, coeff)

    def sample(self, batch: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """A paired batch ``(x_a, x_b)``."""
        s = self.sample_with_coefficients(batch, g)
        return s.x_a, s.x_b

    def batches(self, batch_size: int, n_batches: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """A reproducible stream of paired batches."""
        g = torch.Generator().manual_seed(seed)
        for _ in range(n_batches):
            yield self.sample(batch_size, g)


class ToyScore(NamedTuple):
    """How well a crosscoder recovered the toy world's concepts."""

    exclusive_recall: float
    """Exclusive concepts recovered by a feature labelled exclusive to the right model / all exclusive."""
    shared_recall: float
    """Shared concepts recovered in both models by one feature."""
    fp_shared: int
    """Features labelled exclusive whose decoder matches a shared concept."""
    fp_none: int
    """Features labelled exclusive whose decoder matches no concept."""
    n_labelled: int
    """Features labelled exclusive (either model)."""

    @property
    def fp_rate(self) -> float:
        """False positives of both kinds per labelled-exclusive feature."""
        return (self.fp_shared + self.fp_none) / max(self.n_labelled, 1)


def exclusive_labels(model: Crosscoder, threshold: float = 0.8) -> tuple[Tensor, Tensor]:
    """Boolean masks of features labelled A-exclusive and B-exclusive.

    DFC: by partition. Standard and DSF: by relative decoder norm (> ``threshold`` → A,
    < ``1 − threshold`` → B); DSF's designated features are never labelled exclusive.
    """
    c = model.config
    label_a = torch.zeros(c.n_features, dtype=torch.bool)
    label_b = torch.zeros(c.n_features, dtype=torch.bool)
    if c.architecture is Architecture.DFC:
        label_a[c.a_only_features.start : c.a_only_features.stop] = True
        label_b[c.b_only_features.start : c.b_only_features.stop] = True
        return label_a, label_b
    rel = model.decoder_norms().relative
    label_a = rel > threshold
    label_b = rel < 1 - threshold
    if c.n_designated:
        label_a[c.shared.start : c.shared.start + c.n_designated] = False
        label_b[c.shared.start : c.shared.start + c.n_designated] = False
    return label_a, label_b


def score(model: Crosscoder, world: ToyWorld, cosine: float = 0.83) -> ToyScore:
    """Match decoders to concepts by cosine similarity (> ``cosine`` = recovered)."""
    c = model.config
    dec_a = torch.zeros(c.n_features, c.d_a)
    dec_b = torch.zeros(c.n_features, c.d_b)
    with torch.no_grad():
        dec_a[: len(c.features_a)] = model.w_dec_a.float()
        dec_b[model.b_offset :] = model.decoder_b().float()
    # Decoders live on the normalised scale; a uniform per-model scale does not change cosines.
    cos_a = _unit(dec_a) @ world.concepts_a.T  # (F, concepts)
    cos_b = _unit(dec_b) @ _unit(world.concepts_b).T
    match_a, match_b = cos_a > cosine, cos_b > cosine
    label_a, label_b = exclusive_labels(model)
    recovered_a = match_a[label_a][:, world.a_only].any(0)
    recovered_b = match_b[label_b][:, world.b_only].any(0)
    n_excl = len(world.a_only) + len(world.b_only)
    recall = (int(recovered_a.sum()) + int(recovered_b.sum())) / max(n_excl, 1)
    shared_recovered = (match_a[:, world.shared] & match_b[:, world.shared]).any(0)
    fp_shared = int(match_a[label_a][:, world.shared].any(1).sum() + match_b[label_b][:, world.shared].any(1).sum())
    fp_none = int((~match_a[label_a].any(1)).sum() + (~match_b[label_b].any(1)).sum())
    return ToyScore(
        exclusive_recall=recall,
        shared_recall=float(shared_recovered.float().mean()),
        fp_shared=fp_shared,
        fp_none=fp_none,
        n_labelled=int(label_a.sum() + label_b.sum()),
    )


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
