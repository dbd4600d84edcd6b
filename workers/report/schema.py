"""The audit report's contract: a versioned pydantic schema written as ``report.json`` and rendered to HTML.

Every number is finite (NaN and ±inf are rejected: JSON cannot carry them, so they would not round-trip),
and cross-field validators reject reports that could not come from a real audit (ranks out of order,
features outside the dictionary, a finish before the start), naming the field that was wrong.
"""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = "1.7"
"""1.1: ``nu_r_threshold`` may be null (ν_r not tested for a feature the other model has no decoder for).
1.2: ``FeatureReport.divergence``. 1.3: ``Explanation.detection_contexts``. 1.4: ``Continuation.unsteered_tokens``
and ``steered_tokens`` (optional: the generated tokens, special ones included). 1.5: null-calibrated checks
(``FalsePositiveChecks.null_checks``, ``AuditReport.checks_calibration``); ``passed`` now needs them too.
1.6: seed ensembles (``FeatureReport.run``, ``seed``, ``stability``, ``seeds``; ``AuditReport.ensemble``; a feature is
named by its run and index) and the behaviour-first scan (``AuditReport.divergent_contexts``, ``scan``). 1.7: the scan's
null check on the gap (``ChecksCalibration.scan_gap``, ``ScanInfo.null_gap``)."""

INTERPRETABLE = 0.8
"""Detection score from which an explanation counts as interpretable (SCIENCE.md §6)."""

Owner = Literal["A", "B"]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Count = Annotated[int, Field(ge=0)]


class _Model(BaseModel):
    """Base for every report section: unknown keys are an error and NaN/inf are refused."""

    # extra="forbid" so a typo in a producer fails loudly instead of silently dropping evidence.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelInfo(_Model):
    """One audited model and the layer the crosscoder reads."""

    id: str = Field(min_length=1, description="Hugging Face id or local path of the model.")
    revision: str = Field(description="Resolved revision (commit hash) the activations came from.")
    layer: Count = Field(description="Index of the hooked residual-stream layer (0-based).")
    n_layers: int = Field(gt=0, description="Number of transformer layers in the model.")
    hidden_size: int = Field(gt=0, description="Width d of the residual stream at the hooked layer.")
    architecture: str = Field(description="Architecture class name, e.g. 'LlamaForCausalLM'.")
    tokenizer: str = Field(description="Name or path of the tokenizer used to tokenize the corpus.")

    @model_validator(mode="after")
    def _layer_in_model(self) -> ModelInfo:
        if self.layer >= self.n_layers:
            raise ValueError(f"layer={self.layer} must be below n_layers={self.n_layers} for model {self.id!r}")
        return self


class CorpusInfo(_Model):
    """The text both models read."""

    description: str = Field(description="Human description of the corpus (sources, mix).")
    hash: str = Field(min_length=1, description="Content hash identifying the exact corpus.")
    documents: Count = Field(description="Number of documents in the corpus.")
    tokens: Count = Field(description="Number of tokens read (model A's tokenizer).")


class AlignmentSummary(_Model):
    """How well the two tokenizations could be paired (SCIENCE.md §5)."""

    aligned_sequence_fraction: Fraction = Field(description="Share of documents aligned to the end.")
    kept_token_fraction: Fraction = Field(description="Share of model A's content tokens kept in a pair.")
    pairs: Count = Field(description="Number of aligned token pairs available for training.")


class CrosscoderInfo(_Model):
    """The crosscoder's architecture and training configuration."""

    architecture: Literal["standard", "dsf", "dfc"] = Field(description="Crosscoder family.")
    n_features: int = Field(gt=0, description="Dictionary size F (all partitions).")
    k: int = Field(gt=0, description="Average active features per token (BatchTopK).")
    n_a_only: Count = Field(description="Features dedicated to model A (DFC partition I_A).")
    n_b_only: Count = Field(description="Features dedicated to model B (DFC partition I_B).")
    n_shared: Count = Field(description="Shared features (partition I_S, or all others).")
    steps: Count = Field(description="Optimiser steps taken.")
    batch_size: int = Field(gt=0, description="Token pairs per training batch.")
    lr: float = Field(gt=0.0, description="Peak learning rate of Adam.")
    seed: int = Field(description="Random seed of the crosscoder's initialisation and data order.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Any further training options, echoed.")

    @model_validator(mode="after")
    def _partitions_fit(self) -> CrosscoderInfo:
        total = self.n_a_only + self.n_b_only + self.n_shared
        if total != self.n_features:
            raise ValueError(f"n_a_only + n_b_only + n_shared = {total} must equal n_features = {self.n_features}")
        if self.k >= self.n_features:
            raise ValueError(f"k={self.k} must be below n_features={self.n_features}")
        return self


class TrainingMetrics(_Model):
    """Reconstruction quality and sparsity of the trained crosscoder (SCIENCE.md §6)."""

    fve_a: float = Field(le=1.0, description="Fraction of model A's variance explained (held-out tokens).")
    fve_b: float = Field(le=1.0, description="Fraction of model B's variance explained (held-out tokens).")
    l0: NonNegative = Field(description="Mean number of active features per token.")
    dead_fraction: Fraction = Field(description="Share of features that did not fire in the dead window.")
    tokens: Count = Field(description="Token pairs seen during training.")
    wall_time_s: NonNegative = Field(description="Training wall-clock time in seconds.")


class Context(_Model):
    """A snippet of corpus text with the token the feature fired on."""

    doc_id: str = Field(description="Identifier of the corpus document the snippet comes from.")
    prefix: str = Field(description="Text before the marked token.")
    token: str = Field(description="The token the activation was read at.")
    suffix: str = Field(description="Text after the marked token.")
    activation: NonNegative = Field(description="Feature activation at the marked token.")


class TokenValue(_Model):
    """A vocabulary token with a signed value (a logit effect)."""

    token: str = Field(description="The token as decoded text.")
    value: float = Field(description="Its value, e.g. the decoder direction's logit contribution.")


class FeatureStats(_Model):
    """How often and how strongly a feature fires."""

    frequency: Fraction = Field(description="Share of tokens on which the feature is active.")
    mean_activation: NonNegative = Field(description="Mean activation over the tokens where it is active.")
    max_activation: NonNegative = Field(description="Largest activation seen on the analysis corpus.")
    variance_share: Fraction = Field(description="Share of the owner model's activation variance it explains.")

    @model_validator(mode="after")
    def _mean_below_max(self) -> FeatureStats:
        if self.mean_activation > self.max_activation:
            raise ValueError(
                f"mean_activation={self.mean_activation} cannot exceed max_activation={self.max_activation}"
            )
        return self


class NullCheck(_Model):
    """One check of a finding against the null: its statistic, and the null percentile it must be above."""

    name: str = Field(description="divergence, removal_kl, specificity or score (dfc/analysis/null.py).")
    value: float | None = Field(description="The finding's statistic; null: not measured (check not applied).")
    threshold: float = Field(description="The null percentile's value.")
    percentile: float = Field(ge=0.0, le=100.0, description="Which null percentile the threshold is.")
    passed: bool | None = Field(description="Whether the value is above the threshold; null: not measured.")
    text: str = Field(description='The comparison in words ("divergence 4.8 nats; null 99th percentile 0.2").')


class ChecksCalibration(_Model):
    """Where the null-calibrated checks' thresholds came from, and how many findings pass them by chance."""

    thresholds: dict[str, float] = Field(description="Statistic → threshold.")
    percentiles: dict[str, float] = Field(description="Statistic → null percentile.")
    null_pairs: Count = Field(description="Null pairs audited for the calibration.")
    null_features: Count = Field(description="Null features the percentiles were taken over.")
    passing_per_pair: list[Count] = Field(
        default_factory=list, description="Per calibration null pair: findings that passed every check by chance."
    )
    source: str = Field("", description="The calibration's pairs and recipe.")
    scan_salience: float | None = Field(
        default=None, description="The scan's null threshold on an entry's salience (null: not checked on salience)."
    )
    scan_percentile: float | None = Field(default=None, description="Which null percentile the scan's thresholds are.")
    scan_gap: float | None = Field(
        default=None, description="The scan's null threshold on an entry's gap in nats (null: not checked; before 1.7)."
    )


class FalsePositiveChecks(_Model):
    """Evidence that a feature is really exclusive and not an artefact (SCIENCE.md §6, §10)."""

    nu_eps: float | None = Field(
        default=None, ge=0.0, description="Latent Scaling ν_ε (error ratio); high means the other model has it."
    )
    nu_r: float | None = Field(
        default=None, ge=0.0, description="Latent Scaling ν_r (reconstruction ratio); high means decoupling."
    )
    nu_eps_threshold: NonNegative = Field(
        default=0.2, description="ν_ε below this counts as exclusive (0.2 same-space, 1.0 across models' spaces)."
    )
    nu_r_threshold: NonNegative | None = Field(
        default=0.5,
        description="ν_r below this counts as exclusive; null: not tested (the other model has no decoder for "
        "the feature, and ν_r's denominator vanishes for a cleanly exclusive one).",
    )
    passed: bool = Field(
        description="True when Latent Scaling and every measured null-calibrated check say the feature is new."
    )
    null_checks: list[NullCheck] = Field(
        default_factory=list, description="The finding against the null distribution, one entry per check."
    )
    nearest_shared_feature: Count | None = Field(
        default=None, description="Index of the shared feature whose owner-model decoder is most similar."
    )
    nearest_shared_cosine: float | None = Field(
        default=None, ge=-1.0, le=1.0, description="Cosine between the two decoder directions."
    )
    flags: list[str] = Field(default_factory=list, description="Human-readable warnings about this feature.")


class Continuation(_Model):
    """One prompt completed with and without steering."""

    prompt: str = Field(description="The prompt given to the owner model.")
    unsteered: str = Field(description="Greedy continuation without intervention (special tokens out).")
    steered: str = Field(description="Greedy continuation with the feature's direction added (special tokens out).")
    unsteered_tokens: list[str] | None = Field(
        default=None,
        description="Every token generated without intervention, each decoded on its own with special tokens kept "
        "(e.g. '<|endoftext|>'), so an empty or blank continuation can say why; null: not recorded.",
    )
    steered_tokens: list[str] | None = Field(
        default=None, description="The same for the steered continuation; null: not recorded."
    )


class SteeringResult(_Model):
    """The effect of adding α·s_max·d_i to the residual stream (SCIENCE.md §8)."""

    alpha: float = Field(description="Steering coefficient: negative suppresses, positive amplifies.")
    kl_feature_prompts: NonNegative = Field(description="Mean KL(steered‖unsteered) on prompts where it fires.")
    kl_neutral_prompts: NonNegative = Field(description="Mean KL on unrelated prompts (side effects).")
    delta_logprob_promoted: float = Field(description="Mean change in log-prob of the feature's promoted tokens.")
    continuations: list[Continuation] = Field(default_factory=list, description="Example generations.")


class DivergentToken(_Model):
    """A next token the feature makes its model more likely to say, and how likely each model finds it."""

    context: str = Field(description="The context (owner's text) ending at the token the feature fired on.")
    text: str | None = Field(description="The token's text; null for end-of-text.")
    gain: float = Field(description="Probability the feature adds to it: p − p(feature removed where it fires).")
    logprob_owner: float = Field(description="log P(text | context) under the feature's model (floored at ln 1e-8).")
    logprob_other: float = Field(description="log P(text | context) under the other model, in its own tokenizer.")


class Divergence(_Model):
    """Does the feature push its model toward text the other model would not write? (dfc/behaviour/divergence.py)"""

    nats: float = Field(
        description="Mean over contexts of Σ gain · (log P_owner − log P_other) over the tokens it promotes; "
        "high: a behaviour the other model lacks; ≈ 0: a new encoding of something both would say."
    )
    removal_kl: NonNegative = Field(description="Next-token KL at the token it fired on when it is removed there.")
    contexts: Count = Field(description="Top contexts measured.")
    tokens: list[DivergentToken] = Field(default_factory=list, description="The promoted tokens, most divergent first.")


class Explanation(_Model):
    """A natural-language label for a feature, written by an LLM from its contexts."""

    text: str = Field(description="The explanation.")
    explainer: str = Field(description="Which model wrote it.")
    detection_score: Fraction | None = Field(
        default=None,
        description="Balanced accuracy of a judge telling top from random contexts given only the explanation "
        "(≥ 0.8: interpretable; null: not judged).",
    )
    detection_contexts: Count | None = Field(
        default=None, description="Contexts the judge classified (top and random together)."
    )


class SeedEvidence(_Model):
    """One seed's crosscoder that has the finding: which of its features matched, and how closely."""

    run: Count = Field(description="Place of the seed in the ensemble (0 = the audit's own seed).")
    seed: int = Field(description="Training seed of that crosscoder.")
    feature: Count = Field(description="The matched feature's index in that crosscoder's dictionary.")
    cosine: float = Field(ge=-1.0, le=1.0, description="Decoder cosine with the reported feature (1 for itself).")


class FeatureReport(_Model):
    """Everything the audit found about one exclusive feature."""

    index: Count = Field(description="Feature index in the crosscoder's dictionary.")
    owner: Owner = Field(description="The model this feature is exclusive to.")
    rank: int = Field(ge=1, description="Position in the owner's ranked list (1 = most noteworthy).")
    score: float = Field(description="Ranking score; higher ranks first.")
    score_components: dict[str, float] = Field(description="Named ingredients of the score and their values.")
    score_weights: dict[str, float] = Field(description="Weight applied to each score component.")
    stats: FeatureStats = Field(description="Activation statistics.")
    top_contexts: list[Context] = Field(description="Highest-activating snippets, strongest first.")
    weak_contexts: list[Context] = Field(default_factory=list, description="Snippets with weak activations.")
    promoted_tokens: list[TokenValue] = Field(description="Tokens whose logits the decoder direction raises most.")
    suppressed_tokens: list[TokenValue] = Field(description="Tokens whose logits it lowers most.")
    checks: FalsePositiveChecks = Field(description="False-positive checks.")
    steering: list[SteeringResult] = Field(default_factory=list, description="Steering results, one per α.")
    divergence: Divergence | None = Field(
        default=None, description="Behavioural divergence from the other model (null: not measured)."
    )
    explanation: Explanation | None = Field(default=None, description="Optional LLM-written explanation.")
    run: Count | None = Field(
        default=None, description="Which seed's crosscoder the feature (and its index) belongs to (null: before 1.6)."
    )
    seed: int | None = Field(default=None, description="That crosscoder's training seed (null: before 1.6).")
    stability: Fraction | None = Field(
        default=None, description="Share of the ensemble's seeds that have this feature (null: one seed)."
    )
    seeds: list[SeedEvidence] = Field(
        default_factory=list, description="Every seed that has it, with its matched feature (itself included)."
    )

    @property
    def label(self) -> str:
        """How the report names it: its index, with its seed when it comes from another seed than the first."""
        return str(self.index) if not self.run else f"{self.index}@seed{self.seed}"

    @property
    def stability_text(self) -> str:
        """"3/3 seeds", or "" for a one-seed audit."""
        if self.stability is None or not self.seeds:
            return ""
        n = round(len(self.seeds) / self.stability) if self.stability > 0 else len(self.seeds)
        return f"{len(self.seeds)}/{n} seed{'s' if n > 1 else ''}"

    @model_validator(mode="after")
    def _consistent(self) -> FeatureReport:
        unknown = sorted(set(self.score_weights) - set(self.score_components))
        if unknown:
            raise ValueError(f"score_weights names {unknown} that are not in score_components")
        alphas = [s.alpha for s in self.steering]
        if len(set(alphas)) != len(alphas):
            raise ValueError(f"steering has repeated alpha values {alphas}; give one result per alpha")
        return self


class Histogram(_Model):
    """Counts of values falling between consecutive bin edges."""

    bin_edges: list[float] = Field(min_length=2, description="Increasing bin edges (one more than counts).")
    counts: list[Count] = Field(description="How many values fall in each bin.")

    @model_validator(mode="after")
    def _shape(self) -> Histogram:
        if len(self.bin_edges) != len(self.counts) + 1:
            raise ValueError(
                f"bin_edges has {len(self.bin_edges)} entries; it needs len(counts) + 1 = {len(self.counts) + 1}"
            )
        if any(b <= a for a, b in itertools.pairwise(self.bin_edges)):
            raise ValueError("bin_edges must be strictly increasing")
        return self


class SharedFeature(_Model):
    """A compact line about one shared feature, for search."""

    index: Count = Field(description="Feature index in the dictionary.")
    relative_norm: Fraction = Field(description="‖d_A‖ / (‖d_A‖ + ‖d_B‖): 1 → A-leaning, 0 → B-leaning.")
    frequency: Fraction = Field(description="Share of tokens on which it is active.")
    top_tokens: list[str] = Field(default_factory=list, description="A few tokens it fires on most.")
    snippet: str = Field(default="", description="A short top-activating context.")


class SharedSummary(_Model):
    """What the two models have in common."""

    n_shared: Count = Field(description="Number of shared features in the dictionary.")
    n_alive: Count = Field(description="Shared features that fired at least once.")
    relative_norm_histogram: Histogram = Field(description="Histogram of shared features' relative decoder norms.")
    features: list[SharedFeature] = Field(default_factory=list, description="Searchable list of shared features.")


class TransferComponent(_Model):
    """One shared feature used to carry a steering vector across (SCIENCE.md §9)."""

    feature: Count = Field(description="Shared feature index.")
    weight: float = Field(ge=-1.0, le=1.0, description="Cosine between its source decoder and the vector.")


class SteeringTransfer(_Model):
    """A steering vector of one model rebuilt in the other through shared features (SCIENCE.md §9)."""

    source: Owner = Field(description="Model the steering vector comes from.")
    target: Owner = Field(description="Model it is transferred to.")
    vector_name: str = Field(description="What the vector steers towards, e.g. 'sycophancy'.")
    components: list[TransferComponent] = Field(min_length=1, description="Shared features used, top-n by weight.")
    source_coefficient: float = Field(description="Steering coefficient used in the source model.")
    target_coefficient: float = Field(description="Steering coefficient used in the target model.")
    continuations: list[Continuation] = Field(default_factory=list, description="Target model, without/with.")
    notes: str = Field(default="", description="Free-text assessment of whether the behaviour transferred.")

    @model_validator(mode="after")
    def _two_models(self) -> SteeringTransfer:
        if self.source == self.target:
            raise ValueError(f"source and target are both {self.source!r}; a transfer goes from one model to the other")
        return self


class EnsembleInfo(_Model):
    """The crosscoders trained with different seeds and how their findings were matched (SCIENCE.md §11)."""

    runs: int = Field(ge=1, description="Crosscoders trained (seeds).")
    seeds: list[int] = Field(description="Their training seeds, run 0 first.")
    match_threshold: float | None = Field(
        default=None, description="Decoder cosine a match needed: the spec's, or the chance level if higher."
    )
    chance_cosine: dict[str, float] = Field(
        default_factory=dict, description="Per model (A, B): the 99th percentile of matches against random directions."
    )
    in_every_seed: dict[str, Count] = Field(default_factory=dict, description="Per model: findings every seed has.")
    in_one_seed: dict[str, Count] = Field(default_factory=dict, description="Per model: findings of one seed only.")


class FeatureLink(_Model):
    """A feature that carries a divergent context: removing it at that token closes part of the gap."""

    index: Count = Field(description="Feature index in its seed's dictionary.")
    run: Count = Field(description="Which seed's crosscoder.")
    seed: int = Field(description="That crosscoder's training seed.")
    partition: Literal["A-only", "B-only", "shared"] = Field(description="Where the feature sits in the dictionary.")
    closes: float = Field(description="Share of the context's gap its removal closes (1 = all of it).")
    activation: NonNegative = Field(description="The feature's activation at the context's last token.")
    reported: bool = Field(description="Whether it is one of the report's ranked features (it has a card).")


class ScanExample(_Model):
    """One more place where the model says the same thing."""

    doc_id: str = Field(description="The document.")
    context: str = Field(description="The context, ending where the model speaks.")
    gap: float = Field(description="Its gain-weighted log-probability gap, in nats.")


class DivergentContext(_Model):
    """A context where one model says something the other would not (the behaviour-first scan)."""

    owner: Owner = Field(description="The model that says it.")
    rank: int = Field(ge=1, description="Rank among this owner's divergent contexts (1 = largest).")
    context: str = Field(description="The context (the owner's tokens decoded), ending where the model speaks.")
    doc_id: str = Field(description="The document it comes from.")
    text: str | None = Field(description="What the owner says next: its most divergent token's text (null: end).")
    p_owner: Fraction = Field(description="The owner's probability of that token.")
    logprob_owner: float = Field(description="log P(text | context) under the owner.")
    logprob_other: float = Field(description="log P(text | context) under the other model, in its own tokenizer.")
    gap: float = Field(description="Σ over the owner's top tokens of p · (log P_owner − log P_other), in nats.")
    score: float = Field(description="The gaps summed over the documents where the owner says the same (ranks).")
    salience: float | None = Field(
        default=None, description="log(score) over the median log score of the owner's other top entries: how far it "
        "stands out from this pair's background of differences (the null check reads it; null: nothing to compare)."
    )
    occurrences: int = Field(ge=1, description="Documents in which the owner says the same text with a positive gap.")
    examples: list[ScanExample] = Field(default_factory=list, description="Other documents where it says it.")
    features: list[FeatureLink] = Field(
        default_factory=list, description="The features whose removal closes the gap most, best first."
    )
    passes_null: bool | None = Field(
        default=None, description="Whether its gap (and salience, where that is calibrated) is above the null pairs' "
        "threshold (null: uncalibrated, or no statistic to compare)."
    )


class ScanInfo(_Model):
    """How the behaviour-first scan ran."""

    contexts_screened: dict[str, Count] = Field(description="Per owner: aligned contexts screened cheaply.")
    contexts_scored: dict[str, Count] = Field(description="Per owner: contexts scored exactly.")
    top_k: int = Field(ge=1, description="Most likely next tokens of the owner read per context.")
    null_threshold: float | None = Field(
        default=None, description="Salience above which an entry passes the null check (null: not checked)."
    )
    null_gap: float | None = Field(
        default=None, description="Gap in nats above which an entry passes the null check (null: not checked; "
        "before 1.7)."
    )
    seconds: NonNegative = Field(description="Wall-clock time of the scan.")


class AuditReport(_Model):
    """The audit of model B (new) against model A (reference): the features exclusive to each, with evidence."""

    schema_version: Literal["1.0", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7"] = Field(
        default=SCHEMA_VERSION, description="Version of this schema."
    )
    audit_id: str = Field(min_length=1, description="Identifier of the audit.")
    created_at: datetime = Field(description="When the audit was submitted.")
    finished_at: datetime = Field(description="When the report was published.")
    model_a: ModelInfo = Field(description="The reference (trusted) model.")
    model_b: ModelInfo = Field(description="The model under audit.")
    corpus: CorpusInfo = Field(description="The corpus both models read.")
    alignment: AlignmentSummary = Field(description="Tokenizer alignment summary.")
    crosscoder: CrosscoderInfo = Field(description="Crosscoder architecture and training configuration.")
    training: TrainingMetrics = Field(description="Training and evaluation metrics.")
    spec: dict[str, Any] = Field(default_factory=dict, description="The audit spec as submitted, echoed.")
    features_a: list[FeatureReport] = Field(description="Ranked features exclusive to model A.")
    features_b: list[FeatureReport] = Field(description="Ranked features exclusive to model B.")
    shared_summary: SharedSummary = Field(description="Summary of the shared features.")
    steering_transfer: SteeringTransfer | None = Field(default=None, description="Optional steering transfer.")
    warnings: list[str] = Field(default_factory=list, description="Audit-wide warnings for the reader.")
    checks_calibration: ChecksCalibration | None = Field(
        default=None, description="The null calibration the checks used (null: reports before 1.5)."
    )
    ensemble: EnsembleInfo | None = Field(default=None, description="The seed ensemble (null: before 1.6).")
    divergent_contexts: list[DivergentContext] | None = Field(
        default=None, description="The behaviour-first scan's findings, both directions (null: not run, or before 1.6)."
    )
    scan: ScanInfo | None = Field(default=None, description="How the scan ran (null: not run, or before 1.6).")

    @model_validator(mode="after")
    def _consistent(self) -> AuditReport:
        if self.finished_at < self.created_at:
            raise ValueError(f"finished_at={self.finished_at} is before created_at={self.created_at}")
        for field, owner in (("features_a", "A"), ("features_b", "B")):
            _check_ranked(getattr(self, field), field, owner, self.crosscoder.n_features)
        for i, shared in enumerate(self.shared_summary.features):
            if shared.index >= self.crosscoder.n_features:
                raise ValueError(
                    f"shared_summary.features[{i}].index={shared.index} is outside the dictionary "
                    f"(n_features={self.crosscoder.n_features})"
                )
        return self

    def features(self, owner: Owner) -> list[FeatureReport]:
        """The ranked exclusive features of model ``owner``."""
        return self.features_a if owner == "A" else self.features_b

    def model(self, owner: Owner) -> ModelInfo:
        """The model called ``owner`` ("A" or "B")."""
        return self.model_a if owner == "A" else self.model_b


def _check_ranked(features: list[FeatureReport], field: str, owner: str, n_features: int) -> None:
    """Raise unless ``features`` belong to ``owner``, are ranked 1..n in order by non-increasing score."""
    seen: set[tuple[int, int]] = set()
    for i, feature in enumerate(features):
        where = f"{field}[{i}]"
        if feature.owner != owner:
            raise ValueError(f"{where}.owner={feature.owner!r}, but {field} lists features exclusive to {owner!r}")
        if feature.rank != i + 1:
            raise ValueError(f"{where}.rank={feature.rank}; ranks must run 1..{len(features)} in list order")
        if i and feature.score > features[i - 1].score:
            raise ValueError(
                f"{where}.score={feature.score} is above the score of rank {i} ({features[i - 1].score}); "
                "list features by non-increasing score"
            )
        if feature.index >= n_features:
            raise ValueError(f"{where}.index={feature.index} is outside the dictionary (n_features={n_features})")
        if (feature.run or 0, feature.index) in seen:
            raise ValueError(f"{where}.index={feature.index} of run {feature.run or 0} appears twice in {field}")
        seen.add((feature.run or 0, feature.index))
