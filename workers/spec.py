"""The one description of an audit: what the API validates, the CLI builds, the workers read and the report echoes.

Defaults for real models follow the paper's recipe (SCIENCE.md §4) scaled to the token budget;
values that depend on the models (dictionary size, steps) are left ``None`` here and resolved by
:meth:`AuditSpec.resolve` once the models' widths are known.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workers.activations.corpus import CorpusSpec

# A hub id ("org/name", "name") or a local path; the hub's own rules: letters, digits, "-", "_", ".".
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
MAX_TOKEN_BUDGET = 10_000_000_000
"""Ten billion tokens: 100× the paper's budget; anything above is a typo, not an audit."""
MAX_WEIGHT = 1e6
"""Largest magnitude of a ranking weight or threshold: beyond it the score's arithmetic loses its meaning."""
MAX_CHARS = 1_000_000_000
"""Largest ``corpus.max_chars``: a billion characters per document is no limit at all."""

# What the Hub accepts as a revision: a branch or tag name under git's rules (git check-ref-format), which a
# 40-hex commit id also satisfies. The revision becomes part of object keys, so "..", a leading "/" or a
# control character must never get through.
_REF_FORBIDDEN = re.compile(r"[~^:?*\[\\]")

Weight = Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)]
Penalty = Annotated[float, Field(ge=0, le=MAX_WEIGHT)]
Threshold = Annotated[float, Field(gt=0, le=MAX_WEIGHT)]
LayerSpec = Annotated[
    int | Literal["middle"], Field(description='Decoder block index, negative from the end, or "middle".')
]


class _Strict(BaseModel):
    # allow_inf_nan=False: JSON has no NaN or infinity (1e400 parses as one), so such a number is a client's
    # mistake, answered with the field's name, never carried into training.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def revision_problem(value: str) -> str | None:
    """Why ``value`` is not a branch, tag or commit name the Hub could resolve (None when it is one)."""
    if not value:
        return "it is empty"
    if len(value) > 255:
        return f"it is {len(value)} characters long (at most 255)"
    if any(c.isspace() or not c.isprintable() for c in value):
        return "it contains a space or control character"
    if bad := _REF_FORBIDDEN.search(value):
        return f"it contains {bad.group()!r}"
    if value.startswith("/") or value.endswith("/") or "//" in value:
        return "it starts or ends with '/' or has an empty segment ('//')"
    if ".." in value:
        return "it contains '..'"
    if any(segment.startswith(".") or segment.endswith(".lock") for segment in value.split("/")):
        return "a segment starts with '.' or ends with '.lock'"
    if value.endswith(".") or "@{" in value or value == "@":
        return "it ends with '.' or contains '@{'"
    return None


MAX_REPLICAS = 1024
"""Most extraction replicas of one model: far beyond any cluster's GPUs, so a larger number is a typo."""


class Resources(_Strict):
    """What each of one model's extraction actors (replicas) reserves on the Ray cluster, and how many there are."""

    num_gpus: float = Field(0.0, ge=0, le=16, description="GPUs for each of this model's actors (fractions allowed).")
    num_cpus: float = Field(1.0, gt=0, le=256, description="CPUs for each of this model's actors.")
    max_memory: dict[str, str] | None = Field(
        None, description='accelerate max_memory per device, e.g. {"0": "70GiB", "cpu": "200GiB"}.'
    )
    replicas: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] | Literal["auto"] = Field(
        1,
        description=(
            "Data-parallel extraction: actors of this model, each holding the model (a full copy, or sharded by "
            "device_map across its num_gpus) and extracting its own blocks of documents. \"auto\": as many as the "
            "cluster's free GPUs allow at num_gpus each (with num_gpus 0 or on a cluster without GPUs: its free "
            "CPUs at num_cpus each), shared with the other model if it asks for \"auto\" too, and at most one per "
            "shard. The stored shards are the same for any number."
        ),
    )

    @field_validator("replicas", mode="before")
    @classmethod
    def _valid_replicas(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_REPLICAS):
            return value
        raise ValueError(
            f"replicas {value!r} is neither a whole number from 1 to {MAX_REPLICAS} nor \"auto\"; give the number "
            "of extraction actors for this model, or \"auto\" for as many as the cluster's free GPUs allow"
        )


class ModelRef(_Strict):
    """One of the two models being compared."""

    id: str = Field(description="Hugging Face model id (org/name) or a local directory path.", min_length=1)
    revision: str = Field("main", description="Branch, tag or commit; resolved to a commit and recorded.")
    layer: LayerSpec = "middle"
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        None, description="Weights dtype; default bfloat16 on GPU, float32 on CPU."
    )
    device_map: Literal["auto"] | None = Field("auto", description='accelerate device_map: "auto" shards across GPUs.')
    resources: Resources = Field(default_factory=Resources, description="Ray resources for this model.")

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        if value.startswith(("/", "./", "../", "~")) or _HUB_ID.match(value):
            return value
        raise ValueError(
            f"model id {value!r} is neither a Hugging Face id (org/name: letters, digits, '-', '_', '.') "
            "nor a local path (start it with / or ./)"
        )

    @field_validator("revision")
    @classmethod
    def _valid_revision(cls, value: str) -> str:
        problem = revision_problem(value)
        if problem:
            raise ValueError(
                f"revision {value!r} is not a branch, tag or commit: {problem}; give a branch or tag name "
                "(main, v1.0, refs/pr/1) or a 40-character commit hash"
            )
        return value


class CrosscoderSpec(_Strict):
    """The dictionary to train."""

    architecture: Literal["dfc", "standard", "dsf"] = Field("dfc", description="Crosscoder family.")
    n_features: int | None = Field(
        None, ge=16, le=1_048_576, description="Dictionary size; default 32× the wider model, at most 131,072 (paper)."
    )
    k: int | None = Field(None, ge=1, le=4096, description="Active features per token; default 200 at paper scale.")
    a_only: float = Field(0.05, ge=0, lt=0.5, description="DFC: share of the dictionary exclusive to model A.")
    b_only: float = Field(0.05, ge=0, lt=0.5, description="DFC: share of the dictionary exclusive to model B.")


MAX_TRAINING_WORKERS = 256
"""Most data-parallel workers of one crosscoder: past a cluster's GPUs, so a larger number is a typo."""


class TrainingSpec(_Strict):
    """How to train the crosscoder (SCIENCE.md §4)."""

    steps: int | None = Field(None, ge=1, le=10_000_000, description="Optimiser steps; default 2 epochs of the budget.")
    batch_size: int = Field(2048, ge=8, le=65536, description="Token pairs per step (paper: 2048).")
    lr: float = Field(1e-4, gt=0, le=1.0, description="Peak Adam learning rate (paper: 1e-4).")
    epochs: float = Field(2.0, gt=0, le=100, description="Passes over the paired tokens when steps is not given.")
    dead_after_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_TOKEN_BUDGET,
        description="Dead-feature window; default 10M tokens, or 10% of training for short runs.",
    )
    aux_k: int | None = Field(
        None, ge=1, le=1_048_576, description="AuxK dead features per token; default (d_A + d_B) / 4."
    )
    aux_alpha: float = Field(1 / 32, ge=0, le=10, description="AuxK loss weight (paper: 1/32).")
    exclusive_init_norm: float | None = Field(
        None,
        gt=0,
        le=10,
        description="DFC: initial decoder norm of exclusive features (default: the shared one, 0.4). Twice it "
        "gives an exclusive feature the same total decoder norm, hence the same BatchTopK chance, as a shared one.",
    )
    checkpoint_every: int = Field(
        1000, ge=0, le=10_000_000, description="Steps between checkpoints in storage (0: only at the end)."
    )
    num_gpus: float = Field(
        0.0, ge=0, le=16, description="GPUs for each training actor (each worker of each seed's crosscoder)."
    )
    workers: int = Field(
        1,
        ge=1,
        le=MAX_TRAINING_WORKERS,
        description="Data-parallel workers per crosscoder: each trains on rows r::workers of every batch (batch_size "
        "is the global batch, a multiple of workers), gradients and batch statistics are all-reduced (gloo on CPU, "
        "NCCL on GPU) and the result is one worker's, up to float rounding. A seed's run takes workers × (1 CPU, "
        "num_gpus); as many seeds train at once as the cluster holds.",
    )
    seeds: int = Field(
        3,
        ge=1,
        le=16,
        description="Crosscoders trained on the same activations with seeds seed, seed+1, …, in parallel actors; "
        "their findings are matched and each gets a stability, the share of seeds that have it (1: no ensemble).",
    )
    match_threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Decoder cosine at or above which features of two seeds count as one (the chance level of a "
        "match at the models' widths, measured per audit, is a floor under it).",
    )


    @model_validator(mode="after")
    def _workers_share_the_batch(self) -> TrainingSpec:
        if self.batch_size % self.workers:
            raise ValueError(
                f"training.batch_size {self.batch_size} does not split evenly over training.workers {self.workers}; "
                "make the batch size (the global batch) a multiple of the number of workers"
            )
        if self.workers > 1 and self.num_gpus and self.num_gpus != int(self.num_gpus):
            raise ValueError(
                f"training.num_gpus {self.num_gpus} with training.workers {self.workers}: NCCL needs a whole GPU per "
                "worker (two workers on one GPU cannot form a group); give num_gpus 1 (or more), or 0 for CPU"
            )
        return self


class TransferSpec(_Strict):
    """A steering vector of one model to carry to the other through shared features (SCIENCE.md §9).

    Give the vector itself (``vector``, raw activation scale at the source model's audited layer) or prompts
    that contrast the behaviour (``positive``/``negative``: the difference of their mean activations).
    """

    name: str = Field(min_length=1, max_length=100, description="What the vector steers towards, e.g. 'sycophancy'.")
    source: Literal["a", "b"] = Field("a", description="The model the vector belongs to; it is carried to the other.")
    vector: list[float] | None = Field(
        None, min_length=1, max_length=65_536, description="The vector, one value per dimension of the source layer."
    )
    positive: list[str] = Field(
        default_factory=list, max_length=100, description="Prompts showing the behaviour (with negative, builds v)."
    )
    negative: list[str] = Field(
        default_factory=list, max_length=100, description="Prompts without it (with positive, builds the vector)."
    )
    coefficient: float = Field(1.0, description="α of α·v in the source model (recorded; v is at its own norm).")
    target_coefficient: float | None = Field(
        None, description="α of α·v' in the target model when its continuations are generated; default: coefficient."
    )
    n_features: int = Field(10, ge=1, le=1000, description="Shared features the vector is rebuilt from (paper: 10).")

    @model_validator(mode="after")
    def _one_source_of_the_vector(self) -> TransferSpec:
        contrast = bool(self.positive) or bool(self.negative)
        if (self.vector is None) == (not contrast):
            raise ValueError("give the steering vector either as vector or as positive and negative prompts")
        if contrast and not (self.positive and self.negative):
            raise ValueError("a contrast vector needs both positive and negative prompts")
        values = [*(self.vector or []), self.coefficient, self.target_coefficient or 0.0]
        if not all(math.isfinite(v) and abs(v) <= 1e6 for v in values):
            raise ValueError("the vector and the coefficients must be finite (|value| ≤ 1e6)")
        return self


class SteeringSpec(_Strict):
    """Causal evidence: suppress and amplify the top features (SCIENCE.md §8)."""

    enabled: bool = Field(True, description="Run the steering stage.")
    top_n: int = Field(20, ge=0, le=500, description="Features per model to steer.")
    alphas: list[float] = Field(
        default_factory=lambda: [-8.0, -4.0, -2.0, 2.0, 4.0, 8.0],
        description="Coefficients α in α·s_max·d_i; negative suppresses, positive amplifies.",
        min_length=1,
        max_length=32,
    )
    probe_prompts: list[str] = Field(
        default_factory=list, description="Extra prompts for side-by-side generations.", max_length=100
    )
    max_new_tokens: int = Field(40, ge=1, le=500, description="Length of generated continuations (greedy).")
    transfer: TransferSpec | None = Field(
        None, description="A steering vector to carry across through shared features; its own report section."
    )

    @model_validator(mode="after")
    def _transfer_needs_the_stage(self) -> SteeringSpec:
        if self.transfer is not None and not self.enabled:
            raise ValueError("a steering transfer runs in the steering stage: set steering.enabled to true")
        return self

    @field_validator("alphas")
    @classmethod
    def _finite_alphas(cls, value: list[float]) -> list[float]:
        bad = [a for a in value if not math.isfinite(a) or abs(a) > 1000]
        if bad:
            raise ValueError(f"steering coefficients must be finite and |α| ≤ 1000, got {bad}")
        return value


class ScanSpec(_Strict):
    """The behaviour-first scan: contexts where one model says what the other would not (SCIENCE.md §11)."""

    enabled: bool = Field(True, description="Run the scan (both directions: B against A and A against B).")
    top_k: int = Field(3, ge=1, le=20, description="Each model's most likely next tokens read per context.")
    min_prob: float = Field(
        0.05, ge=0.0, le=1.0, description="Next tokens the owner gives less probability than this are not read."
    )
    complete_words: int = Field(
        6, ge=0, le=32, description="A next token of spaces only is completed greedily to the end of the word that "
        "follows, at most this many tokens (0: off): fine tokenizers spell a word they lack from a bare space.",
    )
    contexts: int = Field(
        256, ge=1, le=100_000, description="Contexts per direction scored exactly (the rest are screened cheaply)."
    )
    documents: int | None = Field(
        None, ge=1, le=10_000_000, description="Documents of the analysed text screened; null: all of them."
    )
    report: int = Field(20, ge=1, le=1000, description="Divergent contexts reported per direction, deduplicated.")
    attribute: int = Field(
        10, ge=0, le=1000, description="Of those, how many are attributed to the features whose removal closes them."
    )


class ExplainSpec(_Strict):
    """Optional LLM explanations of the top features, judged by a detection score (SCIENCE.md §6).

    The endpoint is the deployment's (``DFC_EXPLAINER_*`` on the workers), not the spec's: contexts from the
    corpus are sent to it. The report is complete without explanations.
    """

    enabled: bool = Field(False, description="Write explanations (needs DFC_EXPLAINER_URL and _MODEL on the workers).")
    top_n: int = Field(20, ge=1, le=500, description="Features per model to explain, best ranked first.")
    detection: bool = Field(True, description="Judge each explanation on top vs random contexts (one more request).")
    contexts: int = Field(
        10, ge=2, le=10, description="Top contexts shown to the explainer, and of each kind shown to the judge "
        "(the analysis keeps 10 per feature)."
    )


class RankingWeights(_Strict):
    """Weights of the feature-ranking score's components (shown in the report)."""

    strength: Weight = Field(1.0, description="Weight of the feature's (normalised) activation strength.")
    frequency: Weight = Field(1.0, description="Weight of the log activation frequency.")
    false_positive_penalty: Penalty = Field(1.0, description="Penalty for failing the Latent Scaling checks.")
    steering: Weight = Field(1.0, description="Weight of the measured steering effect.")
    divergence: Weight = Field(
        2.0,
        description="Weight of the behavioural divergence from the other model (how much the feature moves its "
        "model toward text the other would not write; measured in the steering stage).",
    )
    stability: Weight = Field(
        1.0, description="Weight of a finding's stability, the share of crosscoder seeds that have it (ensembles)."
    )
    nu_eps_max: Threshold = Field(
        0.2, description="Latent Scaling ν_ε threshold where the other model has a decoder (paper: 0.2)."
    )
    nu_r_max: Threshold = Field(
        0.5, description="Latent Scaling ν_r threshold where the other model has a decoder (paper: 0.5)."
    )
    nu_eps_max_cross: Threshold = Field(
        1.0, description="ν_ε threshold for exclusive features the other model has no decoder for."
    )
    nu_r_max_cross: Threshold | None = Field(
        None, description="ν_r threshold for such features; null: ν_r reported but not tested there."
    )


CHECK_STATISTICS = ("divergence", "removal_kl", "specificity", "score")
"""What the null-calibrated checks read of a finding: ``dfc.analysis.null.STATISTICS`` (named again here, because
the API reads specs without importing the science)."""


class NullCalibrationSpec(_Strict):
    """Thresholds of the false-positive checks, each a percentile of null-pair features' statistic
    (``benchmarks/calibrate.py`` writes one; SCIENCE.md §11)."""

    thresholds: dict[str, float] = Field(description="Statistic → threshold a finding must be above.")
    percentiles: dict[str, float] = Field(description="Statistic → the null percentile (0–100) its threshold is.")
    null_pairs: int = Field(ge=1, le=1_000_000, description="Null pairs audited for the calibration.")
    null_features: int = Field(ge=1, le=10**9, description="Null features the percentiles were taken over.")
    passing_per_pair: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="Per null pair, its features that pass every check (chance findings)."
    )
    source: str = Field("", max_length=2000, description="Where the calibration came from, for the report.")
    scan_salience: float | None = Field(
        None, ge=-1e3, le=1e3, description="Behaviour-first scan: the salience an entry must be above (log ratio of "
        "its score to the median of the audit's other top entries)."
    )
    scan_percentile: float | None = Field(None, ge=0, le=100, description="Null percentile of the scan's thresholds.")
    scan_gap: float | None = Field(
        None, ge=0, le=1e3, description="Behaviour-first scan: the gap in nats an entry must be above (its owner's "
        "top next tokens, log-probability under the owner over the other, weighted by the owner's probability)."
    )

    @model_validator(mode="after")
    def _known_statistics(self) -> NullCalibrationSpec:
        unknown = sorted((set(self.thresholds) | set(self.percentiles)) - set(CHECK_STATISTICS))
        if unknown:
            raise ValueError(f"unknown check statistics {unknown}; choose from {list(CHECK_STATISTICS)}")
        if set(self.thresholds) != set(self.percentiles):
            raise ValueError("thresholds and percentiles must name the same checks")
        if not self.thresholds:
            raise ValueError("a calibration needs at least one check")
        bad = [k for k, v in self.percentiles.items() if not 0 <= v <= 100]
        if bad:
            raise ValueError(f"percentiles of {bad} must be between 0 and 100")
        return self


class ChecksSpec(_Strict):
    """The false-positive checks a finding must pass to be marked ✓ (Latent Scaling, and the null-calibrated ones)."""

    calibration: NullCalibrationSpec | None = Field(
        None,
        description="Null calibration of the checks; null: the one shipped with the package (tiny planted null "
        "pairs). For models of another scale, audit a null pair of your own and pass its calibration here.",
    )


class AuditSpec(_Strict):
    """Everything that defines an audit of model B against the trusted model A."""

    model_a: ModelRef = Field(description="The trusted reference model.")
    model_b: ModelRef = Field(description="The model under audit.")
    corpus: CorpusSpec = Field(default_factory=CorpusSpec, description="Text both models read.")
    token_budget: int = Field(
        2_000_000, ge=1_000, le=MAX_TOKEN_BUDGET, description="Tokens of the corpus to extract per model (paper: 100M)."
    )
    max_length: int = Field(1024, ge=8, le=32768, description="Tokens per document; longer ones are truncated.")
    crosscoder: CrosscoderSpec = Field(default_factory=CrosscoderSpec, description="The dictionary.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="The training recipe.")
    steering: SteeringSpec = Field(default_factory=SteeringSpec, description="The steering stage.")
    ranking: RankingWeights = Field(default_factory=RankingWeights, description="Feature-ranking weights.")
    checks: ChecksSpec = Field(default_factory=ChecksSpec, description="False-positive checks and their calibration.")
    explain: ExplainSpec = Field(default_factory=ExplainSpec, description="Optional LLM explanations (off).")
    scan: ScanSpec = Field(default_factory=ScanSpec, description="The behaviour-first scan (divergent contexts).")
    top_features: int = Field(50, ge=1, le=5000, description="Features per model analysed in depth and reported.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for initialisation and data order.")
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form labels echoed in the report.")

    @field_validator("corpus")
    @classmethod
    def _corpus_limits_in_range(cls, corpus: CorpusSpec) -> CorpusSpec:
        # CorpusSpec (a dataclass of workers.activations) checks its limits are positive; here, that they are
        # numbers an audit could mean.
        for part in (corpus, *corpus.parts):
            for name, limit in (("max_docs", MAX_TOKEN_BUDGET), ("max_chars", MAX_CHARS)):
                value = getattr(part, name)
                if value is not None and value > limit:
                    shown = value if value < 10**15 else f"a {len(str(value))}-digit number"
                    raise ValueError(f"corpus {name} is {shown}, out of range: at most {limit:,}")
        return corpus

    @model_validator(mode="after")
    def _two_different_models(self) -> AuditSpec:
        a, b = self.model_a, self.model_b
        if (a.id, a.revision) == (b.id, b.revision):
            raise ValueError(
                f"model_a and model_b are the same model ({a.id}@{a.revision}); an audit compares two different models"
            )
        if self.crosscoder.architecture == "dfc" and self.crosscoder.a_only + self.crosscoder.b_only >= 0.9:
            raise ValueError("a_only + b_only must leave at least 10% of the dictionary shared")
        return self

    def fingerprint(self) -> str:
        """A stable hash of the spec: the same spec submitted twice is the same audit."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def resolve(self, d_a: int, d_b: int, paired_tokens: int) -> ResolvedTraining:
        """Fill in the model-dependent defaults once the widths and the paired-token count are known."""
        c, t = self.crosscoder, self.training
        n_features = c.n_features or min(131_072, 32 * max(d_a, d_b))
        k = c.k or (200 if n_features >= 65_536 else max(4, n_features // 256))
        k = min(k, n_features // 4)
        steps = t.steps or max(1, math.ceil(t.epochs * paired_tokens / t.batch_size))
        dead = t.dead_after_tokens or min(10_000_000, max(t.batch_size, steps * t.batch_size // 10))
        return ResolvedTraining(n_features=n_features, k=k, steps=steps, dead_after_tokens=dead)


class ResolvedTraining(_Strict):
    """Defaults of the crosscoder and training specs resolved for two concrete models."""

    n_features: int
    k: int
    steps: int
    dead_after_tokens: int


def spec_schema() -> dict[str, Any]:
    """The JSON schema of an audit spec (for docs and clients)."""
    return AuditSpec.model_json_schema()
