"""What a training run is told (:class:`TrainConfig`) and what it reports (:class:`StepMetrics`, results)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from dfc.config import CrosscoderConfig

if TYPE_CHECKING:
    from dfc.crosscoder import Crosscoder


@dataclass(frozen=True)
class TrainConfig:
    """How to train; defaults follow the paper's recipe (SCIENCE.md §4), with schedules scaled to short runs."""

    steps: int
    """Number of optimiser steps."""
    lr: float = 1e-4
    """Peak Adam learning rate."""
    warmup_steps: int | None = None
    """Linear lr warm-up; default min(1000, 5% of steps)."""
    decay_start: float = 0.8
    """Fraction of training after which the lr decays linearly to zero."""
    k_anneal_from: int | None = None
    """k at step 0, annealed linearly to the model's k; default 5·k capped at F/4 (paper: 1000 → 200)."""
    k_anneal_steps: int | None = None
    """Steps over which k anneals; default min(5000, 20% of steps)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    decoder_init_norm: float = 0.4
    """Norm of every decoder row at initialisation."""
    exclusive_init_norm: float | None = None
    """Norm of DFC exclusive decoder rows at initialisation; default ``decoder_init_norm``."""
    aux_alpha: float = 1 / 32
    """Weight of the AuxK loss."""
    aux_k: int | None = None
    """Dead features used by AuxK per token; default (d_A + d_B) / 4."""
    dead_after_tokens: int = 10_000_000
    """A feature that has not fired for this many tokens is dead (scale down for small runs)."""
    threshold_beta: float = 0.999
    """EMA decay of the inference thresholds."""
    threshold_start_step: int | None = None
    """Step from which thresholds are tracked; default min(1000, 10% of steps)."""
    outlier_factor: float = 2.0
    """Tokens whose norm exceeds this multiple of the batch median (in either model) are dropped from the loss."""
    estimate_scales: bool = True
    """Estimate the normalisation scales from the first batch unless the model already has them."""
    seed: int = 0
    """Seed for initialisation; training is deterministic given the seed and the data."""
    device: str = "cpu"
    """Where to train: "cpu", "cuda", "cuda:1", ..."""
    bf16: bool | None = None
    """Run the dense encoder in bfloat16; default on for CUDA, off for CPU."""
    checkpoint_every: int = 0
    """Write a resumable checkpoint every N steps (0 = only at the end when a directory is given)."""
    log_every: int = 100
    """Emit a progress record every N steps."""

    def resolved(self, model: CrosscoderConfig) -> TrainConfig:
        """The config with every ``None`` default filled in for this model."""
        k_from = (
            self.k_anneal_from
            if self.k_anneal_from is not None
            else max(model.k, min(5 * model.k, model.n_features // 4))
        )
        return dataclasses.replace(
            self,
            warmup_steps=self.warmup_steps if self.warmup_steps is not None else min(1000, self.steps // 20),
            k_anneal_from=k_from,
            k_anneal_steps=self.k_anneal_steps if self.k_anneal_steps is not None else min(5000, self.steps // 5),
            aux_k=self.aux_k if self.aux_k is not None else max(1, (model.d_a + model.d_b) // 4),
            threshold_start_step=(
                self.threshold_start_step if self.threshold_start_step is not None else min(1000, self.steps // 10)
            ),
            bf16=self.bf16 if self.bf16 is not None else self.device.startswith("cuda"),
        )


class StepMetrics(NamedTuple):
    """What one training step measured."""

    step: int
    loss: float
    loss_a: float
    loss_b: float
    aux_loss: float
    fvu_a: float
    """Fraction of variance unexplained for A on this batch (1 − FVE)."""
    fvu_b: float
    l0: float
    k: float
    lr: float
    dead_fraction: float
    tokens: int
    """Tokens in the batch that counted towards the loss (outliers dropped)."""


class TrainResult(NamedTuple):
    """The outcome of :func:`train`."""

    model: Crosscoder
    steps: int
    tokens: int
    history: list[StepMetrics]
    seconds: float
