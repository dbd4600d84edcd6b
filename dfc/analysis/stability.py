"""Seed stability: how many independently trained crosscoders (runs) hold the same feature.

Dictionary features are only partly reproducible across training seeds (SCIENCE.md §11), so a finding seen
in one run may be an accident of that run's initialisation. Matching features across runs one-to-one by
decoder cosine (Hungarian matching) and counting how many runs hold each one is the standard stability
measure; a chance floor from random directions keeps the matching threshold meaningful at any width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from dfc.crosscoder import Crosscoder

Side = Literal["a", "b", "both"]


def _unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit norm; a dead (all-zero) row stays zero instead of becoming NaN."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def decoder_matrix(cc: Crosscoder, features: Sequence[int], side: Side) -> Tensor:
    """Unit decoder directions ``[len(features), dim]`` of global ``features`` for A's decoder, B's, or both.

    ``"both"`` (for shared features) concatenates the unit A and unit B directions and normalises the result,
    so each model weighs equally whatever the two decoders' scales.
    """
    c = cc.config
    if side not in ("a", "b", "both"):
        raise ValueError(f"side must be 'a', 'b' or 'both', got {side!r}")
    needs_a, needs_b = side in ("a", "both"), side in ("b", "both")
    for feature in features:
        if (needs_a and feature not in c.features_a) or (needs_b and feature not in c.features_b):
            raise ValueError(
                f"feature {feature} has no decoder for side {side!r}: model A decodes {c.features_a}, "
                f"model B decodes {c.features_b}; use side 'both' only for shared features"
            )
    index = torch.as_tensor(list(features), dtype=torch.long, device=cc.w_dec_a.device)
    parts = []
    if needs_a:
        parts.append(_unit_rows(cc.w_dec_a.detach().float()[index]))
    if needs_b:
        parts.append(_unit_rows(cc.decoder_b().detach().float()[index - cc.b_offset]))
    return _unit_rows(torch.cat(parts, dim=1))


class RunMatch(NamedTuple):
    """A one-to-one matching of two runs' decoder rows: matched row positions and their cosines."""

    ref_index: Tensor
    """Row positions in the reference run (ascending)."""
    other_index: Tensor
    """Row position in the other run matched to each ``ref_index``."""
    cosine: Tensor
    """Decoder cosine of each matched pair."""


def match_runs(ref: Tensor, other: Tensor) -> RunMatch:
    """Hungarian matching of ``ref``'s rows to ``other``'s maximising total decoder cosine.

    With unequal row counts every row of the smaller side is matched and the rest of the larger side is not.
    """
    if ref.shape[-1] != other.shape[-1]:
        raise ValueError(
            f"cannot match decoders of different widths ({ref.shape[-1]} vs {other.shape[-1]}); "
            "compare the same side of the same partition across runs"
        )
    cosines = _unit_rows(ref.detach().float()) @ _unit_rows(other.detach().float().to(ref.device)).T
    if cosines.numel() == 0:
        empty = torch.empty(0, dtype=torch.long)
        return RunMatch(empty, empty.clone(), torch.empty(0))
    rows, cols = linear_sum_assignment(cosines.cpu().double().numpy(), maximize=True)
    ref_index, other_index = torch.from_numpy(rows).long(), torch.from_numpy(cols).long()
    return RunMatch(ref_index, other_index, cosines.cpu()[ref_index, other_index])


class SeedMember(NamedTuple):
    """One run's copy of a clustered feature and its decoder cosine to the cluster's representative."""

    run: int
    feature: int
    cosine: float


@dataclass(frozen=True)
class FeatureCluster:
    """A finding and its matched copies in the other runs."""

    representative: tuple[int, int]
    """``(run, feature)`` of the highest-priority candidate that opened the cluster."""
    members: dict[int, SeedMember]
    """Each run's copy of the feature, keyed by run; the representative's own run is included (cosine 1)."""
    n_runs: int
    """How many runs were compared."""

    @property
    def stability(self) -> float:
        """Fraction of runs that hold the feature: 1.0 in every run, ``1 / n_runs`` in one seed only."""
        return len(self.members) / self.n_runs


def cluster_findings(
    decoders: Sequence[Tensor],
    features: Sequence[Sequence[int]],
    candidates: Sequence[tuple[int, int]],
    threshold: float,
) -> list[FeatureCluster]:
    """Group priority-ordered ``(run, feature)`` candidates across runs; one cluster per distinct finding.

    ``decoders[r]`` holds run r's unit decoder rows of one partition in the order of the global indices
    ``features[r]``. Each unclaimed candidate opens a cluster and pulls in its Hungarian partner from every
    other run whose cosine reaches ``threshold`` and that no earlier cluster has claimed; a claimed candidate
    is skipped. Partners are matched to the representative, not transitively through other members, so every
    member's cosine is to one direction and a cluster cannot drift along a chain of near-matches.
    Candidates that match nothing are still returned, with stability ``1 / n_runs``.
    """
    n_runs = len(decoders)
    if len(features) != n_runs:
        raise ValueError(f"got {n_runs} decoder matrices but {len(features)} feature lists; give one per run")
    for run, (decoder, feats) in enumerate(zip(decoders, features, strict=True)):
        if decoder.shape[0] != len(feats):
            raise ValueError(
                f"run {run}: decoder has {decoder.shape[0]} rows but {len(feats)} feature indices; "
                "row i must be the decoder of features[run][i]"
            )
    position = [{int(f): i for i, f in enumerate(feats)} for feats in features]

    # partner[r][s][i] = (row in run s matched to row i of run r, cosine); each unordered pair matched once.
    partner: list[list[dict[int, tuple[int, float]]]] = [[{} for _ in range(n_runs)] for _ in range(n_runs)]
    for r in range(n_runs):
        for s in range(r + 1, n_runs):
            match = match_runs(decoders[r], decoders[s])
            pairs = zip(match.ref_index.tolist(), match.other_index.tolist(), match.cosine.tolist(), strict=True)
            for i, j, cos in pairs:
                partner[r][s][i] = (j, cos)
                partner[s][r][j] = (i, cos)

    claimed: set[tuple[int, int]] = set()
    clusters = []
    for run, feature in candidates:
        if not 0 <= run < n_runs or feature not in position[run]:
            raise ValueError(
                f"candidate (run {run}, feature {feature}) is not in that run's partition; "
                f"candidates must come from the {n_runs} runs' feature lists"
            )
        row = position[run][feature]
        if (run, row) in claimed:
            continue
        claimed.add((run, row))
        members = {run: SeedMember(run, int(feature), 1.0)}
        for other in range(n_runs):
            if other == run or row not in partner[run][other]:
                continue
            other_row, cos = partner[run][other][row]
            if cos >= threshold and (other, other_row) not in claimed:
                claimed.add((other, other_row))
                members[other] = SeedMember(other, int(features[other][other_row]), cos)
        clusters.append(FeatureCluster((run, int(feature)), dict(sorted(members.items())), n_runs))
    return clusters


def null_match_cosines(
    decoder: Tensor, n_random: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Hungarian-matched cosines between ``decoder``'s rows and random Gaussian unit directions of its width.

    This is what a match scores by chance at this width and row count (default: as many directions as rows).
    """
    n = decoder.shape[0] if n_random is None else n_random
    device = generator.device if generator is not None else decoder.device
    random = torch.randn(n, decoder.shape[-1], generator=generator, device=device)
    return match_runs(decoder, random.to(decoder.device)).cosine


def chance_threshold(
    decoders: Sequence[Tensor], percentile: float = 99.0, generator: torch.Generator | None = None
) -> float:
    """The ``percentile`` of chance match cosines pooled over runs: a width-aware floor for the match threshold.

    With no decoder rows at all there is nothing to match and the floor is -1 (the lowest cosine).
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {percentile}")
    pooled = [null_match_cosines(d, generator=generator).double().numpy() for d in decoders if d.shape[0] > 0]
    if not pooled:
        return -1.0
    return float(np.percentile(np.concatenate(pooled), percentile))
