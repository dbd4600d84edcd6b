"""The seed ensemble's findings: each seed's best exclusive features ranked, matched across seeds into clusters
(``dfc.analysis.stability``) and summarised for the report (SCIENCE.md §11). The analyse stage scans each seed's
crosscoder and calls :func:`match_seeds`; which finding of a cluster is reported is decided after screening."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from dfc.analysis.features import FeatureScan
from dfc.analysis.ranking import RankingWeights, rank_features
from dfc.analysis.stability import chance_threshold, cluster_findings, decoder_matrix
from workers.analysis.data import TrainedRun, candidates_from_json, feature_key, merge_candidates, split_key

SIDES = ("a", "b")
"""The two models, as stage files name them."""


class RunScan(NamedTuple):
    """One seed's crosscoder over the analysed pairs: its partitions, statistics, contexts and Latent Scaling."""

    run: TrainedRun
    parts: dict[str, list[int]]
    scan: FeatureScan
    fired: dict[str, list[int]]
    candidates: dict[str, dict[str, Any]]
    """Per side, the fired exclusive features' statistics and Latent Scaling (``candidates_to_json``)."""


class Ensemble(NamedTuple):
    """The seeds' findings of one model in one list, keyed across runs, each with its cluster and stability."""

    keys: list[int]
    """Each seed's ``top_features`` best, the seeds' rankings interleaved."""
    stability: dict[int, float] | None
    """Key → share of seeds that have it (None for one seed)."""
    members: dict[int, list[dict[str, Any]]]
    """Key → the matched feature of every seed that has it: run, seed, feature, cosine."""
    threshold: float | None
    """The cosine a match needed (None for one seed)."""
    chance: float | None
    """The chance level of a match at this width (the floor under the spec's threshold)."""
    cluster: dict[int, int] | None = None
    """Key → its cluster: findings of different seeds matched as one (None for one seed)."""


CHANCE_SEED = 0x5EED
"""Seed of the random directions behind a match's chance level: not a training seed, whose initial decoder
directions these would otherwise repeat (decoders of a short run stay close to their initialisation)."""


def interleaved(orders: list[list[int]]) -> list[int]:
    """Each seed's ranking in turn: the first of every seed, then the second of every seed, …"""
    out = []
    for i in range(max((len(o) for o in orders), default=0)):
        out.extend(o[i] for o in orders if i < len(o))
    return out


def match_seeds(scans: list[RunScan], side: str, weights: RankingWeights, threshold: float, top: int) -> Ensemble:
    """Rank each seed's fired features, take each seed's ``top`` into one list (a seed's best findings are never
    crowded out by another's), and match them across seeds (``dfc.analysis.stability``) into clusters.

    Every seed's top findings stay in the list, each with its cluster: which of a cluster's findings is reported is
    decided once they are screened (the steer stage keeps the best ranked of each), since the one a seed ranks first
    before screening need not be the one that carries the behaviour best."""
    n = scans[0].run.crosscoder.config.n_features
    merged = merge_candidates([([feature_key(s.run.run, f, n) for f in s.fired[side]], s.candidates[side])
                               for s in scans])  # fmt: skip
    _, stats, ls = candidates_from_json(merged)
    orders = []
    for s in scans:
        mine = [feature_key(s.run.run, f, n) for f in s.fired[side]]
        orders.append(rank_features(mine, stats, latent_scaling=ls, weights=weights).top(top) if mine else [])
    order = interleaved(orders)
    seed_of = {s.run.run: s.run.seed for s in scans}
    if len(scans) == 1:
        return Ensemble(order, None, {k: [{"run": 0, "seed": seed_of[0], "feature": k, "cosine": 1.0}] for k in order},
                        None, None)  # fmt: skip
    decoders = [decoder_matrix(s.run.crosscoder, s.parts[side], side) for s in scans]
    chance = chance_threshold(decoders, generator=torch.Generator().manual_seed(CHANCE_SEED))
    needed = max(threshold, chance)
    clusters = cluster_findings(decoders, [s.parts[side] for s in scans], [split_key(k, n) for k in order], needed)
    rows = [{f: i for i, f in enumerate(s.parts[side])} for s in scans]
    listed = set(order)
    stability, members, cluster_of = {}, {}, {}
    for c, cluster in enumerate(clusters):
        for m in cluster.members.values():
            key = feature_key(m.run, m.feature, n)
            if key not in listed:
                continue  # matched, but outside its seed's top: evidence only
            cluster_of[key], stability[key] = c, cluster.stability
            mine = decoders[m.run][rows[m.run][m.feature]]
            members[key] = [{"run": o.run, "seed": seed_of[o.run], "feature": o.feature,
                             "cosine": 1.0 if o.run == m.run else
                             float(mine @ decoders[o.run][rows[o.run][o.feature]])}
                            for o in sorted(cluster.members.values())]  # fmt: skip
    return Ensemble(order, stability, members, needed, chance, cluster_of)


def ensemble_summary(scans: list[RunScan], ensembles: dict[str, Ensemble]) -> dict[str, Any]:
    """How many seeds, and per model how the findings spread over them (for the report)."""
    out: dict[str, Any] = {"runs": len(scans), "seeds": [s.run.seed for s in scans]}
    for side in SIDES:
        e = ensembles[side]
        by_cluster = {e.cluster[k]: v for k, v in (e.stability or {}).items()} if e.cluster else {}
        values = list(by_cluster.values())
        out[side] = {
            "findings": len(values) if values else len(e.keys),  # clusters: findings matched across seeds are one
            "threshold": e.threshold,
            "chance_cosine": e.chance,
            "in_every_seed": sum(v >= 1.0 for v in values) if values else len(e.keys),
            "in_one_seed": sum(v * len(scans) < 1.5 for v in values) if values else 0,
        }
    return out
