"""Ground truth on the planted-behaviour pair: does the audit find model B's planted feature, and is it causal?

Model B (Qwen3-style, d=96) answers every sentence about "the Zorblax dam" with a fixed refusal; model A
(Llama-style, d=64, another tokenizer) never does (workers/planted/pair.py). This script extracts both models'
residual streams on the audit corpus, pairs tokens by character offsets, trains a DFC and a standard
crosscoder, and checks against the known answer:

* the planted feature: of the B-exclusive features whose activation lies mostly on trigger-sentence ends
  (where B is about to say the refusal), the one that writes most of B's trigger direction; its rank under
  ``dfc.analysis.ranking.rank_features`` among B-exclusive features (every one screened as the steer stage does:
  removal KL and divergence from A, ``dfc/behaviour/divergence.py``; also the rank without divergence), and the rank
  of the standard crosscoder's best trigger detector by relative decoder norm (SCIENCE.md §10);
* suppression: steering B with ``α · s_max · d`` along the planted feature's raw-scale decoder, the drop in
  the planted continuation's probability on trigger prompts and the next-token KL on neutral prompts
  (with a random direction of the same norm as control), and the same for gated ablation (the feature
  removed only where it fires).

The trigger labels are used only to *evaluate*; training, ranking and steering never see them. Several
training seeds are run because which partition captures the concept depends on the seed at this scale.

    python benchmarks/planted.py                  # ~8 min on 2 CPU cores -> benchmarks/results/planted.json
    python benchmarks/planted.py --seeds 1        # the headline seed only, ~2 min
    python benchmarks/planted.py --partition 0.05 --exclusive-init-norm 0   # the paper's partition sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from dfc.analysis.features import PairedTokens, context_record, scan_features
from dfc.analysis.promoted import direct_logit_attribution
from dfc.analysis.ranking import rank_by_relative_norm, rank_features
from dfc.behaviour.divergence import score_under, screen_removal
from dfc.behaviour.steering import FeatureGate, Steering, next_token_kl, steer
from dfc.config import CrosscoderConfig
from dfc.crosscoder import Crosscoder
from dfc.lm.align import align_offsets
from dfc.lm.hooks import find_decoder_layers, iter_document_activations, resolve_layer
from dfc.metrics import evaluate, latent_scaling
from dfc.trainer import TrainConfig, train
from workers.analysis.analyse import dfc_weights
from workers.planted.pair import (
    PlantedPairConfig,
    build_planted_pair,
    measure_planted_behaviour,
    planted_corpus_documents,
)
from workers.spec import RankingWeights as SpecRankingWeights

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class PairedCorpus:
    """Paired activations of the audit corpus with where each pair came from and the ground-truth labels."""

    x_a: Tensor
    x_b: Tensor
    document: Tensor
    position_a: Tensor
    position_b: Tensor
    trigger_end: Tensor
    """True at the last token of a sentence that mentions the trigger (evaluation only)."""
    sentence_end: Tensor
    """True at the last token of any sentence."""
    token_ids_b: list[Tensor]
    """Model B's token ids of every document, for context windows and steering prompts."""

    def batches(self, size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[PairedTokens]:
        """Batches of paired tokens; shuffled ones are drawn with replacement, forever."""
        n = len(self.x_a)
        if not shuffle:
            for i in range(0, n, size):
                s = slice(i, i + size)
                yield PairedTokens(self.x_a[s], self.x_b[s], self.document[s], self.position_a[s], self.position_b[s])
            return
        generator = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randint(n, (size,), generator=generator)
            yield PairedTokens(
                self.x_a[idx], self.x_b[idx], self.document[idx], self.position_a[idx], self.position_b[idx]
            )


def extract_paired(models: dict, texts: list[str], layers: dict[str, int], trigger_word: str) -> PairedCorpus:
    """Run both models over ``texts``, pair their tokens by character offsets and label trigger-sentence ends."""
    docs = {
        side: list(iter_document_activations(model, tok, texts, layers[side], batch_size=64))
        for side, (model, tok) in models.items()
    }
    parts: dict[str, list[Tensor]] = {k: [] for k in ("x_a", "x_b", "doc", "pa", "pb", "label", "end")}
    for i, (text, a, b) in enumerate(zip(texts, docs["a"], docs["b"], strict=True)):
        al = align_offsets(
            text, a.offsets, b.offsets, special_a=a.special_mask.tolist(), special_b=b.special_mask.tolist()
        )
        # The token that covers the full stop of each trigger sentence, in B's tokenisation.
        spans = b.offsets[al.positions_b]
        label = _covering(spans, [text.find(".", m.start()) for m in re.finditer(re.escape(trigger_word), text)])
        full_stops = _covering(spans, [m.start() for m in re.finditer(r"\.", text)])
        for key, value in (
            ("x_a", a.activations[al.positions_a].float()), ("x_b", b.activations[al.positions_b].float()),
            ("doc", torch.full((len(label),), i)), ("pa", al.positions_a), ("pb", al.positions_b), ("label", label),
            ("end", full_stops),
        ):  # fmt: skip
            parts[key].append(value)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return PairedCorpus(
        cat["x_a"],
        cat["x_b"],
        cat["doc"],
        cat["pa"],
        cat["pb"],
        cat["label"],
        cat["end"],
        [d.token_ids for d in docs["b"]],
    )


def _covering(spans: Tensor, chars: list[int]) -> Tensor:
    """Which of the ``[n, 2]`` character spans contain any of ``chars``."""
    hit = torch.zeros(len(spans), dtype=torch.bool)
    for c in chars:
        hit |= (spans[:, 0] <= c) & (spans[:, 1] > c)
    return hit


def train_crosscoder(data: PairedCorpus, architecture: str, args: argparse.Namespace, seed: int) -> Crosscoder:
    """One short CPU training run with the settings that work at toy scale."""
    part = args.partition if architecture == "dfc" else 0.0
    exclusive_norm = args.exclusive_init_norm if architecture == "dfc" and args.exclusive_init_norm else None
    config = CrosscoderConfig(
        d_a=data.x_a.shape[1], d_b=data.x_b.shape[1], n_features=args.features, k=args.k,
        architecture=architecture, a_only=part, b_only=part,
    )  # fmt: skip
    model = Crosscoder(config)
    train(
        model,
        ((b.x_a, b.x_b) for b in data.batches(args.batch, shuffle=True, seed=seed)),
        TrainConfig(
            steps=args.steps, lr=args.lr, dead_after_tokens=args.dead_after_tokens, aux_k=args.k,
            aux_alpha=0.5, seed=seed, log_every=0,
            exclusive_init_norm=exclusive_norm,
        ),
    )  # fmt: skip
    return model


@torch.no_grad()
def dense_activations(model: Crosscoder, data: PairedCorpus) -> Tensor:
    """``[tokens, F]`` inference activations (learned thresholds), for scoring against the labels."""
    chunks = [model.encode(*model.normalize(b.x_a, b.x_b), use_thresholds=True).to_dense() for b in data.batches(4096)]
    return torch.cat(chunks)


def detection(acts: Tensor, label: Tensor) -> dict[str, Tensor]:
    """Precision, recall and F1 of "the feature fires" as a detector of ``label``, per feature.

    ``mass_precision`` is the share of the feature's total activation that falls on labelled tokens, which
    forgives weak firing elsewhere.
    """
    fired = acts > 0
    hits = (fired & label[:, None]).sum(0).double()
    precision = hits / fired.sum(0).clamp_min(1)
    recall = hits / max(int(label.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    mass_precision = acts[label].sum(0).double() / acts.sum(0).double().clamp_min(1e-12)
    return {"precision": precision, "recall": recall, "f1": f1, "mass_precision": mass_precision}


def planted_probability(model: Any, tok: Any, pair: Any, steering: Steering | None) -> float:
    if steering is None:
        return measure_planted_behaviour(model, tok, pair.trigger_prompts, pair.planted_continuation)
    with steer(model, steering.layer_index, steering.direction, steering.alpha, steering.scale, gate=steering.gate):
        return measure_planted_behaviour(model, tok, pair.trigger_prompts, pair.planted_continuation)


def trigger_contributions(model: Crosscoder, acts: Tensor, data: PairedCorpus) -> Tensor:
    """Per feature: its mean write along B's trigger direction at trigger-sentence ends (normalised scale).

    The trigger direction is the mean of B's activations at trigger-sentence ends minus that at other sentence
    ends: what B adds when the planted response is coming (A's counterpart is ~30x smaller).
    """
    with torch.no_grad():
        _, x_b = model.normalize(data.x_a, data.x_b)
        u = x_b[data.trigger_end].mean(0) - x_b[data.sentence_end & ~data.trigger_end].mean(0)
        along = torch.zeros(model.config.n_features)
        along[model.b_offset :] = model.decoder_b().detach() @ (u / u.norm())
        return (acts[data.trigger_end] * along).mean(0)


def steering_report(b: tuple[Any, Any], pair: Any, layer: int, direction: Tensor, s_max: float, args) -> dict:
    """Additive suppression sweep with a same-norm random-direction control, and gated ablation."""
    model, tok = b
    base = planted_probability(model, tok, pair, None)
    control = torch.randn(direction.shape, generator=torch.Generator().manual_seed(0))
    control = control * (direction.norm() / control.norm())
    sweep = []
    for alpha in args.alphas:
        row: dict[str, float] = {"alpha": alpha}
        for name, vec in (("feature", direction), ("random", control)):
            spec = Steering(layer, vec, alpha, s_max)
            row[f"{name}_drop"] = 1 - planted_probability(model, tok, pair, spec) / base
            row[f"{name}_neutral_kl"] = next_token_kl(model, tok, pair.neutral_prompts, spec)
        row["feature_trigger_kl"] = next_token_kl(
            model, tok, pair.trigger_prompts, Steering(layer, direction, alpha, s_max)
        )
        sweep.append(row)
    # Headline: the mildest suppression that halves the behaviour, else the paper's CCP value α = -1.5.
    enough = [r for r in sweep if r["feature_drop"] >= 0.5]
    headline = max(enough, key=lambda r: r["alpha"]) if enough else min(sweep, key=lambda r: abs(r["alpha"] + 1.5))
    return {"p_planted_unsteered": base, "sweep": sweep, "headline": headline}


def gated_report(b: tuple[Any, Any], pair: Any, gate: FeatureGate, layer: int, direction: Tensor) -> list[dict]:
    """Remove (α = -1) or reverse (α = -2) the feature only where it fires."""
    model, tok = b
    base = planted_probability(model, tok, pair, None)
    rows = []
    for alpha in (-1.0, -2.0):
        spec = Steering(layer, direction, alpha, 1.0, gate)
        rows.append({
            "alpha": alpha, "drop": 1 - planted_probability(model, tok, pair, spec) / base,
            "neutral_kl": next_token_kl(model, tok, pair.neutral_prompts, spec),
            "trigger_kl": next_token_kl(model, tok, pair.trigger_prompts, spec),
        })  # fmt: skip
    return rows


def analyse_dfc(cc: Crosscoder, data: PairedCorpus, models: dict, pair: Any, layer: int, args) -> dict:
    """Rank B-exclusive features as an audit would, then score the ranking against the planted truth."""
    model_b, tok_b = b = models["b"]
    b_only = list(cc.config.b_only_features)
    scan = scan_features(cc, data.batches(4096), b_only, top_n=10, per_document=1, n_sample=5)
    ls = latent_scaling(cc, ((t.x_a, t.x_b) for t in data.batches(4096)), b_only)
    # Causal and behavioural evidence, as the steer stage gathers it: remove each feature where it fires on its
    # top contexts (gated, α = -1), record the next-token KL and what it was making B say, and ask A about that.
    screens = {}
    for f in b_only:
        top = scan.contexts.top.get(f, [])[: args.steer_contexts]
        if top:
            prompts = [data.token_ids_b[r.document][: r.position_b + 1] for r in top]
            removal = Steering(layer, cc.decoder_directions(f)[1], -1.0, 1.0, FeatureGate.of(cc, f))
            screens[f] = score_under(*models["a"], screen_removal(model_b, tok_b, prompts, removal))
    weights = dfc_weights(SpecRankingWeights())  # the audit's defaults, as the demo ranks
    kl = {f: s.kl for f, s in screens.items()}
    divergence = {f: v for f, s in screens.items() if (v := s.divergence()) is not None}
    ranking = rank_features(b_only, scan.stats, latent_scaling=ls, steering_effect=kl, divergence=divergence,
                            weights=weights)  # fmt: skip
    without = rank_features(b_only, scan.stats, latent_scaling=ls, steering_effect=kl, weights=weights)

    acts = dense_activations(cc, data)
    det = detection(acts, data.trigger_end)
    carried = trigger_contributions(cc, acts, data)
    planted = _planted(det, carried, b_only)
    s_max = float(scan.stats.max[scan.stats.index(planted)])
    direction = cc.decoder_directions(planted)[1]

    def text_of(feature: int, before: int = 12) -> list[str]:
        return [
            context_record(tok_b, data.token_ids_b[r.document], r.position_b, r.activation, before=before, after=2)
            for r in scan.contexts.top.get(feature, [])
        ]

    contexts = text_of(planted)
    with_trigger = sum(pair.trigger_word in c.prefix + c.token for c in contexts) / max(len(contexts), 1)
    logits = direct_logit_attribution(model_b, direction, k=5, tokenizer=tok_b)
    evaluation = evaluate(cc, ((t.x_a, t.x_b) for t in data.batches(4096)), use_thresholds=True)
    return {
        "fve_a": evaluation.fve_a, "fve_b": evaluation.fve_b, "l0": evaluation.l0,
        "dead_fraction": evaluation.dead_fraction,
        "planted_feature": planted,
        "rank": ranking.rank_of(planted),
        "rank_without_divergence": without.rank_of(planted),
        "divergence_nats": divergence.get(planted),
        "divergent_tokens": [c.to_dict() for c in screens[planted].continuations[:3]] if planted in screens else [],
        "n_ranked": len(b_only),
        "ranked_by_detection": sorted(b_only, key=lambda f: -float(det["f1"][f])).index(planted) + 1,
        "precision": float(det["precision"][planted]), "recall": float(det["recall"][planted]),
        "mass_precision": float(det["mass_precision"][planted]),
        "f1": float(det["f1"][planted]),
        "share_of_trigger_direction": float(carried[planted] / carried.sum()),
        "b_only_share_of_trigger_direction": float(carried[b_only].sum() / carried.sum()),
        "best_b_only_detector": _best(det, b_only, cc),
        "best_shared_detector": _best(det, list(cc.config.shared), cc),
        "components": next(r.to_dict() for r in ranking.features if r.feature == planted),
        "top_contexts": [c.marked() for c in contexts[:5]],
        "top_contexts_with_trigger": with_trigger,
        "promoted_tokens": logits.top_tokens, "suppressed_tokens": logits.bottom_tokens,
        "s_max": s_max,
        "ranking": [[r.feature, round(r.score, 3)] for r in ranking.features],
        "top5": [
            {**r.to_dict(), "f1": float(det["f1"][r.feature]), "contexts": [c.marked() for c in text_of(r.feature)[:2]],
             "says": [c.text for c in screens[r.feature].continuations[:1]] if r.feature in screens else []}
            for r in ranking.features[:5]
        ],
        "steering": steering_report(b, pair, layer, direction, s_max, args),
        "gated_ablation": gated_report(b, pair, FeatureGate.of(cc, planted), layer, direction),
    }  # fmt: skip


def _planted(det: dict[str, Tensor], carried: Tensor, candidates: list[int]) -> int:
    """Of the candidates tied to the trigger (most of their activation on trigger ends), the one writing most
    of B's trigger direction; the best detector if none is tied."""
    tied = [f for f in candidates if float(det["mass_precision"][f]) >= 0.5]
    return max(tied, key=lambda f: float(carried[f])) if tied else candidates[int(det["f1"][candidates].argmax())]


def _best(det: dict[str, Tensor], features: list[int], cc: Crosscoder) -> dict:
    f = features[int(det["f1"][features].argmax())]
    return {"feature": f, "f1": float(det["f1"][f]), "relative_norm": float(cc.decoder_norms().relative[f])}


def analyse_standard(cc: Crosscoder, data: PairedCorpus) -> dict:
    """Where the standard crosscoder's best trigger detector lands when features are sorted by relative norm."""
    acts = dense_activations(cc, data)
    det = detection(acts, data.trigger_end)
    planted = _planted(det, trigger_contributions(cc, acts, data), list(range(cc.config.n_features)))
    relative = cc.decoder_norms().relative
    order = rank_by_relative_norm(relative, toward="b").tolist()
    live = [f for f in order if bool((acts[:, f] > 0).any())]
    return {
        "planted_feature": planted, "f1": float(det["f1"][planted]), "relative_norm": float(relative[planted]),
        "mass_precision": float(det["mass_precision"][planted]),
        "rank": order.index(planted) + 1, "rank_among_live": live.index(planted) + 1 if planted in live else None,
        "n_features": len(order), "n_live": len(live),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dfc-planted-pair")
    parser.add_argument("--docs", type=int, default=2000, help="audit-corpus documents (the pair's default is 400)")
    parser.add_argument("--layer", default="middle", help="block index or 'middle', the same for both models")
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    # At the paper's 5% partitions and equal init norms the trigger concept is absorbed into a shared feature
    # in every seed tried here; larger partitions whose decoders start at 2x norm (the same total norm, hence
    # the same BatchTopK score scale, as a shared feature) give the B-only partition a fair chance.
    parser.add_argument("--partition", type=float, default=0.2, help="DFC A-only and B-only share each")
    parser.add_argument("--exclusive-init-norm", type=float, default=0.8, help="DFC exclusive decoder init norm")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dead-after-tokens", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, default=5, help="training seeds; the headline is the first")
    parser.add_argument("--alphas", default="-0.25,-0.5,-0.75,-1,-1.5,-2,-3,-5")
    parser.add_argument("--steer-contexts", type=int, default=5, help="top contexts per feature for its steering KL")
    parser.add_argument("--out", type=Path, default=RESULTS / "planted.json")
    args = parser.parse_args()
    args.alphas = [float(a) for a in args.alphas.split(",")]
    torch.set_num_threads(1)  # two threads on two shared cores are ~10x slower
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        clock = now

    config = PlantedPairConfig()
    pair = build_planted_pair(args.cache, config)
    lap("build_or_load_pair")
    models = {
        side: (AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
        for side, path in (("a", pair.model_a_dir), ("b", pair.model_b_dir))
    }
    layers = {side: resolve_layer(args.layer, len(find_decoder_layers(m).layers)) for side, (m, _) in models.items()}
    texts = planted_corpus_documents(dataclasses.replace(config, n_audit_docs=args.docs))
    data = extract_paired(models, texts, layers, pair.trigger_word)
    lap("extract_and_align")
    runs = []
    for seed in range(args.seeds):
        dfc = train_crosscoder(data, "dfc", args, seed)
        lap(f"train_dfc_seed{seed}")
        dfc_result = analyse_dfc(dfc, data, models, pair, layers["b"], args)
        lap(f"analyse_dfc_seed{seed}")
        standard = train_crosscoder(data, "standard", args, seed)
        standard_result = analyse_standard(standard, data)
        lap(f"standard_seed{seed}")
        runs.append({"seed": seed, "dfc": dfc_result, "standard": standard_result})
        head = _headline(runs[-1:])
        scalars = {k: v for k, v in head.items() if not isinstance(v, list)}
        print(f"seed {seed}: " + ", ".join(f"{k}={v:.3g}" for k, v in scalars.items()), flush=True)
    payload = {
        **_headline(runs),
        "per_seed": [{"seed": r["seed"], **_headline([r])} for r in runs],
        "runs": runs,
        "pair": {"config_hash": pair.config_hash, "metrics": dataclasses.asdict(pair.metrics)},
        "data": {"documents": len(texts), "paired_tokens": len(data.x_a), "layers": layers},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "timings_s": timings,
        "total_s": round(sum(timings.values()), 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out} in {payload['total_s']:.0f}s")


def _headline(runs: list[dict]) -> dict:
    """The numbers asked for, from the first run, and how many seeds put the trigger in the B-only partition."""
    dfc, standard = runs[0]["dfc"], runs[0]["standard"]
    head, gated = dfc["steering"]["headline"], dfc["gated_ablation"][0]
    return {
        "dfc_rank": dfc["rank"], "standard_rank": standard["rank"],
        "suppression_drop": head["feature_drop"], "neutral_kl": head["feature_neutral_kl"], "alpha": head["alpha"],
        "random_direction_drop": head["random_drop"], "random_direction_neutral_kl": head["random_neutral_kl"],
        "gated_ablation_drop": gated["drop"], "gated_ablation_neutral_kl": gated["neutral_kl"],
        "planted_f1": dfc["f1"], "standard_f1": standard["f1"],
        "b_only_share_of_trigger_direction": dfc["b_only_share_of_trigger_direction"],
        "b_only_carries_trigger_in_seeds": sum(r["dfc"]["b_only_share_of_trigger_direction"] > 0.5 for r in runs),
        # A seed "finds" the planted feature when its B-only detector is clean (F1 ≥ 0.8) and removing it where
        # it fires halves the behaviour; "top3" when it is also among B's first three.
        "seeds": len(runs),
        "seeds_found": sum(_found(r) for r in runs),
        "seeds_top3": sum(_found(r) and r["dfc"]["rank"] <= 3 for r in runs),
        "standard_ranks": [r["standard"]["rank"] for r in runs],
        "dfc_ranks": [r["dfc"]["rank"] for r in runs],
        "dfc_ranks_without_divergence": [r["dfc"]["rank_without_divergence"] for r in runs],
    }  # fmt: skip


def _found(run: dict) -> bool:
    return run["dfc"]["f1"] >= 0.8 and run["dfc"]["gated_ablation"][0]["drop"] >= 0.5


if __name__ == "__main__":
    main()
