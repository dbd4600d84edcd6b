"""Evaluation of a trained crosscoder: FVE, L0, dead features, relative norms and Latent Scaling (SCIENCE.md §6)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from dfc.crosscoder import Crosscoder

PairedBatch = tuple[Tensor, Tensor]


class Evaluation(NamedTuple):
    """Reconstruction quality and sparsity over a stream of paired batches."""

    fve_a: float
    """Fraction of variance explained for model A: ``1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖²``."""
    fve_b: float
    l0: float
    """Mean number of active features per token."""
    dead_fraction: float
    """Share of features that never fired on the evaluated tokens."""
    tokens: int
    fired_count: Tensor
    """How many tokens each feature fired on (length F)."""


class _VarianceSums:
    """Streaming sums for a fraction of variance: Σ‖err‖², Σx, Σ‖x‖², n."""

    def __init__(self) -> None:
        self.err = 0.0
        self.sum: Tensor | None = None
        self.sq = 0.0
        self.n = 0

    def add(self, x: Tensor, recon: Tensor) -> None:
        x = x.double()
        self.err += float((x - recon.double()).pow(2).sum())
        self.sum = x.sum(0) if self.sum is None else self.sum + x.sum(0)
        self.sq += float(x.pow(2).sum())
        self.n += x.shape[0]

    def fve(self) -> float:
        assert self.sum is not None
        total = self.sq - float(self.sum.pow(2).sum()) / self.n
        return 1.0 - self.err / max(total, 1e-12)


@torch.no_grad()
def evaluate(
    model: Crosscoder,
    batches: Iterable[PairedBatch],
    *,
    use_thresholds: bool = False,
    normalized: bool = False,
    max_batches: int | None = None,
) -> Evaluation:
    """FVE per model, L0 and dead fraction; raw batches are normalised unless ``normalized``."""
    sums_a, sums_b = _VarianceSums(), _VarianceSums()
    fired = torch.zeros(model.config.n_features, dtype=torch.long)
    active = 0
    device = model.b_enc.device
    for i, (x_a, x_b) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x_a, x_b = x_a.to(device).float(), x_b.to(device).float()
        if not normalized:
            x_a, x_b = model.normalize(x_a, x_b)
        out = model(x_a, x_b, use_thresholds=use_thresholds)
        sums_a.add(x_a, out.recon_a)
        sums_b.add(x_b, out.recon_b)
        fired += torch.bincount(out.features.cols.cpu(), minlength=model.config.n_features)
        active += out.features.rows.numel()
    if sums_a.n == 0:
        raise ValueError("no batches to evaluate on")
    return Evaluation(
        fve_a=sums_a.fve(),
        fve_b=sums_b.fve(),
        l0=active / sums_a.n,
        dead_fraction=float((fired == 0).float().mean()),
        tokens=sums_a.n,
        fired_count=fired,
    )


def relative_decoder_norm(model: Crosscoder) -> Tensor:
    """``R_i = ‖d_i^A‖ / (‖d_i^A‖ + ‖d_i^B‖)`` per feature; DFC partitions give exactly 1 and 0."""
    return model.decoder_norms().relative


class LatentScaling(NamedTuple):
    """Latent Scaling ratios for a set of features (Minder et al.; SCIENCE.md §6).

    ``nu_eps`` high: the other model's reconstruction *error* also contains the feature, so it is not
    really exclusive (complete shrinkage). ``nu_r`` high: the other model's reconstruction carries
    it through other latents (latent decoupling). "Truly exclusive": ``nu_eps < 0.2`` and ``nu_r < 0.5``.
    Ratios are ``β^other / β^owner`` for the model that owns the feature, so for either partition
    small means exclusive.
    """

    features: Tensor
    beta_r_a: Tensor
    beta_r_b: Tensor
    beta_eps_a: Tensor
    beta_eps_b: Tensor
    nu_r: Tensor
    nu_eps: Tensor
    owner: Tensor
    """0 where the feature is judged against B as the "other" model (A-owned), 1 where B owns it."""
    same_space: Tensor | None = None
    """Per feature: the other model has a decoder for it, so its ``β`` are the paper's projections. False for
    an exclusive feature of a DFC: there the other model's ``β`` is a centred regression slope, ``ν_ε`` lives
    on another scale and ``ν_r``'s denominator vanishes for a cleanly exclusive feature (the owner's
    reconstruction without the feature holds none of it), so ``ν_r`` is reported but not a test there."""


@torch.no_grad()
def latent_scaling(
    model: Crosscoder,
    batches: Iterable[PairedBatch],
    features: Sequence[int] | Tensor,
    *,
    owners: Sequence[int] | Tensor | None = None,
    normalized: bool = False,
    max_batches: int | None = None,
) -> LatentScaling:
    """Fit ``β`` for each feature against four targets and return ``ν_r``, ``ν_ε``.

    For model m with a decoder ``d`` for feature j, ``β = dᵀ Σ f_j y / (‖d‖² Σ f_j²)`` (the paper's
    formula). Across architectures a feature exclusive to one model has no decoder in the other's
    space, so there ``β`` uses the least-squares slope ``v = Cov(f_j, y) / Var(f_j)`` over all
    tokens (with an intercept, so a constant such as the decoder bias does not count as the
    feature) and reports ``‖v‖ / ‖d_owner‖`` — how strongly the other model's target moves with
    the feature, on the common normalised scale. ``owners`` defaults to A for A-only features, B for
    B-only, and the model with the larger decoder norm for shared ones. A feature that never fired
    has no ``β``: its ratios are NaN, never a spurious "exclusive" 0.
    """
    feats = torch.as_tensor(features, dtype=torch.long)
    c = model.config
    norms = model.decoder_norms()
    owner = (norms.b[feats] > norms.a[feats]).long() if owners is None else torch.as_tensor(owners, dtype=torch.long)
    position = torch.full((c.n_features,), -1, dtype=torch.long)
    position[feats] = torch.arange(len(feats))
    n = len(feats)
    dec_a = torch.zeros(n, c.d_a)
    dec_b = torch.zeros(n, c.d_b)
    for i, j in enumerate(feats.tolist()):
        d_a, d_b = model.decoder_directions(j, raw_scale=False)
        if d_a is not None:
            dec_a[i] = d_a
        if d_b is not None:
            dec_b[i] = d_b
    sum_f2 = torch.zeros(n, dtype=torch.float64)
    sum_f = torch.zeros(n, dtype=torch.float64)
    sum_y = {key: torch.zeros(d, dtype=torch.float64) for key, d in (("a", c.d_a), ("b", c.d_b))}
    sum_err = {key: torch.zeros(d, dtype=torch.float64) for key, d in (("a", c.d_a), ("b", c.d_b))}
    n_tokens = 0
    # Σ f_j · target for the four targets (reconstruction minus own term; error plus own term).
    fy = {
        key: torch.zeros(n, d, dtype=torch.float64)
        for key, d in (("r_a", c.d_a), ("r_b", c.d_b), ("e_a", c.d_a), ("e_b", c.d_b))
    }
    device = model.b_enc.device
    for i, (x_a, x_b) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x_a, x_b = x_a.to(device).float(), x_b.to(device).float()
        if not normalized:
            x_a, x_b = model.normalize(x_a, x_b)
        out = model(x_a, x_b, use_thresholds=float(model.thresholds[0]) > 0)
        sel = position[out.features.cols.cpu()] >= 0
        rows = out.features.rows.cpu()[sel]
        slot = position[out.features.cols.cpu()[sel]]
        f = out.features.values.detach().cpu()[sel].double()
        sum_f2.index_add_(0, slot, f * f)
        sum_f.index_add_(0, slot, f)
        n_tokens += x_a.shape[0]
        recon = {"a": out.recon_a.cpu().double(), "b": out.recon_b.cpu().double()}
        err = {"a": (x_a.cpu().double() - recon["a"]), "b": (x_b.cpu().double() - recon["b"])}
        own = {"a": dec_a.double()[slot] * f[:, None], "b": dec_b.double()[slot] * f[:, None]}
        for m in ("a", "b"):
            sum_y[m] += recon[m].sum(0)
            sum_err[m] += err[m].sum(0)
            fy[f"r_{m}"].index_add_(0, slot, f[:, None] * (recon[m][rows] - own[m]))
            fy[f"e_{m}"].index_add_(0, slot, f[:, None] * (err[m][rows] + own[m]))
    safe = sum_f2.clamp_min(1e-12)
    owner_dec_norm = torch.where(owner == 0, dec_a.norm(dim=1), dec_b.norm(dim=1)).double().clamp_min(1e-12)

    total = max(n_tokens, 1)
    variance = (sum_f2 - sum_f.pow(2) / total).clamp_min(1e-12)

    def beta(target: Tensor, dec: Tensor, target_sum: Tensor) -> Tensor:
        dec = dec.double()
        has = dec.norm(dim=1) > 0
        projected = (dec * target).sum(1) / (dec.pow(2).sum(1).clamp_min(1e-12) * safe)
        # No decoder in this model: the feature's own term is zero, so the target is the same for
        # every feature and a centred regression slope is well defined.
        covariance = target - sum_f[:, None] * target_sum[None, :] / total
        free = (covariance / variance[:, None]).norm(dim=1) / owner_dec_norm
        value = torch.where(has, projected, free)
        return torch.where(sum_f2 > 0, value, torch.full_like(value, float("nan"))).float()

    b_r_a, b_r_b = beta(fy["r_a"], dec_a, sum_y["a"]), beta(fy["r_b"], dec_b, sum_y["b"])
    b_e_a, b_e_b = beta(fy["e_a"], dec_a, sum_err["a"]), beta(fy["e_b"], dec_b, sum_err["b"])

    def ratio(a: Tensor, b: Tensor) -> Tensor:
        other, mine = torch.where(owner == 0, b, a), torch.where(owner == 0, a, b)
        return other / mine.abs().clamp_min(1e-6)

    other_has = torch.where(owner == 0, dec_b.norm(dim=1) > 0, dec_a.norm(dim=1) > 0)
    return LatentScaling(feats, b_r_a, b_r_b, b_e_a, b_e_b, ratio(b_r_a, b_r_b), ratio(b_e_a, b_e_b), owner, other_has)
