"""What a trained crosscoder's features do: streaming statistics, top-activating contexts, nearest shared features.

Activations are the crosscoder's own feature values ``f_i`` (computed on normalised inputs). A feature
contributes ``f_i · d_i^m`` to model m's raw activations, with ``d_i^m`` its raw-scale decoder row, so
``s_max = max f_i`` is the unit of steering (:mod:`dfc.behaviour.steering`). Every pass here streams batches and
keeps O(F + features × contexts) memory, whatever the number of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from dfc.behaviour.steering import raw_decoder
from dfc.crosscoder import Crosscoder
from dfc.sparse import SparseFeatures


class PairedTokens(NamedTuple):
    """A batch of paired raw activations and, per token, where it came from (for top contexts)."""

    x_a: Tensor
    x_b: Tensor
    document: Tensor | None = None
    """``(tokens,)`` int64 document index of each token pair."""
    position_a: Tensor | None = None
    """``(tokens,)`` position of the token in model A's tokenisation of its document."""
    position_b: Tensor | None = None
    """Same for model B."""


def _as_paired(batch: PairedTokens | tuple[Tensor, ...], first_row: int) -> PairedTokens:
    """Plain ``(x_a, x_b)`` batches get one pseudo-document per token, numbered across the stream."""
    batch = PairedTokens(*batch)
    n = batch.x_a.shape[0]
    rows = torch.arange(first_row, first_row + n)
    return PairedTokens(
        batch.x_a,
        batch.x_b,
        rows if batch.document is None else batch.document.long().cpu(),
        rows if batch.position_a is None else batch.position_a.long().cpu(),
        rows if batch.position_b is None else batch.position_b.long().cpu(),
    )


def _inference_features(crosscoder: Crosscoder, x_a: Tensor, x_b: Tensor, use_thresholds: bool) -> SparseFeatures:
    with torch.no_grad():
        return crosscoder.encode(x_a, x_b, use_thresholds=use_thresholds)


def _uses_thresholds(crosscoder: Crosscoder, use_thresholds: bool | None) -> bool:
    # Learned thresholds make a token's features independent of the rest of its batch; use them when present.
    return float(crosscoder.thresholds[0]) > 0 if use_thresholds is None else use_thresholds


# ---------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class FeatureStats:
    """Per-feature activation statistics over a token stream, aligned with ``features``.

    ``variance_share_m`` is ``Σ_tokens ‖f_i d_i^m‖² / Σ_tokens ‖x_m − mean(x_m)‖²``: the share of model m's
    variance the feature's own contribution carries (chosen over "FVE lost when ablated" because it needs
    no second pass and adds up over features when decoder rows are near-orthogonal). Scale-free.
    """

    features: Tensor
    tokens: int
    count: Tensor
    """Tokens each feature fired on."""
    sum: Tensor
    max: Tensor
    """Maximum activation ``s_max`` (0 if it never fired)."""
    variance_share_a: Tensor
    variance_share_b: Tensor

    @property
    def frequency(self) -> Tensor:
        """Share of tokens the feature fires on."""
        return self.count.double() / max(self.tokens, 1)

    @property
    def mean(self) -> Tensor:
        """Mean activation over the tokens it fires on (0 if it never fired)."""
        return self.sum / self.count.clamp_min(1)

    def index(self, feature: int) -> int:
        """Row of a global feature index in these statistics."""
        hit = (self.features == feature).nonzero()
        if hit.numel() == 0:
            raise KeyError(f"feature {feature} was not tracked")
        return int(hit[0, 0])

    def row(self, feature: int) -> dict[str, float | int]:
        """One feature's statistics as plain numbers."""
        i = self.index(feature)
        return {
            "feature": feature,
            "frequency": float(self.frequency[i]),
            "count": int(self.count[i]),
            "mean_activation": float(self.mean[i]),
            "max_activation": float(self.max[i]),
            "variance_share_a": float(self.variance_share_a[i]),
            "variance_share_b": float(self.variance_share_b[i]),
        }


class _StatsAccumulator:
    """Streaming sums behind :class:`FeatureStats`."""

    def __init__(self, crosscoder: Crosscoder, features: Tensor) -> None:
        c = crosscoder.config
        self.features = features
        self.slot = torch.full((c.n_features,), -1, dtype=torch.long)
        self.slot[features] = torch.arange(len(features))
        norms = crosscoder.decoder_norms()  # normalised scale, like the activations below
        self.dec_sq_a, self.dec_sq_b = norms.a.cpu()[features].double() ** 2, norms.b.cpu()[features].double() ** 2
        n = len(features)
        self.count = torch.zeros(n, dtype=torch.long)
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.sum_sq = torch.zeros(n, dtype=torch.float64)
        self.max = torch.zeros(n, dtype=torch.float64)
        self.moments = {m: [0.0, torch.zeros(d, dtype=torch.float64), 0.0] for m, d in (("a", c.d_a), ("b", c.d_b))}
        self.tokens = 0

    def update(self, sparse: SparseFeatures, x_a: Tensor, x_b: Tensor) -> None:
        cols = sparse.cols.cpu()
        slot = self.slot[cols]
        keep = slot >= 0
        slot, values = slot[keep], sparse.values.detach().cpu().double()[keep]
        self.count += torch.bincount(slot, minlength=len(self.features))
        self.sum.index_add_(0, slot, values)
        self.sum_sq.index_add_(0, slot, values * values)
        self.max.scatter_reduce_(0, slot, values, reduce="amax")
        for m, x in (("a", x_a), ("b", x_b)):
            x = x.detach().cpu().double()
            moments = self.moments[m]
            moments[0] += x.shape[0]
            moments[1] += x.sum(0)
            moments[2] += float(x.pow(2).sum())
        self.tokens += sparse.batch_size

    def result(self) -> FeatureStats:
        def variance(m: str) -> float:
            n, total, sq = self.moments[m]
            return max(sq - float(total.pow(2).sum()) / max(n, 1), 1e-12)

        return FeatureStats(
            features=self.features,
            tokens=self.tokens,
            count=self.count,
            sum=self.sum,
            max=self.max,
            variance_share_a=self.sum_sq * self.dec_sq_a / variance("a"),
            variance_share_b=self.sum_sq * self.dec_sq_b / variance("b"),
        )


# ---------------------------------------------------------------------------------------------- top contexts
class ActivationRecord(NamedTuple):
    """One strong (or sampled) activation of a feature and where it happened."""

    feature: int
    activation: float
    document: int
    position_a: int
    position_b: int


@dataclass(frozen=True)
class TopActivations:
    """Per feature: its strongest activations (capped per document) and a uniform sample of the others."""

    top: dict[int, list[ActivationRecord]]
    """Strongest first; at most ``per_document`` from any one document."""
    sample: dict[int, list[ActivationRecord]]
    """Uniform sample (without replacement) of the activations not in ``top``, strongest first."""


def _rank_within(groups: Tensor) -> Tensor:
    """For entries already in priority order, each one's rank among the entries of its group."""
    order = torch.sort(groups, stable=True).indices
    sorted_groups = groups[order]
    index = torch.arange(len(groups))
    starts = torch.ones(len(groups), dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), 0).values
    rank = torch.empty_like(index)
    rank[order] = index - first
    return rank


def _keep_best(entries: Tensor, priority: Tensor, limit: int, per_document: int | None) -> Tensor:
    """Rows of ``entries`` (feature, doc, …) kept by a greedy pass in ``priority`` order with both caps.

    A greedy pick under a per-document cap and a total cap is optimal for these partition-matroid limits,
    and an entry dropped now can never be picked later, so pruning after every batch is exact.
    """
    order = torch.argsort(priority, descending=True, stable=True)
    entries = entries[order]
    if per_document is not None:
        pair = torch.unique(entries[:, :2], dim=0, return_inverse=True)[1]
        entries = entries[_rank_within(pair) < per_document]
    return entries[_rank_within(entries[:, 0]) < limit]


class _ContextAccumulator:
    """Keeps the top activations and a bottom-k random-key sample per tracked feature."""

    def __init__(self, n_features: int, features: Tensor, top_n: int, per_document: int, n_sample: int, seed: int):
        self.tracked = torch.zeros(n_features, dtype=torch.bool)
        self.tracked[features] = True
        self.top_n, self.per_document, self.n_sample = top_n, per_document, n_sample
        self.generator = torch.Generator().manual_seed(seed)
        # Columns: feature, document, position_a, position_b, activation, random key (float64 holds ids exactly).
        self.best = torch.zeros(0, 6, dtype=torch.float64)
        self.reservoir = torch.zeros(0, 6, dtype=torch.float64)

    def update(self, sparse: SparseFeatures, batch: PairedTokens) -> None:
        cols, rows = sparse.cols.cpu(), sparse.rows.cpu()
        keep = self.tracked[cols]
        rows, cols, values = rows[keep], cols[keep], sparse.values.detach().cpu().double()[keep]
        keys = torch.rand(len(rows), generator=self.generator, dtype=torch.float64)
        assert batch.document is not None and batch.position_a is not None and batch.position_b is not None
        new = torch.stack(
            [cols.double(), batch.document[rows].double(), batch.position_a[rows].double(),
             batch.position_b[rows].double(), values, keys], dim=1,
        )  # fmt: skip
        best = torch.cat([self.best, new])
        self.best = _keep_best(best, best[:, 4], self.top_n, self.per_document)
        # Bottom-k random keys form a uniform sample; k is widened by top_n so that after removing the
        # entries that end up in `top`, n_sample uniform picks of the rest remain.
        pool = torch.cat([self.reservoir, new])
        self.reservoir = _keep_best(pool, -pool[:, 5], self.n_sample + self.top_n, None)

    def result(self) -> TopActivations:
        def records(rows: Tensor) -> dict[int, list[ActivationRecord]]:
            out: dict[int, list[ActivationRecord]] = {}
            for f, doc, pa, pb, value, _ in rows.tolist():
                out.setdefault(int(f), []).append(ActivationRecord(int(f), value, int(doc), int(pa), int(pb)))
            return out

        best = self.best[torch.argsort(self.best[:, 4], descending=True, stable=True)]
        top = records(best)
        seen = {(r.feature, r.document, r.position_a, r.position_b) for rs in top.values() for r in rs}
        pool = self.reservoir[torch.argsort(self.reservoir[:, 5], stable=True)]
        sample: dict[int, list[ActivationRecord]] = {}
        for f, rs in records(pool).items():
            rest = [r for r in rs if (r.feature, r.document, r.position_a, r.position_b) not in seen]
            sample[f] = sorted(rest[: self.n_sample], key=lambda r: -r.activation)
        return TopActivations(top, sample)


class FeatureScan(NamedTuple):
    """Statistics and contexts from one pass over the data."""

    stats: FeatureStats
    contexts: TopActivations | None


@torch.no_grad()
def scan_features(
    crosscoder: Crosscoder,
    batches: Iterable[PairedTokens | tuple[Tensor, ...]],
    features: Sequence[int] | Tensor | None = None,
    *,
    top_n: int = 20,
    per_document: int = 1,
    n_sample: int = 10,
    contexts: bool = True,
    use_thresholds: bool | None = None,
    seed: int = 0,
) -> FeatureScan:
    """Stream raw paired batches once: statistics of ``features`` (default all) and their top contexts.

    Batches are ``(x_a, x_b)`` or :class:`PairedTokens`; without document ids every token counts as its own
    document. Features are encoded with the learned thresholds when the crosscoder has them.
    """
    c = crosscoder.config
    feats = torch.arange(c.n_features) if features is None else torch.as_tensor(features, dtype=torch.long)
    thresholds = _uses_thresholds(crosscoder, use_thresholds)
    stats = _StatsAccumulator(crosscoder, feats)
    tops = _ContextAccumulator(c.n_features, feats, top_n, per_document, n_sample, seed) if contexts else None
    device = crosscoder.b_enc.device
    seen = 0
    for raw in batches:
        batch = _as_paired(raw, seen)
        x_a, x_b = crosscoder.normalize(batch.x_a.to(device).float(), batch.x_b.to(device).float())
        sparse = _inference_features(crosscoder, x_a, x_b, thresholds)
        stats.update(sparse, x_a, x_b)
        if tops is not None:
            tops.update(sparse, batch)
        seen += x_a.shape[0]
    if seen == 0:
        raise ValueError("no batches to analyse")
    return FeatureScan(stats.result(), tops.result() if tops is not None else None)


def feature_statistics(
    crosscoder: Crosscoder,
    batches: Iterable[PairedTokens | tuple[Tensor, ...]],
    features: Sequence[int] | Tensor | None = None,
    *,
    use_thresholds: bool | None = None,
) -> FeatureStats:
    """Frequency, mean/max activation and variance shares of ``features`` (default all) in one pass."""
    return scan_features(crosscoder, batches, features, contexts=False, use_thresholds=use_thresholds).stats


# ---------------------------------------------------------------------------------------------- context text
@dataclass(frozen=True)
class ContextRecord:
    """A window of text around one token, with the token set apart."""

    prefix: str
    token: str
    suffix: str
    activation: float
    position: int
    document: int | None = None

    def marked(self, left: str = "«", right: str = "»") -> str:
        """The window with the token between markers."""
        return f"{self.prefix}{left}{self.token}{right}{self.suffix}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def context_record(
    tokenizer: Any,
    token_ids: Sequence[int] | Tensor,
    position: int,
    activation: float,
    *,
    before: int = 24,
    after: int = 8,
    document: int | None = None,
) -> ContextRecord:
    """Decode ``before`` tokens, the token at ``position`` and ``after`` tokens of a document.

    Windows are decoded whole and cut by the lengths of their decoded prefixes, because decoding tokens
    one by one loses the spaces that SentencePiece-style tokenizers fold into a token.
    """
    ids = [int(t) for t in token_ids]
    if not 0 <= position < len(ids):
        raise IndexError(f"position {position} is outside a document of {len(ids)} tokens")
    start, end = max(0, position - before), min(len(ids), position + 1 + after)

    def text(stop: int) -> str:
        return tokenizer.decode(ids[start:stop], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    prefix, through, whole = text(position), text(position + 1), text(end)
    if not (through.startswith(prefix) and whole.startswith(through)):  # a decoder that rewrites across joins
        token = tokenizer.decode(ids[position : position + 1], skip_special_tokens=False)
        return ContextRecord(prefix, token, text(end)[len(through) :], float(activation), position, document)
    return ContextRecord(prefix, through[len(prefix) :], whole[len(through) :], float(activation), position, document)


# ---------------------------------------------------------------------------------------------- nearest shared
class NearestShared(NamedTuple):
    """For each feature, the shared feature whose decoder (in the feature's own model) points most alike."""

    features: Tensor
    shared: Tensor
    cosine: Tensor
    side: list[str]
    """Which model's decoders were compared ("a" or "b")."""


def nearest_shared(crosscoder: Crosscoder, features: Sequence[int] | Tensor) -> NearestShared:
    """Nearest shared feature by decoder cosine in the owning model (A-only → A's decoder, B-only → B's).

    Features that are themselves shared (e.g. a standard crosscoder's) use the model with the larger
    decoder norm and never match themselves.
    """
    c = crosscoder.config
    feats = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    shared = torch.tensor(list(c.shared), dtype=torch.long)
    if len(shared) == 0:
        raise ValueError("this crosscoder has no shared features")
    norms = crosscoder.decoder_norms()
    units = {}
    for side in ("a", "b"):
        rows = raw_decoder(crosscoder, side, shared)
        units[side] = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best, cosine, sides = [], [], []
    for f in feats.tolist():
        side = "a" if f in c.a_only_features else "b" if f in c.b_only_features else None
        if side is None:
            side = "a" if float(norms.a[f]) >= float(norms.b[f]) else "b"
        d = raw_decoder(crosscoder, side, [f])[0]
        sims = units[side] @ (d / d.norm().clamp_min(1e-12))
        sims[shared == f] = -2.0
        i = int(sims.argmax())
        best.append(int(shared[i]))
        cosine.append(float(sims[i]))
        sides.append(side)
    return NearestShared(feats, torch.tensor(best), torch.tensor(cosine), sides)
