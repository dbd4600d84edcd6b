"""The architecture of a crosscoder: widths, dictionary size, partitions, sparsity."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Architecture(StrEnum):
    """The crosscoder families this library trains."""

    STANDARD = "standard"
    """BatchTopK crosscoder: every feature may encode and decode both models (Minder et al.)."""
    DSF = "dsf"
    """Designated Shared Features: a block of features with tied decoders and a larger k budget."""
    DFC = "dfc"
    """Dedicated Feature Crosscoder: A-only, B-only and shared partitions, exclusive by construction."""


def _count(value: float | int, total: int, name: str) -> int:
    """Turn a partition size given as a fraction (< 1) or a count into a count."""
    if isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative fraction or count, got {value!r}")
    if isinstance(value, float) and value < 1.0:
        return round(value * total)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name}={value!r}: give a fraction below 1 or a whole number of features")
    return int(value)


@dataclass(frozen=True)
class CrosscoderConfig:
    """Everything needed to rebuild a crosscoder's parameters; saved as ``config.json``.

    Features are laid out as ``[A-only | shared | B-only]``: model A owns the first
    ``n_a_only + n_shared`` features, model B the last ``n_shared + n_b_only``. Each model
    has its own encoder and decoder block over just the features it owns, so an A-only
    feature has no parameter that touches model B.
    """

    d_a: int
    """Width of model A's activations at the hooked layer."""
    d_b: int
    """Width of model B's activations at the hooked layer."""
    n_features: int
    """Dictionary size F (all partitions together)."""
    k: int = 32
    """Average number of active features per token (BatchTopK keeps k·batch activations per batch)."""
    architecture: Architecture = Architecture.DFC
    """Which crosscoder family: standard, dsf or dfc."""
    a_only: float | int = 0.05
    """DFC: A-exclusive partition, as a fraction of the dictionary (< 1) or a count."""
    b_only: float | int = 0.05
    """DFC: B-exclusive partition, as a fraction of the dictionary (< 1) or a count."""
    designated_shared: float | int = 0.10
    """DSF: designated shared features (tied decoders), as a fraction or a count."""
    designated_k_multiplier: float = 2.0
    """DSF: how many times more of the k budget a designated feature gets than a free one."""
    model_names: tuple[str, str] = ("A", "B")
    """Human names of the two models, echoed in reports."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (model ids, layers, corpus hash) stored with the weights."""

    def __post_init__(self) -> None:
        for name in ("d_a", "d_b", "n_features", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "architecture", Architecture(self.architecture))
        object.__setattr__(self, "model_names", tuple(self.model_names))
        if self.k >= self.n_features:
            raise ValueError(
                f"k={self.k} must be smaller than the dictionary size n_features={self.n_features}; "
                "a sparse dictionary keeps only a few features per token"
            )
        if self.n_a_only + self.n_b_only > self.n_features:
            raise ValueError(
                f"partitions a_only={self.n_a_only} + b_only={self.n_b_only} exceed the dictionary "
                f"size {self.n_features}; shrink them or grow n_features"
            )
        if self.n_designated > self.n_shared:
            raise ValueError(f"designated_shared={self.n_designated} exceeds the {self.n_shared} shared features")
        if self.designated_k_multiplier <= 0:
            raise ValueError(f"designated_k_multiplier must be positive, got {self.designated_k_multiplier}")

    @property
    def n_a_only(self) -> int:
        """Number of A-exclusive features (0 unless DFC)."""
        if self.architecture is not Architecture.DFC:
            return 0
        return _count(self.a_only, self.n_features, "a_only")

    @property
    def n_b_only(self) -> int:
        """Number of B-exclusive features (0 unless DFC)."""
        if self.architecture is not Architecture.DFC:
            return 0
        return _count(self.b_only, self.n_features, "b_only")

    @property
    def n_shared(self) -> int:
        """Number of features that encode and decode both models."""
        return self.n_features - self.n_a_only - self.n_b_only

    @property
    def n_designated(self) -> int:
        """Number of designated shared features with tied decoders (0 unless DSF)."""
        if self.architecture is not Architecture.DSF:
            return 0
        return _count(self.designated_shared, self.n_features, "designated_shared")

    @property
    def ties_decoders(self) -> bool:
        """Whether designated features share one decoder parameter across the two models.

        Tying needs equal widths; with ``d_a != d_b`` the designated block keeps a decoder per
        model but is still never labelled exclusive and still gets the larger k budget.
        """
        return self.n_designated > 0 and self.d_a == self.d_b

    @property
    def features_a(self) -> range:
        """Global indices of the features that read and write model A."""
        return range(0, self.n_a_only + self.n_shared)

    @property
    def features_b(self) -> range:
        """Global indices of the features that read and write model B."""
        return range(self.n_a_only, self.n_features)

    @property
    def shared(self) -> range:
        """Global indices of the shared features (designated ones first, for DSF)."""
        return range(self.n_a_only, self.n_a_only + self.n_shared)

    @property
    def a_only_features(self) -> range:
        """Global indices of the A-exclusive partition."""
        return range(0, self.n_a_only)

    @property
    def b_only_features(self) -> range:
        """Global indices of the B-exclusive partition."""
        return range(self.n_a_only + self.n_shared, self.n_features)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["architecture"] = str(self.architecture)
        data["model_names"] = list(self.model_names)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CrosscoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown crosscoder config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
