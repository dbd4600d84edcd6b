"""The steer stage: what each reported feature makes its model say, whether the other model would say it too,
and steering sweeps of the features that rank first (SCIENCE.md §8, ``dfc/behaviour/divergence.py``).

For every reported feature (the analyse stage's first ranking): promoted tokens through the unembedding and a
*screen*: the feature removed where it fired on its top contexts, the next-token KL that causes and the tokens
it was adding probability to. Those tokens are then scored by the other model, in its own tokenizer, which
gives the feature's behavioural divergence. The ranking with both as components picks the ``steering.top_n``
features that get the full sweeps (additive and gated, a random-direction control, generations).

One model is in memory at a time: each owner screens its features, the other model scores them, and the owners
are loaded once more for the sweeps (four loads for two models; the last owner loaded is reused where it can).
"""

from __future__ import annotations

import gc
import statistics
from typing import Any, NamedTuple

import torch

from dfc.analysis.promoted import direct_logit_attribution
from dfc.analysis.ranking import FeatureRanking, RankingWeights, rank_features
from dfc.behaviour.divergence import RemovalScreen, score_under, screen_removal
from dfc.behaviour.steering import FeatureGate, Steering, greedy_generations, next_token_kl, steering_sweep
from dfc.behaviour.transfer import contrast_vector, transfer_steering_vector
from dfc.crosscoder import Crosscoder
from workers.activations.extract import torch_dtype
from workers.activations.loading import LoadedModel, load_model
from workers.analysis.analyse import (
    COMPARABLE_RANDOM,
    FEATURE_PROMPTS,
    NEUTRAL_PROMPTS,
    PROBE_CONTEXTS,
    PROBE_TOKENS,
    PROMOTED_K,
    PROMPT_TOKENS,
    SIDES,
    dfc_weights,
    ranked_json,
)
from workers.analysis.data import LocatedToken, candidates_from_json, load_revision, load_runs, locate_tokens
from workers.pipeline.context import StageContext
from workers.report.build import first_of_each_cluster

OTHER = {"a": "b", "b": "a"}
DIVERGENCE_TOKENS = 3
"""Tokens per context whose probability a feature raises most that the other model is asked about."""


class LoadedModels:
    """The one model in memory: asking for another releases it first."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx, self.side, self.loaded = ctx, None, None
        self.loads = 0

    def get(self, side: str) -> LoadedModel:
        if side != self.side or self.loaded is None:
            self.loaded = self.side = None
            gc.collect()
            extracted = self.ctx.outputs["extract"][side]
            ref = self.ctx.spec.model_a if side == "a" else self.ctx.spec.model_b
            self.loaded = load_model(
                extracted["model_id"],
                revision=load_revision(extracted),
                dtype=torch_dtype(ref.dtype),
                device_map=ref.device_map if torch.cuda.is_available() else None,
            )  # full depth: steering reads the logits
            self.side, self.loads = side, self.loads + 1
        return self.loaded

    def owners_first(self, sides: list[str], *, other: bool = False) -> list[str]:
        """``sides`` reordered so the one whose model (or, ``other``, whose other model) is loaded comes first."""
        return sorted(sides, key=lambda s: (OTHER[s] if other else s) != self.side)


def _direction(cc: Crosscoder, feature: int, side: str) -> torch.Tensor:
    d_a, d_b = cc.decoder_directions(feature, raw_scale=True)
    direction = d_a if side == "a" else d_b
    assert direction is not None, f"feature {feature} has no decoder for model {side.upper()}"
    return direction.cpu()


def _gate(cc: Crosscoder, feature: int) -> FeatureGate | None:
    c = cc.config
    return FeatureGate.of(cc, feature) if feature in c.a_only_features or feature in c.b_only_features else None


class SteeringPrompts(NamedTuple):
    """What one feature is steered on."""

    feature: list[torch.Tensor]
    """Token ids of its top contexts up to and including the token it fired on (exact, not re-tokenised text)."""
    probes: list[str]
    """The spec's probe prompts and the ends of its first contexts, continued greedily."""
    neutral: list[torch.Tensor]
    """Openings of corpus documents where it does not fire (any openings if it fires in all of them)."""
    neutral_docs: list[int]
    neutral_is_clean: bool


def _key(record: dict[str, Any]) -> int:
    """The record's ensemble key (its feature index in a one-seed audit, or one written before ensembles)."""
    return int(record.get("key", record["feature"]))


def _prompts(ctx: StageContext, tok: Any, side: str, record: dict[str, Any], located: dict[int, LocatedToken],
             pool: list[dict[str, Any]]) -> SteeringPrompts:  # fmt: skip
    f = _key(record)  # the pool's openings list the ensemble keys that fire in them
    feature = []
    for c in record["contexts"][:FEATURE_PROMPTS]:
        loc = located[c["index"]]
        feature.append(torch.tensor(loc.token_ids[max(0, loc.position + 1 - PROMPT_TOKENS) : loc.position + 1]))
    texts = [tok.decode(ids[-PROBE_TOKENS:], skip_special_tokens=True) for ids in feature[:PROBE_CONTEXTS]]
    quiet = [p for p in pool if f not in p["fired"]]
    chosen = (quiet or pool)[:NEUTRAL_PROMPTS]
    neutral = [torch.tensor(located[p[f"index_{side}"]].token_ids[: located[p[f"index_{side}"]].position + 1])
               for p in chosen]  # fmt: skip
    # Repeated documents give repeated contexts; a prompt is continued once, since the report groups by prompt.
    probes = list(dict.fromkeys([*ctx.spec.steering.probe_prompts, *(t for t in texts if t.strip())]))
    return SteeringPrompts(feature, probes, neutral, [p["doc_id"] for p in chosen], bool(quiet))


def _removal(cc: Crosscoder, side: str, record: dict[str, Any], layer: int, gate: FeatureGate | None) -> Steering:
    """The feature taken out: gated where it fires (exact, for a DFC exclusive feature), else −s_max·d everywhere."""
    d = _direction(cc, record["feature"], side)
    return (
        Steering(layer, d, -1.0, 1.0, gate)
        if gate is not None
        else Steering(layer, d, -1.0, record["stats"]["max_activation"])
    )


def _sweep(ctx: StageContext, cc: Crosscoder, loaded: LoadedModel, side: str, record: dict[str, Any],
           prompts: SteeringPrompts, promoted: list[int], gate: FeatureGate | None) -> dict[str, Any]:  # fmt: skip
    """Additive (and, for a DFC feature, gated) sweeps and a random-direction control."""
    s, f = ctx.spec.steering, record["feature"]
    key = _key(record)
    model, tok, layer = loaded.model, loaded.tokenizer, ctx.outputs["extract"][side]["layer_index"]
    s_max, d = record["stats"]["max_activation"], _direction(cc, f, side)
    common: dict[str, Any] = dict(feature_prompts=prompts.feature, neutral_prompts=prompts.neutral,
                                  promoted_token_ids=promoted)  # fmt: skip
    generate = dict(probe_prompts=prompts.probes, max_new_tokens=s.max_new_tokens)
    additive = steering_sweep(model, tok, layer, d, s_max, s.alphas, **common, **generate)
    gated = None if gate is None else steering_sweep(model, tok, layer, d, s_max, s.alphas, gate=gate, **common,
                                                      **generate)  # fmt: skip
    g = torch.Generator().manual_seed(ctx.spec.seed * 1_000_003 + f)
    random = torch.randn(d.shape, generator=g)
    control = steering_sweep(model, tok, layer, random * (d.norm() / random.norm()), s_max, s.alphas, **common)
    ratio = statistics.median(
        r.kl_feature / max(p.kl_feature, 1e-12) for r, p in zip(control.points, additive.points, strict=True)
    )
    return {
        "feature": key,
        "index": f,
        "s_max": s_max,
        "layer": layer,
        "feature_prompts": [tok.decode(ids, skip_special_tokens=False) for ids in prompts.feature],
        "neutral_docs": prompts.neutral_docs,
        "neutral_prompts_avoid_feature": prompts.neutral_is_clean,
        "sweeps": {"additive": additive.to_dict(), "gated": None if gated is None else gated.to_dict()},
        "random_control": {
            "kl_feature": [p.kl_feature for p in control.points],
            "kl_neutral": [p.kl_neutral for p in control.points],
            "median_ratio": ratio,
            "comparable": ratio >= COMPARABLE_RANDOM,
        },
    }


class _Progress:
    def __init__(self, ctx: StageContext, total: int) -> None:
        self.ctx, self.total, self.done, self.counters = ctx, max(total, 1), 0, {"screened": 0, "steered": 0}

    def step(self, kind: str) -> None:
        self.ctx.check_cancelled()
        self.done += 1
        self.counters[kind] += 1
        self.ctx.report_progress(self.done / self.total, screened_features=self.counters["screened"],
                                 steered_features=self.counters["steered"])  # fmt: skip


def _transfer(ctx: StageContext, cc: Crosscoder, models: LoadedModels) -> dict[str, Any] | None:
    """The spec's steering vector carried to the other model, with its effect there against a random control.

    A vector that cannot be carried (wrong width, nothing shared points along it, non-finite activations) is
    recorded with its error for the report's warnings: the rest of the audit stands without it.
    """
    spec = ctx.spec.steering.transfer
    if spec is None:
        return None
    source, target = spec.source, OTHER[spec.source]
    layers = {side: ctx.outputs["extract"][side]["layer_index"] for side in SIDES}
    prompts = list(dict.fromkeys(ctx.spec.steering.probe_prompts or spec.positive[:3]))
    alpha = spec.coefficient if spec.target_coefficient is None else spec.target_coefficient
    try:
        if spec.vector is not None:
            v = torch.tensor(spec.vector, dtype=torch.float32)
        else:
            loaded = models.get(source)
            v = contrast_vector(loaded.model, loaded.tokenizer, layers[source], spec.positive, spec.negative)
        carried = transfer_steering_vector(cc, v, spec.n_features, source=source)
        loaded = models.get(target)
        steering = Steering(layers[target], carried.vector, alpha)
        noise = torch.randn(carried.vector.shape, generator=torch.Generator().manual_seed(ctx.spec.seed))
        control = Steering(layers[target], noise * (carried.vector.norm() / noise.norm()), alpha)
        kl = next_token_kl(loaded.model, loaded.tokenizer, prompts, steering) if prompts else None
        kl_random = next_token_kl(loaded.model, loaded.tokenizer, prompts, control) if prompts else None
        own = None
        if spec.positive:  # the target's own vector from the same prompts: did the transfer find its direction?
            mine = contrast_vector(loaded.model, loaded.tokenizer, layers[target], spec.positive, spec.negative)
            own = float(torch.nn.functional.cosine_similarity(mine, carried.vector, dim=0))
        unsteered = greedy_generations(loaded.model, loaded.tokenizer, prompts, ctx.spec.steering.max_new_tokens)
        steered = greedy_generations(loaded.model, loaded.tokenizer, prompts, ctx.spec.steering.max_new_tokens,
                                       steering)  # fmt: skip
    except ValueError as exc:  # SteeringError included
        return {"name": spec.name, "source": source, "target": target, "error": str(exc)}
    return {
        "name": spec.name, "source": source, "target": target, "source_coefficient": spec.coefficient,
        "target_coefficient": alpha, "features": carried.features.tolist(), "weights": carried.weights.tolist(),
        "source_norm": float(v.norm()), "kl": kl, "kl_random": kl_random, "cosine_with_own_contrast": own,
        "probe_prompts": prompts, "unsteered": [g.text for g in unsteered], "steered": [g.text for g in steered],
        "unsteered_tokens": [g.tokens for g in unsteered], "steered_tokens": [g.tokens for g in steered],
    }  # fmt: skip


def _ranking(
    analysis: dict[str, Any], side: str, screens: dict[int, RemovalScreen], weights: RankingWeights
) -> FeatureRanking:
    """The side's candidates ranked with the removal KL and the divergence of its screened features (and, for a seed
    ensemble, each finding's stability)."""
    feats, stats, ls = candidates_from_json(analysis["candidates"][side])
    divergence = {f: v for f, s in screens.items() if (v := s.divergence()) is not None}
    stability = {int(k): v for k, v in analysis.get("stability", {}).get(side, {}).items()} or None
    return rank_features(feats, stats, latent_scaling=ls, weights=weights, stability=stability,
                         steering_effect={f: s.kl for f, s in screens.items()}, divergence=divergence)  # fmt: skip


def steer_stage(ctx: StageContext) -> dict[str, Any]:
    """Promoted tokens, removal screens and divergence of every reported feature, sweeps of the top ones."""
    if not ctx.spec.steering.enabled:
        return {"skipped": True, "reason": "steering.enabled is false in the audit spec"}
    analysis = ctx.store.get_json(ctx.outputs["analyse"]["features_json"])
    runs = {r.run: r.crosscoder for r in load_runs(ctx.store, ctx.outputs["train"], ctx.work_dir / "steer")}
    cc = runs[0]  # the first seed's: the steering transfer's shared features
    records = {side: analysis["features"][side] for side in SIDES if analysis["features"][side]}
    sides, top_n = list(records), ctx.spec.steering.top_n
    progress = _Progress(ctx, sum(len(r) for r in records.values()) + sum(min(top_n, len(r)) for r in records.values()))
    models = LoadedModels(ctx)
    pool = analysis["neutral_pool"]
    promoted: dict[str, dict[str, Any]] = {}
    prompts: dict[str, dict[int, SteeringPrompts]] = {}
    screens: dict[str, dict[int, RemovalScreen]] = {}
    gates: dict[str, dict[int, FeatureGate | None]] = {}
    for side in sides:  # 1. each owner: promoted tokens, and what removing each feature takes away
        loaded, layer = models.get(side), ctx.outputs["extract"][side]["layer_index"]
        need = {c["index"] for r in records[side] for c in r["contexts"][:FEATURE_PROMPTS]}
        located = locate_tokens(
            ctx.store, ctx.outputs["extract"][side]["prefix"], need | {p[f"index_{side}"] for p in pool}
        )
        mean = torch.tensor(analysis["mean_activation"][side])
        promoted[side], prompts[side], screens[side] = {}, {}, {}
        # Each gate reads all decoder norms: built once per feature.
        gates[side] = {_key(r): _gate(runs[r.get("run", 0)], r["feature"]) for r in records[side]}
        for r in records[side]:
            f, own = _key(r), runs[r.get("run", 0)]
            d = _direction(own, r["feature"], side) * r["stats"]["max_activation"]
            promoted[side][str(f)] = direct_logit_attribution(
                loaded.model, d, k=PROMOTED_K, mean_activation=mean, tokenizer=loaded.tokenizer
            ).to_dict()
            prompts[side][f] = _prompts(ctx, loaded.tokenizer, side, r, located, pool)
            removal = _removal(own, side, r, layer, gates[side][f])
            screens[side][f] = screen_removal(loaded.model, loaded.tokenizer, prompts[side][f].feature, removal,
                                              top_k=DIVERGENCE_TOKENS)  # fmt: skip
            progress.step("screened")
    for side in models.owners_first(sides, other=True):  # 2. the other model's view of what each feature says
        other = models.get(OTHER[side])
        screens[side] = {f: score_under(other.model, other.tokenizer, s) for f, s in screens[side].items()}
        ctx.check_cancelled()
    weights = dfc_weights(ctx.spec.ranking)
    rankings = {side: _ranking(analysis, side, screens[side], weights) for side in sides}
    out: dict[str, Any] = {}
    for side in models.owners_first(sides):  # 3. sweeps of each owner's features that now rank first
        loaded = models.get(side)
        reported = {_key(r): r for r in records[side]}
        ranked = [ranked_json(e, weights) for e in rankings[side].features if e.feature in reported]
        order = first_of_each_cluster(ranked, reported)  # the best screened of the findings matched across seeds
        results = []
        for entry in order[:top_n]:
            f = entry["feature"]
            own = runs[reported[f].get("run", 0)]
            results.append(
                _sweep(ctx, own, loaded, side, reported[f], prompts[side][f], promoted[side][str(f)]["top_ids"],
                       gates[side][f])
            )
            progress.step("steered")
        measure = {f: "additive_suppression_kl" if g is None else "gated_removal_kl" for f, g in gates[side].items()}
        out[side] = {
            "model": (ctx.spec.model_a if side == "a" else ctx.spec.model_b).id,
            "promoted": promoted[side],
            "screens": {str(f): {**s.to_dict(), "effect_measure": measure[f]} for f, s in screens[side].items()},
            "features": results,
            "ranking": order,
        }
    transfer = _transfer(ctx, cc, models)
    key = ctx.key("analysis/steering.json")
    ctx.store.put_json(key, {"version": 2, "alphas": list(ctx.spec.steering.alphas), "sides": out,
                             "transfer": transfer})  # fmt: skip
    ctx.report_progress(1.0, force=True)
    return {"skipped": False, "steering_json": key, "model_loads": models.loads,
            **{f"steered_{k}": len(v["features"]) for k, v in out.items()}}  # fmt: skip
