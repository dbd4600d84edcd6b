"""The data behind the analyse, steer and publish stages: the analysed token pairs streamed in corpus order, token
and document look-ups in the activation shards, the trained crosscoder, the JSON forms of per-feature statistics
that a later stage re-ranks from, and the assembly of the stored analysis into the report schema.

Memory stays bounded whatever the corpus: the paired stream holds one shard of model A and at most two of model
B, and a look-up loads one shard at a time and keeps only the documents it was asked about.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer

from dfc import features as dfc_features
from dfc.crosscoder import CONFIG_NAME, WEIGHTS_NAME, Crosscoder
from dfc.features import PairedTokens
from dfc.metrics import LatentScaling
from dfc.ranking import RankingWeights
from workers.loading import trusted_models_from_env
from workers.pairing import ShardedPairs, _shard_starts, load_pairs
from workers.report.schema import (
    AlignmentSummary,
    AuditReport,
    Context,
    Continuation,
    CorpusInfo,
    CrosscoderInfo,
    Divergence,
    DivergentToken,
    FalsePositiveChecks,
    FeatureReport,
    FeatureStats,
    Histogram,
    ModelInfo,
    SharedFeature,
    SharedSummary,
    SteeringResult,
    TokenValue,
    TrainingMetrics,
)
from workers.shards import ShardReader
from workers.spec import AuditSpec
from workers.status import AuditStatus, now
from workers.storage import ObjectStore

MAX_ANALYSIS_PAIRS = 200_000
"""At most this many token pairs are analysed: plenty for statistics and top contexts, cheap at any corpus size."""
ANALYSIS_BATCH = 1024
"""Pairs per batch: bounds the dense ``batch × F`` encoder scores (0.5 GB at the paper's F = 131,072)."""


class AnalysedPairs(NamedTuple):
    """The pairs an analysis reads, in corpus order: global token indices into each model's shards."""

    a: Tensor
    b: Tensor
    n_heldout: int
    n_train: int
    """Training pairs added in front of the held-out ones because the held-out tail alone was short."""


def select_pairs(store: ObjectStore, aligned: dict[str, Any], limit: int = MAX_ANALYSIS_PAIRS) -> AnalysedPairs:
    """The held-out pairs, preceded by the tail of the training pairs up to ``limit`` in all.

    Both parts are contiguous in corpus order (the held-out pairs are the corpus' tail), so the result is the
    last ``limit`` pairs of the corpus: whole documents, except perhaps the first.
    """
    held_a, held_b = load_pairs(store, aligned["heldout_key"])
    held_a, held_b = held_a[:limit], held_b[:limit]
    room = limit - len(held_a)
    train_a = train_b = torch.empty(0, dtype=torch.long)
    if room > 0:  # only when the corpus is small (< ~4M pairs), so the whole training index is small too
        train_a, train_b = load_pairs(store, aligned["train_key"])
        train_a, train_b = train_a[max(0, len(train_a) - room) :], train_b[max(0, len(train_b) - room) :]
    a, b = torch.cat([train_a, held_a]).long(), torch.cat([train_b, held_b]).long()
    order = torch.argsort(a, stable=True)  # alignment emits pairs in corpus order; sorting makes it a guarantee
    return AnalysedPairs(a[order], b[order], len(held_a), len(train_a))


class OrderedPairs:
    """Iterable of :class:`PairedTokens` batches in corpus order: raw activations, doc ids, global token indices.

    ``position_a``/``position_b`` are the pairs' *global* token indices into each model's shards, so a record
    found by a scan can be looked up again (:func:`locate_tokens`).
    """

    def __init__(
        self,
        store: ObjectStore,
        prefix_a: str,
        prefix_b: str,
        pairs_a: Tensor,
        pairs_b: Tensor,
        *,
        batch_size: int = ANALYSIS_BATCH,
        verify: bool = True,
    ) -> None:
        if len(pairs_a) != len(pairs_b) or len(pairs_a) == 0:
            raise ValueError(f"need equally many pairs for both models, got {len(pairs_a)} and {len(pairs_b)}")
        self.index = ShardedPairs(store, prefix_a, prefix_b, pairs_a, pairs_b, verify=verify, b_cache_shards=2)
        self.reader_a, self.reader_b = self.index.reader_a, self.index.reader_b
        self.batch_size = batch_size

    def __len__(self) -> int:
        """Number of batches one iteration yields."""
        return sum(math.ceil(len(mine) / self.batch_size) for mine in self.index.by_shard)

    @property
    def n_pairs(self) -> int:
        return len(self.index.pairs_a)

    def __iter__(self) -> Iterator[PairedTokens]:
        pairs_a, pairs_b = self.index.pairs_a, self.index.pairs_b
        for i in range(len(self.index.by_shard)):  # shard order is corpus order
            rows = self.index.rows(i)
            if rows is None:
                continue
            for s in range(0, len(rows.pairs), self.batch_size):
                e, mine = s + self.batch_size, rows.pairs[s : s + self.batch_size]
                x_a, x_b = rows.x_a[s:e].float(), rows.x_b[s:e].float()
                yield PairedTokens(x_a, x_b, rows.doc_ids[s:e], pairs_a[mine], pairs_b[mine])


@dataclass(frozen=True)
class LocatedToken:
    """Where a global token index lies: its document, its position there, and the document's tokens."""

    doc_id: int
    position: int
    """Index of the token within its document's token ids."""
    token_ids: list[int]
    """The whole (stored, possibly truncated) document's token ids."""
    activations: Tensor | None = None
    """The document's raw activations ``(tokens, d)``, when asked for."""


def locate_tokens(
    store: ObjectStore, prefix: str, indices: Iterable[int], *, with_activations: bool = False
) -> dict[int, LocatedToken]:
    """Look up global token indices of one model's shards, loading each shard that holds one exactly once."""
    reader = ShardReader(store, prefix)
    starts = torch.tensor([*_shard_starts(reader), reader.manifest.n_tokens])
    wanted = torch.tensor(sorted({int(i) for i in indices}), dtype=torch.long)
    if len(wanted) and (int(wanted[0]) < 0 or int(wanted[-1]) >= reader.manifest.n_tokens):
        raise IndexError(f"token indices outside the {reader.manifest.n_tokens} tokens under {prefix}")
    shard_of = torch.searchsorted(starts, wanted, right=True) - 1
    found: dict[int, LocatedToken] = {}
    for i in torch.unique(shard_of).tolist():
        shard = reader.load(i)
        docs = shard.doc_ids
        cached: dict[int, tuple[int, list[int], Tensor | None]] = {}
        for g in wanted[shard_of == i].tolist():
            row = g - int(starts[i])
            doc = int(docs[row])
            if doc not in cached:
                rows = (docs == doc).nonzero().squeeze(1)  # documents are whole and contiguous within a shard
                acts = shard.activations[rows].float() if with_activations else None
                cached[doc] = (int(rows[0]), shard.token_ids[rows].tolist(), acts)
            first, ids, acts = cached[doc]
            found[g] = LocatedToken(doc, row - first, ids, acts)
    return found


def load_crosscoder(store: ObjectStore, final_prefix: str, local: Path, device: str = "cpu") -> Crosscoder:
    """Download the trained crosscoder (safetensors + config.json) and load it for inference."""
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        store.download_file(f"{final_prefix.rstrip('/')}/{name}", local / name)
    return Crosscoder.from_pretrained(local, device=device).eval()


def load_revision(extracted: dict[str, Any]) -> str | None:
    """The revision to load a model at: its pinned commit, or None for a local folder (keyed ``local-…``)."""
    return None if Path(extracted["model_id"]).is_dir() else extracted["revision"]


def load_tokenizer(extracted: dict[str, Any]) -> Any:
    """The model's tokenizer alone, at the revision its activations came from (no weights are read)."""
    model_id = extracted["model_id"]
    return AutoTokenizer.from_pretrained(
        model_id, revision=load_revision(extracted), trust_remote_code=model_id in trusted_models_from_env()
    )


def architecture_name(extracted: dict[str, Any]) -> str:
    """The model's architecture class name from its config (no weights are read)."""
    model_id = extracted["model_id"]
    config = AutoConfig.from_pretrained(
        model_id, revision=load_revision(extracted), trust_remote_code=model_id in trusted_models_from_env()
    )
    return (getattr(config, "architectures", None) or [type(config).__name__])[0]


def finite(value: float | Tensor | None) -> float | None:
    """A plain float, or None where it is missing or not finite (JSON cannot carry NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _column(values: Sequence[float | None]) -> Tensor:
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)


def candidates_to_json(features: Sequence[int], stats: dfc_features.FeatureStats, ls: LatentScaling) -> dict[str, Any]:
    """Per-feature statistics and Latent Scaling of ranking candidates, enough to rank them again later."""
    rows = [stats.index(f) for f in features]
    ls_rows = {int(f): i for i, f in enumerate(ls.features.tolist())}
    at = [ls_rows[int(f)] for f in features]
    out: dict[str, Any] = {"features": [int(f) for f in features], "tokens": stats.tokens}
    for name in ("count", "sum", "max", "variance_share_a", "variance_share_b"):
        out[name] = [finite(v) if name != "count" else int(v) for v in getattr(stats, name)[rows].tolist()]
    for name in ("beta_r_a", "beta_r_b", "beta_eps_a", "beta_eps_b", "nu_r", "nu_eps"):
        out[name] = [finite(v) for v in getattr(ls, name)[at].tolist()]
    out["owner"] = [int(v) for v in ls.owner[at].tolist()]
    if ls.same_space is not None:
        out["same_space"] = [bool(v) for v in ls.same_space[at].tolist()]
    return out


def candidates_from_json(data: dict[str, Any]) -> tuple[list[int], dfc_features.FeatureStats, LatentScaling]:
    """Inverse of :func:`candidates_to_json`: the features, their statistics and Latent Scaling."""
    feats = torch.tensor(data["features"], dtype=torch.long)
    stats = dfc_features.FeatureStats(
        features=feats,
        tokens=int(data["tokens"]),
        count=torch.tensor(data["count"], dtype=torch.long),
        sum=_column(data["sum"]),
        max=_column(data["max"]),
        variance_share_a=_column(data["variance_share_a"]),
        variance_share_b=_column(data["variance_share_b"]),
    )
    ls = LatentScaling(
        feats,
        *(_column(data[name]).float() for name in ("beta_r_a", "beta_r_b", "beta_eps_a", "beta_eps_b")),
        nu_r=_column(data["nu_r"]).float(),
        nu_eps=_column(data["nu_eps"]).float(),
        owner=torch.tensor(data["owner"], dtype=torch.long),
        # Absent in candidates written before cross-space thresholds existed: judged as same-space then.
        same_space=torch.tensor(data["same_space"], dtype=torch.bool) if "same_space" in data else None,
    )
    return data["features"], stats, ls


# ---------------------------------------------------------------------------------------------- the report
def _clamp(value: float, low: float = 0.0, high: float = 1.0) -> float:
    return min(high, max(low, float(value)))


def _contexts(records: list[dict[str, Any]]) -> list[Context]:
    return [
        Context(doc_id=str(c["doc_id"]), prefix=c["prefix"], token=c["token"], suffix=c["suffix"],
                activation=max(0.0, c["activation"]))
        for c in records
    ]  # fmt: skip


def _tokens(effects: dict[str, Any] | None, which: str) -> list[TokenValue]:
    if effects is None:
        return []
    names = effects[f"{which}_tokens"] or [str(i) for i in effects[f"{which}_ids"]]
    return [TokenValue(token=t, value=v) for t, v in zip(names, effects[f"{which}_values"], strict=True)]


def _steering_results(steered: dict[str, Any] | None) -> list[SteeringResult]:
    """The additive sweep (α · s_max · d at every position), one result per α, as the schema describes it."""
    if steered is None:
        return []
    sweep = steered["sweeps"]["additive"]
    return [
        SteeringResult(
            alpha=p["alpha"],
            kl_feature_prompts=max(0.0, p["kl_feature"]),
            kl_neutral_prompts=max(0.0, p["kl_neutral"]),
            delta_logprob_promoted=p["promoted_logprob_change"] or 0.0,
            continuations=[
                Continuation(prompt=prompt, unsteered=before, steered=after)
                for prompt, before, after in zip(sweep["probe_prompts"], sweep["unsteered"], p["continuations"],
                                                  strict=True)
            ],
        )
        for p in sweep["points"]
    ]  # fmt: skip


def _divergence(screen: dict[str, Any] | None) -> Divergence | None:
    """The screen's divergence evidence, most divergent promoted tokens first (None when not measured)."""
    if screen is None or screen["divergence"] is None:
        return None
    tokens = [DivergentToken(**c) for c in screen["continuations"]]
    tokens.sort(key=lambda t: -t.gain * (t.logprob_owner - t.logprob_other))
    return Divergence(nats=screen["divergence"], removal_kl=max(0.0, screen["kl"]), contexts=screen["n_contexts"],
                      tokens=tokens)  # fmt: skip


def _checks(entry: dict[str, Any], record: dict[str, Any], steered: dict[str, Any] | None,
            weights: RankingWeights) -> FalsePositiveChecks:  # fmt: skip
    flags = []
    nu_eps, nu_r = entry["nu_eps"], entry["nu_r"]
    # The thresholds the ranking held this feature to (same-space or cross-space), else the same-space ones.
    eps_max = entry.get("nu_eps_max") if entry.get("nu_eps_max") is not None else weights.nu_eps_max
    r_max = entry.get("nu_r_max") if entry.get("nu_eps_max") is not None else weights.nu_r_max
    if nu_eps is not None and nu_eps >= eps_max:
        flags.append(f"Latent Scaling ν_ε = {nu_eps:.2f}: the other model's reconstruction error carries this "
                     "feature too (it may not be exclusive)")  # fmt: skip
    if nu_r is not None and r_max is not None and nu_r >= r_max:
        flags.append(f"Latent Scaling ν_r = {nu_r:.2f}: the other model reconstructs it through other latents")
    if nu_eps is None or nu_r is None:
        flags.append("Latent Scaling could not be computed for this feature")
    cosine = record["nearest_shared_cosine"]
    if cosine is not None and cosine >= 0.7:
        flags.append(f"its decoder is close to shared feature {record['nearest_shared']} (cos {cosine:.2f}): "
                     "possibly an analogue of a shared concept rather than a new one")  # fmt: skip
    if len(record["contexts"]) < 3:
        flags.append(f"fires in only {len(record['contexts'])} document(s) of the analysed text")
    if steered is not None and steered["random_control"]["comparable"]:
        flags.append(f"a random direction of the same size changes the model about as much when steered "
                     f"(median KL ratio {steered['random_control']['median_ratio']:.2f})")  # fmt: skip
    return FalsePositiveChecks(
        # Negative ratios (the other model anti-correlates) are as exclusive as 0; the schema keeps ν ≥ 0.
        nu_eps=None if nu_eps is None else max(0.0, nu_eps),
        nu_r=None if nu_r is None else max(0.0, nu_r),
        nu_eps_threshold=eps_max,
        nu_r_threshold=r_max,
        passed=entry["passes_latent_scaling"] is True,
        nearest_shared_feature=record["nearest_shared"],
        nearest_shared_cosine=None if cosine is None else _clamp(cosine, -1.0, 1.0),
        flags=flags,
    )


def feature_reports(side: str, analysis: dict[str, Any], steering: dict[str, Any] | None,
                    weights: RankingWeights) -> list[FeatureReport]:  # fmt: skip
    """One model's reported features in final order (steering-aware when steering ran), ranked 1..n."""
    records = {r["feature"]: r for r in analysis["features"][side]}
    steer_side = (steering or {}).get("sides", {}).get(side)
    order = steer_side["ranking"] if steer_side else analysis["features"][side]
    steered = {r["feature"]: r for r in steer_side["features"]} if steer_side else {}
    promoted = steer_side["promoted"] if steer_side else {}
    screens = steer_side.get("screens", {}) if steer_side else {}
    out = []
    for rank, entry in enumerate(order, start=1):
        f, record = entry["feature"], records[entry["feature"]]
        s = record["stats"]
        out.append(FeatureReport(
            index=f, owner=side.upper(), rank=rank, score=entry["score"],
            score_components=entry["components"], score_weights=entry["weights"],
            stats=FeatureStats(frequency=_clamp(s["frequency"]), mean_activation=min(s["mean_activation"],
                               s["max_activation"]), max_activation=s["max_activation"],
                               variance_share=_clamp(s["variance_share"])),
            top_contexts=_contexts(record["contexts"]), weak_contexts=_contexts(record["weak_contexts"]),
            promoted_tokens=_tokens(promoted.get(str(f)), "top"),
            suppressed_tokens=_tokens(promoted.get(str(f)), "bottom"),
            checks=_checks(entry, record, steered.get(f), weights),
            steering=_steering_results(steered.get(f)), divergence=_divergence(screens.get(str(f))),
        ))  # fmt: skip
    return out


def report_warnings(analysis: dict[str, Any], steering: dict[str, Any] | None, models: dict[str, str]) -> list[str]:
    """Audit-wide caveats a reader needs before trusting the ranking."""
    out = []
    pairs = analysis["pairs"]
    if pairs["train"]:
        out.append(f"feature statistics and contexts come from {pairs['analysed']:,} token pairs, {pairs['train']:,} "
                   "of them from the training text (the held-out text alone was short)")  # fmt: skip
    if analysis["architecture"] != "dfc":
        out.append(
            f"a {analysis['architecture']} crosscoder has no dedicated partitions: exclusive features were "
            "read off relative decoder norms (> 0.8 for A, < 0.2 for B), which misses many (SCIENCE.md §10)"
        )
    for side in ("a", "b"):
        silent = analysis["exclusive"][side] - analysis["fired"][side]
        if silent:
            out.append(f"{silent:,} of {analysis['exclusive'][side]:,} features exclusive to {side.upper()} "
                       f"({models[side]}) never fired on the analysed text and are not ranked")  # fmt: skip
    if steering is None:
        out.append("steering was not run: no causal evidence, and no promoted or suppressed tokens were computed")
        return out
    for side, data in steering["sides"].items():
        controls = [f["random_control"] for f in data["features"]]
        comparable = sum(c["comparable"] for c in controls)
        if controls and 2 * comparable >= len(controls):
            ratio = statistics.median(c["median_ratio"] for c in controls)
            out.append(f"the steering effect of a random direction of the same size is comparable for {comparable} of "
                       f"{len(controls)} steered features of {side.upper()} (median KL ratio {ratio:.2f}): additive "
                       "steering there mostly measures the vector's size, not the feature")  # fmt: skip
        if any(not f["neutral_prompts_avoid_feature"] for f in data["features"]):
            out.append(f"some steered features of {side.upper()} fire in every sampled document opening, so their "
                       "'neutral' prompts are not free of them")  # fmt: skip
    return out


def build_report(audit_id: str, spec: AuditSpec, status: AuditStatus, outputs: dict[str, dict[str, Any]],
                 analysis: dict[str, Any], steering: dict[str, Any] | None,
                 weights: RankingWeights) -> AuditReport:  # fmt: skip
    """The audit's report from the stage manifests and the analysis and steering files; validated on construction."""
    extracted, aligned, trained = outputs["extract"], outputs["align"], outputs["train"]
    info = analysis["models"]
    models = {side: ModelInfo(**{k: info[side][k] for k in ModelInfo.model_fields}) for side in ("a", "b")}
    corpus = info["a"].get("corpus", {})
    c = trained["crosscoder"]
    heldout = trained["heldout"]
    dead = trained.get("final_dead_fraction")
    report = AuditReport(
        audit_id=audit_id,
        created_at=status.created_at,
        finished_at=now(),
        model_a=models["a"],
        model_b=models["b"],
        corpus=CorpusInfo(description=corpus.get("description", spec.corpus.kind), documents=extracted["documents"],
                          hash=corpus.get("hash") or corpus.get("key", "unknown"), tokens=extracted["a"]["n_tokens"]),
        alignment=AlignmentSummary(aligned_sequence_fraction=_clamp(aligned["aligned_sequence_fraction"]),
                                   kept_token_fraction=_clamp(aligned["kept_token_fraction"]),
                                   pairs=aligned["n_pairs"]),
        crosscoder=CrosscoderInfo(
            architecture=c["architecture"], n_features=c["n_features"], k=c["k"], n_a_only=trained["n_a_only"],
            n_b_only=trained["n_b_only"], n_shared=trained["n_shared"], steps=trained["steps"],
            batch_size=trained["batch_size"], lr=trained["lr"], seed=trained["seed"],
            extra={"d_a": c["d_a"], "d_b": c["d_b"], "scale_a": trained["scale_a"], "scale_b": trained["scale_b"],
                   "dead_after_tokens": trained["resolved"]["dead_after_tokens"], "device": trained["device"],
                   "resumed_from_step": trained["resumed_from_step"], "heldout_tokens": heldout["tokens"],
                   "analysed_pairs": analysis["pairs"]["analysed"]},
        ),
        training=TrainingMetrics(
            fve_a=min(1.0, heldout["fve_a"]), fve_b=min(1.0, heldout["fve_b"]), l0=heldout["l0"],
            dead_fraction=_clamp(heldout["dead_fraction"] if dead is None else dead), tokens=trained["tokens"],
            wall_time_s=status.stage_seconds.get("training", trained.get("seconds", trained["wall_time_s"])),
        ),
        spec=spec.model_dump(mode="json"),
        features_a=feature_reports("a", analysis, steering, weights),
        features_b=feature_reports("b", analysis, steering, weights),
        shared_summary=SharedSummary(
            n_shared=analysis["shared"]["n_shared"], n_alive=analysis["shared"]["n_alive"],
            relative_norm_histogram=Histogram(**analysis["shared"]["histogram"]),
            features=[SharedFeature(index=s["feature"], relative_norm=_clamp(s["relative_norm"]),
                                    frequency=_clamp(s["frequency"]), top_tokens=s["top_tokens"], snippet=s["snippet"])
                      for s in analysis["shared"]["features"]],
        ),
        warnings=report_warnings(analysis, steering, {"a": models["a"].id, "b": models["b"].id}),
    )  # fmt: skip
    return AuditReport.model_validate_json(report.model_dump_json())  # what readers will parse, checked once more
