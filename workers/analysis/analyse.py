"""Two of the last three stages of an audit: analyse the trained crosscoder, publish the report.

analyse → ``analysis/features.json``: statistics, top contexts, Latent Scaling, nearest shared feature and a first
ranking of the features exclusive to each model, plus a summary of the shared ones. The steer stage between them
(``workers/analysis/steer.py``) writes ``analysis/steering.json``. publish → ``report/report.json`` then
``report/report.html`` (SCIENCE.md §6, §8).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from dfc.analysis.features import (
    ActivationRecord,
    FeatureScan,
    PairedTokens,
    context_record,
    nearest_shared,
    scan_features,
)
from dfc.analysis.ranking import FeatureRanking, RankedFeature, RankingWeights, rank_features
from dfc.config import Architecture
from dfc.crosscoder import Crosscoder
from dfc.metrics import latent_scaling
from workers.analysis.data import (
    AnalysedPairs,
    OrderedPairs,
    TrainedRun,
    architecture_name,
    candidates_from_json,
    candidates_to_json,
    feature_key,
    load_runs,
    load_tokenizer,
    locate_tokens,
    merge_candidates,
    select_pairs,
    split_key,
)
from workers.analysis.ensemble import SIDES, RunScan, ensemble_summary, match_seeds
from workers.pipeline.context import StageContext
from workers.report.build import build_report
from workers.report.html import render_html
from workers.spec import AuditSpec
from workers.spec import RankingWeights as SpecRankingWeights

TOP_CONTEXTS = 10
"""Strongest contexts kept per feature (at most one per document)."""
WEAK_CONTEXTS = 5
"""Uniformly sampled weaker contexts kept per feature."""
SHARED_LISTED, SHARED_SNIPPETS = 100, 5
"""Most frequent shared features listed in the report, and the top contexts their tokens and snippet come from."""
NEUTRAL_DOCS, OPENING_PAIRS = 12, 32
"""Document openings (first pairs of the first documents) from which steering's neutral prompts are drawn."""
EXCLUSIVE_NORM = 0.8
"""Standard/DSF crosscoders: relative decoder norm above this (below 1 − this) counts as A- (B-) exclusive."""
FEATURE_PROMPTS, PROMPT_TOKENS, PROBE_CONTEXTS, PROBE_TOKENS = 5, 256, 2, 48
"""Steering: top contexts used as feature prompts, their length cap, and how many (shorter) become probes."""
NEUTRAL_PROMPTS, PROMOTED_K = 4, 10
COMPARABLE_RANDOM = 0.5
"""A random direction whose KL reaches this share of the feature's counts as comparable (a warning)."""


def device() -> str:
    """Where the crosscoder runs during analysis: a GPU when this process has one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def dfc_weights(w: SpecRankingWeights) -> RankingWeights:
    """An audit spec's ``ranking`` section in the science library's terms."""
    return RankingWeights(
        strength=w.strength, frequency=w.frequency, steering=w.steering, divergence=w.divergence,
        stability=w.stability, latent_scaling_penalty=w.false_positive_penalty, nu_eps_max=w.nu_eps_max,
        nu_r_max=w.nu_r_max, nu_eps_max_cross=w.nu_eps_max_cross, nu_r_max_cross=w.nu_r_max_cross,
    )  # fmt: skip


def ranked_json(entry: RankedFeature, weights: RankingWeights) -> dict[str, Any]:
    """A ranked feature with its score's terms and weights; ``Σ weight · component = score``."""
    components = {
        "strength": entry.strength,
        "frequency": entry.frequency,
        "steering": entry.steering or 0.0,
        "divergence": entry.divergence or 0.0,
        "fails_latent_scaling": float(entry.passes_latent_scaling is False),
    }
    weight = {
        "strength": weights.strength,
        "frequency": weights.frequency,
        "steering": weights.steering,
        "divergence": weights.divergence,
        "fails_latent_scaling": -weights.latent_scaling_penalty,
    }
    if entry.stability is not None:  # an ensemble's finding: the share of seeds that have it counts too
        components["stability"], weight["stability"] = entry.stability, weights.stability
    return {**entry.to_dict(), "components": components, "weights": weight}


def partition(cc: Crosscoder) -> dict[str, list[int]]:
    """Exclusive features per model and the shared rest: DFC by construction, others by relative decoder norm."""
    c = cc.config
    if c.architecture is Architecture.DFC:
        return {"a": list(c.a_only_features), "b": list(c.b_only_features), "shared": list(c.shared)}
    relative = cc.decoder_norms().relative.cpu()
    designated = set(range(c.n_a_only, c.n_a_only + c.n_designated))  # DSF's tied block is shared by design
    a = [f for f in range(c.n_features) if float(relative[f]) > EXCLUSIVE_NORM and f not in designated]
    b = [f for f in range(c.n_features) if float(relative[f]) < 1 - EXCLUSIVE_NORM and f not in designated]
    exclusive = set(a) | set(b)
    return {"a": a, "b": b, "shared": [f for f in range(c.n_features) if f not in exclusive]}


class _Watch:
    """Wraps the paired stream: cancellation and progress between batches, plus what the first pass gathers."""

    def __init__(self, ctx: StageContext, stream: OrderedPairs, n_passes: int) -> None:
        self.ctx, self.stream, self.n_passes = ctx, stream, n_passes
        self.sums = {"a": torch.zeros(stream.reader_a.manifest.d_model, dtype=torch.float64),
                     "b": torch.zeros(stream.reader_b.manifest.d_model, dtype=torch.float64)}  # fmt: skip
        self.openings: list[tuple[int, PairedTokens]] = []  # (doc, its first pairs) of the first documents

    def batches(self, pass_index: int) -> Iterator[PairedTokens]:
        """One pass over the stream; the first also sums activations and keeps document openings."""
        n = len(self.stream)
        for i, batch in enumerate(self.stream):
            self.ctx.check_cancelled()
            if pass_index == 0:
                self.sums["a"] += batch.x_a.double().sum(0)
                self.sums["b"] += batch.x_b.double().sum(0)
                self._collect_openings(batch)
            yield batch
            done = (pass_index + (i + 1) / n) / self.n_passes
            self.ctx.report_progress(0.9 * done, analysis_pass=pass_index + 1)

    def _collect_openings(self, batch: PairedTokens) -> None:
        seen = {doc for doc, _ in self.openings}
        for doc in torch.unique_consecutive(batch.document).tolist():
            if doc in seen or len(self.openings) >= NEUTRAL_DOCS:
                continue  # a document continued from the previous batch already has its opening
            rows = (batch.document == doc).nonzero().squeeze(1)[:OPENING_PAIRS]
            self.openings.append((doc, PairedTokens(*(t[rows] for t in batch if t is not None))))

    def neutral_pool(self, cc: Crosscoder, thresholds: bool, candidates: set[int]) -> list[dict[str, Any]]:
        """Each collected opening with the candidate features that fire in it (to pick prompts that avoid them)."""
        pool = []
        # Encoded one opening at a time: with learned thresholds that is exact; with BatchTopK each opening
        # gets the same k per token on average as a full batch would give it.
        with torch.no_grad():
            for doc, rows in self.openings:
                x_a, x_b = cc.normalize(rows.x_a.to(cc.b_enc.device), rows.x_b.to(cc.b_enc.device))
                fired = set(cc.encode(x_a, x_b, use_thresholds=thresholds).cols.tolist()) & candidates
                pool.append({"doc_id": doc, "index_a": int(rows.position_a[-1]), "index_b": int(rows.position_b[-1]),
                             "fired": sorted(fired)})  # fmt: skip
        return pool


def _index(record: ActivationRecord, side: str) -> int:
    return record.position_a if side == "a" else record.position_b  # global token indices (see OrderedPairs)


class _Texts:
    """Turns scan records of either model into text windows, looking each token up in the shards once."""

    def __init__(self, ctx: StageContext, wanted: dict[str, list[ActivationRecord]]) -> None:
        extracted = ctx.outputs["extract"]
        self.tokenizers = {side: load_tokenizer(extracted[side]) for side in SIDES}
        self.located = {
            side: locate_tokens(ctx.store, extracted[side]["prefix"], {_index(r, side) for r in wanted[side]})
            for side in SIDES
        }

    def context(self, record: ActivationRecord, side: str, before: int = 24, after: int = 8) -> dict[str, Any]:
        index = _index(record, side)
        loc = self.located[side][index]
        rec = context_record(self.tokenizers[side], loc.token_ids, loc.position, record.activation,
                             before=before, after=after)  # fmt: skip
        return {"doc_id": loc.doc_id, "index": index, "position": loc.position, "prefix": rec.prefix,
                "token": rec.token, "suffix": rec.suffix, "activation": rec.activation}  # fmt: skip


def _scan_run(run: TrainedRun, watch: _Watch, first_pass: int, seed: int) -> RunScan:
    """Two passes over the pairs: every feature's statistics and contexts, then Latent Scaling of the fired ones."""
    cc, parts = run.crosscoder, partition(run.crosscoder)
    # O(F × contexts) memory whatever the number of pairs; the shared summary needs every feature's statistics.
    scan = scan_features(cc, watch.batches(first_pass), None, top_n=TOP_CONTEXTS, per_document=1,
                         n_sample=WEAK_CONTEXTS, seed=seed)  # fmt: skip
    fired = {side: [f for f in parts[side] if int(scan.stats.count[f]) > 0] for side in SIDES}
    owners = [0] * len(fired["a"]) + [1] * len(fired["b"])
    ls = latent_scaling(cc, ((t.x_a, t.x_b) for t in watch.batches(first_pass + 1)), fired["a"] + fired["b"],
                        owners=owners)  # fmt: skip
    return RunScan(run, parts, scan, fired, {side: candidates_to_json(fired[side], scan.stats, ls) for side in SIDES})


def _feature_record(scan: RunScan, feature: int, key: int, entry: RankedFeature, texts: _Texts,
                    weights: RankingWeights, nearest: tuple[int | None, float | None], side: str,
                    seeds: list[dict[str, Any]], cluster: int | None) -> dict[str, Any]:  # fmt: skip
    """One reported feature: ranking terms, statistics, nearest shared feature, contexts and its seeds."""
    stats, contexts = scan.scan.stats, scan.scan.contexts
    assert contexts is not None
    row = stats.row(feature)
    shared, cosine = nearest
    relative = scan.run.crosscoder.decoder_norms().relative.cpu()
    return {
        **ranked_json(entry, weights), "feature": feature, "key": key, "run": scan.run.run, "seed": scan.run.seed,
        "stats": {k: row[k] for k in ("frequency", "count", "mean_activation", "max_activation")}
        | {"variance_share": row[f"variance_share_{side}"]},
        "relative_norm": float(relative[feature]), "nearest_shared": shared, "nearest_shared_cosine": cosine,
        "contexts": [texts.context(r, side) for r in contexts.top.get(feature, [])],
        "weak_contexts": [texts.context(r, side) for r in contexts.sample.get(feature, [])],
        "seeds": seeds, "cluster": cluster,
    }  # fmt: skip


def _nearest(scans: list[RunScan], top: dict[str, list[tuple[int, int]]]) -> dict[tuple[int, int], tuple[Any, Any]]:
    """Each reported (run, feature)'s nearest shared feature of its own crosscoder, by decoder cosine."""
    out: dict[tuple[int, int], tuple[Any, Any]] = {}
    for scan in scans:
        cc = scan.run.crosscoder
        mine = [f for side in SIDES for run, f in top[side] if run == scan.run.run]
        if cc.config.n_shared and mine:
            found = nearest_shared(cc, mine)
            for f, s, c in zip(found.features, found.shared, found.cosine, strict=True):
                out[(scan.run.run, int(f))] = (int(s), float(c))
    return out


def _shared_summary(cc: Crosscoder, scan: FeatureScan, shared: list[int], listed: dict[int, str],
                    texts: _Texts) -> dict[str, Any]:  # fmt: skip
    """Counts, the histogram of relative norms and the most frequent shared features with tokens and a snippet."""
    assert scan.contexts is not None
    relative = cc.decoder_norms().relative.cpu()
    rows = []
    for f, side in listed.items():
        snippets = [texts.context(r, side, before=10, after=3) for r in scan.contexts.top.get(f, [])[:SHARED_SNIPPETS]]
        rows.append({
            "feature": f, "relative_norm": float(relative[f]), "frequency": float(scan.stats.frequency[f]),
            "side": side, "top_tokens": list(dict.fromkeys(s["token"] for s in snippets)),
            "snippet": f"{snippets[0]['prefix']}«{snippets[0]['token']}»{snippets[0]['suffix']}" if snippets else "",
        })  # fmt: skip
    counts, edges = torch.histogram(relative[shared].double(), bins=20, range=(0.0, 1.0))
    return {
        "n_shared": len(shared),
        "n_alive": sum(int(scan.stats.count[f]) > 0 for f in shared),
        "histogram": {"bin_edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]},
        "features": rows,
    }


def analyse_stage(ctx: StageContext) -> dict[str, Any]:
    """Statistics, contexts, Latent Scaling and a first ranking of each model's exclusive features, matched across the
    seed ensemble (each finding with its stability); a shared summary of the first seed's dictionary."""
    spec, extracted, aligned, trained = ctx.spec, ctx.outputs["extract"], ctx.outputs["align"], ctx.outputs["train"]
    runs = load_runs(ctx.store, trained, ctx.work_dir / "analyse" / "crosscoders", device())
    pairs: AnalysedPairs = select_pairs(ctx.store, aligned)
    stream = OrderedPairs(ctx.store, extracted["a"]["prefix"], extracted["b"]["prefix"], pairs.a, pairs.b)
    watch = _Watch(ctx, stream, n_passes=2 * len(runs))
    scans = [_scan_run(run, watch, 2 * i, spec.seed) for i, run in enumerate(runs)]
    first, n = scans[0], runs[0].crosscoder.config.n_features
    weights = dfc_weights(spec.ranking)
    ensembles = {side: match_seeds(scans, side, weights, spec.training.match_threshold, spec.top_features)
                 for side in SIDES}  # fmt: skip
    merged = {side: merge_candidates([([feature_key(s.run.run, f, n) for f in s.fired[side]], s.candidates[side])
                                      for s in scans]) for side in SIDES}  # fmt: skip
    rankings: dict[str, FeatureRanking] = {}
    top_keys: dict[str, list[int]] = {side: [] for side in SIDES}
    for side in SIDES:
        if ensembles[side].keys:  # ranked among every fired candidate (the strongest sets the strength scale)
            feats, stats, ls = candidates_from_json(merged[side])
            rankings[side] = rank_features(feats, stats, latent_scaling=ls, weights=weights,
                                           stability=ensembles[side].stability)  # fmt: skip
            # Every seed's top findings are reported, deduplicated: up to top_features per seed.
            chosen = set(ensembles[side].keys)
            top_keys[side] = [k for k in rankings[side].top(len(feats)) if k in chosen]
    top = {side: [split_key(k, n) for k in top_keys[side]] for side in SIDES}
    relative = first.run.crosscoder.decoder_norms().relative.cpu()
    stats0 = first.scan.stats
    alive = sorted((f for f in first.parts["shared"] if int(stats0.count[f]) > 0),
                   key=lambda f: (-int(stats0.count[f]), f))  # fmt: skip
    listed = {f: "a" if float(relative[f]) >= 0.5 else "b" for f in alive[:SHARED_LISTED]}
    wanted: dict[str, list[ActivationRecord]] = {side: [] for side in SIDES}
    for side in SIDES:
        for run, f in top[side]:
            contexts = scans[run].scan.contexts
            assert contexts is not None
            wanted[side] += contexts.top.get(f, []) + contexts.sample.get(f, [])
    assert first.scan.contexts is not None
    for f, side in listed.items():
        wanted[side] += first.scan.contexts.top.get(f, [])[:SHARED_SNIPPETS]
    texts = _Texts(ctx, wanted)
    ctx.check_cancelled()
    nearest = _nearest(scans, top)
    features: dict[str, list[dict[str, Any]]] = {}
    for side in SIDES:
        entries = {e.feature: e for e in rankings[side].features} if side in rankings else {}
        features[side] = [
            _feature_record(scans[run], f, key, entries[key], texts, weights, nearest.get((run, f), (None, None)),
                            side, ensembles[side].members[key], (ensembles[side].cluster or {}).get(key))
            for key, (run, f) in zip(top_keys[side], top[side], strict=True)
        ]  # fmt: skip
    pool = _merged_pool(watch, scans)
    analysis = {
        "version": 2,
        "architecture": str(first.run.crosscoder.config.architecture),
        "pairs": {"analysed": stats0.tokens, "heldout": pairs.n_heldout, "train": pairs.n_train},
        "models": {side: _model_info(spec, extracted[side], stream, side, texts.tokenizers[side]) for side in SIDES},
        "exclusive": {side: len(first.parts[side]) for side in SIDES},
        "fired": {side: len(first.fired[side]) for side in SIDES},
        "candidates": merged,
        "stability": {side: {str(k): v for k, v in (ensembles[side].stability or {}).items()} for side in SIDES},
        "ensemble": ensemble_summary(scans, ensembles),
        "features": features,
        "shared": _shared_summary(first.run.crosscoder, first.scan, first.parts["shared"], listed, texts),
        "mean_activation": {side: (watch.sums[side] / max(stats0.tokens, 1)).tolist() for side in SIDES},
        "neutral_pool": pool,
    }
    key = ctx.key("analysis/features.json")
    ctx.store.put_json(key, analysis)
    ctx.report_progress(1.0, force=True, analysed_pairs=stats0.tokens)
    return {"features_json": key, "analysed_pairs": stats0.tokens, "seeds": len(runs),
            **{f"ranked_{s}": len(ensembles[s].keys) for s in SIDES},
            **{f"reported_{s}": len(features[s]) for s in SIDES}}  # fmt: skip


def _merged_pool(watch: _Watch, scans: list[RunScan]) -> list[dict[str, Any]]:
    """Document openings with every seed's fired candidates in them, as ensemble keys."""
    pools = []
    for scan in scans:
        cc = scan.run.crosscoder
        n = cc.config.n_features
        pool = watch.neutral_pool(cc, float(cc.thresholds[0]) > 0, set(scan.fired["a"]) | set(scan.fired["b"]))
        pools.append([{**p, "fired": [feature_key(scan.run.run, f, n) for f in p["fired"]]} for p in pool])
    merged = pools[0]
    for other in pools[1:]:
        for opening, more in zip(merged, other, strict=True):
            opening["fired"] = sorted(set(opening["fired"]) | set(more["fired"]))
    return merged


def _model_info(spec: AuditSpec, extracted: dict[str, Any], stream: OrderedPairs, side: str, tok: Any) -> dict:
    manifest = (stream.reader_a if side == "a" else stream.reader_b).manifest
    return {
        "id": (spec.model_a if side == "a" else spec.model_b).id,
        "revision": extracted["revision"],
        "layer": extracted["layer_index"],
        "n_layers": int(manifest.metadata.get("n_layers", extracted["layer_index"] + 1)),
        "hidden_size": extracted["d_model"],
        "architecture": architecture_name(extracted),
        "tokenizer": f"{type(tok).__name__} of {extracted['model_id']}",
        "corpus": manifest.metadata.get("corpus", {}),
    }


# ---------------------------------------------------------------------------------------------- publish
def publish_stage(ctx: StageContext) -> dict[str, Any]:
    """Build and validate the report, then write report.json and, last of all, report.html."""
    analysis = ctx.store.get_json(ctx.outputs["analyse"]["features_json"])
    steered = ctx.outputs.get("steer", {})
    steering = None if steered.get("skipped", True) else ctx.store.get_json(steered["steering_json"])
    explained = ctx.outputs.get("explain", {})
    explanations = None if explained.get("skipped", True) else ctx.store.get_json(explained["explanations_json"])
    status = ctx.audits.status(ctx.audit_id)
    scanned = ctx.outputs.get("scan", {})
    scan = None if scanned.get("skipped", True) else ctx.store.get_json(scanned["scan_json"])
    report = build_report(
        ctx.audit_id, ctx.spec, status, ctx.outputs, analysis, steering, dfc_weights(ctx.spec.ranking), explanations,
        scan,
    )
    ctx.report_progress(0.5, force=True)
    json_key, html_key = ctx.key("report/report.json"), ctx.key("report/report.html")
    ctx.store.put_bytes(json_key, report.model_dump_json(indent=2).encode())
    # The page goes last: its presence means the JSON it was rendered from is complete.
    ctx.store.put_bytes(html_key, render_html(report, top_n=ctx.spec.top_features).encode())
    return {
        "report_json": json_key,
        "report_html": html_key,
        "features_a": len(report.features_a),
        "features_b": len(report.features_b),
        "warnings": len(report.warnings),
    }
